"""``create_app`` is a Starlette app: its webhook goes through Starlette's stack.

The same answers as a webhook mounted in any Starlette app for every kind of request, user
middleware applied, a JSON 500 for an unexpected error, and the default store's lock
serialising a conversation's turns.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from layercode_asgi import (
    ConfigurationError,
    ConversationManager,
    LayercodeApp,
    LayercodeWebhook,
    MemoryConversationStore,
    Settings,
    create_app,
    echo_agent,
    sign,
)
from layercode_asgi.agents import TurnContext, TurnEvent
from layercode_asgi.gctuning import YOUNG_GC_THRESHOLD
from layercode_asgi.metrics import installed

from .agents_for_tests import cancelled_elsewhere
from .asgi_stub import ASGIStub
from .conftest import SECRET, event_body, serve, signed_headers
from .test_middleware import call_asgi


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"layercode_webhook_secret": SECRET}
    base.update(overrides)
    return Settings(env_file=None, environ={}, **base)


class Recorder:
    """A pure ASGI middleware that records the paths it saw."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        msgspec.json.decode(line[len("data: ") :])
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]


def test_create_app_returns_a_plain_starlette_app() -> None:
    app = create_app(settings())
    # a LayercodeApp: Starlette, its exception_handler decorator (the server reference's),
    # keeping from the server an error its JSON 500 answered
    assert type(app) is LayercodeApp and type(app).__bases__ == (Starlette,)
    through_starlette: list[str] = []
    with TestClient(app) as client:
        # Starlette's stack (built at start-up) records what passes through it from now on.
        assert app.middleware_stack is not None
        app.middleware_stack = Recorder(app.middleware_stack, through_starlette)
        body = event_body(text="hello")
        response = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert [e["type"] for e in _events(response)] == ["response.tts", "response.end"]
        assert client.get("/health").status_code == 200
        assert client.get("/api/agent").status_code == 405  # not POST: Starlette's answer
    assert through_starlette == ["/api/agent", "/health", "/api/agent"]


def test_added_middleware_sees_webhook_requests() -> None:
    seen: list[str] = []
    app = create_app(settings())
    app.add_middleware(Recorder, seen=seen)
    with TestClient(app) as client:
        body = event_body(text="hello")
        response = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert response.status_code == 200
        assert _events(response)[-1]["type"] == "response.end"
    assert seen == ["/api/agent"]


def test_cors_settings_apply_to_the_webhook_route() -> None:
    app = create_app(settings(cors_origins=("https://app.example",)))
    with TestClient(app) as client:
        body = event_body(text="hello")
        headers = {**signed_headers(body), "origin": "https://app.example"}
        response = client.post("/api/agent", content=body, headers=headers)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_a_replaced_route_endpoint_is_respected() -> None:
    app = create_app(settings())

    async def other(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"other"})

    route = app.routes[0]
    assert isinstance(route, Route) and route.path == "/api/agent"
    route.app = other
    with TestClient(app) as client:
        response = client.post("/api/agent", content=b"{}")
        assert (response.status_code, response.text) == (202, "other")


