"""``LayercodeSignature`` mounted in Starlette, FastAPI, Litestar and raw ASGI."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import httpx
import msgspec
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar, asgi, get, post
from litestar import Request as LRequest
from litestar.middleware import DefineMiddleware
from litestar.params import Body as LBody
from litestar.response import Stream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from layercode_asgi import ConfigurationError, LayercodeSignature, sign

from .asgi_stub import ASGIStub, read_body
from .conftest import BACKENDS, SECRET, serve, signed_headers

BODY = b'{"type":"message","session_id":"s","conversation_id":"c","turn_id":"t","text":"hi"}'
MIDDLEWARE_LOGGER = "layercode_asgi.middleware"
Scope = dict[str, Any]
Message = dict[str, Any]


# -- one app per stack, each recording whether its handler ran --------------------------------


class Calls:
    def __init__(self) -> None:
        self.count = 0


def starlette_app(calls: Calls, **options: Any) -> Starlette:
    async def hook(request: Request) -> JSONResponse:
        calls.count += 1
        raw = await request.body()
        return JSONResponse({"raw": raw.decode(), "json": await request.json()})

    async def open_route(request: Request) -> JSONResponse:
        return JSONResponse({"open": True})

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"]), Route("/open", open_route)])
    app.add_middleware(LayercodeSignature, secret=SECRET, **options)
    return app


def fastapi_app(calls: Calls, **options: Any) -> Any:
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, Any]:
        calls.count += 1
        raw = await request.body()
        return {"raw": raw.decode(), "json": await request.json()}

    @app.get("/open")
    async def open_route() -> dict[str, bool]:
        return {"open": True}

    app.add_middleware(LayercodeSignature, secret=SECRET, **options)
    return app


def litestar_app(calls: Calls, **options: Any) -> Any:
    @post("/hook", status_code=200)
    async def hook(request: LRequest[Any, Any, Any]) -> dict[str, Any]:
        calls.count += 1
        raw = await request.body()
        return {"raw": raw.decode(), "json": await request.json()}

    @get("/open")
    async def open_route() -> dict[str, bool]:
        return {"open": True}

    return Litestar(
        route_handlers=[hook, open_route],
        middleware=[DefineMiddleware(LayercodeSignature, secret=SECRET, **options)],
    )


def raw_asgi_app(calls: Calls, **options: Any) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/open":
            payload = msgspec.json.encode({"open": True})
        else:
            calls.count += 1
            raw = await read_body(receive)
            payload = msgspec.json.encode({"raw": raw.decode(), "json": msgspec.json.decode(raw)})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return LayercodeSignature(app, secret=SECRET, **options)


STACKS: dict[str, Callable[..., Any]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "litestar": litestar_app,
    "raw_asgi": raw_asgi_app,
}


@pytest.fixture(params=list(STACKS))
def stack(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return STACKS[request.param]


async def post_to(
    app: Any, body: bytes | Any, headers: dict[str, str], path: str = "/hook"
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, content=body, headers=headers)


# -- accept / reject / replay, in every stack ----------------------------------------------------


@pytest.mark.anyio
async def test_valid_signature_reaches_handler_with_same_bytes(stack: Callable[..., Any]) -> None:
    calls = Calls()
    response = await post_to(stack(calls), BODY, signed_headers(BODY))
    assert response.status_code == 200, response.text
    assert response.json() == {"raw": BODY.decode(), "json": msgspec.json.decode(BODY)}
    assert calls.count == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (lambda: {}, "missing signature header"),
        (lambda: {"layercode-signature": "nonsense"}, "malformed signature header"),
        (
            lambda: {"layercode-signature": sign(BODY, SECRET, timestamp=1_000_000_000)},
            "timestamp outside tolerance",
        ),
        (lambda: {"layercode-signature": sign(BODY, "wrong-secret")}, "no matching signature"),
        (lambda: {"layercode-signature": sign(BODY + b" ", SECRET)}, "no matching signature"),
    ],
)
async def test_bad_signature_is_401_json_and_handler_not_called(
    stack: Callable[..., Any], headers: Callable[[], dict[str, str]], reason: str
) -> None:
    # Signed when the test runs, not when it is collected: a suite longer than the
    # tolerance (300 s) would otherwise see "timestamp outside tolerance".
    calls = Calls()
    response = await post_to(stack(calls), BODY, headers())
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": reason}
    assert calls.count == 0


@pytest.mark.anyio
async def test_oversized_declared_body_is_413_without_reading(stack: Callable[..., Any]) -> None:
    calls = Calls()
    big = b"x" * 2048
    response = await post_to(stack(calls, max_body_size=1024), big, signed_headers(big))
    assert response.status_code == 413
    assert response.json() == {"error": "request body exceeds 1024 bytes"}
    assert calls.count == 0


@pytest.mark.anyio
async def test_unprotected_paths_pass_through(stack: Callable[..., Any]) -> None:
    calls = Calls()
    app = stack(calls, paths=["/hook"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/open")).json() == {"open": True}
        assert (await client.post("/hook", content=BODY)).status_code == 401
    assert calls.count == 0


@pytest.mark.anyio
async def test_default_protects_every_http_request(stack: Callable[..., Any]) -> None:
    # GET: Litestar answers a wrong method with 405 before any middleware runs.
    transport = httpx.ASGITransport(app=stack(Calls()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/open")
    assert response.status_code == 401
    assert response.json() == {"error": "missing signature header"}


@pytest.mark.anyio
@pytest.mark.parametrize("stack_name", ["starlette", "fastapi"])
async def test_a_delivery_the_app_redirects_is_taken_at_its_new_address(stack_name: str) -> None:
    """Starlette and FastAPI redirect ``/hook/`` to ``/hook`` (307): the client sends the same
    signed bytes again there, which replay protection must take, not refuse with 409."""
    calls = Calls()
    app = STACKS[stack_name](calls, replay_protection=True)
    transport = httpx.ASGITransport(app=app)
    headers = signed_headers(BODY)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", follow_redirects=True
    ) as client:
        reply = await client.post("/hook/", content=BODY, headers=headers)
        assert ([r.status_code for r in reply.history], reply.status_code) == ([307], 200)
        assert reply.json()["raw"] == BODY.decode()
        assert (await client.post("/hook", content=BODY, headers=headers)).status_code == 409
    assert calls.count == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_is_disconnected_before_body_keeps_the_replayed_body() -> None:
    """Starlette's ``is_disconnected`` probes ``receive()`` in a cancelled scope; the replayed
    body was handed out without a checkpoint, so the probe took it and ``body()`` hung."""

    async def hook(request: Request) -> JSONResponse:
        disconnected = await request.is_disconnected()
        return JSONResponse({"disconnected": disconnected, "raw": (await request.body()).decode()})

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET)
    transport = httpx.ASGITransport(app=app)
    # Bounded: with the body lost, body() waited for the client to leave (forever here).
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/hook", content=BODY, headers=signed_headers(BODY))
    assert response.json() == {"disconnected": False, "raw": BODY.decode()}


# -- raw ASGI details: chunked bodies, disconnects, content-length ------------------------------


class Recorder:
    """A raw ASGI app recording what it received."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.bodies: list[bytes] = []
        self.receive: Any = None
        self.send: Any = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.receive, self.send = receive, send
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call_asgi(
    app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes], path: str = "/hook"
) -> tuple[list[Message], int]:
    """Drive ``app`` with a request in ``chunks``; return sent messages and receive() count."""
    stub = ASGIStub(chunks=chunks, path=path, headers=headers)
    await stub.run(app)
    return stub.messages, stub.receives


