"""LayerCode turns: agents as plain async callables, answered as SSE in every stack."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse, connect_sse
from litestar import Litestar, post
from litestar import Request as LRequest
from litestar.types import ASGIApp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import (
    Data,
    Hangup,
    HistoryMessage,
    LayercodeSignature,
    LayercodeWebhook,
    MessagePayload,
    Tts,
    Turn,
    TurnContext,
    TurnStream,
    echo_agent,
    parse_webhook_payload,
    stream_response,
    stream_turn,
)

from .agents_for_tests import cancelled_elsewhere
from .conftest import (
    BACKENDS,
    NEEDS_TRIO,
    SECRET,
    event_body,
    serve,
    serve_hypercorn,
    signed_headers,
)

END = {"type": "response.end", "turn_id": "turn-1"}


def tts(text: str) -> dict[str, Any]:
    return {"type": "response.tts", "content": text, "turn_id": "turn-1"}


ERROR = {"type": "response.error", "error": "agent error", "turn_id": "turn-1"}


async def read_events(app: Any, body: bytes, path: str = "/api/agent") -> list[dict[str, Any]]:
    """POST ``body`` to ``app`` in-process and parse the reply with httpx-sse."""
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        aconnect_sse(client, "POST", path, content=body, headers=signed_headers(body)) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers["content-type"] == "text/event-stream"
        assert source.response.headers["cache-control"] == "no-cache, no-transform"
        assert source.response.headers["x-accel-buffering"] == "no"
        events = []
        async for sse in source.aiter_sse():
            assert sse.event == "message"  # no event: line
            events.append(msgspec.json.decode(sse.data))
    return events


def webhook_app(agent: Any, **options: Any) -> Any:
    """The raw ASGI form: LayercodeWebhook behind the signature middleware."""
    return LayercodeSignature(LayercodeWebhook(agent, **options), secret=SECRET)


async def hello(event: Any) -> AsyncIterator[str]:
    yield "Hello"


# -- the smallest agent, in each of the four stacks ----------------------------------------------


def starlette_stack(agent: Any) -> Any:
    async def route(request: Request) -> Response:
        event = parse_webhook_payload(await request.body())
        assert event.type in ("message", "session.start")
        return stream_turn(event, agent)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET)
    return app


def fastapi_stack(agent: Any) -> Any:
    webhook = LayercodeWebhook(agent)
    app = FastAPI()

    @app.post("/api/agent")
    async def route(request: Request) -> Response:
        return await webhook.respond(await request.body())

    app.add_middleware(LayercodeSignature, secret=SECRET)
    return app


def litestar_stack(agent: Any) -> Any:
    from litestar.middleware import DefineMiddleware

    webhook = LayercodeWebhook(agent)

    @post("/api/agent")
    async def route(request: LRequest[Any, Any, Any]) -> ASGIApp:
        return await webhook.respond(await request.body())

    return Litestar(
        route_handlers=[route], middleware=[DefineMiddleware(LayercodeSignature, secret=SECRET)]
    )


STACKS = {
    "starlette": starlette_stack,
    "fastapi": fastapi_stack,
    "litestar": litestar_stack,
    "raw_asgi": webhook_app,
}


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The turn and stream tests run on both of anyio's backends."""
    return str(request.param)


@pytest.mark.anyio
@pytest.mark.parametrize("stack", list(STACKS))
async def test_smallest_agent_in_every_stack(stack: str) -> None:
    events = await read_events(STACKS[stack](hello), event_body())
    assert events == [tts("Hello"), END]


@pytest.mark.anyio
async def test_wire_bytes_are_compact_json_with_turn_id() -> None:
    transport = httpx.ASGITransport(app=webhook_app(hello))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = event_body(turn_id="t-9")
        response = await client.post("/api/agent", content=body, headers=signed_headers(body))
    assert response.content == (
        b'data: {"type":"response.tts","content":"Hello","turn_id":"t-9"}\n\n'
        b'data: {"type":"response.end","turn_id":"t-9"}\n\n'
    )


@pytest.mark.anyio
async def test_session_start_is_a_turn_too() -> None:
    async def welcome(event: Any) -> AsyncIterator[str]:
        assert event.type == "session.start"
        yield "Welcome!"

    events = await read_events(webhook_app(welcome), event_body("session.start"))
    assert events == [tts("Welcome!"), END]


# -- replies: typed values, coroutines, multi-line and non-ASCII text ------------------------------


@pytest.mark.anyio
async def test_typed_replies() -> None:
    async def agent(event: Any) -> AsyncIterator[Any]:
        yield "one"
        yield Tts("two")
        yield ""  # nothing to say: skipped
        yield Data({"score": 3, "items": [1, "x", None]})
        yield Hangup()
        yield Hangup({"reason": "done"})

    events = await read_events(webhook_app(agent), event_body())
    assert events == [
        tts("one"),
        tts("two"),
        {
            "type": "response.data",
            "content": {"score": 3, "items": [1, "x", None]},
            "turn_id": "turn-1",
        },
        {"type": "response.hangup", "turn_id": "turn-1"},
        {"type": "response.hangup", "content": {"reason": "done"}, "turn_id": "turn-1"},
        END,
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("just text", [tts("just text"), END]),
        (None, [END]),
        (
            ["a", Data(1)],
            [tts("a"), {"type": "response.data", "content": 1, "turn_id": "turn-1"}, END],
        ),
        (Hangup(), [{"type": "response.hangup", "turn_id": "turn-1"}, END]),
    ],
)
async def test_coroutine_agents(returned: Any, expected: list[Any]) -> None:
    async def agent(event: Any) -> Any:
        return returned

    assert await read_events(webhook_app(agent), event_body()) == expected


