"""Acceptance checks of issues 13, 14, 15 and 17 as their items are worded, through the
public surface: the installed ``layercode-asgi`` command run as a subprocess, ``create_app``
and ``app_from_env`` served by real uvicorn / hypercorn on 127.0.0.1, settings through
environment variables, and the README's statements.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from layercode_asgi import sign

from .asgi_stub import read_body, recording_app
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
from .redis_fixtures import REDIS_SERVER, running_redis

#: Real servers and subprocesses throughout, and every optional framework: the full suite
#: (Python 3.11, all extras) runs it; the quick nox sessions leave it out.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "layercode-asgi")
TIMEOUT = 60


def _env(**extra: str) -> dict[str, str]:
    """A clean environment for a subprocess: no LAYERCODE_/REDIS_/OPENAI_ variables leak in."""
    keep = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LAYERCODE_", "REDIS_", "OPENAI_", "GOOGLE_", "DEFAULT_MODEL"))
    }
    keep["PYTHONPATH"] = str(ROOT)
    keep.update(extra)
    return keep


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        input=stdin.decode("utf-8", "surrogateescape"),
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        cwd=cwd or ROOT,
        timeout=TIMEOUT,
        check=False,
    )


@contextmanager
def served_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> Iterator[tuple[str, ServerProcess]]:
    """``layercode-asgi serve`` on a free port; yields its base URL and the server."""
    command = [CLI, "serve", "--host", "127.0.0.1", "--port", "{port}", "--env-file", "", *args]
    with start_server_process(command, env=env, cwd=cwd or ROOT) as server:
        yield server.url, server


#: hypercorn's script beside this Python, on ``{port}`` (the app and options follow).
HYPERCORN = [str(Path(sys.executable).parent / "hypercorn"), "--bind", "127.0.0.1:{port}"]
APP_FROM_ENV = "layercode_asgi.server:app_from_env"
NEEDS_HYPERCORN = pytest.mark.skipif(
    shutil.which("hypercorn", path=str(Path(sys.executable).parent)) is None, reason="no hypercorn"
)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure-to-start contract: exit 2, one ``error:`` line, no traceback, no banner."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines
    assert "serving" not in result.stdout, result.stdout
    return lines[0]


def _settings(**fields: Any) -> Any:
    """``Settings`` with the test secret, read from ``fields`` only (no environment or .env)."""
    from layercode_asgi import Settings

    return Settings(layercode_webhook_secret=SECRET, environ={}, env_file=None, **fields)


def _serve_refused(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """``serve ARGS`` (with the test secret unless ``env``) fails to start: its one line."""
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET) if env is None else env
    port = str(free_port())
    return _one_error_line(
        run_cli("serve", "--env-file", "", "--port", port, *args, env=env, cwd=cwd)
    )


def _post(url: str, body: bytes, secret: str = SECRET, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, content=body, headers=signed_headers(body, secret), timeout=30, **kwargs)


def _until(condition: Any, what: str) -> None:
    """Until ``condition()`` is true (an event the server shows, not a pause "long enough"
    for it: a busy machine may take longer); bounded: 20 s."""
    for _ in range(1000):
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"never: {what}")


def _sse_events(text: str) -> list[dict[str, Any]]:
    return [
        msgspec.json.decode(line[len("data:") :].strip())
        for line in text.split("\n")
        if line.startswith("data:")
    ]


# -- issue 13 --------------------------------------------------------------------------------------


def _app_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Any:
    from layercode_asgi.server import app_from_env

    for name in list(os.environ):
        if name.startswith(("LAYERCODE_", "REDIS_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.env
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", SECRET)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return app_from_env()


@pytest.mark.parametrize("spelling", ["true", "1", "yes", "TRUE", "on"])
def test_13_1_replay_env_memory_via_app_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spelling: str
) -> None:
    app = _app_from_env(monkeypatch, tmp_path, LAYERCODE_REPLAY_PROTECTION=spelling)
    body = event_body("session.update")
    headers = signed_headers(body)
    with serve(app) as base:
        first = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
        second = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
    assert first.status_code == 200
    assert second.status_code == 409, second.text


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_13_1_replay_env_redis_via_serve_cli() -> None:
    with running_redis() as redis:
        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET,
            LAYERCODE_REPLAY_PROTECTION="true",
            REDIS_URL=redis.url,
        )
        with served_cli(env=env) as (base, _):
            body = event_body("session.update")
            headers = signed_headers(body)
            first = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
            second = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
    assert (first.status_code, second.status_code) == (200, 409), second.text


def test_13_1_replay_env_memory_via_serve_cli() -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, LAYERCODE_REPLAY_PROTECTION="true")
    with served_cli(env=env) as (base, _):
        body = event_body("session.update")
        headers = signed_headers(body)
        first = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
        second = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
    assert (first.status_code, second.status_code) == (200, 409), second.text


def _replay_at_window_end(base: str, offset: int = 0, at: float = 1.2) -> tuple[int, int]:
    """Tolerance 1 s: sign at the current whole second t (``offset`` s ahead), deliver,
    then deliver again at t + ``at`` (the signature still verifies until t + 2)."""
    for attempt in range(3):  # only a badly overloaded machine needs another attempt
        now = time.time()
        if now % 1 > 0.7:  # leave room in this second for the first delivery
            time.sleep(1 - now % 1 + 0.01)
        t = int(time.time()) + offset
        body = event_body("session.update", attempt=attempt)
        headers = {"layercode-signature": sign(body, SECRET, t), "content-type": "application/json"}
        first = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
        wait = t + at - time.time()
        if wait > 0:
            time.sleep(wait)
        second = httpx.post(base + "/api/agent", content=body, headers=headers, timeout=10)
        if time.time() < t + 2:  # the signature still verified when the replay was checked
            break
    return first.status_code, second.status_code


def test_13_2_replay_at_window_end_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    app = _app_from_env(
        monkeypatch,
        tmp_path,
        LAYERCODE_REPLAY_PROTECTION="true",
        LAYERCODE_SIGNATURE_TOLERANCE="1",
    )
    with serve(app) as base:
        first, second = _replay_at_window_end(base)
    assert first == 200
    assert second == 409


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_13_2_replay_at_window_end_redis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with running_redis() as redis:
        app = _app_from_env(
            monkeypatch,
            tmp_path,
            LAYERCODE_REPLAY_PROTECTION="true",
            LAYERCODE_SIGNATURE_TOLERANCE="1",
            REDIS_URL=redis.url,
        )
        with serve(app) as base:
            first, second = _replay_at_window_end(base)
    assert first == 200
    assert second == 409


def _session_end_during_turn(app: Any) -> list[str]:
    """A slow turn is running when session.end arrives; returns what the next turns saw."""
    spoken: list[str] = []
    with serve(app) as base:
        url = base + "/api/agent"
        outcome: dict[str, Any] = {}
        running = threading.Event()

        def slow_turn() -> None:
            body = event_body("message", text="slow please", conversation_id="c-end")
            headers = signed_headers(body)
            with httpx.stream("POST", url, content=body, headers=headers, timeout=30) as reply:
                chunks = reply.iter_raw()
                next(chunks, None)  # its first words: it holds the conversation's lock
                running.set()
                for _ in chunks:
                    pass
            outcome["reply"] = reply

        thread = threading.Thread(target=slow_turn)
        thread.start()
        assert running.wait(20)  # not a fixed pause: a busy machine may take longer
        end = _post(url, event_body("session.end", conversation_id="c-end"))
        assert end.status_code == 200, end.text
        assert thread.is_alive()  # session.end did not wait for the running turn
        thread.join(30)
        assert outcome["reply"].status_code == 200
        for text in ("again", "and again"):
            reply = _post(url, event_body("message", text=text, conversation_id="c-end"))
            spoken.append(
                "".join(
                    e.get("content", "")
                    for e in _sse_events(reply.text)
                    if e["type"] == "response.tts"
                )
            )
    return spoken


def test_13_3_session_end_during_turn_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from layercode_asgi import create_app

    from .agents_for_tests import history_agent

    app = create_app(_settings(), agent=history_agent)
    spoken = _session_end_during_turn(app)
    assert "saw=0" in spoken[0], spoken  # the slow turn did not write its messages back
    assert "saw=2" in spoken[1], spoken  # the same conversation_id records again


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_13_3_session_end_during_turn_redis() -> None:
    from layercode_asgi import create_app

    from .agents_for_tests import history_agent

    with running_redis() as redis:
        settings = _settings(redis_url=redis.url)
        spoken = _session_end_during_turn(create_app(settings, agent=history_agent))
    assert "saw=0" in spoken[0], spoken
    assert "saw=2" in spoken[1], spoken


def test_13_5_log_line_forgery_through_serve_cli() -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    with served_cli(env=env) as (base, process):
        with httpx.Client() as client:
            client.post(base + "/hooks/x%0A2099-01-01 CRITICAL root: FORGED", content=b"{}")
            client.post(base + "/api/agent%0D%0A2099-01-01 CRITICAL root: FORGED2", content=b"{}")
            body = event_body("message", conversation_id="c\n2099-01-01 CRITICAL root: FORGED3")
            client.post(base + "/api/agent", content=body, headers=signed_headers(body))
        process.stop()
        out = process.output()
    for line in out.splitlines():
        assert not line.startswith("2099-01-01"), line
        assert "\r" not in line


@NEEDS_HYPERCORN
@pytest.mark.parametrize("root_path", ["/ap", "/api/ag", "/api"])
def test_13_6_root_path_not_at_boundary_hypercorn(root_path: str, tmp_path: Path) -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    command = [*HYPERCORN, "--root-path", root_path, f"{APP_FROM_ENV}()"]
    with start_server_process(command, env=env, cwd=tmp_path, ready_path=None) as server:
        body = event_body("message")
        for path in ("/api/agent", root_path + "/api/agent", "/api/agent/"):
            reply = httpx.post(server.url + path, content=body, timeout=10)
            assert reply.status_code in (307, 401, 404, 405), (path, reply.status_code, reply.text)
            assert "response.tts" not in reply.text


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_13_7_ready_and_503_reveal_no_store_details() -> None:
    from layercode_asgi import create_app

    with running_redis() as redis:
        url = f"redis://default:Zq8Hk2pW9@127.0.0.1:{redis.port}/5"
        settings = _settings(redis_url=url)
        app = create_app(settings, agent="echo")
        redis.stop()
        with serve(app) as base:
            ready = httpx.get(base + "/ready", timeout=30)
            turn = _post(base + "/api/agent", event_body("message"))
    for reply in (ready, turn):
        assert reply.status_code == 503, reply.text
        for secret_part in (
            "Zq8",
            "127.0.0.1",
            str(redis.port),
            "/5",
            "default",
            "Error",
            "refused",
        ):
            assert secret_part not in reply.text, (secret_part, reply.text)
    assert "conversation store unavailable" in ready.text


# -- a fake LayerCode API for the authorize route ---------------------------------------------------


def _fake_upstream(kind: str) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if kind == "big":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            chunk = b" " * 65536
            for _ in range(64 * 16):  # 64 MiB at most
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"{}"})
        elif kind == "4xx":
            body = msgspec.json.encode(
                {"error": "bad agent id\x1b[2J", "internal": "SECRET-INTERNAL", "trace": "x" * 50}
            )
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"x-upstream-secret", b"HEADER-SECRET")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
        elif kind == "drip":
            import anyio

            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            for _ in range(40):
                await send({"type": "http.response.body", "body": b" ", "more_body": True})
                await anyio.sleep(0.25)
            await send({"type": "http.response.body", "body": b"{}"})

    return app


@pytest.mark.parametrize("kind", ["big", "4xx", "drip"])
def test_13_8_authorize_upstream_bounds(kind: str) -> None:
    from layercode_asgi import create_app

    with serve(_fake_upstream(kind)) as upstream:
        settings = _settings(
            layercode_api_key="lc_key",
            layercode_api_url=upstream,
        )
        app = create_app(settings, agent="echo", authorize_timeout=1.0)
        with serve(app) as base:
            started = time.monotonic()
            reply = httpx.post(base + "/api/authorize", json={"agent_id": "a"}, timeout=30)
            took = time.monotonic() - started
    if kind == "4xx":
        assert reply.status_code == 400, reply.text
        assert "SECRET-INTERNAL" not in reply.text and "xxxxx" not in reply.text
        assert "HEADER-SECRET" not in str(reply.headers)
        assert "\x1b" not in reply.json()["error"]
        assert "bad agent id" in reply.json()["error"]
    else:
        assert reply.status_code == 502, reply.text
        assert took < 9  # the drip would take 10 s; the bound is the whole call (1 s)


def test_13_hardening_early_reject_without_body() -> None:
    from layercode_asgi import create_app

    app = create_app(_settings(), agent="echo")
    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        for header in (
            "",
            "layercode-signature: garbage\r\n",
            f"layercode-signature: t=1,v1={'0' * 64}\r\n",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(
                    (
                        "POST /api/agent HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        f"{header}content-length: 100000\r\n\r\n"
                    ).encode()
                )
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(4096)  # answered with no byte of the body sent
                    if not chunk:
                        break
                    data += chunk
            head = data.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 401"), data
            assert b"connection: close" in head, data


def test_13_hardening_413_closes_connection() -> None:
    from layercode_asgi import create_app

    app = create_app(
        _settings(max_body_size=1000),
        agent="echo",
    )
    body = event_body("message", text="x" * 5000)
    with serve(app) as base:
        reply = httpx.post(
            base + "/api/agent", content=body, headers=signed_headers(body), timeout=10
        )
    assert reply.status_code == 413
    assert reply.headers.get("connection", "").lower() == "close"


def test_13_hardening_history_max_bytes_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LAYERCODE_AGENT", "tests.agents_for_tests:history_agent")
    monkeypatch.syspath_prepend(str(ROOT))
    app = _app_from_env(
        monkeypatch, tmp_path,
        LAYERCODE_HISTORY_MAX_BYTES="3000",
        LAYERCODE_MAX_BODY_SIZE="100000",
        LAYERCODE_AGENT="tests.agents_for_tests:history_agent",
    )  # fmt: skip
    with serve(app) as base:
        for index in range(6):
            _post(
                base + "/api/agent",
                event_body("message", text=str(index) + "y" * 1000, conversation_id="big"),
            )
        saw = _post(base + "/api/agent", event_body("message", text="count", conversation_id="big"))
        huge = event_body("message", text="z" * 50000, conversation_id="huge")
        _post(base + "/api/agent", huge)
    history = app.state.conversations
    import anyio

    async def lengths() -> tuple[int, int]:
        big = await history.get_history("big")
        one = await history.get_history("huge")
        return sum(len(m.text) for m in big), sum(len(m.text) for m in one)

    total, huge_total = anyio.run(lengths)
    assert total <= 3000
    assert 0 < huge_total <= 3000
    assert "saw=" in saw.text


# -- issue 14 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_text", "attr", "expect"),
    [
        (
            "import openai_not_installed_xyz\n",
            "agent",
            "No module named 'openai_not_installed_xyz'",
        ),
        ("def agent(:\n", "agent", "SyntaxError"),
        ("async def agent(event):\n    yield 'x'\n", "agnet", "agnet"),
        ("raise RuntimeError('boom at import')\n", "agent", "boom at import"),
        ("import sys\nsys.exit(3)\n", "agent", "SystemExit"),
        ("raise SystemExit('Set OPENAI_API_KEY')\n", "agent", "Set OPENAI_API_KEY"),
        ("raise RuntimeError('first line\\nsecond line')\n", "agent", "first line"),
    ],
)
def test_14_1_and_4_serve_agent_import_errors(
    tmp_path: Path, module_text: str, attr: str, expect: str
) -> None:
    (tmp_path / "my_agent_mod.py").write_text(module_text)
    line = _serve_refused("--agent", f"my_agent_mod:{attr}", cwd=tmp_path)
    assert expect in line, line
    assert "no agent named" not in line and "available:" not in line, line


def test_14_1_get_agent_import_error_is_not_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layercode_asgi import AgentNotFoundError, get_agent

    (tmp_path / "broken_agent_mod.py").write_text("import openai_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(Exception) as info:
        get_agent("broken_agent_mod:agent")
    assert not isinstance(info.value, AgentNotFoundError)
    assert "openai_not_installed_xyz" in str(info.value)
    with pytest.raises(AgentNotFoundError):
        get_agent("no_such_agent_name")


def test_14_1_verbose_shows_traceback(tmp_path: Path) -> None:
    (tmp_path / "my_agent_mod.py").write_text("import openai_not_installed_xyz\n")
    result = run_cli(
        "serve", "-v", "--agent", "my_agent_mod:agent", "--env-file", "", "--port", str(free_port()),
        env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" in result.stderr


ERRORING_AGENT = """
async def agent(event):
    if event.type == "message":
        raise RuntimeError("nope")
    yield "welcome"
