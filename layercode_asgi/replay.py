"""Replay protection: remember verified webhook signatures for as long as they are valid.

A signed webhook stays valid for ``tolerance`` seconds around its timestamp: whoever
captures one (a proxy log, a leaked request dump) could send it again inside that window.
With replay protection on, a second delivery of the same signed request is refused with 409.

The key of a delivery is ``sha256(t + "." + body)``: the signed content, not the header
text, so junk ``v1=`` entries or a reordered header do not make a replay look new. It is
remembered while its signature can still verify: until ``t + tolerance + 1`` (the check
compares whole seconds).

* :class:`MemoryReplayCache`: one process; bounded (``max_entries``, oldest dropped first
  with a warning — size it above your peak rate * (2 * tolerance + 1)).
* :class:`RedisReplayCache`: every worker sharing one Redis (``SET key value NX EX ttl``).
  Redis down or answering an error (OOM, READONLY, any ``RedisError``) raises
  :class:`~layercode_asgi.conversation.StoreUnavailableError`: the middleware answers 503.

A delivery answered 503 (not processed, try again) is forgotten (``forget``, which both
have), so LayerCode's retry of it is taken.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any, Protocol

import anyio

from ._redis import (
    MAX_EXPIRE_SECONDS,
    Tasks,
    clients,
    ping_primaries,
    redis_error_text,
    write_check_keys,
)
from .conversation import StoreUnavailableError
from .errors import MAX_NUMBER, ConfigurationError, check_positive_int, check_seconds, check_text
from .loops import PerLoop

__all__ = ["MemoryReplayCache", "RedisReplayCache", "ReplayCache", "replay_key"]

logger = logging.getLogger("layercode_asgi.replay")

# Delete KEYS[1] if its value starts with ARGV[1]: a check's value (all are as long), or
# the cache's token (any of its checks).
_FORGET_LUA = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, #ARGV[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: The key and value of the last delivery a RedisReplayCache remembered in this context (a
#: request's task, where the middleware forgets it): its ``forget`` deletes that value only.
_REMEMBERED: ContextVar[tuple[str, str]] = ContextVar("layercode_asgi_replay", default=("", ""))

#: The SETs that got no reply a RedisReplayCache keeps per event loop (beyond: the oldest
#: dropped) to undo once Redis answers.
_UNANSWERED_KEPT = 10_000


def replay_key(timestamp: str, body: bytes) -> str:
    """The identity of one signed delivery: the hash of what the signature covers."""
    return hashlib.sha256(timestamp.encode("ascii") + b"." + body).hexdigest()


class ReplayCache(Protocol):
    """Remembers deliveries; ``seen`` is an atomic check-and-remember.

    A cache may also have ``async def forget(self, key: str) -> None``, called when a
    delivery it remembered is answered 503 (not processed), so its retry is taken (without
    it, that retry gets 409).
    """

    async def seen(self, key: str, ttl: float) -> bool:
        """Remember ``key`` for ``ttl`` seconds; return True if it was already there. A
        ``ttl`` that is not a finite number > 0 is refused (``ConfigurationError``, a
        ``ValueError``)."""
        ...

    async def aclose(self) -> None: ...


class MemoryReplayCache:
    """Replay cache of one process, bounded in size and by the signatures' lifetime."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        check_positive_int(max_entries, "max_entries")
        self.max_entries = max_entries
        # key -> monotonic expiry, oldest first: expired entries are swept from that end.
        self._entries: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def seen(self, key: str, ttl: float) -> bool:
        # NaN, infinity, <= 0: would never (or always) expire; True is no number of seconds
        if ttl is True or not 0 < ttl <= MAX_NUMBER:
            check_seconds("ttl", ttl, zero=False, none=False)
        now, entries = time.monotonic(), self._entries
        while entries:
            oldest, oldest_expiry = next(iter(entries.items()))
            if oldest_expiry > now:
                break
            del entries[oldest]
        expiry = entries.get(key)
        if expiry is not None and expiry > now:
            return True
        entries[key] = now + ttl
        entries.move_to_end(key)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
            logger.warning(
                "replay cache full (%d entries): forgetting the oldest signature early; "
                "raise max_entries or use Redis",
                self.max_entries,
            )
        return False

    async def forget(self, key: str) -> None:
        """Forget ``key`` (a delivery answered 503), so its retry is taken."""
        self._entries.pop(key, None)

    async def aclose(self) -> None:
        self._entries.clear()


class _OnLoop:
    """A cache's client on one event loop, and the SETs it sent there that got no reply."""

    __slots__ = ("client", "unanswered", "undoer")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.unanswered: dict[str, tuple[str, float]] = {}  # value -> (key, expiry)
        self.undoer: asyncio.Task[None] | None = None


class RedisReplayCache:
    """Replay cache shared by every worker using the same Redis: ``SET NX EX``.

    From a URL it makes one client per event loop; a ``redis.asyncio`` client given instead
    stays the application's (not closed by :meth:`aclose`): use it on the loop that made it.

    Each check sets a value of its own. One that got no reply (Redis slow or down: 503) may
    yet run and refuse LayerCode's retry (409): it is undone (its value only) once Redis
    answers, by one background task per event loop, trying at most once a second.
    :meth:`forget` in the task that remembered the delivery deletes its value only too (run
    late, it spares the retry's), known from the task's context: no per-key table to bound.
    """

    def __init__(
        self,
        url_or_client: str | Any,
        *,
        key_prefix: str = "layercode:replay:",
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
        max_connections: int = 100,
        cluster: bool = False,
    ) -> None:
        check_seconds("socket_timeout", socket_timeout, zero=False, none=False)
        check_seconds("socket_connect_timeout", socket_connect_timeout, zero=False, none=False)
        check_positive_int(max_connections, "max_connections")
        if not isinstance(key_prefix, str):
            raise ConfigurationError(f"key_prefix must be a string, got {key_prefix!r}")
        check_text("key_prefix", key_prefix)
        self._clients: PerLoop[_OnLoop] = clients(
            url_or_client,
            _OnLoop,
            "replay protection on Redis",
            cluster=cluster,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            pool_timeout=socket_timeout,
        )
        self.key_prefix = key_prefix
        from redis.exceptions import RedisClusterException, RedisError, ResponseError

        # Down, timed out, an error reply (OOM, READONLY...), no cluster node reachable
        # (RedisClusterException is not a RedisError): the check cannot run.
        self._errors = (RedisError, RedisClusterException, OSError)
        self._answered = ResponseError  # an error reply: the command did not run
        self._tasks = Tasks()
        self._check_writes = True  # by the next ping(): at first, and after a failure
        # A check's value: this cache's token, then the check's number (the same length).
        self._token = secrets.token_hex(8)
        self._numbers = itertools.count()

    async def seen(self, key: str, ttl: float) -> bool:
        if ttl is True or not 0 < ttl <= MAX_NUMBER:  # as MemoryReplayCache: the same refusal
            check_seconds("ttl", ttl, zero=False, none=False)
        seconds = min(math.ceil(ttl), MAX_EXPIRE_SECONDS)  # Redis refuses longer
        here = self._clients.get()
        value = f"{self._token}{next(self._numbers):016x}"
        try:
            created = await here.client.set(self.key_prefix + key, value, nx=True, ex=seconds)
        except UnicodeEncodeError:  # the prefix was checked: a lone surrogate in ``key``
            raise ValueError("replay key is not valid text (a lone surrogate)") from None
        except self._errors as exc:
            if not isinstance(exc, self._answered):  # no reply: Redis may yet run the SET
                _REMEMBERED.set((key, value))  # forget() in this task deletes this value
                unanswered = here.unanswered
                unanswered[value] = (key, time.monotonic() + seconds)
                if len(unanswered) > _UNANSWERED_KEPT:
                    del unanswered[next(iter(unanswered))]
                if here.undoer is None or here.undoer.done():
                    here.undoer = self._tasks.start(self._undo(here))
            raise self._unavailable(exc) from exc
        if created:
            _REMEMBERED.set((key, value))
        return not created

    async def forget(self, key: str) -> None:
        """Delete ``key`` if this cache set it (not a later delivery's, after it expired):
        in the task that remembered it, if it holds that check's value still."""
        remembered, value = _REMEMBERED.get()
        mine = value if remembered == key and value.startswith(self._token) else self._token
        try:
            await self._clients.get().client.eval(_FORGET_LUA, 1, self.key_prefix + key, mine)
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    async def _undo(self, here: _OnLoop) -> None:
        """Delete the values of the SETs that got no reply once Redis answers (those sent
        before have run then): a round stops at the first attempt with no reply, the next
        waits twice as long (50 ms up to 1 s); one gone or expired is dropped."""
        delay = 0.05
        while here.unanswered:
            await anyio.sleep(delay)
            delay = min(2 * delay, 1.0)
            for value, (key, expiry) in list(here.unanswered.items()):
                if expiry > time.monotonic():
                    try:
                        await here.client.eval(_FORGET_LUA, 1, self.key_prefix + key, value)
                    except self._errors as exc:
                        if not isinstance(exc, self._answered):
                            break
                here.unanswered.pop(value, None)

    async def ping(self) -> None:
        """``PING`` Redis (every primary of a cluster), for ``/ready``; raise
        :class:`~layercode_asgi.conversation.StoreUnavailableError` if it does not answer,
        or does not take writes: checked (one short-lived key, ``<prefix>ready``) at the
        first ping and at the first after a failed check."""
        client = self._clients.get().client
        try:
            await ping_primaries(client)
            if self._check_writes:
                for key in await write_check_keys(client, self.key_prefix + "ready"):
                    await client.set(key, b"1", px=1000)
                self._check_writes = False
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        self._check_writes = True  # checked again by the next ping()
        text = redis_error_text(exc)
        return StoreUnavailableError(f"replay cache unavailable: {type(exc).__name__}: {text}")

    async def aclose(self) -> None:
        """Close the client this cache created on this event loop (not one given to it)."""
        await self._tasks.cancel()
        here = self._clients.take()
        if here is not None:
            await here.client.aclose()
