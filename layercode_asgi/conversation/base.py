"""What every conversation store shares: the message type, errors, bounds and checks; and
what the webhook needs of one (:class:`ConversationBackend`)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Literal, Protocol, runtime_checkable

import msgspec

from ..errors import (
    ConfigurationError,
    LayercodeError,
    check_positive_int,
    check_seconds,
    check_type,
    kind_of,
)

#: Who said a :class:`HistoryMessage`: the caller or the agent.
Role = Literal["user", "assistant"]

#: Default wait for a conversation lock, in seconds (stores built without settings).
DEFAULT_LOCK_TIMEOUT: Final = 30.0
#: What a waiting turn allows the turn ahead beyond its timeout: its final events
#: (``response.error`` / the spoken fallback, ``response.end``) and its recording.
DEFAULT_LOCK_WAIT_GRACE: Final = 5.0
#: Default bound of a conversation's history, in UTF-8 bytes of text.
DEFAULT_HISTORY_MAX_BYTES: Final = 256 * 1024
#: The least bound: a UTF-8 character's most, so that a message cut to it is never empty.
MIN_HISTORY_MAX_BYTES: Final = 4

#: Longest accepted conversation id (LayerCode's are ~30 characters).
MAX_CONVERSATION_ID_LENGTH: Final = 512


class HistoryMessage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One utterance of a conversation: who said it and what was said.

    ``gc=False``: frozen, holding only strings, it is never in a cycle: no collector work.
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
        check_type("conversation_id", conversation_id, str, "a str")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number of seconds, got {kind_of(timeout)}")
        check_seconds("timeout", timeout, zero=True, none=False)
        self.conversation_id = conversation_id
        self.timeout = timeout
        super().__init__(
            f"could not lock conversation {conversation_id!r} within {timeout:g} s "
            "(another turn of this conversation is still running)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.conversation_id, self.timeout))


class DefaultTimeout(enum.Enum):
    """Sentinel type: "use the store's configured lock timeout"."""

    DEFAULT = "default"


STORE_DEFAULT: Final = DefaultTimeout.DEFAULT

LockTimeout = float | DefaultTimeout | None


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


def valid_text(text: str) -> str:
    """``text`` as UTF-8 can hold it: a pair of surrogates made the character they encode,
    a lone one (half an emoji) replaced by U+FFFD; ``text`` itself when it has none."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def check_conversation_id(conversation_id: str) -> None:
    """Refuse what no store keeps as a conversation id: not a ``str`` (``TypeError``),
    empty, over :data:`MAX_CONVERSATION_ID_LENGTH` characters or with a lone surrogate
    (``ValueError``). The one check of both stores and ``ConversationManager``."""
    if not isinstance(conversation_id, str):
        raise TypeError(f"conversation_id must be a str, got {type(conversation_id).__name__}")
    if not conversation_id:
        raise ValueError("conversation_id must not be empty")
    if len(conversation_id) > MAX_CONVERSATION_ID_LENGTH:
        raise ValueError(f"conversation_id is longer than {MAX_CONVERSATION_ID_LENGTH} characters")
    if valid_text(conversation_id) is not conversation_id:
        raise ValueError("conversation_id is not valid text (a lone surrogate)")


def check_history_bounds(max_messages: int, max_bytes: int) -> None:
    """Refuse (``ConfigurationError``) ``max_messages`` that is no integer >= 1, or
    ``max_bytes`` below :data:`MIN_HISTORY_MAX_BYTES` (a message could be cut to nothing)."""
    check_positive_int(max_messages, "max_messages")
    if type(max_bytes) is int and 0 < max_bytes < MIN_HISTORY_MAX_BYTES:
        raise ConfigurationError(
            f"max_bytes must be an integer >= {MIN_HISTORY_MAX_BYTES} (a UTF-8 character "
            f"takes up to {MIN_HISTORY_MAX_BYTES} bytes), got {max_bytes}"
        )
    check_positive_int(max_bytes, "max_bytes")  # 0, a bool, a float, a huge int


