"""``EventStreamResponse`` driven directly (an ASGI stub), on asyncio and on trio.

A disconnect, a failing send, a producer failing before and after its first event,
cancellation from outside, a client that stops reading, and a turn's deadline covering
its writes.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from layercode_asgi import EventStreamResponse, ResponseError, Turn, parse_webhook_payload
from layercode_asgi.sse import Emit

from .agents_for_tests import cancelled_elsewhere
from .asgi_stub import ASGIStub
from .conftest import BACKENDS, NEEDS_TRIO, event_body

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_chunks_go_out_as_emitted_then_the_body_closes() -> None:
    async def producer(emit: Emit) -> None:
        for index in range(3):
            await emit(f"data: {index}\n\n".encode())

    stub = ASGIStub()
    await stub.run(EventStreamResponse(producer, headers={"x-extra": "1"}))
    assert stub.status == 200
    assert stub.headers["content-type"] == "text/event-stream"
    assert stub.headers["x-extra"] == "1"
    assert stub.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert stub.complete


async def test_given_headers_replace_the_default_ones_instead_of_doubling_them() -> None:
    # Before: both went out, e.g. two Content-Type headers (an ambiguous response) and
    # x-accel-buffering both "no" and "yes".
    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")

    given = {"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "yes"}
    stub = ASGIStub()
    await stub.run(EventStreamResponse(producer, headers={**given, "x-extra": "1"}))
    start = next(m for m in stub.messages if m["type"] == "http.response.start")
    assert sorted(start["headers"]) == [
        (b"cache-control", b"no-cache, no-transform"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"x-accel-buffering", b"yes"),
        (b"x-extra", b"1"),
    ]


async def test_a_disconnect_cancels_the_producer_at_its_await() -> None:
    seen: list[str] = []

    async def producer(emit: Emit) -> None:
        await emit(b"data: first\n\n")
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise
        seen.append("not reached")

    response = EventStreamResponse(producer)
    stub = ASGIStub(disconnect_after=1)
    await stub.run(response)
    assert seen == ["cancelled"]
    assert response.disconnected
    assert not stub.complete  # nothing more is sent to a client that left


async def test_a_failing_send_ends_the_stream_like_a_disconnect() -> None:
    seen: list[str] = []

    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")
        try:
            await emit(b"data: two\n\n")  # raises OSError inside: the client is gone
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise

    response = EventStreamResponse(producer)
    stub = ASGIStub(fail_send_after=1)
    await stub.run(response)
    assert seen == ["cancelled"]
    assert response.disconnected
    assert stub.body == b"data: one\n\n"


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [
        (
            ResponseError(503, "conversation store unavailable"),
            503,
            "conversation store unavailable",
        ),
        (RuntimeError("secret detail"), 500, "internal error"),
    ],
)
async def test_a_producer_failing_before_its_first_event_is_a_json_error(
    failure: Exception, status: int, message: str
) -> None:
    async def producer(emit: Emit) -> None:
        raise failure

    stub = ASGIStub()
    await stub.run(EventStreamResponse(producer))
    assert stub.status == status
    assert stub.headers["content-type"] == "application/json"
    assert msgspec.json.decode(stub.body) == {"error": message}
    assert stub.complete


async def test_a_producer_failing_after_its_first_event_ends_the_stream() -> None:
    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")
        raise RuntimeError("boom")

    stub = ASGIStub()
    await stub.run(EventStreamResponse(producer))
    assert stub.status == 200  # one status line, never a second one
    assert stub.body == b"data: one\n\n"
    assert stub.complete


class _Stop(BaseException):
    """A producer's own kind of exception, not an Exception."""


@pytest.mark.parametrize(
    ("kind", "anyio_backend"),
    [
        ("stray-cancelled", "asyncio"),
        ("own", "asyncio"),
        pytest.param("own", "trio", marks=NEEDS_TRIO),
        ("group", "asyncio"),  # a task group's, holding no interrupt or cancellation
    ],
)  # trio's Cancelled is trio's own: no stray one there
@pytest.mark.parametrize("after_first", [False, True])
async def test_a_producer_raising_no_exception_of_its_task_is_a_failure(
    kind: str, after_first: bool, anyio_backend: str
) -> None:
    # A producer awaiting a task that something else cancelled gets a CancelledError that
    # is no cancellation of this response; a BaseException of its own kind is no interrupt.
    # Before, both escaped the response: the server answered a plain 500, or cut the
    # stream without its final frame. Now, as an agent's or a hook's: a JSON 500 before
    # the stream, its final frame after.
    async def producer(emit: Emit) -> None:
        task = await cancelled_elsewhere() if kind == "stray-cancelled" else None
        if after_first:
            await emit(b"data: one\n\n")
        if kind == "group":
            raise BaseExceptionGroup("stopped", [_Stop(), ValueError("bad")])
        if task is None:
            raise _Stop
        await task

    stub = ASGIStub()
    await stub.run(EventStreamResponse(producer))
    assert stub.complete
    if after_first:
        assert (stub.status, stub.body) == (200, b"data: one\n\n")
    else:
        assert stub.status == 500
        assert msgspec.json.decode(stub.body) == {"error": "internal error"}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
