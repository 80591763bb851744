"""``LayercodeSignature`` and the webhook inside an existing stack: other middleware in both
orders, and HTTP/1.1 connections (pipelining, ``Expect: 100-continue``) on real servers."""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import anyio
import httpx
import pytest
import starlette.middleware.gzip as gzip
from litestar import Litestar, post
from litestar import Request as LitestarRequest
from litestar.config.compression import CompressionConfig
from litestar.middleware import DefineMiddleware
from litestar.middleware.logging import LoggingMiddlewareConfig
from litestar.types import ASGIApp
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import (
    LayercodeSignature,
    LayercodeWebhook,
    Settings,
    TurnEvent,
    create_app,
    sign,
)

from .agents_for_tests import scripted_agent
from .asgi_stub import ASGIStub
from .conftest import SECRET, event_body, serve, serve_hypercorn, signed_headers


class ReadsTheBody(BaseHTTPMiddleware):
    """A typical logging middleware: reads the body before the app does."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        await request.body()
        return await call_next(request)


OTHERS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "gzip": (GZipMiddleware, {"minimum_size": 1}),
    "base-http": (ReadsTheBody, {}),
    "cors": (CORSMiddleware, {"allow_origins": ["https://app.example"], "allow_methods": ["POST"]}),
}


def webhook_app(agent: Any, other: str, signature_outermost: bool) -> Starlette:
    """A Starlette app whose ``/api/agent`` route hands the body to a ``LayercodeWebhook``,
    behind ``LayercodeSignature`` and one other middleware, in the order asked for."""
    webhook = LayercodeWebhook(agent)

    async def route(request: Request) -> Response:
        return await webhook.respond(await request.body())

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    app.router.redirect_slashes = False
    signature = (LayercodeSignature, {"secret": SECRET, "paths": ["/api/agent"]})
    layers = [OTHERS[other], signature] if signature_outermost else [signature, OTHERS[other]]
    for cls, options in layers:  # the last one added runs first
        app.add_middleware(cls, **options)
    return app


def litestar_webhook_app(agent: Any, middleware: list[Any], **options: Any) -> Litestar:
    """A Litestar app whose ``/api/agent`` handler hands the body to a ``LayercodeWebhook``."""
    webhook = LayercodeWebhook(agent)

    @post("/api/agent")
    async def route(request: LitestarRequest[Any, Any, Any]) -> ASGIApp:
        return await webhook.respond(await request.body())

    return Litestar([route], middleware=middleware, **options)


@pytest.mark.parametrize(
    ("other", "signature_outermost"),
    [
        ("gzip", True),
        ("gzip", False),
        ("base-http", True),
        ("base-http", False),
        ("litestar-compression", True),  # in Litestar, app middleware runs inside it
    ],
)
def test_a_turn_streams_event_by_event_through_other_middleware(
    other: str, signature_outermost: bool
) -> None:
    if other == "gzip" and not hasattr(gzip, "DEFAULT_EXCLUDED_CONTENT_TYPES"):
        pytest.skip("this Starlette's GZipMiddleware compresses event streams too")
    seen_first = threading.Event()

    async def agent(event: TurnEvent) -> AsyncIterator[str]:
        yield "first"
        # The second reply only comes once the client has read the first: a middleware that
        # buffered the stream would hold "first" back until this gives up (10 s).
        for _ in range(500):
            if seen_first.is_set():
                break
            await anyio.sleep(0.02)
        yield "second" if seen_first.is_set() else "buffered"

    if other == "litestar-compression":
        check = DefineMiddleware(LayercodeSignature, secret=SECRET)
        gzipped = CompressionConfig(backend="gzip")
        app: Any = litestar_webhook_app(agent, [check], compression_config=gzipped)
    else:
        app = webhook_app(agent, other, signature_outermost)
    body = event_body("message")
    headers = signed_headers(body, **{"accept-encoding": "gzip"})
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        with client.stream("POST", "/api/agent", content=body, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # Starlette's GZip leaves it alone; Litestar's compresses it, flushing each write.
            encoding = "gzip" if other == "litestar-compression" else None
            assert response.headers.get("content-encoding") == encoding
            received = b""
            for chunk in response.iter_bytes():
                received += chunk
                if b"first" in received:
                    seen_first.set()
        assert b"second" in received, received
        unsigned = client.post("/api/agent", content=body)
        assert (unsigned.status_code, unsigned.json()) == (
            401,
            {"error": "missing signature header"},
        )


async def say_hello(event: TurnEvent) -> AsyncIterator[str]:
    yield "hello"


PREFLIGHT = {"origin": "https://app.example", "access-control-request-method": "POST"}


@pytest.mark.anyio
@pytest.mark.parametrize("signature_outermost", [True, False])
async def test_a_cors_preflight_is_answered_only_by_a_cors_middleware_outside(
    signature_outermost: bool,
) -> None:
    """A preflight carries no signature: only a CORS middleware that runs first (added
    after ``LayercodeSignature``) answers it; the signature check lets no method through."""
    app = webhook_app(say_hello, "cors", signature_outermost)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        preflight = await client.options("/api/agent", headers=PREFLIGHT)
        unsigned = await client.post(
            "/api/agent", content=b"{}", headers={"origin": PREFLIGHT["origin"]}
        )
    if signature_outermost:
        assert (preflight.status_code, preflight.json()) == (
            401,
            {"error": "missing signature header"},
        )
    else:
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == PREFLIGHT["origin"]
        assert unsigned.headers["access-control-allow-origin"] == PREFLIGHT["origin"]
    assert (unsigned.status_code, unsigned.json()) == (401, {"error": "missing signature header"})


# -- one HTTP/1.1 connection, several requests ---------------------------------------------------


def servers() -> list[Any]:
    return [
        pytest.param(lambda app: serve(app, http="h11"), id="uvicorn-h11"),
        pytest.param(lambda app: serve(app, http="httptools"), id="uvicorn-httptools"),
        pytest.param(serve_hypercorn, id="hypercorn"),
    ]


Server = Callable[[Any], AbstractContextManager[str]]


def protected_webhook() -> Any:
    return LayercodeSignature(LayercodeWebhook(say_hello), secret=SECRET)


def request(body: bytes, signature: str | None, *extra: str) -> bytes:
    lines = ["POST /api/agent HTTP/1.1", "host: test", f"content-length: {len(body)}", *extra]
    if signature is not None:
        lines.append(f"layercode-signature: {signature}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def statuses(received: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3})", received)]


def converse(url: str, sends: Iterator[bytes], answers: int) -> tuple[list[int], bool]:
    """Send the first bytes of ``sends``, then the next each time an answer (an interim
    ``100`` included) arrives; stop at ``answers`` answers or when the server closes.
    Returns the statuses read and whether the server closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(next(sends))
        received = b""
        for _ in range(100):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed with bytes of ours unread: closed all the same
                chunk = b""
            if not chunk:
                return statuses(received), True
            before = len(statuses(received))
            received += chunk
            for _ in range(len(statuses(received)) - before):
                sock.sendall(next(sends, b""))
            if len(statuses(received)) >= answers and received.endswith(b"}"):
                return statuses(received), False
    raise AssertionError(f"no end after 100 reads: {received!r}")