@pytest.mark.anyio
async def test_chunked_body_is_joined_and_replayed_once() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET)
    chunks = [BODY[:10], b"", BODY[10:40], BODY[40:]]
    header = sign(BODY, SECRET).encode()
    sent, _ = await call_asgi(app, [(b"layercode-signature", header)], chunks)
    assert sent[0]["status"] == 204
    assert inner.bodies == [BODY]


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == MIDDLEWARE_LOGGER]


@pytest.mark.anyio
async def test_chunked_oversized_body_stops_reading_at_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The 413s and 400s were the only refusals that left no line in the log.
    caplog.set_level(logging.WARNING, logger=MIDDLEWARE_LOGGER)
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, max_body_size=100)
    chunks = [b"x" * 60] * 50  # 3000 bytes, no content-length
    fresh = sign(b"other", SECRET).encode()  # passes the header check; the body decides
    sent, received = await call_asgi(app, [(b"layercode-signature", fresh)], chunks)
    assert sent[0]["status"] == 413
    assert msgspec.json.decode(sent[1]["body"]) == {"error": "request body exceeds 100 bytes"}
    assert received == 2  # stopped after the chunk that crossed the limit
    assert inner.scopes == []
    message = "rejected webhook POST /hook: request body exceeds 100 bytes"
    assert refusals(caplog) == [(logging.WARNING, message)]