@pytest.mark.anyio
async def test_multiline_and_non_ascii_text() -> None:
    text = "Hola, ¿qué tal?\nLine two\r\nthree 🎙️ 你好 \u2028 end"

    async def agent(event: Any) -> AsyncIterator[str]:
        yield text

    events = await read_events(webhook_app(agent), event_body(text="¿Sí? 🎤"))
    assert events == [tts(text), END]


@pytest.mark.anyio
async def test_echo_of_user_text() -> None:
    async def echo(event: Any) -> AsyncIterator[str]:
        yield f"You said: {event.text}"

    events = await read_events(webhook_app(echo), event_body(text="héllo\nworld"))
    assert events == [tts("You said: héllo\nworld"), END]


# -- the context: history and ids ----------------------------------------------------------------


class FakeHistory:
    """The smallest conversation backend: a dict and real anyio locks."""

    def __init__(self) -> None:
        self.messages: dict[str, list[HistoryMessage]] = {}
        self.locks: dict[str, anyio.Lock] = {}

    def lock(self, conversation_id: str, *, timeout: float | None = None) -> anyio.Lock:
        return self.locks.setdefault(conversation_id, anyio.Lock())

    async def get_history(self, conversation_id: str) -> list[HistoryMessage]:
        return list(self.messages.get(conversation_id, []))

    async def add_turn(
        self,
        conversation_id: str,
        user: str | None,
        reply: str | None,
        *,
        turn_id: str | None = None,
    ) -> None:
        box = self.messages.setdefault(conversation_id, [])
        if user:
            box.append(HistoryMessage(role="user", text=user, turn_id=turn_id))
        if reply:
            box.append(HistoryMessage(role="assistant", text=reply, turn_id=turn_id))

    async def clear(self, conversation_id: str) -> None:
        self.messages.pop(conversation_id, None)


@pytest.mark.anyio
async def test_context_carries_history_oldest_first() -> None:
    seen: list[list[tuple[str, str]]] = []

    async def agent(event: Any, context: TurnContext) -> AsyncIterator[str]:
        seen.append([(m.role, m.text) for m in context.history])
        assert context.conversation_id == "conv-1"
        assert context.turn_id == event.turn_id
        yield "Re: "
        yield str(event.text)

    history = FakeHistory()
    app = webhook_app(agent, conversations=history)
    await read_events(app, event_body(text="first", turn_id="turn-1"))
    await read_events(app, event_body(text="second", turn_id="turn-2"))
    assert seen == [
        [],
        [("user", "first"), ("assistant", "Re: first")],
    ]
    # session.end clears it
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = event_body("session.end")
        response = await client.post("/api/agent", content=body, headers=signed_headers(body))
    assert response.json() == {"status": "ok"}
    assert history.messages == {}


@pytest.mark.anyio
async def test_keyword_only_context_parameter() -> None:
    async def agent(event: Any, *, context: TurnContext) -> AsyncIterator[str]:
        yield f"{context.is_session_start}:{len(context.history)}"

    assert await read_events(webhook_app(agent), event_body()) == [tts("False:0"), END]


# -- failures: response.end exactly once, last -------------------------------------------


@pytest.mark.anyio
async def test_agent_raises_before_first_chunk(caplog: pytest.LogCaptureFixture) -> None:
    async def agent(event: Any) -> AsyncIterator[str]:
        raise RuntimeError("boom before")
        yield "never"

    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        events = await read_events(webhook_app(agent), event_body())
    assert events == [ERROR, END]
    record = next(r for r in caplog.records if "boom before" in r.getMessage())
    assert "conv-1" in record.getMessage() and "turn-1" in record.getMessage()
    assert record.conversation_id == "conv-1"  # type: ignore[attr-defined]
    assert record.turn_id == "turn-1"  # type: ignore[attr-defined]
    assert record.exc_info is not None


@pytest.mark.anyio
async def test_agent_raises_after_first_chunk() -> None:
    async def agent(event: Any) -> AsyncIterator[str]:
        yield "partial"
        raise ValueError("boom after")

    assert await read_events(webhook_app(agent), event_body()) == [tts("partial"), ERROR, END]


@pytest.mark.anyio
async def test_agent_error_whose_str_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Logging the agent's error called str() on it: an exception whose __str__ raised
    # ended the stream without response.error or response.end.
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    async def agent(event: Any) -> AsyncIterator[str]:
        yield "partial"
        raise Unprintable

    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        events = await read_events(webhook_app(agent), event_body())
    assert events == [tts("partial"), ERROR, END]
    assert "agent failed (conversation=conv-1 turn=turn-1): Unprintable: <unprintable" in (
        caplog.text
    )


@pytest.mark.anyio
async def test_error_text_never_leaks_exception_details() -> None:
    async def agent(event: Any) -> AsyncIterator[str]:
        raise RuntimeError("db password is hunter2")
        yield ""

    events = await read_events(webhook_app(agent), event_body())
    assert "hunter2" not in msgspec.json.encode(events).decode()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "agent",
    [
        pytest.param(lambda event: "not async", id="sync-function"),
    ],
)
async def test_agents_of_the_wrong_shape_fail_cleanly(agent: Callable[..., Any]) -> None:
    assert await read_events(webhook_app(agent), event_body()) == [ERROR, END]