def test_an_unexpected_error_is_a_json_500_logged_once_not_passed_to_the_server(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Starlette re-raised the error after the JSON 500, and the server logged it again,
    # as it was (uvicorn: "Exception in ASGI application", unescaped, secrets in clear).
    app = create_app(settings())

    async def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(app.state.webhook, "answer", broken)
    body = event_body(text="hello")
    with caplog.at_level(logging.ERROR), TestClient(app) as client:
        response = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert response.status_code == 500
        assert response.json() == {"error": "internal error"}
        assert "boom" not in response.text
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.getMessage() == "unhandled error on POST /api/agent"


@pytest.mark.anyio
async def test_an_unexpected_error_on_a_request_starlette_cannot_make_a_url_of() -> None:
    # The 500 handler logged ``request.url.path``: a query string that is not UTF-8 (which
    # ASGI allows) made the handler itself raise, and the server answered its plain 500.
    app = create_app(settings())

    async def broken(request: Any) -> None:
        raise RuntimeError("boom")

    app.router.routes.append(Route("/broken", broken))
    stub = ASGIStub(method="GET", path="/broken")
    stub.scope["query_string"] = b"q=\xff"
    await stub.run(app)  # logged and answered: not passed on to the server
    assert (stub.status, stub.body) == (500, b'{"error":"internal error"}')


def _requests() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, method, body, headers) covering every kind of answer of the webhook route,
    signed now (call it in the test: signed at collection, the signatures of a long run
    are stale by the time the test runs)."""
    good = event_body(text="hello")
    data = event_body("data", data={"x": 1})
    end = event_body("session.end", transcript=[])
    unknown = b'{"type":"session.paused","session_id":"s","conversation_id":"c"}'
    bad_json = b'{"type": "message",'
    missing = b'{"type":"message","session_id":"s","conversation_id":"c"}'
    stale = {
        "layercode-signature": sign(good, SECRET, timestamp=int(time.time()) - 3600),
        "content-type": "application/json",
    }
    return [
        ("message", "POST", good, signed_headers(good)),
        ("data", "POST", data, signed_headers(data)),
        ("session.end", "POST", end, signed_headers(end)),
        ("unknown type", "POST", unknown, signed_headers(unknown)),
        ("bad json", "POST", bad_json, signed_headers(bad_json)),
        ("missing field", "POST", missing, signed_headers(missing)),
        ("no signature", "POST", good, {"content-type": "application/json"}),
        ("wrong signature", "POST", good, signed_headers(good, secret="whsec_other")),
        ("stale signature", "POST", good, stale),
        ("too large", "POST", b"x" * 2048, signed_headers(b"x" * 2048)),
        ("bad content-length", "POST", good, {**signed_headers(good), "content-length": "x"}),
        ("GET", "GET", b"", {}),
    ]


@pytest.mark.parametrize(
    "metrics",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not installed("prometheus_client"), reason="no prometheus-client"
            ),
        ),
    ],
)
@pytest.mark.parametrize("name", [case[0] for case in _requests()])
def test_same_answers_as_through_starlette(name: str, metrics: bool) -> None:
    """Through a middleware of the application's, and with the metrics on: the same answers."""
    _, method, body, headers = next(case for case in _requests() if case[0] == name)
    direct = create_app(settings(max_body_size=1024))
    through = create_app(settings(max_body_size=1024, metrics=metrics))
    through.add_middleware(Recorder, seen=[])
    answers = []
    for app in (direct, through):
        with TestClient(app) as client:
            response = client.request(method, "/api/agent", content=body, headers=headers)
            answers.append(
                (response.status_code, response.headers.get("content-type"), response.content)
            )
    assert answers[0] == answers[1], name
    status = answers[0][0]
    assert status < 500, (name, answers[0])
    if status >= 400:
        assert "error" in msgspec.json.decode(answers[0][2]), name


# -- the default store's lock, on the webhook's own path ---------------------------------------


