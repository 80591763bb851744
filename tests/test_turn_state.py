"""Turn state on a real server: session.end mid-turn, the lock wait, the queue bound, the
history byte bound, store errors, shutdown mid-turn, and the webhook's defaults."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import (
    ConversationManager,
    HistoryMessage,
    LayercodeSignature,
    LayercodeWebhook,
    MemoryConversationStore,
    MemoryMetrics,
    RedisConversationStore,
    Settings,
    TurnContext,
    TurnEvent,
    TurnMetrics,
    create_app,
    parse_webhook_payload,
    stream_response,
)

from .conftest import (
    NEEDS_TRIO,
    PYTHON,
    SECRET,
    ServerProcess,
    event_body,
    free_port,
    serve,
    serve_hypercorn,
    signed_headers,
    start_server_process,
)
from .redis_fixtures import RedisServer, running_redis

ROOT = Path(__file__).resolve().parent.parent

#: Set by a test (or a session.end hook) to let a waiting agent go on.
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _reset_release() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()  # never leave an agent waiting


async def wait_for_release(limit: float = 20.0) -> None:
    """Wait (in the server's loop) until the test sets RELEASE; bounded."""
    for _ in range(int(limit / 0.01)):
        if RELEASE.is_set():
            return
        await anyio.sleep(0.01)


async def stateful_agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
    """Says how much history it saw; 'wait' turns wait for RELEASE, 'stubborn' turns also
    ignore their timeout (their cleanup waits for RELEASE), 'hang' turns hang."""
    yield f"saw={len(context.history)}"
    text = event.text or ""
    if text == "wait":
        await wait_for_release()
        yield " released"
    elif text == "stubborn":
        try:
            await anyio.sleep(60)
        finally:
            with anyio.CancelScope(shield=True):  # deaf to its own cancellation
                await wait_for_release()
    elif text == "hang":
        await anyio.sleep(60)


def settings(**overrides: Any) -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET, **overrides)


#: Where a test of the turns' state serves its app: uvicorn (asyncio), or Hypercorn's trio
#: worker (history in memory only: Redis runs on asyncio only).
SERVERS = ["uvicorn", pytest.param("hypercorn-trio", marks=NEEDS_TRIO)]


def serve_on(server: str, app: Any) -> Any:
    return serve(app) if server == "uvicorn" else serve_hypercorn(app, trio_worker=True)


@pytest.fixture(params=["memory", "redis", pytest.param("memory-trio", marks=NEEDS_TRIO)])
def store_and_server(request: pytest.FixtureRequest) -> Iterator[tuple[str | None, str]]:
    """A Redis URL (or None: memory) and the server to run on (the memory store on trio too)."""
    if request.param == "redis":
        with running_redis() as server:
            yield server.url, "uvicorn"
    else:
        yield None, "hypercorn-trio" if request.param == "memory-trio" else "uvicorn"


def history(app: Any, url: str | None, conversation_id: str = "conv-1") -> list[tuple[str, str]]:
    """The stored history, read from this thread (a Redis client of our own)."""

    async def read() -> list[HistoryMessage]:
        if url is None:
            return list(await app.state.conversations.get_history(conversation_id))
        async with ConversationManager(RedisConversationStore(url)) as manager:
            return await manager.get_history(conversation_id)

    return [(m.role, m.text) for m in anyio.run(read)]


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        msgspec.json.decode(line[6:])
        for line in response.text.split("\n")
        if line.startswith("data: ")
    ]


def post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/api/agent", content=body, headers=signed_headers(body))


def turn(client: httpx.Client, text: str, turn_id: str, **fields: Any) -> list[dict[str, Any]]:
    response = post(client, event_body(text=text, turn_id=turn_id, **fields))
    assert response.status_code == 200, response.text
    return events_of(response)


# -- session.end during a running turn -----------------------------------------------------------


