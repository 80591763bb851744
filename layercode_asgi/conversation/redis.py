"""The Redis conversation store: history, generations and fair locks shared by processes."""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import anyio
import msgspec

from .._redis import connect, describe_client, describe_url, import_redis, unavailable_errors
from ..errors import ConfigurationError
from ..logs import escape_log_value
from .base import (
    DEFAULT_HISTORY_MAX_BYTES,
    DEFAULT_LOCK_TIMEOUT,
    STORE_DEFAULT,
    ConversationLockTimeout,
    DefaultTimeout,
    HistoryMessage,
    StoreError,
    StoreUnavailableError,
    check_positive_int,
    check_timeout,
    fit,
)

__all__ = ["RedisConversationStore"]

logger = logging.getLogger("layercode_asgi.conversation")

T = TypeVar("T")

_RELEASE_LUA: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

# KEYS[1] = lock key, ARGV[1] = our token, ARGV[2] = new TTL in ms. Extend only if ours.
_EXTEND_LUA: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] = history, KEYS[2] = generation. ARGV[1] = the generation the turn read ('' =
# append whatever it is), ARGV[2] = max messages, ARGV[3] = max bytes of text, ARGV[4] =
# TTL in s (0 = none), ARGV[5..] = the entries. Appends only if the generation is current,
# then drops the oldest entries beyond either bound (keeping the newest). Returns 1 if it
# appended, else 0. An entry's JSON is at least as long as its text: the texts are only
# decoded when the entries' total length is over the bound.
_RECORD_LUA: Final = """
if ARGV[1] ~= '' and (redis.call('get', KEYS[2]) or '0') ~= ARGV[1] then
    return 0
end
for i = 5, #ARGV do
    redis.call('rpush', KEYS[1], ARGV[i])
end
redis.call('ltrim', KEYS[1], -tonumber(ARGV[2]), -1)
local limit = tonumber(ARGV[3])
local items = redis.call('lrange', KEYS[1], 0, -1)
local total = 0
for i = 1, #items do
    total = total + #items[i]
end
if total > limit then
    local sizes = {}
    total = 0
    for i = 1, #items do
        local ok, message = pcall(cjson.decode, items[i])
        local size = #items[i]
        if ok and type(message) == 'table' and type(message.text) == 'string' then
            size = #message.text
        end
        sizes[i] = size
        total = total + size
    end
    local drop = 0
    while total > limit and drop < #items - 1 do
        drop = drop + 1
        total = total - sizes[drop]
    end
    if drop > 0 then
        redis.call('ltrim', KEYS[1], drop, -1)
    end
end
if tonumber(ARGV[4]) > 0 then
    redis.call('expire', KEYS[1], ARGV[4])
end
return 1
"""

# KEYS[1] = history, KEYS[2] = generation, ARGV[1] = the generation key's TTL in s.
_CLEAR_LUA: Final = """
redis.call('del', KEYS[1])
redis.call('incr', KEYS[2])
redis.call('expire', KEYS[2], ARGV[1])
return 1
"""

#: How long a conversation's generation outlives its last clear in Redis (longer than any
#: turn can run).
GENERATION_TTL: Final = 86400

_HISTORY_ENCODER: Final = msgspec.json.Encoder()
_HISTORY_DECODER: Final = msgspec.json.Decoder(HistoryMessage)


class RedisConversationStore:
    """History and locks in Redis, shared by every process (``redis.asyncio``).

    Args:
        url_or_client: a ``redis://``, ``rediss://`` or ``unix://`` URL, or an existing
            ``redis.asyncio.Redis`` client (then not closed by :meth:`aclose`; give it
            ``socket_timeout`` / ``socket_connect_timeout`` so it fails fast).
        ttl: seconds a conversation's history lives after its last append (``None`` or ``0``:
            forever).
        max_messages: messages kept per conversation (``LTRIM``).
        max_bytes: UTF-8 bytes of text kept per conversation: oldest messages dropped
            first, a single longer message cut to it.
        key_prefix: prefix of every key (``<prefix>history:<id>``, ``<prefix>lock:<id>``,
            ``<prefix>generation:<id>``).
        lock_timeout: default wait for :meth:`lock`, in seconds (``None`` = forever).
        lock_ttl: lifetime of a lock key, in seconds; a holder extends it every
            ``lock_ttl / 3`` so long turns keep the lock, and a crashed holder's lock frees
            itself after at most ``lock_ttl``.
        socket_timeout, socket_connect_timeout: for clients created from a URL.
        operation_timeout: hard limit on any single Redis operation, in seconds.
        max_connections: size of the connection pool (clients created from a URL); when
            all are busy, an operation waits for one (up to ``operation_timeout``).

    Connection failures raise :class:`StoreUnavailableError` within about
    ``operation_timeout``; once Redis is back, the same store works again.
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        ttl: int | None = 86400,
        max_messages: int = 200,
        key_prefix: str = "layercode:",
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
        max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
        lock_ttl: float = 10.0,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
        operation_timeout: float = 5.0,
        max_connections: int = 100,
    ) -> None:
        import_redis("RedisConversationStore")
        check_positive_int(max_connections, "max_connections")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0):
            raise ConfigurationError(f"ttl must be an integer >= 0 or None, got {ttl!r}")
        check_positive_int(max_messages, "max_messages")
        check_positive_int(max_bytes, "max_bytes")
        check_timeout(lock_timeout)
        for name, value in (
            ("lock_ttl", lock_ttl),
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
            ("operation_timeout", operation_timeout),
        ):
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")
        self.ttl = ttl or None
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.key_prefix = key_prefix
        self.lock_timeout = lock_timeout
        self.lock_ttl = float(lock_ttl)
        self.operation_timeout = float(operation_timeout)
        if isinstance(url_or_client, str):
            self._client: Any = connect(
                url_or_client,
                what="RedisConversationStore",
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_connect_timeout,
                pool_timeout=self.operation_timeout,
            )
            self._owns_client = True
            self._where = describe_url(url_or_client)
        else:
            self._client = url_or_client
            self._owns_client = False
            self._where = describe_client(url_or_client)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._extend_script = self._client.register_script(_EXTEND_LUA)
        self._record_script = self._client.register_script(_RECORD_LUA)
        self._clear_script = self._client.register_script(_CLEAR_LUA)
        self._unavailable_errors = unavailable_errors()
        from redis.exceptions import RedisError

        self._redis_error: type[BaseException] = RedisError

    def history_key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's history list."""
        return f"{self.key_prefix}history:{conversation_id}"

    def lock_key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's lock."""
        return f"{self.key_prefix}lock:{conversation_id}"

    def generation_key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's generation (advanced by :meth:`clear`)."""
        return f"{self.key_prefix}generation:{conversation_id}"

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        """Await one Redis operation under ``operation_timeout``, mapping its failures."""
        try:
            with anyio.fail_after(self.operation_timeout):
                return await awaitable
        except self._unavailable_errors as exc:
            raise StoreUnavailableError(
                f"Redis at {self._where} is unavailable ({operation}): {type(exc).__name__}: {exc}"
            ) from exc
        except self._redis_error as exc:
            raise StoreError(f"Redis at {self._where} failed ({operation}): {exc}") from exc

    async def append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        """``RPUSH`` + trimming (messages, bytes) + ``EXPIRE``, atomically (one script)."""
        if messages:
            await self._record(conversation_id, messages, "")

    async def record_turn(
        self, conversation_id: str, messages: Sequence[HistoryMessage], generation: int
    ) -> bool:
        """Append ``messages`` if the conversation's generation is still ``generation``,
        checked and appended atomically (one script); True if appended."""
        if not messages:
            return True
        return await self._record(conversation_id, messages, str(generation))

    async def _record(
        self, conversation_id: str, messages: Sequence[HistoryMessage], generation: str
    ) -> bool:
        payload = [_HISTORY_ENCODER.encode(m) for m in fit(messages, self.max_bytes)]
        done = await self._call(
            "append",
            self._record_script(
                keys=[self.history_key(conversation_id), self.generation_key(conversation_id)],
                args=[generation, self.max_messages, self.max_bytes, self.ttl or 0, *payload],
            ),
        )
        return bool(done)

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int]:
        """The history and the generation, read together (one ``MULTI``)."""

        async def transaction() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lrange(self.history_key(conversation_id), 0, -1)
                pipe.get(self.generation_key(conversation_id))
                result: list[Any] = await pipe.execute()
                return result

        raw, generation = await self._call("get", transaction())
        try:
            number = int(generation or 0)
        except ValueError:
            number = -1  # not ours: never equal to what clear writes
        return self._decode(conversation_id, raw), number

    async def get(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first; undecodable entries are skipped."""
        raw: list[bytes | str] = await self._call(
            "get", self._client.lrange(self.history_key(conversation_id), 0, -1)
        )
        return self._decode(conversation_id, raw)

    def _decode(self, conversation_id: str, raw: list[bytes | str]) -> list[HistoryMessage]:
        messages: list[HistoryMessage] = []
        for item in raw:
            try:
                messages.append(_HISTORY_DECODER.decode(item))
            except msgspec.DecodeError:
                logger.warning(
                    "skipping an undecodable history entry of conversation %s",
                    escape_log_value(conversation_id),
                )
        return messages

    async def clear(self, conversation_id: str) -> None:
        """Delete the conversation's history and advance its generation (one script): a
        turn running meanwhile, in any process, will not record."""
        await self._call(
            "clear",
            self._clear_script(
                keys=[self.history_key(conversation_id), self.generation_key(conversation_id)],
                args=[GENERATION_TTL],
            ),
        )

    @asynccontextmanager
    async def lock(
        self,
        conversation_id: str,
        *,
        timeout: float | DefaultTimeout | None = STORE_DEFAULT,  # noqa: ASYNC109 - bounds the wait only
    ) -> AsyncIterator[None]:
        """Hold the conversation exclusively across every process using this Redis.

        Acquired with ``SET key token NX PX lock_ttl``, polling (2 ms doubling to 50 ms)
        until ``timeout``; kept alive by a background task while held; released with a
        compare-and-delete script, even when the holder is cancelled.
        """
        wait = self.lock_timeout if timeout is STORE_DEFAULT else timeout
        assert not isinstance(wait, DefaultTimeout)
        check_timeout(wait)
        key = self.lock_key(conversation_id)
        token = secrets.token_hex(16)
        ttl_ms = max(1, round(self.lock_ttl * 1000))
        try:
            await self._acquire(conversation_id, key, token, ttl_ms, wait)
        except ConversationLockTimeout:
            raise
        except BaseException:
            # A SET cancelled or timed out in flight may still have succeeded: undo it, but
            # briefly (Redis is likely down, and the key expires by itself).
            await self._release(key, token, limit=1.0)
            raise
        error: BaseException | None = None
        try:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep_alive, conversation_id, key, token, ttl_ms)
                    try:
                        yield
                    finally:
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The keep-alive task never raises, so this is the holder's own exception,
                # wrapped by the task group: re-raise it unchanged, as if no group existed.
                if len(group.exceptions) != 1:
                    raise
                error = group.exceptions[0]
            if error is not None:
                raise error
        finally:
            await self._release(key, token)

    async def _acquire(
        self, conversation_id: str, key: str, token: str, ttl_ms: int, wait: float | None
    ) -> None:
        deadline = math.inf if wait is None else anyio.current_time() + wait
        delay = 0.002
        while True:
            if await self._call("lock", self._client.set(key, token, nx=True, px=ttl_ms)):
                return
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise ConversationLockTimeout(conversation_id, wait or 0.0)
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    async def _keep_alive(self, conversation_id: str, key: str, token: str, ttl_ms: int) -> None:
        """Extend the lock every ``lock_ttl / 3``; never raises (it would cancel the holder)."""
        interval = self.lock_ttl / 3
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(max(interval, 0.05)):
                    extended = await self._extend_script(keys=[key], args=[token, ttl_ms])
            except Exception as exc:  # the holder must not be interrupted
                logger.warning(
                    "could not extend the lock of conversation %s: %s: %s",
                    escape_log_value(conversation_id),
                    type(exc).__name__,
                    escape_log_value(exc),
                )
                continue
            if not extended:
                logger.warning(
                    "lost the lock of conversation %s (it expired); another turn may run "
                    "concurrently; consider a larger lock_ttl",
                    escape_log_value(conversation_id),
                )
                return

    async def _release(self, key: str, token: str, *, limit: float = math.inf) -> None:
        """Compare-and-delete, shielded from cancellation, bounded in time, never raising.

        Never waits longer than ``lock_ttl``: by then the key has expired anyway.
        """
        limit = min(self.operation_timeout, self.lock_ttl, limit)
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(limit):
                    await self._release_script(keys=[key], args=[token])
            except Exception as exc:  # the lock expires by itself anyway
                logger.warning(
                    "could not release Redis lock %s (it will expire in %g s): %s: %s",
                    escape_log_value(key),
                    self.lock_ttl,
                    type(exc).__name__,
                    escape_log_value(exc),
                )

    async def ping(self) -> None:
        """``PING`` Redis; raise :class:`StoreUnavailableError` if it does not answer."""
        try:
            await self._call("ping", self._client.ping())
        except StoreUnavailableError:
            raise
        except StoreError as exc:  # answered, but not as a usable Redis
            raise StoreUnavailableError(str(exc)) from exc.__cause__

    async def aclose(self) -> None:
        """Close the client (only if this store created it)."""
        if self._owns_client:
            await self._client.aclose()