@pytest.mark.anyio
async def test_declared_oversized_body_is_refused_before_any_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=MIDDLEWARE_LOGGER)
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, max_body_size=100)
    sent, received = await call_asgi(app, [(b"content-length", b"101")], [b"x" * 101])
    assert sent[0]["status"] == 413
    assert received == 0
    assert inner.scopes == []
    message = "rejected webhook POST /hook: request body exceeds 100 bytes"
    assert refusals(caplog) == [(logging.WARNING, message)]


@pytest.mark.anyio
@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b" ", b"9" * 40])
async def test_invalid_content_length_is_400(
    value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=MIDDLEWARE_LOGGER)
    inner = Recorder()
    sent, _ = await call_asgi(
        LayercodeSignature(inner, secret=SECRET), [(b"content-length", value)], [b""]
    )
    assert sent[0]["status"] == 400
    assert msgspec.json.decode(sent[1]["body"]) == {"error": "invalid content-length header"}
    assert inner.scopes == []
    message = "rejected webhook POST /hook: invalid content-length header"
    assert refusals(caplog) == [(logging.WARNING, message)]


@pytest.mark.anyio
async def test_client_disconnect_while_reading_calls_nothing() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET)
    headers = [(b"layercode-signature", sign(b"{}", SECRET).encode())]
    stub = ASGIStub(b"{", path="/hook", headers=headers, leave_mid_body=True)
    await stub.run(app)
    # Answered all the same, for middleware outside (the server drops it): test_composition.py
    assert stub.status == 400
    assert inner.scopes == []