async def _slow(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
    yield f"heard {event.text} after {len(context.history)} messages"
    await anyio.sleep(0.3)


def _webhook_app(lock_timeout: float) -> tuple[Starlette, ConversationManager]:
    conversations = ConversationManager(MemoryConversationStore())
    webhook = LayercodeWebhook(_slow, conversations=conversations, lock_timeout=lock_timeout)
    return Starlette(routes=[Route("/hook", webhook, methods=["POST"])]), conversations


@pytest.mark.anyio
async def test_turns_of_one_conversation_run_one_after_the_other() -> None:
    app, conversations = _webhook_app(lock_timeout=5)
    transport = httpx.ASGITransport(app=app)
    replies: dict[str, str] = {}

    async def turn(turn_id: str, text: str, delay: float) -> None:
        await anyio.sleep(delay)
        body = event_body(turn_id=turn_id, text=text)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/hook", content=body)
        assert response.status_code == 200
        replies[turn_id] = _events(response)[0]["content"]

    async with anyio.create_task_group() as tg:
        tg.start_soon(turn, "t1", "one", 0)
        tg.start_soon(turn, "t2", "two", 0.05)  # arrives while t1 holds the conversation
    assert replies == {"t1": "heard one after 0 messages", "t2": "heard two after 2 messages"}
    history = await conversations.get_history("conv-1")
    assert [(m.role, m.turn_id) for m in history] == [
        ("user", "t1"),
        ("assistant", "t1"),
        ("user", "t2"),
        ("assistant", "t2"),
    ]
    assert conversations.store._locks == {}  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_turn_waiting_too_long_for_its_conversation_gets_503() -> None:
    # t1 holds its conversation until t2 has its answer: events, not delays (on a loaded
    # machine a turn started 50 ms later could find the conversation free).
    holding, released = anyio.Event(), anyio.Event()

    async def holder(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
        holding.set()
        await released.wait()
        yield "done"

    conversations = ConversationManager(MemoryConversationStore())
    webhook = LayercodeWebhook(holder, conversations=conversations, lock_timeout=0.05)
    transport = httpx.ASGITransport(app=Starlette(routes=[Route("/hook", webhook)]))
    statuses: dict[str, tuple[int, Any]] = {}

    async def turn(turn_id: str) -> None:
        body = event_body(turn_id=turn_id, text="hi")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/hook", content=body)
        content_type = response.headers["content-type"]
        statuses[turn_id] = (
            response.status_code,
            response.json() if content_type == "application/json" else None,
        )

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(turn, "t1")
            await holding.wait()
            await turn("t2")
            released.set()
    assert statuses["t1"] == (200, None)
    status, answer = statuses["t2"]
    assert status == 503
    assert answer["error"].startswith("conversation unavailable:"), answer
    assert conversations.store._locks == {}  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_an_invalid_conversation_id_is_a_400() -> None:
    app, _ = _webhook_app(lock_timeout=1)
    body = event_body(conversation_id="")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/hook", content=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid conversation_id")


# -- memory: a finished turn is freed by reference counting, not left to the cyclic GC ----------


async def _pausing(event: TurnEvent) -> AsyncIterator[str]:
    yield "one"
    await anyio.sleep(0.001)  # the producer suspends: watcher, task lookup, deadline timer
    yield "two"


@pytest.mark.parametrize("agent", ["echo", _pausing], ids=["one step", "suspending"])
def test_a_finished_turn_leaves_no_reference_cycle(agent: Any) -> None:
    import asyncio
    import gc

    app = create_app(settings(), agent=agent)

    async def turns() -> None:
        for index in range(20):
            body = event_body(turn_id=f"t{index}", conversation_id=f"c{index}", text="hi")
            headers = [(k.encode(), v.encode()) for k, v in signed_headers(body).items()]
            messages, _ = await call_asgi(app, headers, [body], path="/api/agent")
            assert messages[0]["status"] == 200
            assert b"response.end" in b"".join(m.get("body", b"") for m in messages)

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        asyncio.run(turns())
        gc.collect()
        ours = [obj for obj in gc.garbage if type(obj).__module__.startswith("layercode_asgi")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert [type(o).__name__ for o in ours] == []


@pytest.mark.parametrize("freeze", [True, False])
def test_gc_tuning_holds_while_the_app_runs_and_is_undone_at_shutdown(freeze: bool) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    app = create_app(settings(gc_tuning=freeze))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        frozen = gc.get_freeze_count()
        during = gc.get_threshold()
    assert (frozen > 0) is freeze
    tuned = (max(before[0], YOUNG_GC_THRESHOLD), before[1], before[2] * 10)
    assert during == (tuned if freeze else before)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_gc_tuning_of_two_apps_in_one_process_is_applied_once_and_undone_by_the_last() -> None:
    """Two create_app apps running in one process (two mounted backends, two servers):
    the second used to tune the already tuned thresholds again (full passes 100 times
    rarer instead of 10), and the first to stop undid the tuning (and the freeze) under
    the one still running; stopped in that order, the process stayed tuned after both."""
    gc.unfreeze()
    before = gc.get_threshold()
    tuned = (max(before[0], YOUNG_GC_THRESHOLD), before[1], before[2] * 10)
    first, second = TestClient(create_app(settings())), TestClient(create_app(settings()))
    try:
        first.__enter__()
        second.__enter__()
        assert gc.get_threshold() == tuned
        first.__exit__(None, None, None)
        assert gc.get_threshold() == tuned  # the second app still runs
        assert gc.get_freeze_count() > 0
    finally:
        first.__exit__(None, None, None)  # a second exit does nothing
        second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("timeout", [float("nan"), 0, -1, float("inf"), "10"])
def test_invalid_authorize_timeout_is_refused_at_start_up(timeout: Any) -> None:
    # Accepted before: every authorize call then failed in httpx (NaN: ValueError, a
    # string: TypeError, both a 500) or timed out at once (0).
    with pytest.raises(ConfigurationError, match="authorize_timeout must be a finite number > 0"):
        create_app(settings(), authorize_timeout=timeout)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"agent_route": "api/agent"}, "agent_route must be a path starting with '/'"),
        ({"authorize_route": ""}, "authorize_route must be a path starting with '/'"),
        ({"agent_route": "/x", "authorize_route": "/x"}, "the same path"),
    ],
)
def test_unusable_routes_are_refused_at_start_up(routes: dict[str, str], message: str) -> None:
    # Before: an AssertionError from Starlette (gone under python -O: a route that matches
    # nothing), or, for one path twice, an authorize route that silently never answered.
    with pytest.raises(ConfigurationError, match=message):
        create_app(settings(), **routes)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("/api/{x}", r"agent_route '/api/\{x\}' cannot contain '\{': Starlette"),
        ("/api/{x:path}", r"cannot contain '\{'"),
        ("/api/{x", r"cannot contain '\{'"),
        ("/api/agent\n", r"cannot contain '\\n'"),
        ("/api/\x1b[2Jagent", r"'/api/\\x1b\[2Jagent' cannot contain '\\x1b'"),
        ("/api/agent ", r"cannot contain ' '"),
        ("/api/\u202eagent", r"cannot contain '\\u202e'"),
        ("/api/agent?key=1", r"cannot contain '\?': a query"),
        ("/api/agent#x", r"cannot contain '#'"),
        ("/api/%61gent", r"cannot contain '%': requests are matched decoded"),
        ("/api/*", r"cannot contain '\*'"),
        ("/api//agent", r"empty, '\.' or '\.\.' segment"),
        ("/api/./agent", r"empty, '\.' or '\.\.' segment"),
        ("/api/../agent", r"empty, '\.' or '\.\.' segment"),
        ("/api/..", r"empty, '\.' or '\.\.' segment"),
        ("/" + "a" * 3000, r"agent_route is 3001 characters long, more than 2048"),
    ],
)
def test_routes_no_request_could_match_as_meant_are_refused(route: str, message: str) -> None:
    # Before: accepted. '{x}' became a pattern answering every /api/<anything>; '?', '#',
    # '%' and '//', '.' segments made a route no client reaches (servers match the decoded
    # path, without query or fragment; clients rewrite dot segments); control characters
    # reached the serve banner and the logs as they were.
    with pytest.raises(ConfigurationError, match=message):
        create_app(settings(), agent_route=route)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"agent_route": "/health"}, r"agent_route '/health' is the path of the /health route"),
        ({"authorize_route": "/ready/"}, r"authorize_route '/ready/' is the path of the /ready"),
        ({"agent_route": "/Metrics"}, r"agent_route '/Metrics' is the path of the /metrics"),
        (
            {"agent_route": "/hook", "authorize_route": "/hook/"},
            r"authorize_route '/hook/' is the same path as agent_route",
        ),
        (
            {"agent_route": "/API/agent", "authorize_route": "/api/agent"},
            r"is the same path as agent_route",
        ),
    ],
)
@pytest.mark.parametrize("metrics", [False, True])
def test_routes_on_the_fixed_paths_or_on_one_path_are_refused(
    routes: dict[str, str], message: str, metrics: bool
) -> None:
    # Before: a POST-only webhook on /health (GET still answered health), one on /metrics
    # that turning metrics on would shadow, two routes one proxy or client may merge.
    with pytest.raises(ConfigurationError, match=message):
        create_app(settings(metrics=metrics), **routes)


