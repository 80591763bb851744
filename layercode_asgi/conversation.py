"""Conversation history: what was said in a conversation, oldest first.

:class:`ConversationManager` is the application-facing API (``add_message``, ``add_turn``,
``get_history``, ``clear``, ``lock``). It delegates storage to a :class:`ConversationStore`:

* :class:`MemoryConversationStore` (default): one process, bounded in messages and bytes per
  conversation and in number of conversations (least recently used dropped first).
* :class:`RedisConversationStore`: shared by every worker process and machine; history is a
  Redis list with a TTL, and :meth:`~RedisConversationStore.lock` is a cross-process lock.
  Needs the ``redis`` extra: ``pip install 'layercode-asgi[redis]'``.

A store that cannot reach its backing service raises :class:`StoreUnavailableError` promptly
instead of hanging; a lock that cannot be acquired in time raises
:class:`ConversationLockTimeout`.

Ending a conversation (:meth:`~ConversationManager.clear`) advances its *generation*: a turn
reads the history and the generation together (:meth:`~ConversationManager.read_turn`) and
records only if the generation is still the same (:meth:`~ConversationManager.record_turn`),
so a turn still running when its conversation ends cannot write the history back; the
conversation's next turns start afresh and record as usual.

How long a turn waits for its conversation's lock (:func:`lock_wait_timeout`): as long as
the turn ahead of it may legitimately hold it, its turn timeout plus a grace for its final
events and its recording. A turn's own timeout starts once it holds the lock.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Literal,
    Protocol,
    TypeVar,
    runtime_checkable,
)

import anyio
import msgspec

from .errors import ConfigurationError, LayercodeError
from .logs import escape_log_value

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "DEFAULT_HISTORY_MAX_BYTES",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_LOCK_WAIT_GRACE",
    "ConversationLockTimeout",
    "ConversationManager",
    "ConversationStore",
    "HistoryMessage",
    "MemoryConversationStore",
    "RedisConversationStore",
    "Role",
    "StoreError",
    "StoreUnavailableError",
    "lock_wait_timeout",
]

logger = logging.getLogger("layercode_asgi.conversation")

Role = Literal["user", "assistant"]

_ROLES: Final = ("user", "assistant")

#: Default wait for a conversation lock, in seconds (stores built without settings).
DEFAULT_LOCK_TIMEOUT: Final = 30.0
#: What a waiting turn allows the turn ahead beyond its timeout: its final events
#: (``response.error`` / the spoken fallback, ``response.end``) and its recording.
DEFAULT_LOCK_WAIT_GRACE: Final = 5.0
#: Default bound of a conversation's history, in UTF-8 bytes of text.
DEFAULT_HISTORY_MAX_BYTES: Final = 256 * 1024

#: Longest accepted conversation id (LayerCode's are ~30 characters).
MAX_CONVERSATION_ID_LENGTH: Final = 512

T = TypeVar("T")


class HistoryMessage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One utterance of a conversation: who said it and what was said.

    Not tracked by the garbage collector (``gc=False``): it is frozen and holds only
    strings, so it can never be part of a reference cycle, and a store holding many
    thousands of them adds nothing to the collector's work.
    """

    role: Role
    text: str
    turn_id: str | None = None


class StoreError(LayercodeError):
    """The conversation store failed (the backing service answered with an error)."""


class StoreUnavailableError(StoreError):
    """The conversation store's backing service (Redis) cannot be reached right now."""


class ConversationLockTimeout(LayercodeError, TimeoutError):
    """A conversation lock could not be acquired within the timeout."""

    def __init__(self, conversation_id: str, timeout: float) -> None:
        self.conversation_id = conversation_id
        self.timeout = timeout
        super().__init__(
            f"could not lock conversation {conversation_id!r} within {timeout:g} s "
            "(another turn of this conversation is still running)"
        )


class _DefaultTimeout(enum.Enum):
    """Sentinel type: "use the store's configured lock timeout"."""

    DEFAULT = "default"


# Default of ``lock(timeout=...)``: use the store's configured lock timeout.
_STORE_DEFAULT: Final = _DefaultTimeout.DEFAULT

LockTimeout = float | _DefaultTimeout | None


