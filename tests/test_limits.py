"""Bounded input (slow bodies → 408) and replay protection (→ 409)."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from layercode_asgi import (
    ConfigurationError,
    LayercodeSignature,
    LayercodeWebhook,
    MemoryReplayCache,
    RedisReplayCache,
    Settings,
    create_app,
    sign,
)
from layercode_asgi.conversation import StoreUnavailableError
from layercode_asgi.middleware import read_body
from layercode_asgi.replay import replay_key

from .agents_for_tests import scripted_agent
from .conftest import SECRET, event_body, serve, serve_hypercorn, signed_headers
from .redis_fixtures import running_redis
from .test_middleware import Recorder

BODY = event_body(text="hello")


# -- slow bodies ---------------------------------------------------------------------------------


async def trickle(app: Any, chunks: list[bytes], gap: float, headers: list[Any]) -> list[Any]:
    """Send ``chunks`` with ``gap`` seconds between them; return what the app sent."""
    pending = list(chunks)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            await asyncio.sleep(gap)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await asyncio.sleep(3600)
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.anyio
async def test_a_body_slower_than_the_timeout_gets_408() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, body_timeout=0.3)
    started = time.monotonic()
    header = [(b"layercode-signature", sign(b"{}", SECRET).encode())]  # fresh, well formed
    sent = await trickle(app, [b"{", b'"a"', b":1}"], 0.2, header)
    assert time.monotonic() - started < 1.5
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert msgspec.json.decode(sent[1]["body"]) == {
        "error": "request body not received within 0.3 s"
    }
    assert inner.scopes == []


@pytest.mark.anyio
async def test_a_slow_body_within_the_timeout_is_fine() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, body_timeout=2)
    header = [(b"layercode-signature", sign(BODY, SECRET).encode())]
    sent = await trickle(app, [BODY[:5], BODY[5:20], BODY[20:]], 0.1, header)
    assert sent[0]["status"] == 204
    assert inner.bodies == [BODY]


@pytest.mark.anyio
async def test_a_webhook_behind_a_middleware_that_took_the_verified_body_still_has_a_deadline() -> (
    None
):
    """Behind LayercodeSignature the webhook reads the verified body at once, without a
    deadline of its own; if a middleware between them took that body, it waits on the
    server's receive again, and body_timeout holds there."""

    async def takes_the_body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await webhook(scope, receive, send)

    webhook = LayercodeWebhook(scripted_agent, body_timeout=0.3)
    app = LayercodeSignature(takes_the_body, secret=SECRET)
    sent = await trickle(app, [BODY], 0, [(b"layercode-signature", sign(BODY, SECRET).encode())])
    assert sent[0]["status"] == 408
    assert msgspec.json.decode(sent[1]["body"]) == {
        "error": "request body not received within 0.3 s"
    }


@pytest.mark.anyio
async def test_a_body_sent_a_byte_at_a_time_costs_no_more_memory_than_its_size() -> None:
    # Over chunked encoding, hypercorn hands the app each 1-byte chunk as a message of its
    # own; a list of them cost ~41 bytes of memory per byte of body.
    size = 64 * 1024
    remaining = size

    async def receive() -> dict[str, Any]:
        nonlocal remaining
        remaining -= 1
        return {
            "type": "http.request",
            "body": b"%c" % (65 + remaining % 26),
            "more_body": bool(remaining),
        }

    tracemalloc.start()
    try:
        body = await read_body(receive, size, 10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert body is not None and len(body) == size and body[-1:] == b"A"
    assert peak < 4 * size


@pytest.mark.parametrize("bad", [0, -1, "10", True, float("nan"), float("inf")])
def test_body_timeout_must_be_positive(bad: Any) -> None:
    with pytest.raises(
        ConfigurationError, match="body_timeout must be a finite number > 0 or None"
    ):
        LayercodeSignature(Recorder(), secret=SECRET, body_timeout=bad)
    with pytest.raises(
        ConfigurationError, match="body_timeout must be a finite number > 0 or None"
    ):
        LayercodeWebhook(scripted_agent, body_timeout=bad)


def read_json_reply(sock: socket.socket) -> bytes:
    """Read an HTTP answer with a JSON body until its closing ``}`` (or the server closes);
    each read raises TimeoutError after the socket's timeout: the route hung."""
    reply = b""
    for _ in range(1000):  # bounded: the answers are small
        if b"\r\n\r\n" in reply and reply.rstrip().endswith(b"}"):
            break
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


def slow_body_reply(url: str, path: str, start: bytes, headers: bytes = b"") -> bytes:
    """POST to ``path`` declaring 1,000 bytes of body, send ``start`` of it and no more; the
    answer (read as :func:`read_json_reply` reads it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + headers
            + b"Content-Length: 1000\r\n\r\n"
            + start
        )
        return read_json_reply(sock)


def authorize_settings() -> Settings:
    """An authorize route that would call LayerCode, with a 0.5 s body deadline."""
    return Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        layercode_api_key="lc_key",
        body_timeout=0.5,
    )


def test_slowloris_over_a_real_socket_gets_408() -> None:
    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret=SECRET, body_timeout=0.5
    )
    with serve(create_app(settings, scripted_agent)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /api/agent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"layercode-signature: " + sign(b"{}", SECRET).encode() + b"\r\n"
                b'Content-Length: 1000\r\n\r\n{"type":'
            )
            started = time.monotonic()
            reply = read_json_reply(sock)
            elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request body not received within 0.5 s" in reply
    assert elapsed < 3


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "hypercorn-trio"])
@pytest.mark.parametrize("mounted", [False, True])
def test_a_webhook_served_without_the_middleware_answers_a_trickling_body_408(
    server: str, mounted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """LayercodeWebhook as an ASGI app of its own (or a Starlette route), no signature
    middleware in front: a body that never finishes arriving is answered 408 after
    body_timeout, as the middleware answers it (it used to be waited for without end)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    webhook = LayercodeWebhook(scripted_agent, body_timeout=0.5)
    app: Any = webhook
    if mounted:
        app = Starlette(routes=[Route("/api/agent", webhook, methods=["POST"])])
    if server == "hypercorn-trio":
        pytest.importorskip("trio")
    serving = (
        serve(app) if server == "uvicorn" else serve_hypercorn(app, trio_worker="trio" in server)
    )
    with serving as url:
        reply = slow_body_reply(url, "/api/agent", b'{"type":')
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'{"error":"request body not received within 0.5 s"}' in reply
    assert b"connection: close" in reply.lower()
    assert any("webhook body too slow" in r.getMessage() for r in caplog.records)


def test_slow_authorize_body_over_a_real_socket_gets_408() -> None:
    """LAYERCODE_BODY_TIMEOUT bounds the authorize route's body too: it waited forever."""
    with serve(create_app(authorize_settings(), scripted_agent)) as url:
        reply = slow_body_reply(url, "/api/authorize", b'{"agent_id":')
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'{"error":"request body not received within 0.5 s"}' in reply
    assert b"connection: close" in reply.lower()


def test_authorize_body_declared_too_large_is_refused_before_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Content-Length over the authorize route's limit gets 413 at once, closing the
    connection (it used to read 64 KiB first, or wait out the body deadline, and keep the
    connection open); a body too slow is logged, as the webhook's is."""
    with serve(create_app(authorize_settings(), scripted_agent)) as url:
        host, port = url.removeprefix("http://").split(":")
        for head, status in (
            (b"Content-Length: 10000000\r\n\r\n", b"413"),
            (b'Content-Length: 1000\r\n\r\n{"agent_id":', b"408"),
        ):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"POST /api/authorize HTTP/1.1\r\nHost: x\r\n" + head)
                reply = read_json_reply(sock)
            assert reply.startswith(b"HTTP/1.1 " + status), reply
            assert b"connection: close" in reply.lower()
            if status == b"413":
                assert b'{"error":"request body exceeds 65536 bytes"}' in reply
    assert any("authorize body too slow" in r.getMessage() for r in caplog.records)


# -- replay protection ------------------------------------------------------------------------------