"""


def test_14_2_simulate_counts_errored_turns(tmp_path: Path) -> None:
    (tmp_path / "err_agent.py").write_text(ERRORING_AGENT)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    with served_cli("--agent", "err_agent:agent", env=env, cwd=tmp_path) as (base, _):
        url = base + "/api/agent"
        plain = run_cli("simulate", "--url", url, "one", "two", env=env)
        allowed = run_cli("simulate", "--url", url, "--allow-errors", "one", "two", env=env)
        strict = run_cli("simulate", "--url", url, "--strict", "one", "two", env=env)
    assert plain.returncode == 1, plain.stdout + plain.stderr
    out = plain.stdout + plain.stderr
    assert "2 of 3 turns ended in response.error" in out, out
    assert "no protocol violation" not in out or "OK" not in out.split("\n")[-2:], out
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "2 of 3 turns ended in response.error" in allowed.stdout + allowed.stderr
    assert strict.returncode == 1
    assert "PROTOCOL VIOLATION" in strict.stdout + strict.stderr


def test_14_2_demo_exit_codes_documented() -> None:
    result = run_cli("demo", "hello")
    assert result.returncode == 0, result.stdout + result.stderr


def _node_error_stream_app(scope: Any) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        data = await read_body(receive)
        if msgspec.json.decode(data)["type"] not in ("message", "session.start"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await send({"type": "http.response.body",
                    "body": b'data: {"type":"response.error","error":"handler threw"}\n\n'})  # fmt: skip

    return app


def test_14_3_node_sdk_error_stream_is_an_errored_turn() -> None:
    with serve(_node_error_stream_app(None)) as base:
        env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
        plain = run_cli("simulate", "--url", base + "/api/agent", "hi", env=env)
        allowed = run_cli("simulate", "--url", base + "/api/agent", "--allow-errors", "hi", env=env)
    out = plain.stdout + plain.stderr
    assert "missing-end" not in out, out
    assert plain.returncode == 1
    assert "ended in response.error" in out
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "missing-end" not in allowed.stdout + allowed.stderr


def test_14_3_test_client_accepts_node_error_stream() -> None:
    import anyio

    from layercode_asgi.testing import LayercodeTestClient

    async def run() -> Any:
        with serve(_node_error_stream_app(None)) as base:
            async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
                return await client.message("hi")

    result = anyio.run(run)
    assert any(event.get("type") == "response.error" for event in result.events)


def test_14_4_port_in_use_one_line_exit_2() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli(
            "serve", "--port", str(port), "--env-file", "",
            env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET),
        )  # fmt: skip
    _one_error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--env-file", ""],  # no secret
        ["serve", "--env-file", "", "--agent", "nosuch"],
        ["serve", "--env-file", "", "--workers", "0"],
        ["serve", "--env-file", "", "--port", "70000"],
        ["serve", "--env-file", "", "--host", "256.1.1.1"],
    ],
)
def test_14_4_every_failure_to_start_one_line_exit_2(args: list[str]) -> None:
    env = _env() if args == ["serve", "--env-file", ""] else _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    _one_error_line(run_cli(*args, env=env))


@pytest.mark.parametrize(
    "setting",
    [
        ("LAYERCODE_TURN_TIMEOUT", "nope"),
        ("LAYERCODE_MAX_BODY_SIZE", "9" * 5000),
        ("LAYERCODE_SIGNATURE_TOLERANCE", "1" * 5000),
        ("LAYERCODE_TURN_TIMEOUT", "1" * 5000),
        ("LAYERCODE_REPLAY_PROTECTION", "maybe"),
        ("REDIS_URL", "http://x"),
        ("LOG_LEVEL", "LOUD"),
        ("LAYERCODE_CORS_ORIGINS", "not a url"),
        ("LAYERCODE_MAX_QUEUED_TURNS", "-1"),
        ("LAYERCODE_HISTORY_MAX_BYTES", "0"),
    ],
)
def test_15_7_bad_setting_one_line_exit_2(setting: tuple[str, str]) -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, **{setting[0]: setting[1]})
    line = _serve_refused(env=env)
    assert setting[0] in line
    assert len(line) < 400, line


@pytest.mark.parametrize(
    "body",
    [
        "import anyio\nasync def agent(a, b, c):\n    yield 'x'\n",
        "agent = 42\n",
        "def agent(a, b, c):\n    return None\n",
        "async def agent(*, keyword_only):\n    yield 'x'\n",
    ],
)
def test_14_5_agent_that_cannot_work_refused_at_start(tmp_path: Path, body: str) -> None:
    (tmp_path / "bad_sig.py").write_text(body)
    line = _serve_refused("--agent", "bad_sig:agent", cwd=tmp_path)
    assert "agent" in line


GOOD_FORMS = """
import anyio
from collections.abc import AsyncIterator

