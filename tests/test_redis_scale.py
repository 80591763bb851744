"""Redis at scale: turns of one conversation in arrival order across uvicorn workers, crashed
workers (holding a lock, waiting for one), many waiters, and round trips per turn."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import httpx
import pytest

from layercode_asgi import ConversationManager, RedisConversationStore, Settings, create_app
from layercode_asgi.conversation.redis_scripts import Keys
from layercode_asgi.testing import LayercodeTestClient

from . import redis_fixtures
from .conftest import SECRET, serve, signed_headers, start_server_process
from .conftest import event_body as event
from .redis_fixtures import RedisServer, uvicorn_workers, worker_agent

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

redis_server = redis_fixtures.redis_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def turn(url: str, cid: str, text: str) -> str:
    """One turn on a connection of its own (so turns spread over the workers)."""
    client = LayercodeTestClient(base_url=url, secret=SECRET, conversation_id=cid, timeout=30)
    return (await client.message(text)).text


async def history_texts(redis_url: str, cid: str) -> list[str]:
    async with ConversationManager(RedisConversationStore(redis_url)) as manager:
        return [m.text for m in await manager.get_history(cid) if m.role == "user"]


async def until(condition: Any, what: str) -> None:
    """Until ``await condition()`` is true (what Redis shows, not a pause "long enough"
    for it: a busy machine may take longer); bounded: 20 s."""
    for _ in range(2_000):
        if await condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def pid_of(reply: str) -> int:
    match = re.match(r"pid=(\d+) ", reply)
    assert match, reply
    return int(match.group(1))


#: How many turns of a conversation reached Redis: queued, holding the lock, or recorded
#: (read at once: a handoff moves a turn from the queue to the lock in one step).
REACHED_LUA = """
return redis.call('llen', KEYS[1]) + redis.call('exists', KEYS[2])
    + math.floor(redis.call('llen', KEYS[3]) / 2)
