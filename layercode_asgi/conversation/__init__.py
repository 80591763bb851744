"""Conversation history: what was said in a conversation, oldest first.

:class:`ConversationManager` is the application-facing API (``add_message``, ``add_turn``,
``get_history``, ``clear``, ``lock``). It delegates storage to a :class:`ConversationStore`:

* :class:`MemoryConversationStore` (default): one process, bounded in messages and bytes per
  conversation and in number of conversations (least recently used dropped first).
* :class:`RedisConversationStore`: shared by every worker process and machine (one Redis or
  a Redis Cluster); history is a Redis list with a TTL. Needs the ``redis`` extra:
  ``pip install './layercode-asgi[redis]'``.

Both stores lock fairly: a conversation's turns run one at a time, in the order they
arrived (across processes for Redis). An unreachable store raises
:class:`StoreUnavailableError` promptly; a lock not acquired in time raises
:class:`ConversationLockTimeout`.

Ending a conversation (:meth:`~ConversationManager.clear`) advances its *generation*: a turn
reads the history and the generation together (:meth:`~ConversationManager.read_turn`) and
records only if the generation is unchanged (:meth:`~ConversationManager.record_turn`), so a
turn still running when its conversation ends cannot write the history back.

A turn waits for its conversation's lock (:func:`lock_wait_timeout`) as long as the turn
ahead may legitimately hold it: its turn timeout plus a grace for its final events and its
recording. A turn's own timeout starts once it holds the lock.
"""

from .base import (
    DEFAULT_HISTORY_MAX_BYTES,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_LOCK_WAIT_GRACE,
    ConversationBackend,
    ConversationLockTimeout,
    ConversationStore,
    HistoryMessage,
    Role,
    StoreError,
    StoreUnavailableError,
)
from .manager import (
    ConversationManager,
    check_conversation_id,
    lock_wait_timeout,
    model_history,
    turn_messages,
)
from .memory import MemoryConversationStore
from .redis import RedisConversationStore

__all__ = [
    "DEFAULT_HISTORY_MAX_BYTES",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_LOCK_WAIT_GRACE",
    "ConversationBackend",
    "ConversationLockTimeout",
    "ConversationManager",
    "ConversationStore",
    "HistoryMessage",
    "MemoryConversationStore",
    "RedisConversationStore",
    "Role",
    "StoreError",
    "StoreUnavailableError",
    "check_conversation_id",
    "lock_wait_timeout",
    "model_history",
    "turn_messages",
]
