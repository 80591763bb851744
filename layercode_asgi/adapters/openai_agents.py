"""``from_openai_agents(agent)``: an OpenAI Agents SDK agent as a LayerCode agent.

Extra ``openai-agents``. Each turn is a ``Runner.run_streamed`` run; the raw Responses
text deltas (and a refusal's) are spoken, a ``tool_called`` item starts the filler. An
answer the model ended early (``response.incomplete``) fails the run (the SDK's check),
logged as ``the model's answer was cut short: REASON (model=…)``. The SDK's trace export
is off unless ``tracing=True`` or your own ``run_config``. A disconnect cancels the run
(in the SDK's own task); the turn's end waits up to ``AGENT_CLOSE_TIMEOUT`` s for it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import suppress
from typing import Any

import anyio

from ..agents import Agent, TurnContext
from ..conversation import HistoryMessage, model_history
from ..errors import check_callable, check_positive_int, check_type
from ..turns import AGENT_CLOSE_TIMEOUT
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
)

__all__ = ["from_openai_agents", "openai_agents_input"]

_EXTRA = "openai-agents"
#: The raw Responses events whose deltas are spoken: the answer's text, or a refusal.
_SPOKEN = ("response.output_text.delta", "response.refusal.delta")


def openai_agents_input(history: Sequence[HistoryMessage], prompt: str) -> list[dict[str, str]]:
    """Our history (without empty or blank messages), then ``prompt``, as the SDK's input
    items (``{"role", "content"}``)."""
    items = [{"role": m.role, "content": m.text} for m in model_history(history)]
    items.append({"role": "user", "content": prompt})
    return items


def _tool_name(item: Any) -> str:
    raw = getattr(item, "raw_item", None)
    name = raw.get("name") if isinstance(raw, dict) else getattr(raw, "name", None)
    return str(name or "tool")


def _model_name(result: Any, config: Any, models: Any) -> str | None:
    """The name of the model the run asks: the run's, else the agent's, else the default."""
    model = getattr(config, "model", None) or getattr(result.current_agent, "model", None)
    if model is None:
        return str(models.get_default_model())
    model = model if isinstance(model, str) else getattr(model, "model", None)
    return None if model is None else str(model)


def from_openai_agents(
    agent: Any,
    *,
    welcome: str | None = None,
    filler: Filler = DEFAULT_FILLER,
    chunking: Chunking = "phrase",
    tracing: bool = False,
    run_config: Any = None,
    context: Callable[[TurnContext], Any] | None = None,
    max_turns: int = 10,
) -> Agent:
    """Our agent (``agent(event, context)``) running the Agents SDK ``agent``.

    Args:
        agent: an ``agents.Agent``.
        welcome: spoken on ``session.start`` without calling the model; ``None`` asks the
            model to greet.
        filler: spoken once per turn when a tool is called (see :mod:`.voice`).
        chunking: ``"phrase"`` (speak whole phrases) or ``"delta"`` (pass deltas through).
        tracing: export the SDK's traces (off by default; ignored with ``run_config``).
        run_config: an ``agents.RunConfig`` for every run (then it decides on tracing).
        context: ``context(turn_context)`` builds the SDK's run context for each turn.
        max_turns: the SDK's limit of model calls per run.
    """
    sdk = require_extra("agents", _EXTRA, "from_openai_agents")
    models = require_extra("agents.models", _EXTRA, "from_openai_agents")
    require_object("from_openai_agents", agent, "an agents.Agent", isinstance(agent, sdk.Agent))
    check_type("run_config", run_config, sdk.RunConfig | None, "an agents.RunConfig or None")
    check_callable("context", context, sync=True)
    check_positive_int(max_turns, "max_turns")
    check_type("tracing", tracing, bool, "True or False")
    config = run_config if run_config is not None else sdk.RunConfig(tracing_disabled=not tracing)
    # the SDK fails a refusal once it is streamed: the refusal, spoken, is the answer
    refusal_error: Any = getattr(sdk, "ModelRefusalError", ())

    async def run(prompt: str, turn: TurnContext) -> AsyncGenerator[Piece, None]:
        result = sdk.Runner.run_streamed(
            agent,
            openai_agents_input(turn.history, prompt),
            context=None if context is None else context(turn),
            max_turns=max_turns,
            run_config=config,
        )
        events = result.stream_events()
        refused = ended = False
        stopped = None  # why the model ended its answer early (the SDK then fails the run)
        try:
            async for event in events:
                if event.type == "raw_response_event":
                    kind = getattr(event.data, "type", None)
                    if kind in _SPOKEN:
                        refused = refused or kind == "response.refusal.delta"
                        yield event.data.delta
                    elif kind == "response.incomplete":
                        details = getattr(event.data.response, "incomplete_details", None)
                        stopped = getattr(details, "reason", None) or "incomplete"
                elif event.type == "run_item_stream_event" and event.name == "tool_called":
                    yield ToolCall(_tool_name(event.item))
                elif event.type == "run_item_stream_event" and event.name == "tool_output":
                    yield ""  # a tool finished: what it sent goes out now
            ended = True
        except Exception as exc:
            if refused and isinstance(exc, refusal_error):
                return
            if stopped is not None:  # named as the other agents' warning names it
                raise answer_error(
                    f"was cut short: {stopped}", _model_name(result, config, models)
                ) from None
            raise
        finally:
            note_model(_model_name(result, config, models))  # named by speak()'s failures
            result.cancel()
            if not ended:  # as the SDK asks, events are consumed after cancel(), so the
                # model stream ends with the turn; what that raises is no news
                with anyio.move_on_after(AGENT_CLOSE_TIMEOUT, shield=True), suppress(Exception):
                    await events.aclose()
                    async for _ in result.stream_events():
                        pass

    name = getattr(agent, "name", None) or "openai_agents_agent"
    return voice_agent(run, name=str(name), welcome=welcome, chunking=chunking, filler=filler)
