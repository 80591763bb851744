"""Shared fixtures: a real uvicorn server on 127.0.0.1 and signing helpers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from layercode_asgi import sign

SECRET = "whsec_test_secret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolate_library_logging() -> Iterator[None]:
    """Undo any ``setup_logging`` a test caused (``app_from_env``, the CLI in-process).

    Its handler writes to the ``sys.stderr`` of the test that installed it, which pytest
    closes afterwards: left in place, later tests' log lines would fail to print.
    """
    target = logging.getLogger("layercode_asgi")
    handlers, level, propagate = list(target.handlers), target.level, target.propagate
    try:
        yield
    finally:
        target.handlers[:] = handlers
        target.setLevel(level)
        target.propagate = propagate


def signed_headers(body: bytes | str, secret: str = SECRET, **extra: str) -> dict[str, str]:
    """Headers for a correctly signed webhook request with ``body``."""
    return {"layercode-signature": sign(body, secret), "content-type": "application/json", **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers run as subprocesses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only for TCP sockets
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def event_body(kind: str = "message", **fields: Any) -> bytes:
    """The JSON body of a LayerCode webhook event of type ``kind``."""
    import msgspec

    base: dict[str, Any] = {"type": kind, "session_id": "sess-1", "conversation_id": "conv-1"}
    if kind in ("message", "session.start", "data"):
        base["turn_id"] = "turn-1"
    if kind == "message":
        base["text"] = "hello there"
    if kind == "data":
        base["data"] = {"clicked": True}
    base.update(fields)
    return msgspec.json.encode(base)