async def post(app: Any, body: bytes, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post("/api/agent", content=body, headers=headers)


@pytest.mark.anyio
async def test_a_replayed_signature_gets_409() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET, replay_protection=True)
    headers = signed_headers(BODY)
    assert (await post(app, BODY, headers)).status_code == 204
    replay = await post(app, BODY, headers)
    assert replay.status_code == 409
    assert replay.json() == {"error": "webhook already received: replayed signature"}
    # Dressing the header up (a junk v1 entry, spaces) does not make it new.
    t, v1 = headers["layercode-signature"].split(",")
    dressed = {"layercode-signature": f"v1={'0' * 64}, {t} ,{v1}"}
    assert (await post(app, BODY, dressed)).status_code == 409
    # Another body, or the same body signed at another second, is a new delivery.
    other = event_body(text="other")
    assert (await post(app, other, signed_headers(other))).status_code == 204
    later = {"layercode-signature": sign(BODY, SECRET, timestamp=int(time.time()) - 5)}
    assert (await post(app, BODY, later)).status_code == 204
    assert len(inner.bodies) == 3


class CacheWithoutForget:
    """A user's replay cache written before ``forget`` existed."""

    def __init__(self) -> None:
        self.memory = MemoryReplayCache()
        self.seen = self.memory.seen
        self.aclose = self.memory.aclose


class CacheFailingToForget(MemoryReplayCache):
    async def forget(self, key: str) -> None:
        raise StoreUnavailableError("replay cache unavailable: ConnectionError")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "cache", "retry"),
    [
        (503, MemoryReplayCache, 200),  # not processed: the retry is taken
        (308, MemoryReplayCache, 200),  # redirected: the client sends it again, elsewhere
        (500, MemoryReplayCache, 409),  # only 503 means "not processed, retry"
        (503, CacheWithoutForget, 409),  # a cache without forget: remembered as before
        (503, CacheFailingToForget, 409),  # logged; the 503 is sent all the same
    ],
)
async def test_a_delivery_answered_503_is_forgotten(
    status: int, cache: Any, retry: int, caplog: pytest.LogCaptureFixture
) -> None:
    statuses = [status]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        code = statuses.pop(0) if statuses else 200
        await send({"type": "http.response.start", "status": code, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    signed = LayercodeSignature(app, secret=SECRET, replay_protection=cache())
    headers = signed_headers(BODY)
    assert (await post(signed, BODY, headers)).status_code == status
    assert (await post(signed, BODY, headers)).status_code == retry
    assert (await post(signed, BODY, headers)).status_code == 409
    failed = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert failed == (
        [
            "replay cache could not forget a delivery answered 503 (its retry will get 409): "
            "StoreUnavailableError: replay cache unavailable: ConnectionError"
        ]
        if cache is CacheFailingToForget
        else []
    )


class CacheFailing(MemoryReplayCache):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def seen(self, key: str, ttl: float) -> bool:
        raise self.error


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "line"),
    [
        # RedisReplayCache's error already says "replay cache unavailable" and names its cause
        (
            StoreUnavailableError("replay cache unavailable: ConnectionError: Error 111\nx"),
            "replay cache unavailable: ConnectionError: Error 111\\nx",
        ),
        (RuntimeError("boom\nx"), "replay cache unavailable: RuntimeError: boom\\nx"),
        (StoreUnavailableError("down"), "replay cache unavailable: StoreUnavailableError: down"),
    ],
)
async def test_an_unavailable_replay_cache_is_logged_once(
    error: Exception, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    signed = LayercodeSignature(Recorder(), secret=SECRET, replay_protection=CacheFailing(error))
    assert (await post(signed, BODY, signed_headers(BODY))).status_code == 503
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [line]


@pytest.mark.anyio
async def test_an_unreachable_redis_replay_cache_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = RedisReplayCache("redis://127.0.0.1:1/0")
    try:
        signed = LayercodeSignature(Recorder(), secret=SECRET, replay_protection=cache)
        assert (await post(signed, BODY, signed_headers(BODY))).status_code == 503
    finally:
        await cache.aclose()
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("replay cache unavailable: ConnectionError: Error ")
    assert line.count("replay cache unavailable") == 1


@pytest.mark.anyio
async def test_replay_protection_off_by_default() -> None:
    inner = Recorder()
    app = LayercodeSignature(inner, secret=SECRET)
    headers = signed_headers(BODY)
    for _ in range(2):
        assert (await post(app, BODY, headers)).status_code == 204


@pytest.mark.anyio
async def test_memory_replay_cache_forgets_expired_and_stays_bounded() -> None:
    cache = MemoryReplayCache(max_entries=3)
    assert await cache.seen("a", 0.2) is False
    assert await cache.seen("a", 0.2) is True
    await anyio.sleep(0.25)
    assert await cache.seen("a", 10) is False  # expired, so new again
    for key in "bcd":
        await cache.seen(key, 10)
    assert len(cache) == 3
    assert replay_key("1", b"x") != replay_key("2", b"x") != replay_key("1", b"y")


def test_redis_replay_cache_is_shared_between_workers_and_fails_closed() -> None:
    with running_redis() as redis:

        def app_on_redis() -> Any:
            return create_app(
                Settings(
                    env_file=None,
                    environ={"LAYERCODE_REPLAY_PROTECTION": "1", "REDIS_URL": redis.url},
                    layercode_webhook_secret=SECRET,
                ),
                scripted_agent,
            )

        first, second = app_on_redis(), app_on_redis()  # two "workers", one Redis
        with serve(first) as url1, serve(second) as url2:
            headers = signed_headers(BODY)
            ok = httpx.post(url1 + "/api/agent", content=BODY, headers=headers)
            assert ok.status_code == 200
            again = httpx.post(url2 + "/api/agent", content=BODY, headers=headers)
            assert again.status_code == 409
            redis.stop()
            other = event_body(text="while redis is down")
            down = httpx.post(url2 + "/api/agent", content=other, headers=signed_headers(other))
            assert down.status_code == 503
            assert down.headers["content-type"] == "application/json"


@pytest.mark.anyio
async def test_redis_replay_cache_ttl() -> None:
    with running_redis() as redis:
        from redis.asyncio import Redis  # after running_redis: skipped without the extra

        client = Redis.from_url(redis.url)  # a client of the test's own: public API only
        try:
            cache = RedisReplayCache(client)
            assert await cache.seen("k", 2.2) is False
            assert await cache.seen("k", 2.2) is True
            ttl = await client.ttl("layercode:replay:k")
            assert 1 <= ttl <= 3
            # forget deletes only a key this cache set: not one another worker set later
            other = RedisReplayCache(client)
            await other.forget("k")
            assert await cache.seen("k", 2.2) is True
            await cache.forget("k")
            assert await other.seen("k", 2.2) is False
            await cache.forget("k")
            assert await cache.seen("k", 2.2) is True
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_a_tolerance_beyond_what_redis_can_expire_still_works() -> None:
    # LAYERCODE_SIGNATURE_TOLERANCE accepts any integer; Redis refuses an EX beyond about
    # 9.2e15 s ("invalid expire time"), which made every webhook a 503.
    with running_redis() as redis:
        from redis.asyncio import Redis

        client = Redis.from_url(redis.url)
        try:
            cache = RedisReplayCache(client)
            assert await cache.seen("k", 1e30) is False
            assert await cache.seen("k", 1e30) is True
            assert await client.ttl("layercode:replay:k") > 10**14
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_redis_replay_cache_on_an_unreachable_cluster_is_unavailable() -> None:
    # LAYERCODE_REDIS_CLUSTER with no node reachable (or a Redis not in cluster mode): the
    # cluster client's RedisClusterException is not a RedisError; it escaped the cache (the
    # middleware still answered 503, but logged a stack trace for Redis being down).
    with running_redis() as redis:
        for url in (redis.url, "redis://127.0.0.1:1/0"):
            cache = RedisReplayCache(url, cluster=True)
            try:
                with pytest.raises(StoreUnavailableError, match="replay cache unavailable"):
                    await cache.seen("k", 2.0)
            finally:
                await cache.aclose()
