"""What an app opens, it closes: at the end of ``create_app``'s lifespan, the built-in
agents' model clients (and an agent object's own ``aclose``) are closed, served by a real
uvicorn, the model a fake OpenAI API on 127.0.0.1."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from layercode_asgi import ConversationManager, MemoryConversationStore, Settings, create_app

from .conftest import SECRET, event_body, serve, signed_headers
from .fake_openai import FakeOpenAI, fake_openai
from .redis_fixtures import RedisServer, redis_server  # noqa: F401 - a fixture


def settings(agent: str, base_url: str) -> Settings:
    return Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        agent=agent,
        openai_api_key="sk-test",
        openai_base_url=base_url,
        default_model="openai:gpt-test",
    )


def one_turn(app: Any, **config: Any) -> list[str]:
    """Serve ``app`` for one message turn, then shut it down (its lifespan's end); the
    ResourceWarnings of the server's thread (unclosed transports, sockets)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with serve(app, **config) as url, httpx.Client(base_url=url, timeout=20) as client:
            body = event_body(text="hi")
            reply = client.post("/api/agent", content=body, headers=signed_headers(body))
            assert reply.status_code == 200
            assert '"response.tts"' in reply.text and '"response.end"' in reply.text
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def connections_left(fake: FakeOpenAI) -> int:
    """The fake's open connections, once the closes it was sent reached it (bounded)."""
    deadline = time.monotonic() + 10
    while fake.connections() and time.monotonic() < deadline:
        time.sleep(0.01)
    return fake.connections()


@pytest.mark.parametrize("agent", ["openai", "starter"])
def test_the_lifespan_closes_the_built_in_agents_model_client(agent: str) -> None:
    if agent == "starter":
        pytest.importorskip("pydantic_ai")
    else:
        pytest.importorskip("openai")
    with fake_openai() as (fake, base_url):
        app = create_app(settings(agent, base_url))
        unclosed = one_turn(app)
        assert fake.requests
        # Before: the agent's HTTP client kept its pooled connection to the model open past
        # the app's shutdown (uvloop: "ResourceWarning: unclosed resource <TCPTransport>",
        # and for openai "OSError: Device or resource busy" closing the server's loop).
        assert unclosed == []
        assert connections_left(fake) == 0


class ClosingAgent:
    """An agent object holding something to close at shutdown."""

    def __init__(self, fails: bool = False) -> None:
        self.closed = 0
        self.fails = fails

    async def __call__(self, event: Any) -> AsyncIterator[str]:
        yield "hello"

    async def aclose(self) -> None:
        self.closed += 1
        if self.fails:
            raise RuntimeError("the pool is gone")


def test_an_agent_objects_aclose_is_awaited_at_shutdown() -> None:
    agent = ClosingAgent()
    app = create_app(settings("echo", "http://127.0.0.1:9/v1"), agent=agent)
    assert one_turn(app) == []
    assert agent.closed == 1


class RecordingStore(MemoryConversationStore):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def test_an_agent_whose_aclose_fails_is_logged_and_the_store_still_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, store = ClosingAgent(fails=True), RecordingStore()
    app = create_app(
        settings("echo", "http://127.0.0.1:9/v1"),
        agent=agent,
        conversations=ConversationManager(store),
    )
    with caplog.at_level(logging.ERROR):
        one_turn(app)
    assert agent.closed == 1 and store.closed == 1
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failed] == ["closing the agent ClosingAgent failed"]
    assert failed[0].exc_info is not None


def test_an_agent_registered_under_two_names_is_logged_under_its_apps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One agent object behind two names: each app shows the name it was built with, in
    # /ready and in the shutdown log (before: the name built last, for both apps).
    from layercode_asgi import register_agent
    from layercode_asgi.agents import agent_factory

    agent = ClosingAgent(fails=True)
    echo, openai = agent_factory("echo"), agent_factory("openai")  # the registry stays as is
    register_agent("echo", lambda settings: agent)
    register_agent("openai", lambda settings: agent)
    try:
        first = create_app(settings("echo", "http://127.0.0.1:9/v1"))
        second = create_app(settings("openai", "http://127.0.0.1:9/v1"))
    finally:
        register_agent("echo", echo)
        register_agent("openai", openai)
    assert first.state.agent is second.state.agent is agent
    with caplog.at_level(logging.ERROR):
        one_turn(first)
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert failed == ["closing the agent echo failed"]