@pytest.mark.anyio
async def test_unsupported_yield_value() -> None:
    async def agent(event: Any) -> AsyncIterator[Any]:
        yield "ok"
        yield 42

    assert await read_events(webhook_app(agent), event_body()) == [tts("ok"), ERROR, END]


@pytest.mark.anyio
async def test_non_serialisable_data() -> None:
    async def agent(event: Any) -> AsyncIterator[Any]:
        yield Data(object())

    assert await read_events(webhook_app(agent), event_body()) == [ERROR, END]


@pytest.mark.anyio
async def test_agent_that_yields_nothing() -> None:
    async def agent(event: Any) -> AsyncIterator[str]:
        if False:
            yield ""

    assert await read_events(webhook_app(agent), event_body()) == [END]


@pytest.mark.anyio
async def test_turn_timeout_without_and_with_fallback() -> None:
    async def slow(event: Any) -> AsyncIterator[str]:
        yield "thinking"
        await anyio.sleep(30)
        yield "never"

    started = time.monotonic()
    events = await read_events(webhook_app(slow, turn_timeout=0.3), event_body())
    assert time.monotonic() - started < 5
    assert events == [
        tts("thinking"),
        {"type": "response.error", "error": "turn timed out", "turn_id": "turn-1"},
        END,
    ]
    events = await read_events(
        webhook_app(slow, turn_timeout=0.3, timeout_message="Sorry, one moment."),
        event_body(),
    )
    assert events == [tts("thinking"), tts("Sorry, one moment."), END]


@pytest.mark.anyio
async def test_agent_that_never_yields_times_out() -> None:
    async def silent(event: Any) -> AsyncIterator[str]:
        await anyio.sleep_forever()
        yield ""

    events = await read_events(webhook_app(silent, turn_timeout=0.2), event_body())
    assert events == [
        {"type": "response.error", "error": "turn timed out", "turn_id": "turn-1"},
        END,
    ]


# -- Node-SDK style -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_node_style_stream() -> None:
    async def chunks() -> AsyncIterator[str]:
        for word in ("a", "b", "c"):
            yield word

    spoken: list[str] = []

    async def handler(stream: TurnStream) -> None:
        await stream.tts("Hi")
        await stream.data({"k": "v"})
        spoken.append(await stream.tts_stream(chunks()))
        await stream.hangup()
        await stream.end()
        await stream.end()  # idempotent
        assert stream.ended
        with pytest.raises(RuntimeError):
            await stream.tts("too late")

    async def route(request: Request) -> Response:
        event = parse_webhook_payload(await request.body())
        return stream_response(event, handler)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    events = await read_events(app, event_body())
    assert events == [
        tts("Hi"),
        {"type": "response.data", "content": {"k": "v"}, "turn_id": "turn-1"},
        tts("a"),
        tts("b"),
        tts("c"),
        {"type": "response.hangup", "turn_id": "turn-1"},
        END,
    ]
    assert spoken == ["abc"]


@pytest.mark.anyio
async def test_node_style_without_end_and_with_failure() -> None:
    async def forgets_end(stream: TurnStream) -> None:
        await stream.tts("x")

    async def fails(stream: TurnStream) -> None:
        await stream.tts("x")
        raise KeyError("nope")

    for handler, expected in ((forgets_end, [tts("x"), END]), (fails, [tts("x"), ERROR, END])):

        async def route(request: Request, handler: Any = handler) -> Response:
            return stream_response(parse_webhook_payload(await request.body()), handler)  # type: ignore[arg-type]

        app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
        assert await read_events(app, event_body()) == expected


# -- the JSON events of the webhook handler ------------------------------------------------------


@pytest.mark.anyio
async def test_json_events_and_errors() -> None:
    received: list[Any] = []

    async def on_data(event: Any) -> dict[str, Any]:
        received.append(event)
        return {"got": event.data}

    def on_update(event: Any) -> None:
        received.append(event)

    app = webhook_app(hello, on_data=on_data, on_session_update=on_update)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def send(body: bytes) -> httpx.Response:
            return await client.post("/api/agent", content=body, headers=signed_headers(body))

        r = await send(event_body("data", data={"button": "yes"}))
        assert (r.status_code, r.json()) == (200, {"got": {"button": "yes"}})
        r = await send(event_body("session.update", recording_status="completed"))
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        r = await send(event_body("session.end"))
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        r = await send(event_body("response.future_event"))
        assert (r.status_code, r.json()) == (200, {"status": "ignored"})
        r = await send(b'{"type":"message","session_id":"s","conversation_id":"c"}')
        assert r.status_code == 400
        assert r.json()["path"] == "$.turn_id"
        assert "$.turn_id" in r.json()["error"]
        r = await send(b"not json")
        assert r.status_code == 400
        assert set(r.json()) == {"error", "path"}
        r = await client.get("/api/agent")
        assert r.status_code == 401  # the middleware protects every method
    assert [e.type for e in received] == ["data", "session.update"]


