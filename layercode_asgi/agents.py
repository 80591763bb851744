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
import re
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, TypeAlias

import anyio.lowlevel

from .config import Settings
from .conversation import HistoryMessage, model_history
from .envfile import read_settings_file
from .errors import ConfigurationError
from .events import SessionStartPayload, TurnEvent
from .redaction import escape_terminal

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
    the way it was written (see :func:`bind_agent`). Reading a signature costs more than
    a turn's own work (7% of the library's calls per paced turn), so a webhook binds its
    agent once and hands the bound agent to every :class:`~layercode_asgi.turns.Turn`."""

    __slots__ = ("agent", "call")

    def __init__(self, agent: Agent, call: Callable[[TurnEvent, TurnContext], Any]) -> None:
        self.agent = agent
        self.call = call

    def __call__(self, event: TurnEvent, context: TurnContext) -> Any:
        return self.call(event, context)


def bind_agent(agent: Agent) -> BoundAgent:
    """Return ``bound(event, context)``, which invokes ``agent`` the way it was written.

    Decided once per agent from its signature: a second positional parameter (or
    ``*args``) receives the context positionally; a keyword-only parameter named
    ``context`` or ``ctx`` receives it by name (unless it has a default and there is a
    second positional parameter); otherwise the agent gets the event only. Other
    keyword-only parameters with defaults are left alone. Raises
    :class:`InvalidAgentError` when ``agent`` is not callable or its signature cannot
    accept that call (e.g. three required positional parameters, or a keyword-only
    parameter without a default that is not the context).
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
        call: Callable[[TurnEvent, TurnContext], Any] = agent
    elif convention == _EVENT_ONLY:
        call = _event_only(agent)
    else:
        call = _by_name(agent, convention)
    return BoundAgent(agent, call)


_POSITIONAL_CONTEXT = "*"
_EVENT_ONLY = ""
#: The convention of each plain function agent, read once: ``stream_turn(event, agent)``
#: binds on every request, and reading the signature each time cost 15% of the server's
#: CPU per turn (in-process paced turns through a Starlette route calling
#: ``stream_turn``: 282 -> 239 µs). Weak keys: a function made per request is not kept.
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
    try:
        signature: inspect.Signature | None = inspect.signature(agent)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        signature = None
    parameters = signature.parameters.values() if signature is not None else ()
    positional = named = 0  # named: not counting ``*args``
    keyword = None
    optional = False  # the keyword-only context parameter has a default
    for parameter in parameters:
        if parameter.kind in _POSITIONAL:
            positional += 1
            named += 1
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            positional = 2
        elif parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name in _CONTEXT_NAMES:
            keyword = parameter.name
            optional = parameter.default is not inspect.Parameter.empty
            break
    args: tuple[str, ...] = ("event",)
    kwargs: dict[str, str] = {}
    if keyword is not None and not (optional and named >= 2):
        kwargs = {keyword: "context"}
        convention = keyword
    elif positional >= 2:
        args = ("event", "context")
        convention = _POSITIONAL_CONTEXT
    else:
        convention = _EVENT_ONLY
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidAgentError(
                f"{agent_name(agent)}{signature} cannot be an agent ({exc}); {AGENT_SHAPE}"
            ) from None
    return convention


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
    arrives (whitespace alone with the next one). Raises :class:`ConfigurationError` at
    once when the SDK is not installed or the key is empty, so a misconfigured server
    refuses to start instead of failing turns.
    """
    if not api_key:
        raise ConfigurationError("the openai agent needs OPENAI_API_KEY")
    try:
        import openai
    except ImportError:
        raise ConfigurationError(
            "the openai agent needs the OpenAI SDK: pip install 'layercode-asgi[openai]'"
        ) from None
    from .adapters import PhraseChunker

    # A client's pooled connections belong to the event loop that opened them: one client
    # per loop (an app may serve turns on a later loop: each test on its own, trio after
    # asyncio). ``[loop, completions]``; the SDK's overloads are not worth mirroring.
    current: list[Any] = [None, openai.AsyncOpenAI(api_key=api_key, base_url=base_url)]

    def completions() -> Any:
        loop = anyio.lowlevel.current_token()
        if current[0] != loop:
            if current[0] is not None:
                current[1] = openai.AsyncOpenAI(api_key=api_key, base_url=base_url)
            current[0] = loop
        return current[1].chat.completions

    async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[Reply]:
        text = event.text
        if not text or text.isspace():  # nothing said (the history leaves blanks out)
            if not context.is_session_start:
                return
            text = "(The caller joined. Greet them.)"
        messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}]
        messages.extend({"role": m.role, "content": m.text} for m in model_history(context.history))
        messages.append({"role": "user", "content": text})
        stream = await completions().create(model=model, messages=messages, stream=True)
        deltas = PhraseChunker("delta")  # whitespace alone goes out with the next delta
        async for chunk in stream:
            for choice in chunk.choices:
                delta = choice.delta  # None in Azure's content-filter annotation chunks
                if delta is not None and delta.content:
                    for text in deltas.feed(delta.content):
                        yield text

    agent.__name__ = agent.__qualname__ = "openai_agent"
    agent.model = f"openai:{model}"  # type: ignore[attr-defined]  # shown by /ready
    return agent


def _split_model(spec: str) -> tuple[str, str]:
    """``provider:model`` -> ``(provider, model)``; a bare model name is OpenAI's."""
    provider, _, name = spec.partition(":")
    return (provider, name) if name else ("openai", spec)


