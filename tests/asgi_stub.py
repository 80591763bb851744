"""One fake ASGI server for driving an app directly in tests (asyncio or trio, via anyio),
and :func:`read_body` for the tests' own small ASGI apps.

    stub = ASGIStub(body, disconnect_after=1)
    await stub.run(app)
    stub.status, stub.body, stub.complete, stub.disconnected

The request body arrives in ``chunks`` (default: one); afterwards ``receive()`` waits until
the response is complete (or the client "leaves") and answers ``http.disconnect``.
``disconnect_after=N``: the client leaves once it got N body messages. ``fail_send_after=N``:
every ``send`` after N body messages raises ``OSError`` (the connection is gone).
``block_send_after=N``: the N+1-th body message never completes (a client that stopped
reading; the server's ``send`` waits for it). ``leave_mid_body=True``: the client leaves
before its body is complete (every chunk says ``more_body``, then ``http.disconnect``).
``stall_mid_body=True``: every chunk says ``more_body`` and the rest never comes (a slow
sender): ``receive()`` then waits as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio


async def read_body(receive: Any) -> bytes:
    """The whole request body, for a test's ASGI app (``http.request`` messages joined)."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def recording_app(bodies: list[bytes]) -> Any:
    """An ASGI app that keeps each request's body in ``bodies`` and answers 200 ``ok``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            bodies.append(await read_body(receive))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    return app


class ASGIStub:
    def __init__(
        self,
        body: bytes = b"",
        *,
        chunks: Sequence[bytes] | None = None,
        method: str = "POST",
        path: str = "/",
        headers: Sequence[tuple[bytes, bytes]] = (),
        disconnect_after: int | None = None,
        fail_send_after: int | None = None,
        block_send_after: int | None = None,
        leave_mid_body: bool = False,
        stall_mid_body: bool = False,
    ) -> None:
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8", "surrogateescape"),
            "root_path": "",
            "query_string": b"",
            "headers": list(headers),
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        pieces = [body] if chunks is None else list(chunks)
        self._pending = [
            {
                "type": "http.request",
                "body": piece,
                "more_body": leave_mid_body or stall_mid_body or index < len(pieces) - 1,
            }
            for index, piece in enumerate(pieces)
        ]
        self.leave_mid_body = leave_mid_body
        self.disconnect_after = disconnect_after
        self.fail_send_after = fail_send_after
        self.block_send_after = block_send_after
        self.messages: list[dict[str, Any]] = []
        self.bodies = 0
        self.receives = 0
        self.disconnected = False
        self._gone = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        if self._pending:
            return self._pending.pop(0)
        if not self.leave_mid_body:
            await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            if self.fail_send_after is not None and self.bodies >= self.fail_send_after:
                raise OSError("connection gone")
            if self.block_send_after is not None and self.bodies >= self.block_send_after:
                await anyio.sleep_forever()
            self.bodies += 1
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._gone.set()
        if self.disconnect_after is not None and self.bodies >= self.disconnect_after:
            self.disconnected = True
            self._gone.set()

    async def run(self, app: Any, limit: float = 5) -> None:
        """Call ``app`` with this request, at most ``limit`` seconds."""
        with anyio.fail_after(limit):
            await app(self.scope, self.receive, self.send)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) <= 1, f"two response starts: {starts}"
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[str, str]:
        for message in self.messages:
            if message["type"] == "http.response.start":
                return {k.decode(): v.decode() for k, v in message["headers"]}
        return {}

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    @property
    def complete(self) -> bool:
        """The response ended with its final body message (``more_body`` false)."""
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )
