"""Replay protection: remember verified webhook signatures for as long as they are valid.

A signed webhook stays valid for ``tolerance`` seconds around its timestamp. Whoever
captures one (a proxy log, a leaked request dump) could send it again inside that window;
the signature would verify. With replay protection on, the first delivery is remembered
and a second delivery of the same signed request is refused with 409 — the webhook
analogue of an idempotency key.

The key of a delivery is ``sha256(t + "." + body)``: it names the signed content, not the
header text, so adding junk ``v1=`` entries or reordering the header does not make a
replay look new. It is remembered for as long as its signature can still verify: the
check compares whole seconds (``floor(now) - t <= tolerance``), so until
``t + tolerance + 1``. Memory is bounded by the request rate times the window.

* :class:`MemoryReplayCache`: one process; bounded (``max_entries``, oldest dropped first
  with a warning — size it above your peak rate * (2 * tolerance + 1)).
* :class:`RedisReplayCache`: every worker sharing one Redis (``SET key 1 NX EX ttl``).
  When Redis is down or answers with an error (OOM, READONLY, any ``RedisError``) it raises
  :class:`~layercode_asgi.conversation.StoreUnavailableError`; the middleware answers 503
  (fail closed: a replay check that cannot run does not pass).

A delivery answered 503 (with ``Retry-After``: not processed, try again) is forgotten
(``forget``, when the cache has one: both of these do), so LayerCode's retry of it is taken.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from typing import Any, Protocol

from ._redis import (
    MAX_EXPIRE_SECONDS,
    Tasks,
    clients,
    ping_primaries,
    redis_error_text,
    retry,
    write_check_keys,
)
from .conversation import StoreUnavailableError
from .errors import MAX_NUMBER, ConfigurationError, check_positive_int, check_seconds, check_text
from .loops import PerLoop

__all__ = ["MemoryReplayCache", "RedisReplayCache", "ReplayCache", "replay_key"]

logger = logging.getLogger("layercode_asgi.replay")

_FORGET_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def replay_key(timestamp: str, body: bytes) -> str:
    """The identity of one signed delivery: the hash of what the signature covers."""
    return hashlib.sha256(timestamp.encode("ascii") + b"." + body).hexdigest()


class ReplayCache(Protocol):
    """Remembers deliveries; ``seen`` is an atomic check-and-remember.

    A cache may also have ``async def forget(self, key: str) -> None``: the middleware calls
    it when the answer to a delivery it remembered is a 503 (not processed), so the retry of
    the same signed bytes is taken. Without it, that retry gets 409.
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
        # key -> expiry (monotonic seconds). Expiries differ per key, so expired entries are
        # swept from the oldest end in passing and on insertion.
        self._entries: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, expiry = next(iter(entries.items()))
            if expiry > now:
                break
            del entries[key]

    async def seen(self, key: str, ttl: float) -> bool:
        # NaN, infinity, <= 0: would never (or always) expire; True is no number of seconds
        if ttl is True or not 0 < ttl <= MAX_NUMBER:
            check_seconds("ttl", ttl, zero=False, none=False)
        now = time.monotonic()
        self._sweep(now)
        expiry = self._entries.get(key)
        if expiry is not None and expiry > now:
            return True
        self._entries[key] = now + ttl
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
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


class RedisReplayCache:
    """Replay cache shared by every worker using the same Redis: ``SET NX EX``.

    From a URL it makes one client per event loop; a ``redis.asyncio`` client given instead
    stays the application's (not closed by :meth:`aclose`): use it on the loop that created
    it.
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
        self._clients: PerLoop[Any] = clients(
            url_or_client,
            lambda client: client,
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
        # The value of the keys this cache sets: ``forget`` deletes only those.
        self._token = secrets.token_hex(8).encode("ascii")

    async def seen(self, key: str, ttl: float) -> bool:
        if ttl is True or not 0 < ttl <= MAX_NUMBER:  # as MemoryReplayCache: the same refusal
            check_seconds("ttl", ttl, zero=False, none=False)
        seconds = min(math.ceil(ttl), MAX_EXPIRE_SECONDS)  # Redis refuses longer
        try:
            created = await self._clients.get().set(
                self.key_prefix + key, self._token, nx=True, ex=seconds
            )
        except UnicodeEncodeError:  # the prefix was checked: a lone surrogate in ``key``
            raise ValueError("replay key is not valid text (a lone surrogate)") from None
        except self._errors as exc:
            if not isinstance(exc, self._answered):
                # No reply: Redis may yet run the SET, and the 503's retry must be taken.
                self._tasks.start(self._forget_later(key, seconds))
            raise self._unavailable(exc) from exc
        return not created

    async def forget(self, key: str) -> None:
        """Delete ``key`` if this cache set it (not a later delivery's, after it expired)."""
        try:
            await self._clients.get().eval(_FORGET_LUA, 1, self.key_prefix + key, self._token)
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    async def _forget_later(self, key: str, seconds: float) -> None:
        """Forget ``key`` as soon as Redis answers (within ``seconds``, its lifetime): then
        any ``SET`` of it sent before has run."""

        async def attempt() -> bool:
            try:
                await self.forget(key)
            except StoreUnavailableError as exc:
                return isinstance(exc.__cause__, self._answered)
            return True

        await retry(attempt, seconds, 1.0)

    async def ping(self) -> None:
        """``PING`` Redis (every primary of a cluster), for ``/ready``; raise
        :class:`~layercode_asgi.conversation.StoreUnavailableError` if it does not answer,
        or does not take writes: checked (one short-lived key, ``<prefix>ready``) at the
        first ping and at the first after a failed check."""
        client = self._clients.get()
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
        client = self._clients.take()
        if client is not None:
            await client.aclose()
