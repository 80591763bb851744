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

import importlib
import inspect
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from .conversation import HistoryMessage
from .errors import ConfigurationError
from .events import MessagePayload, SessionStartPayload

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "AGENTS",
    "Agent",
    "AgentImportError",
    "AgentNotFoundError",
    "Data",
    "Hangup",
    "InvalidAgentError",
    "Reply",
    "Tts",
    "TurnContext",
    "TurnEvent",
    "bind_agent",
    "echo_agent",
    "get_agent",
    "list_agents",
    "openai_agent",
    "register_agent",
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


#: What an agent must look like, quoted by the start-up refusals.
AGENT_SHAPE = (
    "an agent is called as agent(event) or agent(event, context) (or with a keyword-only "
    "'context' / 'ctx' parameter), and is an async generator function, a coroutine "
    "function, an object with an async __call__, or a callable returning an async iterable"
)


class InvalidAgentError(ConfigurationError, TypeError):
    """This object cannot be an agent (not callable, or a signature that cannot take an event).

    A :class:`ConfigurationError` (start-up fails clearly) and a ``TypeError``.
    """


def bind_agent(agent: Agent) -> Callable[[TurnEvent, TurnContext], Any]:
    """Return ``call(event, context)`` that invokes ``agent`` the way it was written.

    Decided once per agent from its signature: a second positional parameter (or
    ``*args``) receives the context positionally; a keyword-only parameter named
    ``context`` or ``ctx`` receives it by name; otherwise the agent gets the event only.
    Raises :class:`InvalidAgentError` when ``agent`` is not callable or its signature
    cannot accept that call (e.g. three required positional parameters).
    """
    if not callable(agent):
        raise InvalidAgentError(f"{type(agent).__name__} is not callable; {AGENT_SHAPE}")
    try:
        signature: inspect.Signature | None = inspect.signature(agent)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        signature = None
    parameters = signature.parameters.values() if signature is not None else ()
    positional = 0
    call: Callable[[TurnEvent, TurnContext], Any] | None = None
    arguments: tuple[tuple[Any, ...], dict[str, Any]] = (("event",), {})
    for parameter in parameters:
        if parameter.kind in _POSITIONAL:
            positional += 1
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            positional = 2
        elif parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name in _CONTEXT_NAMES:
            name = parameter.name
            arguments = (("event",), {name: "context"})
            call = _by_name(agent, name)
            break
    if call is None and positional >= 2:
        arguments = (("event", "context"), {})
        call = agent
    if signature is not None:
        try:
            signature.bind(*arguments[0], **arguments[1])
        except TypeError as exc:
            raise InvalidAgentError(
                f"{agent_name(agent)}{signature} cannot be an agent ({exc}); {AGENT_SHAPE}"
            ) from None
    return call if call is not None else _event_only(agent)