def test_routes_of_any_url_path_characters_answer_over_real_http() -> None:
    # Non-ASCII letters and RFC 3986 sub-delimiters work (clients percent-encode them).
    agent_route, authorize_route = "/voix/agent-\u00e9t\u00e9", "/a;v=1/auth:z@x/"
    app = create_app(settings(), agent_route=agent_route, authorize_route=authorize_route)
    body = event_body("session.start")
    with serve(app) as url, httpx.Client(base_url=url) as client:
        answer = client.post(agent_route, content=body, headers=signed_headers(body))
        assert answer.status_code == 200, answer.text
        assert client.post(agent_route, content=body).status_code == 401
        assert client.post(authorize_route, json={}).status_code != 404


@pytest.mark.anyio
@pytest.mark.parametrize("keep_history", [False, True])
async def test_every_event_refuses_a_conversation_id_longer_than_turns_accept(
    keep_history: bool,
) -> None:
    # Before: only the turns (and session.end when it cleared the history) were refused;
    # data and session.update reached their hooks with a 513-character conversation_id.
    hooked: list[str] = []
    app = create_app(
        settings(keep_history=keep_history),
        on_data=lambda event: hooked.append("data"),
        on_session_update=lambda event: hooked.append("session.update"),
        on_session_end=lambda event: hooked.append("session.end"),
    )
    answers = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for kind in ("message", "session.start", "data", "session.update", "session.end"):
            body = event_body(kind, conversation_id="c" * 513)
            response = await c.post("/api/agent", content=body, headers=signed_headers(body))
            answers[kind] = (response.status_code, response.json())
        body = event_body("data", conversation_id="c" * 512)  # the longest accepted
        accepted = await c.post("/api/agent", content=body, headers=signed_headers(body))
        # An unknown (newer) type is acknowledged whatever its conversation_id: a new
        # LayerCode event may carry none, or another kind of id (docs/server.md, events.md).
        ignored = []
        for conversation_id in ("c" * 513, "", None, 42):
            body = event_body("call.brand_new", conversation_id=conversation_id)
            response = await c.post("/api/agent", content=body, headers=signed_headers(body))
            ignored.append((response.status_code, response.json()))
    refused = (
        400,
        {"error": "invalid conversation_id: conversation_id is longer than 512 characters"},
    )
    assert answers == dict.fromkeys(answers, refused)
    assert accepted.status_code == 200 and hooked == ["data"]
    assert ignored == [(200, {"status": "ignored"})] * 4