def _openai_factory(settings: Settings | None) -> Agent:
    settings = Settings() if settings is None else settings
    model = settings.default_model
    provider, name = _split_model(model)
    if provider != "openai":
        raise ConfigurationError(
            f"DEFAULT_MODEL {model!r}: the openai agent serves 'openai:<model>' models only"
        )
    prompt = configured_system_prompt(settings)
    if prompt is None:
        return openai_agent(api_key=settings.openai_api_key or "", model=name)
    return openai_agent(api_key=settings.openai_api_key or "", model=name, system_prompt=prompt)


def configured_system_prompt(settings: Settings) -> str | None:
    """The system prompt from ``LAYERCODE_SYSTEM_PROMPT`` or ``LAYERCODE_SYSTEM_PROMPT_FILE``.

    ``None`` when neither is set; :class:`ConfigurationError` when both are, or the file
    cannot be read or is empty.
    """
    path = settings.system_prompt_file
    if path is None:
        return settings.system_prompt
    if settings.system_prompt is not None:
        raise ConfigurationError(
            "set LAYERCODE_SYSTEM_PROMPT or LAYERCODE_SYSTEM_PROMPT_FILE, not both"
        )
    try:
        text = read_settings_file(path).decode("utf-8").strip()
    except (OSError, ValueError) as exc:  # UnicodeDecodeError too
        reason = getattr(exc, "strerror", None) or (
            type(exc).__name__ if isinstance(exc, UnicodeDecodeError) else str(exc)
        )
        raise ConfigurationError(
            f"LAYERCODE_SYSTEM_PROMPT_FILE {path!r}: cannot read it ({reason})"
        ) from None
    if not text:
        raise ConfigurationError(f"LAYERCODE_SYSTEM_PROMPT_FILE {path!r} is empty")
    return text


STARTER_WELCOME = "Hi! I'm your voice assistant. What can I do for you?"
STARTER_PROMPT = (
    "You are a friendly, concise voice assistant on a call. Your words are spoken aloud: "
    "answer in one to three short sentences, with no lists, markdown, emoji or links. "
    "If a request is unclear, ask one short question."
)
_PYDANTIC_AI_EXTRA = "pip install 'layercode-asgi[pydantic-ai]'"
_OPENAI_PROVIDERS = ("openai", "openai-responses", "openai-chat")
_GOOGLE_PROVIDERS = ("google-gla", "google", "gemini")