@pytest.mark.anyio
async def test_webhook_as_asgi_app_refuses_other_methods_and_big_bodies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="layercode_asgi.webhook")
    app = LayercodeWebhook(hello, max_body_size=100)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/")
        assert (r.status_code, r.json(), r.headers["allow"]) == (
            405,
            {"error": "method not allowed; use POST"},
            "POST",
        )
        r = await client.post("/", content=b"x" * 101)
        assert (r.status_code, r.json()) == (413, {"error": "request body exceeds 100 bytes"})
    # The 413 left no line in the log (a 400 or 401 does).
    refused = [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.webhook"]
    assert refused == ["rejected webhook POST /: request body exceeds 100 bytes"]


@pytest.mark.anyio
async def test_conversation_store_down_is_a_503_before_the_stream() -> None:
    from layercode_asgi import LayercodeError

    class Down(FakeHistory):
        def lock(self, conversation_id: str, *, timeout: float | None = None) -> Any:
            raise LayercodeError("redis is down")

    transport = httpx.ASGITransport(app=webhook_app(hello, conversations=Down()))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = event_body()
        r = await client.post("/api/agent", content=body, headers=signed_headers(body))
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    # Said in words; the store's own message goes to the log only.
    assert r.json() == {"error": "conversation store unavailable"}


# -- real HTTP: uvicorn on 127.0.0.1 --------------------------------------------------------------


def test_exact_sequence_over_real_http() -> None:
    async def agent(event: Any) -> AsyncIterator[Any]:
        for word in ("Hello", " wörld", "\nbye"):
            yield word
            await anyio.sleep(0.01)
        yield Data([1, 2])

    with serve(webhook_app(agent)) as url, httpx.Client(base_url=url, timeout=10) as client:
        body = event_body()
        with connect_sse(
            client, "POST", "/api/agent", content=body, headers=signed_headers(body)
        ) as source:
            assert source.response.headers["content-type"] == "text/event-stream"
            events = [msgspec.json.decode(e.data) for e in source.iter_sse()]
    assert events == [
        tts("Hello"),
        tts(" wörld"),
        tts("\nbye"),
        {"type": "response.data", "content": [1, 2], "turn_id": "turn-1"},
        END,
    ]


#: The real servers of the tests below: uvicorn (asyncio) and Hypercorn's trio worker.
SERVERS = ["uvicorn", pytest.param("hypercorn-trio", marks=NEEDS_TRIO)]


def serve_on(server: str, app: Any) -> Any:
    return serve(app) if server == "uvicorn" else serve_hypercorn(app, trio_worker=True)


@pytest.mark.parametrize("server", SERVERS)
def test_client_disconnect_cancels_the_agent_promptly(server: str) -> None:
    state: dict[str, float] = {}
    first_sent = threading.Event()

    async def agent(event: Any) -> AsyncIterator[str]:
        try:
            yield "first"
            first_sent.set()
            await anyio.sleep(60)
            yield "never"
        finally:
            state["cancelled_at"] = time.monotonic()

    with serve_on(server, webhook_app(agent)) as url:
        body = event_body()
        with (
            httpx.Client(base_url=url, timeout=10) as client,
            client.stream(
                "POST", "/api/agent", content=body, headers=signed_headers(body)
            ) as response,
        ):
            first = next(response.iter_raw())
            assert b"first" in first
            assert first_sent.wait(5)
        closed_at = time.monotonic()  # leaving the block closed the connection
        deadline = closed_at + 5
        while "cancelled_at" not in state and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "cancelled_at" in state, "agent still running after the client left"
    lag = state["cancelled_at"] - closed_at
    assert lag < 1.0, f"agent cancelled {lag:.3f}s after disconnect"


@pytest.mark.parametrize("server", SERVERS)
def test_slow_client_slows_the_agent(server: str) -> None:
    produced = [0]
    chunk = "x" * 65536

    async def agent(event: Any) -> AsyncIterator[str]:
        while True:
            produced[0] += 1
            yield chunk

    with serve_on(server, webhook_app(agent)) as url:
        body = event_body()
        with (
            httpx.Client(base_url=url, timeout=10) as client,
            client.stream(
                "POST", "/api/agent", content=body, headers=signed_headers(body)
            ) as response,
        ):
            chunks = response.iter_raw()  # keep it: dropping the iterator closes the response
            next(chunks)
            # The client reads nothing: until the agent has stopped producing for 0.5 s
            # (bounded: 20 tries; a busy machine may take more than a second to fill the
            # socket buffers, so no fixed pause "long enough" for it).
            stalled_at, after = -1, produced[0]
            for _ in range(20):
                if after == stalled_at:
                    break
                stalled_at = after
                time.sleep(0.5)
                after = produced[0]
        # Without back-pressure the agent would produce ~thousands of 64 KiB chunks a second.
        # With it, only what fits in the socket buffers (a few MiB) is produced, then it waits.
        assert stalled_at * len(chunk) < 64 * 1024 * 1024, stalled_at
        assert after == stalled_at, "the agent kept producing while the client was not reading"


@pytest.mark.parametrize("server", SERVERS)
def test_disconnect_stops_an_agent_that_never_awaits(server: str) -> None:
    """A producer that only yields (no other await) must still notice the client left."""
    produced = [0]
    stopped = threading.Event()

    async def firehose(event: Any) -> AsyncIterator[str]:
        try:
            while True:
                produced[0] += 1
                yield "x" * 1024
        finally:
            stopped.set()

    with serve_on(server, webhook_app(firehose)) as url:
        body = event_body()
        with (
            httpx.Client(base_url=url, timeout=10) as client,
            client.stream(
                "POST", "/api/agent", content=body, headers=signed_headers(body)
            ) as response,
        ):
            assert b"response.tts" in next(response.iter_raw())
        assert stopped.wait(2), f"agent still running after {produced[0]} chunks"


@pytest.mark.anyio
async def test_a_turn_runs_with_an_emit_of_your_own() -> None:
    # Any async callable taking the chunk will do; only an EventStreamResponse's own emit
    # is also asked to end the body with response.end.
    chunks: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        chunks.append(chunk)

    event = parse_webhook_payload(event_body(text="hi", turn_id="t-own"))
    assert isinstance(event, MessagePayload)
    await Turn(event, echo_agent).run(emit)
    events = [msgspec.json.decode(c.removeprefix(b"data: ").strip()) for c in chunks]
    assert [e["type"] for e in events] == ["response.tts", "response.end"]
    assert events[0]["content"] == "You said: hi"


@pytest.mark.parametrize(
    "options",
    [
        {"turn_timeout": float("nan")},
        {"turn_timeout": 0},
        {"turn_timeout": -1},
        {"turn_timeout": "30"},
        {"turn_grace": float("nan")},
        {"turn_grace": -0.5},
        {"turn_grace": float("inf")},
        {"turn_grace": 0},  # as LAYERCODE_TURN_GRACE: on trio no fallback, no response.end
        {"lock_timeout": float("nan")},
        {"lock_timeout": -1},
        {"lock_wait_grace": float("nan")},
        {"lock_wait_grace": None},
    ],
)
def test_webhook_refuses_invalid_durations(options: dict[str, object]) -> None:
    # Accepted before: a NaN or negative timeout reached the turn's deadline.
    with pytest.raises(ValueError, match=f"{next(iter(options))} must be a finite number"):
        LayercodeWebhook(echo_agent, **options)  # type: ignore[arg-type]


_BAD_TURN_DURATIONS = [
    {"timeout": float("nan")},
    {"timeout": 0},
    {"timeout": -1},
    {"timeout": "30"},
    {"timeout": True},
    {"grace": float("nan")},
    {"grace": -0.5},
    {"grace": float("inf")},
    {"grace": 0},
]


@pytest.mark.parametrize("options", _BAD_TURN_DURATIONS)
def test_turn_refuses_invalid_durations(options: dict[str, object]) -> None:
    # Accepted before: NaN made every turn a 500 ("deadline must not be NaN" inside the
    # response); 0 or -1 timed every turn out at once.
    event = parse_webhook_payload(event_body("message", text="hi"))
    assert isinstance(event, MessagePayload)
    with pytest.raises(ValueError, match=f"{next(iter(options))} must be a finite number"):
        Turn(event, echo_agent, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", ["stream_turn", "stream_response"])
@pytest.mark.parametrize("timeout", [float("nan"), -1, 0])
def test_stream_entry_points_refuse_invalid_timeouts(entry: str, timeout: float) -> None:
    async def handler(stream: Any) -> None:
        await stream.tts("hi")

    for body in (event_body("message", text="hi"), event_body("data")):
        with pytest.raises(ValueError, match="timeout must be a finite number > 0 or None"):
            if entry == "stream_turn":
                stream_turn(body, echo_agent, timeout=timeout)
            else:
                stream_response(body, handler, timeout=timeout)


def test_turn_accepts_valid_durations() -> None:
    event = parse_webhook_payload(event_body("message", text="hi"))
    assert isinstance(event, MessagePayload)
    for options in ({"timeout": None}, {"timeout": 2}, {"timeout": 0.5, "grace": 0.01}):
        turn = Turn(event, echo_agent, **options)  # type: ignore[arg-type]
        assert turn.timeout == options["timeout"]


# -- a CancelledError the agent raises itself is an agent error, not a cancellation -------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio's Cancelled is trio's own
@pytest.mark.parametrize("after_first", [False, True])
async def test_agent_raising_a_stray_cancelled_error_gets_error_then_end(
    after_first: bool, anyio_backend: str
) -> None:
    async def agent(event: Any) -> AsyncIterator[str]:
        task = await cancelled_elsewhere()
        if after_first:
            yield "partial"
        await task  # e.g. a shared prefetch that another request cancelled
        yield "never"

    events = await read_events(webhook_app(agent), event_body())
    assert events == ([tts("partial")] if after_first else []) + [ERROR, END]

    async def route(request: Request) -> Response:
        return stream_turn(await request.body(), agent)

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    events = await read_events(app, event_body())
    assert events == ([tts("partial")] if after_first else []) + [ERROR, END]


async def cancel_from_outside(
    turn: Turn, emit: Any, started: anyio.Event, *, native: bool = False
) -> bool:
    """Run ``turn`` until ``started``, then cancel it from outside: by a cancel scope (both
    backends) or asyncio's ``task.cancel()`` (``native``). Whether its cancellation went on."""
    went_on: list[bool] = []

    async def run() -> None:
        try:
            await turn.run(emit)
        except anyio.get_cancelled_exc_class():
            went_on.append(True)
            raise

    with anyio.fail_after(10):
        if native:
            task = asyncio.get_running_loop().create_task(run())
            await started.wait()
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(run)
                await started.wait()
                task_group.cancel_scope.cancel()
    return went_on == [True]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("anyio_backend", "native"),
    [("asyncio", False), ("asyncio", True), pytest.param("trio", False, marks=NEEDS_TRIO)],
)
async def test_a_turn_cancelled_from_outside_is_still_cancelled(
    anyio_backend: str, native: bool
) -> None:
    """By a cancel scope around the turn (a server's own, a caller's timeout), on both
    backends, or by asyncio's plain ``task.cancel()`` of the request's task: the turn stops
    as disconnected and the cancellation goes on."""
    chunks: list[bytes] = []
    started = anyio.Event()

    async def emit(chunk: bytes) -> None:
        chunks.append(chunk)

    async def agent(event: Any) -> AsyncIterator[str]:
        yield "first"
        started.set()
        await anyio.sleep(30)
        yield "never"

    event = parse_webhook_payload(event_body())
    assert isinstance(event, MessagePayload)
    turn = Turn(event, agent)
    assert await cancel_from_outside(turn, emit, started, native=native)
    assert turn.status == "disconnected"
    assert len(chunks) == 1


# -- an event that is neither a parsed payload nor a raw body is refused, not answered ok ---


@pytest.mark.parametrize("entry", ["stream_turn", "stream_response"])
@pytest.mark.parametrize(
    "event",
    [
        pytest.param(msgspec.json.decode(event_body("message", text="hi")), id="dict"),
        pytest.param(None, id="none"),
        pytest.param(5, id="int"),
        pytest.param(bytearray(event_body("message", text="hi")), id="bytearray"),
    ],
)
def test_stream_entry_points_refuse_an_event_of_the_wrong_type(entry: str, event: Any) -> None:
    # Before: answered 200 {"status": "ok"} without calling the agent (a route passing
    # ``await request.json()`` never ran its agent, silently).
    called: list[str] = []

    async def agent(event: Any) -> AsyncIterator[str]:
        called.append("agent")
        yield "hi"

    async def handler(stream: Any) -> None:
        called.append("handler")

    with pytest.raises(TypeError, match=r"the raw request body .* or a parsed event"):
        if entry == "stream_turn":
            stream_turn(event, agent)
        else:
            stream_response(event, handler)
    assert called == []


# -- a timeout message that cannot be spoken is refused where it is given ------------------


@pytest.mark.parametrize(
    ("message", "error"),
    [(5, TypeError), (b"bye", TypeError), ("bye \ud800", ValueError)],
)
def test_an_unspeakable_timeout_message_is_refused_where_given(
    message: Any, error: type[Exception]
) -> None:
    # Before: accepted; the turn that timed out then failed sending it, and its stream
    # ended with neither the fallback nor response.error nor response.end.
    event = parse_webhook_payload(event_body("message", text="hi"))
    assert isinstance(event, MessagePayload)
    with pytest.raises(error, match="timeout_message"):
        Turn(event, echo_agent, timeout=1, timeout_message=message)
    with pytest.raises(error, match="timeout_message"):
        stream_turn(event_body(), echo_agent, timeout=1, timeout_message=message)
    with pytest.raises(error, match="timeout_message"):
        LayercodeWebhook(echo_agent, timeout_message=message)


@pytest.mark.anyio
async def test_tts_stream_sends_no_whitespace_only_tts() -> None:
    # Before: each chunk was a response.tts, " " and "\n\n" too (an LLM's token stream has them).
    async def chunks() -> AsyncIterator[str]:
        for token in ("\n", "How", " ", "are", " \n", "you?", "  "):
            yield token

    returned: list[str] = []

    async def handler(stream: TurnStream) -> None:
        returned.append(await stream.tts_stream(chunks()))

    async def route(request: Request) -> Response:
        return stream_response(await request.body(), handler)

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    events = await read_events(app, event_body())
    assert events == [tts("\nHow"), tts(" are"), tts(" \nyou?"), END]
    assert returned == ["\nHow are \nyou?  "]  # the whole text, as before


class Stop(BaseException):
    """An agent's own BaseException (neither an Exception nor a cancellation)."""


@pytest.mark.anyio
async def test_an_agent_raising_another_base_exception_fails_the_turn() -> None:
    # Before: the stream ended without response.error and response.end (the exception went
    # on to the server, which cut the connection).
    async def agent(event: Any) -> AsyncIterator[str]:
        yield "partial"
        if event.text == "stop":
            raise Stop("stopped")
        if event.text == "exit":
            raise GeneratorExit  # by hand, not by aclose()
        if event.text == "group":  # a task group's, holding no interrupt or cancellation
            raise BaseExceptionGroup("stopped", [Stop("stopped"), ValueError("bad")])

    webhook = LayercodeWebhook(agent)
    app = LayercodeSignature(webhook, secret=SECRET)
    for text in ("stop", "exit", "group"):
        assert await read_events(app, event_body(text=text)) == [tts("partial"), ERROR, END]
    # the conversation's lock was released and the turns recorded
    assert await read_events(app, event_body(text="fine")) == [tts("partial"), END]
    assert webhook.conversations is not None
    history = await webhook.conversations.get_history("conv-1")
    assert [m.text for m in history] == [
        *("stop", "partial", "exit", "partial", "group", "partial", "fine", "partial")
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, BaseExceptionGroup])
async def test_system_exit_and_keyboard_interrupt_go_on(exc: type[BaseException]) -> None:
    async def agent(event: Any) -> AsyncIterator[str]:
        yield "partial"
        if exc is BaseExceptionGroup:  # a group holding an interrupt goes on as it is
            raise BaseExceptionGroup("interrupted", [Stop("stopped"), KeyboardInterrupt()])
        raise exc

    sent: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        sent.append(chunk)

    event = parse_webhook_payload(event_body())
    with pytest.raises(exc):
        await Turn(event, agent).run(emit)  # type: ignore[arg-type]
    assert len(sent) == 1 and b"response.tts" in sent[0]


