"""`layercode-asgi simulate` end to end: real servers, and backends that break the protocol."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from layercode_asgi.cli import main

from .asgi_stub import read_body
from .conftest import PYTHON, ROOT, SECRET, free_port, serve, start_server_process


def server_command(server: str) -> list[str]:
    target = "layercode_asgi.server:app_from_env"
    if server == "uvicorn":
        return [PYTHON, "-m", "uvicorn", "--factory", target, "--host", "127.0.0.1",
                "--port", "{port}"]  # fmt: skip
    if server.startswith("hypercorn"):  # it evaluates the attribute expression: call the factory
        worker = ["--worker-class", "trio"] if server == "hypercorn-trio" else []
        return [PYTHON, "-m", "hypercorn", *worker, f"{target}()", "--bind", "127.0.0.1:{port}"]
    return [PYTHON, "-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1",
            "--port", "{port}", "--workers", "1", target]  # fmt: skip


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "hypercorn-trio", "granian"])
def test_simulate_cli_against_real_servers(server: str, tmp_path: Path) -> None:
    # the nox ``lowest`` session installs uvicorn and hypercorn only
    pytest.importorskip(server.removeprefix("hypercorn-"))
    # /metrics too where prometheus-client is installed (not in the nox ``lowest`` session)
    metrics = importlib.util.find_spec("prometheus_client") is not None
    env = {
        **os.environ,
        "LAYERCODE_WEBHOOK_SECRET": SECRET,
        "LAYERCODE_AUTHORIZE_API_KEYS": "test-key",
        "LAYERCODE_METRICS": str(metrics).lower(),
        "LAYERCODE_METRICS_API_KEYS": "scrape-key",
    }
    # cwd is an empty directory: no stray .env is read.
    with start_server_process(server_command(server), env=env, cwd=tmp_path) as running:
        base = running.url
        done = subprocess.run(
            [PYTHON, "-m", "layercode_asgi", "simulate", "--url", f"{base}/api/agent",
             "--secret", SECRET, "hello there", "second message", "--data", '{"k": 1}'],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        ready = httpx.get(f"{base}/ready", timeout=10)
        scraped = httpx.get(f"{base}/metrics", headers={"x-api-key": "scrape-key"}, timeout=10)
    assert (ready.status_code, ready.json()["ready"]) == (200, True)
    if metrics:
        assert 'layercode_turns_total{outcome="completed"} 3.0' in scraped.text
    else:
        assert scraped.status_code == 404, scraped.text
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agent: Hello! I'm the echo agent." in done.stdout
    assert "agent: You said: hello there\n" in done.stdout
    assert "agent: You said: second message\n" in done.stdout
    assert done.stdout.count("first tts after") == 3
    assert 'reply 200: {"status":"ok"}' in done.stdout
    assert "no protocol violation" in done.stdout
    assert "PROTOCOL VIOLATION" not in done.stdout + done.stderr


# -- broken backends --------------------------------------------------------------------------------

TURN_TYPES = ("session.start", "message")


def backend(
    stream: Callable[[str], list[bytes]],
    *,
    status: int = 200,
    content_type: bytes = b"text/event-stream",
    json_reply: bytes = b'{"status":"ok"}',
) -> Any:
    """A tiny LayerCode-style ASGI backend: turns get ``stream(turn_id)`` chunk by chunk."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        event = msgspec.json.decode(body)
        if event["type"] in TURN_TYPES:
            headers = [(b"content-type", content_type)]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            for chunk in stream(event["turn_id"]):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": json_reply})

    return app


def tts(turn_id: str, text: str = "hi") -> bytes:
    return b"data: " + msgspec.json.encode(
        {"type": "response.tts", "content": text, "turn_id": turn_id}
    ) + b"\n\n"  # fmt: skip


def end(turn_id: str) -> bytes:
    return b'data: {"type":"response.end","turn_id":"' + turn_id.encode() + b'"}\n\n'


