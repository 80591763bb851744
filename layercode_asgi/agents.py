"""The agent contract: an agent is a plain async callable.

The smallest agent::

    async def agent(event):
        yield "Hello"                       # each str is spoken (a response.tts event)

An agent may take a second parameter to receive a :class:`TurnContext` (the conversation's
earlier messages, ids, metadata)::

    async def agent(event, context):
        yield f"You have said {len(context.history)} things so far."

It may yield typed replies for the other LayerCode events: :class:`Data` (forwarded to the
browser as ``response.data``) and :class:`Hangup` (ends the call); :class:`Tts` is the explicit
form of a ``str``. A coroutine that *returns* a ``str``, a reply, a list of them, an async
iterable of them, or ``None`` works too. No base class and no registration are needed.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .conversation import HistoryMessage
from .events import MessagePayload, SessionStartPayload

__all__ = [
    "Agent",
    "Data",
    "Hangup",
    "Reply",
    "Tts",
    "TurnContext",
    "TurnEvent",
    "bind_agent",
]

#: The two events that open a turn and are answered with a stream.
TurnEvent: TypeAlias = SessionStartPayload | MessagePayload


@dataclass(frozen=True, slots=True)
class Tts:
    """Speak ``content`` (``response.tts``). Yielding a plain ``str`` does the same."""

    content: str


@dataclass(frozen=True, slots=True)
class Data:
    """Send ``content`` (any JSON value) to the browser client (``response.data``)."""

    content: Any


@dataclass(frozen=True, slots=True)
class Hangup:
    """End the call or session (``response.hangup``), optionally with ``content``."""

    content: Any = None


#: What an agent may yield: text to speak, or a typed reply.
Reply: TypeAlias = str | Tts | Data | Hangup

#: An agent: ``agent(event)`` or ``agent(event, context)``, an async generator function of
#: replies or a coroutine function returning replies.
Agent: TypeAlias = Callable[..., AsyncIterable[Reply] | Awaitable[Any]]


@dataclass(slots=True)
class TurnContext:
    """What an agent may want besides the event, passed as its second argument.

    Attributes:
        event: the turn's event (``session.start`` or ``message``).
        history: the conversation's earlier messages, oldest first (not this turn's).
        extras: whatever the application put there (clients, settings, per-app state).
    """

    event: TurnEvent
    history: Sequence[HistoryMessage] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def conversation_id(self) -> str:
        return self.event.conversation_id

    @property
    def session_id(self) -> str:
        return self.event.session_id

    @property
    def turn_id(self) -> str:
        return self.event.turn_id

    @property
    def text(self) -> str | None:
        """What the user said this turn (``None`` on a silent ``session.start``)."""
        return self.event.text

    @property
    def metadata(self) -> Mapping[str, Any] | None:
        return self.event.metadata

    @property
    def is_session_start(self) -> bool:
        return isinstance(self.event, SessionStartPayload)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_CONTEXT_NAMES = frozenset({"context", "ctx"})


def bind_agent(agent: Agent) -> Callable[[TurnEvent, TurnContext], Any]:
    """Return ``call(event, context)`` that invokes ``agent`` the way it was written.

    Decided once per agent from its signature: a second positional parameter (or
    ``*args``) receives the context positionally; a keyword-only parameter named
    ``context`` or ``ctx`` receives it by name; otherwise the agent gets the event only.
    """
    if not callable(agent):
        raise TypeError(f"an agent must be an async callable, got {type(agent).__name__}")
    try:
        parameters = inspect.signature(agent).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        parameters = None
    positional = 0
    for parameter in parameters or ():
        if parameter.kind in _POSITIONAL:
            positional += 1
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            positional = 2
        elif parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name in _CONTEXT_NAMES:
            name = parameter.name
            return lambda event, context: agent(event, **{name: context})
    if positional >= 2:
        return agent
    return lambda event, context: agent(event)
