"""The in-process conversation store (the default)."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar

import anyio

from ..errors import check_positive_int, check_seconds
from .base import (
    DEFAULT_HISTORY_MAX_BYTES,
    DEFAULT_LOCK_TIMEOUT,
    STORE_DEFAULT,
    ConversationLockTimeout,
    HistoryMessage,
    LockTimeout,
    check_conversation_id,
    check_history_bounds,
    fit,
    lock_wait,
    text_size,
)

__all__ = ["MemoryConversationStore"]


class _LockEntry:
    """A held conversation lock and its waiters, first come first served (exists only while
    held). Releasing hands it straight to the first waiter, so a newcomer cannot overtake.
    Like the Redis lock, neither re-entrant nor tied to a task: a nested ``lock()`` waits.
    ``generation`` counts the clears while held (a turn running then must not record).
    """

    __slots__ = ("generation", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[anyio.Event] | None = None
        self.generation = 0


class _History(list[HistoryMessage]):
    """A conversation's messages and the UTF-8 bytes of their texts."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class _MemoryLock:
    """``MemoryConversationStore.lock()``: an uncontended acquire never suspends; only a
    waiter makes an event and a deadline. While held, it is this task's :data:`_HELD`."""

    __slots__ = ("conversation_id", "outer", "released", "store", "wait")

    def __init__(
        self, store: MemoryConversationStore, conversation_id: str, wait: float | None
    ) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.wait = wait
        self.released = False
        self.outer: _MemoryLock | None = None

    async def __aenter__(self) -> None:
        store = self.store
        if self.conversation_id in store._locks:
            await store._wait(self.conversation_id, self.wait)
        else:
            check_conversation_id(self.conversation_id)  # held or known: checked already
            store._locks[self.conversation_id] = _LockEntry()
        self.released = False  # the object may be entered again
        self.outer = _HELD.get()
        _HELD.set(self)

    async def __aexit__(self, *exc_info: object) -> None:
        _HELD.set(self.outer)
        self.release()

    def release(self) -> None:
        """Release for good: a task this turn started may still see it as its hold."""
        if not self.released:
            self.released = True
            self.store._unlock(self.conversation_id)


#: The memory lock this task holds (the innermost), if any.
_HELD: ContextVar[_MemoryLock | None] = ContextVar("layercode_asgi_memory_hold", default=None)


class MemoryConversationStore:
    """In-process history store, bounded in both dimensions.

    Args:
        max_conversations: conversations kept; the least recently used (read or written)
            is dropped when a new one would exceed it.
        max_messages: messages kept per conversation; the oldest are dropped.
        max_bytes: UTF-8 bytes of text kept per conversation, at least 4; the oldest
            messages are dropped, and a single longer message is cut to it (on a character
            boundary: never empty, a character taking at most 4 bytes).
        lock_timeout: default wait for :meth:`lock`, in seconds (``None`` = forever).

    Locks exist only while held or awaited. At worst the store holds ``max_conversations *
    max_bytes`` of text (up to 4 times that in memory: Python may keep 4 bytes a character).
    """

    def __init__(
        self,
        max_conversations: int = 10000,
        max_messages: int = 200,
        *,
        max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        check_positive_int(max_conversations, "max_conversations")
        check_history_bounds(max_messages, max_bytes)
        check_seconds("lock timeout", lock_timeout, zero=True, none=True)
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
        self._append(conversation_id, messages)

    async def get(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first; marks it recently used."""
        history = self._histories.get(conversation_id)
        if history is None:
            check_conversation_id(conversation_id)  # a known id was checked when stored
            return []
        self._histories.move_to_end(conversation_id)
        return list(history)

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int]:
        """The history and the generation, for a turn holding the conversation's lock."""
        return await self.get(conversation_id), self._generation(conversation_id)

    async def record_turn(
        self, conversation_id: str, messages: Sequence[HistoryMessage], generation: int
    ) -> bool:
        """Append ``messages`` if the conversation was not cleared since ``generation``;
        True if appended (or none given). Called by the :meth:`lock`'s holder, it also
        releases the lock (the next turn may start at once).
        """
        done = not messages or self._generation(conversation_id) == generation
        if done:
            self._append(conversation_id, messages)
        held = _HELD.get()
        if held is not None and held.store is self and held.conversation_id == conversation_id:
            held.release()
        return done

    def _generation(self, conversation_id: str) -> int:
        """Advanced by every :meth:`clear` while the conversation is locked."""
        entry = self._locks.get(conversation_id)
        return 0 if entry is None else entry.generation

    def _append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        if not messages:
            return
        messages = fit(messages, self.max_bytes)
        history = self._histories.get(conversation_id)
        if history is None:
            check_conversation_id(conversation_id)
            # Not a deque: its 64-slot block (over 500 bytes) is too much for a first turn.
            history = self._histories[conversation_id] = _History()
            while len(self._histories) > self.max_conversations:
                self._histories.popitem(last=False)
        else:
            self._histories.move_to_end(conversation_id)
        history.extend(messages)
        history.size += sum(text_size(message.text) for message in messages)
        drop = max(len(history) - self.max_messages, 0)
        if drop or history.size > self.max_bytes:
            # Oldest first, keeping at least the newest message (cut to the bound above).
            size = history.size - sum(text_size(m.text) for m in history[:drop])
            while size > self.max_bytes and drop < len(history) - 1:
                size -= text_size(history[drop].text)
                drop += 1
            del history[:drop]
            history.size = size

    async def clear(self, conversation_id: str) -> None:
        """Forget the conversation; a turn running meanwhile will not record."""
        if self._histories.pop(conversation_id, None) is None:
            check_conversation_id(conversation_id)
        entry = self._locks.get(conversation_id)
        if entry is not None:
            entry.generation += 1

    def lock(
        self, conversation_id: str, *, timeout: LockTimeout = STORE_DEFAULT
    ) -> AbstractAsyncContextManager[None]:
        """Hold the conversation exclusively within this process (waiters queue in order)."""
        return _MemoryLock(self, conversation_id, lock_wait(timeout, self.lock_timeout))

    async def _wait(self, conversation_id: str, wait: float | None) -> None:
        """Queue for the held lock up to ``wait`` s; else :class:`ConversationLockTimeout`."""
        entry = self._locks[conversation_id]  # held: the caller saw it, with no await since
        event = anyio.Event()
        waiters = entry.waiters = entry.waiters or deque()
        waiters.append(event)
        taken = False
        try:
            with anyio.move_on_after(math.inf if wait is None else wait):
                await event.wait()
            taken = event.is_set()  # else the deadline passed first
        finally:
            if not taken and event.is_set():
                self._unlock(conversation_id)  # handed over just as we gave up: pass it on
            elif not taken:
                waiters.remove(event)
        if not taken:
            raise ConversationLockTimeout(conversation_id, wait or 0.0)

    def _unlock(self, conversation_id: str) -> None:
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
