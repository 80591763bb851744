"""Conversation history: what was said in a conversation, oldest first."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["HistoryMessage", "Role"]

Role = Literal["user", "assistant"]


class HistoryMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One utterance of a conversation: who said it and what was said."""

    role: Role
    text: str
    turn_id: str | None = None