def _pydantic_ai_model(
    spec: str, openai_api_key: str | None, google_api_key: str | None, base_url: str | None
) -> Any:
    """The pydantic-ai model for ``provider:model``, with its key passed explicitly."""
    provider, name = _split_model(spec)
    try:
        if provider in _OPENAI_PROVIDERS:
            if not openai_api_key:
                raise ConfigurationError(f"the starter agent needs OPENAI_API_KEY for {spec!r}")
            from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
            from pydantic_ai.providers.openai import OpenAIProvider

            model_class = OpenAIChatModel if provider == "openai-chat" else OpenAIResponsesModel
            return model_class(
                name, provider=OpenAIProvider(api_key=openai_api_key, base_url=base_url)
            )
        if provider in _GOOGLE_PROVIDERS:
            if not google_api_key:
                raise ConfigurationError(
                    f"the starter agent needs GOOGLE_GENERATIVEAI_API_KEY for {spec!r}"
                )
            from pydantic_ai.models.google import GoogleModel
            from pydantic_ai.providers.google import GoogleProvider

            return GoogleModel(name, provider=GoogleProvider(api_key=google_api_key))
        from pydantic_ai.models import infer_model

        return infer_model(spec)
    except ConfigurationError:
        raise
    except ImportError as exc:
        if provider in _OPENAI_PROVIDERS + _GOOGLE_PROVIDERS:  # in our extra
            raise ConfigurationError(
                f"the starter agent needs pydantic-ai's {provider!r} models: {_PYDANTIC_AI_EXTRA}"
            ) from None
        raise ConfigurationError(f"DEFAULT_MODEL {spec!r}: {_first_line(exc)}") from None
    except Exception as exc:  # pydantic-ai's UserError: unknown provider, a missing key
        raise ConfigurationError(f"DEFAULT_MODEL {spec!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def starter_agent(
    *,
    model: str = "openai:gpt-5-nano",
    system_prompt: str = STARTER_PROMPT,
    welcome: str = STARTER_WELCOME,
    openai_api_key: str | None = None,
    google_api_key: str | None = None,
    base_url: str | None = None,
) -> Agent:
    """A concise voice assistant on pydantic-ai (extra ``pydantic-ai``).

    Speaks ``welcome`` on ``session.start``, then answers each message briefly with the
    conversation's history as context, phrase by phrase as the model streams. ``model`` is
    pydantic-ai's ``provider:model`` (``openai:``, ``openai-chat:``, ``google-gla:``; other
    providers through pydantic-ai with their own environment keys). ``base_url`` (else
    ``OPENAI_BASE_URL``) points ``openai`` models at any OpenAI-compatible API. Raises
    :class:`ConfigurationError` at once when pydantic-ai or the model's key is missing.
    """
    try:
        import pydantic_ai
    except ImportError:
        raise ConfigurationError(
            f"the starter agent needs pydantic-ai: {_PYDANTIC_AI_EXTRA}"
        ) from None
    from .adapters import from_pydantic_ai

    llm = _pydantic_ai_model(model, openai_api_key, google_api_key, base_url)
    agent = from_pydantic_ai(
        pydantic_ai.Agent(llm, instructions=system_prompt, name="starter"), welcome=welcome
    )
    agent.__name__ = agent.__qualname__ = "starter_agent"
    agent.model = model if ":" in model else f"openai:{model}"  # type: ignore[attr-defined]  # /ready
    return agent


def _starter_factory(settings: Settings | None) -> Agent:
    """a concise voice assistant on pydantic-ai (extra [pydantic-ai]; needs DEFAULT_MODEL's key)"""
    settings = Settings() if settings is None else settings
    return starter_agent(
        model=settings.default_model,
        system_prompt=configured_system_prompt(settings) or STARTER_PROMPT,
        openai_api_key=settings.openai_api_key,
        google_api_key=settings.google_generativeai_api_key,
    )


AgentFactory: TypeAlias = Callable[["Settings | None"], Agent]

# Agents known by name: ``name -> factory(settings)``. Private: read it with
# :func:`agent_factory` / :func:`list_agents`, extend it with :func:`register_agent`.
_AGENTS: dict[str, AgentFactory] = {
    "echo": _echo_factory,
    "openai": _openai_factory,
    "starter": _starter_factory,
}


class AgentNotFoundError(ConfigurationError, LookupError):
    """No agent has that name; the message lists the names there are."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = tuple(available)
        super().__init__(
            f"no agent named {name!r}; available: {', '.join(self.available)} "
            "(or a 'package.module:attribute' import path)"
        )


def register_agent(name: str, factory: AgentFactory) -> None:
    """Make ``get_agent(name)`` build an agent with ``factory(settings)``."""
    if not isinstance(name, str):
        raise TypeError(f"an agent name must be a str, got {type(name).__name__}")
    if not callable(factory):
        raise TypeError(f"the factory for {name!r} is not callable: factory(settings) -> agent")
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
    except (Exception, SystemExit) as exc:  # whatever the module raised while being imported
        # (an example's ``raise SystemExit("Set OPENAI_API_KEY")`` is a failure to start too)
        reason = escape_terminal(str(exc).strip())  # on one line, control characters escaped
        raise AgentImportError(
            f"cannot import the agent {name!r}: {type(exc).__name__}: {reason}"
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
    factory = _AGENTS.get(name)
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


#: The name :func:`get_agent` built each live agent under (``"echo"``, ``"starter"``...).
_REGISTERED_AS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def agent_name(agent: Agent) -> str:
    """A readable name for ``agent`` (for /ready and logs): the name it was registered
    under if :func:`get_agent` built it, else its ``__name__`` (or its type's)."""
    try:
        return _REGISTERED_AS[agent]
    except (KeyError, TypeError):  # not built by name; not hashable or weakly referenceable
        return str(getattr(agent, "__name__", None) or type(agent).__name__)
