"""Claims of docs/ that no other test proved, each checked against a real server or the CLI.

Each test names the page and the words it holds the code to.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from layercode_asgi import (
    ConfigurationError,
    ConversationManager,
    LayercodeSignature,
    MemoryConversationStore,
    Settings,
    create_app,
    sign,
    verify_signature,
)
from layercode_asgi.cli import main
from layercode_asgi.testing import LayercodeTestClient

from .conftest import (
    PYTHON,
    ROOT,
    SECRET,
    event_body,
    serve,
    signed_headers,
    start_server_process,
)
from .redis_fixtures import running_redis


def _settings(**overrides: Any) -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET, **overrides)


# -- docs/server.md ---------------------------------------------------------------------------


def test_authorize_without_an_api_key_is_a_503_without_retry_after() -> None:
    """server.md: 503 ... "authorize without `LAYERCODE_API_KEY` (no `Retry-After`: it needs
    a setting)"."""
    with serve(create_app(_settings())) as url:
        answer = httpx.post(f"{url}/api/authorize", json={"agent_id": "a"}, timeout=10)
    assert answer.status_code == 503
    assert set(answer.json()) == {"error"} and "LAYERCODE_API_KEY" in answer.json()["error"]
    assert "retry-after" not in answer.headers


@pytest.mark.parametrize("route", ["/api/agént", "/" + "a" * 2047], ids=["non-ascii", "2048"])
def test_routes_the_docs_allow_are_served(route: str) -> None:
    """server.md: a route is refused with "more than 2,048 characters"; "letters beyond ASCII
    are fine". So a route of exactly 2,048 characters, or one with an é, is served."""
    app = create_app(_settings(), agent_route=route)
    body = event_body("data")
    with serve(app) as url:
        answer = httpx.post(url + quote(route), content=body, headers=signed_headers(body))
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})


def test_a_bad_content_length_is_a_400_on_the_webhook_and_the_authorize_route() -> None:
    """server.md: 400 for "a `Content-Length` that is not a number ... on either route ...
    uvicorn refuses one itself, on any route, before the app": behind uvicorn, neither route
    sees one (tests/test_authorize_hostile.py checks the app's own 400 at the ASGI level)."""
    app = create_app(_settings(layercode_api_key="lc_test_key_1"))
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for route in ("/api/agent", "/api/authorize"):
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(
                    f"POST {route} HTTP/1.1\r\nhost: t\r\ncontent-length: 1x\r\n\r\n{{}}".encode()
                )
                assert conn.recv(64).startswith(b"HTTP/1.1 400 "), route


# -- docs/middleware.md -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["OPTIONS", "GET", "HEAD"])
def test_a_protected_path_refuses_any_method_unsigned_before_the_apps_405(method: str) -> None:
    """middleware.md: "the check lets no request through by its method: on a protected path
    it gets 401, as `GET` and `HEAD` do (before the app's 405)"."""
    calls: list[str] = []

    async def hook(request: Request) -> JSONResponse:
        calls.append(request.method)
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/api/agent", hook, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET, paths=["/api/agent"])
    with serve(app) as url:
        answer = httpx.request(method, f"{url}/api/agent", timeout=10)
    assert answer.status_code == 401
    if method != "HEAD":
        assert answer.json() == {"error": "missing signature header"}
    assert calls == []