async def gen(event, context):
    yield "gen"

async def coro(event):
    return "coro"

class Callable_:
    async def __call__(self, event, context):
        return "obj"

obj = Callable_()

async def _items():
    yield "sync"

def sync_returning_iterable(event):
    return _items()
"""


@pytest.mark.parametrize("attr", ["gen", "coro", "obj", "sync_returning_iterable"])
def test_14_5_every_working_form_still_accepted(tmp_path: Path, attr: str) -> None:
    (tmp_path / "forms.py").write_text(GOOD_FORMS)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    with served_cli("--agent", f"forms:{attr}", env=env, cwd=tmp_path) as (base, _):
        reply = _post(base + "/api/agent", event_body("message"))
    tts = [e for e in _sse_events(reply.text) if e["type"] == "response.tts"]
    assert tts, reply.text


@pytest.mark.parametrize("kind", ["session.update", "session.end", "data"])
def test_14_6_readme_node_style_non_turn_events(kind: str) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from layercode_asgi import LayercodeSignature, parse_webhook_payload, stream_response

    called: list[Any] = []

    async def handler(stream: Any) -> None:
        called.append(stream)
        await stream.tts("Hi there")
        await stream.end()

    async def route(request: Any) -> Any:
        return stream_response(parse_webhook_payload(await request.body()), handler)

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET, paths=["/api/agent"])
    with serve(app) as base:
        reply = _post(base + "/api/agent", event_body(kind))
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"status": "ok"}


def test_14_7_data_event_without_data_field() -> None:
    from layercode_asgi import create_app

    seen: list[Any] = []
    app = create_app(
        _settings(),
        agent="echo",
        on_data=lambda event: seen.append(event.data) or {"ok": True},
    )
    body = msgspec.json.encode(
        {"type": "data", "session_id": "s", "conversation_id": "c", "turn_id": "t"}
    )
    with serve(app) as base:
        reply = _post(base + "/api/agent", body)
    assert reply.status_code == 200, reply.text
    assert seen == [{}]


def test_14_7_session_end_transcript_unknown_fields_readable() -> None:
    from layercode_asgi import parse_webhook_payload

    body = msgspec.json.encode(
        {
            "type": "session.end", "session_id": "s", "conversation_id": "c",
            "transcript": [{"role": "user", "text": "hi", "timestamp": "x", "new_field": {"a": 1}}],
        }
    )  # fmt: skip
    event: Any = parse_webhook_payload(body)
    item = event.transcript[0]
    found = [getattr(item, name, None) for name in ("extra", "extras", "unknown", "fields")]
    as_text = repr(item) + repr(found) + repr(msgspec.to_builtins(item))
    assert "new_field" in as_text, as_text


LINE_BREAKS = "a\u2028b\u2029c\u0085d"


def test_14_8_no_raw_unicode_line_breaks_create_app_and_node_style() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from layercode_asgi import (
        LayercodeSignature,
        create_app,
        parse_webhook_payload,
        stream_response,
    )

    async def agent(event: Any) -> AsyncIterator[Any]:
        from layercode_asgi import Data

        yield LINE_BREAKS
        yield Data({"k": LINE_BREAKS})

    async def handler(stream: Any) -> None:
        await stream.tts(LINE_BREAKS)
        await stream.data({"k": LINE_BREAKS})
        await stream.end()

    async def route(request: Any) -> Any:
        return stream_response(parse_webhook_payload(await request.body()), handler)

    node = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    node.add_middleware(LayercodeSignature, secret=SECRET, paths=["/api/agent"])
    ours = create_app(_settings(), agent=agent)
    for app in (ours, node):
        with serve(app) as base:
            reply = _post(base + "/api/agent", event_body("message", text=LINE_BREAKS))
        raw = reply.content.decode()
        for char in "\u2028\u2029\u0085":
            assert char not in raw, repr(raw)
        events = _sse_events(raw)
        assert any(e.get("content") == LINE_BREAKS for e in events), events
        assert any(e.get("content") == {"k": LINE_BREAKS} for e in events), events


def test_14_8_format_sse_message_escapes_json() -> None:
    from layercode_asgi import format_sse_message

    rendered = format_sse_message(msgspec.json.encode({"x": LINE_BREAKS}).decode())
    for char in "\u2028\u2029\u0085":
        assert char not in rendered, repr(rendered)
    assert _sse_events(rendered) == [{"x": LINE_BREAKS}]


def test_14_8_timeout_message_and_error_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from layercode_asgi import create_app

    from .agents_for_tests import scripted_agent

    settings = _settings(
        turn_timeout=0.5,
        turn_timeout_message=LINE_BREAKS,
    )
    app = create_app(settings, agent=scripted_agent)
    with serve(app) as base:
        reply = _post(base + "/api/agent", event_body("message", text="hang"))
    for char in "\u2028\u2029\u0085":
        assert char not in reply.text
    assert any(e.get("content") == LINE_BREAKS for e in _sse_events(reply.text)), reply.text


def test_14_9_ready_reports_no_model_for_custom_agent() -> None:
    from layercode_asgi import create_app

    from .agents_for_tests import history_agent

    settings = _settings()
    for agent in (history_agent, "echo"):
        with serve(create_app(settings, agent=agent)) as base:
            body = httpx.get(base + "/ready", timeout=10).json()
        assert "model" not in body, body


def test_14_13_webhook_default_keeps_history() -> None:
    from layercode_asgi import LayercodeSignature, LayercodeWebhook

    from .agents_for_tests import history_agent

    app = LayercodeSignature(LayercodeWebhook(history_agent), secret=SECRET)
    with serve(app) as base:
        _post(base + "/", event_body("message", text="one"))
        second = _post(base + "/", event_body("message", text="two"))
    assert "saw=2" in second.text, second.text


# -- issue 15 --------------------------------------------------------------------------------------

PASSWORDS = ["Zq8/Hk2+pW9", "ab#cd?ef", "p@ss/word", "x?y=z#w"]


def _settings_text(**values: Any) -> str:
    """``repr`` and ``as_dict`` of the settings, or the error refusing them."""
    from layercode_asgi import ConfigurationError

    try:
        settings = _settings(**values)
    except ConfigurationError as exc:
        return f"refused: {exc}"
    return repr(settings) + str(settings.as_dict())


@pytest.mark.parametrize("password", PASSWORDS)
def test_15_1_redis_password_never_printed(password: str) -> None:
    url = f"redis://default:{password}@127.0.0.1:1/0"
    assert password not in _settings_text(redis_url=url)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, REDIS_URL=url, LAYERCODE_REPLAY_PROTECTION="true")
    result = run_cli("serve", "--env-file", "", "--agent", "nosuch", env=env)
    assert result.returncode == 2
    assert password not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=TopSecretQ",
        "redis://127.0.0.1:1/0?db=0&password=TopSecretQ",
        "unix:///tmp/redis.sock?db=0&password=TopSecretQ",
        "redis://127.0.0.1:1/0?username=u&PASSWORD=TopSecretQ",
    ],
)
def test_15_1_redis_password_in_query_not_printed(url: str) -> None:
    assert "TopSecretQ" not in _settings_text(redis_url=url)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, REDIS_URL=url)
    result = run_cli("serve", "--env-file", "", "--agent", "nosuch", "-v", env=env)
    assert "TopSecretQ" not in result.stdout + result.stderr


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_15_1_redis_password_not_in_logs_when_store_fails(tmp_path: Path) -> None:
    password = "Zq8Hk2pW9secret"
    env = _env(
        LAYERCODE_WEBHOOK_SECRET=SECRET,
        REDIS_URL=f"redis://default:{password}@127.0.0.1:{free_port()}/0",
    )
    with served_cli(env=env) as (base, process):
        ready = httpx.get(base + "/ready", timeout=30)
        _post(base + "/api/agent", event_body("message"))
        process.stop()
        out = process.output()
    assert ready.status_code == 503
    assert password not in out + ready.text


@pytest.mark.parametrize(
    "content",
    [
        "LAYERCODE_WEBHOOK_SECRET=whsec_ok\n-----BEGIN PRIVATE KEY-----SECRETPEMLINE\n",
        'LAYERCODE_WEBHOOK_SECRET="whsec_unterminated SECRETQUOTED\n',
        "export = SECRETEXPORT\n",
    ],
)
def test_15_1_env_file_errors_quote_no_line(tmp_path: Path, content: str) -> None:
    (tmp_path / ".env").write_text(content)
    result = run_cli("serve", "--port", str(free_port()), env=_env(), cwd=tmp_path)
    out = result.stdout + result.stderr
    for secret in (
        "SECRETPEMLINE",
        "SECRETQUOTED",
        "SECRETEXPORT",
        "whsec_ok",
        "whsec_unterminated",
    ):
        assert secret not in out, out
    if result.returncode != 0:
        _one_error_line(result)
        assert "line" in out


def test_15_2_sse_parser_large_event_in_small_chunks() -> None:
    from layercode_asgi.sse_parser import SSEParser

    parser = SSEParser()
    payload = (
        b"data: "
        + msgspec.json.encode({"type": "response.data", "content": "x" * (8 << 20)})
        + b"\n\n"
    )
    events: list[Any] = []
    for start in range(0, len(payload), 4096):
        result = parser.feed(payload[start : start + 4096])
        if result:
            events.extend(result)
    assert len(events) == 1


def _hostile_backend(kind: str) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        if kind == "escapes":
            tts = "\x1b[2J\x1b]52;c;ZXZpbA==\x07\rOK fake\n\u009b31m"
            body = (
                b"data: "
                + msgspec.json.encode({"type": "response.tts", "content": tts, "turn_id": "t"})
                + b'\n\ndata: {"type":"response.end","turn_id":"t"}\n\n'
            )
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
        elif kind == "error-body":
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"\x1b[2Jboom\x1b]52;c;ZXZpbA==\x07"})
        elif kind == "gzip-bomb":
            bomb = gzip.compress(b"\0" * (256 << 20), 9)
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"text/plain"), (b"content-encoding", b"gzip")]})  # fmt: skip
            await send({"type": "http.response.body", "body": bomb})
        elif kind == "endless":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            chunk = b'data: {"type":"response.tts","content":"a","turn_id":"t"}\n\n' * 2000
            for _ in range(20000):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize("kind", ["escapes", "error-body"])
def test_15_4_no_terminal_escapes_printed(kind: str) -> None:
    with serve(_hostile_backend(kind)) as base:
        for extra in ([], ["--json"], ["-q"]):
            result = run_cli("simulate", "--url", base + "/api/agent", *extra, "hi",
                             env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET))  # fmt: skip
            out = result.stdout + result.stderr
            for char in ("\x1b", "\x07", "\r", "\u009b"):
                assert char not in out, (extra, repr(out))
            assert not any(line.startswith("OK fake") for line in out.splitlines())


@pytest.mark.parametrize("kind", ["gzip-bomb", "endless"])
def test_15_3_bounded_reading_under_memory_limit(kind: str) -> None:
    with serve(_hostile_backend(kind)) as base:
        code = (
            "import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from layercode_asgi.cli import main\n"
            f"sys.exit(main(['simulate', '--url', '{base}/api/agent', '--timeout', '20', 'hi']))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
            env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET), check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "MemoryError" not in result.stderr and "Traceback" not in result.stderr
    assert "PROTOCOL VIOLATION" in result.stdout + result.stderr


def test_15_5_rotation_form_for_simulate_and_sign() -> None:
    from layercode_asgi import Settings, create_app

    app = create_app(
        Settings(layercode_webhook_secret="whsec_new", environ={}, env_file=None), agent="echo"
    )
    env = _env(LAYERCODE_WEBHOOK_SECRET="whsec_new, whsec_old")
    with serve(app) as base:
        url = base + "/api/agent"
        simulated = run_cli("simulate", "--url", url, "hi", env=env)
        with_flag = run_cli(
            "simulate", "--url", url, "--secret", "whsec_new,whsec_old", "hi", env=_env()
        )
        body = event_body("session.update").decode()
        header = run_cli("sign", "--body", body, env=env).stdout.strip()
        signed = httpx.post(url, content=body, headers={"layercode-signature": header}, timeout=10)
    assert simulated.returncode == 0, simulated.stdout + simulated.stderr
    assert with_flag.returncode == 0, with_flag.stdout + with_flag.stderr
    assert signed.status_code == 200, signed.text


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
@pytest.mark.parametrize(
    "body", ["@/etc/passwd", "@-", '{"type":"session.update","x":"$(id)`id`"}', "-d @x"]
)
def test_15_6_sign_curl_sends_exact_bytes(body: str, tmp_path: Path) -> None:
    received: list[bytes] = []
    app = recording_app(received)
    with serve(app) as base:
        printed = run_cli("sign", "--secret", SECRET, "--body", body, "--curl", base + "/x")
        assert printed.returncode == 0, printed.stderr
        subprocess.run(["bash", "-c", printed.stdout], cwd=tmp_path, timeout=30, check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert received == [body.encode()]


@pytest.mark.parametrize(
    "agent", [":x", "..pkg:x", "pkg:", ":", "a b:c", "pkg:x.y..z", "\x1b[2J:x"]
)
def test_15_7_malformed_agent_paths(agent: str) -> None:
    line = _serve_refused("--agent", agent)
    assert "\x1b" not in line


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
@pytest.mark.parametrize("failure", ["oom", "readonly"])
def test_15_8_redis_error_reply_in_replay_cache_is_503(failure: str) -> None:
    import redis as redis_lib

    from layercode_asgi import create_app

    with running_redis() as server:
        settings = _settings(
            redis_url=server.url,
            replay_protection=True,
        )
        app = create_app(settings, agent="echo")
        client = redis_lib.Redis.from_url(server.url)
        try:
            if failure == "oom":
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("maxmemory", "1")
            else:
                client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            with serve(app) as base:
                turn = _post(base + "/api/agent", event_body("message"))
                update = _post(base + "/api/agent", event_body("session.update"))
                end = _post(base + "/api/agent", event_body("session.end"))
        finally:
            client.execute_command("REPLICAOF", "NO", "ONE")
            client.config_set("maxmemory", "0")
            client.close()
    for reply in (turn, update, end):
        assert reply.status_code == 503, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        assert "Traceback" not in reply.text and "OOM" not in reply.text


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_15_8_redis_error_reply_in_history_store_is_503() -> None:
    import redis as redis_lib

    from layercode_asgi import create_app

    with running_redis() as server:
        settings = _settings(redis_url=server.url)
        app = create_app(settings, agent="echo")
        client = redis_lib.Redis.from_url(server.url)
        try:
            client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            with serve(app) as base:
                turn = _post(base + "/api/agent", event_body("message"))
                end = _post(base + "/api/agent", event_body("session.end"))
        finally:
            client.execute_command("REPLICAOF", "NO", "ONE")
            client.close()
    for reply in (turn, end):
        assert reply.status_code in (200, 503), reply.text
        assert "Internal Server Error" not in reply.text
        if reply.status_code == 200 and reply.headers["content-type"].startswith(
            "text/event-stream"
        ):
            types = [e["type"] for e in _sse_events(reply.text)]
            assert types[-1] == "response.end", types


def test_15_9_queued_turns_bounded_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("SLOW_AGENT_SECONDS", "3")
    app = _app_from_env(
        monkeypatch, tmp_path,
        LAYERCODE_MAX_QUEUED_TURNS="1",
        LAYERCODE_AGENT="tests.agents_for_tests:scripted_agent",
    )  # fmt: skip
    statuses: list[int] = []
    with serve(app) as base:
        url = base + "/api/agent"

        def turn(text: str) -> None:
            statuses.append(
                _post(url, event_body("message", text=text, conversation_id="q")).status_code
            )

        pending = app.state.webhook._pending  # turns of each conversation admitted
        threads = [threading.Thread(target=turn, args=("slow",))]
        threads[0].start()
        _until(lambda: pending.get("q") == 1, "the slow turn admitted")
        threads.append(threading.Thread(target=turn, args=("queued",)))
        threads[1].start()
        _until(lambda: pending.get("q") == 2, "the second turn queued")
        started = time.monotonic()
        third = _post(url, event_body("message", text="third", conversation_id="q"))
        answered_in = time.monotonic() - started
        for thread in threads:
            thread.join(30)
    assert third.status_code == 503, third.text
    assert answered_in < 2.5  # at once, not after the slow turn
    assert sorted(statuses) == [200, 200]


# -- issue 17 --------------------------------------------------------------------------------------


def test_17_list_agents_has_starter() -> None:
    result = run_cli("list-agents")
    assert result.returncode == 0
    assert any(line.split()[0] == "starter" for line in result.stdout.splitlines() if line.strip())


def test_17_1_starter_without_key_refuses_one_line() -> None:
    line = _serve_refused("--agent", "starter")
    assert "OPENAI_API_KEY" in line


def test_17_1_starter_google_without_key_refuses() -> None:
    line = _serve_refused(
        "--agent",
        "starter",
        env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET, DEFAULT_MODEL="google-gla:gemini-2.5-flash"),
    )
    assert "GOOGLE_GENERATIVEAI_API_KEY" in line


def test_17_1_starter_without_package_refuses(tmp_path: Path) -> None:
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\nfor name in ('pydantic_ai', 'pydantic_ai_slim'):\n    sys.modules[name] = None\n"
    )
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, OPENAI_API_KEY="sk-test")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    line = _serve_refused("--agent", "starter", env=env)
    assert "pydantic" in line.lower()


def test_17_2_adapters_importable_without_extras(tmp_path: Path) -> None:
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\nfor name in ('pydantic_ai', 'langchain_core', 'langgraph', 'agents', 'openai'):\n"
        "    sys.modules[name] = None\n"
    )
    code = textwrap.dedent(
        """
        import layercode_asgi, layercode_asgi.adapters as a
        from layercode_asgi.adapters import from_pydantic_ai, from_langchain, from_openai_agents
        for fn in (from_pydantic_ai, from_langchain, from_openai_agents):
            try:
                fn(object())
            except ImportError as exc:
                msg = str(exc)
                assert "pip install" in msg or "extra" in msg, msg
                print("refused:", msg.splitlines()[0])
            else:
                raise SystemExit("accepted without its extra")
        """
    )
    env = _env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused:") == 3


def test_17_5_examples_per_adapter() -> None:
    names = {path.name for path in (ROOT / "examples").glob("*.py")}
    text = " ".join((ROOT / "examples" / name).read_text() for name in names)
    for adapter in ("from_pydantic_ai", "from_langchain", "from_openai_agents"):
        assert adapter in text, adapter


def test_17_readme_shows_an_adapter() -> None:
    readme = (ROOT / "README.md").read_text()
    assert any(
        name in readme for name in ("from_pydantic_ai", "from_langchain", "from_openai_agents")
    )
    assert 'get_agent("starter")' in readme or "--agent starter" in readme


# A port past 65535 and a malformed IDNA host were tracebacks (OverflowError, IDNAError).
@pytest.mark.parametrize(
    "url",
    ["http://[::1", "http://x/\n", "http://x:port/", "http://127.0.0.1:99999/", "http://xn--/"],
)
def test_15_7_simulate_malformed_url_is_a_usage_error(url: str) -> None:
    result = run_cli("simulate", "--url", url, "hi", env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "\n" not in lines[0]


# -- second pass -----------------------------------------------------------------------------------


def test_13_4_queued_turn_deadline_starts_at_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Turn timeout 2.5 s; each slow turn takes 1.6 s; the second waits ~1.6 s for the lock
    and must still finish (its deadline counts from the lock, not from its arrival)."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("SLOW_AGENT_SECONDS", "1.6")
    app = _app_from_env(
        monkeypatch, tmp_path,
        LAYERCODE_TURN_TIMEOUT="2.5",
        LAYERCODE_TURN_TIMEOUT_MESSAGE="TIMED-OUT",
        LAYERCODE_AGENT="tests.agents_for_tests:scripted_agent",
    )  # fmt: skip
    replies: list[httpx.Response] = []
    with serve(app) as base:
        url = base + "/api/agent"

        def turn() -> None:
            replies.append(_post(url, event_body("message", text="slow", conversation_id="lk")))

        threads = [threading.Thread(target=turn) for _ in range(2)]
        threads[0].start()
        time.sleep(0.3)
        threads[1].start()
        for thread in threads:
            thread.join(30)
    assert len(replies) == 2
    for reply in replies:
        assert "TIMED-OUT" not in reply.text, reply.text
        assert " done" in reply.text, reply.text


def test_13_hardening_shutdown_grace_ends_stream_properly(tmp_path: Path) -> None:
    import signal

    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, LAYERCODE_SHUTDOWN_GRACE_PERIOD="1")
    with served_cli("--agent", "tests.agents_for_tests:scripted_agent", env=env) as (base, proc):
        result: dict[str, Any] = {}

        def hanging() -> None:
            result["reply"] = _post(base + "/api/agent", event_body("message", text="hang"))

        thread = threading.Thread(target=hanging)
        thread.start()
        proc.wait_output("agent hang running")  # the turn is open
        proc.process.send_signal(signal.SIGTERM)
        thread.join(30)
        proc.process.wait(20)
    reply = result["reply"]
    assert reply.status_code == 200
    types = [e["type"] for e in _sse_events(reply.text)]
    assert types[-2:] == ["response.error", "response.end"], reply.text
    assert proc.process.returncode == 0


def test_15_3_in_process_endless_agent_is_a_violation_not_memory_error() -> None:
    import anyio

    from layercode_asgi import create_app
    from layercode_asgi.testing import LayercodeTestClient, ProtocolViolation

    async def endless(event: Any) -> AsyncIterator[str]:
        while True:
            yield "x" * 1000

    app = create_app(_settings(), endless)

    async def run() -> ProtocolViolation:
        client = LayercodeTestClient(app, secret=SECRET, timeout=5)
        with pytest.raises(ProtocolViolation) as info:
            await client.message("go")
        return info.value

    violation = anyio.run(run)
    assert violation.name in ("timeout", "too-large"), violation


def test_17_serve_starter_against_fake_model(tmp_path: Path) -> None:
    from .fake_openai import fake_openai

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("PROMPT-FROM-FILE")
    with fake_openai() as (fake, base_url):
        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET,
            OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=base_url,
            LAYERCODE_SYSTEM_PROMPT_FILE=str(prompt_file),
        )
        with served_cli("--agent", "starter", env=env) as (base, _):
            url = base + "/api/agent"
            start = _post(url, event_body("session.start", conversation_id="st"))
            first = _post(url, event_body("message", text="hello", conversation_id="st"))
            second = _post(url, event_body("message", text="again", conversation_id="st"))
            ready = httpx.get(base + "/ready", timeout=10).json()
        simulate_ok = True
    assert simulate_ok
    start_tts = [e for e in _sse_events(start.text) if e["type"] == "response.tts"]
    assert start_tts, start.text  # a welcome line
    for reply in (first, second):
        types = [e["type"] for e in _sse_events(reply.text)]
        assert "response.tts" in types and types[-1] == "response.end", reply.text
    text = msgspec.json.encode(fake.requests).decode()
    assert "PROMPT-FROM-FILE" in text
    assert "hello" in msgspec.json.encode(fake.requests[-1]).decode()  # history passed on
    assert ready.get("model") == "openai:gpt-5-nano", (
        ready
    )  # 14.9: an agent with a model says which


def test_14_5_agent_exception_text_cannot_forge_log_lines(tmp_path: Path) -> None:
    (tmp_path / "forger.py").write_text(
        "async def agent(event):\n"
        "    raise RuntimeError('x\\n2099-01-01 CRITICAL root: FORGED\\r\\x1b[2J')\n"
        "    yield 'never'\n"
    )
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    with served_cli("--agent", "forger:agent", env=env, cwd=tmp_path) as (base, process):
        _post(base + "/api/agent", event_body("message"))
        process.stop()
        out = process.output()
    for line in out.splitlines():
        assert not line.startswith("2099-01-01"), line
        assert "\x1b" not in line, line


def test_13_1_empty_memory_cache_given_to_middleware_is_on() -> None:
    from layercode_asgi import LayercodeSignature, MemoryReplayCache

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = LayercodeSignature(ok, secret=SECRET, replay_protection=MemoryReplayCache())
    body = event_body("session.update")
    headers = signed_headers(body)
    with serve(app) as base:
        first = httpx.post(base + "/", content=body, headers=headers, timeout=10)
        second = httpx.post(base + "/", content=body, headers=headers, timeout=10)
    assert (first.status_code, second.status_code) == (200, 409)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_15_8_replay_cache_redis_down_is_503() -> None:
    from layercode_asgi import create_app

    with running_redis() as redis:
        settings = _settings(
            redis_url=redis.url,
            replay_protection=True,
        )
        app = create_app(settings, agent="echo")
        redis.stop()
        with serve(app) as base:
            reply = _post(base + "/api/agent", event_body("session.update"))
    assert reply.status_code == 503
    assert reply.json() == {"error": "replay protection unavailable"}


def test_14_8_stream_turn_and_sse_helpers_escape_line_breaks() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from layercode_asgi import create_sse_response, parse_webhook_payload, stream_turn

    async def agent(event: Any) -> AsyncIterator[str]:
        yield LINE_BREAKS

    async def turn_route(request: Any) -> Any:
        return stream_turn(parse_webhook_payload(await request.body()), agent)

    async def items() -> AsyncIterator[str]:
        yield msgspec.json.encode({"type": "response.tts", "content": LINE_BREAKS}).decode()

    async def sse_route(request: Any) -> Any:
        return create_sse_response(items())

    app = Starlette(
        routes=[Route("/t", turn_route, methods=["POST"]), Route("/s", sse_route, methods=["POST"])]
    )
    with serve(app) as base:
        for path in ("/t", "/s"):
            reply = httpx.post(base + path, content=event_body("message"), timeout=10)
            for char in "\u2028\u2029\u0085":
                assert char not in reply.text, (path, repr(reply.text))
            assert any(e.get("content") == LINE_BREAKS for e in _sse_events(reply.text)), path


def test_14_10_readme_quick_start_agent_on_session_start() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "You said: None" not in readme
    assert 'pip install "./layercode-asgi[server]"' in readme  # 14.11: the install that works


MORE_FORMS = """
import functools

