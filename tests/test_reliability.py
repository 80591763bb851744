"""Faults: agents failing, clients leaving, servers stopping — no hung stream, no held lock."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from httpx_sse import connect_sse

from layercode_asgi import (
    ConversationManager,
    HistoryMessage,
    RedisConversationStore,
    Settings,
    create_app,
)

from .agents_for_tests import scripted_agent
from .conftest import (
    PYTHON,
    SECRET,
    ServerProcess,
    event_body,
    raw_http_server,
    serve,
    signed_headers,
    start_server_process,
)
from .redis_fixtures import running_redis

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "memory":
        yield None
    else:
        with running_redis() as server:
            yield server.url


def stored_history(app: Any, store_url: str | None) -> list[tuple[str, str]]:
    """The conversation's history, read without touching the server thread's event loop.

    A Redis client belongs to the loop that opened its connections (the server's, in
    another thread): using it from this thread's loop is an error, so read through a
    client of our own. The memory store holds no loop-bound state.
    """

    async def read() -> list[HistoryMessage]:
        if store_url is None:
            return list(await app.state.conversations.get_history("conv-1"))
        async with ConversationManager(RedisConversationStore(store_url)) as history:
            return await history.get_history("conv-1")

    return [(m.role, m.text) for m in anyio.run(read)]


def turn(client: httpx.Client, text: str, turn_id: str) -> list[dict[str, Any]]:
    body = event_body(text=text, turn_id=turn_id)
    with connect_sse(
        client, "POST", "/api/agent", content=body, headers=signed_headers(body)
    ) as source:
        assert source.response.status_code == 200
        return [msgspec.json.decode(e.data) for e in source.iter_sse()]


def test_agent_faults_leave_no_lock_and_a_defined_history(store_url: str | None) -> None:
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        redis_url=store_url,
        turn_timeout=0.5,
        turn_timeout_message="Sorry, that took too long.",
    )
    app = create_app(settings, scripted_agent)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        script = ["hello", "raise-before", "raise-after", "hang", "bye"]
        outcomes = []
        for i, text in enumerate(script):
            started = time.monotonic()
            events = turn(client, text, f"t{i}")
            outcomes.append([e["type"] for e in events])
            assert events[-1] == {"type": "response.end", "turn_id": f"t{i}"}
            assert [e["type"] for e in events].count("response.end") == 1
            assert time.monotonic() - started < 5, f"turn {text!r} hung"
        assert outcomes == [
            ["response.tts", "response.end"],
            ["response.error", "response.end"],
            ["response.tts", "response.error", "response.end"],
            ["response.tts", "response.end"],  # the spoken timeout fallback
            ["response.tts", "response.end"],
        ]
        history = stored_history(app, store_url)
    assert history == [
        ("user", "hello"),
        ("assistant", "fine: hello"),
        ("user", "raise-before"),  # nothing was spoken: only the user's words
        ("user", "raise-after"),
        ("assistant", "partial"),  # what was spoken before the failure
        ("user", "hang"),
        ("assistant", "Sorry, that took too long."),  # the fallback was spoken
        ("user", "bye"),
        ("assistant", "fine: bye"),
    ]


def test_disconnect_releases_the_lock_and_records_what_was_said(store_url: str | None) -> None:
    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret=SECRET, redis_url=store_url
    )
    app = create_app(settings, scripted_agent)
    with serve(app) as url:
        body = event_body(text="disconnect-me", turn_id="t0")
        with (
            httpx.Client(base_url=url, timeout=10) as client,
            client.stream(
                "POST", "/api/agent", content=body, headers=signed_headers(body)
            ) as response,
        ):
            assert b"first" in next(response.iter_raw())
        # The next turn of the same conversation is not stuck behind the abandoned one.
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=10) as client:
            events = turn(client, "next", "t1")
        assert time.monotonic() - started < 3
        assert events[0]["content"] == "fine: next"
        history = stored_history(app, store_url)
    assert history == [
        ("user", "disconnect-me"),
        ("assistant", "first"),
        ("user", "next"),
        ("assistant", "fine: next"),
    ]


@pytest.mark.slow
def test_paused_redis_answers_503_quickly() -> None:
    with running_redis() as redis:
        settings = Settings(
            env_file=None, environ={}, layercode_webhook_secret=SECRET, redis_url=redis.url
        )
        with (
            serve(create_app(settings, scripted_agent)) as url,
            httpx.Client(base_url=url, timeout=20) as client,
        ):
            assert turn(client, "before", "t0")[0]["content"] == "fine: before"
            redis.pause()  # SIGSTOP: connections hang instead of failing
            try:
                started = time.monotonic()
                body = event_body(text="during", turn_id="t1")
                r = client.post("/api/agent", content=body, headers=signed_headers(body))
                elapsed = time.monotonic() - started
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/json"
                assert elapsed < 8, f"took {elapsed:.1f}s"
                assert client.get("/ready").status_code == 503
            finally:
                redis.resume()
            assert client.get("/ready").status_code == 200
            assert turn(client, "after", "t2")[0]["content"] == "fine: after"


# -- graceful shutdown: SIGTERM drains open turns --------------------------------------------------


def _start(grace: float, slow_seconds: float, max_requests: int | None = None) -> ServerProcess:
    limit = [] if max_requests is None else [str(max_requests)]
    return start_server_process(
        [PYTHON, "-m", "tests.serve_for_tests", "{port}", str(grace), *limit],
        env={**os.environ, "SLOW_AGENT_SECONDS": str(slow_seconds)},
        ready_path="/health" if max_requests is None else None,  # a request would count
    )


def _slow_turn_in_background(url: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start a 'slow' turn in a thread; return once its first event arrived. The thread
    puts the turn's events (or the error that cut it) in the dict."""
    results: dict[str, Any] = {}
    first = threading.Event()

    def slow_turn() -> None:
        body = event_body(text="slow", turn_id="t-slow")
        try:
            with (
                httpx.Client(base_url=url, timeout=30) as client,
                connect_sse(
                    client, "POST", "/api/agent", content=body, headers=signed_headers(body)
                ) as source,
            ):
                events = []
                for sse in source.iter_sse():
                    events.append(msgspec.json.decode(sse.data))
                    first.set()
                results["events"] = events
        except httpx.HTTPError as exc:
            results["error"] = exc

    thread = threading.Thread(target=slow_turn)
    thread.start()
    assert first.wait(10)
    return thread, results