# -- half an emoji (a lone surrogate) in a reply is sent as U+FFFD, the turn goes on --------


@pytest.mark.anyio
async def test_lone_surrogates_in_replies_are_sent_as_u_fffd() -> None:
    # Before: UTF-8 cannot hold a lone surrogate ("\ud83d", half an emoji, which a model
    # stream can produce): encoding the reply failed and the turn ended as an agent error.
    async def agent(event: Any) -> AsyncIterator[Any]:
        yield "half \ud83d"
        yield Tts("pair \ud83d\ude00 ok")
        yield Data({"k\udc00": ["v\ud83d", 1, ("t\ud800",)]})
        yield Hangup({"why": "bye \ud83d"})

    webhook = LayercodeWebhook(agent)
    events = await read_events(LayercodeSignature(webhook, secret=SECRET), event_body())
    assert events == [
        tts("half \ufffd"),
        tts("pair \U0001f600 ok"),
        {
            "type": "response.data",
            "content": {"k\ufffd": ["v\ufffd", 1, ["t\ufffd"]]},
            "turn_id": "turn-1",
        },
        {"type": "response.hangup", "content": {"why": "bye \ufffd"}, "turn_id": "turn-1"},
        END,
    ]
    assert webhook.conversations is not None
    history = await webhook.conversations.get_history("conv-1")
    assert history[-1].text == "half \ufffdpair \U0001f600 ok"

    async def handler(stream: TurnStream) -> None:
        await stream.tts("a \ud83d")
        await stream.data("d \udc00")
        await stream.tts_stream(_chunks("b \ud83d", "c"))
        await stream.hangup("e \ud83d")

    events = await read_events(_handler_app(handler), event_body())
    assert events == [
        tts("a \ufffd"),
        {"type": "response.data", "content": "d \ufffd", "turn_id": "turn-1"},
        tts("b \ufffd"),
        tts("c"),
        {"type": "response.hangup", "content": "e \ufffd", "turn_id": "turn-1"},
        END,
    ]