async def test_a_producer_raising_an_interrupt_or_exit_lets_it_go_on(exc: type) -> None:
    async def producer(emit: Emit) -> None:
        raise exc

    with pytest.raises((exc, BaseExceptionGroup)) as raised:
        await ASGIStub().run(EventStreamResponse(producer))
    error = raised.value
    if isinstance(error, BaseExceptionGroup):  # trio: out of the response's task group
        (error,) = error.exceptions
    assert isinstance(error, exc)


async def test_cancellation_from_outside_reaches_the_producer_and_propagates() -> None:
    seen: list[str] = []
    started = anyio.Event()

    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")
        started.set()
        try:
            await anyio.sleep(30)
        finally:
            seen.append("finally")

    stub = ASGIStub()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stub.run, EventStreamResponse(producer))
            await started.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert seen == ["finally"]


async def test_the_final_frame_to_a_client_that_stopped_reading_is_bounded() -> None:
    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")

    stub = ASGIStub(block_send_after=1)
    await stub.run(EventStreamResponse(producer, close_timeout=0.2))
    assert stub.body == b"data: one\n\n"
    assert not stub.complete


async def _run_with_a_send_that_yields(stub: ASGIStub, app: Any) -> None:
    """``stub.run``, behind a server whose ``send`` suspends before it takes a message."""

    async def send(message: Any) -> None:
        await anyio.lowlevel.checkpoint()
        await stub.send(message)

    with anyio.fail_after(5):
        await app(stub.scope, stub.receive, send)


async def test_a_start_cut_by_the_producers_deadline_is_sent_before_any_body() -> None:
    # Before: emit marked the response started before its send of the status line, which
    # the producer's own deadline cancelled; the final frame then went out with no start.
    async def producer(emit: Emit) -> None:
        with anyio.move_on_after(0):
            await emit(b"data: cut\n\n")

    stub = ASGIStub()
    await _run_with_a_send_that_yields(stub, EventStreamResponse(producer))
    assert [m["type"] for m in stub.messages] == ["http.response.start", "http.response.body"]
    assert stub.status == 200
    assert stub.complete


async def test_a_zero_close_timeout_bounds_the_final_frame_not_the_start() -> None:
    # Before: the start of a stream that emitted nothing was sent inside the final frame's
    # bound: cancelled there, the app returned without starting a response (a 500).
    async def producer(emit: Emit) -> None:
        return None

    stub = ASGIStub()
    await _run_with_a_send_that_yields(stub, EventStreamResponse(producer, close_timeout=0))
    assert stub.status == 200
    assert stub.body == b""


async def _endless(event: Any, context: Any) -> AsyncIterator[str]:
    while True:
        yield "x" * 1000


async def test_a_turns_deadline_covers_its_writes() -> None:
    # The client stops reading after 3 events: the agent's writes block. The turn still
    # ends at its timeout plus its grace, and the stream is closed.
    event = parse_webhook_payload(event_body(text="hi"))
    turn = Turn(event, _endless, timeout=0.3, grace=0.2)  # type: ignore[arg-type]
    stub = ASGIStub(block_send_after=3)
    await stub.run(EventStreamResponse(turn.run, close_timeout=0.2), limit=5)
    assert turn.status == "timed_out"
    assert not stub.complete


async def test_a_turn_whose_end_was_cut_by_its_deadline_is_not_completed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The client stops reading just before response.end: the deadline cuts that last
    # write. Before, the turn was reported "completed" (and counted so by the metrics)
    # though its end never went out and it overran its timeout.
    async def one(event: Any) -> AsyncIterator[str]:
        yield "hi"

    event = parse_webhook_payload(event_body(text="hi"))
    turn = Turn(event, one, timeout=0.3, grace=0.2)  # type: ignore[arg-type]
    stub = ASGIStub(block_send_after=1)
    with caplog.at_level("WARNING", logger="layercode_asgi.turns"):
        await stub.run(EventStreamResponse(turn.run, close_timeout=0.2), limit=5)
    assert b"response.end" not in stub.body
    assert turn.status == "timed_out"
    assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_create_app_answers_turns_on_this_backend() -> None:
    from layercode_asgi import Settings, create_app
    from layercode_asgi.testing import LayercodeTestClient

    from .conftest import SECRET

    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent="echo")
    async with LayercodeTestClient(app=app, secret=SECRET) as client:
        first = await client.message("hello")
        second = await client.message("again")
        assert (first.text, second.text) == ("You said: hello", "You said: again")
        assert (await client.session_end()).body == {"status": "ok"}