BODY = event_body("data")


def good() -> str:
    """BODY's signature, made now (one made at import is stale in a long test run)."""
    return sign(BODY, SECRET)


def wrong() -> str:
    """A signature of BODY that is wrong in its last digit."""
    signature = good()
    return signature[:-1] + ("1" if signature[-1] == "0" else "0")


@pytest.mark.parametrize("server", servers())
def test_a_request_pipelined_after_a_refused_signature_is_answered(server: Server) -> None:
    """A wrong signature is refused once the whole body is read: the connection stays
    usable, and the next request on it is answered as if it came alone."""
    with server(protected_webhook()) as url:
        sent = request(BODY, wrong()) + BODY + request(BODY, good()) + BODY
        assert converse(url, iter([sent]), answers=2) == ([401, 200], False)


@pytest.mark.parametrize("server", servers())
def test_a_refusal_before_the_body_closes_the_connection(server: Server) -> None:
    """Refused on the header alone, the body is never read: the connection is closed, so
    the unread body is never taken for the next request."""
    with server(protected_webhook()) as url:
        sent = request(BODY, None) + BODY + request(BODY, good()) + BODY
        assert converse(url, iter([sent]), answers=2) == ([401], True)


@pytest.mark.parametrize("server", servers())
def test_expect_100_continue(server: Server) -> None:
    expect = "expect: 100-continue"
    with server(protected_webhook()) as url:
        # A good header: the body is asked for (100), sent, and answered.
        assert converse(url, iter([request(BODY, good(), expect), BODY]), 2) == ([100, 200], False)
        refused = converse(url, iter([request(BODY, None, expect)]), 3)  # until closed
    # Refused on the header: answered without the body, and closed. uvicorn sends 100 only
    # when the app reads the body; hypercorn sends it on its own, before the app runs.
    assert refused == ([100, 401] if server is serve_hypercorn else [401], True)


