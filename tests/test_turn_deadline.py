"""A turn owns its deadline: agent, encoding and writes, up to the last byte sent.

A client that stops reading a long reply must not hold its conversation (the lock) past
the turn timeout plus ``LAYERCODE_TURN_GRACE``: the next turn of that conversation is
answered. Against a real uvicorn and Hypercorn (its asyncio and trio workers), with a raw socket that
never reads. Then each kind of stuck turn (a client that never reads or reads slowly, an agent
that ignores its cancellation or blocks, a fallback that cannot be written, a shutdown) in
process on trio's mock clock: exact times, and no real waiting.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from layercode_asgi import Settings, create_app, stream_turn

from .asgi_stub import ASGIStub
from .conftest import NEEDS_TRIO, SECRET, event_body, serve, serve_hypercorn, signed_headers

CHUNK = "x" * 4096


async def big_talker(event: Any, context: Any) -> AsyncIterator[str]:
    """4 MB for the first turn of a conversation; one short line afterwards."""
    if event.text == "big":
        for _ in range(1024):
            yield CHUNK
    else:
        yield "small"


def _raw_request(base: str, body: bytes) -> socket.socket:
    """Send a signed webhook on a raw socket that will never read its answer."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(5)
    sock.connect((host, int(port)))
    headers = signed_headers(body)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    start = f"POST /api/agent HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
    sock.sendall(start.encode() + head.encode() + b"\r\n" + body)
    return sock


def _wait_until_idle(app: Any) -> None:
    """Until no request is open (the drain count): bounded in count, not a timing."""
    for _ in range(500):
        if app.state.lifecycle.active == 0:
            return
        time.sleep(0.01)