class _Text(str):
    """A str subclass, as some libraries hand out (a model SDK's, a template engine's)."""


class _Count(int):
    pass


@pytest.mark.anyio
async def test_str_subclasses_in_replies_are_sent_as_their_text() -> None:
    # Before: msgspec encodes exact str (int, float) only: a str subclass yielded (each str
    # is spoken, says the contract) or in a Data/Hangup content ended the turn as an
    # agent error ("Encoding objects of type _Text is unsupported").
    async def agent(event: Any) -> AsyncIterator[Any]:
        yield _Text("sub ")
        yield Tts(_Text("tts \ud83d"))
        yield Data({_Text("k"): [_Text("v"), _Count(2), 1.5]})
        yield Hangup(_Text("bye"))

    webhook = LayercodeWebhook(agent)
    events = await read_events(LayercodeSignature(webhook, secret=SECRET), event_body())
    assert events == [
        tts("sub "),
        tts("tts \ufffd"),
        {"type": "response.data", "content": {"k": ["v", 2, 1.5]}, "turn_id": "turn-1"},
        {"type": "response.hangup", "content": "bye", "turn_id": "turn-1"},
        END,
    ]
    assert webhook.conversations is not None
    history = await webhook.conversations.get_history("conv-1")
    assert history[-1].text == "sub tts \ufffd" and type(history[-1].text) is str


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("turn_id", "sent_as"),
    [(_Text("turn-1"), "turn-1"), ("turn-1\ud83d", "turn-1\ufffd")],
    ids=["str-subclass", "lone-surrogate"],
)
async def test_a_mapping_event_with_an_unusual_turn_id_is_answered(
    turn_id: str, sent_as: str
) -> None:
    # Before: an event parsed from a mapping keeps its strings as they are, and a turn_id
    # msgspec cannot encode (a str subclass; a lone surrogate, which a JSON body gives as
    # U+FFFD) failed Turn(): respond(mapping) answered 500 "internal error".
    body = msgspec.json.decode(event_body())
    body["turn_id"] = turn_id
    event = parse_webhook_payload(body)
    sent: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        sent.append(chunk)

    await Turn(event, hello).run(emit)  # type: ignore[arg-type]
    expected = [{**tts("Hello"), "turn_id": sent_as}, {**END, "turn_id": sent_as}]
    assert [msgspec.json.decode(chunk[6:]) for chunk in sent] == expected