def lock_wait_timeout(
    turn_timeout: float | None, grace: float = DEFAULT_LOCK_WAIT_GRACE
) -> float | None:
    """How long a turn may wait for its conversation's lock: the one rule of both stores.

    The turn ahead may hold the lock for its whole ``turn_timeout`` (counted from when it
    got the lock), then send its final events and record its messages: ``grace`` covers
    those. ``None`` (wait as long as it takes) when turns have no time limit.
    """
    if turn_timeout is None:
        return None
    return float(turn_timeout) + float(grace)


def text_size(text: str) -> int:
    """The size of ``text`` in UTF-8 bytes (what the history byte bound counts)."""
    if text.isascii():  # constant time in CPython
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def cut_text(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, on a character boundary."""
    if text.isascii():
        return text[:max_bytes]
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return text
    cut = max_bytes
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # a continuation byte: back to its start
        cut -= 1
    return raw[:cut].decode("utf-8", "surrogatepass")


def _fit(messages: Sequence[HistoryMessage], max_bytes: int) -> Sequence[HistoryMessage]:
    """``messages`` with any single text over ``max_bytes`` cut to it."""
    if all(text_size(m.text) <= max_bytes for m in messages):
        return messages
    return [
        m
        if text_size(m.text) <= max_bytes
        else HistoryMessage(role=m.role, text=cut_text(m.text, max_bytes), turn_id=m.turn_id)
        for m in messages
    ]


def _check_timeout(timeout: float | None, name: str = "lock timeout") -> None:
    if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
        raise ConfigurationError(f"{name} must be a number >= 0 or None, got {timeout!r}")


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be an integer > 0, got {value!r}")


@runtime_checkable
class ConversationStore(Protocol):
    """Where conversation history lives, plus per-conversation mutual exclusion.

    Optional: ``async read_turn(id) -> (messages, generation)`` and ``async
    record_turn(id, messages, generation) -> bool`` (append only if no :meth:`clear` came
    since the read), as both built-in stores have; without them a turn still running
    when its conversation is cleared records all the same.
    """

    async def append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        """Append ``messages`` to the conversation atomically (all of them or none)."""
        ...

    async def get(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first (``[]`` when unknown)."""
        ...

    async def clear(self, conversation_id: str) -> None:
        """Forget the conversation's history."""
        ...

    def lock(
        self, conversation_id: str, *, timeout: float | None = ...
    ) -> AbstractAsyncContextManager[None]:
        """Hold the conversation exclusively; ``timeout=None`` waits forever.

        Raises :class:`ConversationLockTimeout` when the wait exceeds ``timeout`` seconds.
        """
        ...

    async def ping(self) -> None:
        """Return if the store is usable, else raise :class:`StoreUnavailableError`."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources (connections)."""
        ...


# -- memory ----------------------------------------------------------------------------------


class _LockEntry:
    """A held conversation lock and the tasks waiting for it, first come first served.

    An entry exists only while its conversation is held. Releasing hands the lock straight
    to the first waiter (setting its event), so a newcomer cannot overtake a waiter. Like
    the Redis lock, it is not re-entrant and not tied to a task: a nested ``lock()`` of the
    same conversation waits (and times out) instead of raising. ``generation`` counts the
    clears while the conversation is held (a turn running then must not record).
    """

    __slots__ = ("generation", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[anyio.Event] | None = None
        self.generation = 0


class _History(list[HistoryMessage]):
    """A conversation's messages and the UTF-8 bytes of their texts."""

    __slots__ = ("size",)

    def __init__(self, messages: Iterable[HistoryMessage] = ()) -> None:
        super().__init__(messages)
        self.size = sum(text_size(m.text) for m in self)


class _MemoryLock:
    """``MemoryConversationStore.lock()``: an uncontended acquire never suspends and
    allocates one small object; only a waiter creates an event and a deadline."""

    __slots__ = ("conversation_id", "store", "wait")

    def __init__(
        self, store: MemoryConversationStore, conversation_id: str, wait: float | None
    ) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.wait = wait

    async def __aenter__(self) -> None:
        if not self.store.try_lock(self.conversation_id):
            await self.store.wait_lock(self.conversation_id, self.wait)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.store.unlock(self.conversation_id)


class MemoryConversationStore:
    """In-process history store, bounded in both dimensions.

    Args:
        max_conversations: conversations kept; the least recently used (read or written)
            is dropped when a new one would exceed it.
        max_messages: messages kept per conversation; the oldest are dropped.
        max_bytes: UTF-8 bytes of text kept per conversation; the oldest messages are
            dropped, and a single longer message is cut to it (on a character boundary).
        lock_timeout: default wait for :meth:`lock`, in seconds (``None`` = forever).

    Locks exist only while some task holds or waits for them, so the lock table never
    outgrows the number of concurrent turns. At worst the store holds ``max_conversations
    * max_bytes`` of text (Python keeps a text in 1, 2 or 4 bytes per character, so a text
    mixing ASCII with characters beyond U+FFFF can take up to 4 times its UTF-8 size).
    """

    #: Its operations never suspend, so callers need no cancellation shield or deadline
    #: around them (``LayercodeWebhook`` skips that cost when recording a turn).
    never_suspends: ClassVar[bool] = True

    def __init__(
        self,
        max_conversations: int = 10000,
        max_messages: int = 200,
        *,
        max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        _check_positive_int(max_conversations, "max_conversations")
        _check_positive_int(max_messages, "max_messages")
        _check_positive_int(max_bytes, "max_bytes")
        _check_timeout(lock_timeout)
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.lock_timeout = lock_timeout
        self._histories: OrderedDict[str, _History] = OrderedDict()
        self._locks: dict[str, _LockEntry] = {}

    def __len__(self) -> int:
        """Number of conversations currently stored."""
        return len(self._histories)

    async def append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        """Append ``messages`` (atomic: no ``await`` between the individual appends)."""
        self.append_now(conversation_id, messages)

    async def get(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first; marks it recently used."""
        return self.get_now(conversation_id)

    # The same operations without ``await`` (this store never suspends): ``LayercodeWebhook``
    # calls them directly on its hot path, skipping a coroutine per call. No validation
    # here: callers pass a checked conversation id.

    def append_now(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        """:meth:`append`, synchronously."""
        if not messages:
            return
        size = 0
        for message in messages:
            size += text_size(message.text)
        if size > self.max_bytes:
            messages = _fit(messages, self.max_bytes)
            size = sum(text_size(m.text) for m in messages)
        history = self._histories.get(conversation_id)
        if history is None:
            # A list, not a bounded deque: a deque takes a 64-slot block (over 500 bytes)
            # even for the two messages of a conversation's first turn.
            history = self._histories[conversation_id] = _History(messages)
            while len(self._histories) > self.max_conversations:
                self._histories.popitem(last=False)
        else:
            self._histories.move_to_end(conversation_id)
            history.extend(messages)
            history.size += size
        excess = len(history) - self.max_messages
        if history.size > self.max_bytes:
            # Oldest first, keeping at least the newest message (cut to the bound above).
            total, keep_from = history.size, max(excess, 0)
            for message in history[:keep_from]:
                total -= text_size(message.text)
            while total > self.max_bytes and keep_from < len(history) - 1:
                total -= text_size(history[keep_from].text)
                keep_from += 1
            del history[:keep_from]
            history.size = total
        elif excess > 0:
            history.size -= sum(text_size(m.text) for m in history[:excess])
            del history[:excess]

    def generation_now(self, conversation_id: str) -> int:
        """The conversation's generation: advanced by every :meth:`clear` while it is
        locked. A turn holding the lock reads it with the history."""
        entry = self._locks.get(conversation_id)
        return 0 if entry is None else entry.generation

    def record_now(
        self, conversation_id: str, messages: Sequence[HistoryMessage], generation: int
    ) -> bool:
        """Append ``messages`` if the conversation's generation is still ``generation``
        (it was not cleared since); True if appended."""
        if self.generation_now(conversation_id) != generation:
            return False
        self.append_now(conversation_id, messages)
        return True

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int]:
        """The history and the generation, for a turn holding the conversation's lock."""
        return self.get_now(conversation_id), self.generation_now(conversation_id)

    async def record_turn(
        self, conversation_id: str, messages: Sequence[HistoryMessage], generation: int
    ) -> bool:
        """:meth:`record_now`, as a coroutine (the store protocol's optional form)."""
        return self.record_now(conversation_id, messages, generation)

    def waiting(self, conversation_id: str) -> int:
        """How many tasks wait for the conversation's lock."""
        entry = self._locks.get(conversation_id)
        return 0 if entry is None or entry.waiters is None else len(entry.waiters)

    def get_now(self, conversation_id: str) -> list[HistoryMessage]:
        """:meth:`get`, synchronously."""
        history = self._histories.get(conversation_id)
        if history is None:
            return []
        self._histories.move_to_end(conversation_id)
        return list(history)

    async def clear(self, conversation_id: str) -> None:
        """Forget the conversation; a turn running meanwhile will not record."""
        self._histories.pop(conversation_id, None)
        entry = self._locks.get(conversation_id)
        if entry is not None:
            entry.generation += 1

    def lock(
        self,
        conversation_id: str,
        *,
        timeout: float | _DefaultTimeout | None = _STORE_DEFAULT,
    ) -> AbstractAsyncContextManager[None]:
        """Hold the conversation exclusively within this process (waiters queue in order)."""
        wait = self.lock_timeout if timeout is _STORE_DEFAULT else timeout
        assert not isinstance(wait, _DefaultTimeout)
        _check_timeout(wait)
        return _MemoryLock(self, conversation_id, wait)

    def try_lock(self, conversation_id: str) -> bool:
        """Take the conversation's lock if it is free, without waiting; True if taken.

        Whoever took it must call :meth:`unlock` exactly once.
        """
        locks = self._locks
        if conversation_id in locks:
            return False
        locks[conversation_id] = _LockEntry()
        return True

    async def wait_lock(self, conversation_id: str, wait: float | None) -> None:
        """Take the conversation's lock, queueing behind its holder for up to ``wait`` s.

        Raises :class:`ConversationLockTimeout` when the wait is over (the lock is not
        taken then); cancelled while queueing, it is not taken either.
        """
        entry = self._locks.get(conversation_id)
        if entry is None:  # freed meanwhile
            self._locks[conversation_id] = _LockEntry()
            return
        event = anyio.Event()
        if entry.waiters is None:
            entry.waiters = deque()
        entry.waiters.append(event)
        try:
            with anyio.move_on_after(math.inf if wait is None else wait):
                await event.wait()
        except BaseException:
            self._give_up(conversation_id, entry, event)
            raise
        if not event.is_set():  # the deadline passed first
            self._give_up(conversation_id, entry, event)
            raise ConversationLockTimeout(conversation_id, wait or 0.0)

    def _give_up(self, conversation_id: str, entry: _LockEntry, event: anyio.Event) -> None:
        if event.is_set():
            self.unlock(conversation_id)  # handed over just as we gave up: pass it on
        else:
            assert entry.waiters is not None
            entry.waiters.remove(event)

    def unlock(self, conversation_id: str) -> None:
        """Release the conversation's lock: to the first waiter, if any."""
        entry = self._locks[conversation_id]
        if entry.waiters:
            entry.waiters.popleft().set()  # the next waiter holds it now
        else:
            del self._locks[conversation_id]

    async def ping(self) -> None:
        """Always usable."""

    async def aclose(self) -> None:
        """Nothing to release."""


# -- redis -----------------------------------------------------------------------------------

# KEYS[1] = lock key, ARGV[1] = our token. Delete only if the lock is still ours.
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


def _import_redis() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as exc:
        raise ConfigurationError(
            "RedisConversationStore needs the redis package: pip install 'layercode-asgi[redis]'"
        ) from exc
    return redis_asyncio


def _describe_url(url: str) -> str:
    from .redaction import mask_url as _mask_url

    return _mask_url(url)


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
        socket_timeout: seconds per socket operation, for clients created from a URL.
        socket_connect_timeout: seconds to connect, for clients created from a URL.
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
        redis_asyncio = _import_redis()
        _check_positive_int(max_connections, "max_connections")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0):
            raise ConfigurationError(f"ttl must be an integer >= 0 or None, got {ttl!r}")
        _check_positive_int(max_messages, "max_messages")
        _check_positive_int(max_bytes, "max_bytes")
        _check_timeout(lock_timeout)
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
        from redis import exceptions

        if isinstance(url_or_client, str):
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff

            try:
                # A blocking pool: a burst of turns waits (up to the operation timeout) for
                # a free connection instead of failing with "too many connections".
                pool = redis_asyncio.BlockingConnectionPool.from_url(
                    url_or_client,
                    max_connections=max_connections,
                    timeout=self.operation_timeout,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_connect_timeout,
                    # One quick retry on connection errors recovers a pooled connection
                    # broken by a Redis restart; retrying timeouts (or more often) would
                    # only delay the failure report.
                    retry=Retry(
                        ExponentialBackoff(cap=0.05, base=0.01),
                        1,
                        supported_errors=(exceptions.ConnectionError,),
                    ),
                )
                self._client: Any = redis_asyncio.Redis(connection_pool=pool)
            except ValueError:  # its message may quote part of the password: not shown
                raise ConfigurationError(
                    f"invalid Redis URL {_describe_url(url_or_client)!r} (percent-encode "
                    "special characters in the password: / as %2F, # as %23, ? as %3F)"
                ) from None
            self._owns_client = True
            self._where = _describe_url(url_or_client)
        else:
            self._client = url_or_client
            self._owns_client = False
            kwargs = getattr(
                getattr(url_or_client, "connection_pool", None), "connection_kwargs", {}
            )
            if kwargs.get("path"):
                self._where = f"unix://{kwargs['path']}"
            else:
                self._where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._extend_script = self._client.register_script(_EXTEND_LUA)
        self._record_script = self._client.register_script(_RECORD_LUA)
        self._clear_script = self._client.register_script(_CLEAR_LUA)
        self._unavailable_errors: tuple[type[BaseException], ...] = (
            exceptions.ConnectionError,
            exceptions.TimeoutError,
            OSError,
            TimeoutError,
        )
        self._redis_error: type[BaseException] = exceptions.RedisError

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
        payload = [_HISTORY_ENCODER.encode(m) for m in _fit(messages, self.max_bytes)]
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
        timeout: float | _DefaultTimeout | None = _STORE_DEFAULT,  # noqa: ASYNC109 - bounds the wait only
    ) -> AsyncIterator[None]:
        """Hold the conversation exclusively across every process using this Redis.

        Acquired with ``SET key token NX PX lock_ttl``, polling (2 ms doubling to 50 ms)
        until ``timeout``; kept alive by a background task while held; released with a
        compare-and-delete script, even when the holder is cancelled.
        """
        wait = self.lock_timeout if timeout is _STORE_DEFAULT else timeout
        assert not isinstance(wait, _DefaultTimeout)
        _check_timeout(wait)
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


# -- manager ---------------------------------------------------------------------------------


def _check_conversation_id(conversation_id: str) -> None:
    if not isinstance(conversation_id, str):
        raise TypeError(f"conversation_id must be a str, got {type(conversation_id).__name__}")
    if not conversation_id:
        raise ValueError("conversation_id must not be empty")
    if len(conversation_id) > MAX_CONVERSATION_ID_LENGTH:
        raise ValueError(f"conversation_id is longer than {MAX_CONVERSATION_ID_LENGTH} characters")


def _to_message(message: HistoryMessage | Mapping[str, Any]) -> HistoryMessage:
    role: object
    text: object
    turn_id: object
    if isinstance(message, HistoryMessage):
        role, text, turn_id = message.role, message.text, message.turn_id
    elif isinstance(message, Mapping):
        role, text, turn_id = message.get("role"), message.get("text"), message.get("turn_id")
    else:
        raise TypeError(
            f"message must be a HistoryMessage or a mapping, got {type(message).__name__}"
        )
    if role not in _ROLES:
        raise ValueError(f"message role must be 'user' or 'assistant', got {role!r}")
    if not isinstance(text, str):
        raise ValueError(f"message text must be a string, got {type(text).__name__}")
    if turn_id is not None and not isinstance(turn_id, str):
        raise ValueError(f"message turn_id must be a string or None, got {turn_id!r}")
    if isinstance(message, HistoryMessage):
        return message
    return HistoryMessage(
        role="user" if role == "user" else "assistant", text=text, turn_id=turn_id
    )


def turn_messages(
    user_text: str | None, assistant_text: str | None, turn_id: str | None
) -> list[HistoryMessage]:
    """A turn's history messages, user first, leaving out empty or blank texts."""
    messages: list[HistoryMessage] = []
    if user_text is not None and user_text.strip():
        messages.append(HistoryMessage(role="user", text=user_text, turn_id=turn_id))
    if assistant_text is not None and assistant_text.strip():
        messages.append(HistoryMessage(role="assistant", text=assistant_text, turn_id=turn_id))
    return messages


class ConversationManager:
    """Conversation history for agents: ``add_message`` / ``add_turn`` / ``get_history``.

    Args:
        store: where history lives; default a new :class:`MemoryConversationStore`.

    Use it as ``async with ConversationManager(...) as history:`` to close the store at the
    end, or call :meth:`aclose`.
    """

    def __init__(self, store: ConversationStore | None = None) -> None:
        self.store: ConversationStore = MemoryConversationStore() if store is None else store

    @classmethod
    def from_settings(cls, settings: Settings) -> ConversationManager:
        """Redis when ``settings.redis_url`` is set, else memory; caps and TTL from settings.

        The lock wait is :func:`lock_wait_timeout` of ``settings.turn_timeout`` and
        ``settings.lock_wait_grace`` (what ``LayercodeWebhook`` waits too).
        """
        store: ConversationStore
        wait = lock_wait_timeout(settings.turn_timeout, settings.lock_wait_grace)
        if settings.redis_url:
            store = RedisConversationStore(
                settings.redis_url,
                ttl=settings.history_ttl or None,
                max_messages=settings.history_max_messages,
                max_bytes=settings.history_max_bytes,
                lock_timeout=wait,
            )
        else:
            store = MemoryConversationStore(
                max_conversations=settings.history_max_conversations,
                max_messages=settings.history_max_messages,
                max_bytes=settings.history_max_bytes,
                lock_timeout=wait,
            )
        return cls(store)

    async def add_message(
        self, conversation_id: str, message: HistoryMessage | Mapping[str, Any]
    ) -> None:
        """Append one message: a :class:`HistoryMessage` or ``{"role": ..., "text": ...}``.

        Raises:
            ValueError: when the role is not ``"user"`` / ``"assistant"`` or text is missing.
        """
        _check_conversation_id(conversation_id)
        await self.store.append(conversation_id, [_to_message(message)])

    async def add_messages(
        self, conversation_id: str, messages: Iterable[HistoryMessage | Mapping[str, Any]]
    ) -> None:
        """Append several messages atomically."""
        _check_conversation_id(conversation_id)
        converted = [_to_message(message) for message in messages]
        if converted:
            await self.store.append(conversation_id, converted)

    async def add_turn(
        self,
        conversation_id: str,
        user_text: str | None,
        assistant_text: str | None,
        *,
        turn_id: str | None = None,
    ) -> None:
        """Append a turn's user and assistant messages together, skipping empty ones."""
        _check_conversation_id(conversation_id)
        messages = turn_messages(user_text, assistant_text, turn_id)
        if messages:
            await self.store.append(conversation_id, messages)

    async def get_history(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first (``[]`` for an unknown conversation)."""
        _check_conversation_id(conversation_id)
        return await self.store.get(conversation_id)

    async def clear(self, conversation_id: str) -> None:
        """Forget the conversation's history; a turn still running will not record (with a
        store that has generations: both built-in stores)."""
        _check_conversation_id(conversation_id)
        await self.store.clear(conversation_id)

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int | None]:
        """The history and the conversation's generation, for a turn holding its lock.

        Pass the generation to :meth:`record_turn`. ``None`` for a store without
        generations (then :meth:`record_turn` always records).
        """
        _check_conversation_id(conversation_id)
        read = getattr(self.store, "read_turn", None)
        if read is None:
            return await self.store.get(conversation_id), None
        history, generation = await read(conversation_id)
        return history, generation

    async def record_turn(
        self,
        conversation_id: str,
        user_text: str | None,
        assistant_text: str | None,
        *,
        turn_id: str | None = None,
        generation: int | None = None,
    ) -> bool:
        """:meth:`add_turn`, unless the conversation was cleared (ended) since
        :meth:`read_turn` gave ``generation``; True if recorded (or nothing to record)."""
        _check_conversation_id(conversation_id)
        messages = turn_messages(user_text, assistant_text, turn_id)
        if not messages:
            return True
        record = getattr(self.store, "record_turn", None)
        if generation is None or record is None:
            await self.store.append(conversation_id, messages)
            return True
        return bool(await record(conversation_id, messages, generation))

    def lock(
        self, conversation_id: str, *, timeout: LockTimeout = _STORE_DEFAULT
    ) -> AbstractAsyncContextManager[None]:
        """Hold the conversation exclusively (one turn at a time).

        ``timeout`` in seconds (``None`` waits forever; default: the store's). Raises
        :class:`ConversationLockTimeout` when the wait is exceeded.
        """
        _check_conversation_id(conversation_id)
        if isinstance(timeout, _DefaultTimeout):
            return self.store.lock(conversation_id)
        return self.store.lock(conversation_id, timeout=timeout)

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` if the store cannot be used (for ``/ready``)."""
        await self.store.ping()

    async def aclose(self) -> None:
        """Close the store."""
        await self.store.aclose()

    async def __aenter__(self) -> ConversationManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