@pytest.mark.anyio
async def test_after_the_body_receive_defers_to_the_server() -> None:
    """Once the body is replayed, receive() waits for http.disconnect like the real one."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())

    messages = [{"type": "http.request", "body": BODY}, {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    scope = {
        "type": "http",
        "path": "/hook",
        "headers": [(b"layercode-signature", sign(BODY, SECRET).encode())],
    }
    await LayercodeSignature(app, secret=SECRET)(scope, receive, send)
    assert seen == [
        {"type": "http.request", "body": BODY, "more_body": False},
        {"type": "http.disconnect"},
    ]


@pytest.mark.anyio
async def test_error_responses_are_fresh_objects() -> None:
    """Outer middleware may mutate sent messages; our pre-rendered responses must survive."""
    app = LayercodeSignature(Recorder(), secret=SECRET)
    first, _ = await call_asgi(app, [], [b""])
    first[0]["headers"].append((b"x-mutated", b"1"))
    second, _ = await call_asgi(app, [], [b""])
    assert (b"x-mutated", b"1") not in second[0]["headers"]


@pytest.mark.anyio
async def test_repeated_signature_headers_are_combined() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET)
    good = sign(BODY, SECRET)
    t, v1 = good.split(",")
    sent, _ = await call_asgi(
        app,
        [
            (b"layercode-signature", f"{t},v1={'0' * 64}".encode()),
            (b"layercode-signature", v1.encode()),
        ],
        [BODY],
    )
    assert sent[0]["status"] == 204
    # two different timestamps in two headers are malformed, not "last one wins"
    sent, _ = await call_asgi(
        app,
        [(b"layercode-signature", b"t=1,v1=" + b"0" * 64), (b"layercode-signature", good.encode())],
        [BODY],
    )
    assert sent[0]["status"] == 401
    assert msgspec.json.decode(sent[1]["body"]) == {"error": "malformed signature header"}


def test_many_repeated_signature_headers_cost_linear_work() -> None:
    """uvicorn's httptools parser takes a header block of any size. Combining 200,000
    repeated ``layercode-signature`` headers (18 MB) copied the growing value once per
    header: quadratic, minutes of CPU on the event loop for one unsigned request."""
    calls = Calls()
    filler = b"layercode-signature: v0=" + b"a" * 64 + b"\r\n"
    with serve(starlette_app(calls), http="httptools") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(
                b"POST /hook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + filler * 200_000
                + b"layercode-signature: "
                + sign(BODY, SECRET).encode()
                + b"\r\ncontent-length: %d\r\n\r\n" % len(BODY)
                + BODY
            )
            reply = b""
            while chunk := sock.recv(65536):  # ends when the server closes; 60 s at most
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert calls.count == 1


@pytest.mark.anyio
async def test_paths_match_below_the_mount_point_and_prefixes() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, paths=["/hooks/*", "/agent"])
    for path, protected in [
        ("/agent", True),
        ("/agent/x", False),
        ("/hooks/a", True),
        ("/hooks/", True),
        ("/other", False),
    ]:
        sent, _ = await call_asgi(app, [], [b""], path=path)
        assert (sent[0]["status"] == 401) is protected, path
    # mounted under /voice: the route path is what counts
    scope_sent: list[Message] = []

    async def send(message: Message) -> None:
        scope_sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    await app(
        {"type": "http", "path": "/voice/agent", "root_path": "/voice", "headers": []},
        receive,
        send,
    )
    assert scope_sent[0]["status"] == 401


@pytest.mark.anyio
@pytest.mark.parametrize("in_path", [True, False])
async def test_a_path_written_with_the_mount_point_protects_however_the_server_sets_it(
    in_path: bool,
) -> None:
    """Served with a ``root_path`` of ``/voice``, a path written as the public URL's
    (``/voice/api/agent``) protects the route whether the server puts ``root_path`` in
    ``path`` (uvicorn's ``--root-path``) or not (``FastAPI(root_path=...)``, older servers,
    httpx): without it in ``path``, the webhook was served unchecked."""
    calls = Calls()

    async def hook(request: Request) -> Response:
        calls.count += 1
        return Response("reached")

    app = Starlette(routes=[Route("/api/agent", hook, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET, paths=["/voice/api/agent"])
    transport = httpx.ASGITransport(app=app, root_path="/voice")
    path = "/voice/api/agent" if in_path else "/api/agent"
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        unsigned = await client.post(path, content=BODY)
        signed = await client.post(path, content=BODY, headers=signed_headers(BODY))
    assert (unsigned.status_code, signed.text, calls.count) == (401, "reached", 1)


@pytest.mark.parametrize("protected", ["/api/agent", "/api/agent/"])
def test_paths_fail_closed_when_the_app_normalises_slashes(protected: str) -> None:
    """Litestar routes ``/api/agent/`` and ``//api//agent`` to ``/api/agent``: wrapped around
    such an app, protecting either spelling protects them all (real uvicorn)."""
    calls = Calls()

    @post("/api/agent")
    async def hook(request: LRequest[Any, Any, Any]) -> dict[str, bool]:
        calls.count += 1
        return {"ran": True}

    app = LayercodeSignature(Litestar([hook]), secret=SECRET, paths=[protected])
    with serve(app) as url, httpx.Client() as client:
        for path in ("/api/agent", "/api/agent/", "//api/agent", "/api//agent", "/api/agent//"):
            response = client.post(url + path, content=BODY)
            assert response.status_code == 401, (path, response.text)
        signed = client.post(url + "//api/agent/", content=BODY, headers=signed_headers(BODY))
        assert signed.json() == {"ran": True}
    assert calls.count == 1


@pytest.mark.anyio
@pytest.mark.parametrize("paths", [["/mnt/agent"], ["/mnt/*"]])
async def test_paths_protect_an_app_mounted_in_litestar(paths: list[str]) -> None:
    """Litestar hands a mounted app's middleware the path below the mount (``/agent/``) and
    no ``root_path``: the full path the client asked for still counts (``raw_path``)."""
    calls = Calls()

    @asgi("/mnt", is_mount=True, copy_scope=True)
    async def mounted(scope: Any, receive: Any, send: Any) -> None:
        calls.count += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"reached"})

    middleware = [DefineMiddleware(LayercodeSignature, secret=SECRET, paths=paths)]
    app = Litestar([mounted], middleware=middleware)
    for path in ("/mnt/agent", "/mnt/%61gent", "/mnt//agent/"):
        response = await post_to(app, BODY, {}, path=path)
        assert response.status_code == 401, (path, response.text)
    assert calls.count == 0
    assert (await post_to(app, BODY, signed_headers(BODY), path="/mnt/agent")).text == "reached"


@pytest.mark.anyio
async def test_a_prefix_protects_its_own_path_without_the_slash() -> None:
    """``/hooks/*`` protects ``/hooks``: Litestar routes it (and ``/hooks/``, which it
    hands on as ``/hooks``) to a ``/hooks/`` handler, FastAPI to a router's ``""`` route."""
    calls = Calls()

    @post("/hooks/", status_code=200)
    async def litestar_hook() -> dict[str, bool]:
        calls.count += 1
        return {"ran": True}

    fastapi = FastAPI()
    router = APIRouter(prefix="/hooks")

    @router.post("")
    async def fastapi_hook() -> dict[str, bool]:
        calls.count += 1
        return {"ran": True}

    fastapi.include_router(router)
    fastapi.add_middleware(LayercodeSignature, secret=SECRET, paths=["/hooks/*"])
    middleware = [DefineMiddleware(LayercodeSignature, secret=SECRET, paths=["/hooks/*"])]
    for app in (Litestar([litestar_hook], middleware=middleware), fastapi):
        for path in ("/hooks", "/hooks/"):
            response = await post_to(app, BODY, {}, path=path)
            assert response.status_code == 401, (path, response.text)
        assert (await post_to(app, BODY, signed_headers(BODY), path="/hooks")).json() == {
            "ran": True
        }
    assert calls.count == 2


# -- lifespan and websocket pass through untouched ----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_non_http_scopes_pass_through_untouched(scope_type: str) -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET)

    async def receive() -> Message:
        raise AssertionError("middleware must not read")

    async def send(message: Message) -> None:
        raise AssertionError("middleware must not send")

    scope = {"type": scope_type, "path": "/hook", "headers": []}
    await app(scope, receive, send)
    assert inner.scopes == [scope]
    assert inner.receive is receive
    assert inner.send is send


def test_lifespan_and_websocket_in_a_real_starlette_app() -> None:
    started: list[bool] = []

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    from contextlib import asynccontextmanager

    app = Starlette(routes=[WebSocketRoute("/ws", ws)], lifespan=asynccontextmanager(lifespan))
    app.add_middleware(LayercodeSignature, secret=SECRET)
    with TestClient(app) as client:
        assert started == [True]
        with client.websocket_connect("/ws") as websocket:
            assert websocket.receive_text() == "hello"
        assert client.post("/anything").status_code == 401


# -- construction errors at start-up -----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"secret": None},
        {"secret": ""},
        {"secret": []},
        {"secret": ["ok", ""]},
        {"secret": "s", "tolerance": -1},
        {"secret": "s", "tolerance": "300"},
        {"secret": "s", "max_body_size": 0},
        {"secret": "s", "paths": ["no-slash"]},
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        LayercodeSignature(Recorder(), **options)


@pytest.mark.parametrize("paths", ["/api/agent", "/", b"/api/agent"])
def test_paths_given_as_one_string_is_a_clear_error(paths: Any) -> None:
    """A string is not a list of paths (it was read as one path per character: ``"/"``
    passed, ``"/api/agent"`` was refused for its ``"a"``)."""
    with pytest.raises(ConfigurationError, match=r"paths must be a list of paths"):
        LayercodeSignature(Recorder(), secret=SECRET, paths=paths)


@pytest.mark.parametrize("paths", [[], (), set(), iter([])])
def test_empty_paths_is_a_clear_error(paths: Any) -> None:
    """An empty ``paths`` protected nothing: every request passed unsigned."""
    with pytest.raises(ConfigurationError, match=r"paths is empty.*leave paths unset"):
        LayercodeSignature(Recorder(), secret=SECRET, paths=paths)


@pytest.mark.anyio
async def test_paths_from_a_generator_are_read_once_and_kept() -> None:
    app = LayercodeSignature(Recorder(), secret=SECRET, paths=(p for p in ["/a", "/b/*"]))
    for _ in range(2):  # the generator is spent after the first read; the paths are kept
        for path, status in [("/a", 401), ("/b/c", 401), ("/open", 204)]:
            sent, _ = await call_asgi(app, [], [b""], path=path)
            assert sent[0]["status"] == status, path


def test_paths_given_as_bytes_items_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match=r"strings starting with '/', got b'/api'"):
        LayercodeSignature(Recorder(), secret=SECRET, paths=[b"/api"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/{x}/hook", r"cannot contain '\{': Starlette would read"),
        ("/api/{x:path}", r"cannot contain '\{'"),
        ("/hooks/*/agent", r"cannot contain '\*'"),
        ("/b/*x", r"cannot contain '\*'"),
        ("/api/%61gent", r"cannot contain '%'"),
        ("/api/agent?x=1", r"cannot contain '\?'"),
        ("/api/agent\r\n", r"cannot contain '\\r'"),
        ("/api/./agent", r"empty, '\.' or '\.\.' segment"),
    ],
)
def test_paths_no_request_path_could_match_as_meant_are_refused(path: str, message: str) -> None:
    """Before: taken literally, so they protected nothing the app routes: a Starlette route
    ``/api/{x}/hook`` (or any path below ``/hooks/``) was reached unsigned (real uvicorn and
    hypercorn)."""
    with pytest.raises(ConfigurationError, match=message) as raised:
        LayercodeSignature(Recorder(), secret=SECRET, paths=[path])
    assert str(raised.value).startswith(f"LayercodeSignature paths {path!r} ")