@pytest.mark.anyio
async def test_a_hand_built_event_without_a_turn_id_streams_a_null_one() -> None:
    # A struct built in code is not validated: its events carry the null it was given (the
    # fix above once made this a TypeError from str.__str__).
    event = MessagePayload(session_id="s", conversation_id="c", turn_id=None, text="x")  # type: ignore[arg-type]
    sent: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        sent.append(chunk)

    await Turn(event, hello).run(emit)  # type: ignore[arg-type]
    expected = [{**tts("Hello"), "turn_id": None}, {**END, "turn_id": None}]
    assert [msgspec.json.decode(chunk[6:]) for chunk in sent] == expected


async def _chunks(*texts: str) -> AsyncIterator[str]:
    for text in texts:
        yield text


def _handler_app(handler: Any) -> Any:
    async def route(request: Request) -> Response:
        return stream_response(await request.body(), handler)

    return Starlette(routes=[Route("/api/agent", route, methods=["POST"])])


@pytest.mark.anyio
@pytest.mark.parametrize(("message", "error"), [(5, TypeError), ("bye \ud800", ValueError)])
async def test_an_unsendable_abort_message_is_refused_where_given(
    message: Any, error: type[Exception]
) -> None:
    # Before: accepted; the aborted turn then failed sending it, and its stream ended with
    # neither response.error nor response.end.
    event = parse_webhook_payload(event_body())
    assert isinstance(event, MessagePayload)
    turn = Turn(event, hello)
    with pytest.raises(error, match="message"):
        turn.abort(message)
    webhook = LayercodeWebhook(hello)
    with pytest.raises(error, match="message"):
        webhook.abort_turns(message)
    sent: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        sent.append(chunk)

    await turn.run(emit)  # not aborted: the turn runs as usual
    assert [msgspec.json.decode(chunk[6:]) for chunk in sent] == [tts("Hello"), END]


