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

import contextlib
import importlib
import inspect
import logging
import re
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, TypeAlias

from ._asgi import must_propagate
from .builtin_agents import (
    openai_agent,
    openai_factory,
    starter_agent,
    starter_factory,
)
from .config import Settings
from .conversation import HistoryMessage
from .errors import ConfigurationError, check_strs, check_type, kind_of
from .events import SessionStartPayload, TurnEvent
from .redaction import escape_terminal

logger = logging.getLogger("layercode_asgi.agents")

__all__ = [
    "Agent",
    "AgentFactory",
    "AgentImportError",
    "AgentNotFoundError",
    "BoundAgent",
    "Data",
    "Hangup",
    "InvalidAgentError",
    "Reply",
    "Tts",
    "TurnContext",
    "TurnEvent",
    "agent_factory",
    "bind_agent",
    "echo_agent",
    "get_agent",
    "list_agents",
    "openai_agent",
    "register_agent",
    "starter_agent",
]


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
    """This object cannot be an agent (not callable, or a signature that cannot take an event)."""


class BoundAgent:
    """An agent whose calling convention is decided: ``bound(event, context)`` calls it
    the way it was written (:func:`bind_agent`). Reading a signature costs more than a
    turn's own work (7% of the library's calls per paced turn), so a webhook binds once."""

    __slots__ = ("agent", "call")

    def __init__(self, agent: Agent, call: Callable[[TurnEvent, TurnContext], Any]) -> None:
        self.agent = agent
        self.call = call

    def __call__(self, event: TurnEvent, context: TurnContext) -> Any:
        return self.call(event, context)


def bind_agent(agent: Agent) -> BoundAgent:
    """Return ``bound(event, context)``, which invokes ``agent`` the way it was written.

    From its signature: a second positional parameter (or ``*args``) gets the context
    positionally; a keyword-only ``context`` or ``ctx`` gets it by name (unless it has a
    default and there is a second positional parameter); else the agent gets the event
    only (other keyword-only parameters with defaults are left alone). Raises
    :class:`InvalidAgentError` when ``agent`` is not callable or cannot take that call
    (three required positional parameters, a required keyword-only one, …).
    """
    if isinstance(agent, BoundAgent):
        return agent
    plain = type(agent) is FunctionType
    convention = _CONVENTIONS.get(agent) if plain else None
    if convention is None:
        convention = _convention(agent)
        if plain:
            _CONVENTIONS[agent] = convention
    if convention == _POSITIONAL_CONTEXT:
        return BoundAgent(agent, agent)
    if convention == _EVENT_ONLY:
        return BoundAgent(agent, lambda event, context: agent(event))
    return BoundAgent(agent, lambda event, context: agent(event, **{convention: context}))


_POSITIONAL_CONTEXT = "*"
_EVENT_ONLY = ""
#: Each plain function agent's convention, read once: ``stream_turn`` binds per request,
#: and reading the signature each time cost 15% of the server's CPU per turn (paced turns
#: through a Starlette route: 282 -> 239 µs). Weak keys: a per-request function goes.
_CONVENTIONS: weakref.WeakKeyDictionary[Callable[..., Any], str] = weakref.WeakKeyDictionary()


def _convention(agent: Agent) -> str:
    """How ``agent`` takes the context: a parameter name, positionally, or not at all."""
    if not callable(agent):
        raise InvalidAgentError(f"{type(agent).__name__} is not callable; {AGENT_SHAPE}")
    generator = inspect.isgeneratorfunction(agent)  # (a bool: no narrowing of ``agent``)
    if generator:  # its generator is not async: every turn would fail
        raise InvalidAgentError(
            f"{agent_name(agent)} is a generator function, not an async one; {AGENT_SHAPE}"
        )
    if (
        isinstance(agent, type)
        and not hasattr(agent, "__aiter__")
        and not hasattr(agent, "__await__")
    ):
        raise InvalidAgentError(  # calling it makes an object no turn can use
            f"{agent.__name__} is a class whose instances are neither async iterables nor "
            f"awaitables (an object with an async __call__ is given as an instance); {AGENT_SHAPE}"
        )
    try:
        signature = inspect.signature(agent)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return _EVENT_ONLY
    parameters = signature.parameters.values()
    named = sum(p.kind in _POSITIONAL for p in parameters)  # not counting ``*args``
    keyword = next(
        (p for p in parameters if p.kind is p.KEYWORD_ONLY and p.name in _CONTEXT_NAMES), None
    )
    kwargs: dict[str, str] = {}
    if keyword is not None and (keyword.default is keyword.empty or named < 2):
        convention, kwargs = keyword.name, {keyword.name: "context"}
    elif named >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters):
        convention = _POSITIONAL_CONTEXT
    else:
        convention = _EVENT_ONLY
    args = ("event", "context") if convention == _POSITIONAL_CONTEXT else ("event",)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidAgentError(
            f"{agent_name(agent)}{signature} cannot be an agent ({exc}); {AGENT_SHAPE}"
        ) from None
    return convention


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


#: Makes a named agent from the settings (:func:`register_agent`, :func:`get_agent`).
AgentFactory: TypeAlias = Callable[["Settings | None"], Agent]