# -- a blank timeout_message is no fallback, from settings and from arguments alike ----------


@pytest.mark.anyio
@pytest.mark.parametrize("blank", [" ", "\n\t ", "\u2028\u3000"])
async def test_a_blank_timeout_message_is_no_fallback(blank: str) -> None:
    # Before: LAYERCODE_TURN_TIMEOUT_MESSAGE=" " meant no fallback, but the same text given
    # as timeout_message= was spoken: a response.tts of whitespace.
    assert settings(turn_timeout_message=blank).turn_timeout_message is None

    async def slow(event: TurnEvent) -> AsyncIterator[str]:
        await anyio.sleep(30)
        yield "never"

    webhook = LayercodeWebhook(slow, turn_timeout=0.2, timeout_message=blank)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=webhook), base_url="http://t"
    ) as c:
        response = await c.post("/", content=event_body(text="hi"))
    assert _events(response) == [
        {"type": "response.error", "error": "turn timed out", "turn_id": "turn-1"},
        {"type": "response.end", "turn_id": "turn-1"},
    ]


# -- a hook raising a BaseException of its own is a JSON 500, like any exception ---------------


class Stop(BaseException):
    """A hook's own BaseException (neither an Exception nor a cancellation)."""


def _stop_group() -> BaseExceptionGroup[BaseException]:
    """A task group's error holding no interrupt, exit or cancellation."""
    return BaseExceptionGroup("stopped", [Stop("stopped"), ValueError("bad")])


