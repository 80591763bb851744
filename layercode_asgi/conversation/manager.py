"""The application-facing conversation API and the one lock-wait rule."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec

from ..errors import LayercodeError, kind_of
from ..logs import escape_error, escape_log_value
from .base import (
    DEFAULT_LOCK_WAIT_GRACE,
    STORE_DEFAULT,
    ConversationBackend,
    ConversationStore,
    DefaultTimeout,
    HistoryMessage,
    LockTimeout,
    StoreUnavailableError,
    check_conversation_id,
    valid_text,
)
from .memory import MemoryConversationStore
from .redis import RedisConversationStore

if TYPE_CHECKING:
    from ..config import Settings
    from ..events import TurnEvent

__all__ = [
    "ConversationManager",
    "check_conversation_id",
    "lock_wait_timeout",
    "model_history",
    "read_for_turn",
    "record_for_turn",
    "turn_messages",
    "webhook_conversations",
]

_ROLES: Final = ("user", "assistant")
#: What the webhook calls on its ``conversations`` (``base.ConversationBackend``).
_BACKEND: Final = ("lock", "get_history", "add_turn", "clear")


def lock_wait_timeout(
    turn_timeout: float | None, grace: float = DEFAULT_LOCK_WAIT_GRACE
) -> float | None:
    """How long a turn may wait for its conversation's lock: ``turn_timeout`` (the turn
    ahead's) plus ``grace`` (its final events and recording). ``None`` (no limit) when
    ``turn_timeout`` is, or when the sum is beyond any float.
    """
    if turn_timeout is None:
        return None
    total = float(turn_timeout) + float(grace)
    return total if math.isfinite(total) else None


def webhook_conversations(conversations: Any) -> Any:
    """``LayercodeWebhook``'s ``conversations``: ``"memory"`` made a new manager, ``None``
    kept, else it must have a manager's ``lock``, ``get_history``, ``add_turn`` and
    ``clear`` (a bare store has no ``add_turn``: its turns would never be recorded)."""
    expected = "conversations must be a ConversationManager, 'memory' or None"
    if isinstance(conversations, str):
        if conversations != "memory":  # not quoted: it may be a URL with a password
            raise ValueError(f"{expected}, got another string")
        return ConversationManager()
    if conversations is None or (
        not isinstance(conversations, type)  # a class has the methods, unbound
        and all(callable(getattr(conversations, n, None)) for n in _BACKEND)
    ):
        return conversations
    hint = ": wrap a store, ConversationManager(store)"
    hint = hint if isinstance(conversations, ConversationStore) else ""
    raise TypeError(f"{expected}, got {kind_of(conversations)}{hint}")


async def read_for_turn(
    conversations: ConversationBackend, conversation_id: str
) -> tuple[list[HistoryMessage], int | None]:
    """A turn's history and the generation to record it with (``None``: the backend has no
    ``read_turn``; the turn records with ``add_turn``)."""
    read = getattr(conversations, "read_turn", None)
    if read is not None:
        history, generation = await read(conversation_id)
        return history, generation
    return await conversations.get_history(conversation_id), None


#: How long recording a finished turn may take before it is given up (logged).
RECORD_TIMEOUT = 5.0
_webhook_logger = logging.getLogger("layercode_asgi.webhook")


async def record_for_turn(
    conversations: ConversationBackend,
    event: TurnEvent,
    reply: str,
    generation: int | None,
) -> None:
    """Record the user's text and ``reply`` (what was spoken), whatever the turn's outcome,
    with :func:`read_for_turn`'s generation. A failure or a store slower than
    :data:`RECORD_TIMEOUT` is logged, never raised."""
    user_text = event.text or None
    record = getattr(conversations, "record_turn", None)
    if user_text is None and not reply and (generation is None or record is None):
        return  # nothing to record (with record_turn, called all the same: it ends the turn)
    cid, said, turn_id = event.conversation_id, reply or None, event.turn_id
    with anyio.move_on_after(RECORD_TIMEOUT, shield=True) as scope:
        try:
            if generation is None or record is None:
                await conversations.add_turn(cid, user_text, said, turn_id=turn_id)
            elif not await record(cid, user_text, said, turn_id=turn_id, generation=generation):
                _webhook_logger.info(
                    "conversation ended during the turn: not recorded (conversation=%s turn=%s)",
                    *_ids(event),
                )
        except LayercodeError as exc:  # the store down or failing: its words say enough
            _webhook_logger.warning(  # unavailable: the store may yet run the record
                "turn may not have been recorded (conversation=%s turn=%s): %s: %s"
                if isinstance(exc, StoreUnavailableError)
                else "could not record turn (conversation=%s turn=%s): %s: %s",
                *_ids(event),
                type(exc).__name__,
                escape_error(exc),
            )
        except Exception:
            _webhook_logger.exception(
                "could not record turn (conversation=%s turn=%s)", *_ids(event)
            )
    if scope.cancelled_caught:
        _webhook_logger.error("recording turn timed out (conversation=%s turn=%s)", *_ids(event))


def _ids(event: TurnEvent) -> tuple[str, str]:
    """A turn's ids, escaped for a log line."""
    return escape_log_value(event.conversation_id), escape_log_value(event.turn_id)


def _to_message(message: HistoryMessage | Mapping[str, Any]) -> HistoryMessage:
    if isinstance(message, Mapping):
        role, text, turn_id = (message.get(key) for key in ("role", "text", "turn_id"))
    elif isinstance(message, HistoryMessage):  # not validated when made: checked here too
        role, text, turn_id = message.role, message.text, message.turn_id
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
    return HistoryMessage(role=role, text=text, turn_id=turn_id)


