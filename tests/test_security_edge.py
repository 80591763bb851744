"""The request edge under attack: replay protection, log forging, root_path, what errors reveal,
the authorize route's limits toward LayerCode, early rejects.

Every test runs a real server (uvicorn, or hypercorn where the defect shows only there) on
127.0.0.1 and talks to it over HTTP or raw sockets; Redis is a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from layercode_asgi import LayercodeSignature, LayercodeWebhook, Settings, create_app, sign
from layercode_asgi.logs import escape_log_value, setup_logging

from .agents_for_tests import scripted_agent
from .conftest import SECRET, event_body, free_port, serve, serve_hypercorn, signed_headers
from .redis_fixtures import RedisServer, redis_server  # noqa: F401 - fixture


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"layercode_webhook_secret": SECRET, "layercode_api_key": "lc_key"}
    base.update(overrides)
    return Settings(env_file=None, environ={}, **base)


def data_body(**fields: Any) -> bytes:
    """A signed ``data`` event: answered with JSON, no turn, no conversation store."""
    return event_body("data", **fields)


# -- 1. replay protection through create_app ---------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_replay_protection_setting_refuses_a_second_delivery(
    store: str, how: str, request: pytest.FixtureRequest
) -> None:
    env: dict[str, str] = {}
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        env["REDIS_URL"] = server.url
    if how == "keyword":
        config = settings(
            replay_protection=True, **({"redis_url": env["REDIS_URL"]} if env else {})
        )
    else:
        env.update(LAYERCODE_WEBHOOK_SECRET=SECRET, LAYERCODE_REPLAY_PROTECTION="true")
        config = Settings(env_file=None, environ=env)
    assert config.replay_protection is True
    body = data_body()
    headers = signed_headers(body)
    with serve(create_app(config)) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/api/agent", content=body, headers=headers)
        second = client.post("/api/agent", content=body, headers=headers)
        # a new delivery (another timestamp or body) is still welcome
        other = data_body(turn_id="turn-2")
        third = client.post("/api/agent", content=other, headers=signed_headers(other))
    assert first.status_code == 200, first.text
    assert second.status_code == 409, second.text
    assert second.json() == {"error": "webhook already received: replayed signature"}
    assert third.status_code == 200, third.text


# -- 2. a replay at the end of the validity window ------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_replay_at_the_end_of_the_window_is_refused(
    store: str, request: pytest.FixtureRequest
) -> None:
    """The signature verifies until ``t + tolerance + 1`` (whole seconds): the delivery must be
    remembered that long. The first delivery is sent 2 s before ``t + tolerance``, the replay
    just after it, while the signature still verifies."""
    tolerance = 3
    extra: dict[str, Any] = {}
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        extra["redis_url"] = server.url
    app = create_app(settings(replay_protection=True, signature_tolerance=tolerance, **extra))
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for attempt in range(3):  # only a badly overloaded machine needs another attempt
            # Start just after a second begins (at most 1 s of waiting), so that even a
            # cache rounding its lifetime up to whole seconds forgot too early before.
            while time.time() % 1 > 0.2:
                time.sleep(0.02)
            t = int(time.time()) - tolerance + 2
            body = data_body(turn_id=f"window-{attempt}")
            headers = {"layercode-signature": sign(body, SECRET, t)}
            first = client.post("/api/agent", content=body, headers=headers)
            assert first.status_code == 200, first.text
            end = t + tolerance
            while time.time() < end + 0.5:  # bounded: at most ~2.5 s
                time.sleep(0.05)
            replay = client.post("/api/agent", content=body, headers=headers)
            if time.time() < end + 1:  # the signature still verified when it was checked
                break
        assert replay.status_code == 409, replay.text


# -- 5. log forging -----------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """The library's log as ``setup_logging`` writes it (one record per line on stderr),
    plus a check that every record's message is one printable line whatever the format."""
    stream = io.StringIO()
    records = Records()
    library = logging.getLogger("layercode_asgi")
    saved = sys.stderr
    sys.stderr = stream
    try:
        setup_logging(level="DEBUG")  # its handler writes to this stream
    finally:
        sys.stderr = saved
    library.addHandler(records)
    try:
        yield stream
    finally:
        library.removeHandler(records)  # the library's handlers are restored by conftest
    for record in records.records:
        assert record.getMessage().isprintable(), record.getMessage()


FORGED = "2099-01-01 CRITICAL root: FORGED"


def assert_not_forged(text: str) -> None:
    lines = text.splitlines()
    assert any("FORGED" in line for line in lines), text  # the value was logged...
    for line in lines:  # ...but never as a line of its own
        assert not line.startswith("2099-01-01"), text
        assert "\x1b" not in line and "\u2028" not in line and "\x85" not in line


