"""The built-in agents that call a model: ``openai`` (the OpenAI SDK) and ``starter``
(pydantic-ai), their registry factories, and the configured system prompt. Re-exported by
:mod:`layercode_asgi.agents` (whose types are imported here for annotations only: no cycle).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .apikeys import sendable_key
from .config import Settings
from .conversation import model_history
from .envfile import read_settings_file
from .errors import ConfigurationError, check_text, check_type
from .loops import PerLoop

if TYPE_CHECKING:
    from .agents import Agent, Reply, TurnContext
    from .events import TurnEvent

__all__ = [
    "STARTER_PROMPT",
    "STARTER_WELCOME",
    "configured_system_prompt",
    "openai_agent",
    "openai_factory",
    "starter_agent",
    "starter_factory",
]


#: The ``openai`` agent's default system prompt.
OPENAI_PROMPT = "You are a helpful voice assistant. Answer in short spoken sentences."


def openai_agent(
    *,
    api_key: str,
    model: str = "gpt-5-nano",
    system_prompt: str | None = OPENAI_PROMPT,
    base_url: str | None = None,
) -> Agent:
    """An agent that streams OpenAI chat completions (extra ``openai``).

    The history is sent after ``system_prompt`` (none if blank or ``None``); every text
    delta is spoken as it arrives (whitespace alone with the next one), and so is a
    refusal. A provider's HTTP error, a stream without its ``finish_reason`` or an answer
    without text fails the turn as a :class:`~layercode_asgi.adapters.voice.ModelAPIError`
    (logged, the key masked); one the model ended early (``length``, ``content_filter``) is
    spoken and logged as a warning. Raises :class:`ConfigurationError` (``TypeError`` for an
    option of another type) at once when the SDK is missing, the key empty or an option
    unusable. ``agent.aclose()`` closes the running event loop's client.
    """
    if api_key is None or (isinstance(api_key, str) and not api_key.strip()):
        raise ConfigurationError("the openai agent needs OPENAI_API_KEY")
    system_prompt = _checked_options(model, system_prompt, base_url, api_key=api_key)
    try:
        import openai
    except ImportError:
        raise ConfigurationError(
            "the openai agent needs the OpenAI SDK: pip install './layercode-asgi[openai]'"
        ) from None
    from .adapters import PhraseChunker
    from .adapters.voice import (
        answer_error,
        log_stopped_retry,
        mask_key,
        reraise,
        warn_cut_short,
    )

    mask_key(api_key)

    # A client's pooled connections belong to the event loop that opened them: one client
    # per loop (two servers in threads; each test on a loop of its own; trio after asyncio).
    def client() -> Any:  # the SDK's overloads are not worth mirroring
        return openai.AsyncOpenAI(api_key=api_key, base_url=base_url)

    clients: PerLoop[Any] = PerLoop(client(), client)

    async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[Reply]:
        text = event.text
        if not text or text.isspace():  # nothing said (the history leaves blanks out)
            if not context.is_session_start:
                return
            text = "(The caller joined. Greet them.)"
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        history = ({"role": m.role, "content": m.text} for m in model_history(context.history))
        messages = [*system, *history, {"role": "user", "content": text}]
        deltas = PhraseChunker("delta")  # whitespace alone goes out with the next delta
        finish: str | None = None
        spoke = False
        try:
            stream = await clients.get().chat.completions.create(
                model=model, messages=messages, stream=True
            )
            async with stream:  # closed however the turn stops us (at a yield too)
                async for chunk in stream:
                    for choice in chunk.choices or ():  # None: not the API's shape
                        delta = choice.delta  # None in Azure's content-filter annotations
                        # a refusal is the answer: spoken, rather than silence
                        piece = None if delta is None else delta.content or delta.refusal
                        if piece:
                            for text in deltas.feed(piece):
                                spoke = True
                                yield text
                        finish = choice.finish_reason or finish
        except Exception as exc:  # logged by the turn: the key masked in the provider's answer
            reraise(exc, model)
        except BaseException as exc:  # the turn stopped: waiting to retry a refusal?
            log_stopped_retry(exc, model, context)
            raise
        if finish is None:  # a stream cut short (by a proxy, a provider) is not an answer
            raise answer_error("ended before its finish_reason", model)
        if not spoke:  # empty, blank, a tool call: the caller would hear nothing
            raise answer_error(f"held no text (finish_reason={finish})", model)
        if finish in ("length", "content_filter"):  # ended early: spoken, and logged
            warn_cut_short(finish, model, context)

    async def aclose() -> None:  # create_app's lifespan: this loop's client
        client = clients.take()
        if client is not None:
            await client.close()

    agent.__name__ = agent.__qualname__ = "openai_agent"
    agent.aclose = aclose  # type: ignore[attr-defined]
    agent.model = f"openai:{model}"  # type: ignore[attr-defined]  # shown by /ready
    return agent


def _checked_options(model: Any, system_prompt: Any, base_url: Any, **keys: Any) -> str | None:
    """Refuse an option no model call could use (a blank key is the caller's to refuse);
    return the system prompt, ``None`` when blank."""
    check_type("model", model, str, "a str")
    if not model.strip():
        raise ConfigurationError("model must not be blank")
    check_text("system_prompt", system_prompt)
    check_text("base_url", base_url)
    for name, key in keys.items():
        check_type(name, key, str | None, "a str or None")
        if key and key.strip() and not sendable_key(key):
            raise ConfigurationError(
                f"{name} must be printable ASCII (an HTTP header value) without a blank at "
                "either end"
            )
    return system_prompt if isinstance(system_prompt, str) and system_prompt.strip() else None


def _split_model(spec: str) -> tuple[str, str]:
    """``provider:model`` -> ``(provider, model)``, stripped; a bare model name is OpenAI's."""
    provider, colon, name = spec.partition(":")
    if not colon:
        return "openai", spec.strip()
    if not name.strip():
        raise ConfigurationError(f"DEFAULT_MODEL {spec!r} names no model (provider:model)")
    return provider.strip(), name.strip()


def openai_factory(settings: Settings | None) -> Agent:
    settings = Settings() if settings is None else settings
    model = settings.default_model
    provider, name = _split_model(model)
    if provider != "openai":
        raise ConfigurationError(
            f"DEFAULT_MODEL {model!r}: the openai agent serves 'openai:<model>' models only"
        )
    prompt = configured_system_prompt(settings)
    return openai_agent(
        api_key=settings.openai_api_key or "",
        model=name,
        system_prompt=OPENAI_PROMPT if prompt is None else prompt,
        base_url=settings.openai_base_url,
    )


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
_PYDANTIC_AI_EXTRA = "pip install './layercode-asgi[pydantic-ai]'"
_OPENAI_PROVIDERS = ("openai", "openai-responses", "openai-chat")
_GOOGLE_PROVIDERS = ("google-gla", "google", "gemini")


def _pydantic_ai_model(
    spec: str, openai_api_key: str | None, google_api_key: str | None, base_url: str | None
) -> Any:
    """The pydantic-ai model for ``provider:model``, with its key passed explicitly."""
    provider, name = _split_model(spec)
    try:
        if provider in _OPENAI_PROVIDERS:
            if not (openai_api_key or "").strip():
                raise ConfigurationError(f"the starter agent needs OPENAI_API_KEY for {spec!r}")
            from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
            from pydantic_ai.providers.openai import OpenAIProvider

            model_class = OpenAIChatModel if provider == "openai-chat" else OpenAIResponsesModel
            return model_class(
                name, provider=OpenAIProvider(api_key=openai_api_key, base_url=base_url)
            )
        if provider in _GOOGLE_PROVIDERS:
            if not (google_api_key or "").strip():
                raise ConfigurationError(
                    f"the starter agent needs GOOGLE_GENERATIVEAI_API_KEY for {spec!r}"
                )
            from pydantic_ai.models.google import GoogleModel
            from pydantic_ai.providers.google import GoogleProvider

            return GoogleModel(name, provider=GoogleProvider(api_key=google_api_key))
        from pydantic_ai.models import infer_model

        return infer_model(f"{provider}:{name}")
    except ConfigurationError:
        raise
    except Exception as exc:  # pydantic-ai's UserError: unknown provider, a missing key
        if isinstance(exc, ImportError) and provider in _OPENAI_PROVIDERS + _GOOGLE_PROVIDERS:
            raise ConfigurationError(  # in our extra
                f"the starter agent needs pydantic-ai's {provider!r} models: {_PYDANTIC_AI_EXTRA}"
            ) from None
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigurationError(f"DEFAULT_MODEL {spec!r}: {first_line}") from None


def starter_agent(
    *,
    model: str = "openai:gpt-5-nano",
    system_prompt: str | None = STARTER_PROMPT,
    welcome: str | None = STARTER_WELCOME,
    openai_api_key: str | None = None,
    google_api_key: str | None = None,
    base_url: str | None = None,
) -> Agent:
    """A concise voice assistant on pydantic-ai (extra ``pydantic-ai``).

    Speaks ``welcome`` on ``session.start``, then answers each message briefly with the
    history as context, phrase by phrase as the model streams. ``model`` is pydantic-ai's
    ``provider:model`` (``openai:``, ``openai-chat:``, ``google-gla:``; other providers with
    their own environment keys). ``base_url`` (else ``OPENAI_BASE_URL``) points ``openai``
    models at any OpenAI-compatible API. Raises :class:`ConfigurationError` at once when
    pydantic-ai or the model's key is missing (a ``TypeError`` for an option of another
    type); a blank ``system_prompt`` is none. Each event loop gets its own model and HTTP
    client; ``agent.aclose()`` closes the running loop's.
    """
    system_prompt = _checked_options(
        model, system_prompt, base_url, openai_api_key=openai_api_key, google_api_key=google_api_key
    )
    try:
        import pydantic_ai
    except ImportError:
        raise ConfigurationError(
            f"the starter agent needs pydantic-ai: {_PYDANTIC_AI_EXTRA}"
        ) from None
    from .adapters import from_pydantic_ai
    from .adapters.voice import mask_key

    mask_key(openai_api_key)
    mask_key(google_api_key)

    # One model (its HTTP client) per event loop, as the openai agent's clients: pydantic-ai
    # shares its one between loops (two servers in threads), and one loop closes it.
    def build() -> tuple[Any, Agent]:
        llm = _pydantic_ai_model(model, openai_api_key, google_api_key, base_url)
        framework = pydantic_ai.Agent(llm, instructions=system_prompt, name="starter")
        return llm, from_pydantic_ai(framework, welcome=welcome)

    built: PerLoop[tuple[Any, Agent]] = PerLoop(build(), build)  # the first: errors at once

    def agent(event: TurnEvent, context: TurnContext) -> Any:  # this loop's run, as it is
        return built.get()[1](event, context)

    async def aclose() -> None:  # pydantic-ai closes its provider's client as a context exits
        taken = built.take()
        if taken is not None and hasattr(taken[0], "__aexit__"):
            async with taken[0]:
                pass

    agent.asyncio_only = True  # type: ignore[attr-defined]  # as the adapter's
    agent.__name__ = agent.__qualname__ = "starter_agent"
    agent.aclose = aclose  # type: ignore[attr-defined]
    agent.model = ":".join(_split_model(model))  # type: ignore[attr-defined]  # shown by /ready
    return agent


def starter_factory(settings: Settings | None) -> Agent:
    """a concise voice assistant on pydantic-ai (extra [pydantic-ai]; needs DEFAULT_MODEL's key)"""
    settings = Settings() if settings is None else settings
    return starter_agent(
        model=settings.default_model,
        system_prompt=configured_system_prompt(settings) or STARTER_PROMPT,
        openai_api_key=settings.openai_api_key,
        google_api_key=settings.google_generativeai_api_key,
        base_url=settings.openai_base_url,
    )
