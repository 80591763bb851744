"""``from_pydantic_ai(agent)``: a pydantic-ai ``Agent`` as a LayerCode agent.

Extra ``pydantic-ai``. The run goes through ``agent.iter`` and streams every node: each
model request's text deltas are spoken as they arrive, and a run that calls tools goes on
to the model's next answer (``run_stream`` would stop at the first text it could return).
A model answer whose stream was cut short (no ``finish_reason`` in the provider's details)
fails the turn; a refusal is spoken, as the answer; one the model ended early (``length``
or ``content_filter``) is spoken and logged as a warning.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

from ..agents import Agent, TurnContext
from ..conversation import HistoryMessage, model_history
from ..errors import check_callable, check_type, kind_of
from .voice import (
    DEFAULT_FILLER,
    Chunking,
    Filler,
    Piece,
    ToolCall,
    answer_error,
    note_model,
    require_extra,
    require_object,
    voice_agent,
    warn_cut_short,
)

__all__ = ["from_pydantic_ai", "pydantic_ai_history"]

_EXTRA = "pydantic-ai"


def pydantic_ai_history(history: Sequence[HistoryMessage]) -> list[Any]:
    """Our history as pydantic-ai messages (``ModelRequest`` / ``ModelResponse``), without
    empty or blank messages."""
    messages = require_extra("pydantic_ai.messages", _EXTRA, "from_pydantic_ai")
    return [
        messages.ModelResponse(parts=[messages.TextPart(content=m.text)])
        if m.role == "assistant"
        else messages.ModelRequest(parts=[messages.UserPromptPart(content=m.text)])
        for m in model_history(history)
    ]


#: What the adapter passes to ``agent.iter`` itself, each turn.
_OWN_OPTIONS = ("user_prompt", "message_history")


def _check_run_options(agent: Any, run_options: dict[str, Any]) -> None:
    """Refuse (``TypeError``) a run option that would fail every turn: one ``agent.iter``
    cannot take, one the adapter passes itself, or one of a type it cannot use."""
    for name in run_options:
        if name in _OWN_OPTIONS:
            raise TypeError(f"from_pydantic_ai: {name} is passed by the adapter on each turn")
    try:
        parameters = list(inspect.signature(agent.iter).parameters.values())
    except (TypeError, ValueError):  # no signature to check against
        parameters = None
    if parameters is not None and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        known = {p.name for p in parameters if p.kind is not p.POSITIONAL_ONLY}
        for name in run_options:
            if name not in known:
                raise TypeError(
                    f"from_pydantic_ai: {name} is not an option of {kind_of(agent)}.iter"
                )
    usage: Any = require_extra("pydantic_ai.usage", _EXTRA, "from_pydantic_ai")
    for name in ("capabilities", "toolsets"):
        value = run_options.get(name)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence | None):
            expected = "a sequence (a list) or None"
            raise TypeError(f"from_pydantic_ai: {name} must be {expected}, got {kind_of(value)}")
    settings = run_options.get("model_settings")
    if not callable(settings):
        expected = "a mapping (ModelSettings), a function or None"
        check_type("from_pydantic_ai: model_settings", settings, Mapping | None, expected)
    limits = run_options.get("usage_limits")
    expected = "a pydantic_ai.usage.UsageLimits or None"
    check_type("from_pydantic_ai: usage_limits", limits, usage.UsageLimits | None, expected)


def from_pydantic_ai(
    agent: Any,
    *,
    welcome: str | None = None,
    filler: Filler = DEFAULT_FILLER,
    chunking: Chunking = "phrase",
    deps: Callable[[TurnContext], Any] | None = None,
    **run_options: Any,
) -> Agent:
    """Our agent (``agent(event, context)``) running the pydantic-ai ``agent``.

    Args:
        agent: a ``pydantic_ai.Agent`` (its model, instructions and tools as you made it).
        welcome: spoken on ``session.start`` without calling the model; ``None`` asks the
            model to greet.
        filler: spoken once per turn when a tool is called (see :mod:`.voice`).
        chunking: ``"phrase"`` (speak whole phrases) or ``"delta"`` (pass deltas through).
        deps: ``deps(context)`` builds the run's ``deps`` for each turn.
        run_options: passed to ``agent.iter`` (``model=``, ``model_settings=``, …).

    ``context.history`` becomes the run's ``message_history``. pydantic-ai sends the agent's
    ``system_prompt`` only with no history (one it wrote would hold the prompt; ours does
    not), so each run gets its ``ReinjectSystemPrompt`` capability: every request has it.
    """
    pydantic_ai = require_extra("pydantic_ai", _EXTRA, "from_pydantic_ai")
    messages = require_extra("pydantic_ai.messages", _EXTRA, "from_pydantic_ai")
    framework_agent: Any = pydantic_ai.Agent
    runs = callable(getattr(agent, "iter", None))
    require_object("from_pydantic_ai", agent, "a pydantic_ai.Agent", runs)
    check_callable("deps", deps, sync=True)
    _check_run_options(agent, run_options)
    try:  # an older pydantic-ai has none: only ``instructions`` reach every request
        reinject: Any = importlib.import_module("pydantic_ai.capabilities").ReinjectSystemPrompt
    except (ImportError, AttributeError):
        reinject = None
    model = run_options.get("model") or getattr(agent, "model", None)
    if isinstance(model, str):  # "openai:gpt-x"
        model_name: str | None = model.partition(":")[2] or model
    else:  # a pydantic-ai Model, or None
        model_name = getattr(model, "model_name", None)

    async def run(prompt: str, context: TurnContext) -> AsyncGenerator[Piece, None]:
        note_model(model_name)
        options = dict(run_options)
        if deps is not None:
            options["deps"] = deps(context)
        if reinject is not None:
            options["capabilities"] = [*(options.get("capabilities") or ()), reinject()]
        history = pydantic_ai_history(context.history)
        async with agent.iter(prompt, message_history=history, **options) as agent_run:
            async for node in agent_run:
                if framework_agent.is_model_request_node(node):
                    async with node.stream(agent_run.ctx) as events:
                        async for event in events:
                            if isinstance(event, messages.PartStartEvent) and isinstance(
                                event.part, messages.TextPart
                            ):
                                yield event.part.content
                            elif isinstance(event, messages.PartDeltaEvent) and isinstance(
                                event.delta, messages.TextPartDelta
                            ):
                                yield event.delta.content_delta
                        response = events.response
                        details = response.provider_details or {}
                        if response.finish_reason == "content_filter":
                            refusal = details.get("refusal")
                            if isinstance(refusal, str) and refusal.strip():
                                yield refusal  # the answer (pydantic-ai would raise)
                                return
                        elif details and "finish_reason" not in details:
                            raise answer_error("ended before its finish", response.model_name)
                        if response.finish_reason in ("length", "content_filter"):
                            reason = details.get("finish_reason") or response.finish_reason
                            warn_cut_short(str(reason), response.model_name)
                elif framework_agent.is_call_tools_node(node):
                    async with node.stream(agent_run.ctx) as events:
                        async for event in events:
                            if isinstance(event, messages.FunctionToolCallEvent):
                                yield ToolCall(event.part.tool_name)
                            elif isinstance(event, messages.FunctionToolResultEvent):
                                yield ""  # a tool finished: what it sent goes out now

    name = getattr(agent, "name", None) or "pydantic_ai_agent"
    return voice_agent(run, name=name, welcome=welcome, chunking=chunking, filler=filler)
