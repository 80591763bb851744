"""A turn owns its deadline: agent, encoding and writes, up to the last byte sent.

A client that stops reading a long reply must not hold its conversation (the lock) past
the turn timeout plus ``LAYERCODE_TURN_GRACE``: the next turn of that conversation is
answered. Against a real uvicorn and Hypercorn (its asyncio and trio workers), with a raw socket that
never reads.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
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
def test_a_client_that_never_reads_does_not_keep_its_conversation(server: str) -> None:
    """Before, under Hypercorn's trio worker: the stuck turn kept its conversation until the
    client left (the next turn got 503 after waiting the whole lock wait), and its timeout
    came only then: that worker's write cannot be cancelled (it shields it). Its drain count
    (and its connection) stayed open until then too."""
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
        finally:
            stuck.close()


@pytest.mark.parametrize("entry", ["stream_turn", "create_app"])
def test_a_stuck_stream_is_let_go_at_the_timeout_plus_the_grace_once(entry: str) -> None:
    """On trio's mock clock (virtual time: exact, and no real waiting): a client that stops
    reading. Before, the turn spent its grace on its last events, then the stream's close
    waited a grace again (the final frame's own bound): the response, and with it the
    request's count in the drain, stayed open until timeout + 2 x grace."""
    trio = pytest.importorskip("trio")
    from trio.testing import MockClock

    body = event_body(text="big")
    if entry == "stream_turn":
        app: Any = stream_turn(body, big_talker, timeout=2.0)  # grace: 1 s
        stub = ASGIStub(block_send_after=3)
    else:
        settings = Settings(
            env_file=None, environ={}, layercode_webhook_secret=SECRET, turn_timeout=2.0
        )
        app = create_app(settings, agent=big_talker)
        headers = [(k.encode(), v.encode()) for k, v in signed_headers(body).items()]
        stub = ASGIStub(body, path="/api/agent", headers=headers, block_send_after=3)

    async def main() -> float:
        await stub.run(app, limit=60)
        return float(trio.current_time())

    assert trio.run(main, clock=MockClock(autojump_threshold=0)) == pytest.approx(3.0)
    assert stub.status == 200
    assert not stub.complete
