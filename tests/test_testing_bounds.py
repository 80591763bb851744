"""The test kit keeps bounded data whatever a backend sends: linear SSE parsing, bounded
error excerpts (no gzip bomb inflated), bounded event lists and bytes, a timeout for an
in-process agent that never stops."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi import Settings, create_app
from layercode_asgi.testing import LayercodeTestClient, ProtocolViolation, SSEParser

from .asgi_stub import read_body
from .conftest import SECRET, serve

MiB = 1024 * 1024


def one_event(size: int) -> bytes:
    return b"data: " + b"x" * size + b"\n\n"


def feed_in_chunks(payload: bytes, chunk: int = 4096) -> list[Any]:
    parser = SSEParser()
    events = []
    for start in range(0, len(payload), chunk):
        events.extend(parser.feed(payload[start : start + chunk]))
    return events


def test_an_8_mib_event_in_4_kib_chunks_parses() -> None:
    events = feed_in_chunks(one_event(8 * MiB))
    assert len(events) == 1 and len(events[0].data) == 8 * MiB


def test_sse_parsing_scales_linearly() -> None:
    """4x the event costs about 4x the work (quadratic parsing: 16x). CPU time, best of 5,
    with a bound (10x) far from both."""

    def cost(size: int) -> float:
        payload = one_event(size)
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            feed_in_chunks(payload)
            best = min(best, time.process_time() - started)
        return best

    small, large = cost(MiB // 2), cost(2 * MiB)
    assert large < 10 * max(small, 1e-3), (small, large)


def test_line_breaks_split_across_chunks() -> None:
    stream = b'data: {"a":1}\r\n\r\ndata: b\rdata: c\r\n\n: comment\ndata: d\n\n'
    for size in (1, 2, 3, 7, len(stream)):
        assert [e.data for e in feed_in_chunks(stream, size)] == ['{"a":1}', "b\nc", "d"]


def test_a_long_line_in_one_byte_chunks_is_held_in_about_its_own_size() -> None:
    """An unterminated line fed a byte at a time (an in-process app may send its body so;
    the kit reads up to max_bytes of it): the parser held one str per piece, 28 times the
    line's UTF-8 size for CJK text. Now it keeps about the text's own size."""
    line = "中".encode() * (32 * 1024)
    parser = SSEParser()
    parser.feed(b"data: ")
    tracemalloc.start()
    try:
        for index in range(len(line)):
            parser.feed(line[index : index + 1])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * len(line), held  # before: 28 times
    [event] = parser.feed(b"\n\n")
    assert event.data == "中" * (32 * 1024)


# -- hostile backends ------------------------------------------------------------------------------


def gzip_bomb(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * MiB
    parts = [compressor.compress(block) for _ in range(size // MiB)]
    return b"".join(parts) + compressor.flush()


def raw_app(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["message", "session.update"])
async def test_an_error_reply_gzip_bomb_is_not_inflated(kind: str) -> None:
    bomb = gzip_bomb(256 * MiB)
    headers = [(b"content-type", b"text/plain"), (b"content-encoding", b"gzip")]
    with serve(raw_app(500, headers, bomb)) as base:
        client = LayercodeTestClient(base_url=base, secret=SECRET, timeout=30)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolViolation) as info:
                if kind == "message":
                    await client.message("hi")
                else:
                    await client.session_update()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.name == "http-error"
    assert info.value.detail.endswith("\0" * 10 + "…")
    assert peak < 32 * MiB, peak


@pytest.mark.anyio
async def test_a_large_json_reply_stops_at_max_bytes() -> None:
    body = b'{"pad":"' + b"x" * (2 * MiB) + b'"}'
    with serve(raw_app(200, [(b"content-type", b"application/json")], body)) as base:
        client = LayercodeTestClient(base_url=base, secret=SECRET, max_bytes=MiB)
        with pytest.raises(ProtocolViolation) as info:
            await client.session_update()
        assert info.value.name == "too-large" and "max_bytes" in info.value.detail
        assert (await LayercodeTestClient(base_url=base, secret=SECRET).session_update()).body


def endless_events_app() -> Any:
    """Streams tiny valid events for the turn forever (until the client leaves)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = await read_body(receive)
        tid = msgspec.json.decode(request)["turn_id"]
        chunk = b"data: " + msgspec.json.encode({"type": "x", "turn_id": tid}) + b"\n\n"
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(10_000_000):  # bounded, and far more than any limit below
            await send({"type": "http.response.body", "body": chunk * 100, "more_body": True})

    return app