def _until_draining(url: str) -> None:
    """Until the server handled SIGTERM (its /ready says 503); bounded: 10 s."""
    for _ in range(200):
        if httpx.get(url + "/ready").status_code == 503:
            return
        time.sleep(0.05)
    raise AssertionError("the server never started draining")


def test_sigterm_lets_open_turns_finish_and_refuses_new_ones() -> None:
    with _start(grace=10, slow_seconds=2) as server:
        process, url = server.process, server.url
        thread, results = _slow_turn_in_background(url)
        process.send_signal(signal.SIGTERM)
        _until_draining(url)  # not a fixed pause: a busy machine may take longer
        body = event_body(text="late", turn_id="t-late", conversation_id="conv-2")
        late = httpx.post(url + "/api/agent", content=body, headers=signed_headers(body))
        assert late.status_code == 503
        assert late.json() == {"error": "server is shutting down"}
        assert late.headers["retry-after"] == "5"
        assert httpx.get(url + "/ready").status_code == 503
        thread.join(15)
        assert [e.get("content") for e in results["events"]] == ["start", " done", None]
        assert results["events"][-1]["type"] == "response.end"
        assert process.wait(15) == 0, server.output()


def test_grace_period_bounds_the_wait() -> None:
    with _start(grace=1, slow_seconds=60) as server:
        process, url = server.process, server.url
        started = threading.Event()

        def stuck_turn() -> None:
            body = event_body(text="slow", turn_id="t-stuck")
            try:
                with (
                    httpx.Client(base_url=url, timeout=30) as client,
                    client.stream(
                        "POST", "/api/agent", content=body, headers=signed_headers(body)
                    ) as response,
                ):
                    for _ in response.iter_raw():
                        started.set()
            except httpx.HTTPError:
                pass  # the server cut it after the grace period

        thread = threading.Thread(target=stuck_turn, daemon=True)
        thread.start()
        assert started.wait(10)
        t0 = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert time.monotonic() - t0 < 1 + 5 + 3  # grace + uvicorn's own 5 s + slack