def simulate(base: str, *extra: str) -> int:
    return main(
        ["simulate", "--url", f"{base}/api/agent", "--secret", SECRET, "hello", *extra],
        environ={},
    )


BROKEN: dict[str, Any] = {
    "wrong-content-type": backend(lambda t: [tts(t), end(t)], content_type=b"application/json"),
    "missing-end": backend(lambda t: [tts(t)]),
    "repeated-end": backend(lambda t: [tts(t), end(t), end(t)]),
    "event-after-end": backend(lambda t: [end(t), tts(t)]),
    "wrong-turn-id": backend(lambda t: [tts("someone-else"), end(t)]),
    "bad-json": backend(lambda t: [b"data: {not json}\n\n", end(t)]),
    "missing-type": backend(lambda t: [b'data: {"turn_id":"x"}\n\n', end(t)]),
    "http-error": backend(lambda t: [b'{"error":"boom"}'], status=500),
}


@pytest.mark.parametrize("violation", list(BROKEN))
def test_simulate_names_the_violation(violation: str, capsys: pytest.CaptureFixture[str]) -> None:
    with serve(BROKEN[violation]) as base:
        code = simulate(base)
    captured = capsys.readouterr()
    assert code == 1
    assert f"PROTOCOL VIOLATION: {violation}: " in captured.err
    assert captured.err.count("PROTOCOL VIOLATION") == 1


def test_simulate_bad_json_reply_to_a_non_turn_event(capsys: pytest.CaptureFixture[str]) -> None:
    app = backend(lambda t: [tts(t), end(t)], json_reply=b"<html>ok</html>")
    with serve(app) as base:
        code = simulate(base)
    captured = capsys.readouterr()
    assert code == 1
    assert "PROTOCOL VIOLATION: bad-json: session.update reply is not JSON" in captured.err
    assert "agent: hi" in captured.out  # the turns before it were fine