async def _three(prefix, event, context):
    yield prefix

partial = functools.partial(_three, "partial")

async def star(*args):
    yield "star"

async def defaults(event, context=None, extra=1):
    yield "defaults"

class Holder:
    async def method(self, event, context):
        yield "method"

method = Holder().method

def returns_int(event):
    return 42
"""


@pytest.mark.parametrize("attr", ["partial", "star", "defaults", "method"])
def test_14_5_more_working_forms_accepted(tmp_path: Path, attr: str) -> None:
    (tmp_path / "more_forms.py").write_text(MORE_FORMS)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    with served_cli("--agent", f"more_forms:{attr}", env=env, cwd=tmp_path) as (base, _):
        reply = _post(base + "/api/agent", event_body("message"))
    assert [e for e in _sse_events(reply.text) if e["type"] == "response.tts"], reply.text


def test_14_5_non_reply_logged_once_with_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "more_forms.py").write_text(MORE_FORMS)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    with served_cli("--agent", "more_forms:returns_int", env=env, cwd=tmp_path) as (base, proc):
        replies = [_post(base + "/api/agent", event_body("message")) for _ in range(3)]
        proc.stop()
        out = proc.output()
    for reply in replies:
        types = [e["type"] for e in _sse_events(reply.text)]
        assert types[-2:] == ["response.error", "response.end"], reply.text
    # what it returned and what was expected, once per turn (not once per item or retry)
    lines = [line for line in out.splitlines() if "ERROR" in line and "int 42" in line]
    assert len(lines) == 3, out
    assert all("expected" in line for line in lines)


LINE_BREAK_AGENT = """
async def agent(event):
    yield "a\\u2028b\\u2029c\\u0085d"
