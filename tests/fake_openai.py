"""A fake OpenAI-compatible API on 127.0.0.1: chat completions and Responses, streamed over SSE.

Every agent and adapter under test reaches it through ``OPENAI_BASE_URL``. Each request
takes the next :class:`Script` (or the default answer when none is queued) and streams it:
text deltas, optionally a tool call, optionally a failure part-way. The fake records every
request, and tells the tests what happened with thread-safe flags (it runs in uvicorn's
thread, the tests in theirs): ``held`` (a stream waits before its last delta),
``last_delta_sent``, ``closed_early`` (the client closed a stream before its end).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import pytest
import uvicorn

from .asgi_stub import read_body
from .conftest import serve

DEFAULT_TEXT = ("Hello", " there.", " How can", " I help", " you today?")
#: The pause between two chunks of a stream (so they arrive separately; nothing is timed).
PAUSE = 0.005
#: How long a held stream waits for :meth:`FakeOpenAI.release` (a bound, not a timing).
HOLD_LIMIT = 10.0


@dataclass
class Script:
    """What the fake model answers to one request.

    Attributes:
        text: the text deltas, streamed one by one.
        tool_call: ``(name, JSON arguments)``: after the text, call this tool.
        fail_after: break the connection after this many deltas (a model failing mid-stream).
        hold: wait for :meth:`FakeOpenAI.release` before the last delta.
        filter_annotations: chat completions only: after the text, a chunk whose choice
            has no ``delta`` (what Azure OpenAI's asynchronous content filter sends).
        status: answer this HTTP status instead, with ``body`` (JSON) and ``headers``
            (a provider refusing: 401, 429 with ``Retry-After``, 5xx).
        raw: send these body chunks as they are (200, ``text/event-stream``) instead of a
            stream made from ``text``: malformed SSE, non-UTF-8 bytes, a stream cut short.
        garbage: sent as it is after the first delta (the stream then goes on): a malformed
            event, bytes that are not UTF-8.
        cut: end the body after the text deltas, without the finish (a stream cut short).
        stop: the model stops early for this reason (``length``: max tokens hit, or
            ``content_filter``): chat completions' ``finish_reason``; the Responses API
            ends with ``response.incomplete`` (``max_output_tokens``, ``content_filter``).
        delay: wait this long (in the fake's thread) before answering at all.
        pause: the pause between two chunks of the stream (a model trickling).
    """

    text: Sequence[str] = DEFAULT_TEXT
    tool_call: tuple[str, str] | None = None
    fail_after: int | None = None
    hold: bool = False
    filter_annotations: bool = False
    status: int | None = None
    body: Any = None
    headers: Sequence[tuple[str, str]] = ()
    raw: Sequence[bytes] | None = None
    garbage: bytes | None = None
    cut: bool = False
    stop: str | None = None
    delay: float = 0.0
    pause: float = PAUSE


class ModelFailure(Exception):
    """Raised inside the fake's stream: uvicorn drops the connection mid-body."""


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + msgspec.json.encode(data) + b"\n\n"


class FakeOpenAI:
    """The ASGI app of the fake API; see the module docstring."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.scripts: deque[Script] = deque()
        self.held = threading.Event()
        self.released = threading.Event()
        self.last_delta_sent = threading.Event()
        self.closed_early = threading.Event()
        self._ids = itertools.count(1)
        self.servers: list[uvicorn.Server] = []

    def connections(self) -> int:
        """The connections the fake's server holds open (its clients' pooled ones too)."""
        return sum(len(server.server_state.connections) for server in self.servers)

    # -- what tests use --------------------------------------------------------------------

    def push(self, *scripts: Script) -> None:
        """Queue answers for the next requests, in order."""
        self.scripts.extend(scripts)

    def release(self) -> None:
        """Let a held stream send its last delta."""
        self.released.set()

    def conversation(self, index: int = -1) -> list[tuple[str, str]]:
        """Request ``index``'s user/assistant messages as ``(role, text)``, either API."""
        body = self.requests[index]["body"]
        items = body.get("messages") or body.get("input") or []
        if isinstance(items, str):
            return [("user", items)]
        pairs = []
        for item in items:
            role = item.get("role")
            if role not in ("user", "assistant"):
                continue
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content)
            if content:
                pairs.append((role, content))
        return pairs

    def tool_outputs(self, index: int = -1) -> list[str]:
        """The tool results sent back to the model in request ``index``, either API."""
        body = self.requests[index]["body"]
        outputs = []
        for item in body.get("messages") or body.get("input") or []:
            if not isinstance(item, dict):
                continue
            if item.get("role") == "tool":
                outputs.append(str(item.get("content")))
            elif item.get("type") == "function_call_output":
                outputs.append(str(item.get("output")))
        return outputs

    def instructions(self, index: int = -1) -> str:
        """The system prompt of request ``index`` (system/developer messages or instructions)."""
        body = self.requests[index]["body"]
        texts = [body.get("instructions") or ""]
        items = body.get("messages") or body.get("input") or []
        for item in items if isinstance(items, list) else ():
            if item.get("role") in ("system", "developer"):
                content = item.get("content")
                if isinstance(content, list):
                    content = "".join(part.get("text", "") for part in content)
                texts.append(str(content))
        return "\n".join(text for text in texts if text)

    # -- the ASGI app ----------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = await read_body(receive)
        path = scope["path"].removeprefix("/v1")
        if scope["method"] != "POST" or path not in ("/chat/completions", "/responses"):
            await self._json(send, 404, {"error": {"message": f"no route {path}"}})
            return
        request = msgspec.json.decode(body)
        self.requests.append({"path": path, "body": request})
        script = self.scripts.popleft() if self.scripts else Script()
        chat = path == "/chat/completions"
        if script.delay:
            await anyio.sleep(script.delay)
        if script.status is not None:
            headers = [(name.encode(), value.encode()) for name, value in script.headers]
            await self._json(send, script.status, script.body, headers)
            return
        if not request.get("stream") and script.raw is None:
            await self._json(send, 200, self._complete(request, script, chat))
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        if script.raw is not None:
            events: Iterator[tuple[str, bytes]] = (("raw", chunk) for chunk in script.raw)
        elif chat:
            events = self._chat_stream(request, script)
        else:
            events = self._responses_stream(request, script)
        finished = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not finished:
                    self.closed_early.set()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            async for chunk in self._paced(events, script):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            group.cancel_scope.cancel()

    async def _json(
        self, send: Any, status: int, data: Any, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        payload = msgspec.json.encode(data)
        headers = [(b"content-type", b"application/json"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _paced(
        self, events: Iterator[tuple[str, bytes]], script: Script
    ) -> AsyncIterator[bytes]:
        """Yield the stream's chunks, pausing between deltas; hold or fail as scripted."""
        sent = 0
        deltas = len(script.text)
        for kind, chunk in events:
            if script.cut and kind in ("end", "tool"):
                return
            if kind == "delta":
                if script.fail_after is not None and sent >= script.fail_after:
                    raise ModelFailure("the fake model fails mid-stream")
                if script.hold and sent == deltas - 1:
                    self.held.set()
                    await anyio.to_thread.run_sync(
                        self.released.wait, HOLD_LIMIT, abandon_on_cancel=True
                    )
                sent += 1
                if sent == deltas:
                    self.last_delta_sent.set()
            yield chunk
            if kind == "delta" and sent == 1 and script.garbage is not None:
                yield script.garbage
            await anyio.sleep(script.pause)  # the model "thinks" between deltas

    # -- chat completions --------------------------------------------------------------------

    def _chat_stream(self, request: dict[str, Any], script: Script) -> Iterator[tuple[str, bytes]]:
        cid = f"chatcmpl-{next(self._ids)}"
        model = request.get("model", "fake")

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
            return _sse(data)

        yield "start", chunk({"role": "assistant", "content": ""})
        for piece in script.text:
            yield "delta", chunk({"content": piece})
        if script.filter_annotations:
            results = {"hate": {"filtered": False, "severity": "safe"}}
            offsets = {"check_offset": 0, "start_offset": 0, "end_offset": 10}
            choice = {"index": 0, "finish_reason": None, "content_filter_results": results}
            annotation = {"id": "", "object": "", "created": 0, "model": "", "choices": []}
            yield (
                "end",
                _sse({**annotation, "choices": [{**choice, "content_filter_offsets": offsets}]}),
            )
        finish = script.stop or "stop"
        if script.tool_call is not None:
            name, arguments = script.tool_call
            call = {"index": 0, "id": f"call_{next(self._ids)}", "type": "function"}
            yield (
                "tool",
                chunk({"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]}),
            )
            yield (
                "tool",
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
            )
            finish = "tool_calls"
        yield "end", chunk({}, finish)
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield "end", _sse(data)
        yield "end", b"data: [DONE]\n\n"

    # -- Responses ---------------------------------------------------------------------------

    def _responses_stream(
        self, request: dict[str, Any], script: Script
    ) -> Iterator[tuple[str, bytes]]:
        rid = f"resp_{next(self._ids)}"
        numbers = itertools.count()
        output: list[dict[str, Any]] = []

        def response(status: str) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "model": request.get("model", "fake"),
                "status": status,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": 10,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 5,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 15,
                },
            }

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(numbers), **fields}, kind)

        yield "start", event("response.created", response=response("in_progress"))
        status = "incomplete" if script.stop else "completed"
        if script.text:
            item_id = f"msg_{next(self._ids)}"
            index = len(output)
            item = {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress"}
            yield (
                "start",
                event(
                    "response.output_item.added", output_index=index, item={**item, "content": []}
                ),
            )
            part = {"type": "output_text", "text": "", "annotations": []}
            where = {"item_id": item_id, "output_index": index, "content_index": 0}
            yield "start", event("response.content_part.added", **where, part=part)
            for piece in script.text:
                yield (
                    "delta",
                    event("response.output_text.delta", **where, delta=piece, logprobs=[]),
                )
            text = "".join(script.text)
            yield "end", event("response.output_text.done", **where, text=text, logprobs=[])
            done_part = {**part, "text": text}
            yield "end", event("response.content_part.done", **where, part=done_part)
            done = {**item, "status": status, "content": [done_part]}
            output.append(done)
            yield "end", event("response.output_item.done", output_index=index, item=done)
        if script.tool_call is not None:
            name, arguments = script.tool_call
            item_id = f"fc_{next(self._ids)}"
            index = len(output)
            call = {
                "type": "function_call",
                "id": item_id,
                "call_id": f"call_{next(self._ids)}",
                "name": name,
                "arguments": "",
                "status": "in_progress",
            }
            yield "tool", event("response.output_item.added", output_index=index, item=call)
            where = {"item_id": item_id, "output_index": index}
            yield "tool", event("response.function_call_arguments.delta", **where, delta=arguments)
            yield (
                "tool",
                event(
                    "response.function_call_arguments.done", **where, arguments=arguments, name=name
                ),
            )
            done = {**call, "arguments": arguments, "status": "completed"}
            output.append(done)
            yield "tool", event("response.output_item.done", output_index=index, item=done)
        if script.stop:
            reason = {"length": "max_output_tokens"}.get(script.stop, script.stop)
            ended = {**response(status), "incomplete_details": {"reason": reason}}
            yield "end", event("response.incomplete", response=ended)
        else:
            yield "end", event("response.completed", response=response(status))

    # -- non-streaming answers (for frameworks that ask without stream=True) ---------------

    def _complete(self, request: dict[str, Any], script: Script, chat: bool) -> dict[str, Any]:
        text = "".join(script.text)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if script.tool_call is not None:
                name, arguments = script.tool_call
                function = {"name": name, "arguments": arguments}
                message["tool_calls"] = [{"id": "call_1", "type": "function", "function": function}]
            return {
                "id": f"chatcmpl-{next(self._ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model", "fake"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        raise ModelFailure("the fake Responses API only streams")


@contextmanager
def fake_openai() -> Iterator[tuple[FakeOpenAI, str]]:
    """Serve a new :class:`FakeOpenAI` on 127.0.0.1; yield it and its base URL (``…/v1``)."""
    fake = FakeOpenAI()
    with serve(fake, servers=fake.servers) as url:
        yield fake, url + "/v1"


@contextmanager
def fake_openai_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """:func:`fake_openai` with ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` pointing at it."""
    with fake_openai() as (fake, base_url):
        monkeypatch.setenv("OPENAI_BASE_URL", base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        yield fake