@pytest.mark.parametrize(
    "server", ["uvicorn", "hypercorn", pytest.param("hypercorn-trio", marks=NEEDS_TRIO)]
)
def test_a_client_that_never_reads_does_not_keep_its_conversation(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, under Hypercorn's trio worker: the stuck turn kept its conversation until the
    client left (the next turn got 503 after waiting the whole lock wait), and its timeout
    came only then: that worker's write cannot be cancelled (it shields it). Its drain count
    (and its connection) stayed open until then too."""
    caplog.set_level(logging.WARNING, logger="layercode_asgi.turns")
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        turn_timeout=1.0,
        turn_grace=0.5,
        # Long enough that the next turn waits for the lock rather than giving up: it must
        # get the lock because the stuck turn let go of it, not because it stopped waiting.
        lock_wait_grace=8.0,
    )
    app = create_app(settings, agent=big_talker)
    running = (
        serve(app) if server == "uvicorn" else serve_hypercorn(app, trio_worker="trio" in server)
    )
    with running as base:
        stuck = _raw_request(base, event_body(turn_id="t-big", text="big"))
        try:
            body = event_body(turn_id="t-next", text="hello")
            with httpx.Client(timeout=20) as client:
                reply = client.post(f"{base}/api/agent", content=body, headers=signed_headers(body))
            assert reply.status_code == 200, reply.text
            assert '"content":"small"' in reply.text
            assert '"type":"response.end"' in reply.text
            # The drain count lets go of the stuck turn too, on every server: before, under
            # the trio worker, it held on until the client left (a write Hypercorn shields).
            _wait_until_idle(app)
            assert app.state.lifecycle.active == 0
            # The 4 MB reply really was stuck (not taken whole by the sockets' buffers), and
            # the turn let go of it when its grace was over: at the timeout plus the grace.
            cut = [
                r.getMessage() for r in caplog.records if "not sent within 0.5s" in r.getMessage()
            ]
            assert len(cut) == 1 and "turn=t-big" in cut[0], cut
        finally:
            stuck.close()


async def stubborn(event: Any, context: Any) -> AsyncIterator[str]:
    """Catches its cancellation and keeps yielding (the next turn: one short line)."""
    while event.text == "big":
        with contextlib.suppress(BaseException):  # its cancellation too
            await anyio.sleep(0.05)
        yield "more"
    yield "small"


async def blocked(event: Any, context: Any) -> AsyncIterator[str]:
    """Blocks in an ``await`` forever after its first reply (the next turn: one line)."""
    yield "first" if event.text == "big" else "small"
    if event.text == "big":
        await anyio.Event().wait()


async def cleanup_raises(event: Any, context: Any) -> AsyncIterator[str]:
    """Blocks after its first reply, and its cleanup raises (the next turn: one line)."""
    yield "first" if event.text == "big" else "small"
    if event.text == "big":
        try:
            await anyio.Event().wait()
        finally:
            raise ValueError("cleanup failed")


class _LeavesAtTheDeadline(ASGIStub):
    """A client that leaves at 2 s on the clock: when the turn's timeout (2 s) fires."""

    async def receive(self) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop(0)
        await anyio.sleep(2.0 - anyio.current_time())
        return {"type": "http.disconnect"}


class _SlowReader(ASGIStub):
    """A client that takes each chunk 0.1 s after it was sent."""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await anyio.sleep(0.1)
        await super().send(message)


def _stub(body: bytes, cls: type[ASGIStub] = ASGIStub, **options: Any) -> ASGIStub:
    headers = [(k.encode(), v.encode()) for k, v in signed_headers(body).items()]
    return cls(body, path="/api/agent", headers=headers, **options)


def _timed(app: Any, times: dict[str, float]) -> Any:
    """``run(name, request)``: runs ``request`` against ``app`` (on trio), then notes in
    ``times[name]`` the trio clock's time it ended at."""
    import trio

    async def run(name: str, request: ASGIStub) -> None:
        await request.run(app, limit=60)
        times[name] = trio.current_time()

    return run


#: A turn (timeout 2 s, grace 1 s) of each kind: its agent, its client, when it ends on
#: the mock clock and what its stream says last. (The fallback of "fallback unsent" is
#: configured but cannot be written: the client is not reading.)
STUCK_TURNS = {
    "client never reads": (big_talker, {"block_send_after": 3}, 3.0, None),
    "fallback unsent": (big_talker, {"block_send_after": 3}, 3.0, None),
    "client reads slowly": (big_talker, {"cls": _SlowReader}, 2.2, "turn timed out"),
    "agent ignores cancel": (stubborn, {}, 2.0, "turn timed out"),
    "agent blocked": (blocked, {}, 2.0, "turn timed out"),
    "agent's cleanup raises": (cleanup_raises, {}, 2.0, "turn timed out"),
    "client leaves at the deadline": (blocked, {"cls": _LeavesAtTheDeadline}, 2.0, None),
}


@pytest.mark.parametrize("case", STUCK_TURNS)
@pytest.mark.parametrize("entry", ["stream_turn", "create_app"])
def test_a_stuck_turn_ends_at_its_timeout_plus_the_grace(entry: str, case: str) -> None:
    """In-process on trio's mock clock (virtual time: exact, no real waiting). The turn
    ends and its response returns (create_app: the next turn of the conversation runs,
    the drain count is back to 0) by the timeout plus the grace, whatever its agent or
    client does. Before, a client that stopped reading was let go only at timeout +
    2 x grace: the turn spent the grace on its last events, then the stream's close
    (the final frame's own bound) waited a grace again."""
    trio = pytest.importorskip("trio")
    from trio.testing import MockClock

    agent, options, ends_at, last_error = STUCK_TURNS[case]
    body = event_body(text="big")
    app: Any
    stub = _stub(body, **options)
    if entry == "stream_turn":
        app = stream_turn(body, agent, timeout=2.0)  # grace: 1 s
    else:
        fallback = "sorry" if case == "fallback unsent" else None
        settings = Settings(
            env_file=None,
            environ={},
            layercode_webhook_secret=SECRET,
            turn_timeout=2.0,
            turn_timeout_message=fallback,
        )
        app = create_app(settings, agent=agent)
    nxt = _stub(event_body(text="next", turn_id="t-next"))
    times: dict[str, float] = {}
    run = _timed(app, times)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "stuck", stub)
            if entry == "create_app":  # the next turn of the conversation, queued
                await trio.sleep(0.5)
                nursery.start_soon(run, "next", nxt)

    trio.run(main, clock=MockClock(autojump_threshold=0))
    assert times["stuck"] == pytest.approx(ends_at)
    assert stub.status == 200
    if last_error is None:  # its last events not taken: the stream was cut
        assert not stub.complete
    else:
        events = [msgspec.json.decode(line[6:]) for line in stub.body.split(b"\n\n")[:-1]]
        assert events[-2:] == [
            {"type": "response.error", "error": last_error, "turn_id": "turn-1"},
            {"type": "response.end", "turn_id": "turn-1"},
        ]
    if entry == "create_app":
        assert nxt.status == 200
        assert b'"content":"small"' in nxt.body
        # it runs once the stuck turn is recorded (just before its end goes out), at the latest
        # when that turn ends
        assert times["next"] <= ends_at + 1e-9
        assert app.state.lifecycle.active == 0


def test_a_stuck_turn_ended_by_the_shutdown_goes_within_the_grace() -> None:
    """What ``run_server`` does when its grace period is over (``Lifecycle.abort``), on a
    turn whose client never reads, on trio's mock clock: the turn ends a grace later, its
    count in the drain with it; the turn waiting for its conversation gets 503 at once."""
    trio = pytest.importorskip("trio")
    from trio.testing import MockClock

    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent=big_talker)  # turn timeout 30 s, grace 1 s
    stuck = _stub(event_body(text="big"), block_send_after=3)
    nxt = _stub(event_body(text="next", turn_id="t-next"))
    times: dict[str, float] = {}
    run = _timed(app, times)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "stuck", stuck)
            await trio.sleep(0.5)
            nursery.start_soon(run, "next", nxt)
            await trio.sleep(4.5)
            app.state.lifecycle.abort()

    trio.run(main, clock=MockClock(autojump_threshold=0))
    assert times == {"stuck": pytest.approx(6.0), "next": pytest.approx(5.0)}
    assert nxt.status == 503
    assert stuck.status == 200
    assert not stuck.complete
    assert app.state.lifecycle.active == 0
