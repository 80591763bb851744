"""The Redis conversation store: history, generations and fair locks shared by processes.

A turn costs two round trips when its conversation is free: :meth:`lock` takes the lock
and reads the history in one script (:meth:`read_turn` then returns what it read), and
:meth:`record_turn` by the lock's holder records and releases in one script. Turns of one
conversation run in the order they reached Redis, whichever process received them (a fair
queue; see :mod:`.redis_scripts`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from typing import Any, Final, TypeVar

import anyio
import msgspec

from .._redis import (
    MAX_EXPIRE_SECONDS,
    Tasks,
    clients,
    describe_client,
    import_redis,
    ping_primaries,
    pubsub_of,
    redis_error_text,
    write_check_keys,
)
from ..errors import ConfigurationError, check_positive_int, check_seconds, check_text
from ..logs import escape_error, escape_log_value
from ..redaction import mask_url
from . import redis_scripts as scripts
from .base import (
    DEFAULT_HISTORY_MAX_BYTES,
    DEFAULT_LOCK_TIMEOUT,
    STORE_DEFAULT,
    ConversationLockTimeout,
    HistoryMessage,
    LockTimeout,
    StoreError,
    StoreUnavailableError,
    check_history_bounds,
    fit,
    lock_wait,
    newest,
)
from .redis_scripts import Keys

__all__ = ["RedisConversationStore"]

logger = logging.getLogger("layercode_asgi.conversation")

T = TypeVar("T")

#: Seconds a generation outlives its last clear or read (longer than any turn runs).
GENERATION_TTL: Final = 86400

#: More than a Redis list holds: a larger ``max_messages`` would reach LTRIM as "-1e+17",
#: which Redis refuses.
_MAX_KEPT: Final = 2**32

_HISTORY_ENCODER: Final = msgspec.json.Encoder()
_HISTORY_DECODER: Final = msgspec.json.Decoder(HistoryMessage)


class _Hold:
    """This task's hold of a conversation's lock (in :data:`_HOLD` while held)."""

    __slots__ = ("conversation_id", "ended", "entry", "keys", "read", "released", "store", "token")

    def __init__(self, store: RedisConversationStore, conversation_id: str, keys: Keys) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.keys = keys
        self.token = secrets.token_hex(16)
        self.entry = f"{self.token} {store._channel}"
        self.read: list[Any] | None = None  # [history entries, generation] read with the lock
        self.released = False
        self.ended = False  # by record_turn (released, or retried in the background)


_HOLD: ContextVar[_Hold | None] = ContextVar("layercode_asgi_redis_hold", default=None)


class _Client:
    """A Redis client and the store's scripts, registered on it."""

    __slots__ = (
        "acquire", "check", "clear", "extend", "probe", "read", "record", "redis", "release"
    )  # fmt: skip

    def __init__(self, redis: Any) -> None:
        register = redis.register_script
        self.redis = redis
        self.acquire = register(scripts.ACQUIRE_LUA)
        self.check = register(scripts.CHECK_LUA)
        self.release = register(scripts.RELEASE_LUA)
        self.extend = register(scripts.EXTEND_LUA)
        self.read = register(scripts.READ_LUA)
        self.record = register(scripts.RECORD_LUA)
        self.clear = register(scripts.CLEAR_LUA)
        self.probe = register(scripts.PROBE_LUA)