async def test_a_server_that_never_says_disconnect_does_not_hold_a_finished_response() -> None:
    # The watcher is cancelled once the producer is done: a server that never sends
    # http.disconnect does not hold a finished response.
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")
        await emit(b"data: two\n\n", last=True)

    with anyio.fail_after(10):
        await EventStreamResponse(producer)({"type": "http"}, receive, send)
    assert [m.get("body") for m in sent[1:]] == [b"data: one\n\n", b"data: two\n\n"]
    assert sent[-1]["more_body"] is False


async def test_nothing_can_be_emitted_after_the_last_chunk() -> None:
    errors: list[str] = []

    async def producer(emit: Emit) -> None:
        await emit(b"data: end\n\n", last=True)
        try:
            await emit(b"data: more\n\n")
        except RuntimeError as exc:
            errors.append(str(exc))

    stub = ASGIStub()
    await stub.run(EventStreamResponse(producer))
    assert stub.body == b"data: end\n\n"
    assert stub.complete
    assert errors == ["this response is not streaming"]


async def test_a_turn_is_in_the_history_when_its_response_ends() -> None:
    # The end of the body (which comes with response.end) goes out once the turn is
    # recorded: a client that saw the end, and reads the history, finds the turn.
    from layercode_asgi import ConversationManager, LayercodeWebhook, echo_agent

    manager = ConversationManager()
    webhook = LayercodeWebhook(echo_agent, conversations=manager)
    stub = ASGIStub(event_body(text="hello", turn_id="t1", conversation_id="c1"))
    at_the_end: list[list[tuple[str, str]]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            history = await manager.get_history("c1")
            at_the_end.append([(str(m.role), m.text) for m in history])
        await stub.send(message)

    with anyio.fail_after(10):
        await webhook(stub.scope, stub.receive, send)
    assert b"response.end" in stub.body
    assert at_the_end == [[("user", "hello"), ("assistant", "You said: hello")]]


async def test_the_producer_and_a_turns_agent_run_in_the_callers_task() -> None:
    # No trip through the event loop before the agent starts: under load each trip waits
    # for everything else the loop has to do (it was most of the paced p99 overhead).
    caller = anyio.get_current_task().id
    seen: list[int] = []

    async def agent(event: Any, context: Any) -> AsyncIterator[str]:
        seen.append(anyio.get_current_task().id)
        yield "hi"

    event = parse_webhook_payload(event_body(text="hi"))
    turn = Turn(event, agent)  # type: ignore[arg-type]
    stub = ASGIStub()
    await stub.run(EventStreamResponse(turn.run))
    assert seen == [caller]
    assert b'"content":"hi"' in stub.body
    assert stub.complete


async def test_the_servers_send_sees_the_requests_context() -> None:
    # Before: on trio every body write ran in a trio system task, in trio's own context: a
    # middleware's ``send`` wrapper (a request id, a tracing span) saw its context variables
    # for the status line but not for the body (on asyncio it saw them for both).
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen: list[tuple[str, str]] = []

    async def producer(emit: Emit) -> None:
        await emit(b"data: one\n\n")
        await emit(b"data: two\n\n", last=True)

    stub = ASGIStub()
    response = EventStreamResponse(producer)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: Any) -> None:
            seen.append((message["type"], request_id.get()))
            await send(message)

        request_id.set("r1")
        await response(scope, receive, sending)

    await stub.run(app)
    assert seen == [("http.response.start", "r1")] + [("http.response.body", "r1")] * 2
    assert stub.body == b"data: one\n\ndata: two\n\n" and stub.complete


async def test_a_disconnected_agent_finishes_its_shielded_cleanup() -> None:
    # The agent's cancellation is anyio's on both backends: an await in its cleanup is
    # cancelled too unless shielded; a shielded one completes.
    cleanup: list[str] = []

    async def agent(event: Any, context: Any) -> AsyncIterator[str]:
        try:
            yield "first"
            await anyio.sleep(30)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
                cleanup.append("shielded")
            try:
                await anyio.sleep(0.01)
                cleanup.append("unshielded")
            except anyio.get_cancelled_exc_class():
                cleanup.append("cancelled")
                raise

    event = parse_webhook_payload(event_body(text="hi"))
    turn = Turn(event, agent)  # type: ignore[arg-type]
    stub = ASGIStub(disconnect_after=1)
    with anyio.fail_after(10):
        await stub.run(EventStreamResponse(turn.run))
    assert cleanup == ["shielded", "cancelled"]
    assert turn.status == "disconnected"


@pytest.mark.parametrize("close_timeout", [float("nan"), -1, float("inf"), "1"])
def test_invalid_close_timeout_is_refused_at_construction(close_timeout: Any) -> None:
    # Accepted before: NaN raised "deadline must not be NaN" out of the response at its
    # end, after the body (a server error instead of a closed stream).
    async def producer(emit: Emit) -> None:
        await emit(b"data: x\n\n")

    with pytest.raises(ValueError, match="close_timeout must be a finite number >= 0 or None"):
        EventStreamResponse(producer, close_timeout=close_timeout)