def test_session_end_mid_turn_leaves_the_history_empty(
    store_and_server: tuple[str | None, str],
) -> None:
    redis_url, server = store_and_server
    app = create_app(
        settings(redis_url=redis_url), stateful_agent, on_session_end=lambda e: RELEASE.set()
    )
    with serve_on(server, app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert turn(client, "hello", "t0")[0]["content"] == "saw=0"
        body = event_body(text="wait", turn_id="t1")
        with client.stream(
            "POST", "/api/agent", content=body, headers=signed_headers(body)
        ) as running:
            chunks = running.iter_raw()
            assert b"saw=2" in next(chunks)
            # The caller hangs up mid-reply: session.end answers while the turn still runs
            # (the hook releases the agent, so a session.end waiting for the turn would
            # never be answered).
            with httpx.Client(base_url=url, timeout=10) as other:
                ended = post(other, event_body("session.end"))
            assert ended.status_code == 200, ended.text
            assert ended.json() == {"status": "ok"}
            rest = b"".join(chunks)
        assert b"released" in rest and b"response.end" in rest
        # The finished turn did not write the history back.
        assert history(app, redis_url) == []
        # The same conversation_id comes back later: it starts afresh and records as usual.
        assert turn(client, "again", "t2")[0]["content"] == "saw=0"
        assert history(app, redis_url) == [("user", "again"), ("assistant", "saw=0")]


# -- how long a queued turn waits for the lock ---------------------------------------------------


def test_the_lock_wait_follows_the_turn_timeout() -> None:
    assert create_app(settings(turn_timeout=60.0)).state.webhook.lock_timeout > 60.0
    custom = settings(turn_timeout=1.0, lock_wait_grace=0.5)
    assert create_app(custom).state.webhook.lock_timeout == 1.5
    for timeout in (1.0, 60.0):
        webhook = create_app(settings(turn_timeout=timeout)).state.webhook
        assert webhook.lock_timeout is not None
        assert webhook.lock_timeout > timeout  # the turn ahead may take its whole timeout
        manager = ConversationManager.from_settings(settings(turn_timeout=timeout))
        assert manager.store.lock_timeout == webhook.lock_timeout  # type: ignore[attr-defined]


def test_a_queued_turn_runs_once_a_hanging_turn_timed_out(
    store_and_server: tuple[str | None, str],
) -> None:
    redis_url, server = store_and_server
    app = create_app(settings(redis_url=redis_url, turn_timeout=1.0), stateful_agent)
    results: dict[str, list[dict[str, Any]]] = {}
    with serve_on(server, app) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = event_body(text="hang", turn_id="t-hang")
        with client.stream(
            "POST", "/api/agent", content=body, headers=signed_headers(body)
        ) as hanging:
            chunks = hanging.iter_raw()
            assert b"saw=0" in next(chunks)
            thread = threading.Thread(
                target=lambda: results.update(queued=turn(client, "queued", "t-queued"))
            )
            thread.start()
            hung = b"".join(chunks)
        thread.join(20)
    assert b'"error":"turn timed out"' in hung and b"response.end" in hung
    assert [e.get("content") for e in results["queued"]] == ["saw=2", None]


def test_a_turn_that_cannot_get_the_lock_in_time_gets_503(
    store_and_server: tuple[str | None, str],
) -> None:
    redis_url, server = store_and_server
    # The turn ahead ignores its 1 s timeout (its cleanup hangs; the turn gives it up after
    # another second): the queued turn waits the turn timeout plus a short lock-wait grace
    # (0.2 s), then gets 503 -- well before the client's own timeout. With replay protection
    # on, LayerCode's retry of the same signed bytes is taken (the 503 forgot them), and only
    # a second copy of what was answered 200 is a replay.
    app = create_app(
        settings(
            redis_url=redis_url, turn_timeout=1.0, lock_wait_grace=0.2, replay_protection=True
        ),
        stateful_agent,
    )
    with serve_on(server, app) as url, httpx.Client(base_url=url, timeout=15) as client:
        body = event_body(text="stubborn", turn_id="t-stubborn")
        with client.stream(
            "POST", "/api/agent", content=body, headers=signed_headers(body)
        ) as holder:
            chunks = holder.iter_raw()
            assert b"saw=0" in next(chunks)
            queued_body = event_body(text="queued", turn_id="t-queued")
            queued_headers = signed_headers(queued_body)
            queued = client.post("/api/agent", content=queued_body, headers=queued_headers)
            RELEASE.set()
            b"".join(chunks)
        retried = client.post("/api/agent", content=queued_body, headers=queued_headers)
        replayed = client.post("/api/agent", content=queued_body, headers=queued_headers)
    assert queued.status_code == 503
    assert queued.headers["content-type"] == "application/json"
    assert queued.json()["error"].startswith("conversation unavailable:")
    assert queued.headers["retry-after"] == "5"  # it passes: say when to try again
    assert retried.status_code == 200, retried.text
    assert [e.get("content") for e in events_of(retried)] == ["saw=2", None]
    assert replayed.status_code == 409, replayed.text


# -- the queue of turns waiting for one conversation ----------------------------------------------


def test_turns_queued_beyond_the_bound_get_503_at_once(
    store_and_server: tuple[str | None, str],
) -> None:
    redis_url, server = store_and_server
    bound = 8  # the default of LAYERCODE_MAX_QUEUED_TURNS
    app = create_app(settings(redis_url=redis_url), stateful_agent)
    statuses: list[int] = []
    rejected = threading.Event()
    with serve_on(server, app) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = event_body(text="wait", turn_id="t-holder")
        with client.stream(
            "POST", "/api/agent", content=body, headers=signed_headers(body)
        ) as holder:
            chunks = holder.iter_raw()
            assert b"saw=0" in next(chunks)

            def queued(index: int) -> None:
                with httpx.Client(base_url=url, timeout=30) as own:
                    response = post(own, event_body(text="queued", turn_id=f"t{index}"))
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert response.json()["error"].startswith("too many turns waiting")
                    assert response.headers["retry-after"] == "5"
                    rejected.set()

            threads = [threading.Thread(target=queued, args=(i,)) for i in range(bound + 1)]
            for thread in threads:
                thread.start()
            # One of them is refused while the holder still holds the conversation.
            got_503 = rejected.wait(10)
            RELEASE.set()
            b"".join(chunks)
            for thread in threads:
                thread.join(30)
    assert got_503
    assert sorted(statuses) == [200] * bound + [503]
    assert settings().max_queued_turns == bound


# -- the history's size bound ---------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_history_is_bounded_in_bytes(kind: str) -> None:
    with running_redis() if kind == "redis" else _no_redis() as server:
        conf = settings(redis_url=None if server is None else server.url, history_max_bytes=1000)
        async with ConversationManager.from_settings(conf) as manager:
            for index in range(10):
                await manager.add_turn("c1", f"q{index} " + "x" * 97, "a" * 100)
            stored = await manager.get_history("c1")
            assert sum(len(m.text.encode()) for m in stored) <= 1000
            assert len(stored) == 10  # the newest ones, oldest dropped first
            assert stored[-1].text == "a" * 100
            assert stored[0].text.startswith("q5 ")
            # One message over the bound is kept, cut to it on a character boundary.
            await manager.add_message("c1", {"role": "user", "text": "é" * 600})  # 1200 bytes
            stored = await manager.get_history("c1")
            assert [m.text for m in stored] == ["é" * 500]


@pytest.mark.anyio
async def test_history_bytes_bound_drops_the_oldest_whole_messages() -> None:
    store = MemoryConversationStore(max_bytes=10)
    manager = ConversationManager(store)
    await manager.add_message("c", {"role": "user", "text": "aaaa"})
    await manager.add_message("c", {"role": "assistant", "text": "bbbb"})
    await manager.add_message("c", {"role": "user", "text": "€€"})  # 6 bytes
    assert [m.text for m in await manager.get_history("c")] == ["bbbb", "€€"]
    assert settings().history_max_bytes == 256 * 1024


class _no_redis:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- Redis answering with errors ------------------------------------------------------------------


def _redis_command(server: RedisServer, *args: str | bytes) -> None:
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        client.execute_command(*args)
    finally:
        client.close()


def _refuse_writes(server: RedisServer, fault: str) -> None:
    if fault == "oom":
        _redis_command(server, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        _redis_command(server, "CONFIG", "SET", "maxmemory", "1")
    elif fault == "noreplicas":  # a primary refusing writes while its replicas are gone
        _redis_command(server, "CONFIG", "SET", "min-replicas-to-write", "1")
    else:
        _redis_command(server, "REPLICAOF", "127.0.0.1", str(free_port()))


def _take_writes(server: RedisServer, fault: str) -> None:
    if fault == "oom":
        _redis_command(server, "CONFIG", "SET", "maxmemory", "0")
    elif fault == "noreplicas":
        _redis_command(server, "CONFIG", "SET", "min-replicas-to-write", "0")
    else:
        _redis_command(server, "REPLICAOF", "NO", "ONE")


def _ready(client: httpx.Client) -> tuple[int, Any]:
    response = client.get("/ready")
    return response.status_code, response.json().get("error")


@pytest.mark.parametrize("fault", ["oom", "readonly", "noreplicas"])
def test_redis_error_replies_are_a_503_json(fault: str) -> None:
    with running_redis() as server:
        app = create_app(settings(redis_url=server.url), stateful_agent)
        with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
            assert _ready(client) == (200, None)
            assert turn(client, "before", "t0")[0]["content"] == "saw=0"
            _refuse_writes(server, fault)
            turns = [
                post(client, event_body(text="during", turn_id="t1")),
                post(client, event_body("session.start", turn_id="t2")),
            ]
            for response in turns:  # taking the lock is a write: refused
                assert response.status_code == 503, response.text
            # Clearing may be refused too (READONLY) or not (DEL under OOM): 200 or 503.
            ended = post(client, event_body("session.end"))
            assert ended.status_code in (200, 503), ended.text
            for response in [*turns, ended]:
                assert response.headers["content-type"] == "application/json"
                if response.status_code == 503:
                    message = response.json()["error"]
                    assert message == "conversation store unavailable"
                    assert response.headers["retry-after"] == "5"
            # A Redis that answers PING but refuses the store's writes is not ready (it
            # answered 200 while every turn was a 503), and is again once it takes them.
            assert _ready(client) == (503, "conversation store unavailable")
            _take_writes(server, fault)
            assert _ready(client) == (200, None)
            assert turn(client, "after", "t3")[0]["content"].startswith("saw=")


@pytest.mark.parametrize("fault", ["oom", "readonly", "noreplicas"])
def test_a_redis_replay_cache_that_refuses_writes_is_not_ready(fault: str) -> None:
    with running_redis() as server:
        app = create_app(
            settings(redis_url=server.url, replay_protection=True),
            stateful_agent,
            conversations=ConversationManager(),  # history in memory, signatures in Redis
        )
        with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
            assert _ready(client) == (200, None)
            _refuse_writes(server, fault)
            response = post(client, event_body(text="during", turn_id="t1"))
            assert response.json() == {"error": "replay protection unavailable"}
            assert response.headers["retry-after"] == "5"
            assert _ready(client) == (503, "replay protection unavailable")
            _take_writes(server, fault)
            assert _ready(client) == (200, None)
            assert turn(client, "after", "t2")[0]["content"] == "saw=0"


def test_history_not_in_utf8_through_a_decoding_client_is_a_503() -> None:
    """Bytes that are not UTF-8 under the store's keys (not what it wrote), read through an
    application's ``decode_responses=True`` client: every turn of the conversation was a 400
    ``invalid conversation_id: 'utf-8' codec can't decode…``; now a 503, until it ends."""
    import redis.asyncio

    with running_redis() as server:
        _redis_command(server, "RPUSH", "layercode:{conv-1}:history", b"\xff")
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        store = RedisConversationStore(client)
        app = create_app(settings(), stateful_agent, conversations=ConversationManager(store))
        with serve(app) as url, httpx.Client(base_url=url, timeout=20) as http:
            for body in (event_body(turn_id="t1"), event_body("session.start", turn_id="t2")):
                response = post(http, body)
                assert response.json() == {"error": "conversation store unavailable"}
            assert post(http, event_body("session.end")).status_code == 200
            assert turn(http, "after", "t3")[0]["content"] == "saw=0"


def test_a_foreign_value_under_a_conversation_key_fails_that_conversation_only() -> None:
    """WRONGTYPE (someone else's string where the history list belongs): a 503 for that
    conversation's turns, while ``/ready`` (its write check passes) stays 200."""
    with running_redis() as server:
        _redis_command(server, "SET", "layercode:{conv-1}:history", "not a list")
        app = create_app(settings(redis_url=server.url), stateful_agent)
        with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
            response = post(client, event_body(turn_id="t1"))
            assert response.json() == {"error": "conversation store unavailable"}
            assert _ready(client) == (200, None)
            assert turn(client, "other", "t2", conversation_id="conv-2")[0]["content"] == "saw=0"
            assert post(client, event_body("session.end")).status_code == 200  # deletes it
            assert turn(client, "after", "t3")[0]["content"] == "saw=0"


# What each ACL lacks, and words of the error that say so.
_ACL_FAULTS = [
    (["~layercode:*", "+@all"], "publish"),  # Redis 7 gives a new user no channel
    (["~layercode:*", "&*", "+@all", "-evalsha"], "evalsha"),
    (["%R~layercode:*", "&*", "+@all"], "keys"),  # may read its keys, not write them
    (["~other:*", "&*", "+@all"], "keys"),
]


@pytest.mark.parametrize(("rules", "missing"), _ACL_FAULTS)
def test_ready_names_the_permission_an_acl_user_lacks(
    rules: list[str], missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without what the store needs: every turn was a 503 (or its record failed
    after appending, and each hand-off waited for a poll) while ``/ready`` said 200."""
    with running_redis() as server:
        _redis_command(server, "ACL", "SETUSER", "app", "on", ">s3cret-pw", *rules)
        url = f"redis://app:s3cret-pw@127.0.0.1:{server.port}/0"
        for replay in (False, True):
            app = create_app(settings(redis_url=url, replay_protection=replay), stateful_agent)
            caplog.clear()
            with serve(app) as base, httpx.Client(base_url=base, timeout=20) as client:
                assert _ready(client) == (503, "conversation store unavailable")
            assert missing in caplog.text and "s3cret-pw" not in caplog.text
        grant = "reset on >s3cret-pw ~layercode:* &layercode:* +@all -@dangerous"
        _redis_command(server, "ACL", "SETUSER", "app", *grant.split())  # as docs/history.md
        app = create_app(settings(redis_url=url, replay_protection=True), stateful_agent)
        with serve(app) as base, httpx.Client(base_url=base, timeout=20) as client:
            assert _ready(client) == (200, None)
            assert turn(client, "granted", "t1")[0]["content"] == "saw=0"


# -- shutdown while a turn hangs ------------------------------------------------------------------


def _start_server(grace: float) -> ServerProcess:
    return start_server_process(
        [PYTHON, "-m", "tests.serve_for_tests", "{port}", str(grace)],
        env={**os.environ, "SLOW_AGENT_SECONDS": "60"},
    )


def test_grace_period_over_ends_open_streams_with_error_and_end() -> None:
    results: dict[str, Any] = {}
    with _start_server(grace=1) as server:
        process, url = server.process, server.url
        opened = threading.Barrier(2, timeout=20)

        def open_turn(name: str, text: str, conversation: str) -> None:
            body = event_body(text=text, turn_id=name, conversation_id=conversation)
            # The hanging turn has sent nothing yet: its headers come only with the end.
            with (
                httpx.Client(base_url=url, timeout=30) as client,
                client.stream(
                    "POST", "/api/agent", content=body, headers=signed_headers(body)
                ) as response,
            ):
                chunks = response.iter_raw()
                first = next(chunks)
                if text == "slow":
                    opened.wait()  # the stream has started
                results[name] = (
                    response.status_code,
                    response.headers.get("content-type"),
                    first + b"".join(chunks),
                )

        threads = [
            threading.Thread(target=open_turn, args=("t-slow", "slow", "c-slow")),
            threading.Thread(target=open_turn, args=("t-hang", "hang", "c-hang")),
        ]
        for thread in threads:
            thread.start()
        opened.wait()
        server.wait_output("agent hang running")  # the hanging turn reached its agent
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert process.wait(30) == 0
    for name, spoken in (("t-slow", ["start"]), ("t-hang", [])):
        status, content_type, raw = results[name]
        assert (status, content_type) == (200, "text/event-stream"), raw
        events = [
            msgspec.json.decode(line[6:])
            for line in raw.decode().split("\n")
            if line.startswith("data: ")
        ]
        assert [e["content"] for e in events if e["type"] == "response.tts"] == spoken
        assert events[-2:] == [
            {"type": "response.error", "error": "server is shutting down", "turn_id": name},
            {"type": "response.end", "turn_id": name},
        ]


class _EndsTheGraceWhileReading(ConversationManager):
    """The grace period ends (``abort_turns``) while a turn reads its history."""

    webhook: LayercodeWebhook | None = None
    awaits = True

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int | None]:
        assert self.webhook is not None
        self.webhook.abort_turns()
        if self.awaits:  # a store's read awaits its server (else: a read that never yields)
            await anyio.lowlevel.checkpoint()
        return await super().read_turn(conversation_id)


@pytest.mark.parametrize("awaits", [True, False])
def test_a_turn_reading_its_history_when_the_grace_period_ends_is_not_run(awaits: bool) -> None:
    store = _EndsTheGraceWhileReading()
    store.awaits = awaits
    memory = MemoryMetrics()
    webhook = LayercodeWebhook(stateful_agent, conversations=store, metrics=TurnMetrics(memory))
    store.webhook = webhook
    with serve(LayercodeSignature(webhook, secret=SECRET)) as url:
        body = event_body(text="hi", turn_id="t-reading")
        response = httpx.post(url, content=body, headers=signed_headers(body), timeout=30)
    # Not run after the server ended every open turn: 503, as a turn still waiting.
    assert (response.status_code, response.json()) == (503, {"error": "server is shutting down"})
    assert [(r.turn_id, r.outcome, r.streaming) for r in memory.records] == [
        ("t-reading", "rejected", False)
    ]


# -- the Node-SDK style answers every event type ---------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields"),
    [("session.update", {}), ("session.end", {}), ("data", {})],
)
def test_stream_response_answers_non_turn_events_like_create_app(
    kind: str, fields: dict[str, Any]
) -> None:
    async def handler(stream: Any) -> None:
        await stream.tts("Hi there")
        await stream.end()

    async def route(request: Request) -> Response:
        return stream_response(parse_webhook_payload(await request.body()), handler)

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    app.add_middleware(LayercodeSignature, secret=SECRET)
    reference = create_app(settings())
    with (
        serve(app) as url,
        serve(reference) as reference_url,
        httpx.Client(base_url=url, timeout=10) as client,
        httpx.Client(base_url=reference_url, timeout=10) as reference_client,
    ):
        body = event_body(kind, **fields)
        ours, theirs = post(client, body), post(reference_client, body)
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())
        assert ours.headers["content-type"] == "application/json"
        turn_answer = events_of(post(client, event_body(turn_id="t1")))
        assert turn_answer == [
            {"type": "response.tts", "content": "Hi there", "turn_id": "t1"},
            {"type": "response.end", "turn_id": "t1"},
        ]


# -- LayercodeWebhook keeps history by default -----------------------------------------------------


def test_layercode_webhook_keeps_history_by_default() -> None:
    webhook = LayercodeWebhook(stateful_agent)
    assert isinstance(webhook.conversations, ConversationManager)
    app = LayercodeSignature(webhook, secret=SECRET)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        body = event_body(text="one", turn_id="t1")
        first = client.post("/", content=body, headers=signed_headers(body))
        body = event_body(text="two", turn_id="t2")
        second = client.post("/", content=body, headers=signed_headers(body))
    assert events_of(first)[0]["content"] == "saw=0"
    assert events_of(second)[0]["content"] == "saw=2"
    # Opting out is explicit.
    assert LayercodeWebhook(stateful_agent, conversations=None).conversations is None


@pytest.mark.parametrize("server", SERVERS)
def test_abort_turns_answers_a_waiting_turn_with_its_message(server: str) -> None:
    webhook = LayercodeWebhook(stateful_agent)

    async def abort_agent(event: TurnEvent) -> AsyncIterator[str]:
        webhook.abort_turns("maintenance")
        yield "aborting"

    abort = LayercodeWebhook(abort_agent)
    app = Starlette(routes=[Route("/", webhook, methods=["POST"]), Route("/abort", abort)])
    results: dict[str, httpx.Response] = {}
    with serve_on(server, app) as url, httpx.Client(base_url=url, timeout=30) as client:
        holding = event_body(text="hang", turn_id="t-holds")
        with client.stream("POST", "/", content=holding) as running:
            lines = running.iter_lines()
            assert "saw=0" in next(lines)  # it holds the conversation's lock

            def waiting_turn() -> None:
                body = event_body(text="x", turn_id="t-waits")
                results["waits"] = httpx.post(url + "/", content=body, timeout=30)

            thread = threading.Thread(target=waiting_turn)
            thread.start()
            for _ in range(1000):  # bounded: until it waits for the lock
                if len(webhook._waiting) == 1:
                    break
                time.sleep(0.01)
            assert len(webhook._waiting) == 1
            client.post("/abort", content=event_body(conversation_id="other"))
            rest = "\n".join(lines)
            thread.join(30)
    assert '"type":"response.error","error":"maintenance"' in rest
    waits = results["waits"]
    assert (waits.status_code, waits.json()) == (503, {"error": "maintenance"})


def test_session_end_clears_the_history_after_its_hook_and_not_when_it_fails() -> None:
    """As docs/history.md says: ``on_session_end`` can still read the history; a hook that
    raises gets the 500 and the history stays (a retry of the event finds it)."""
    seen: list[int] = []
    failing = [True]

    async def on_session_end(event: Any) -> None:
        seen.append(len(await webhook.conversations.get_history(event.conversation_id)))
        if failing[0]:
            raise RuntimeError("the transcript database is down")

    webhook = LayercodeWebhook(stateful_agent, on_session_end=on_session_end)
    app = LayercodeSignature(webhook, secret=SECRET)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        body = event_body(text="one", turn_id="t1")
        client.post("/", content=body, headers=signed_headers(body))
        end = event_body("session.end")
        assert client.post("/", content=end, headers=signed_headers(end)).status_code == 500
        failing[0] = False
        assert client.post("/", content=end, headers=signed_headers(end)).status_code == 200
        assert client.post("/", content=end, headers=signed_headers(end)).status_code == 200
    assert seen == [2, 2, 0]