def test_escape_log_value() -> None:
    assert escape_log_value("conv-1") == "conv-1"
    assert escape_log_value("a b/c:d") == "a b/c:d"
    assert escape_log_value("x\n2099 CRITICAL") == "x\\n2099 CRITICAL"
    assert escape_log_value("\r\t\x00\x1b[2J") == "\\r\\t\\u0000\\u001b[2J"
    assert escape_log_value("a\u2028b\u2029c\x85d") == "a\\u2028b\\u2029c\\u0085d"
    assert escape_log_value("back\\slash") == "back\\\\slash"  # unambiguous
    assert escape_log_value('it\'s "quoted"') == 'it\'s "quoted"'  # no Python repr quoting
    assert escape_log_value("naïve café 日本") == "naïve café 日本"
    assert escape_log_value(b"raw\npath") == "raw\\npath"
    assert escape_log_value(42) == "42"
    # what comes out is one printable line whose escapes JSON reads back
    hostile = "a\n\r\x1b\u2028\u2029\x85\x7f\ud800\U000e0001\\\u202e z"
    escaped = escape_log_value(hostile)
    assert escaped.isprintable() and "\n" not in escaped
    assert json.loads(f'"{escaped}"') == hostile
    assert escape_log_value("y" * 5000) == "y" * 1000 + "…(+4000 chars)"