class _StopsOnClose:
    """An agent's async iterator whose ``aclose()`` raises a BaseException of its own."""

    def __init__(self, failure: BaseException | None) -> None:
        self.failure, self.started = failure, anyio.Event()

    def __aiter__(self) -> _StopsOnClose:
        return self

    def bound(self, event: Any) -> _StopsOnClose:
        """As an agent: this iterator for every turn."""
        return self

    async def __anext__(self) -> str:
        if not self.started.is_set():
            self.started.set()
            return "first"
        if self.failure is not None:
            raise self.failure
        await anyio.sleep(30)
        return "never"

    async def aclose(self) -> None:
        raise Stop("close stopped")


@pytest.mark.anyio
async def test_an_agent_whose_aclose_raises_a_base_exception_does_not_hide_why_it_stopped(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the exception of aclose() replaced the one that stopped the agent: the turn
    # was failed for Stop instead of the agent's KeyError, and a turn cancelled from
    # outside (the client left) lost its cancellation: it sent response.error and
    # response.end to nobody and returned as if it had not been cancelled.
    chunks: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        chunks.append(chunk)

    event = parse_webhook_payload(event_body())
    assert isinstance(event, MessagePayload)
    failing = Turn(event, lambda event: _StopsOnClose(KeyError("nope")))
    await failing.run(emit)
    assert isinstance(failing.error, KeyError)
    assert [msgspec.json.decode(chunk[6:]) for chunk in chunks] == [tts("first"), ERROR, END]
    assert "agent raised while closing" in caplog.text

    # Cancelled by a scope outside it (both backends), and by asyncio's task.cancel().
    for native in [False, True] if anyio_backend == "asyncio" else [False]:
        chunks.clear()
        agent = _StopsOnClose(None)
        turn = Turn(event, agent.bound)
        assert await cancel_from_outside(turn, emit, agent.started, native=native)
        assert turn.status == "disconnected"
        assert len(chunks) == 1


# -- an agent that catches its cancellation and returns still times out (or is aborted) ---


async def _swallows_its_cancellation(event: Any) -> AsyncIterator[str]:
    yield "thinking"
    try:
        await anyio.sleep(30)
    except BaseException:  # the bug of many agents: `except BaseException: return`
        return
    yield "never"


async def _raises_in_its_finally(event: Any) -> AsyncIterator[str]:
    yield "thinking"
    try:
        await anyio.sleep(30)
    finally:
        raise ValueError("cleanup failed")  # replaces its cancellation


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
@pytest.mark.parametrize("agent", [_swallows_its_cancellation, _raises_in_its_finally])
async def test_an_agent_that_swallows_its_cancellation_still_times_out(
    anyio_backend: str, agent: Any
) -> None:
    # Before: the agent returned normally once cancelled at the deadline, and the turn sent
    # a plain response.end: no fallback, no "turn timed out", and status "completed".
    # And an agent whose cleanup raised once cancelled got "agent error" instead of the
    # fallback or the abort's message (on asyncio, whose sends here do not suspend).
    chunks: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        chunks.append(chunk)

    event = parse_webhook_payload(event_body())
    assert isinstance(event, MessagePayload)
    turn = Turn(event, agent, timeout=0.2, timeout_message="One moment.")
    with anyio.fail_after(10):
        await turn.run(emit)
    assert [msgspec.json.decode(c[6:]) for c in chunks] == [
        tts("thinking"),
        tts("One moment."),
        END,
    ]
    assert turn.status == "timed_out"

    chunks.clear()
    first = anyio.Event()

    async def emit_and_tell(chunk: bytes) -> None:
        chunks.append(chunk)
        first.set()

    turn = Turn(event, agent)
    async with anyio.create_task_group() as tg:
        tg.start_soon(turn.run, emit_and_tell)
        with anyio.fail_after(10):
            await first.wait()
        turn.abort("server is shutting down")
    assert [msgspec.json.decode(c[6:]) for c in chunks] == [
        tts("thinking"),
        {"type": "response.error", "error": "server is shutting down", "turn_id": "turn-1"},
        END,
    ]
    assert turn.status == "aborted"


@pytest.mark.anyio
async def test_a_lone_surrogate_escape_in_a_conversation_id_is_answered_as_the_webhook_does() -> (
    None
):
    # A "\ud800" escape decodes as U+FFFD (as JSON.parse takes it): an id every store keeps,
    # so LayercodeWebhook (create_app's, with its memory store) and a route calling
    # stream_turn / stream_response all answer a data event 200 {"status": "ok"}.
    body = event_body("data").replace(b'"conv-1"', b'"conv-\\ud800"')
    assert parse_webhook_payload(body).conversation_id == "conv-\ufffd"

    async def handler(stream: TurnStream) -> None:
        await stream.tts("never")

    async def turn_route(request: Request) -> Response:
        return stream_turn(await request.body(), hello)

    async def response_route(request: Request) -> Response:
        return stream_response(await request.body(), handler)

    answers: list[tuple[int, Any]] = []
    for app in (
        webhook_app(hello),
        Starlette(routes=[Route("/api/agent", turn_route, methods=["POST"])]),
        Starlette(routes=[Route("/api/agent", response_route, methods=["POST"])]),
    ):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            reply = await client.post("/api/agent", content=body, headers=signed_headers(body))
        answers.append((reply.status_code, reply.json()))
    assert answers == [(200, {"status": "ok"})] * 3
