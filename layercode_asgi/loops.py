"""Values that belong to an event loop: a client whose pooled connections the loop that
opened them must use and close."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio.lowlevel

__all__ = ["LOOPS_KEPT", "PerLoop"]

T = TypeVar("T")

#: Loops whose value is kept at once (two servers in threads; loops gone without a lifespan
#: to close theirs): beyond them the oldest is dropped unclosed (another loop cannot close it).
LOOPS_KEPT = 8


class PerLoop(Generic[T]):
    """A client this package created (from a URL, a key): one per event loop, as an app may
    be served on several loops, at once (servers in threads) or in turn (a test each).

    :meth:`get` adopts ``value`` on the first loop and makes another with ``make`` on each
    other loop; :meth:`take` hands this loop's to its shutdown to close. Without ``make``,
    ``value`` (the application's client) is always returned as is. ``check`` runs on each
    loop before its first value (it may refuse the loop).
    """

    __slots__ = ("_check", "_fresh", "_make", "_value", "_values")

    def __init__(
        self, value: T, make: Callable[[], T] | None, check: Callable[[], None] | None = None
    ) -> None:
        self._value = value
        self._make = make
        self._check = check
        self._fresh = [value] if make is not None else []  # not yet any loop's (pop: atomic)
        self._values: dict[object, T] = {}

    def get(self) -> T:
        """The current event loop's value."""
        loop = anyio.lowlevel.current_token()
        try:
            return self._values[loop]
        except KeyError:
            pass
        if self._check is not None:
            self._check()
        if self._make is None:
            value = self._value
        else:
            try:  # two loops' first calls at once (two threads): one of them adopts it
                value = self._fresh.pop()
            except IndexError:
                value = self._make()
        for ended in list(self._values)[: 1 - LOOPS_KEPT]:
            self._values.pop(ended, None)
        self._values[loop] = value
        return value

    def take(self) -> T | None:
        """For ``aclose``: this loop's value to close, if made here and used on this loop
        (``None`` otherwise: never used, it holds no connection); the next :meth:`get` on
        this loop makes a new one."""
        if self._make is None:
            return None
        return self._values.pop(anyio.lowlevel.current_token(), None)