def test_unsigned_path_cannot_forge_a_log_line() -> None:
    async def hook(request: Request) -> JSONResponse:
        return JSONResponse({"ran": True})

    app = Starlette(routes=[Route("/hooks/{name:path}", hook, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET, paths=["/hooks/*"])
    with captured_logs() as logs, serve(app) as url, httpx.Client(base_url=url) as client:
        for path in (
            "/hooks/x%0A2099-01-01%20CRITICAL%20root:%20FORGED",
            "/hooks/x%0D2099-01-01%20CRITICAL%20root:%20FORGED%1B[2J",
            "/hooks/x%E2%80%A82099-01-01%20CRITICAL%20root:%20FORGED",
        ):
            r = client.post(path, content=b"{}")
            assert r.status_code == 401
            r = client.post(path, content=b"{}", headers={"layercode-signature": "t=1,v1=0"})
            assert r.status_code == 401
    assert_not_forged(logs.getvalue())


@pytest.mark.parametrize("kind", ["agent-failure", "hook-failure", "unknown-type"])
def test_signed_conversation_id_cannot_forge_a_log_line(kind: str) -> None:
    hostile = f"c\n{FORGED}\r\u2028"

    def failing_hook(event: Any) -> None:
        raise RuntimeError(f"hook failed for {event.conversation_id}")

    app = create_app(settings(), agent=scripted_agent, on_data=failing_hook)
    if kind == "agent-failure":
        body = event_body("message", conversation_id=hostile, text="raise-before")
    elif kind == "hook-failure":
        body = data_body(conversation_id=hostile)
    else:  # an event type from the future, named by the sender
        body = msgspec.json.encode({"type": hostile, "conversation_id": hostile})
    with captured_logs() as logs, serve(app) as url, httpx.Client(base_url=url) as client:
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        r.read()
    assert r.status_code in (200, 500), r.text
    assert_not_forged(logs.getvalue())


# -- 6. root_path only at a / boundary -------------------------------------------------------------


def protected_app(**options: Any) -> Starlette:
    async def agent(request: Request) -> JSONResponse:
        return JSONResponse({"handler_ran": True, "body": (await request.body()).decode()})

    async def open_route(request: Request) -> JSONResponse:
        return JSONResponse({"open": True})

    app = Starlette(
        routes=[Route("/api/agent", agent, methods=["POST"]), Route("/open", open_route)]
    )
    app.add_middleware(LayercodeSignature, secret=SECRET, paths=["/api/agent"], **options)
    return app


def check_root_path_protection(url: str, prefix: str) -> None:
    """``prefix``: what a client puts before the app's own paths (hypercorn's ``root_path``
    is part of the request path; uvicorn's is added to it, as after a proxy)."""
    body = data_body()
    with httpx.Client(base_url=url, timeout=10) as client:
        if prefix:
            # A path that starts with the root path's text but not at a '/' boundary.
            r = client.post("/api/agent", content=body)
            assert r.status_code in (401, 404), r.text
            assert "handler_ran" not in r.text
        # The mounted path: signed passes, unsigned is refused.
        r = client.post(f"{prefix}/api/agent", content=body)
        assert r.status_code == 401, r.text
        r = client.post(f"{prefix}/api/agent", content=body, headers=signed_headers(body))
        assert (r.status_code, r.json()["handler_ran"]) == (200, True)
        assert client.get(f"{prefix}/open").json() == {"open": True}


def test_root_path_is_stripped_only_at_a_slash_boundary_hypercorn() -> None:
    with serve_hypercorn(protected_app(), root_path="/ap") as url:
        check_root_path_protection(url, "/ap")


def test_root_path_under_uvicorn() -> None:
    with serve(protected_app(), root_path="/ap") as url:
        check_root_path_protection(url, "")


def test_create_app_under_hypercorn_root_path() -> None:
    with serve_hypercorn(create_app(settings()), root_path="/ap") as url:
        body = data_body()
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/ap/api/agent", content=body).status_code == 401
            assert client.post("/api/agent", content=body).status_code in (401, 404)
            r = client.post("/ap/api/agent", content=body, headers=signed_headers(body))
            assert r.status_code == 200, r.text


# -- 7. what unauthenticated answers reveal -------------------------------------------------------


def test_store_failures_do_not_reveal_the_redis_url() -> None:
    port = free_port()  # nobody listens there
    redis_url = f"redis://agentuser:hunter2@127.0.0.1:{port}/7"
    app = create_app(settings(redis_url=redis_url))
    secrets = ("agentuser", "hunter2", str(port), "127.0.0.1", "/7", "Error", "refused")
    with (
        captured_logs() as logs,
        serve(app) as url,
        httpx.Client(base_url=url, timeout=20) as client,
    ):
        ready = client.get("/ready")
        turn_body = event_body("message")
        turn = client.post("/api/agent", content=turn_body, headers=signed_headers(turn_body))
        end_body = event_body("session.end")
        end = client.post("/api/agent", content=end_body, headers=signed_headers(end_body))
    assert ready.status_code == 503
    assert ready.json()["error"] == "conversation store unavailable"
    for r in (turn, end):
        assert r.status_code == 503, r.text
        assert r.json() == {"error": "conversation store unavailable"}
    for r in (ready, turn, end):
        for secret in secrets:
            assert secret not in r.text, (secret, r.text)
    assert str(port) in logs.getvalue()  # the details are in the log, for the operator


class Upstream:
    """A LayerCode API double whose authorize answer is scripted per test."""

    def __init__(self) -> None:
        self.response: Response = JSONResponse({"client_session_key": "csk"})
        self.app = Starlette(
            routes=[Route("/v1/agents/web/authorize_session", self.answer, methods=["POST"])]
        )

    async def answer(self, request: Request) -> Response:
        await request.body()
        return self.response


@pytest.fixture
def upstream() -> Iterator[tuple[Upstream, str]]:
    fake = Upstream()
    with serve(fake.app) as url:
        yield fake, url + "/v1"


def test_authorize_relays_only_the_error_message(upstream: tuple[Upstream, str]) -> None:
    fake, api = upstream
    app = create_app(settings(layercode_api_url=api))
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        fake.response = JSONResponse(
            {"error": "agent \x1b[2Jnot found\n" + "x" * 1000, "trace": "internal", "key": "k"},
            status_code=403,
            headers={"x-internal-host": "10.0.0.7"},
        )
        r = client.post("/api/authorize", json={"agent_id": "a"})
        assert r.status_code == 403
        assert list(r.json()) == ["error"]
        message = r.json()["error"]
        assert message.startswith("agent [2Jnot found")
        assert len(message) <= 200 and message.isprintable()
        assert "x-internal-host" not in r.headers

        fake.response = JSONResponse({"detail": "internal detail"}, status_code=422)
        r = client.post("/api/authorize", json={"agent_id": "a"})
        assert (r.status_code, r.json()) == (
            422,
            {"error": "LayerCode API refused the request (422)"},
        )

        fake.response = JSONResponse({"error": {"nested": "object"}}, status_code=400)
        r = client.post("/api/authorize", json={"agent_id": "a"})
        assert (r.status_code, r.json()) == (
            400,
            {"error": "LayerCode API refused the request (400)"},
        )


# -- 8. the authorize route's limits toward LayerCode ---------------------------------------------


def test_authorize_timeout_bounds_the_whole_call(upstream: tuple[Upstream, str]) -> None:
    """A LayerCode that drips its answer one byte every 0.1 s (each read is quick, the whole
    is not) is cut off after ``authorize_timeout``, not after the last byte."""
    fake, api = upstream
    answer = msgspec.json.encode({"client_session_key": "csk_dripped"})

    async def drip() -> AsyncIterator[bytes]:
        for i in range(len(answer)):  # bounded: ~3 s in all
            yield answer[i : i + 1]
            await asyncio.sleep(0.1)

    fake.response = StreamingResponse(drip(), media_type="application/json")
    app = create_app(settings(layercode_api_url=api), authorize_timeout=0.5)
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        r = client.post("/api/authorize", json={"agent_id": "a"})
    assert (r.status_code, r.json()) == (502, {"error": "LayerCode API timed out"})


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_authorize_upstream_body_is_bounded(upstream: tuple[Upstream, str], framing: str) -> None:
    fake, api = upstream
    huge = msgspec.json.encode({"client_session_key": "k", "padding": "x" * (2 * 1024 * 1024)})
    if framing == "content-length":
        fake.response = Response(huge, media_type="application/json")
    else:

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(huge), 65536):
                yield huge[i : i + 65536]

        fake.response = StreamingResponse(chunks(), media_type="application/json")
    app = create_app(settings(layercode_api_url=api))
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        r = client.post("/api/authorize", json={"agent_id": "a"})
    assert r.status_code == 502
    assert r.json() == {"error": "LayerCode API response too large (over 1048576 bytes)"}


# -- hardening: reject before the body, close the connection ----------------------------------


def raw_exchange(url: str, head: bytes, body: bytes = b"") -> tuple[bytes, bool]:
    """Send ``head`` (and ``body``) on a raw socket, then read the answer without sending
    anything else. Returns the bytes read and whether the server closed the connection.
    A server that waits for the announced body never answers: the read times out."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        received = b""
        closed = False
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if closed or len(received) > 1 << 20:
                break
        return received, closed


def request_head(path: str, length: int, signature: str | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: test", f"content-length: {length}"]
    if signature is not None:
        lines.append(f"layercode-signature: {signature}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


STALE = sign(b"{}", SECRET, timestamp=1_700_000_000)  # fixed: test ids must not change (xdist)


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (None, "missing signature header"),
        ("t=abc,v1=00", "malformed signature header"),
        ("v1=" + "0" * 64, "malformed signature header"),
        (STALE, "timestamp outside tolerance"),
    ],
)
@pytest.mark.parametrize("target", ["create_app", "middleware"])
def test_bad_signature_header_is_refused_before_the_body(
    signature: str | None, reason: str, target: str
) -> None:
    if target == "create_app":
        app: Any = create_app(settings(body_timeout=60))
    else:
        app = protected_app(body_timeout=60)
    with serve(app) as url:
        # The body (1000 bytes announced) never comes; the answer must not wait for it.
        answer, closed = raw_exchange(url, request_head("/api/agent", 1000, signature))
    status_line, _, _ = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 401 Unauthorized", answer
    assert b"\r\nconnection: close\r\n" in answer.lower(), answer
    assert msgspec.json.decode(answer.partition(b"\r\n\r\n")[2])["error"] == reason
    assert closed, answer


def test_valid_header_still_waits_for_the_body() -> None:
    body = data_body()
    with serve(create_app(settings())) as url:
        head = request_head("/api/agent", len(body), sign(body, SECRET))
        answer, _ = raw_exchange(url, head, body)
    assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.parametrize("target", ["create_app", "webhook"])
@pytest.mark.parametrize("declared", [True, False])
def test_too_large_closes_the_connection(declared: bool, target: str) -> None:
    limit = 1024
    big = b"x" * (limit * 4)
    if target == "create_app":
        app: Any = create_app(settings(max_body_size=limit))
    else:  # the webhook served on its own: its own limit, and no middleware
        app = LayercodeWebhook(scripted_agent, max_body_size=limit)
    with serve(app) as url:
        signature = sign(big, SECRET)
        if declared:
            head = request_head("/api/agent", len(big), signature)
        else:
            head = (
                "POST /api/agent HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n"
                f"layercode-signature: {signature}\r\n\r\n"
            ).encode()
            big = f"{len(big):x}\r\n".encode() + big + b"\r\n"  # the final chunk never comes
        # create_app refuses a declared length unread; the webhook alone reads to its limit.
        unread = declared and target == "create_app"
        answer, closed = raw_exchange(url, head, b"" if unread else big)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"\r\nconnection: close\r\n" in answer.lower(), answer
    assert closed, answer


# -- issue 15 item 8: a Redis error reply in the replay cache -----------------------------------


@pytest.mark.parametrize("failure", ["oom", "readonly"])
def test_replay_cache_redis_error_reply_is_503(
    redis_server: RedisServer,  # noqa: F811
    failure: str,
) -> None:
    import redis

    app = create_app(settings(redis_url=redis_server.url, replay_protection=True))
    admin = redis.Redis.from_url(redis_server.url)
    try:
        with (
            captured_logs() as logs,
            serve(app) as url,
            httpx.Client(base_url=url, timeout=10) as client,
        ):
            body = data_body()
            assert client.post("/api/agent", content=body, headers=signed_headers(body)).is_success
            if failure == "oom":
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", 1)
            else:
                admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            body = data_body(turn_id="turn-2")
            r = client.post("/api/agent", content=body, headers=signed_headers(body))
    finally:
        admin.close()
    assert r.status_code == 503, r.text
    assert r.json() == {"error": "replay protection unavailable"}
    assert ("OutOfMemoryError" if failure == "oom" else "ReadOnlyError") in logs.getvalue()
    assert "Traceback" not in r.text