"""


@NEEDS_HYPERCORN
def test_14_8_create_app_under_hypercorn_escapes_line_breaks(tmp_path: Path) -> None:
    (tmp_path / "lb_agent.py").write_text(LINE_BREAK_AGENT)
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, LAYERCODE_AGENT="lb_agent:agent")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    with start_server_process([*HYPERCORN, f"{APP_FROM_ENV}()"], env=env, cwd=tmp_path) as server:
        reply = _post(server.url + "/api/agent", event_body("message"))
    for char in "\u2028\u2029\u0085":
        assert char not in reply.text
    assert any(e.get("content") == LINE_BREAKS for e in _sse_events(reply.text)), reply.text


def test_13_6_uvicorn_root_path_not_at_boundary(tmp_path: Path) -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    command = [PYTHON, "-m", "uvicorn", "--factory", APP_FROM_ENV, "--host", "127.0.0.1",
               "--port", "{port}", "--root-path", "/ap"]  # fmt: skip
    with start_server_process(command, env=env, cwd=tmp_path, ready_path=None) as server:
        for path in ("/api/agent", "/ap/api/agent", "/ap/agent"):
            reply = httpx.post(server.url + path, content=event_body(), timeout=10)
            assert reply.status_code in (307, 401, 404, 405), (path, reply.status_code)
            assert "response.tts" not in reply.text


@pytest.mark.parametrize("kind", ["escapes-in-type", "escapes-in-error"])
def test_15_4_escapes_in_event_fields(kind: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        event = (
            {"type": "\x1b[2J\x1b]52;c;ZXZpbA==\x07", "turn_id": "t"}
            if kind == "escapes-in-type"
            else {"type": "response.error", "error": "\x1b[2J\rOK fake\x07", "turn_id": "t"}
        )
        body = b"data: " + msgspec.json.encode(event) + b"\n\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    with serve(app) as base:
        for extra in ([], ["--json"], ["--strict"]):
            result = run_cli("simulate", "--url", base + "/api/agent", *extra, "hi",
                             env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET))  # fmt: skip
            out = result.stdout + result.stderr
            for char in ("\x1b", "\x07", "\r"):
                assert char not in out, (extra, repr(out))
            assert result.returncode == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_15_6_sign_curl_file_and_multiline(tmp_path: Path) -> None:
    received: list[bytes] = []
    app = recording_app(received)
    weird = tmp_path / "@body with space.json"
    weird.write_bytes(b"line1\nline2\r\n\xff")
    with serve(app) as base:
        for args in (["--file", str(weird)], ["--body", "a\nb\r\n 'q' \"d\" \\"]):
            printed = subprocess.run(
                [CLI, "sign", "--secret", SECRET, *args, "--curl", base + "/x"],
                capture_output=True,
                env=_env(),
                timeout=TIMEOUT,
                check=True,
            )  # fmt: skip (bytes: no newline translation of the printed command)
            subprocess.run([b"bash", b"-c", printed.stdout], cwd=tmp_path, timeout=30,
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert received == [b"line1\nline2\r\n\xff", b"a\nb\r\n 'q' \"d\" \\"]


def test_17_1_starter_google_key_is_enough_to_start() -> None:
    env = _env(
        LAYERCODE_WEBHOOK_SECRET=SECRET,
        DEFAULT_MODEL="google-gla:gemini-2.5-flash",
        GOOGLE_GENERATIVEAI_API_KEY="g-test",
    )
    with served_cli("--agent", "starter", env=env) as (base, _):
        assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_17_4_openai_agent_through_base_url() -> None:
    from .fake_openai import fake_openai

    with fake_openai() as (fake, base_url):
        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=base_url
        )
        with served_cli("--agent", "openai", env=env) as (base, _):
            reply = _post(base + "/api/agent", event_body("message", text="hi"))
    types = [e["type"] for e in _sse_events(reply.text)]
    assert "response.tts" in types and types[-1] == "response.end", reply.text
    assert fake.requests


BYTES_AGENT = """
async def agent(event, context):
    texts = [m.text for m in context.history]
    last = texts[-1][:12].replace(" ", "_") if texts else ""
    yield f"bytes={sum(len(t.encode()) for t in texts)} n={len(texts)} last={last}"