def turn_messages(
    user_text: str | None, assistant_text: str | None, turn_id: str | None
) -> list[HistoryMessage]:
    """A turn's history messages, user first, leaving out empty or blank texts.

    Raises:
        TypeError: naming the argument that is neither a ``str`` nor ``None``.
    """
    texts = (("user_text", user_text), ("assistant_text", assistant_text), ("turn_id", turn_id))
    for name, value in texts:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    messages: list[HistoryMessage] = []
    if user_text and not user_text.isspace():
        messages.append(HistoryMessage(role="user", text=user_text, turn_id=turn_id))
    if assistant_text and not assistant_text.isspace():
        messages.append(HistoryMessage(role="assistant", text=assistant_text, turn_id=turn_id))
    return messages


def model_history(history: Iterable[HistoryMessage]) -> list[HistoryMessage]:
    """The messages of ``history`` to send a model: empty or blank ones left out (some
    providers refuse them), a lone surrogate (UTF-8 cannot hold it) replaced by U+FFFD."""
    return [
        m if valid_text(m.text) is m.text else msgspec.structs.replace(m, text=valid_text(m.text))
        for m in history
        if m.text and not m.text.isspace()
    ]


class ConversationManager:
    """Conversation history for agents: ``add_message`` / ``add_turn`` / ``get_history``.

    Args:
        store: where history lives; default a new :class:`MemoryConversationStore`.

    Use it as ``async with ConversationManager(...) as history:`` to close the store at the
    end, or call :meth:`aclose`.
    """

    def __init__(self, store: ConversationStore | None = None) -> None:
        if store is not None and (
            isinstance(store, type) or not isinstance(store, ConversationStore)
        ):
            hint = (
                " (for a Redis URL: RedisConversationStore(url))" if isinstance(store, str) else ""
            )
            raise TypeError(f"store must be a ConversationStore, got {kind_of(store)}{hint}")
        self.store: ConversationStore = MemoryConversationStore() if store is None else store
        # The built-in stores check ids themselves: a turn's lock and read skip it here.
        self._checks_ids = type(self.store) not in (MemoryConversationStore, RedisConversationStore)

    @classmethod
    def from_settings(cls, settings: Settings) -> ConversationManager:
        """Redis when ``settings.redis_url`` is set, else memory; caps and TTL from settings,
        the lock wait :func:`lock_wait_timeout` of its ``turn_timeout`` and ``lock_wait_grace``.
        """
        bounds: dict[str, Any] = {
            "max_messages": settings.history_max_messages,
            "max_bytes": settings.history_max_bytes,
            "lock_timeout": lock_wait_timeout(settings.turn_timeout, settings.lock_wait_grace),
        }
        if not settings.redis_url:
            limit = settings.history_max_conversations
            return cls(MemoryConversationStore(max_conversations=limit, **bounds))
        ttl, cluster = settings.history_ttl or None, settings.redis_cluster
        return cls(RedisConversationStore(settings.redis_url, ttl=ttl, cluster=cluster, **bounds))

    async def add_message(
        self, conversation_id: str, message: HistoryMessage | Mapping[str, Any]
    ) -> None:
        """Append one message: a :class:`HistoryMessage` or ``{"role": ..., "text": ...}``.

        Raises:
            ValueError: when the role is not ``"user"`` / ``"assistant"`` or text is missing.
        """
        await self.add_messages(conversation_id, [message])

    async def add_messages(
        self, conversation_id: str, messages: Iterable[HistoryMessage | Mapping[str, Any]]
    ) -> None:
        """Append several messages atomically."""
        check_conversation_id(conversation_id)
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
        """Append a turn's user and assistant messages together, skipping empty ones.

        Raises:
            TypeError: when a text or ``turn_id`` is neither a ``str`` nor ``None``.
        """
        await self.add_messages(conversation_id, turn_messages(user_text, assistant_text, turn_id))

    async def get_history(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first (``[]`` for an unknown conversation)."""
        check_conversation_id(conversation_id)
        return await self.store.get(conversation_id)

    async def clear(self, conversation_id: str) -> None:
        """Forget the conversation's history; a turn still running will not record (with a
        store that has generations: both built-in stores)."""
        check_conversation_id(conversation_id)
        await self.store.clear(conversation_id)

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int | None]:
        """The history and the generation to pass :meth:`record_turn`, for a turn holding
        the lock (``None`` for a store without generations: then it always records).
        """
        if self._checks_ids:
            check_conversation_id(conversation_id)
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
        check_conversation_id(conversation_id)
        messages = turn_messages(user_text, assistant_text, turn_id)
        record = getattr(self.store, "record_turn", None)
        if generation is None or record is None:
            if messages:
                await self.store.append(conversation_id, messages)
            return True
        # With no messages too: the store's record_turn releases the lock its holder has.
        return bool(await record(conversation_id, messages, generation))

    def lock(
        self, conversation_id: str, *, timeout: LockTimeout = STORE_DEFAULT
    ) -> AbstractAsyncContextManager[None]:
        """Hold the conversation exclusively (one turn at a time). ``timeout`` in seconds
        (``None``: forever; default: the store's); :class:`ConversationLockTimeout` when the
        wait is exceeded."""
        if self._checks_ids:
            check_conversation_id(conversation_id)
        if isinstance(timeout, DefaultTimeout):
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