def test_simulate_timeout_and_connection_error(capsys: pytest.CaptureFixture[str]) -> None:
    async def never_ends(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    with serve(never_ends) as base:
        assert simulate(base, "--timeout", "0.5") == 1
    assert re.search(
        r"PROTOCOL VIOLATION: timeout: session\.start \(turn_id '[^']+'\) turn not complete",
        capsys.readouterr().err,
    )

    assert simulate(f"http://127.0.0.1:{free_port()}") == 1
    assert "PROTOCOL VIOLATION: connection-error: " in capsys.readouterr().err


def test_simulate_reports_response_error_and_fails_unless_allowed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def stream(turn_id: str) -> list[bytes]:
        error = {"type": "response.error", "error": "agent error", "turn_id": turn_id}
        return [b"data: " + msgspec.json.encode(error) + b"\n\n", end(turn_id)]

    with serve(backend(stream)) as base:
        assert simulate(base) == 1
        captured = capsys.readouterr()
        assert "warning: turn " in captured.err and "response.error: 'agent error'" in captured.err
        assert "turns ended in response.error" in captured.err
        assert simulate(base, "--allow-errors") == 0
        assert simulate(base, "--strict") == 1
        assert "PROTOCOL VIOLATION: response-error: " in capsys.readouterr().err


def test_simulate_accepts_any_compliant_byte_layout(capsys: pytest.CaptureFixture[str]) -> None:
    """Another server's framing: CRLF, comments, event/id lines, JSON split over data lines,
    chunks cut mid-line and mid-character, extra fields, an unknown event type."""

    def stream(turn_id: str) -> list[bytes]:
        tid = turn_id.encode()
        raw = (
            b": hello\r\n\r\n"
            b'event: message\r\nid: 1\r\ndata:{"type":"response.tts",\r\n'
            b'data:  "content":"Gr\xc3\xbc\xc3\x9fe, ","turn_id":"' + tid + b'","x":1}\r\n\r\n'
            b'data: {"type":"response.future","turn_id":"' + tid + b'"}\r\r'
            b'data: {"type":"response.tts","content":"friend","turn_id":"' + tid + b'"}\n\n'
            b'data: {"turn_id":"' + tid + b'","type":"response.end"}\r\n\r\n'
        )
        return [raw[i : i + 7] for i in range(0, len(raw), 7)]

    with serve(backend(stream)) as base:
        code = simulate(base, "--json")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = msgspec.json.decode(captured.out)
    assert report["ok"] is True
    assert [turn["text"] for turn in report["turns"]] == ["Grüße, friend", "Grüße, friend"]
    assert [len(turn["events"]) for turn in report["turns"]] == [4, 4]
    # --json: the commentary goes to stderr; other events interrupt the spoken line.
    assert "agent: Grüße, \n  [response.future]\nagent: friend\n" in captured.err


def gated_backend(gate: threading.Event) -> Any:
    """Speaks "first", then waits (up to 30 s) for ``gate`` before speaking again."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        event = msgspec.json.decode(body)
        if event["type"] not in TURN_TYPES:
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
            return
        tid = event["turn_id"]
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": tts(tid, "first, "), "more_body": True})
        released = await anyio.to_thread.run_sync(gate.wait, 30)
        later = "then second" if released else "(never released)"
        await send({"type": "http.response.body", "body": tts(tid, later), "more_body": True})
        await send({"type": "http.response.body", "body": end(tid)})

    return app


def test_simulate_prints_the_reply_as_it_streams(tmp_path: Path) -> None:
    """The first words appear on simulate's stdout while the backend still holds the turn."""
    gate = threading.Event()
    with serve(gated_backend(gate)) as base:
        process = subprocess.Popen(
            [PYTHON, "-m", "layercode_asgi", "simulate", "--url", f"{base}/api/agent",
             "--secret", SECRET],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            seen = b""
            deadline = time.monotonic() + 30
            while b"agent: first, " not in seen and time.monotonic() < deadline:
                chunk = process.stdout.read1(1024)  # type: ignore[attr-defined]
                if not chunk:
                    break
                seen += chunk
            assert b"agent: first, " in seen, seen
            assert b"then second" not in seen  # the backend has not said it yet
            gate.set()
            out, err = process.communicate(timeout=30)
        finally:
            gate.set()
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert process.returncode == 0, err.decode()
    assert b"agent: first, then second\n" in seen + out


# -- start-up failures under another server ---------------------------------------------------------


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian"])
@pytest.mark.parametrize(
    ("setting", "said"),
    [
        (("REDIS_URL", "notredis://cache"), "error: REDIS_URL: expected a redis://"),
        (("LAYERCODE_AGENT", "no_such_module_here:agent"), "error: cannot import the agent"),
        (("LAYERCODE_AGENT", "openai"), "error: the openai agent needs OPENAI_API_KEY"),
    ],
)
def test_app_factory_that_cannot_start_says_why_in_one_line(
    server: str, setting: tuple[str, str], said: str, tmp_path: Path
) -> None:
    """The factory of the documented commands, with settings it cannot start with: the
    server exits at start-up with one line saying why, not a traceback of its loader."""
    pytest.importorskip(server)
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        {"LAYERCODE_WEBHOOK_SECRET": SECRET, setting[0]: setting[1], "TMPDIR": str(tmp_path)}
    )
    with start_server_process(server_command(server), env=env, cwd=tmp_path, wait=False) as run:
        status = run.process.wait(30)
        output = run.output()
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(said), output
    # As docs/deploying.md says (Hypercorn 0.18 exits 0 when its worker failed to start).
    # Before, the page said Granian exited 0 too: Granian 2 exits 1.
    if server != "hypercorn":
        assert status == {"uvicorn": 3, "granian": 1}[server], output
    deploying = " ".join((ROOT / "docs" / "deploying.md").read_text().split())
    assert "exits 3 (Granian then exits 1)" in deploying
