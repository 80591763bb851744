"""``create_app``: routes, errors, authorize against a fake LayerCode, history on Redis."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from httpx_sse import connect_sse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from layercode_asgi import (
    AgentNotFoundError,
    ConfigurationError,
    ConversationManager,
    HistoryMessage,
    RedisConversationStore,
    Settings,
    __version__,
    create_app,
    get_agent,
    sign,
)

from .asgi_stub import ASGIStub
from .conftest import (
    PYTHON,
    SECRET,
    ServerProcess,
    event_body,
    free_port,
    serve,
    signed_headers,
    start_server_process,
)
from .redis_fixtures import RedisServer, redis_server  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"layercode_webhook_secret": SECRET, "layercode_api_key": "lc_key"}
    base.update(overrides)
    return Settings(env_file=None, environ={}, **base)


def sse_events(client: httpx.Client, body: bytes, path: str = "/api/agent") -> list[dict[str, Any]]:
    with connect_sse(client, "POST", path, content=body, headers=signed_headers(body)) as source:
        assert source.response.status_code == 200, source.response.read()
        return [msgspec.json.decode(e.data) for e in source.iter_sse()]


# -- start-up errors -------------------------------------------------------------------------


def test_refuses_to_start_without_a_webhook_secret() -> None:
    with pytest.raises(ConfigurationError, match="LAYERCODE_WEBHOOK_SECRET"):
        create_app(Settings(env_file=None, environ={}))


def test_unknown_agent_lists_the_available_ones() -> None:
    with pytest.raises(AgentNotFoundError) as info:
        create_app(settings(), agent="nope")
    assert "echo" in str(info.value) and "openai" in str(info.value)
    assert info.value.available == ("echo", "openai", "starter")


def test_openai_agent_refuses_without_key() -> None:
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        create_app(settings(), agent="openai")


# -- the echo agent end to end over real HTTP ----------------------------------------------------


def test_echo_conversation_over_uvicorn() -> None:
    app = create_app(settings())
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        start = sse_events(client, event_body("session.start"))
        assert start == [
            {
                "type": "response.tts",
                "content": "Hello! I'm the echo agent. Say something and I'll say it back.",
                "turn_id": "turn-1",
            },
            {"type": "response.end", "turn_id": "turn-1"},
        ]
        reply = sse_events(client, event_body(text="ça va? 🎙️", turn_id="turn-2"))
        assert reply[0]["content"] == "You said: ça va? 🎙️"
        history = anyio.run(app.state.conversations.get_history, "conv-1")
        assert [(m.role, m.text) for m in history] == [
            ("assistant", "Hello! I'm the echo agent. Say something and I'll say it back."),
            ("user", "ça va? 🎙️"),
            ("assistant", "You said: ça va? 🎙️"),
        ]
        body = event_body("data", data={"x": 1})
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        body = event_body("session.end")
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        assert anyio.run(app.state.conversations.get_history, "conv-1") == []


def test_keep_history_after_session_end() -> None:
    app = create_app(settings(keep_history=True))
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        sse_events(client, event_body())
        body = event_body("session.end")
        client.post("/api/agent", content=body, headers=signed_headers(body))
        assert len(anyio.run(app.state.conversations.get_history, "conv-1")) == 2


def test_health_and_ready() -> None:
    with serve(create_app(settings())) as url, httpx.Client(base_url=url) as client:
        health = client.get("/health")
        assert health.status_code == 200
        data = health.json()
        assert set(data) == {"status", "timestamp", "version"}
        assert data["status"] == "healthy" and data["version"] == __version__
        assert datetime.fromisoformat(data["timestamp"]).tzinfo is not None
        ready = client.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True, "agent": "echo"})


def test_ready_reports_a_model_only_for_agents_that_use_one() -> None:
    """A registered agent is named as registered, as in the server API reference's
    ``{"ready": true, "agent": "starter", "model": "openai:gpt-5-nano"}`` (it was the
    function's name: ``starter_agent``); an agent of your own by its ``__name__``."""

    pytest.importorskip("pydantic_ai")  # the starter agent's

    async def my_agent(event: Any) -> Any:
        yield "hi"

    with_key = settings(openai_api_key="sk-test", default_model="openai:gpt-x")
    openai = create_app(with_key, "openai")
    starter = create_app(with_key, get_agent("starter", with_key))
    for app, expected in (
        (create_app(settings(), my_agent), {"ready": True, "agent": "my_agent"}),
        (create_app(settings(), get_agent("echo")), {"ready": True, "agent": "echo"}),
        (openai, {"ready": True, "agent": "openai", "model": "openai:gpt-x"}),
        (starter, {"ready": True, "agent": "starter", "model": "openai:gpt-x"}),
    ):
        with serve(app) as url, httpx.Client(base_url=url) as client:
            ready = client.get("/ready")
            assert (ready.status_code, ready.json()) == (200, expected)


def test_every_error_is_json() -> None:
    app = create_app(settings(max_body_size=1000))
    with serve(app) as url, httpx.Client(base_url=url) as client:
        cases = [
            (client.get("/nowhere"), 404),
            (client.get("/api/agent"), 405),
            (client.post("/health"), 405),
            (client.post("/api/agent", content=event_body()), 401),
            (
                client.post("/api/agent", content=b"x" * 2000, headers=signed_headers(b"x" * 2000)),
                413,
            ),
            (client.post("/api/agent", content=b"{}", headers=signed_headers(b"{}")), 400),
            (client.post("/api/authorize", content=b"[]"), 400),
            (client.get("/api/authorize"), 405),
            (client.post("/ready"), 405),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert response.headers["content-type"] == "application/json", response.text
            assert isinstance(response.json()["error"], str)
            assert "Traceback" not in response.text
        assert cases[1][0].headers["allow"] == "POST"
        # Every 405 says which method to use, as LayercodeWebhook's own does.
        refused = [response for response, status in cases if status == 405]
        for response, use in zip(
            refused, ["POST", "GET or HEAD", "POST", "GET or HEAD"], strict=True
        ):
            assert response.json() == {"error": f"method not allowed; use {use}"}
            assert use.split(" or ") == response.headers["allow"].split(", ")


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/api/agent", "/api/authorize"])
def test_a_405_names_every_method_its_allow_header_lists_and_each_is_served(path: str) -> None:
    if path == "/metrics":  # the route is there only with metrics on, which needs the extra
        pytest.importorskip("prometheus_client")
    app = create_app(settings(metrics=path == "/metrics"))
    with serve(app) as url, httpx.Client(base_url=url) as client:
        refused = client.request("PUT", path)
        assert refused.status_code == 405
        allow = refused.headers["allow"].split(", ")
        assert allow == sorted(allow)
        assert refused.json() == {"error": f"method not allowed; use {' or '.join(allow)}"}
        for method in allow:
            served = client.request(method, path)
            assert served.status_code != 405, method
            if method == "HEAD":
                assert (served.status_code, served.content) == (200, b"")


def test_a_route_spelled_with_a_trailing_slash_is_a_json_404_not_a_redirect() -> None:
    # Starlette's default answers /api/agent/ with a 307 to an http:// URL built from the
    # Host header: a webhook client following it would re-send the body in clear text.
    app = create_app(settings())
    with serve(app) as url, httpx.Client(base_url=url, follow_redirects=False) as client:
        body = event_body()
        for response in (
            client.post("/api/agent/", content=body, headers=signed_headers(body)),
            client.post("/api/authorize/", content=b"{}", headers={"host": "evil.example"}),
            client.get("/health/"),
            client.get("/ready/"),
        ):
            assert response.status_code == 404, (response.request.url, response.headers)
            assert response.json() == {"error": "not found"}
            assert "location" not in response.headers


def test_malformed_webhook_names_the_field() -> None:
    with serve(create_app(settings())) as url, httpx.Client(base_url=url) as client:
        body = b'{"type":"message","session_id":"s","conversation_id":"c","turn_id":5}'
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert r.status_code == 400
        assert r.json()["path"] == "$.turn_id"
        body = event_body("response.brand_new")
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert (r.status_code, r.json()) == (200, {"status": "ignored"})
        body = event_body(conversation_id="")
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert r.status_code == 400
        assert "conversation_id" in r.json()["error"]


def mounted(framework: str, app: Any) -> Any:
    """``app`` mounted under ``/voice`` in ``framework``'s way (docs/server.md)."""
    if framework == "starlette":
        return Starlette(routes=[Mount("/voice", app=app)])
    if framework == "fastapi":
        fastapi = pytest.importorskip("fastapi")
        parent = fastapi.FastAPI()
        parent.mount("/voice", app)
        return parent
    litestar = pytest.importorskip("litestar")

    @litestar.asgi("/voice", is_static=True, copy_scope=True)
    async def voice(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    return litestar.Litestar([voice])


@pytest.mark.parametrize("framework", ["starlette", "fastapi", "litestar"])
def test_mounted_inside_another_app(framework: str) -> None:
    app = create_app(settings(authorize_api_keys="k"))
    with serve(mounted(framework, app)) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/voice/health").json()["status"] == "healthy"
        assert client.get("/voice/ready").json()["ready"] is True
        events = sse_events(client, event_body(), path="/voice/api/agent")
        assert events[-1] == {"type": "response.end", "turn_id": "turn-1"}
        body = event_body()
        unsigned = client.post("/voice/api/agent", content=body)
        assert (unsigned.status_code, unsigned.json()) == (
            401,
            {"error": "missing signature header"},
        )
        assert client.get("/voice/api/agent").json() == {"error": "method not allowed; use POST"}
        unguarded = client.post("/voice/api/authorize", json={"agent_id": "a"})
        assert (unguarded.status_code, unguarded.json()) == (
            401,
            {"error": "missing or invalid API key"},
        )
        assert client.get("/voice/nope").json() == {"error": "not found"}


def test_hooks_are_called() -> None:
    seen: list[str] = []

    async def on_data(event: Any) -> dict[str, Any]:
        return {"echo": event.data}

    def on_end(event: Any) -> None:
        seen.append(event.type)

    app = create_app(settings(), on_data=on_data, on_session_end=on_end)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        body = event_body("data", data={"k": [1]})
        assert client.post("/api/agent", content=body, headers=signed_headers(body)).json() == {
            "echo": {"k": [1]}
        }
        body = event_body("session.end")
        client.post("/api/agent", content=body, headers=signed_headers(body))
    assert seen == ["session.end"]


def test_one_log_line_per_webhook(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="layercode_asgi.webhook"):
        with serve(create_app(settings())) as url, httpx.Client(base_url=url) as client:
            sse_events(client, event_body(turn_id="t-77"))
        lines = [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.webhook"]
    assert len(lines) == 1, lines
    assert "type=message" in lines[0] and "conversation=conv-1" in lines[0]
    assert "turn=t-77" in lines[0] and "status=200" in lines[0] and "duration_ms=" in lines[0]


# -- the authorize route against a fake LayerCode API --------------------------------------------


class FakeLayercode:
    """A LayerCode REST API double on 127.0.0.1, scripted per test."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.answer: Any = {
            "client_session_key": "csk_123",
            "conversation_id": "conv-9",
            "config": {"voice": "x"},
        }
        self.delay = 0.0
        self.headers: dict[str, str] = {}
        self.app = Starlette(
            routes=[Route("/v1/agents/web/authorize_session", self.authorize, methods=["POST"])]
        )

    async def authorize(self, request: Request) -> Response:
        self.requests.append((request.url.path, dict(request.headers), await request.body()))
        if self.delay:
            await anyio.sleep(self.delay)
        if isinstance(self.answer, bytes):
            return Response(self.answer, status_code=self.status, headers=self.headers)
        return JSONResponse(self.answer, status_code=self.status, headers=self.headers)


@pytest.fixture
def layercode() -> Iterator[tuple[FakeLayercode, str]]:
    fake = FakeLayercode()
    with serve(fake.app) as url:
        yield fake, url + "/v1"


def test_authorize_relays_success(layercode: tuple[FakeLayercode, str]) -> None:
    fake, api = layercode
    app = create_app(settings(layercode_api_url=api))
    body = b'{"agent_id":"ag_1","metadata":{"user":"u1"}}'
    with serve(app) as url, httpx.Client(base_url=url) as client:
        r = client.post("/api/authorize", content=body)
    assert (r.status_code, r.json()) == (200, fake.answer)
    path, headers, sent = fake.requests[0]
    assert path == "/v1/agents/web/authorize_session"
    assert headers["authorization"] == "Bearer lc_key"
    assert sent == body


@pytest.mark.parametrize(
    ("status", "answer", "expected_status", "expected"),
    [
        (403, {"error": "agent not found"}, 403, {"error": "agent not found"}),
        (
            422,
            {"detail": "bad config"},
            422,
            {"error": "LayerCode API refused the request (422)"},  # no other field relayed
        ),
        (400, b"plain text", 400, {"error": "LayerCode API refused the request (400)"}),
        (500, {"error": "oops"}, 502, {"error": "LayerCode API error (500)"}),
        (200, b"not json", 502, {"error": "LayerCode API sent an invalid response"}),
        (
            200,
            b"[" * 100_000 + b"]" * 100_000,
            502,
            {"error": "LayerCode API sent an invalid response"},
        ),
        (
            403,
            b"[" * 100_000 + b"]" * 100_000,
            403,
            {"error": "LayerCode API refused the request (403)"},
        ),
    ],
)
def test_authorize_upstream_answers(
    layercode: tuple[FakeLayercode, str],
    status: int,
    answer: Any,
    expected_status: int,
    expected: dict[str, Any],
) -> None:
    fake, api = layercode
    fake.status, fake.answer = status, answer
    with serve(create_app(settings(layercode_api_url=api))) as url, httpx.Client(base_url=url) as c:
        r = c.post("/api/authorize", json={"agent_id": "ag_1"})
    assert (r.status_code, r.json()) == (expected_status, expected)


@pytest.mark.parametrize(
    ("encoding", "answer"),
    [
        ("gzip", gzip.compress(b'{"client_session_key":"csk_1"}', mtime=0)),
        ("gzip", gzip.compress(b" " * (32 << 20), mtime=0)),  # ~32 KiB that decode to 32 MiB
        ("gzip, gzip", gzip.compress(gzip.compress(b" " * (32 << 20), mtime=0), mtime=0)),
        ("deflate", zlib.compress(b'{"error":"agent not found"}')),
    ],
)
@pytest.mark.parametrize("status", [200, 403])
def test_authorize_refuses_an_encoded_upstream_answer(
    layercode: tuple[FakeLayercode, str], encoding: str, answer: bytes, status: int
) -> None:
    """It asks for ``accept-encoding: identity``; a compressed answer anyway (a proxy) would
    be decompressed without bound before the 1 MiB check: refused, whatever it holds."""
    fake, api = layercode
    fake.status, fake.answer, fake.headers = status, answer, {"content-encoding": encoding}
    with serve(create_app(settings(layercode_api_url=api))) as url, httpx.Client(base_url=url) as c:
        r = c.post("/api/authorize", json={"agent_id": "ag_1"})
    assert (r.status_code, r.json()) == (502, {"error": "LayerCode API sent an invalid response"})
    assert fake.requests[0][1]["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("status", "answer", "expected_status", "expected"),
    [
        # a proxy (or a misconfigured LAYERCODE_API_URL) echoing our request back
        (
            200,
            b'{"client_session_key":"csk","echo":{"authorization":"Bearer lc_live_7f3a"}}',
            502,
            {"error": "LayerCode API sent an invalid response"},
        ),
        (  # the same key, spelled with JSON escapes
            200,
            b'{"client_session_key":"csk","k":"\\u006cc_live_7f3a"}',
            502,
            {"error": "LayerCode API sent an invalid response"},
        ),
        (
            401,
            b'{"error":"invalid API key: Bearer lc_live_7f3a"}',
            401,
            {"error": "LayerCode API refused the request (401)"},
        ),
        (  # split by a control character, which the relayed line drops
            403,
            b'{"error":"bad token lc_\\u0001live_7f3a"}',
            403,
            {"error": "LayerCode API refused the request (403)"},
        ),
        (  # past the 200 characters relayed: their cut would show the key's first part
            403,
            b'{"error":"' + b"x" * 195 + b' lc_live_7f3a"}',
            403,
            {"error": "LayerCode API refused the request (403)"},
        ),
    ],
)
def test_authorize_never_relays_our_api_key(
    layercode: tuple[FakeLayercode, str],
    status: int,
    answer: bytes,
    expected_status: int,
    expected: dict[str, Any],
) -> None:
    fake, api = layercode
    fake.status, fake.answer = status, answer
    app = create_app(settings(layercode_api_url=api, layercode_api_key="lc_live_7f3a"))
    with serve(app) as url, httpx.Client(base_url=url) as c:
        r = c.post("/api/authorize", json={"agent_id": "ag_1"})
    assert (r.status_code, r.json()) == (expected_status, expected)
    assert "lc_" not in r.text


def test_authorize_upstream_unreachable_and_timeout(layercode: tuple[FakeLayercode, str]) -> None:
    fake, api = layercode
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with (
        serve(create_app(settings(layercode_api_url=dead))) as url,
        httpx.Client(base_url=url) as c,
    ):
        r = c.post("/api/authorize", json={"agent_id": "ag_1"})
    assert (r.status_code, r.json()) == (502, {"error": "LayerCode API unreachable"})

    fake.delay = 3
    app = create_app(settings(layercode_api_url=api), authorize_timeout=0.3)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        started = time.monotonic()
        r = c.post("/api/authorize", json={"agent_id": "ag_1"})
        assert time.monotonic() - started < 2.5
    assert (r.status_code, r.json()) == (502, {"error": "LayerCode API timed out"})


def test_authorize_validates_input(layercode: tuple[FakeLayercode, str]) -> None:
    fake, api = layercode
    with serve(create_app(settings(layercode_api_url=api))) as url, httpx.Client(base_url=url) as c:
        deep = b"[" * 30_000 + b"]" * 30_000  # deeper than the JSON decoder goes, under 64 KiB
        for body in (b"{}", b'{"agent_id":""}', b'{"agent_id":5}', b"nope", b"[1]", b"", deep):
            r = c.post("/api/authorize", content=body)
            assert r.status_code == 400, body
            assert "agent_id" in r.json()["error"]
    assert fake.requests == []


@pytest.mark.anyio
async def test_authorize_client_leaving_mid_body_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller gone before its whole body arrived: nothing to log as an error (it was a 500
    and two ERROR stack traces of ``ClientDisconnect``). Its 400 is only for middleware
    outside (the server drops it): test_composition.py."""
    app = create_app(settings())
    headers = [(b"content-length", b"100"), (b"content-type", b"application/json")]
    stub = ASGIStub(b'{"agent_id":', path="/api/authorize", headers=headers, leave_mid_body=True)
    with caplog.at_level(logging.WARNING):
        await stub.run(app)
    assert stub.status == 400
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_authorize_without_api_key_is_503(layercode: tuple[FakeLayercode, str]) -> None:
    _, api = layercode
    app = create_app(settings(layercode_api_url=api, layercode_api_key=None))
    with serve(app) as url, httpx.Client(base_url=url) as c:
        r = c.post("/api/authorize", json={"agent_id": "a"})
    assert r.status_code == 503
    assert "LAYERCODE_API_KEY" in r.json()["error"]


def test_authorize_guard_keys_and_callable(
    layercode: tuple[FakeLayercode, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, api = layercode
    app = create_app(settings(layercode_api_url=api, authorize_api_keys="k1,k2"))
    with serve(app) as url, httpx.Client(base_url=url) as c:
        for headers in (
            {},
            {"x-api-key": "wrong"},
            {"authorization": "Bearer nope"},
            {"authorization": "k1"},
        ):
            r = c.post("/api/authorize", json={"agent_id": "a"}, headers=headers)
            assert (r.status_code, r.json()) == (401, {"error": "missing or invalid API key"})
        assert (
            c.post(
                "/api/authorize", json={"agent_id": "a"}, headers={"x-api-key": "k2"}
            ).status_code
            == 200
        )
        assert (
            c.post(
                "/api/authorize", json={"agent_id": "a"}, headers={"authorization": "Bearer k1"}
            ).status_code
            == 200
        )
    assert len(fake.requests) == 2

    async def guard(request: Request) -> bool:
        return request.headers.get("x-session") == "ok"

    for keys in ("", "k1"):
        app = create_app(
            settings(layercode_api_url=api, authorize_api_keys=keys), authorize_guard=guard
        )
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="layercode_asgi.server"),
            serve(app) as url,
            httpx.Client(base_url=url) as c,
        ):
            assert c.post("/api/authorize", json={"agent_id": "a"}).status_code == 401
            for headers in ({"x-session": "ok"}, {"x-session": "ok", "x-api-key": "wrong"}):
                response = c.post("/api/authorize", json={"agent_id": "a"}, headers=headers)
                assert response.status_code == 200
        # Both given: the guard alone decides (documented), said at start-up; before, in silence.
        assert [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.server"] == (
            [
                "authorize_guard replaces LAYERCODE_AUTHORIZE_API_KEYS: the authorize route "
                "/api/authorize checks the guard only, not the keys"
            ]
            if keys
            else []
        )


def test_authorize_key_is_printable_ascii_and_other_bytes_get_401(
    layercode: tuple[FakeLayercode, str],
) -> None:
    # Before: a key like "clé" was taken and matched curl's UTF-8 bytes only (browsers and
    # requests send latin-1, httpx refuses): every key is printable ASCII, as LAYERCODE_API_KEY.
    with pytest.raises(ConfigurationError, match=r"^LAYERCODE_AUTHORIZE_API_KEYS: expected"):
        Settings(env_file=None, environ={"LAYERCODE_AUTHORIZE_API_KEYS": "clé-1"})
    fake, api = layercode
    app = create_app(settings(layercode_api_url=api, authorize_api_keys="cl e-1"))
    with serve(app) as url, httpx.Client(base_url=url) as c:
        for sent in ({"x-api-key": "cl e-1"}, {"authorization": "Bearer cl e-1"}):
            assert c.post("/api/authorize", json={"agent_id": "a"}, headers=sent).status_code == 200
        for raw in ("clé-1".encode(), "clé-1".encode("latin-1"), b"Bearer cl\xc3\xa9-1"):
            sent = {"authorization" if raw.startswith(b"Bearer") else "x-api-key": raw}
            assert c.post("/api/authorize", json={"agent_id": "a"}, headers=sent).status_code == 401
    assert len(fake.requests) == 2


def test_cors_for_explicit_origins(layercode: tuple[FakeLayercode, str]) -> None:
    _, api = layercode
    app = create_app(settings(layercode_api_url=api, cors_origins="https://app.example.com"))
    with serve(app) as url, httpx.Client(base_url=url) as c:
        preflight = {
            "origin": "https://app.example.com",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-api-key",
        }
        r = c.options("/api/authorize", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = c.options("/api/authorize", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = c.post(
            "/api/authorize", json={"agent_id": "a"}, headers={"origin": "https://app.example.com"}
        )
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"


def test_refused_cors_preflight_is_json(layercode: tuple[FakeLayercode, str]) -> None:
    """A preflight CORS refuses is a 400 like every other error: JSON (it was plain text)."""
    _, api = layercode
    app = create_app(settings(layercode_api_url=api, cors_origins="https://app.example.com"))
    preflight = {"origin": "https://app.example.com", "access-control-request-method": "POST"}
    with serve(app) as url, httpx.Client(base_url=url) as c:
        for headers, expected in [
            ({"origin": "https://evil.example"}, "disallowed cors origin"),
            ({"access-control-request-method": "DELETE"}, "disallowed cors method"),
            ({"access-control-request-headers": "x-evil"}, "disallowed cors headers"),
        ]:
            r = c.options("/api/authorize", headers={**preflight, **headers})
            assert (r.status_code, r.json()) == (400, {"error": expected}), headers
            assert r.headers["content-type"] == "application/json"
            assert r.headers["access-control-max-age"] == "600"  # CORS' own headers stay


# -- Redis: readiness, and two worker processes sharing history ------------------------------------


def test_ready_is_503_when_redis_is_down(redis_server: RedisServer) -> None:  # noqa: F811
    app = create_app(settings(redis_url=redis_server.url))
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/ready").status_code == 200
        redis_server.stop()
        started = time.monotonic()
        r = client.get("/ready")
        assert time.monotonic() - started < 5
        assert r.status_code == 503
        assert r.json()["ready"] is False and "error" in r.json()
        body = event_body()
        r = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/json"
        redis_server.start()
        assert client.get("/ready").status_code == 200
        assert sse_events(client, event_body())[-1]["type"] == "response.end"


def test_cluster_that_cannot_be_reached_is_503_not_500(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # LAYERCODE_REDIS_CLUSTER=true with no node reachable (or a Redis not in cluster mode):
    # the cluster client raises RedisClusterException, which is not a RedisError; turns and
    # session.end answered 500 with a stack trace in the log.
    for url in (redis_server.url, f"redis://:s3cret@127.0.0.1:{free_port()}/0"):
        app = create_app(settings(redis_url=url, redis_cluster=True))
        caplog.clear()
        with serve(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            for body in (event_body(), event_body("session.end")):
                r = client.post("/api/agent", content=body, headers=signed_headers(body))
                assert r.status_code == 503, (url, r.text)
                assert r.json() == {"error": "conversation store unavailable"}
            assert client.get("/ready").status_code == 503
        assert "Traceback" not in caplog.text and "s3cret" not in caplog.text


def worker(env: dict[str, str]) -> ServerProcess:
    """``uvicorn --factory layercode_asgi.server:app_from_env`` as its own process, once /ready."""
    return start_server_process(
        [PYTHON, "-m", "uvicorn", "--factory", "layercode_asgi.server:app_from_env",
         "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
        env=env, ready_path="/ready", timeout=20,
    )  # fmt: skip


def test_two_workers_share_history_and_the_lock(redis_server: RedisServer) -> None:  # noqa: F811
    import redis

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LAYERCODE_WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_server.url,
        "LAYERCODE_AGENT": "tests.agents_for_tests:history_agent",
    }
    with worker(env) as first, worker(env) as second:
        workers = [first, second]
        clients = [httpx.Client(base_url=w.url, timeout=20) for w in workers]
        pids = set()
        for i in range(8):  # turns alternate between the two processes
            events = sse_events(clients[i % 2], event_body(text=f"m{i}", turn_id=f"t{i}"))
            said = events[0]["content"]
            assert f"saw={2 * i}" in said, said
            pids.add(said.split()[0])
        assert len(pids) == 2, "both worker processes answered"

        # A slow turn on worker 0 holds the lock until its stream ends; the next turn,
        # sent meanwhile to worker 1, waits and then sees the slow turn's full reply.
        results: dict[str, list[dict[str, Any]]] = {}

        def slow() -> None:
            results["slow"] = sse_events(clients[0], event_body(text="slow one", turn_id="t8"))

        thread = threading.Thread(target=slow)
        thread.start()
        with redis.Redis.from_url(redis_server.url) as raw:
            for _ in range(1000):  # bounded (20 s): until the slow turn holds the lock
                if raw.exists("layercode:{conv-1}:lock"):
                    break
                time.sleep(0.02)  # (not a fixed pause: a busy machine may take longer)
            assert raw.exists("layercode:{conv-1}:lock")
        results["next"] = sse_events(clients[1], event_body(text="after", turn_id="t9"))
        thread.join(10)
        assert "saw=16" in results["slow"][0]["content"]
        assert "saw=18" in results["next"][0]["content"]

        async def stored() -> list[HistoryMessage]:
            async with ConversationManager(RedisConversationStore(redis_server.url)) as history:
                return await history.get_history("conv-1")

        history = anyio.run(stored)
        assert [m.role for m in history] == ["user", "assistant"] * 10
        assert [m.text for m in history if m.role == "user"] == [f"m{i}" for i in range(8)] + [
            "slow one",
            "after",
        ]
        assert history[17].text.endswith("(slow done)")
        assert [m.turn_id for m in history[::2]] == [f"t{i}" for i in range(10)]
        for client in clients:
            client.close()


@pytest.fixture
def server_never_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's ``Server.run`` fails the test: ``run_server`` must refuse before it."""
    import uvicorn

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", started)


@pytest.mark.usefixtures("server_never_starts")
@pytest.mark.parametrize("grace", [float("nan"), -1, float("inf"), "30"])
def test_run_server_refuses_an_invalid_grace_period(grace: Any) -> None:
    # Accepted before: NaN made the drain deadline never pass (the server only stopped at a
    # second signal), -1 ended every open turn at once.
    from layercode_asgi.server import run_server

    app = create_app(settings())
    with pytest.raises(ConfigurationError, match="grace_period must be a finite number >= 0"):
        run_server(app, grace_period=grace, port=0)


@pytest.mark.usefixtures("server_never_starts")
@pytest.mark.parametrize("limit", [0, -1, True, "5", 1.5])
def test_run_server_refuses_an_invalid_max_requests(limit: Any) -> None:
    from layercode_asgi.server import run_server

    app = create_app(settings())
    with pytest.raises(ConfigurationError, match="limit_max_requests must be an integer > 0"):
        run_server(app, port=0, limit_max_requests=limit)
    with pytest.raises(ConfigurationError, match="limit_max_requests_jitter must be an integer"):
        run_server(app, port=0, limit_max_requests=5, limit_max_requests_jitter="3")


def test_an_app_served_again_after_a_drain_is_not_draining(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the drain's flags outlived the server: the same app served again by run_server
    # answered every webhook 503 "server is shutting down", and /ready 503.
    from layercode_asgi.server import run_server

    caplog.set_level(logging.INFO, logger="layercode_asgi.server")
    app = create_app(settings())
    answered: list[tuple[int, int]] = []
    for _ in range(2):
        sock = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"

        def talk(url: str = url) -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                try:
                    body = event_body()
                    webhook = client.post("/api/agent", content=body, headers=signed_headers(body))
                    answered.append((webhook.status_code, client.get("/ready").status_code))
                except httpx.HTTPError:  # the server stops all the same (its limit reached)
                    for _ in range(2):
                        with contextlib.suppress(httpx.HTTPError):
                            client.get("/health")

        # limit_max_requests drains as SIGTERM does, after these two answers
        talker = threading.Thread(target=talk)
        talker.start()  # its connection waits in the listening socket's backlog
        try:
            run_server(
                app, sockets=[sock], limit_max_requests=2, grace_period=0.25, log_level="warning"
            )
        finally:
            talker.join(10)
            sock.close()
    assert answered == [(200, 200), (200, 200)]
    # Before: "for up to 0 s", a grace period under a second shown rounded to none.
    drain = "limit_max_requests (2) reached: draining 0 open webhook(s) for up to 0.25 s"
    assert [r.getMessage() for r in caplog.records if "draining" in r.getMessage()] == [drain] * 2


def test_a_webhook_body_still_arriving_when_the_drain_ends_gets_503() -> None:
    # Before: the body read went on until LAYERCODE_BODY_TIMEOUT (408), or until uvicorn's
    # own shutdown timeout cut it: its plain-text 500 and a traceback in the log.
    from layercode_asgi.server import run_server

    app = create_app(settings(body_timeout=5))
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    answered: list[bytes] = []

    def talk() -> None:
        body = event_body()
        head = (
            f"POST /api/agent HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n"
            f"layercode-signature: {sign(body, SECRET)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            try:
                slow.sendall(head.encode() + body[:5])  # the rest never comes
                for _ in range(500):  # until the server reads its body (bounded: 5 s)
                    if app.state.lifecycle.active:
                        break
                    time.sleep(0.01)
            finally:  # the one request limit_max_requests waits for: the drain starts
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
            answered.append(slow.recv(65536))

    talker = threading.Thread(target=talk)
    talker.start()
    try:
        run_server(app, sockets=[sock], limit_max_requests=1, grace_period=0, log_level="warning")
    finally:
        talker.join(15)
        sock.close()
    head, _, content = answered[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answered
    assert msgspec.json.decode(content) == {"error": "server is shutting down"}


def test_redis_replay_cache_refuses_invalid_timeouts() -> None:
    pytest.importorskip("redis")
    from layercode_asgi import RedisReplayCache

    for name in ("socket_timeout", "socket_connect_timeout"):
        for value in (float("nan"), 0, -1, float("inf"), True):
            with pytest.raises(ConfigurationError, match=f"{name} must be a finite number > 0"):
                RedisReplayCache("redis://127.0.0.1:1", **{name: value})


@pytest.mark.usefixtures("server_never_starts")
def test_run_server_refuses_an_app_not_built_by_create_app() -> None:
    # Before: an AttributeError stack trace ('State' object has no attribute 'lifecycle').
    from layercode_asgi.server import run_server

    for app in (Starlette(), object()):
        with pytest.raises(ConfigurationError, match="run_server serves an app from create_app"):
            run_server(app, port=0)  # type: ignore[arg-type]