class FailingStore(MemoryConversationStore):
    """A user's conversation backend whose close fails."""

    async def aclose(self) -> None:
        raise RuntimeError("the backend is gone")


def redis_clients_left(server: RedisServer) -> list[str]:
    """The clients of ``server`` besides the one asking, once the closes it was sent reached
    it (bounded)."""
    import redis

    with redis.Redis.from_url(server.url) as admin:
        me = admin.client_id()
        deadline = time.monotonic() + 10
        while True:
            others = [c["addr"] for c in admin.client_list() if int(c["id"]) != me]
            if not others or time.monotonic() > deadline:
                return others
            time.sleep(0.01)


def test_a_store_whose_aclose_fails_leaves_the_replay_caches_redis_closed(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingStore()
    app = create_app(
        Settings(
            env_file=None,
            environ={},
            layercode_webhook_secret=SECRET,
            redis_url=redis_server.url,
            replay_protection=True,
        ),
        conversations=ConversationManager(store),
    )
    with caplog.at_level(logging.INFO):
        # uvicorn's records reach caplog; asyncio's loop (uvloop's closes every transport
        # left open when it closes, hiding a skipped close)
        one_turn(app, log_config=None, loop="asyncio")
    # Before: the store's failure skipped the replay cache's close: its Redis connection
    # stayed open, and uvicorn logged "Application shutdown failed. Exiting."
    assert redis_clients_left(redis_server) == []
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failed] == ["closing the conversation store failed"]
    assert failed[0].exc_info is not None
    assert "the backend is gone" in str(failed[0].exc_info[1])  # and no uvicorn error


@pytest.mark.parametrize("failure", ["no temporary directory", "signals off the main thread"])
def test_serve_workers_failing_to_start_leaves_no_socket_or_directory(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("prometheus_client")
    from layercode_asgi.workers import serve_workers

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    temp = tmp_path / ("missing" if failure == "no temporary directory" else "temp")
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    if failure != "no temporary directory":
        temp.mkdir()
    raised: list[BaseException] = []

    def start() -> None:
        try:
            serve_workers(
                workers=1, host="127.0.0.1", port=0, log_level="warning", environ={}, metrics=True
            )
        except BaseException as exc:
            raised.append(exc)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        if failure == "no temporary directory":
            start()  # mkdtemp fails after the socket is bound
        else:  # signal.signal fails (ValueError) after the socket and the directory
            thread = threading.Thread(target=start)
            thread.start()
            thread.join(30)
        assert len(raised) == 1 and isinstance(raised[0], OSError | ValueError), raised
        raised.clear()
        gc.collect()
    # Before: the listening socket was left open ("unclosed <socket.socket ...>") and the
    # metrics directory left behind.
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert not temp.exists() or list(temp.iterdir()) == []


async def endless(event: Any) -> AsyncIterator[str]:
    for _ in range(100_000):  # bounded: far past any max_bytes below
        yield "word " * 200


@pytest.mark.anyio
async def test_a_client_stopping_at_max_bytes_over_http_ends_the_turn_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from layercode_asgi.testing import LayercodeTestClient, ProtocolViolation

    app = create_app(settings("echo", "http://127.0.0.1:9/v1"), agent=endless)
    with caplog.at_level(logging.DEBUG), serve(app) as url:
        client = LayercodeTestClient(base_url=url, secret=SECRET, max_bytes=50_000)
        with pytest.raises(ProtocolViolation) as info:
            await client.message("hi")
        assert info.value.name == "too-large"
    # the server stopped: every record of the turn is in
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r for r in caplog.records if r.exc_info] == []


