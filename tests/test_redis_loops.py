"""Redis clients created from a URL on later event loops: a mounted app (no lifespan closes its
clients) served on one loop and then another in the same process, and the store and replay
cache used directly on successive ``anyio.run`` calls. Each loop gets its own client; the
previous loop's pooled connections are never used again."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from layercode_asgi import RedisConversationStore, Settings, create_app
from layercode_asgi.conversation import HistoryMessage
from layercode_asgi.replay import RedisReplayCache

from . import redis_fixtures
from .conftest import SECRET, event_body, serve, signed_headers
from .redis_fixtures import RedisServer, worker_agent

redis_server = redis_fixtures.redis_server


def redis_settings(redis_server: RedisServer) -> Settings:
    """History and replay protection on ``redis_server``."""
    return Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        redis_url=redis_server.url,
        replay_protection=True,
    )


def test_a_mounted_app_served_on_one_loop_then_another(redis_server: RedisServer) -> None:
    """Before: the first webhook on each later loop was a 500 (503 with replay protection):
    redis-py wrote on a pooled connection of the closed loop."""
    settings = redis_settings(redis_server)
    parent = Starlette(routes=[Mount("/voice", create_app(settings, worker_agent))])
    first = event_body("message", conversation_id="loops", text="first", turn_id="once")
    first_headers = signed_headers(first)
    n = 0
    for run in range(3):
        with serve(parent) as url, httpx.Client(base_url=url, timeout=20) as client:
            if run:  # remembered on an earlier loop, refused on this one
                again = client.post("/voice/api/agent", content=first, headers=first_headers)
                assert again.status_code == 409, again.text
            for _ in range(2):
                body = event_body("message", conversation_id="loops", text=f"t{n}", turn_id=f"{n}")
                if n == 0:
                    body, headers = first, first_headers
                else:
                    headers = signed_headers(body)
                response = client.post("/voice/api/agent", content=body, headers=headers)
                assert response.status_code == 200, (run, response.text)
                assert f"saw={2 * n} " in response.text  # the history of every loop before
                n += 1


def test_a_redis_store_on_successive_event_loops(redis_server: RedisServer) -> None:
    store = RedisConversationStore(redis_server.url, lock_timeout=10)

    async def turn(n: int) -> None:
        with anyio.fail_after(20):
            await store.ping()
            async with store.lock("c"):
                history, generation = await store.read_turn("c")
                assert len(history) == 2 * n
                user = HistoryMessage(role="user", text=f"u{n}")
                agent = HistoryMessage(role="assistant", text=f"a{n}")
                assert await store.record_turn("c", [user, agent], generation)
            # a waiter woken by the hand-off (the pub/sub listener of this loop)
            async with anyio.create_task_group() as tg, store.lock("w"):
                tg.start_soon(waiter)
                await anyio.sleep(0.05)
            assert [m.text for m in await store.get("c")][-2:] == [f"u{n}", f"a{n}"]

    async def waiter() -> None:
        async with store.lock("w"):
            await store.append("w", [HistoryMessage(role="user", text="waited")])

    for n in range(3):
        anyio.run(turn, n)
    anyio.run(store.clear, "c")
    assert anyio.run(store.get, "c") == []
    anyio.run(store.aclose)


def test_a_redis_replay_cache_on_successive_event_loops(redis_server: RedisServer) -> None:
    cache = RedisReplayCache(redis_server.url)

    async def check(key: str) -> bool:
        with anyio.fail_after(10):
            await cache.ping()
            return await cache.seen(key, 60)

    assert anyio.run(check, "a") is False
    assert anyio.run(check, "a") is True
    assert anyio.run(check, "b") is False
    anyio.run(cache.aclose)


def test_a_client_given_by_the_application_is_kept(redis_server: RedisServer) -> None:
    """Not replaced (the application's client, for the loop that created it), not closed."""
    import redis.asyncio as redis_asyncio

    async def use() -> list[Any]:
        client = redis_asyncio.Redis.from_url(redis_server.url)
        store = RedisConversationStore(client)
        cache = RedisReplayCache(client)
        await store.append("given", [HistoryMessage(role="user", text="x")])
        assert not await cache.seen("given", 60)
        await store.aclose()
        await cache.aclose()
        answer = [
            await client.exists(cache.key_prefix + "given"),
            await client.llen("layercode:{given}:history"),
        ]
        await client.aclose()
        return answer

    assert anyio.run(use) == [1, 1]


def test_one_app_on_two_event_loops_at_once_keeps_a_client_for_each(
    redis_server: RedisServer,
) -> None:
    """One app served by two servers at once (two threads, two event loops): each loop keeps
    its own Redis clients. Before, each turn on the other loop replaced the store's and the
    replay cache's clients, leaving the old ones' connections open: Redis saw new
    connections pile up, turn after turn."""
    import redis

    settings = redis_settings(redis_server)
    app = create_app(settings, worker_agent)
    with (
        redis.Redis.from_url(redis_server.url) as watcher,
        serve(app) as first,
        serve(app) as second,
        httpx.Client(timeout=20) as client,
    ):
        counts = []
        for n in range(12):
            body = event_body("message", conversation_id=f"two-{n}", text="hi", turn_id=f"{n}")
            url = (first, second)[n % 2] + "/api/agent"
            response = client.post(url, content=body, headers=signed_headers(body))
            assert response.status_code == 200, response.text
            counts.append(len(watcher.client_list()))
    # the later turns reuse their loop's pooled connections: the count stops growing
    assert counts[-1] == counts[-5], counts
