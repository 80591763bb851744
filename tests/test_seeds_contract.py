"""The contract of the two reference documents the project started from (the SDK reference
and the server API reference), item by item, for the items no other test proves: where each
name imports from, the signatures, every event field with its type, default and whether it
is required, the settings and their variables, and the server example run as written with
this package's names (its module paths are ``layercode_asgi.<concept>``, not the reference's).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import layercode_asgi
from layercode_asgi import (
    InvalidPayloadError,
    Settings,
    SignatureVerificationError,
    create_app,
    parse_webhook_payload,
    sign,
    verify_signature,
)

from .conftest import SECRET, event_body, serve, signed_headers

# -- names and where they import from ----------------------------------------------------------

# (module, names): the reference's sdk.events, sdk.auth, sdk.stream, config, logging, agents,
# server.app and server.conversation, each under the module of its concept.
MODULES = [
    (
        "layercode_asgi.events",
        "SessionStartPayload MessagePayload DataPayload SessionUpdatePayload SessionEndPayload "
        "TranscriptItem parse_webhook_payload",
    ),
    ("layercode_asgi.signature", "verify_signature SignatureVerificationError"),
    ("layercode_asgi.sse", "create_sse_response format_sse_message"),
    ("layercode_asgi.config", "Settings"),
    ("layercode_asgi.logs", "setup_logging"),
    ("layercode_asgi.agents", "AgentNotFoundError get_agent"),
    ("layercode_asgi.server", "create_app"),
    ("layercode_asgi.conversation", "ConversationManager"),
]


@pytest.mark.parametrize(
    ("module", "name"), [(module, name) for module, names in MODULES for name in names.split()]
)
def test_every_reference_name_imports_from_its_module_and_the_package(
    module: str, name: str
) -> None:
    found = getattr(importlib.import_module(module), name)
    assert getattr(layercode_asgi, name) is found
    assert name in layercode_asgi.__all__


# -- signatures ----------------------------------------------------------------------------------

_EMPTY = inspect.Parameter.empty

# The reference's parameters, in order: (name, default) with _EMPTY for a required one.
SIGNATURES: list[tuple[str, list[tuple[str, Any]]]] = [
    (
        "verify_signature",
        [("payload", _EMPTY), ("signature", _EMPTY), ("secret", _EMPTY), ("tolerance", 300)],
    ),
    ("create_sse_response", [("generator", _EMPTY)]),
    ("format_sse_message", [("data", _EMPTY), ("event", None), ("id", None)]),
    ("setup_logging", [("verbose", False), ("logfire_token", None)]),
    (
        "create_app",
        # settings and agent have defaults here (from the environment; the echo agent)
        [
            ("settings", None),
            ("agent", None),
            ("agent_route", "/api/agent"),
            ("authorize_route", "/api/authorize"),
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_signatures_keep_the_reference_parameters(name: str, expected: list[Any]) -> None:
    params = list(inspect.signature(getattr(layercode_asgi, name)).parameters.values())
    seed = params[: len(expected)]
    assert [(p.name, p.default) for p in seed] == expected
    # each is positional as in the reference (callable by position or by name)
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in seed)
    # whatever this package adds after them is optional: the reference's calls still work
    assert all(p.default is not _EMPTY for p in params[len(expected) :])


# -- events: every field of the reference ------------------------------------------------------

ISO = "2025-01-15T10:30:00Z"
TRANSCRIPT = [{"role": "user", "text": "hi", "timestamp": ISO}, {"role": "assistant", "text": "yo"}]
_COMMON_TAIL = [
    ("metadata", {"k": 1}),
    ("from_phone_number", "+15550100"),
    ("to_phone_number", "+15550111"),
]
# (type, payload class name, has turn_id, [(optional field, a value of the reference's type)])
EVENTS: list[tuple[str, str, bool, list[tuple[str, Any]]]] = [
    ("session.start", "SessionStartPayload", True, [("text", "hello"), *_COMMON_TAIL]),
    (
        "message",
        "MessagePayload",
        True,
        [
            ("text", "hello"),
            ("recording_url", "https://r.example/a.wav"),
            ("recording_status", "completed"),
            ("transcript", "hello there"),
            ("usage", {"tokens": 3}),
            *_COMMON_TAIL,
        ],
    ),
    ("data", "DataPayload", True, _COMMON_TAIL),
    (
        "session.update",
        "SessionUpdatePayload",
        False,
        [
            ("recording_status", "completed"),
            ("recording_url", "https://r.example/a.wav"),
            ("recording_duration", 12.5),
            ("error_message", "upload failed"),
            *_COMMON_TAIL,
        ],
    ),
    (
        "session.end",
        "SessionEndPayload",
        False,
        [
            ("agent_id", "ag_1"),
            ("started_at", ISO),
            ("ended_at", ISO),
            ("duration", 61_000),
            ("transcription_duration_seconds", 4.5),
            ("tts_duration_seconds", 7.25),
            ("latency", 0.3),
            ("ip_address", "203.0.113.7"),
            ("country_code", "NZ"),
            ("recording_status", "enabled"),
            ("transcript", TRANSCRIPT),
            *_COMMON_TAIL,
        ],
    ),
]


def _required(event_type: str, has_turn_id: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"type": event_type, "session_id": "s1", "conversation_id": "c1"}
    if has_turn_id:
        body["turn_id"] = "t1"
    if event_type == "data":
        body["data"] = {"button": "buy"}
    return body


@pytest.mark.parametrize(("event_type", "cls_name", "has_turn_id", "fields"), EVENTS)
def test_event_type_class_and_turn_id_as_in_the_reference_table(
    event_type: str, cls_name: str, has_turn_id: bool, fields: list[Any]
) -> None:
    event = parse_webhook_payload(_required(event_type, has_turn_id))
    assert type(event) is getattr(layercode_asgi.events, cls_name)
    assert event.type == event_type
    assert ("turn_id" in type(event).__struct_fields__) is has_turn_id
    if has_turn_id:
        assert event.turn_id == "t1"  # type: ignore[union-attr]
    # the ids are required, each named by the error
    for required in ("session_id", "conversation_id", *(["turn_id"] if has_turn_id else [])):
        body = _required(event_type, has_turn_id)
        del body[required]
        with pytest.raises(InvalidPayloadError) as info:
            parse_webhook_payload(body)
        assert info.value.path == f"$.{required}"


@pytest.mark.parametrize(
    ("event_type", "has_turn_id", "field", "value"),
    [(e[0], e[2], name, value) for e in EVENTS for name, value in e[3]],
)
def test_every_optional_reference_field_decodes_and_defaults_to_none(
    event_type: str, has_turn_id: bool, field: str, value: Any
) -> None:
    body = _required(event_type, has_turn_id)
    assert getattr(parse_webhook_payload(body), field) is None
    assert getattr(parse_webhook_payload({**body, field: None}), field) is None
    got = getattr(parse_webhook_payload(msgspec.json.encode({**body, field: value})), field)
    if field == "transcript" and isinstance(value, list):
        assert [msgspec.structs.asdict(item) for item in got] == [
            {"timestamp": None, "extra": None, **item} for item in value
        ]
        assert got[0].role == "user" and got[0].text == "hi" and got[0].timestamp == ISO
    else:
        assert got == value and type(got) is type(value)


def test_data_payload_data_is_the_clients_json() -> None:
    value = {"button": "buy", "form": {"qty": 2, "tags": ["a"]}}
    body = {**_required("data", True), "data": value}
    assert parse_webhook_payload(msgspec.json.encode(body)).data == value  # type: ignore[union-attr]


# -- signature verification, as the reference's examples use it ----------------------------------


def test_verify_signature_true_or_a_value_error_for_every_bad_header() -> None:
    payload = b'{"type":"message"}'
    assert verify_signature(payload, sign(payload, SECRET), SECRET) is True
    assert verify_signature(payload, sign(payload, SECRET), SECRET, 300) is True
    bad_headers: list[str | None] = [
        None,  # request.headers.get("layercode-signature") without the header
        "test-signature",  # the reference's test-client example
        sign(payload, "another secret"),
        sign(payload, SECRET, timestamp=1_000_000_000),  # far outside the tolerance
        sign(b'{"type":"data"}', SECRET),  # another body
    ]
    for header in bad_headers:
        # both of the reference's idioms catch it: ``except ValueError`` and
        # ``except SignatureVerificationError``
        with pytest.raises(SignatureVerificationError) as info:
            verify_signature(payload, header, SECRET)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)
        assert str(info.value)


# -- settings ------------------------------------------------------------------------------------

# (environment variable, field, a value, the default)
SETTINGS = [
    ("LAYERCODE_API_KEY", "layercode_api_key", "lc_key_1", None),
    ("LAYERCODE_WEBHOOK_SECRET", "layercode_webhook_secret", "whsec_1", None),
    ("OPENAI_API_KEY", "openai_api_key", "sk-1", None),
    ("GOOGLE_GENERATIVEAI_API_KEY", "google_generativeai_api_key", "g-1", None),
    ("DEFAULT_MODEL", "default_model", "openai:gpt-4o-mini", "openai:gpt-5-nano"),
    ("LOGFIRE_TOKEN", "logfire_token", "lf-1", None),
]


@pytest.mark.parametrize(("env", "field", "value", "default"), SETTINGS)
def test_settings_fields_their_variables_and_defaults(
    env: str, field: str, value: str, default: str | None
) -> None:
    assert getattr(Settings(env_file=None, environ={}), field) == default
    assert getattr(Settings(env_file=None, environ={env: value}), field) == value
    assert getattr(Settings(env_file=None, environ={}, **{field: value}), field) == value


def test_settings_with_no_argument_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the working directory in the way
    for env, _, value, _ in SETTINGS:
        monkeypatch.setenv(env, value)
    settings = Settings()
    assert [getattr(settings, field) for _, field, _, _ in SETTINGS] == [
        value for _, _, value, _ in SETTINGS
    ]


# -- the server API reference's example, served by uvicorn ---------------------------------------


def test_server_reference_example_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``Settings()`` from the environment, ``get_agent("starter")``, ``create_app(settings,
    agent)``: /health, /ready (the reference's answer, model default included), the webhook
    and the authorize route at their default paths, CORS added with ``app.add_middleware``."""
    pytest.importorskip("pydantic_ai")  # the starter agent's
    from layercode_asgi.agents import get_agent
    from layercode_asgi.config import Settings as ConfigSettings
    from layercode_asgi.server import create_app as server_create_app

    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):  # only the example's settings, whatever runs the tests
        if name.startswith("LAYERCODE_") or name in ("DEFAULT_MODEL", "REDIS_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("LAYERCODE_AUTHORIZE_API_KEYS", "front-key")
    settings = ConfigSettings()
    agent = get_agent("starter")
    app = server_create_app(settings, agent)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    origin = "https://shop.example"
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert set(health.json()) == {"status", "timestamp", "version"}
        assert health.json()["status"] == "healthy"
        ready = client.get("/ready")
        assert (ready.status_code, ready.json()) == (
            200,
            {"ready": True, "agent": "starter", "model": "openai:gpt-5-nano"},
        )
        # the webhook: POST, signed in the layercode-signature header
        body = event_body("data")
        answer = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
        unsigned = client.post("/api/agent", content=body, headers={"origin": origin})
        assert unsigned.status_code == 401
        assert isinstance(unsigned.json()["error"], str)
        # (older Starlette answers "*" here, newer the origin itself: both allow it)
        assert unsigned.headers["access-control-allow-origin"] in (origin, "*")
        assert client.get("/api/agent").status_code == 405
        # the authorize route: POST (its guard answers before any call to LayerCode)
        refused = client.post("/api/authorize", json={"agent_id": "ag_1"})
        assert (refused.status_code, set(refused.json())) == (401, {"error"})
        assert client.get("/api/authorize").status_code == 405
        # the CORS the example adds answers the browser's preflight
        preflight = client.options(
            "/api/authorize",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert preflight.headers["access-control-allow-credentials"] == "true"


def test_routes_are_configurable_by_position() -> None:
    """``create_app(settings, agent, agent_route, authorize_route)``: both routes served at
    the paths given, the defaults no longer."""
    calls: list[dict[str, Any]] = []

    async def authorize_session(request: Request) -> JSONResponse:
        calls.append(await request.json())
        return JSONResponse({"client_session_key": "csk_1", "conversation_id": "c1"})

    upstream = Starlette(
        routes=[Route("/v1/agents/web/authorize_session", authorize_session, methods=["POST"])]
    )

    async def agent(event: Any) -> Any:
        yield "from the custom route"

    with serve(upstream) as api:
        settings = Settings(
            env_file=None,
            environ={},
            layercode_webhook_secret=SECRET,
            layercode_api_key="lc_key",
            layercode_api_url=api + "/v1",
            authorize_api_keys="front-key",
        )
        app = create_app(settings, agent, "/hooks/layercode", "/session/authorize")
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            body = event_body("message")
            reply = client.post("/hooks/layercode", content=body, headers=signed_headers(body))
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = [
                msgspec.json.decode(line.removeprefix("data: "))
                for line in reply.text.splitlines()
                if line.startswith("data: ")
            ]
            assert events == [
                {"type": "response.tts", "content": "from the custom route", "turn_id": "turn-1"},
                {"type": "response.end", "turn_id": "turn-1"},
            ]
            authorized = client.post(
                "/session/authorize", json={"agent_id": "ag_1"}, headers={"x-api-key": "front-key"}
            )
            assert (authorized.status_code, authorized.json()) == (
                200,
                {"client_session_key": "csk_1", "conversation_id": "c1"},
            )
            assert calls == [{"agent_id": "ag_1"}]
            for default in ("/api/agent", "/api/authorize"):
                gone = client.post(default, content=body, headers=signed_headers(body))
                assert (gone.status_code, gone.json()) == (404, {"error": "not found"})


def test_server_reference_exception_handlers_as_written() -> None:
    """The reference's "Custom Exception Handlers", decorators on ``create_app``'s app: its
    ``ValueError`` handler answers 400 with the message, its general one 500 (here for an
    authorize guard that raised). Before, ``app.exception_handler`` was an AttributeError
    (Starlette 1 dropped the decorator; only ``add_exception_handler`` was left)."""

    def guard(request: Request) -> bool:
        if request.headers.get("x-fail") == "value":
            raise ValueError("session token expired")
        raise RuntimeError("token store down")

    app = create_app(
        Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET),
        authorize_guard=guard,
    )

    @app.exception_handler(ValueError)
    async def value_error_handler(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.exception_handler(Exception)
    async def general_exception_handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"error": "Internal server error"})

    assert value_error_handler.__name__ == "value_error_handler"  # the function, unchanged
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        value = client.post("/api/authorize", json={"agent_id": "a"}, headers={"x-fail": "value"})
        assert (value.status_code, value.json()) == (400, {"error": "session token expired"})
        # (no body: a server closing the connection after a 500 may reset one it has not read)
        other = client.post("/api/authorize")
        assert (other.status_code, other.json()) == (500, {"error": "Internal server error"})