# -- a client that leaves mid-body, under Starlette's BaseHTTPMiddleware -----------------------


class PassesThrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def left_mid_body_app(target: str) -> tuple[Starlette, str]:
    """An app with a ``BaseHTTPMiddleware`` outside ``target``, and the path to post to."""
    if target.startswith("create_app"):
        options = {"layercode_webhook_secret": SECRET, "layercode_api_key": "lc_key"}
        app = create_app(Settings(env_file=None, environ={}, **options))
        path = "/api/authorize" if target.endswith("authorize") else "/api/agent"
    else:
        if target == "middleware":
            app = webhook_app(say_hello, "gzip", signature_outermost=True)
        else:  # the webhook as the route's ASGI app, without the middleware
            app = Starlette(routes=[Route("/api/agent", LayercodeWebhook(say_hello))])
        path = "/api/agent"
    app.add_middleware(PassesThrough)
    return app, path


@pytest.mark.anyio
@pytest.mark.parametrize(
    "target", ["middleware", "webhook", "create_app-webhook", "create_app-authorize"]
)
async def test_a_client_leaving_mid_body_is_no_error_under_base_http_middleware(
    target: str,
) -> None:
    """Nobody reads the answer, but ``BaseHTTPMiddleware`` needs one: without it, it raised
    ``RuntimeError: No response returned.`` (an ERROR traceback, and create_app's 500)."""
    app, path = left_mid_body_app(target)
    headers = [(b"content-length", b"100"), (b"layercode-signature", good().encode())]
    stub = ASGIStub(b"{", path=path, headers=headers, leave_mid_body=True)
    await stub.run(app, limit=10)
    assert stub.status == 400


class LeavesAfterItsBody(ASGIStub):
    """A client that sends its whole body, then leaves before the turn's first event."""

    async def receive(self) -> dict[str, Any]:
        return await super().receive() if self._pending else {"type": "http.disconnect"}


@pytest.mark.anyio
@pytest.mark.parametrize("target", ["webhook", "create_app-webhook"])
async def test_a_client_leaving_before_the_first_event_is_no_error_under_base_http_middleware(
    target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream had not started when its client left, and sent nothing: under
    ``BaseHTTPMiddleware`` that was ``RuntimeError: No response returned.`` (an ERROR
    traceback, and create_app's 500), as for a client leaving mid-body."""
    if target == "create_app-webhook":
        app = create_app(
            Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET), scripted_agent
        )
    else:
        app = Starlette(routes=[Route("/api/agent", LayercodeWebhook(scripted_agent))])
    app.add_middleware(PassesThrough)
    body = event_body("message", text="hang")  # the agent never sends its first event
    headers = [(k.encode(), v.encode()) for k, v in signed_headers(body).items()]
    stub = LeavesAfterItsBody(body, path="/api/agent", headers=headers)
    await stub.run(app, limit=10)
    assert stub.status == 499
    # Starlette 0.37's BaseHTTPMiddleware (the lowest supported) sends no body once the
    # client left; newer ones pass it on.
    assert stub.body in (b'{"error":"client disconnected before the response began"}', b"")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- Litestar middleware that reads the body -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("signature_first", [True, False])
async def test_litestar_middleware_that_reads_the_body_goes_after_the_check(
    signature_first: bool,
) -> None:
    """Litestar's request logging reads the body (its default fields include it) and keeps
    it for Litestar's own handlers, not for the ASGI middleware after it: listed after it,
    the check waits for a body that never comes and answers 408 (docs/middleware.md)."""
    check = DefineMiddleware(LayercodeSignature, secret=SECRET, body_timeout=0.2)
    logging_ = LoggingMiddlewareConfig().middleware
    app = litestar_webhook_app(
        say_hello, [check, logging_] if signature_first else [logging_, check]
    )
    body = event_body("message")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        reply = await client.post("/api/agent", content=body, headers=signed_headers(body))
    if signature_first:
        assert (reply.status_code, "hello" in reply.text) == (200, True), reply.text
    else:
        assert (reply.status_code, reply.json()) == (
            408,
            {"error": "request body not received within 0.2 s"},
        )