@pytest.mark.anyio
@pytest.mark.parametrize("hook", ["on_data", "on_session_update", "on_session_end"])
@pytest.mark.parametrize("exc", [Stop, GeneratorExit, _stop_group])
async def test_a_hook_raising_a_base_exception_is_a_json_500(
    hook: str, exc: Callable[[], BaseException]
) -> None:
    # Before: it went past the route to the server: a plain-text 500 and a stack trace.
    def failing(event: Any) -> None:
        raise exc()

    kind = {"on_data": "data", "on_session_update": "session.update"}.get(hook, "session.end")
    app = create_app(settings(), **{hook: failing})
    body = event_body(kind)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/api/agent", content=body, headers=signed_headers(body))
    assert (response.status_code, response.json()) == (500, {"error": f"{kind} handler failed"})


@pytest.mark.anyio
@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
async def test_a_hook_raising_system_exit_or_keyboard_interrupt_goes_on(
    exc: type[BaseException],
) -> None:
    def failing(event: Any) -> None:
        raise exc

    with pytest.raises(exc):
        await LayercodeWebhook(echo_agent, on_data=failing).respond(event_body("data"))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio's Cancelled is trio's own
async def test_a_hook_raising_a_stray_cancelled_error_is_a_json_500(anyio_backend: str) -> None:
    async def failing(event: Any) -> None:
        await (await cancelled_elsewhere())  # a task that something else cancelled

    response = await LayercodeWebhook(echo_agent, on_data=failing).respond(event_body("data"))
    assert (response.status_code, response.body) == (500, b'{"error":"data handler failed"}')


def _raising(exc: type[BaseException], awaited: bool) -> Any:
    def sync_hook(*args: Any) -> Any:
        raise exc

    async def async_hook(*args: Any) -> Any:
        raise exc

    return async_hook if awaited else sync_hook


class _FailingPingStore(MemoryConversationStore):
    def __init__(self, exc: type[BaseException]) -> None:
        super().__init__()
        self.exc = exc

    async def ping(self) -> None:
        raise self.exc