@pytest.mark.anyio
async def test_paths_of_non_ascii_letters_and_sub_delimiters_protect() -> None:
    app = LayercodeSignature(Recorder(), secret=SECRET, paths=["/voix/\u00e9t\u00e9", "/a;v=1/*"])
    for path, status in [("/voix/\u00e9t\u00e9", 401), ("/a;v=1/b", 401), ("/open", 204)]:
        sent, _ = await call_asgi(app, [], [b""], path=path)
        assert sent[0]["status"] == status, path


def test_missing_secret_fails_at_starlette_startup_not_per_request() -> None:
    app = Starlette()
    app.add_middleware(LayercodeSignature, secret="")
    with pytest.raises(ConfigurationError, match="LAYERCODE_WEBHOOK_SECRET"), TestClient(app):
        pass


@pytest.mark.parametrize("secret", [" ", "\t", ["new", "  "], ["new", ""]])
def test_a_blank_secret_is_refused_like_an_empty_one(secret: str | list[str]) -> None:
    # A blank key is as easy to sign with as an empty one: anybody could pass the check.
    with pytest.raises(ConfigurationError, match="non-blank"):
        LayercodeSignature(Recorder(), secret=secret)


def test_secret_rotation_in_middleware() -> None:
    app = Starlette(routes=[Route("/hook", lambda r: JSONResponse({}), methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=["new", "old"])
    with TestClient(app) as client:
        for secret in ("new", "old"):
            assert (
                client.post("/hook", content=BODY, headers=signed_headers(BODY, secret)).status_code
                == 200
            )
        assert (
            client.post("/hook", content=BODY, headers=signed_headers(BODY, "x")).status_code == 401
        )


# -- streaming responses are not buffered (real uvicorn, real sockets) ---------------------------


@pytest.mark.parametrize("stack_name", ["starlette", "fastapi", "litestar", "raw_asgi"])
def test_streamed_response_arrives_event_by_event(stack_name: str) -> None:
    release = threading.Event()

    async def events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        # The second event is only produced once the client has seen the first one; a
        # buffering middleware would hold "one" back for 30 s, past the client's 5 s timeout.
        deadline = time.monotonic() + 30
        while not release.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        yield b"data: two\n\n"

    app = build_streaming_app(stack_name, events)
    with serve(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        with client.stream("POST", "/hook", content=BODY, headers=signed_headers(BODY)) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            first = next(chunks)
            assert first == b"data: one\n\n"
            assert not release.is_set()
            release.set()
            rest = b"".join(chunks)
        assert rest == b"data: two\n\n"
        unsigned = client.post("/hook", content=BODY)
        assert unsigned.status_code == 401


def build_streaming_app(stack_name: str, events: Callable[[], AsyncIterator[bytes]]) -> Any:
    if stack_name == "starlette":

        async def hook(request: Request) -> StreamingResponse:
            await request.body()
            return StreamingResponse(events(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
        app.add_middleware(LayercodeSignature, secret=SECRET)
        return app
    if stack_name == "fastapi":
        fapp = FastAPI()

        @fapp.post("/hook")
        async def fhook(request: Request) -> StreamingResponse:
            await request.body()
            return StreamingResponse(events(), media_type="text/event-stream")

        fapp.add_middleware(LayercodeSignature, secret=SECRET)
        return fapp
    if stack_name == "litestar":

        @post("/hook", status_code=200)
        async def lhook(request: LRequest[Any, Any, Any]) -> Stream:
            await request.body()
            return Stream(events(), media_type="text/event-stream")

        return Litestar(
            route_handlers=[lhook],
            middleware=[DefineMiddleware(LayercodeSignature, secret=SECRET)],
        )

    async def raw(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        async for chunk in events():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return LayercodeSignature(raw, secret=SECRET)


# -- never a 500, whatever the headers -----------------------------------------------------------

header_values = st.binary(max_size=300)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    signature=st.one_of(st.none(), header_values),
    content_length=st.one_of(
        st.none(), header_values, st.integers(-5, 5000).map(lambda n: str(n).encode())
    ),
    extra=st.lists(st.tuples(st.binary(min_size=1, max_size=20), header_values), max_size=5),
    body=st.binary(max_size=200),
)
def test_arbitrary_header_values_never_500_and_never_reach_the_app(
    signature: bytes | None,
    content_length: bytes | None,
    extra: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, max_body_size=1000)
    headers = [(k.lower(), v) for k, v in extra]
    if signature is not None:
        headers.append((b"layercode-signature", signature))
    if content_length is not None:
        headers.append((b"content-length", content_length))
    sent, _ = asyncio.run(call_asgi(app, headers, [body]))
    assert sent[0]["status"] in {400, 401, 413}
    assert sent[0]["headers"][0] == (b"content-type", b"application/json")
    assert set(msgspec.json.decode(sent[1]["body"])) == {"error"}
    assert inner.scopes == []


def test_arbitrary_header_values_over_real_http() -> None:
    calls = Calls()
    odd_values = [
        "t=1,v1=" + "é" * 64,
        "t=" + "9" * 5000 + ",v1=x",
        "=" * 4000,
        ",,,,",
        "t=abc ,  v1 = x",
        "v1=" + "a" * 64 + ",t=17000000000000000000000",
    ]
    with serve(starlette_app(calls)) as url, httpx.Client(base_url=url) as client:
        for value in odd_values:
            response = client.post(
                "/hook",
                content=BODY,
                headers={"layercode-signature": value.encode("utf-8")},
            )
            assert response.status_code == 401, value
            assert response.json()["error"] in {
                "malformed signature header",
                "timestamp outside tolerance",
                "no matching signature",
            }
        ok = client.post("/hook", content=BODY, headers=signed_headers(BODY))
        assert ok.status_code == 200
    assert calls.count == 1


@pytest.mark.parametrize("name", ["sïgnature✓", "", "x signature", "x:y", 5])
def test_header_name_must_be_a_header_name(name: Any) -> None:
    # Before: "✓" raised UnicodeEncodeError, and an empty name or one with a space or colon
    # was taken (no request can carry it: every request was refused 401).
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="header_name must be an HTTP header name"):
        LayercodeSignature(app, secret=SECRET, header_name=name)


def test_a_tolerance_beyond_a_float_is_refused() -> None:
    # Accepted before: with replay protection every signed request was then a 500 (the
    # delivery's lifetime overflowed a float).
    with pytest.raises(ConfigurationError, match="tolerance must be"):
        LayercodeSignature(Recorder(), secret=SECRET, tolerance=10**400, replay_protection=True)


def body_readers_app(stack_name: str) -> Any:
    """One route per way a FastAPI or Litestar handler reads its body; each answers
    ``{"raw": <the bytes it got>}``."""
    if stack_name == "fastapi":
        fapp = FastAPI()

        async def body_of(request: Request) -> bytes:
            return await request.body()

        @fapp.post("/depends")
        async def depends(raw: bytes = Depends(body_of)) -> dict[str, str]:
            return {"raw": raw.decode()}

        @fapp.post("/model")
        async def model(event: dict[str, Any] = Body()) -> dict[str, str]:  # noqa: B008
            return {"raw": msgspec.json.encode(event).decode()}

        @fapp.post("/stream")
        async def stream(request: Request) -> dict[str, str]:
            return {"raw": b"".join([chunk async for chunk in request.stream()]).decode()}

        @fapp.post("/probe")
        async def probe(request: Request) -> dict[str, str]:
            assert not await request.is_disconnected()
            return {"raw": (await request.body()).decode()}

        fapp.add_middleware(LayercodeSignature, secret=SECRET)
        return fapp

    @post("/depends", status_code=200)
    async def data(data: Annotated[dict[str, Any], LBody()]) -> dict[str, str]:
        return {"raw": msgspec.json.encode(data).decode()}

    @post("/stream", status_code=200)
    async def lstream(request: LRequest[Any, Any, Any]) -> dict[str, str]:
        return {"raw": b"".join([chunk async for chunk in request.stream()]).decode()}

    @post("/model", status_code=200)
    async def twice(request: LRequest[Any, Any, Any]) -> dict[str, str]:
        assert await request.json() == msgspec.json.decode(BODY)
        return {"raw": (await request.body()).decode()}

    middleware = [DefineMiddleware(LayercodeSignature, secret=SECRET)]
    return Litestar([data, lstream, twice], middleware=middleware)


@pytest.mark.parametrize("stack_name", ["fastapi", "litestar"])
def test_every_way_of_reading_the_body_gets_the_verified_bytes(stack_name: str) -> None:
    """Dependency injection or a parsed body parameter, ``request.stream()``, ``json()`` then
    ``body()`` (Litestar), ``is_disconnected()`` before ``body()`` (FastAPI), over HTTP."""
    with (
        serve(body_readers_app(stack_name)) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        for path in ["/depends", "/model", "/stream"] + ["/probe"] * (stack_name == "fastapi"):
            reply = client.post(path, content=BODY, headers=signed_headers(BODY))
            assert reply.status_code == 200, (path, reply.text)
            assert msgspec.json.decode(reply.json()["raw"]) == msgspec.json.decode(BODY), path
            assert client.post(path, content=BODY).status_code == 401, path