"""


async def turns_in_arrival_order(
    url: str, conversations: list[str], redis_url: str, *, cluster: bool = False
) -> set[int]:
    """A slow turn, then five more, on each conversation at once, each sent once the one
    before reached Redis (turns queue in the order they reach Redis; on a busy machine a
    turn sent 100 ms after another could get there first); check that each conversation ran
    (and recorded) them in the order sent. Returns the worker pids."""
    from redis import asyncio as redis_asyncio

    raw: Any = (
        redis_asyncio.RedisCluster.from_url(redis_url)
        if cluster
        else redis_asyncio.Redis.from_url(redis_url)
    )

    async def reached(count: int) -> None:
        """Until ``count`` turns of each conversation reached Redis; bounded: 20 s."""
        for _ in range(2_000):
            keys = [Keys("layercode:", cid) for cid in conversations]
            counts = [await raw.eval(REACHED_LUA, 3, k.queue, k.lock, k.history) for k in keys]
            if min(counts) >= count:
                return
            await anyio.sleep(0.01)
        raise AssertionError(f"turn {count - 1} never reached Redis: {counts}")

    replies: dict[str, list[str]] = {cid: [] for cid in conversations}
    # One connection per turn, opened beforehand: sending a turn is then one write.
    clients = {
        (cid, n): httpx.AsyncClient(base_url=url, timeout=30)
        for cid in conversations
        for n in range(6)
    }
    try:
        # A turn on each connection first: the worker holding it has its Redis client ready
        # (a cluster client's first command reads the slots), so no first-use delay reorders
        # turns sent a moment apart (seen on a loaded CI machine).
        for (cid, n), client in clients.items():
            body = event("message", conversation_id=f"warm-{cid}-{n}", text="warm up")
            warm = await client.post("/api/agent", content=body, headers=signed_headers(body))
            assert warm.status_code == 200, warm.text

        async def one(cid: str, n: int, text: str) -> None:
            body = event("message", conversation_id=cid, text=text, turn_id=f"t{n}")
            response = await clients[cid, n].post(
                "/api/agent", content=body, headers=signed_headers(body)
            )
            assert response.status_code == 200, response.text
            replies[cid].append(response.text)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for cid in conversations:
                    tg.start_soon(one, cid, 0, "sleep:1 first")
                await reached(1)  # the slow turns hold their conversations
                for n in range(1, 6):
                    for cid in conversations:
                        tg.start_soon(one, cid, n, f"queued {n}")
                    await reached(n + 1)
    finally:
        for client in clients.values():
            await client.aclose()
        await raw.aclose()
    pids = set()
    for cid in conversations:
        # each turn saw the history of the turns before it, in the order they were sent
        ran = sorted(
            (int(saw), text)
            for r in replies[cid]
            for saw, text in re.findall(r'saw=(\d+) text=([^"]*)', r)
        )
        sent = ["sleep:1 first"] + [f"queued {n}" for n in range(1, 6)]
        assert [text for _, text in ran] == sent, (cid, ran)
        assert [saw for saw, _ in ran] == [0, 2, 4, 6, 8, 10]
        pids |= {int(m) for r in replies[cid] for m in re.findall(r"pid=(\d+)", r)}
    return pids


async def test_queued_turns_run_in_arrival_order_across_two_workers(
    redis_server: RedisServer,
) -> None:
    """On each of eight conversations at once, turns queued one after another behind a slow one
    run and record in the order sent (before the fair queue they ran in reverse order:
    polling with a growing back-off favoured the newest waiter)."""
    conversations = [f"order-{n}" for n in range(8)]
    with uvicorn_workers(redis_server.url, workers=2) as url:
        pids = await turns_in_arrival_order(url, conversations, redis_server.url)
    expected = ["sleep:1 first"] + [f"queued {n}" for n in range(1, 6)]
    for cid in conversations:
        assert await history_texts(redis_server.url, cid) == expected, cid
    assert len(pids) == 2  # both workers served turns


async def test_a_worker_killed_while_holding_a_lock(redis_server: RedisServer) -> None:
    """SIGKILL the worker running a turn: its lock expires (lock TTL 1.5 s), the next turns
    of the conversation run in order on the workers left, and nothing is lost but the
    killed turn."""
    from redis import asyncio as redis_asyncio

    with uvicorn_workers(redis_server.url, workers=2, lock_ttl=1.5) as url:
        await turn(url, "crash", "before")
        body = event("message", conversation_id="crash", text="sleep:30 doomed")
        with anyio.fail_after(60):
            async with (
                httpx.AsyncClient(timeout=30) as client,
                client.stream(
                    "POST", url + "/api/agent", content=body, headers=signed_headers(body)
                ) as response,
            ):
                assert response.status_code == 200
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data:") and "pid=" in line:
                        pid = pid_of(line[line.index("pid=") :])
                        break
                os.kill(pid, signal.SIGKILL)
                with pytest.raises(httpx.HTTPError):
                    async for _ in lines:
                        pass
            results: list[str] = []
            keys, raw = Keys("layercode:", "crash"), redis_asyncio.Redis.from_url(redis_server.url)
            dead = await raw.get(keys.lock)

            async def one(text: str) -> None:
                results.append(await turn(url, "crash", text))

            async def first_reached() -> bool:  # queued, or (the dead lock expired) ran
                if await raw.llen(keys.queue) or await raw.llen(keys.history) > 2:
                    return True
                return await raw.get(keys.lock) not in (dead, None)

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "after 1")
                await until(first_reached, "'after 1' reached Redis")
                tg.start_soon(one, "after 2")
            await raw.aclose()
    assert await history_texts(redis_server.url, "crash") == ["before", "after 1", "after 2"]
    assert all(pid_of(r) != pid for r in results)


WAITER = textwrap.dedent(
    """
    import sys, anyio
    from layercode_asgi import RedisConversationStore

    async def main():
        store = RedisConversationStore(sys.argv[1], lock_ttl=1.5)
        print("ready", flush=True)
        sys.stdin.readline()  # started (and imported) before the turn it queues behind
        async with store.lock("abandoned", timeout=60):
            print("acquired", flush=True)
            await anyio.sleep(60)

    anyio.run(main)
    """
)


async def test_a_worker_killed_while_waiting_is_skipped(redis_server: RedisServer) -> None:
    """A process queued for a conversation is SIGKILLed; the turn queued behind it runs
    after the running turn, without being handed to the dead waiter's place."""
    from redis import asyncio as redis_asyncio

    with uvicorn_workers(redis_server.url, workers=2, lock_ttl=1.5) as url:
        results: dict[str, str] = {}

        async def one(text: str) -> None:
            results[text] = await turn(url, "abandoned", text)

        keys, raw = Keys("layercode:", "abandoned"), redis_asyncio.Redis.from_url(redis_server.url)

        async def queued(count: int) -> bool:
            return bool(await raw.llen(keys.queue) >= count)

        waiter = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-c", WAITER, redis_server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert waiter.stdin is not None and waiter.stdout is not None
        try:
            assert await anyio.to_thread.run_sync(waiter.stdout.readline) == "ready\n"
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, "sleep:3 running")
                    await until(lambda: raw.exists(keys.lock), "the running turn holds the lock")
                    waiter.stdin.write("queue\n")
                    waiter.stdin.flush()
                    await until(lambda: queued(1), "the waiter queued behind the running turn")
                    tg.start_soon(one, "next")
                    await until(lambda: queued(2), "'next' queued behind the waiter")
                    waiter.kill()
        finally:
            waiter.kill()  # also when the test failed: never left running
            waiter.communicate(timeout=10)  # (and its pipes closed)
            await raw.aclose()
    assert await history_texts(redis_server.url, "abandoned") == ["sleep:3 running", "next"]
    assert "saw=2" in results["next"]