"""


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_13_hardening_history_max_bytes_through_serve(store: str, tmp_path: Path) -> None:
    if store == "redis" and REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    (tmp_path / "bytes_agent.py").write_text(BYTES_AGENT)
    with contextlib.ExitStack() as stack:
        extra = {}
        if store == "redis":
            extra["REDIS_URL"] = stack.enter_context(running_redis()).url
        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET,
            LAYERCODE_HISTORY_MAX_BYTES="3000",
            LAYERCODE_MAX_BODY_SIZE="200000",
            **extra,
        )
        with served_cli("--agent", "bytes_agent:agent", env=env, cwd=tmp_path) as (base, _):
            url = base + "/api/agent"
            for index in range(6):
                text = f"msg{index}-" + "y" * 1000
                _post(url, event_body("message", text=text, conversation_id="big"))
            big = _post(url, event_body("message", text="count", conversation_id="big"))
            _post(url, event_body("message", text="H" * 50000, conversation_id="huge"))
            huge = _post(url, event_body("message", text="count", conversation_id="huge"))
    spoken = [
        "".join(e["content"] for e in _sse_events(r.text) if e["type"] == "response.tts")
        for r in (big, huge)
    ]
    fields = [dict(part.split("=", 1) for part in text.split(" ")) for text in spoken]
    assert 0 < int(fields[0]["bytes"]) <= 3000, spoken
    assert fields[0]["last"].startswith("bytes="), spoken  # newest kept: the last reply
    assert 0 < int(fields[1]["bytes"]) <= 3000, spoken  # one oversized message kept truncated


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_15_9_queued_turns_bounded_with_redis(tmp_path: Path) -> None:
    with running_redis() as redis:
        from redis import Redis

        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET,
            LAYERCODE_MAX_QUEUED_TURNS="1",
            REDIS_URL=redis.url,
            SLOW_AGENT_SECONDS="3",
        )
        statuses: list[int] = []
        agent = "tests.agents_for_tests:scripted_agent"
        with served_cli("--agent", agent, env=env) as (base, _), Redis.from_url(redis.url) as raw:
            url = base + "/api/agent"

            def turn(text: str) -> None:
                reply = _post(url, event_body("message", text=text, conversation_id="q"))
                statuses.append(reply.status_code)

            threads = [threading.Thread(target=turn, args=(text,)) for text in ("slow", "queued")]
            threads[0].start()
            _until(lambda: raw.exists("layercode:{q}:lock"), "the slow turn holds the lock")
            threads[1].start()
            _until(lambda: raw.llen("layercode:{q}:queue") == 1, "the second turn queued")
            third = _post(url, event_body("message", text="third", conversation_id="q"))
            for thread in threads:
                thread.join(30)
    assert third.status_code == 503, third.text
    assert sorted(statuses) == [200, 200]


def test_13_2_future_dated_signature_replay_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A signature dated one tolerance ahead verifies until t + tolerance + 1: a replay
    shortly before then is still refused."""
    app = _app_from_env(
        monkeypatch,
        tmp_path,
        LAYERCODE_REPLAY_PROTECTION="true",
        LAYERCODE_SIGNATURE_TOLERANCE="1",
    )
    with serve(app) as base:
        first, second = _replay_at_window_end(base, offset=1, at=1.3)
    assert (first, second) == (200, 409)