# Agents known by name: ``name -> factory(settings)`` (see register_agent).
_AGENTS: dict[str, AgentFactory] = {
    "echo": _echo_factory,
    "openai": openai_factory,
    "starter": starter_factory,
}


class AgentNotFoundError(ConfigurationError, LookupError):
    """No agent has that name; the message lists the names there are."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        check_type("name", name, str, "a str")
        self.name = name
        self.available = check_strs("available", available, "a sequence of agent names (str)")
        super().__init__(
            f"no agent named {name!r}; available: {', '.join(self.available)} "
            "(or a 'package.module:attribute' import path)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.available))


def register_agent(name: str, factory: AgentFactory) -> None:
    """Make ``get_agent(name)`` build an agent with ``factory(settings)``.

    ``name`` must be a name ``LAYERCODE_AGENT`` can carry (it is stripped): non-empty,
    printable (no control character, no lone surrogate), no whitespace around it."""
    if not isinstance(name, str):
        raise TypeError(f"an agent name must be a str, got {kind_of(name)}")
    if not name.isprintable() or name != name.strip() or not name:
        raise ConfigurationError(
            f"invalid agent name {name!r}: it must be non-empty and printable, without "
            "whitespace around it (as LAYERCODE_AGENT can name it)"
        )
    if not callable(factory):
        raise TypeError(f"the factory for {name!r} is not callable: factory(settings) -> agent")
    if inspect.iscoroutinefunction(factory):  # get_agent would return its coroutine
        raise TypeError(f"the factory for {name!r} must be a plain function, not async")
    _AGENTS[name] = factory


def list_agents() -> list[str]:
    """The names :func:`get_agent` knows, sorted."""
    return sorted(_AGENTS)


def agent_factory(name: str) -> AgentFactory:
    """The factory registered as ``name`` (not called: its docstring describes the agent);
    :class:`AgentNotFoundError` when there is none."""
    factory = _AGENTS.get(name)
    if factory is None:
        raise AgentNotFoundError(name, list_agents())
    return factory


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
    except (Exception, SystemExit) as exc:  # an example's SystemExit("Set …") too
        reason = escape_terminal(str(exc).strip())  # on one line, control characters escaped
        raise AgentImportError(
            f"cannot import the agent {name!r}: {type(exc).__name__}: {reason}"
        ) from exc
    owner = module_name  # what lacks the part: the module, or an object in it
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise AgentImportError(
                f"cannot import the agent {name!r}: {owner} has no attribute {part!r}"
            ) from exc
        owner += f".{part}" if ":" in owner else f":{part}"
    return target


def get_agent(name: str, settings: Settings | None = None) -> Agent:
    """Build the agent called ``name`` (``"echo"``, ``"openai"``, …), or import the agent
    at ``"package.module:attribute"``.

    Raises :class:`AgentNotFoundError` for an unknown name, :class:`AgentImportError` (with
    the cause) for an import path that fails, :class:`InvalidAgentError` for an object that
    cannot be an agent, :class:`ConfigurationError` for an agent that cannot run with these
    settings (a missing key).
    """
    if not isinstance(name, str):
        raise TypeError(f"an agent name must be a str, got {kind_of(name)}")
    check_type("settings", settings, Settings | None, "a Settings or None")
    factory = _AGENTS.get(name)  # only names register_agent allows
    if factory is not None:
        agent = factory(settings)
        with contextlib.suppress(TypeError):  # not weakly referenceable, or not hashable
            _REGISTERED_AS[agent] = name
        return agent
    if ":" in name:
        target = _import_agent(name)
        if not callable(target):
            raise InvalidAgentError(f"{name} is not callable, so it cannot be an agent")
        bind_agent(target)  # refuses a signature that cannot take an event
        return target  # type: ignore[no-any-return]
    raise AgentNotFoundError(name, list_agents())


#: The name :func:`get_agent` built each live agent under (``"echo"``, ``"starter"``...; the
#: last one for an agent built under several: ``create_app`` keeps its own).
_REGISTERED_AS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def agent_name(agent: Agent) -> str:
    """A readable name for ``agent`` (for /ready and logs): the name it was registered
    under if :func:`get_agent` built it, else its ``__name__`` (or its type's)."""
    try:
        return _REGISTERED_AS[agent]
    except (KeyError, TypeError):  # not built by name; not hashable or weakly referenceable
        return str(getattr(agent, "__name__", None) or type(agent).__name__)


async def close_agent(agent: Agent, name: str | None = None) -> None:
    """Await ``agent.aclose()`` if it has one (``create_app``'s lifespan, at shutdown); a
    failure is logged with its traceback, under ``name`` (the app's, since one agent can be
    built under several names; else :func:`agent_name`), and goes no further."""
    aclose = getattr(agent, "aclose", None)
    if not callable(aclose):
        return
    try:
        closing = aclose()
        if inspect.isawaitable(closing):
            await closing
    except BaseException as exc:  # its own kind too: the agent's failure, as in a turn
        if must_propagate(exc):
            raise
        shown = agent_name(agent) if name is None else name
        logger.error("closing the agent %s failed", shown, exc_info=exc)