async def test_a_hundred_waiters_on_a_small_pool_run_in_order(redis_server: RedisServer) -> None:
    """Waiting holds no pooled connection: 100 turns of one conversation queue behind a
    holder on a pool of 4 connections; the holder releases, and all run, in order."""
    from redis import asyncio as redis_asyncio

    store = RedisConversationStore(redis_server.url, max_connections=4, lock_ttl=3)
    order: list[int] = []
    raw: Any = redis_asyncio.Redis.from_url(redis_server.url)
    async with ConversationManager(store) as manager:

        async def waiter(n: int) -> None:
            async with manager.lock("busy", timeout=60):
                order.append(n)

        async def queued(count: int) -> None:
            """Until ``count`` waiters are in the queue: turns queue in the order they reach
            Redis, and on a busy machine a task started 5 ms after another may get there
            first."""
            for _ in range(2_500):
                keys = await raw.keys("*busy*queue")
                if keys and await raw.llen(keys[0]) >= count:
                    return
                await anyio.sleep(0.002)
            raise AssertionError(f"waiter {count - 1} never queued")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg, manager.lock("busy"):
                for n in range(100):
                    tg.start_soon(waiter, n)
                    await queued(n + 1)
    await raw.aclose()
    assert order == list(range(100))


async def test_waiters_that_time_out_or_are_cancelled_leave_the_queue(
    redis_server: RedisServer,
) -> None:
    """Queued behind a holder: one waiter times out, one is cancelled, one waits on. When
    the holder releases, the lock goes to the one still waiting (within its 2.5 s bound: a
    hand-off to an abandoned place would hold it up for the 3 s such a place lasts), and it
    sees the holder's recorded turn."""
    from redis import asyncio as redis_asyncio

    from layercode_asgi import ConversationLockTimeout

    store = RedisConversationStore(redis_server.url, lock_ttl=60)
    raw = redis_asyncio.Redis.from_url(redis_server.url)
    got: list[str] = []
    async with ConversationManager(store) as manager, raw:

        async def wait_on(name: str, wait: float) -> None:
            async with manager.lock("queue", timeout=wait):
                history, _ = await manager.read_turn("queue")
                got.append(f"{name} saw {len(history)}")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg, manager.lock("queue"):
                _, generation = await manager.read_turn("queue")
                with pytest.raises(ConversationLockTimeout):
                    await wait_on("timed out", 0.2)
                with anyio.CancelScope() as cancelled:
                    cancelled.cancel()
                    await wait_on("cancelled", 10)
                cancel_later = anyio.CancelScope()

                async def cancelled_while_queued() -> None:
                    with cancel_later:
                        await wait_on("cancelled later", 10)

                async def queued(count: int) -> bool:
                    return bool(await raw.llen(Keys("layercode:", "queue").queue) == count)

                tg.start_soon(cancelled_while_queued)
                await until(lambda: queued(1), "'cancelled later' queued")
                tg.start_soon(wait_on, "patient", 2.5)
                await until(lambda: queued(2), "'patient' queued")
                cancel_later.cancel()
                await until(lambda: queued(1), "'cancelled later' left the queue")
                # record + release in one: the lock goes to "patient"
                assert await manager.record_turn("queue", "hi", "hello", generation=generation)
    assert got == ["patient saw 2"]