@pytest.mark.parametrize(
    "failure", ["on_data", "on_session_end", "authorize_guard", "extras", "metrics directory"]
)
def test_a_create_app_that_fails_opens_no_agent_first(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later check failing left the agent built (its factory's client, pool...) with no
    lifespan to close it: now every check runs before anything is opened."""
    from layercode_asgi import ConfigurationError, register_agent
    from layercode_asgi.agents import agent_factory

    options: dict[str, Any] = {}
    if failure == "metrics directory":
        pytest.importorskip("prometheus_client")
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    elif failure == "extras":
        options["extras"] = ["not", "a", "mapping"]
    else:
        options[failure] = "not callable"
    built: list[ClosingAgent] = []

    def opening(settings: Any) -> ClosingAgent:
        built.append(ClosingAgent())
        return built[-1]

    echo = agent_factory("echo")
    register_agent("echo", opening)
    try:
        with pytest.raises((ConfigurationError, TypeError)):
            create_app(
                Settings(
                    env_file=None,
                    environ={},
                    layercode_webhook_secret=SECRET,
                    metrics=failure == "metrics directory",
                ),
                **options,
            )
    finally:
        register_agent("echo", echo)
    # Before: the agent was built first, then the check failed: never closed.
    assert built == []


#: Serve four workers with room for two in the file-descriptor limit: the third start
#: fails (EMFILE); then say how many workers are still running.
SPAWN_FAILS = """
import multiprocessing, os, resource, sys
from multiprocessing import resource_tracker

from layercode_asgi.workers import serve_workers

if __name__ == "__main__":
    resource_tracker.ensure_running()  # its own descriptors, before the count
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(64)]  # the workers get room
    taken = {int(fd) for fd in os.listdir("/proc/self/fd")}
    free, limit = 9, 0  # the socket, two starts (2 kept each), the 6 of a start at its peak
    while free and limit < 4096:
        free -= limit not in taken
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        serve_workers(workers=4, host="127.0.0.1", port=0, log_level="warning", environ={})
    except OSError as exc:
        running = len(multiprocessing.active_children())
        print(f"{exc.strerror}; {running} running", flush=True)
"""


def test_serve_workers_failing_to_start_a_later_worker_stops_the_started_ones(
    tmp_path: Path,
) -> None:
    """A start failing after others (here: out of file descriptors) left the started
    workers serving, non-daemon: the parent hung at exit, joining them."""
    script = tmp_path / "spawn_fails.py"
    script.write_text(SPAWN_FAILS)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}
    environ.update(
        PYTHONPATH=str(Path(__file__).parent.parent),  # this tree's package
        TMPDIR=str(tmp_path),
        LAYERCODE_WEBHOOK_SECRET=SECRET,
        LAYERCODE_ENV_FILE="",
    )
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,  # a bound: before, it never ended (its workers notice it killed)
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the parent did not exit: the workers it had started still run")
    assert done.stdout == "Too many open files; 0 running\n", done.stderr[-3000:]
    assert done.returncode == 0


def test_the_starter_agent_on_two_loops_closes_only_the_stopping_loops_client() -> None:
    """One app served by two servers at once (two threads, two event loops); the first
    stops while a turn of the second streams. Its lifespan must close its own loop's model
    client only: the second's turn ends as the model said, and later turns still work."""
    pytest.importorskip("pydantic_ai")
    from .fake_openai import DEFAULT_TEXT, Script

    def post(url: str, text: str, turn: str) -> str:
        body = event_body(text=text, conversation_id=f"two-loops-{turn}", turn_id=turn)
        with httpx.Client(timeout=20) as client:
            reply = client.post(url + "/api/agent", content=body, headers=signed_headers(body))
        assert reply.status_code == 200
        return reply.text

    def spoken(reply: str) -> str:
        events = [json.loads(line[6:]) for line in reply.splitlines() if line.startswith("data: ")]
        assert [e["type"] for e in events][-1:] == ["response.end"], reply
        return "".join(e["content"] for e in events if e["type"] == "response.tts")

    with fake_openai() as (fake, base_url):
        app = create_app(settings("starter", base_url))
        replies: list[str] = []
        with serve(app) as second:
            with serve(app) as first:
                assert '"response.end"' in post(first, "hi", "1")
                fake.push(Script(hold=True))
                streaming = threading.Thread(
                    target=lambda: replies.append(post(second, "hi", "2")), daemon=True
                )
                streaming.start()
                assert fake.held.wait(10)
            fake.release()  # the first server stopped (its lifespan ran) mid-turn
            streaming.join(20)
            later = post(second, "hi again", "3")
    # Before: one client for both loops: a turn on the second failed ("agent error":
    # "<asyncio.locks.Event ...> is bound to a different event loop").
    assert len(replies) == 1
    assert spoken(replies[0]) == "".join(DEFAULT_TEXT).strip()
    assert spoken(later) == "".join(DEFAULT_TEXT).strip()