@pytest.mark.parametrize("handler", ["create_app's", "async", "sync"])
def test_a_500_tells_the_client_the_connection_closes(handler: str) -> None:
    """After an exception handler's 500, Starlette re-raises (for the server's log) and
    uvicorn closes the connection. The 500 did not say so: a keep-alive client (httpx, a
    browser) sent its next request down the closed connection and got "Connection reset by
    peer". Now every such 500 says ``Connection: close``: create_app's own (a raising
    authorize guard) and one added with ``exception_handler`` / ``add_exception_handler``."""

    def guard(request: Request) -> bool:
        raise RuntimeError("token store down")

    app = create_app(
        Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET),
        authorize_guard=guard,
    )
    expected = {"error": "internal error"}
    if handler == "async":
        expected = {"error": "Internal server error"}

        @app.exception_handler(Exception)
        async def general(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(status_code=500, content=expected)

    elif handler == "sync":
        expected = {"error": "failed"}

        def general_sync(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(status_code=500, content=expected)

        app.add_exception_handler(500, general_sync)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(3):
            failed = client.post("/api/authorize")  # no body: see the test above
            assert (failed.status_code, failed.json()) == (500, expected)
            assert failed.headers["connection"] == "close"
            assert client.get("/health").status_code == 200  # on a new connection