def test_17_4_starter_client_disconnect_cancels_model_request() -> None:
    from .fake_openai import Script, fake_openai

    with fake_openai() as (fake, base_url):
        fake.push(Script(text=("One moment.", " more", " and the end."), hold=True))
        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=base_url
        )
        with served_cli("--agent", "starter", env=env) as (base, _):
            body = event_body("message", text="hello", conversation_id="dc")
            with (
                httpx.Client(timeout=10) as client,
                client.stream(
                    "POST", base + "/api/agent", content=body, headers=signed_headers(body)
                ) as reply,
            ):
                assert fake.held.wait(10)
                for line in reply.iter_lines():
                    if "response.tts" in line:
                        break  # the first chunk is spoken before the model finished
                assert not fake.last_delta_sent.is_set()
            # the client is gone; the model request must be cancelled
            assert fake.closed_early.wait(10)
            fake.release()


def test_readme_security_chunked_413_and_long_conversation_id() -> None:
    from layercode_asgi import create_app

    app = create_app(
        _settings(max_body_size=1000),
        agent="echo",
    )
    big = event_body("message", text="x" * 5000)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    long_id = event_body("message", conversation_id="c" * 513)
    with serve(app) as base:
        chunked = httpx.post(
            base + "/api/agent", content=chunks(), headers=signed_headers(big), timeout=10
        )
        too_long = _post(base + "/api/agent", long_id)
    assert chunked.status_code == 413
    assert chunked.headers.get("connection", "").lower() == "close"
    assert too_long.status_code == 400, too_long.text
    assert "conversation_id" in too_long.text


