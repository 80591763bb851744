"""Exception hierarchy shared by every layercode-asgi module.

Every error the library raises on purpose derives from :class:`LayercodeError`, so an
application can catch the whole family with one ``except`` clause. Errors caused by bad
*input* (signatures, payloads) also derive from :class:`ValueError`, matching the reference
SDK, whose callers catch ``ValueError``.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar
from urllib.parse import unquote

from .redaction import escape_terminal

_T = TypeVar("_T")

__all__ = ["ConfigurationError", "LayercodeError", "ResponseError", "SettingsError"]


class LayercodeError(Exception):
    """Base class of every exception raised on purpose by layercode-asgi."""


class ConfigurationError(LayercodeError, ValueError):
    """A setting is missing or invalid; raised at start-up (or, where no start-up runs, at
    the first use of what it configures: a Redis client on trio)."""


#: The ``Retry-After`` of a 503 that passes (draining, a busy conversation, a store
#: down): a client may try again after this many seconds.
RETRY_AFTER_SECONDS = 5
#: That header, as a pre-rendered ASGI header.
RETRY_AFTER = (b"retry-after", str(RETRY_AFTER_SECONDS).encode())


class ResponseError(LayercodeError):
    """An error with an HTTP answer: ``status_code`` and a JSON ``{"error": message}``.

    Raised where a request cannot be served (e.g. 503 while the conversation store is
    down); the response machinery turns it into that JSON answer, never a stack trace.
    ``retry_after`` (seconds) adds a ``Retry-After`` header: the condition is passing.
    """

    def __init__(self, status_code: int, message: str, *, retry_after: int | None = None) -> None:
        if isinstance(status_code, bool) or not isinstance(status_code, int):
            raise TypeError(
                f"status_code must be an int from 400 to 599, got {kind_of(status_code)}"
            )
        if not 400 <= status_code <= 599:
            raise ValueError(f"status_code must be an int from 400 to 599, got {status_code!r}")
        check_type("message", message, str, "a str")
        if retry_after is not None:
            check_positive_int(retry_after, "retry_after", zero=True)
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status_code, self.message), vars(self))

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's extra headers (``Retry-After`` when set)."""
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(self.retry_after).encode())]


class SettingsError(ConfigurationError):
    """One or more settings are invalid; ``problems`` lists each one (``"VAR: what"``), and
    the message is one line (``"2 invalid settings: VAR: what; VAR2: what"``)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = check_strs("problems", problems, "an iterable of str")
        if not self.problems:
            raise ValueError("problems must name at least one problem")
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} invalid settings: {'; '.join(self.problems)}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


#: The largest number any count, size or duration may be: a float's (every one is compared
#: with floats: clocks, timeouts); an int is compared with it exactly.
MAX_NUMBER = sys.float_info.max


def check_positive_int(value: object, name: str, *, zero: bool = False) -> None:
    """Refuse (``ConfigurationError``) all but an ``int`` (no bool) from 1 (0 with ``zero``)
    to :data:`MAX_NUMBER`."""
    least = 0 if zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= MAX_NUMBER:
        bound = ">= 0" if zero else "> 0"
        if isinstance(value, int) and value > MAX_NUMBER:  # (bool is no int > MAX_NUMBER)
            bound += " that a float can hold"
        raise ConfigurationError(f"{name} must be an integer {bound}, got {_shown(value)}")


def check_seconds(name: str, value: object, *, zero: bool, none: bool) -> None:
    """Refuse (:class:`ConfigurationError` naming the argument) all but a finite number of
    seconds >= 0 (no bool); 0 and ``None`` only if allowed."""
    if value is None and none:
        return
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value <= MAX_NUMBER  # not NaN, infinity, nor an int beyond a float
        and (value > 0 or (zero and value == 0))
    ):
        return
    expected = "a finite number " + (">= 0" if zero else "> 0") + (" or None" if none else "")
    raise ConfigurationError(f"{name} must be {expected}, got {_shown(value)}")


def _shown(value: object) -> str:
    """``repr(value)``, cut to 80 characters (an int of over 4,300 digits has none)."""
    try:
        text = repr(value)
    except ValueError:
        return "an int too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


def check_text(name: str, value: object) -> None:
    """Refuse, naming the argument, a text that is not a ``str`` (``TypeError``) or not
    UTF-8 (a lone surrogate: :class:`ConfigurationError`); ``None`` passes."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ConfigurationError(f"{name} is not valid text (a lone surrogate)") from None


#: What no URL host holds, once percent-decoded (WHATWG's forbidden domain code points).
_NOT_IN_HOST: Final = frozenset(map(chr, range(33))) | frozenset("#%/:<>?@[\\]^|\x7f")


def held_in_host(host: str) -> str | None:
    """The first character of a URL's ``host`` that no host holds (percent-decoded: httpx
    sends ``a b`` as ``a%20b``), or ``None``. An IPv6 address (with ``:``) is its parser's."""
    return None if ":" in host else next((c for c in unquote(host) if c in _NOT_IN_HOST), None)


def from_environment(make: Callable[[], _T], what: str) -> _T:
    """``make()``, an HTTP client httpx builds from the environment: its failure (a proxy
    httpx cannot use, an unreadable ``SSL_CERT_FILE``) is a ConfigurationError naming those."""
    try:
        return make()
    except Exception as exc:
        raise ConfigurationError(
            f"cannot make an HTTP client {what} from the environment (HTTP_PROXY, HTTPS_PROXY, "
            f"ALL_PROXY, SSL_CERT_FILE): {type(exc).__name__}: {escape_terminal(str(exc))}"
        ) from None


def check_callable(name: str, value: object, *, sync: bool = False) -> None:
    """Refuse (``TypeError`` naming the argument) a non-callable other than ``None``, a
    generator function and, with ``sync``, a coroutine function (it would never run)."""
    if value is None:
        return
    if not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {kind_of(value)}")
    if inspect.isgeneratorfunction(value) or inspect.isasyncgenfunction(value):
        raise TypeError(f"{name} must be a function returning its answer, not a generator function")
    if sync and inspect.iscoroutinefunction(value):
        raise TypeError(f"{name} must be a plain function: it is called without await")


def check_type(name: str, value: object, kind: Any, expected: str) -> None:
    """Refuse (``TypeError`` naming the argument) a ``value`` that is not a ``kind``."""
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {expected}, got {kind_of(value)}")


def check_strs(name: str, value: object, expected: str) -> tuple[str, ...]:
    """``value`` (an iterable of ``str``, not one ``str``) as a tuple, else a ``TypeError``."""
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return items
        shown = next(kind_of(item) for item in items if not isinstance(item, str))
        raise TypeError(f"{name} must be {expected}, got an item that is a {shown}")
    raise TypeError(f"{name} must be {expected}, got {kind_of(value)}")


def kind_of(value: object) -> str:
    """What ``value`` is, for an error: its type's name, or ``the class X (call it: X())``."""
    if isinstance(value, type):
        return f"the class {value.__name__} (call it: {value.__name__}())"
    return type(value).__name__


def require_asyncio(what: str) -> None:
    """Raise :class:`ConfigurationError` unless an asyncio event loop runs this: ``what``
    (built on asyncio) cannot run on trio (Hypercorn's ``--worker-class trio``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(
            f"{what} runs on asyncio only, not on trio: serve the app on asyncio (uvicorn, "
            "or Hypercorn without --worker-class trio)"
        ) from None