async def _get_or_post(app: Any, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        if path == "/ready":
            return await c.get(path)
        return await c.post(path, json={"agent_id": "a"})


@pytest.mark.anyio
@pytest.mark.parametrize("awaited", [False, True])
@pytest.mark.parametrize("exc", [RuntimeError, Stop, GeneratorExit])
async def test_an_authorize_guard_raising_a_base_exception_is_a_json_500(
    exc: type[BaseException], awaited: bool
) -> None:
    # Before: a guard's own BaseException went past Starlette to the server (plain text).
    app = create_app(settings(), authorize_guard=_raising(exc, awaited))
    response = await _get_or_post(app, "/api/authorize")
    assert (response.status_code, response.json()) == (500, {"error": "internal error"})


@pytest.mark.anyio
@pytest.mark.parametrize("exc", [RuntimeError, Stop, GeneratorExit])
async def test_ready_with_a_store_raising_a_base_exception_is_a_503(
    exc: type[BaseException],
) -> None:
    app = create_app(settings(), conversations=ConversationManager(_FailingPingStore(exc)))
    response = await _get_or_post(app, "/ready")
    assert response.status_code == 503
    assert response.json()["error"] == "conversation store unavailable"


def test_ready_is_a_503_when_the_redis_replay_cache_is_down() -> None:
    """History elsewhere (here in memory), signatures in Redis: before, ``/ready`` said 200
    while every webhook was a 503 ``replay protection unavailable``; it says that too now."""
    pytest.importorskip("redis")
    from .conftest import free_port
    from .redis_fixtures import running_redis

    def ready(redis_url: str) -> httpx.Response:
        app = create_app(
            settings(redis_url=redis_url, replay_protection=True),
            conversations=ConversationManager(),
        )
        with TestClient(app) as client:  # its lifespan closes the replay cache's client
            return client.get("/ready")

    response = ready(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert response.status_code == 503
    assert response.json()["error"] == "replay protection unavailable"
    assert "s3cret" not in response.text
    with running_redis() as redis:
        response = ready(redis.url)
        assert (response.status_code, response.json()["ready"]) == (200, True)


@pytest.mark.anyio
@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["guard", "ready"])
async def test_an_interrupt_from_a_guard_or_a_store_goes_on(
    exc: type[BaseException], where: str
) -> None:
    if where == "guard":
        app = create_app(settings(), authorize_guard=_raising(exc, True))
    else:
        app = create_app(settings(), conversations=ConversationManager(_FailingPingStore(exc)))
    with pytest.raises(exc):
        await _get_or_post(app, "/api/authorize" if where == "guard" else "/ready")


@pytest.mark.anyio
async def test_a_turn_whose_text_holds_half_an_emoji_is_answered() -> None:
    """LayerCode (JavaScript) escapes a string cut inside an emoji as a lone ``\\ud83d``; the
    reference implementation and the Node SDK answer such a turn. It was a 400 (the user's
    words lost, nothing spoken); the half emoji now reads as U+FFFD."""
    ids = {"session_id": "s", "conversation_id": "c"}
    body = json.dumps({"type": "message", "turn_id": "t", "text": "cut \ud83d", **ids}).encode()
    assert b"\\ud83d" in body  # what JSON.stringify writes
    app = create_app(settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/api/agent", content=body, headers=signed_headers(body))
        item = {"role": "user", "text": "\udc00"}
        ended = json.dumps({"type": "session.end", "transcript": [item], **ids}).encode()
        end = await c.post("/api/agent", content=ended, headers=signed_headers(ended))
    assert response.status_code == 200, response.text
    assert _events(response)[0]["content"] == "You said: cut \ufffd"
    assert (end.status_code, end.json()) == (200, {"status": "ok"})


# -- what on_data returns is encoded like a turn's response.data, never a 500 from bad input --


class _Text(str):
    """A str subclass (msgspec refuses to encode one)."""


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("returned", "answer"),
    [
        (lambda event: {"echo": event.data["text"]}, {"echo": "a\ufffd"}),  # the client's text
        (lambda event: "\ud83d", "\ufffd"),
        (lambda event: _Text("hi"), "hi"),
        (lambda event: {_Text("k\udc00"): [_Text("v\ud800")]}, {"k\ufffd": ["v\ufffd"]}),
        (lambda event: {"nan": math.nan, "inf": -math.inf}, {"nan": None, "inf": None}),
    ],
)
async def test_on_data_answers_text_utf8_cannot_hold_and_str_subclasses(
    returned: Callable[[Any], Any], answer: Any
) -> None:
    # A framework that decoded the body itself (json.loads) hands on "\ud800" as it came.
    event = {**json.loads(event_body("data")), "data": json.loads('{"text": "a\\ud800"}')}
    response = await LayercodeWebhook(echo_agent, on_data=returned).respond(event)
    assert (response.status_code, json.loads(response.body)) == (200, answer)


@pytest.mark.anyio
async def test_on_data_returning_what_json_cannot_carry_is_a_clear_500_and_a_logged_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    webhook = LayercodeWebhook(echo_agent, on_data=lambda event: {"when": object()})
    with caplog.at_level(logging.ERROR, logger="layercode_asgi.webhook"):
        response = await webhook.respond(event_body("data"))
    answer = {"error": "data handler returned a value JSON cannot carry"}
    assert (response.status_code, json.loads(response.body)) == (500, answer)
    [record] = caplog.records
    assert "Encoding objects of type object is unsupported" in record.getMessage()
    assert record.exc_info is None  # the cause is the value, not our code: no stack trace


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["session.update", "session.end"])
@pytest.mark.parametrize("returned", ["\ud800", _Text("x"), object(), math.nan])
async def test_what_the_session_hooks_return_is_not_the_answer(kind: str, returned: Any) -> None:
    hook = {f"on_{kind.replace('.', '_')}": lambda event: returned}
    response = await LayercodeWebhook(echo_agent, **hook).respond(event_body(kind))
    assert (response.status_code, response.body) == (200, b'{"status":"ok"}')