def test_rejections_are_logged_at_warning_on_the_middleware_logger_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """middleware.md: "Rejections are logged at WARNING on the `layercode_asgi.middleware`
    logger, with the reason (never the secret or expected signature)"."""
    body = b'{"type":"session.update","session_id":"s","conversation_id":"c"}'
    expected = sign(body, SECRET).split("v1=")[1]
    wrong = {"layercode-signature": sign(body, "whsec_not_it")}
    app = LayercodeSignature(JSONResponse({"status": "ok"}), secret=SECRET)
    with (
        caplog.at_level(logging.WARNING, logger="layercode_asgi.middleware"),
        serve(app) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        assert client.post("/", content=body).status_code == 401
        assert client.post("/", content=body, headers=wrong).status_code == 401
    records = [r for r in caplog.records if r.name == "layercode_asgi.middleware"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    messages = [r.getMessage() for r in records]
    assert "missing signature header" in messages[0]
    assert "no matching signature" in messages[1]
    for text in messages:
        assert SECRET not in text and expected not in text


# -- docs/cli.md: where `sign` and `simulate` find the secret -----------------------------------


def _sign(environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """`layercode-asgi sign --body {}` in the working directory: its header, or "" on failure."""
    capsys.readouterr()
    code = main(["sign", "--body", "{}"], environ=environ)
    out = capsys.readouterr().out.strip()
    return out if code == 0 else ""


def test_sign_reads_the_newest_secret_of_the_dot_env_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cli.md: `--secret` defaults to `$LAYERCODE_WEBHOOK_SECRET`, "else in `./.env` (of
    the rotation form `new,old`, the first)"."""
    (tmp_path / ".env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_new,whsec_old\n")
    monkeypatch.chdir(tmp_path)
    header = _sign({}, capsys)
    assert header and verify_signature("{}", header, "whsec_new")
    environ = {"LAYERCODE_WEBHOOK_SECRET": "whsec_env"}  # the environment wins over ./.env
    assert verify_signature("{}", _sign(environ, capsys), "whsec_env")


def test_layercode_env_file_names_the_secrets_file_and_empty_means_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cli.md: "else the one in the file `$LAYERCODE_ENV_FILE` names (empty: none), else in
    `./.env`"."""
    (tmp_path / ".env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_dotenv\n")
    (tmp_path / "other.env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_other\n")
    monkeypatch.chdir(tmp_path)
    named = _sign({"LAYERCODE_ENV_FILE": "other.env"}, capsys)
    assert named and verify_signature("{}", named, "whsec_other")
    assert _sign({"LAYERCODE_ENV_FILE": ""}, capsys) == ""  # not ./.env's


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}


def test_serve_env_file_empty_reads_no_dot_env(tmp_path: Path) -> None:
    """cli.md: `--env-file` (`.env`, read if it exists; ... `''` for none): with `''`, the
    secret in ./.env is not read, so serve refuses to start without one (exit 2)."""
    (tmp_path / ".env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_dotenv\n")
    done = subprocess.run(
        [PYTHON, "-m", "layercode_asgi", "serve", "--env-file", "", "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**_clean_environ(), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: no webhook secret")


def test_serve_dev_line_names_its_env_file_and_works(tmp_path: Path) -> None:
    """cli.md: `--secret` ... "else the one in the file `$LAYERCODE_ENV_FILE` names ... (the
    `serve --dev` line names its `--env-file` so)": with a configured secret in another env
    file, the printed simulate line reaches the server without the secret on it."""
    env_file = tmp_path / "my.env"
    env_file.write_text("LAYERCODE_WEBHOOK_SECRET=whsec_from_my_env\n")
    command = [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--env-file", "my.env",
               "--port", "{port}"]  # fmt: skip
    environ = {**_clean_environ(), "TMPDIR": str(tmp_path)}
    with start_server_process(
        command, env=environ, cwd=tmp_path, log=tmp_path / "server.log", ready_text="simulate"
    ) as server:
        banner = server.output()
        assert "whsec_from_my_env" not in banner  # a configured secret is not shown
        line = re.search(r"LAYERCODE_ENV_FILE=(\S+) layercode-asgi simulate (.*)", banner)
        assert line, banner
        assert Path(line.group(1)) == env_file.resolve()
        url = re.search(r"--url (\S+)", line.group(2))
        assert url and url.group(1) == f"{server.url}/api/agent"
        code = main(["simulate", "-q", "--url", url.group(1), "Hello"],
                    environ={"LAYERCODE_ENV_FILE": line.group(1)})  # fmt: skip
        assert code == 0


# -- docs/testing.md --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_reply_without_body_is_a_json_result_with_body_none() -> None:
    """testing.md: "Other events give a `JSONResult` (`body`: the JSON reply, `None` for none
    (a 204)", in-process and over the network alike."""

    async def no_content(request: Request) -> Response:
        return Response(status_code=204)

    app = Starlette(routes=[Route("/api/agent", no_content, methods=["POST"])])
    async with LayercodeTestClient(app, secret=SECRET) as client:
        result = await client.data({"clicked": True})
    assert (result.status_code, result.body) == (204, None)
    with serve(app) as url:
        async with LayercodeTestClient(base_url=url, secret=SECRET) as client:
            result = await client.session_update()
    assert (result.status_code, result.body) == (204, None)


# -- docs/settings.md, docs/history.md: Redis over a unix socket --------------------------------


def test_a_unix_socket_redis_url_serves_history_locks_and_replay_protection() -> None:
    """settings.md: `REDIS_URL` is a "redis://, rediss:// or unix:// URL"; history.md: with
    it the server keeps history in Redis and, with `LAYERCODE_REPLAY_PROTECTION`, remembers
    signatures there too. Over a unix socket (its database given as `?db=`), all of it."""
    redis = pytest.importorskip("redis")
    with running_redis(unix_socket=True) as server:
        assert server.socket is not None
        settings = _settings(redis_url=f"unix://{server.socket}?db=3", replay_protection=True)
        body = event_body(text="over a socket")
        headers = signed_headers(body)
        with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
            assert client.get("/ready").json() == {"ready": True, "agent": "echo"}
            turn = client.post("/api/agent", content=body, headers=headers)
            assert turn.status_code == 200 and "You said: over a socket" in turn.text
            again = client.post("/api/agent", content=body, headers=headers)
            assert again.status_code == 409
        tcp = redis.Redis.from_url(server.url.replace("/0", "/3"))
        try:
            keys = [key.decode() for key in tcp.keys("layercode:*")]
        finally:
            tcp.close()
    assert any("conv-1" in key for key in keys), keys


# -- docs/security.md: CORS --------------------------------------------------------------------


def test_cors_star_alone_is_served_without_credentials() -> None:
    """security.md's defaults: "CORS | off; the origins you list, or `*` alone (no patterns,
    no credentials)", as settings.md's table says. It read "explicit origins only", while
    `LAYERCODE_CORS_ORIGINS=*` is accepted and answers every origin."""
    app = create_app(_settings(cors_origins="*"))
    preflight = {"origin": "https://any.example", "access-control-request-method": "POST"}
    with serve(app) as url:
        answer = httpx.options(f"{url}/api/authorize", headers=preflight, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in answer.headers
    with pytest.raises(ConfigurationError, match="'\\*' cannot be combined"):
        _settings(cors_origins="*,https://app.example")


# -- docs/history.md: a message added while a turn runs ----------------------------------------


def test_a_message_added_under_the_conversation_lock_comes_after_the_running_turn() -> None:
    """history.md: "a message you add while a turn of the conversation runs (from `on_data`,
    say) comes before that turn's two; add it holding `conversations.lock(conversation_id)`
    to have it after (it then waits for the turn)"."""
    manager = ConversationManager(MemoryConversationStore())
    started, release, entered = threading.Event(), threading.Event(), threading.Event()

    async def agent(event: Any) -> AsyncIterator[str]:
        started.set()
        for _ in range(2000):  # bounded: until the test releases the turn (20 s at most)
            if release.is_set():
                break
            await anyio.sleep(0.01)
        yield f"reply to {event.text}"

    async def on_data(event: Any) -> None:
        message = {"role": "user", "text": event.data["text"]}
        if event.data["locked"]:
            entered.set()
            async with manager.lock(event.conversation_id):
                await manager.add_message(event.conversation_id, message)
        else:
            await manager.add_message(event.conversation_id, message)

    app = create_app(_settings(), agent, conversations=manager, on_data=on_data)
    with serve(app) as url, ThreadPoolExecutor(2) as pool:

        def post(body: bytes) -> int:
            headers = signed_headers(body)
            return httpx.post(
                f"{url}/api/agent", content=body, headers=headers, timeout=30
            ).status_code

        turn = pool.submit(post, event_body(text="first"))
        assert started.wait(20)
        assert post(event_body("data", data={"text": "early", "locked": False})) == 200
        late = pool.submit(post, event_body("data", data={"text": "late", "locked": True}))
        assert entered.wait(20)
        release.set()
        assert (turn.result(30), late.result(30)) == (200, 200)
    history = anyio.run(manager.get_history, "conv-1")
    assert [(m.role, m.text) for m in history] == [
        ("user", "early"),
        ("user", "first"),
        ("assistant", "reply to first"),
        ("user", "late"),
    ]


# -- docs/cli.md: serve's --agent default ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"), [([], "from_dotenv"), (["--agent", "from_option"], "from_option")]
)
def test_serve_agent_defaults_to_layercode_agent_of_the_env_file(
    tmp_path: Path, argv: list[str], named: str
) -> None:
    """cli.md: `--agent NAME` (... default `LAYERCODE_AGENT`, else `echo`), read from ./.env
    like every setting; `--agent` wins. An unknown one is a one-line error, exit 2."""
    (tmp_path / ".env").write_text(
        "LAYERCODE_WEBHOOK_SECRET=whsec_dotenv\nLAYERCODE_AGENT=from_dotenv\n"
    )
    done = subprocess.run(
        [PYTHON, "-m", "layercode_asgi", "serve", "--port", "0", *argv],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
        env={**_clean_environ(), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: no agent named '{named}'; available: echo, openai, starter"
        " (or a 'package.module:attribute' import path)"
    ]


@pytest.mark.anyio
async def test_the_test_clients_headers_go_with_every_request() -> None:
    """testing.md: `LayercodeTestClient(..., headers=None, ...)`: extra headers on every
    request (as LayerCode's custom headers), signed events and `post(headers=...)` alike."""
    seen: list[tuple[str, str | None, str | None]] = []

    async def hook(request: Request) -> Response:
        event = await request.json()
        seen.append((event["type"], request.headers.get("x-tenant"), request.headers.get("x-one")))
        if event["type"] in ("session.start", "message"):
            turn = event["turn_id"]
            return Response(
                f'data: {{"type":"response.end","turn_id":"{turn}"}}\n\n',
                media_type="text/event-stream",
            )
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/api/agent", hook, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET)
    with serve(app) as url:
        client = LayercodeTestClient(base_url=url, secret=SECRET, headers={"X-Tenant": "t1"})
        async with client:
            await client.message("hi")
            await client.data({"clicked": True})
            answer = await client.post({"type": "session.update"}, headers={"X-One": "1"})
    assert answer.status_code == 200
    assert seen == [("message", "t1", None), ("data", "t1", None), ("session.update", "t1", "1")]


# -- docs/agent-contract.md, docs/history.md: names the pages quote, where they live ----------


@pytest.mark.parametrize(
    ("page", "quoted", "module", "name"),
    [
        ("agent-contract.md", "`layercode_asgi.agents.InvalidAgentError`", "agents",
         "InvalidAgentError"),
        ("history.md", "`layercode_asgi.conversation.check_conversation_id`", "conversation",
         "check_conversation_id"),
    ],
)  # fmt: skip
def test_a_name_the_page_quotes_outside_the_package_root_says_its_module(
    page: str, quoted: str, module: str, name: str
) -> None:
    """agent-contract.md named `InvalidAgentError` and history.md `check_conversation_id`
    bare, while `from layercode_asgi import ...` finds neither: the page names the module."""
    import importlib

    import layercode_asgi

    assert not hasattr(layercode_asgi, name)
    text = " ".join((ROOT / "docs" / page).read_text().split())
    assert quoted in text
    assert getattr(importlib.import_module(f"layercode_asgi.{module}"), name)


def test_an_agent_that_cannot_work_is_an_invalid_agent_error_and_a_plain_function_fails_its_turn() -> (
    None
):
    """agent-contract.md: refused when the app is built (`InvalidAgentError`, a
    `ConfigurationError`); "a plain function ... returning a `str` fails each turn with
    `agent error`" (it may return an async iterable: only the call tells)."""
    from layercode_asgi.agents import InvalidAgentError

    def plain_generator(event: Any) -> Any:
        yield "Hi"

    with pytest.raises(InvalidAgentError) as refused:
        create_app(_settings(), plain_generator)
    assert isinstance(refused.value, ConfigurationError)

    def plain(event: Any) -> str:
        return "Hi"

    async def turn() -> Any:
        async with LayercodeTestClient(create_app(_settings(), plain), secret=SECRET) as client:
            return await client.message("hello")

    result = anyio.run(turn)
    assert [e["type"] for e in result.events] == ["response.error", "response.end"]
    assert result.errors[0]["error"] == "agent error"
    text = " ".join((ROOT / "docs" / "agent-contract.md").read_text().split())
    assert "a plain function returning a `str` fails each turn with `agent error`" in text


# -- docs/events.md, docs/security.md: what a bad body gets ------------------------------------


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"type":"data","session_id":"s","conversation_id":"c","data":1', "$"),
        (b'{"type":"data","session_id":"s","conversation_id":"c","data":"\xff"}', "$"),
        (b'{"type":"data","session_id":"s","conversation_id":"c","data":{},"turn_id":5}',
         "$.turn_id"),
    ],
    ids=["not-json", "not-utf8-in-a-read-field", "mistyped"],
)  # fmt: skip
def test_a_bad_body_is_a_400_with_error_and_path(body: bytes, path: str) -> None:
    """events.md: `InvalidPayloadError`'s `path` names the field, "`$` for bytes that are not
    JSON, or not UTF-8 in a field it reads"; security.md: errors are JSON `{"error": …}`,
    "a malformed body's 400 adds its `path`"."""
    with serve(create_app(_settings())) as url:
        answer = httpx.post(f"{url}/api/agent", content=body, headers=signed_headers(body))
    assert answer.status_code == 400
    assert set(answer.json()) == {"error", "path"} and answer.json()["path"] == path
    for page, words in (
        ("events.md", "`$` for bytes that are not JSON, or not UTF-8 in a field it reads"),
        ("security.md", "a malformed body's 400 adds its `path`"),
    ):
        assert words in " ".join((ROOT / "docs" / page).read_text().split()), page


def test_the_decoder_leaves_the_conversation_id_bound_to_the_servers_and_stores() -> None:
    """events.md: `parse_webhook_payload` does not bound `conversation_id`; "the servers and
    the stores refuse one over 512 characters" (400 on every event of a known type, as
    security.md says; an unknown type is ignored: 200)."""
    from layercode_asgi import parse_webhook_payload

    long_id = "c" * 513
    assert parse_webhook_payload(event_body(conversation_id=long_id)).conversation_id == long_id
    text = " ".join((ROOT / "docs" / "events.md").read_text().split())
    assert "the servers and the stores refuse one over 512 characters" in text
    security = " ".join((ROOT / "docs" / "security.md").read_text().split())
    assert "(a longer one: 400 on every event of a known type)" in security
    with serve(create_app(_settings())) as url, httpx.Client(base_url=url, timeout=10) as client:
        for kind in ("message", "data", "session.end", "call.transferred"):
            body = event_body(kind, conversation_id=long_id)
            answer = client.post("/api/agent", content=body, headers=signed_headers(body))
            assert answer.status_code == (200 if kind == "call.transferred" else 400), kind


@pytest.mark.anyio
async def test_an_empty_str_sends_nothing_and_a_keyword_only_ctx_gets_the_context() -> None:
    """agent-contract.md: "Each `str` it yields is spoken (...; an empty one sends nothing)";
    a second parameter, "or a keyword-only `context` or `ctx`", receives the `TurnContext`;
    "any other keyword-only parameter needs a default, and is left to it"."""

    async def agent(event: Any, *, ctx: Any, tone: str = "plain") -> AsyncIterator[str]:
        yield ""
        yield f"{tone} {ctx.text}"

    async with LayercodeTestClient(create_app(_settings(), agent), secret=SECRET) as client:
        turn = await client.message("hello")
    assert [e["type"] for e in turn.events] == ["response.tts", "response.end"]
    assert turn.tts == ["plain hello"]