def describe_non_reply(value: Any) -> str:
    """What a turn's log says when an agent returned ``value``, which is not a reply."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:79] + "…"
    return (
        f"the agent returned {type(value).__name__} {shown}; expected an async iterable of "
        "replies (an async generator function), or an awaitable (a coroutine function) giving "
        "None, a reply, a list of replies or an async iterable of them; a reply is a str, "
        "Tts, Data or Hangup"
    )


def _by_name(agent: Agent, name: str) -> Callable[[TurnEvent, TurnContext], Any]:
    return lambda event, context: agent(event, **{name: context})


def _event_only(agent: Agent) -> Callable[[TurnEvent, TurnContext], Any]:
    return lambda event, context: agent(event)


# -- built-in agents and the registry ------------------------------------------------------------

ECHO_GREETING = "Hello! I'm the echo agent. Say something and I'll say it back."


async def echo_agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[Reply]:
    """A deterministic agent that needs no key: greets, then repeats what it hears."""
    if context.is_session_start:
        yield ECHO_GREETING
    elif event.text:
        yield f"You said: {event.text}"
    else:
        yield "I didn't catch that."


def _echo_factory(settings: Settings | None) -> Agent:
    return echo_agent


def openai_agent(
    *,
    api_key: str,
    model: str = "gpt-5-nano",
    system_prompt: str = "You are a helpful voice assistant. Answer in short spoken sentences.",
    base_url: str | None = None,
) -> Agent:
    """An agent that streams OpenAI chat completions (extra ``openai``).

    The conversation's history is sent as context; every text delta is spoken as it
    arrives. Raises :class:`ConfigurationError` at once when the SDK is not installed or
    the key is empty, so a misconfigured server refuses to start instead of failing turns.
    """
    if not api_key:
        raise ConfigurationError("the openai agent needs OPENAI_API_KEY")
    try:
        import openai
    except ImportError:
        raise ConfigurationError(
            "the openai agent needs the OpenAI SDK: pip install 'layercode-asgi[openai]'"
        ) from None
    client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url)
    completions: Any = client.chat.completions  # the SDK's overloads are not worth mirroring

    async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[Reply]:
        messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}]
        messages.extend({"role": m.role, "content": m.text} for m in context.history)
        if event.text:
            messages.append({"role": "user", "content": event.text})
        elif context.is_session_start:
            messages.append({"role": "user", "content": "(The caller joined. Greet them.)"})
        stream = await completions.create(model=model, messages=messages, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content

    agent.__name__ = agent.__qualname__ = "openai_agent"
    agent.model = f"openai:{model}"  # type: ignore[attr-defined]  # shown by /ready
    return agent


def _openai_factory(settings: Settings | None) -> Agent:
    if settings is None:
        from .config import Settings

        settings = Settings()
    model = settings.default_model
    provider, _, name = model.partition(":")
    if not name:
        provider, name = "openai", model
    if provider != "openai":
        raise ConfigurationError(
            f"DEFAULT_MODEL {model!r}: the openai agent serves 'openai:<model>' models only"
        )
    return openai_agent(api_key=settings.openai_api_key or "", model=name)


AgentFactory: TypeAlias = Callable[["Settings | None"], Agent]

#: Agents known by name: ``name -> factory(settings)``. Extend with :func:`register_agent`.
AGENTS: dict[str, AgentFactory] = {"echo": _echo_factory, "openai": _openai_factory}


class AgentNotFoundError(ConfigurationError, LookupError):
    """No agent has that name; the message lists the names there are.

    A :class:`ConfigurationError` (start-up fails clearly) and a ``LookupError``.
    """

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = tuple(available)
        super().__init__(
            f"no agent named {name!r}; available: {', '.join(self.available)} "
            "(or a 'package.module:attribute' import path)"
        )


def register_agent(name: str, factory: AgentFactory) -> None:
    """Make ``get_agent(name)`` build an agent with ``factory(settings)``."""
    AGENTS[name] = factory


def list_agents() -> list[str]:
    """The names :func:`get_agent` knows, sorted."""
    return sorted(AGENTS)


class AgentImportError(ConfigurationError, ImportError):
    """A ``package.module:attribute`` agent could not be imported: the message gives the cause
    (the exception raised while importing, or the missing attribute); ``__cause__`` is it."""


_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _import_agent(name: str) -> Any:
    if not _IMPORT_PATH.fullmatch(name):
        raise AgentImportError(
            f"invalid agent import path {name!r}: expected 'package.module:attribute'"
        )
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # whatever the module raised while being imported
        raise AgentImportError(
            f"cannot import the agent {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise AgentImportError(
                f"cannot import the agent {name!r}: {module_name} has no attribute {part!r}"
            ) from exc
    return target


def get_agent(name: str, settings: Settings | None = None) -> Agent:
    """Build the agent called ``name`` (``"echo"``, ``"openai"``, …).

    ``name`` may also be an import path ``"package.module:attribute"``: the attribute is
    the agent itself (an async callable). Unknown names raise :class:`AgentNotFoundError`;
    an import path that cannot be imported raises :class:`AgentImportError` with the
    cause; an object that cannot be an agent raises :class:`InvalidAgentError`; an agent
    that cannot run with these settings (a missing key) raises :class:`ConfigurationError`.
    """
    factory = AGENTS.get(name)
    if factory is not None:
        return factory(settings)
    if ":" in name:
        target = _import_agent(name)
        if not callable(target):
            raise InvalidAgentError(f"{name} is not callable, so it cannot be an agent")
        bind_agent(target)  # refuses a signature that cannot take an event
        return target  # type: ignore[no-any-return]
    raise AgentNotFoundError(name, list_agents())


def agent_name(agent: Agent) -> str:
    """A readable name for ``agent`` (for /ready and logs)."""
    return str(getattr(agent, "__name__", None) or type(agent).__name__)