@pytest.mark.anyio
async def test_an_endless_stream_of_tiny_events_stops_at_the_bounds() -> None:
    with serve(endless_events_app()) as base:
        by_count = LayercodeTestClient(base_url=base, secret=SECRET, max_events=1000)
        with pytest.raises(ProtocolViolation) as info:
            await by_count.message("hi", turn_id="t1")
        assert info.value.name == "too-large" and "max_events" in info.value.detail
        # Before: "more than 1000 events in one turn", naming no turn (max_bytes's did).
        assert "event #1001 of turn_id 't1'" in str(info.value)
        by_size = LayercodeTestClient(base_url=base, secret=SECRET, max_bytes=MiB)
        with pytest.raises(ProtocolViolation) as info:
            await by_size.message("hi")
        assert info.value.name == "too-large" and "max_bytes" in info.value.detail


async def endless_agent(event: Any) -> AsyncIterator[str]:
    while True:
        yield "x"


@pytest.mark.anyio
async def test_an_in_process_endless_agent_stops_at_max_bytes() -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent=endless_agent)
    client = LayercodeTestClient(app=app, secret=SECRET, max_bytes=MiB, timeout=60)
    with pytest.raises(ProtocolViolation) as info:
        await client.message("hi")
    assert info.value.name == "too-large"


async def chatty_agent(event: Any) -> AsyncIterator[str]:
    for _ in range(10_000):
        yield "word " * 50


@pytest.mark.anyio
async def test_an_in_process_reply_past_max_bytes_ends_the_turn_as_a_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent=chatty_agent)
    client = LayercodeTestClient(app=app, secret=SECRET, max_bytes=5000)
    with (
        caplog.at_level(logging.DEBUG, logger="layercode_asgi"),
        anyio.fail_after(30),
        pytest.raises(ProtocolViolation) as info,
    ):
        await client.message("hi")
    assert info.value.name == "too-large"
    # Before: three ERROR tracebacks of the kit's internal ReplyTooLarge (the agent "failed",
    # "event stream producer failed", "unhandled error on POST /api/agent"): the kit stopping
    # to read ends the turn as a client leaving does.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == []
    assert not any("ReplyTooLarge" in r.getMessage() for r in caplog.records)


async def speaks_then_hangs(event: Any) -> AsyncIterator[str]:
    yield "Hello."
    await anyio.sleep_forever()


@pytest.mark.anyio
async def test_an_in_process_turn_that_never_ends_is_not_reported_unanswered() -> None:
    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret=SECRET, turn_timeout=1000
    )
    app = create_app(settings, agent=speaks_then_hangs)
    client = LayercodeTestClient(app=app, secret=SECRET, timeout=0.5)
    with anyio.fail_after(10), pytest.raises(ProtocolViolation) as info:
        await client.message("hi", turn_id="t1")
    # Before: "message not answered within 0.5 s (no status line and headers)", when the app
    # had answered 200 and spoken: in-process, the kit sees a reply only once it is complete.
    assert info.value.name == "timeout"
    assert info.value.detail == (
        "message (turn_id 't1') reply not complete within 0.5 s: the app answered 200 and did "
        "not end it (in-process, a reply is read once the app returns)"
    )
    assert info.value.status_code == 200 and info.value.event_type == "message"
    assert info.value.turn_id == "t1"