class RedisConversationStore:
    """History and locks in Redis, shared by every process (``redis.asyncio``).

    Args:
        url_or_client: a ``redis://``, ``rediss://`` or ``unix://`` URL, or an existing
            ``redis.asyncio.Redis`` (or ``RedisCluster``) client (then not closed by
            :meth:`aclose`, and to be used on the event loop that created it; give it
            ``socket_timeout`` / ``socket_connect_timeout`` so it fails fast, and no
            ``decode_responses``: with it, a conversation holding bytes that are not UTF-8,
            which the store never writes, fails until cleared). From a URL, the store makes
            one client per event loop (an app may be served on a later one).
        ttl: seconds a conversation's history lives after its last append (``None`` or ``0``:
            forever; more than Redis can express, about 31 million years, is cut to it).
        max_messages: messages kept per conversation (``LTRIM``).
        max_bytes: UTF-8 bytes of text kept per conversation (>= 4): oldest messages
            dropped first, a single longer message cut to it (never empty).
        key_prefix: prefix of every key: ``<prefix>{<id>}:history``, ``…:lock``,
            ``…:queue``, ``…:generation`` (no braces in the prefix).
        lock_timeout: default wait for :meth:`lock`, in seconds (``None`` = forever).
        lock_ttl: lifetime of a lock key, in seconds; a holder extends it every
            ``lock_ttl / 3`` so long turns keep the lock, and a crashed holder's lock frees
            itself after at most ``lock_ttl``.
        socket_timeout: seconds per socket operation, for clients created from a URL.
        socket_connect_timeout: seconds to connect, for clients created from a URL.
        operation_timeout: hard limit on any single Redis operation, in seconds.
        max_connections: size of the connection pool (clients created from a URL); when
            all are busy, an operation waits for one (up to ``operation_timeout``).
        cluster: the URL names a node of a Redis Cluster.

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
        cluster: bool = False,
    ) -> None:
        import_redis("RedisConversationStore")
        check_positive_int(max_connections, "max_connections")
        if ttl is not None:
            check_positive_int(ttl, "ttl", zero=True)
        check_history_bounds(max_messages, max_bytes)
        check_seconds("lock timeout", lock_timeout, zero=True, none=True)
        for name, value in (
            ("lock_ttl", lock_ttl),
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
            ("operation_timeout", operation_timeout),
        ):
            check_seconds(name, value, zero=False, none=False)
        if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(
                f"key_prefix must be a string without braces, got {key_prefix!r}"
            )
        check_text("key_prefix", key_prefix)
        self.ttl = min(ttl, MAX_EXPIRE_SECONDS) if ttl else None  # what Redis can express
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.key_prefix = key_prefix
        self.lock_timeout = lock_timeout
        self.lock_ttl = min(float(lock_ttl), MAX_EXPIRE_SECONDS)  # what Redis can express
        self.operation_timeout = float(operation_timeout)
        self._clients = clients(
            url_or_client,
            _Client,
            "RedisConversationStore",
            cluster=cluster,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            pool_timeout=self.operation_timeout,
        )
        is_url = isinstance(url_or_client, str)
        self._where = mask_url(url_or_client) if is_url else describe_client(url_or_client)
        from redis import exceptions

        # "Redis cannot be used right now" (down, slow, a cluster failing over or moving a
        # slot), not an error reply about the request. RedisClusterException is no RedisError;
        # OSError includes TimeoutError (operation_timeout's).
        self._unavailable_errors = (
            exceptions.RedisClusterException,
            exceptions.ConnectionError,
            exceptions.TimeoutError,
            exceptions.ClusterError,
            exceptions.TryAgainError,
            OSError,
        )
        self._redis_error: type[BaseException] = exceptions.RedisError
        self._timeouts = (TimeoutError, exceptions.TimeoutError)
        # A waiter checks the lock (showing it is alive) this often; its place is skipped
        # once it has not for ``3 * _wait_check`` s (its worker died).
        self._wait_check = min(1.0, self.lock_ttl / 3)
        self._presence_ms = max(1, round(3000 * self._wait_check))
        self._lock_ms = max(1, round(self.lock_ttl * 1000))
        # Hand-offs to this process's waiters arrive on one pub/sub channel, naming a token.
        self._channel = f"{key_prefix}wake:{secrets.token_hex(8)}"
        self._wakers: dict[str, anyio.Event] = {}
        self._listener: asyncio.Task[None] | None = None
        self._tasks = Tasks()  # the listener, retried releases (_release_later)
        self._check_writes = True  # by the next ping(): at first, and after a failure

    def history_key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's history list."""
        return Keys(self.key_prefix, conversation_id).history

    def lock_key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's lock."""
        return Keys(self.key_prefix, conversation_id).lock

    def generation_key(self, conversation_id: str) -> str:
        """The Redis key of a conversation's generation (advanced by :meth:`clear`)."""
        return Keys(self.key_prefix, conversation_id).generation

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        """Await one Redis operation under ``operation_timeout``, mapping its failures."""
        try:
            with anyio.fail_after(self.operation_timeout):
                return await awaitable
        except self._unavailable_errors as exc:
            self._check_writes = True
            # fail_after's TimeoutError has no text
            text = redis_error_text(exc) or f"no answer within {self.operation_timeout:g} s"
            raise StoreUnavailableError(
                f"Redis at {self._where} is unavailable ({operation}): {type(exc).__name__}: {text}"
            ) from exc
        except (self._redis_error, UnicodeDecodeError) as exc:  # latter: decode_responses
            self._check_writes = True
            text = redis_error_text(exc)
            raise StoreError(f"Redis at {self._where} failed ({operation}): {text}") from exc

    def _held(self, conversation_id: str) -> _Hold | None:
        """This task's hold of the conversation's lock, if it holds it."""
        hold = _HOLD.get()
        if hold is None or hold.store is not self or hold.conversation_id != conversation_id:
            return None
        return None if hold.released else hold

    async def append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        """``RPUSH`` + trimming (messages, bytes) + ``EXPIRE``, atomically (one script)."""
        if messages:
            await self._record(Keys(self.key_prefix, conversation_id), messages, "", None)

    async def record_turn(
        self, conversation_id: str, messages: Sequence[HistoryMessage], generation: int
    ) -> bool:
        """Append ``messages`` if the conversation was not cleared since ``generation``
        (one script); True if appended (or none given). Called by the :meth:`lock`'s
        holder, with messages or not, it releases the lock (the next turn may start at once).
        """
        hold = self._held(conversation_id)
        if not messages:
            if hold is not None:
                await self._release(hold)
                hold.ended = True
            return True
        keys = hold.keys if hold is not None else Keys(self.key_prefix, conversation_id)
        return await self._record(keys, messages, str(generation), hold)

    async def _record(
        self,
        keys: Keys,
        messages: Sequence[HistoryMessage],
        generation: str,
        hold: _Hold | None,
    ) -> bool:
        payload = [_HISTORY_ENCODER.encode(m) for m in fit(messages, self.max_bytes)]
        done = await self._call(
            "append",
            self._clients.get().record(
                keys=[keys.history, keys.generation, keys.lock, keys.queue],
                args=[
                    generation,
                    min(self.max_messages, _MAX_KEPT),
                    self.max_bytes,
                    self.ttl or 0,
                    "" if hold is None else hold.token,
                    keys.presence,
                    self._presence_ms,
                    *payload,
                ],
            ),
        )
        if hold is not None:
            hold.released = True
        return bool(done)

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int]:
        """The history and the generation, read together (one script); for the lock's
        holder, what :meth:`lock` read (no round trip)."""
        hold = self._held(conversation_id)
        if hold is not None and hold.read is not None:
            raw, generation = hold.read
            hold.read = None
        else:
            keys = Keys(self.key_prefix, conversation_id)
            raw, generation = await self._call(
                "get",
                self._clients.get().read(
                    keys=[keys.history, keys.generation], args=[GENERATION_TTL]
                ),
            )
        try:
            number = int(generation or 0)
        except ValueError:
            number = -1  # not ours: never equal to what clear writes
        return self._decode(conversation_id, raw), number

    async def get(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first; undecodable entries are skipped."""
        raw: list[bytes | str] = await self._call(
            "get", self._clients.get().redis.lrange(self.history_key(conversation_id), 0, -1)
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
        if len(raw) > self.max_messages or sum(map(len, raw)) > self.max_bytes:
            return newest(messages, self.max_messages, self.max_bytes)  # kept under wider bounds
        return messages

    async def clear(self, conversation_id: str) -> None:
        """Delete the conversation's history and advance its generation (one script): a
        turn running meanwhile, in any process, will not record."""
        keys = Keys(self.key_prefix, conversation_id)
        await self._call(
            "clear",
            self._clients.get().clear(keys=[keys.history, keys.generation], args=[GENERATION_TTL]),
        )

    @asynccontextmanager
    async def lock(
        self,
        conversation_id: str,
        *,
        timeout: LockTimeout = STORE_DEFAULT,  # noqa: ASYNC109 - bounds the wait only
    ) -> AsyncIterator[None]:
        """Hold the conversation exclusively across every process using this Redis.

        Turns queue in the order they reach Redis; a released lock goes straight to the
        next live waiter (woken by pub/sub). Taking it also reads the history (for
        :meth:`read_turn`). While held, it is extended every ``lock_ttl / 3``; it is released
        on any exit (shielded), or by :meth:`record_turn`. A waiter that times out
        (:class:`ConversationLockTimeout`) or is cancelled leaves the queue.
        """
        wait = lock_wait(timeout, self.lock_timeout)
        keys = Keys(self.key_prefix, conversation_id)
        hold = _Hold(self, conversation_id, keys)
        try:
            hold.read = await self._acquire(hold, wait)
        except BaseException:
            # Leave the queue (or undo a lock taken in flight), briefly: keys expire anyway.
            await self._release(hold, held=False)
            raise
        outer = _HOLD.get()
        _HOLD.set(hold)
        keeper = asyncio.get_running_loop().create_task(self._keep_alive(hold))
        try:
            yield
        finally:
            keeper.cancel()
            _HOLD.set(outer)
            if not (hold.released or hold.ended):
                await self._release(hold)

    async def _acquire(self, hold: _Hold, wait: float | None) -> list[Any]:
        """Take the lock (queueing for it); returns ``[history entries, generation]``."""
        deadline = math.inf if wait is None else anyio.current_time() + wait
        token, keys = hold.token, hold.keys
        lock_keys = [keys.lock, keys.queue, keys.history, keys.generation]
        args = [token, hold.entry, self._lock_ms, keys.presence, self._presence_ms, GENERATION_TTL]
        waker = self._wakers[token] = anyio.Event()
        try:
            script = self._clients.get().acquire  # then, queued, check
            while True:
                reply = await self._call("lock", script(keys=lock_keys, args=args))
                if reply[0] == 1:
                    return [reply[1], reply[2]]
                self._listen()
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise ConversationLockTimeout(hold.conversation_id, wait or 0.0)
                with anyio.move_on_after(min(self._wait_check, remaining)):
                    await waker.wait()
                # A fresh event before checking: a hand-off published meanwhile sets it.
                waker = self._wakers[token] = anyio.Event()
                script = self._clients.get().check
        finally:
            self._wakers.pop(token, None)

    def _listen(self) -> None:
        """Start this process's pub/sub listener (again if it ended, or on another loop)."""
        listener, loop = self._listener, asyncio.get_running_loop()
        if listener is None or listener.done() or listener.get_loop() is not loop:
            self._listener = self._tasks.start(self._receive_wakes())

    async def _receive_wakes(self) -> None:
        """Wake the waiters named on our channel; resubscribe (and wake every waiter, to
        check) after a lost connection."""
        delay, attempt = 0.05, 0
        while True:
            pubsub = pubsub_of(self._clients.get().redis, attempt)
            try:
                await pubsub.subscribe(self._channel)
                delay = 0.05
                for waker in list(self._wakers.values()):
                    waker.set()  # a hand-off may have been published before we listened
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self._wait_check
                    )
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        token = data.decode() if isinstance(data, bytes) else str(data)
                        if (woken := self._wakers.get(token)) is not None:
                            woken.set()
            except Exception as exc:  # Redis down: waiters check on their own meanwhile
                attempt += 1  # on a cluster, the next node
                logger.debug(
                    "lock hand-off listener: %s: %s", type(exc).__name__, escape_error(exc)
                )
            finally:
                # Closing a broken connection: whatever it raises does not matter.
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), suppress(Exception):
                    await pubsub.aclose()
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _keep_alive(self, hold: _Hold) -> None:
        """Extend the lock every ``lock_ttl / 3`` while held (a failure logged, retried)."""
        interval = self.lock_ttl / 3
        while True:
            await anyio.sleep(interval)
            if hold.released:
                return
            try:
                with anyio.fail_after(max(interval, 0.05)):
                    extended = await self._clients.get().extend(
                        keys=[hold.keys.lock], args=[hold.token, self._lock_ms]
                    )
            except Exception as exc:
                logger.warning(
                    "could not extend the lock of conversation %s: %s: %s",
                    escape_log_value(hold.conversation_id),
                    type(exc).__name__,
                    escape_error(exc) or f"no answer within {max(interval, 0.05):g} s",
                )
                continue
            if not extended and not hold.released:
                logger.warning(
                    "lost the lock of conversation %s (it expired); another turn may run "
                    "concurrently; consider a larger lock_ttl",
                    escape_log_value(hold.conversation_id),
                )
                return

    async def _release(self, hold: _Hold, *, held: bool = True, later: bool = True) -> bool:
        """Release the lock or leave the queue (handing the lock on); shielded, never raising,
        waiting at most ``lock_ttl`` (the key expires by then); True if it released the lock.

        A failed release is retried in the background (:meth:`_release_later`). A turn that
        did not get the lock (``held=False``: its caller gets why) tries for 1 s, logs at
        debug level, and retries after a timeout only (the lock call may yet run).
        """
        limit = min(self.operation_timeout, self.lock_ttl, math.inf if held else 1.0)
        keys = hold.keys
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(limit):
                    freed = await self._clients.get().release(
                        keys=[keys.lock, keys.queue],
                        args=[hold.token, hold.entry, keys.presence, self._presence_ms],
                    )
                hold.released = True
                return bool(freed)
            except Exception as exc:  # the lock expires by itself anyway
                logger.log(
                    logging.WARNING if held else logging.DEBUG,
                    "could not %s conversation %s (it frees itself within %g s): %s: %s",
                    "release the lock of" if held else "leave the lock queue of",
                    escape_log_value(hold.conversation_id),
                    self.lock_ttl,
                    type(exc).__name__,
                    escape_error(exc) or f"no answer within {limit:g} s",
                )
                if later and (held or isinstance(exc, self._timeouts)):
                    self._tasks.start(self._release_later(hold))
        return False

    async def _release_later(self, hold: _Hold) -> None:
        """Retry releasing a finished turn's lock (our token only) so the next turn need not
        wait for it to expire: 50 ms apart, doubling up to ``_wait_check``, for ``lock_ttl``."""
        deadline, delay = anyio.current_time() + self.lock_ttl, 0.05
        while anyio.current_time() + delay < deadline:
            await anyio.sleep(delay)
            delay = min(2 * delay, self._wait_check)
            freed = await self._release(hold, held=False, later=False)  # <= 1 s, never raises
            if hold.released:
                conversation = escape_log_value(hold.conversation_id)
                if freed:
                    logger.info("released the lock of conversation %s", conversation)
                else:  # a record Redis ran late released it, or the turn only left the queue
                    logger.debug("the lock of conversation %s was released already", conversation)
                return

    async def ping(self) -> None:
        """``PING`` Redis (every primary of a cluster); raise :class:`StoreUnavailableError`
        if it does not answer, or does not take the store's writes (a short-lived key,
        ``<prefix>ready``, written on every primary at the first ping and after a failure)."""
        try:
            await self._call("ping", ping_primaries(self._clients.get().redis))
            if self._check_writes:
                await self._call("write check", self._write_check())
                self._check_writes = False
        except StoreUnavailableError:
            raise
        except StoreError as exc:  # answered, but not as a usable Redis
            raise StoreUnavailableError(str(exc)) from exc.__cause__

    async def _write_check(self) -> None:
        client = self._clients.get()
        for key in await write_check_keys(client.redis, self.key_prefix + "ready"):
            await client.probe(keys=[key], args=[self._channel])

    async def aclose(self) -> None:
        """Stop the hand-off listener and release retries; close the client if this store
        created it on this event loop (one of an earlier loop is dropped)."""
        self._listener = None
        await self._tasks.cancel()
        client = self._clients.take()
        if client is not None:
            await client.redis.aclose()