def test_a_body_still_arriving_when_the_grace_period_ends_gets_503() -> None:
    """Admitted before SIGTERM, its body completes only after the open webhooks were ended:
    it starts no turn (which nothing would end before the server cuts it) but gets 503."""
    body = event_body(text="slow", turn_id="t-late-body")
    headers = signed_headers(body)
    head = (
        "POST /api/agent HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with _start(grace=0.5, slow_seconds=60) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + body[:10])
            assert httpx.get(server.url + "/health").status_code == 200  # its head was read
            server.process.send_signal(signal.SIGTERM)
            over = "grace period over with 1 open webhook(s)"  # ours: admitted before
            for _ in range(600):  # bounded: until the grace period is over
                if over in server.output():
                    break
                time.sleep(0.05)
            assert over in server.output(), server.output()
            sock.sendall(body[10:])
            answer = b""
            for _ in range(1000):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert server.process.wait(20) == 0, server.output()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 503 Service Unavailable", answer
    assert rest.endswith(b'{"error":"server is shutting down"}'), answer


def test_a_second_signal_ends_open_turns_at_once_with_error_and_end() -> None:
    with _start(grace=30, slow_seconds=60) as server:
        process, url = server.process, server.url
        thread, results = _slow_turn_in_background(url)
        process.send_signal(signal.SIGTERM)
        _until_draining(url)
        process.send_signal(signal.SIGTERM)  # the second: stop now, turns ended properly
        thread.join(30)
        process.wait(30)
    assert "error" not in results, results
    assert results["events"][-2:] == [
        {"type": "response.error", "error": "server is shutting down", "turn_id": "t-slow"},
        {"type": "response.end", "turn_id": "t-slow"},
    ]


def test_an_authorize_call_open_at_sigterm_is_drained_then_answered_503() -> None:
    """An authorize call waiting for LayerCode counts as open: the server waits for it, and
    when the grace period is over answers it 503 JSON (uvicorn cancelled it after its own
    graceful-shutdown timeout: a plain-text 500 and a traceback); a new one during the
    drain gets 503 too."""
    gate, asked = threading.Event(), threading.Event()

    def slow_layercode(request: dict[str, Any]) -> Iterator[bytes]:
        asked.set()
        gate.wait(30)  # bounded: released at the end of the test
        yield b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    with raw_http_server(slow_layercode) as upstream:
        env = {**os.environ, "LAYERCODE_API_URL": upstream, "LAYERCODE_API_KEY": "lc_test_key"}
        try:
            with start_server_process(
                [PYTHON, "-m", "tests.serve_for_tests", "{port}", "0.5"], env=env
            ) as server:
                answers: dict[str, httpx.Response] = {}
                call = threading.Thread(
                    target=lambda: answers.update(
                        first=httpx.post(
                            server.url + "/api/authorize", json={"agent_id": "a"}, timeout=30
                        )
                    )
                )
                call.start()
                assert asked.wait(10)
                server.process.send_signal(signal.SIGTERM)
                _until_draining(server.url)
                late = httpx.post(server.url + "/api/authorize", json={"agent_id": "a"}, timeout=30)
                call.join(30)
                assert server.process.wait(20) == 0, server.output()
                output = server.output()
        finally:
            gate.set()
    assert (late.status_code, late.json()) == (503, {"error": "server is shutting down"})
    first = answers["first"]
    assert (first.status_code, first.json()) == (503, {"error": "server is shutting down"})
    assert "Traceback" not in output, output


@pytest.mark.parametrize("kind", ["data", "session.end"])
def test_a_hook_still_running_when_the_grace_period_ends_gets_503(kind: str) -> None:
    """A ``data`` or ``session.end`` webhook whose hook outlasts the grace period is answered
    503 JSON when the open webhooks are ended (it was cut by uvicorn after its own
    graceful-shutdown timeout: a plain-text 500 and a traceback)."""
    fields: dict[str, Any] = {"data": {"k": 1}} if kind == "data" else {}
    body = event_body(kind, **fields)
    answers: dict[str, httpx.Response] = {}
    with _start(grace=0.5, slow_seconds=60) as server:

        def post() -> None:
            answers["reply"] = httpx.post(
                server.url + "/api/agent", content=body, headers=signed_headers(body), timeout=30
            )

        call = threading.Thread(target=post)
        call.start()
        for _ in range(600):  # bounded: until its hook runs
            if f"hook {kind} running" in server.output():
                break
            time.sleep(0.05)
        assert f"hook {kind} running" in server.output(), server.output()
        server.process.send_signal(signal.SIGTERM)
        call.join(30)
        assert server.process.wait(20) == 0, server.output()
        output = server.output()
    reply = answers["reply"]
    assert (reply.status_code, reply.json()) == (503, {"error": "server is shutting down"})
    assert reply.headers["retry-after"] == "5"
    assert "Traceback" not in output, output


def test_uvicorn_max_requests_drains_open_turns_like_sigterm() -> None:
    """uvicorn stops once ``limit_max_requests`` responses are complete: a turn still open
    then finishes (it was cut after uvicorn's own graceful-shutdown timeout, 1 s here,
    without ``response.end``)."""
    with _start(grace=10, slow_seconds=3, max_requests=1) as server:
        thread, results = _slow_turn_in_background(server.url)
        body = event_body(text="quick", turn_id="t-quick", conversation_id="conv-2")
        quick = httpx.post(server.url + "/api/agent", content=body, headers=signed_headers(body))
        assert quick.status_code == 200  # the one response of the limit
        thread.join(15)
        assert server.process.wait(15) == 0, server.output()
        assert "error" not in results, (results, server.output())
        assert [e.get("content") for e in results["events"]] == ["start", " done", None]
        assert results["events"][-1]["type"] == "response.end"