def test_an_in_process_endless_agent_is_a_violation_not_a_memory_error() -> None:
    """In a child process limited to 1 GiB of address space (unbounded, the reply fills it
    within the timeout; a regression must fail here, not exhaust the machine), the
    default bounds stop the turn with a violation: ``too-large``, or ``timeout`` first."""
    script = textwrap.dedent(
        """
        import resource, anyio
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
        from layercode_asgi import Settings, create_app
        from layercode_asgi.testing import LayercodeTestClient, ProtocolViolation
        from tests.test_testing_bounds import endless_agent
        settings = Settings(
            env_file=None, environ={}, layercode_webhook_secret="s", turn_timeout=1000
        )
        app = create_app(settings, agent=endless_agent)
        client = LayercodeTestClient(app=app, secret="s", timeout=40)
        try:
            anyio.run(client.message, "hi")
        except ProtocolViolation as exc:
            print("violation", exc.name)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() in ("violation too-large", "violation timeout"), done.stderr[-2000:]
    assert "MemoryError" not in done.stderr


DEEP = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested past any decoder's depth


def deep_json_app(kind: str, json: bytes = DEEP) -> Any:
    """Answers a turn with one SSE event, or a JSON reply: ``json`` (nested 100,000 deep)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        if kind == "turn":
            headers, body = [(b"content-type", b"text/event-stream")], b"data: " + json + b"\n\n"
        else:
            headers, body = [(b"content-type", b"application/json")], json
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(
    ("json", "turn_said", "reply_said"),
    [
        (DEEP, "is not valid JSON", "reply is not JSON"),
        # Before: "not JSON" (msgspec's "Number out of range"): RFC 8259 allows such numbers.
        (b'{"f": 1e400}', "holds a number out of range (1e400)", "holds a number out of range"),
        (b"[1, 2.5, -1E+999, 1e999]", "out of range (-1E+999)", "number out of range (-1E+999)"),
    ],
)
@pytest.mark.anyio
async def test_undecodable_json_is_bad_json_saying_why(
    json: bytes, turn_said: str, reply_said: str
) -> None:
    turn = LayercodeTestClient(deep_json_app("turn", json), secret=SECRET)
    with pytest.raises(ProtocolViolation) as info:
        await turn.message("hi", turn_id="t9")
    assert info.value.name == "bad-json" and "SSE event #1 of turn_id 't9'" in info.value.detail
    assert turn_said in info.value.detail
    reply = LayercodeTestClient(deep_json_app("json", json), secret=SECRET)
    with pytest.raises(ProtocolViolation) as info:
        await reply.session_update()
    assert info.value.name == "bad-json" and reply_said in info.value.detail


def half_emoji_app() -> Any:
    """Answers like a JavaScript backend whose text was cut inside an emoji: JSON.stringify
    writes each half as a ``\\u`` escape of a lone UTF-16 surrogate (valid JSON)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        event = msgspec.json.decode(await read_body(receive))
        if event["type"] in ("session.start", "message"):
            turn = event["turn_id"].encode()
            headers = [(b"content-type", b"text/event-stream")]
            tts = b'{"type":"response.tts","content":"cut \\ud83d|\\ude00 \\ud83d\\ude00","turn_id":"%s"}'
            end = b'{"type":"response.end","turn_id":"%s"}'
            body = b"data: %s\n\ndata: %s\n\n" % (tts % turn, end % turn)
        else:
            headers, body = [(b"content-type", b"application/json")], b'{"status":"\\udc00ok"}'
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.anyio
async def test_a_lone_surrogate_escape_in_a_reply_is_u_fffd_not_bad_json() -> None:
    client = LayercodeTestClient(half_emoji_app(), secret=SECRET)
    turn = await client.message("hi")
    assert turn.text == "cut \ufffd|\ufffd \U0001f600"
    assert (await client.session_update()).body == {"status": "\ufffdok"}