def fit(messages: Sequence[HistoryMessage], max_bytes: int) -> list[HistoryMessage]:
    """``messages`` as both stores keep them: a text over ``max_bytes`` cut to it, turn ids
    to 512 characters, both made valid UTF-8 (:func:`valid_text`)."""
    kept = []
    for message in messages:
        text = valid_text(str.__str__(message.text))  # a str subclass: msgspec encodes str only
        if text_size(text) > max_bytes:
            text = cut_text(text, max_bytes)
        turn_id = message.turn_id
        if turn_id is not None:  # an id, not text the byte bound counts: kept to an id's limit
            turn_id = valid_text(turn_id[:MAX_CONVERSATION_ID_LENGTH])
        if text is not message.text or turn_id is not message.turn_id:
            message = HistoryMessage(role=message.role, text=text, turn_id=turn_id)
        kept.append(message)
    return kept


def newest(
    messages: Sequence[HistoryMessage], max_messages: int, max_bytes: int
) -> list[HistoryMessage]:
    """What a store with these bounds keeps of ``messages`` (a history kept under larger
    ones): the newest ``max_messages``, the oldest dropped while their texts are over
    ``max_bytes`` (the newest kept, cut to it), as :func:`fit` keeps them."""
    kept = messages[-max_messages:]
    first, total = len(kept), 0
    while first > 0:
        total += text_size(kept[first - 1].text)
        if total > max_bytes:
            break
        first -= 1
    return fit(kept[min(first, len(kept) - 1) :], max_bytes)


def lock_wait(timeout: LockTimeout, default: float | None) -> float | None:
    """The seconds a ``lock(timeout=...)`` waits: ``default`` for :data:`STORE_DEFAULT`."""
    wait = default if isinstance(timeout, DefaultTimeout) else timeout
    check_seconds("lock timeout", wait, zero=True, none=True)
    return wait


@runtime_checkable
class ConversationStore(Protocol):
    """Where conversation history lives, plus per-conversation mutual exclusion.

    Optional (both built-in stores have them): ``async read_turn(id) -> (messages,
    generation)`` and ``async record_turn(id, messages, generation) -> bool`` (append only
    if no :meth:`clear` came since the read; called by every turn, with no messages too);
    without them a turn running when its conversation is cleared records all the same.
    """

    async def append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        """Append ``messages`` to the conversation atomically (all of them or none)."""

    async def get(self, conversation_id: str) -> list[HistoryMessage]:
        """The conversation's messages, oldest first (``[]`` when unknown)."""

    async def clear(self, conversation_id: str) -> None:
        """Forget the conversation's history."""

    def lock(
        self, conversation_id: str, *, timeout: float | None = ...
    ) -> AbstractAsyncContextManager[None]:
        """Hold the conversation exclusively; ``timeout=None`` waits forever. Raises
        :class:`ConversationLockTimeout` when the wait exceeds ``timeout`` seconds."""

    async def ping(self) -> None:
        """Return if the store is usable, else raise :class:`StoreUnavailableError`."""

    async def aclose(self) -> None:
        """Release the store's resources (connections)."""


class ConversationBackend(Protocol):
    """What the webhook needs of a conversation store (``ConversationManager`` has it).

    With ``read_turn`` / ``record_turn`` as well (as the manager), a turn still running when
    its conversation ends does not record; without, it does.
    """

    def lock(
        self, conversation_id: str, *, timeout: float | None = ...
    ) -> AbstractAsyncContextManager[Any]: ...

    async def get_history(self, conversation_id: str) -> list[HistoryMessage]: ...

    async def add_turn(
        self,
        conversation_id: str,
        user_text: str | None,
        assistant_text: str | None,
        *,
        turn_id: str | None = None,
    ) -> None: ...

    async def clear(self, conversation_id: str) -> None: ...