def test_17_3_shop_example_tool_filler_data_and_hangup_through_serve() -> None:
    from .fake_openai import Script, fake_openai

    with fake_openai() as (fake, base_url):
        fake.push(
            Script(text=("Let me see.",), tool_call=("check_stock", '{"item": "tent"}')),
            Script(text=("We have four tents.",)),
            Script(text=("Goodbye!",), tool_call=("end_call", "{}")),
            Script(text=(" Bye.",)),
        )
        env = _env(
            LAYERCODE_WEBHOOK_SECRET=SECRET, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=base_url
        )
        agent = "examples.pydantic_ai_shop:agent"
        with served_cli("--agent", agent, env=env) as (base, _):
            url = base + "/api/agent"
            stock = _post(url, event_body("message", text="tents?", conversation_id="shop"))
            bye = _post(url, event_body("message", text="bye", conversation_id="shop"))
    events = _sse_events(stock.text)
    spoken = "".join(e["content"] for e in events if e["type"] == "response.tts")
    assert "Let me check." in spoken, events
    assert {"item": "tent", "in_stock": 4} in [
        e.get("content") for e in events if e["type"] == "response.data"
    ], events
    types = [e["type"] for e in _sse_events(bye.text)]
    assert "response.hangup" in types and types[-1] == "response.end", types


def test_13_1_explicit_empty_stores_are_used() -> None:
    from layercode_asgi import (
        ConversationManager,
        LayercodeSignature,
        LayercodeWebhook,
        MemoryConversationStore,
    )

    from .agents_for_tests import history_agent

    store = MemoryConversationStore()
    assert len(store) == 0
    webhook = LayercodeWebhook(history_agent, conversations=ConversationManager(store))
    with serve(LayercodeSignature(webhook, secret=SECRET)) as base:
        _post(base + "/", event_body("message", text="one"))
        second = _post(base + "/", event_body("message", text="two"))
    assert "saw=2" in second.text, second.text


def test_15_5_dev_banner_command_works_with_the_secret_in_dotenv(tmp_path: Path) -> None:
    """The documented set-up: the (rotation-form) secret in ./.env, not in the shell."""
    (tmp_path / ".env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_new,whsec_old\n")
    env = _env()
    serve = [CLI, "serve", "--dev", "--host", "127.0.0.1", "--port", "{port}"]
    with start_server_process(
        serve, env=env, cwd=tmp_path, ready_text="layercode-asgi simulate"
    ) as server:
        banner = server.output().splitlines()
        command = next(line.strip() for line in banner if "layercode-asgi simulate" in line)
        result = subprocess.run(
            ["bash", "-c", command.replace("layercode-asgi", shlex.quote(CLI), 1)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_15_4_escapes_in_reply_headers_and_status_body() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/\x9b2Jhtml\xc2\x9d")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"<html>\x1b]52;c;ZXZpbA==\x07</html>"})

    with serve(app) as base:
        for extra in ([], ["--json"]):
            result = run_cli("simulate", "--url", base + "/api/agent", *extra, "hi",
                             env=_env(LAYERCODE_WEBHOOK_SECRET=SECRET))  # fmt: skip
            out = result.stdout + result.stderr
            for char in ("\x1b", "\x07", "\x9b", "\x9d"):
                assert char not in out, (extra, repr(out))
            assert result.returncode == 1


@pytest.mark.parametrize(
    ("upstream_body", "expected"),
    [
        ({"error": "e" * 10_000}, "e" * 200),
        ({"error": {"secret": "NESTED-SECRET"}}, "LayerCode API refused the request (403)"),
        ({"message": "OTHER-FIELD"}, "LayerCode API refused the request (403)"),
        ("not an object NOT-JSON-SECRET", "LayerCode API refused the request (403)"),
    ],
)
def test_13_7_authorize_relays_only_a_bounded_error_message(
    upstream_body: Any, expected: str
) -> None:
    from layercode_asgi import create_app

    raw = (
        upstream_body.encode()
        if isinstance(upstream_body, str)
        else msgspec.json.encode(upstream_body)
    )

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": raw})

    with serve(upstream) as upstream_url:
        settings = _settings(
            layercode_api_key="lc_key",
            layercode_api_url=upstream_url,
        )
        with serve(create_app(settings, agent="echo")) as base:
            reply = httpx.post(base + "/api/authorize", json={"agent_id": "a"}, timeout=30)
    assert reply.status_code == 403
    assert reply.json() == {"error": expected}


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"future.event","session_id":"s","conversation_id":"c"}',
        b'{"type":"message","session_id":"s"}',
    ],
)
def test_14_6_readme_node_style_unknown_or_malformed_event_not_500(body: bytes) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from layercode_asgi import LayercodeSignature, stream_response

    async def handler(stream: Any) -> None:
        await stream.tts("Hi there")
        await stream.end()

    async def route(request: Any) -> Any:  # the README's snippet, as written
        return stream_response(await request.body(), handler)

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET, paths=["/api/agent"])
    with serve(app) as base:
        reply = _post(base + "/api/agent", body)
    assert reply.status_code < 500, reply.text
    expected = {"status": "ignored"} if b"future.event" in body else None
    if expected is not None:
        assert (reply.status_code, reply.json()) == (200, expected)
    else:
        assert reply.status_code == 400 and reply.json()["path"], reply.text


@NEEDS_HYPERCORN
def test_13_hardening_early_reject_under_hypercorn(tmp_path: Path) -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET)
    command = [*HYPERCORN, f"{APP_FROM_ENV}()"]
    with (
        start_server_process(command, env=env, cwd=tmp_path) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        sock.sendall(
            b"POST /api/agent HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)  # no byte of the body was sent
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 401"), data
    assert b"connection: close" in head, data


@pytest.mark.parametrize(
    "extra",
    [
        {"LAYERCODE_SYSTEM_PROMPT": "a", "LAYERCODE_SYSTEM_PROMPT_FILE": "/etc/hostname"},
        {"LAYERCODE_SYSTEM_PROMPT_FILE": "/nonexistent/prompt.txt"},
        {"DEFAULT_MODEL": "no-such-provider:model"},
    ],
)
def test_17_1_starter_bad_prompt_or_model_settings_one_line(extra: dict[str, str]) -> None:
    env = _env(LAYERCODE_WEBHOOK_SECRET=SECRET, OPENAI_API_KEY="sk-test", **extra)
    _serve_refused("--agent", "starter", env=env)
