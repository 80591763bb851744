"""``from_langchain(runnable)``: a LangChain runnable or LangGraph graph as a LayerCode agent.

Extra ``langchain``. A chat model or a chain taking a list of messages is streamed with
``astream`` (its message chunks, or strings from a chain ending in a string parser); a
LangGraph graph with a ``messages`` state (``create_agent``, ``create_react_agent``, your
own) is streamed with ``stream_mode="messages"``, and only the AI's text is spoken: tool
calls start the filler, tool results are not read out. A chat model's answer that ended
before its finish (the stream cut short: no ``finish_reason``, ``status`` or
``stop_reason`` in its ``response_metadata`` from an OpenAI, Anthropic or Google model)
fails the turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anyio

from .._asgi import must_propagate
from ..agents import Agent, TurnContext
from ..conversation import HistoryMessage, model_history
from ..errors import check_callable, check_text, check_type, kind_of
from ..turns import AGENT_CLOSE_TIMEOUT
from .voice import (
    DEFAULT_FILLER,
    Chunking,
    Filler,
    Piece,
    ToolCall,
    answer_error,
    log_stopped_retry,
    note_model,
    require_extra,
    require_object,
    voice_agent,
    warn_cut_short,
)

__all__ = ["from_langchain", "langchain_messages"]

_EXTRA = "langchain"


def langchain_messages(history: Sequence[HistoryMessage], prompt: str | None = None) -> list[Any]:
    """Our history (without empty or blank messages; then ``prompt`` as the user's turn) as
    LangChain messages."""
    messages = require_extra("langchain_core.messages", _EXTRA, "from_langchain")
    result: list[Any] = [
        messages.AIMessage(content=m.text)
        if m.role == "assistant"
        else messages.HumanMessage(content=m.text)
        for m in model_history(history)
    ]
    if prompt is not None:
        result.append(messages.HumanMessage(content=prompt))
    return result


def _is_graph(runnable: Any) -> bool:
    try:
        from langgraph.pregel import Pregel
    except ImportError:
        return False
    return isinstance(runnable, Pregel)


def _text(content: Any) -> str:
    """The text of a message's ``content``: a string, or its ``text`` and ``refusal`` blocks
    (a refusal is the answer, spoken rather than silence)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if isinstance(block, str):
                texts.append(block)
            elif isinstance(block, dict) and block.get("type") in ("text", "refusal"):
                texts.append(str(block.get(block["type"], "")))
        return "".join(texts)
    return ""


#: Where chat models report how their answer ended (``response_metadata``): OpenAI's chat
#: completions and Google, OpenAI's Responses API, Anthropic.
_FINISH_KEYS = ("finish_reason", "status", "stop_reason")
#: The ``model_provider`` of chat models that report it with every whole answer (so one
#: without it was cut short).
_REPORTING = frozenset({"openai", "anthropic", "google_genai", "google_vertexai"})
#: The reasons of an answer ended early (OpenAI's, Anthropic's, Google's).
_STOPPED_EARLY = frozenset({"length", "content_filter", "max_tokens", "MAX_TOKENS", "SAFETY"})


def _ends(result: Any) -> Iterator[tuple[bool, str | None]]:
    """For each answer of an ``LLMResult``: whether its stream was cut short (as far as its
    provider reports it), and why the model ended it early, if it did."""
    for generations in result.generations:
        for generation in generations:
            metadata = getattr(getattr(generation, "message", None), "response_metadata", None)
            if not isinstance(metadata, dict):
                continue
            reported = metadata.get("model_provider") in _REPORTING
            cut = reported and all(metadata.get(key) is None for key in _FINISH_KEYS)
            if metadata.get("status") == "incomplete":  # the Responses API, and why
                details = metadata.get("incomplete_details") or {}
                yield cut, str(details.get("reason") or "incomplete")
            else:
                reason = metadata.get("finish_reason") or metadata.get("stop_reason")
                yield cut, reason if reason in _STOPPED_EARLY else None


#: LangChain's ``ValueError`` for an empty answer (streamed, or invoked by a graph).
_NO_ANSWER = frozenset({"No generation chunks were returned", "No generations found in stream."})

_DONE = object()


async def _in_own_task(stream: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    """The items of ``stream``, iterated in an asyncio task of its own.

    anyio's cancellation repeats at every ``await``; LangGraph's clean-up of a cancelled
    stream awaits (its node tasks, the model request), so it needs asyncio's, delivered
    once: the task is cancelled once with the turn and given ``AGENT_CLOSE_TIMEOUT`` s.
    """
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue(1)

    async def pump() -> None:
        error: BaseException | None = None
        try:
            async for item in stream:
                await queue.put((item, None))
        except BaseException as exc:  # a CancelledError of the stream's own: a failure too
            if must_propagate(exc):
                raise
            error = exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except BaseException as exc:  # still tell the turn the stream is over
                    if must_propagate(exc):
                        raise
                    error = error or exc
        await queue.put((_DONE, error))

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        if not task.done():
            task.cancel()
            with anyio.move_on_after(AGENT_CLOSE_TIMEOUT, shield=True):
                await asyncio.wait([task])


#: The RunnableConfig values the adapter merges its own into: another type fails each turn.
_CONFIG_TYPES: dict[str, tuple[Any, str]] = {
    "tags": (list | None, "a list of str"),
    "metadata": (Mapping | None, "a mapping"),
    "configurable": (Mapping | None, "a mapping"),
}


def _check_config(config: Mapping[str, Any]) -> None:
    """Refuse (``TypeError``) a value of ``config`` that would fail every turn."""
    for key, (kind, expected) in _CONFIG_TYPES.items():
        check_type(f"config's {key}", config.get(key), kind, expected)
    callbacks = config.get("callbacks")
    if not (callbacks is None or isinstance(callbacks, list) or hasattr(callbacks, "add_handler")):
        expected = "a list of handlers, a callback manager or None"
        raise TypeError(f"config's callbacks must be {expected}, got {kind_of(callbacks)}")


def from_langchain(
    runnable: Any,
    *,
    welcome: str | None = None,
    filler: Filler = DEFAULT_FILLER,
    chunking: Chunking = "phrase",
    system_prompt: str | None = None,
    make_input: Callable[[list[Any]], Any] | None = None,
    config: Callable[[TurnContext], Any] | Any = None,
) -> Agent:
    """Our agent (``agent(event, context)``) streaming the LangChain ``runnable``.

    Args:
        runnable: a chat model, a chain taking messages, or a LangGraph graph whose state
            has ``messages``.
        welcome: spoken on ``session.start`` without calling the model; ``None`` asks the
            model to greet.
        filler: spoken once per turn when a tool is called (see :mod:`.voice`).
        chunking: ``"phrase"`` (speak whole phrases) or ``"delta"`` (pass deltas through).
        system_prompt: put first, as a ``SystemMessage`` (leave it ``None``, or blank, when
            the runnable has its own).
        make_input: ``make_input(messages)`` builds the runnable's input from the
            conversation as LangChain messages (default: the list itself, or
            ``{"messages": [...]}`` for a graph).
        config: the ``RunnableConfig`` for every turn, or ``config(context)`` making one.
    """
    messages = require_extra("langchain_core.messages", _EXTRA, "from_langchain")
    astream = callable(getattr(runnable, "astream", None))
    require_object("from_langchain", runnable, "a LangChain runnable or graph (astream)", astream)
    check_text("system_prompt", system_prompt)
    if system_prompt is not None and not system_prompt.strip():
        system_prompt = None  # blank: no system message
    check_callable("make_input", make_input, sync=True)
    if callable(config):
        check_callable("config", config, sync=True)
    else:
        expected = "a RunnableConfig (a dict), a function making one, or None"
        check_type("config", config, Mapping | None, expected)
        _check_config(config or {})
    graph = _is_graph(runnable)
    base: Any = require_extra("langchain_core.callbacks", _EXTRA, "from_langchain")
    merge_configs = require_extra(
        "langchain_core.runnables.config", _EXTRA, "from_langchain"
    ).merge_configs

    class FinishWatch(base.BaseCallbackHandler):  # type: ignore[misc]
        """Notes the turn's model and an answer cut short or ended early."""

        run_inline = True

        def __init__(self) -> None:
            self.cut = False
            self.model: str | None = None

        def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
            self.on_llm_start(serialized, messages, **kwargs)

        def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
            model = (kwargs.get("metadata") or {}).get("ls_model_name")
            self.model = model if isinstance(model, str) else None
            note_model(self.model)

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            log_stopped_retry(error, self.model)  # stopped while waiting to retry a refusal?

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            for cut, reason in _ends(response):
                self.cut = self.cut or cut
                if reason:
                    warn_cut_short(reason, self.model)  # logged once, as the turn ends

    async def run(prompt: str, context: TurnContext) -> AsyncGenerator[Piece, None]:
        conversation = langchain_messages(context.history, prompt)
        if system_prompt is not None:
            conversation.insert(0, messages.SystemMessage(content=system_prompt))
        value = {"messages": conversation} if graph else conversation
        if make_input is not None:
            value = make_input(conversation)
        watch = FinishWatch()
        run_config = config(context) if callable(config) else config
        run_config = merge_configs(run_config, {"callbacks": [watch]})
        mode = {"stream_mode": "messages"} if graph else {}
        stream = runnable.astream(value, run_config, **mode)
        try:  # closed with us, at a yield too: the model request ends with the turn
            async with aclosing(_in_own_task(stream)) as items:
                async for item in items:
                    chunk = item[0] if graph and isinstance(item, tuple) else item
                    if isinstance(chunk, str):
                        yield chunk
                        continue
                    if isinstance(chunk, messages.ToolMessage):
                        yield ""  # a tool finished: what it sent goes out now (never read out)
                        continue
                    if not isinstance(chunk, messages.AIMessageChunk | messages.AIMessage):
                        continue  # the user's own message echoed by a graph, …
                    text = _text(chunk.content)
                    if text:
                        yield text
                    for call in getattr(chunk, "tool_call_chunks", None) or chunk.tool_calls:
                        if call.get("name"):
                            yield ToolCall(str(call["name"]))
        except ValueError as exc:  # other failures: speak() names the model noted
            if str(exc) not in _NO_ANSWER:  # else no HTTP error: an empty answer
                raise
            raise answer_error(f"held no text (LangChain: {exc})", watch.model) from None
        if watch.cut:
            raise answer_error("ended before its finish", watch.model)

    name = getattr(runnable, "name", None) or type(runnable).__name__
    return voice_agent(run, name=str(name), welcome=welcome, chunking=chunking, filler=filler)