class CommandLog:
    """Every command Redis runs, from ``MONITOR``: sent by a client, or run by a script."""

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as redis_asyncio

        self.client: Any = redis_asyncio.Redis.from_url(redis_url)
        self.sent: list[str] = []  # by clients (one round trip each)
        self.scripted: list[str] = []  # by scripts

    async def record(self, during: Any) -> None:
        """Log what Redis runs while ``during()`` runs (and until a marker after it)."""
        marker = "end-of-measure"
        async with self.client.monitor() as monitor, anyio.create_task_group() as tg:

            async def run() -> None:
                await during()
                await self.client.echo(marker)

            tg.start_soon(run)
            async for command in monitor.listen():
                text = command["command"]
                if text == f"ECHO {marker}":
                    break
                name = text.split(" ", 1)[0].lower()
                if name in ("hello", "client", "select", "auth"):
                    continue  # a connection being set up (ours for the marker, say)
                (self.scripted if command.get("client_type") == "lua" else self.sent).append(name)
        await self.client.aclose()


async def test_an_uncontended_turn_costs_two_round_trips(redis_server: RedisServer) -> None:
    """Lock + read in one script, record + release in one: two commands sent to Redis per
    turn (today: four -- SET, MULTI/LRANGE/GET/EXEC, EVALSHA, EVALSHA), seen by MONITOR."""
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    store = RedisConversationStore(redis_server.url)
    app = create_app(settings, worker_agent, conversations=ConversationManager(store))
    turns = 10
    log = CommandLog(redis_server.url)
    with serve(app) as url:
        await turn(url, "warm-up", "hello")  # loads the scripts, opens the connection

        async def turns_in_a_row() -> None:
            for n in range(turns):
                await turn(url, f"rt-{n % 5}", f"turn {n}")

        with anyio.fail_after(60):
            await log.record(turns_in_a_row)
    assert log.sent == ["evalsha"] * (2 * turns), log.sent
    assert log.scripted  # the work happened inside the scripts


# -- serve --workers N ---------------------------------------------------------------------------


async def test_serve_workers_drain_on_sigterm_and_read_only_the_chosen_env_file(
    tmp_path: Any,
) -> None:
    """``serve --workers 2 --env-file chosen.env`` in a directory whose ``.env`` is invalid:
    the workers read only chosen.env; start-up warns that, without REDIS_URL, state is per
    process; on SIGTERM a running turn finishes while a new webhook gets 503, then exit 0."""
    (tmp_path / ".env").write_text("LAYERCODE_TURN_TIMEOUT=not-a-number\n")
    (tmp_path / "chosen.env").write_text(f"LAYERCODE_WEBHOOK_SECRET={SECRET}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "REDIS_"))}
    env["PYTHONPATH"] = ROOT
    command = [sys.executable, "-m", "layercode_asgi", "serve", "--workers", "2",
               "--port", "{port}", "--env-file", "chosen.env",
               "--agent", "tests.redis_fixtures:worker_agent"]  # fmt: skip
    with start_server_process(
        command, env=env, cwd=tmp_path, log=tmp_path / "serve.log", ready_path="/ready", timeout=60
    ) as server:
        with anyio.fail_after(60):
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                body = event("message", conversation_id="drain", text="sleep:2 draining")
                async with client.stream(
                    "POST", "/api/agent", content=body, headers=signed_headers(body)
                ) as response:
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    async for line in lines:
                        if "pid=" in line:
                            break
                    server.process.send_signal(signal.SIGTERM)
                    for _ in range(1000):  # bounded (10 s): until both workers drain
                        if server.output().count("received SIGTERM: draining") == 2:
                            break
                        await anyio.sleep(0.01)
                    assert server.output().count("received SIGTERM: draining") == 2
                    async with httpx.AsyncClient(base_url=server.url, timeout=30) as other:
                        late = event("message", conversation_id="late", text="late")
                        refused = await other.post(
                            "/api/agent", content=late, headers=signed_headers(late)
                        )
                    rest = "".join([line async for line in lines])
                assert refused.status_code == 503
                assert " done" in rest
                assert "response.end" in rest
            status = await anyio.to_thread.run_sync(server.process.wait, 30)
        assert status == 0
    log = (tmp_path / "serve.log").read_text()
    assert "without REDIS_URL" in log
    assert "not-a-number" not in log
