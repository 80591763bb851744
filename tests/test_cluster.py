"""LAYERCODE_REDIS_CLUSTER: history, locks, queues and the replay cache on a real local Redis
Cluster (three nodes started by the test), including a node restarted mid-run."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from layercode_asgi import (
    ConversationManager,
    RedisConversationStore,
    RedisReplayCache,
    Settings,
    create_app,
)
from layercode_asgi.conversation import HistoryMessage, StoreUnavailableError

from . import redis_fixtures
from .conftest import SECRET, event_body, serve, signed_headers
from .redis_fixtures import RedisClusterNodes, uvicorn_workers, worker_agent
from .test_redis_scale import turns_in_arrival_order

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

redis_cluster = redis_fixtures.redis_cluster
redis_cluster_replicas = redis_fixtures.redis_cluster_replicas

# Braces would end or restart a hash tag: such ids must work all the same.
IDS = ["plain", "a{b", "}x{", "{", "}", "{tag}rest", "ünï{}"]


def cluster_settings(cluster: RedisClusterNodes, **values: object) -> Settings:
    return Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        redis_url=cluster.url,
        redis_cluster=True,
        **values,
    )


async def post_turn(client: httpx.AsyncClient, cid: str, text: str, n: int) -> httpx.Response:
    body = event_body("message", conversation_id=cid, text=text, turn_id=f"t{n}")
    return await client.post("/api/agent", content=body, headers=signed_headers(body))


async def history(cluster: RedisClusterNodes, cid: str) -> list[str]:
    store = RedisConversationStore(cluster.url, cluster=True)
    async with ConversationManager(store) as manager:
        return [f"{m.role}:{m.text}" for m in await manager.get_history(cid)]


async def test_turns_history_replay_and_ready_on_a_cluster(
    redis_cluster: RedisClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    settings = cluster_settings(redis_cluster, replay_protection=True)
    app = create_app(settings, worker_agent)
    with serve(app) as url, anyio.fail_after(60):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.get("/ready")).status_code == 200
            for n in range(3):
                for cid in IDS:
                    response = await post_turn(client, cid, f"turn {n}", n)
                    assert response.status_code == 200, response.text
                    assert f"saw={2 * n} text=turn {n}" in response.text
            # the same signed delivery again: refused, on a cluster too
            body = event_body("message", conversation_id="replayed", text="once")
            headers = signed_headers(body)
            first = await client.post("/api/agent", content=body, headers=headers)
            again = await client.post("/api/agent", content=body, headers=headers)
            assert first.status_code == 200
            assert again.status_code == 409
    # a delivery answered 503 is forgotten (one EVAL on the key's node), on every node
    cache = RedisReplayCache(redis_cluster.url, cluster=True)
    try:
        keys = [f"delivery-{n}" for n in range(8)]
        assert [await cache.seen(key, 5) for key in keys] == [False] * 8
        for key in keys:
            await cache.forget(key)
        assert [await cache.seen(key, 5) for key in keys] == [False] * 8
    finally:
        await cache.aclose()
    for cid in IDS:
        texts = await history(redis_cluster, cid)
        assert len(texts) == 6, cid
        assert texts[0::2] == [f"user:turn {n}" for n in range(3)]
    # the conversations spread over the nodes
    store = RedisConversationStore(redis_cluster.url, cluster=True)
    assert len({redis_cluster.port_of(store.history_key(cid)) for cid in IDS}) > 1
    await store.aclose()
    await without_the_cluster_setting(redis_cluster, caplog)
    await while_a_slot_moves(redis_cluster)


async def while_a_slot_moves(cluster: RedisClusterNodes) -> None:
    """A conversation whose slot is being migrated (``CLUSTER SETSLOT … MIGRATING`` /
    ``IMPORTING``): Redis answers its multi-key scripts TRYAGAIN until the move ends, and
    redis-py gave up with "ClusterError: TTL exhausted." (503, right; the words, not). The
    error now says what happens; once the slot is stable again, the conversation works."""
    store = RedisConversationStore(cluster.url, cluster=True)
    key = store.history_key("moving")
    slot = cluster._cli("-p", str(cluster.ports[0]), "cluster", "keyslot", key).strip()
    source = cluster.port_of(key)
    target = next(port for port in cluster.ports if port != source)
    ids = {port: cluster._cli("-p", str(port), "cluster", "myid").strip() for port in cluster.ports}
    message = HistoryMessage(role="user", text="hi")
    try:
        assert "OK" in cluster._cli(
            "-p", str(target), "cluster", "setslot", slot, "importing", ids[source]
        )
        assert "OK" in cluster._cli(
            "-p", str(source), "cluster", "setslot", slot, "migrating", ids[target]
        )
        with anyio.fail_after(20):
            for attempt in (
                store.lock("moving").__aenter__,
                lambda: store.append("moving", [message]),
            ):
                with pytest.raises(StoreUnavailableError) as failed:
                    await attempt()
                assert "TTL exhausted. (the Redis Cluster is moving a slot of these keys" in str(
                    failed.value
                )
    finally:
        for port in (source, target):
            cluster._cli("-p", str(port), "cluster", "setslot", slot, "stable")
    async with store.lock("moving"):
        await store.append("moving", [message])
    assert [m.text for m in await store.get("moving")] == ["hi"]
    await store.aclose()


async def without_the_cluster_setting(
    cluster: RedisClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """``REDIS_URL`` naming a node of the cluster, ``LAYERCODE_REDIS_CLUSTER`` unset: the
    conversations of the other nodes got 503 (logged as "failed (lock): 9890 127.0.0.1:…",
    redis-py's MOVED reply) while ``/ready`` said 200. Now ``/ready`` says 503 and the log
    names the setting, for the conversation store and for the replay cache."""
    plain = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        redis_url=cluster.url,
        replay_protection=True,
    )
    elsewhere = next(
        cid
        for cid in (f"c{n}" for n in range(100))
        if cluster.port_of(RedisConversationStore(cluster.url).history_key(cid)) != cluster.ports[0]
    )
    caplog.set_level("INFO", logger="layercode_asgi")
    for what, extra in [
        ("conversation store", {}),
        ("replay protection", {"conversations": ConversationManager()}),
    ]:
        caplog.clear()
        with serve(create_app(plain, worker_agent, **extra)) as url, anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                ready = await client.get("/ready")
                assert ready.status_code == 503, (what, ready.text)
                assert ready.json()["error"] == f"{what} unavailable"
                # Another body each time (the same one, signed in the same second, is a replay).
                # A replay key lands on any node (its hash is the signature's): the node of
                # the URL takes it, the others answer MOVED. Of 20, one lands elsewhere.
                statuses = []
                for n in range(1 if what == "conversation store" else 20):
                    turn = await post_turn(client, elsewhere, f"hello {n} from the {what}", 0)
                    statuses.append(turn.status_code)
                    if turn.status_code == 503:
                        break
                assert statuses[-1] == 503 and set(statuses) <= {200, 503}, (what, statuses)
        assert "LAYERCODE_REDIS_CLUSTER" in caplog.text, (what, caplog.text)


async def test_turns_keep_arrival_order_on_a_cluster_with_two_workers(
    redis_cluster: RedisClusterNodes,
) -> None:
    with uvicorn_workers(redis_cluster.url, workers=2, LAYERCODE_REDIS_CLUSTER="true") as url:
        conversations = ["order-a", "order-b{x}", "order-c"]
        await turns_in_arrival_order(url, conversations, redis_cluster.url, cluster=True)


async def test_a_node_restarted_mid_run(
    redis_cluster: RedisClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """While the node serving a conversation is down its turns get 503 with ``Retry-After``
    (and /ready 503; the cause logged, no traceback) and the replay cache refuses its keys,
    while the conversations of the other nodes go on; once it is back they work again, with
    every turn recorded before still there and no lock left behind."""
    store = RedisConversationStore(redis_cluster.url, cluster=True)
    down = redis_cluster.ports[1]
    by_node = {
        port: next(
            f"conv-{n}"
            for n in range(1000)
            if redis_cluster.port_of(store.history_key(f"conv-{n}")) == port
        )
        for port in redis_cluster.ports
    }
    cid, others = by_node[down], [c for p, c in by_node.items() if p != down]
    replay_key = next(
        f"key-{n}"
        for n in range(1000)
        if redis_cluster.port_of(f"layercode:replay:key-{n}") == down
    )
    await store.aclose()
    cache = RedisReplayCache(redis_cluster.url, cluster=True)
    caplog.set_level("INFO", logger="layercode_asgi")
    app = create_app(cluster_settings(redis_cluster), worker_agent)
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with anyio.fail_after(60):
                for n in range(3):
                    assert (await post_turn(client, cid, f"before {n}", n)).status_code == 200
                await cache.ping()
            redis_cluster.stop_node(down)
            with anyio.fail_after(60):
                response = await post_turn(client, cid, "while down", 9)
                assert response.status_code == 503, response.text
                assert "unavailable" in response.json()["error"]
                assert response.headers["retry-after"].isdigit()
                assert (await client.get("/ready")).status_code == 503
                for other in others:  # the other nodes' conversations go on
                    turn = await post_turn(client, other, "elsewhere", 9)
                    assert turn.status_code == 200, (other, turn.text)
                with pytest.raises(StoreUnavailableError):
                    await cache.seen(replay_key, 60)
            assert "Traceback" not in caplog.text
            assert "could not lock the conversation: StoreUnavailableError" in caplog.text
            assert f"conversation={cid} turn=t9 status=503" in caplog.text
            redis_cluster.start_node(down)
            redis_cluster.wait_ok()
            deadline = time.monotonic() + 60
            statuses = []
            while True:  # the client finds the node again
                response = await post_turn(client, cid, "after", 10)
                statuses.append(response.status_code)
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.2)
            assert response.status_code == 200, statuses
            assert (await client.get("/ready")).status_code == 200
            with anyio.fail_after(60):  # the SET refused while down is not a replay
                for _ in range(300):
                    try:
                        assert not await cache.seen(replay_key, 60)
                        break
                    except StoreUnavailableError:
                        await anyio.sleep(0.2)
                assert await cache.seen(replay_key, 60)
    await cache.aclose()
    texts = await history(redis_cluster, cid)
    assert [t for t in texts if t.startswith("user:")] == [
        "user:before 0",
        "user:before 1",
        "user:before 2",
        "user:after",
    ]
    import redis

    admin = redis.Redis(host="127.0.0.1", port=down)
    try:
        assert admin.keys("*lock*") == [] and admin.keys("*queue*") == []
    finally:
        admin.close()


def test_cluster_clients_on_successive_event_loops(redis_cluster: RedisClusterNodes) -> None:
    """Before: the second ``anyio.run`` failed on the first loop's pooled connections."""
    from layercode_asgi.conversation import HistoryMessage
    from layercode_asgi.replay import RedisReplayCache

    store = RedisConversationStore(redis_cluster.url, cluster=True)
    cache = RedisReplayCache(redis_cluster.url, cluster=True)

    async def turn(n: int) -> tuple[list[str], bool]:
        with anyio.fail_after(30):
            await store.ping()
            await cache.ping()
            async with store.lock("loops"):
                history, generation = await store.read_turn("loops")
                assert await store.record_turn(
                    "loops", [HistoryMessage(role="user", text=f"u{n}")], generation
                )
            return [m.text for m in history], await cache.seen("delivery", 60)

    assert anyio.run(turn, 0) == ([], False)
    assert anyio.run(turn, 1) == (["u0"], True)
    assert anyio.run(turn, 2) == (["u0", "u1"], True)
    anyio.run(store.aclose)
    anyio.run(cache.aclose)


@pytest.mark.parametrize(
    ("what", "ready_key"),
    [("conversation store", "layercode:ready"), ("replay protection", "layercode:replay:ready")],
)
async def test_ready_checks_writes_on_every_primary(
    redis_cluster: RedisClusterNodes, what: str, ready_key: str
) -> None:
    """A primary refusing writes (``maxmemory`` with noeviction) other than the one owning
    ``<prefix>ready``: a third of the conversations got 503 while ``/ready`` said 200 (its
    write check ran on that one key's node only)."""
    import redis

    refusing = next(p for p in redis_cluster.ports if p != redis_cluster.port_of(ready_key))
    admin = redis.Redis(host="127.0.0.1", port=refusing)
    replay = what == "replay protection"
    app = create_app(
        cluster_settings(redis_cluster, replay_protection=replay),
        worker_agent,
        **({"conversations": ConversationManager()} if replay else {}),
    )
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        with serve(app) as url, anyio.fail_after(60):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                response = await client.get("/ready")
                assert response.status_code == 503, response.text
                assert response.json()["error"] == f"{what} unavailable"
                admin.config_set("maxmemory", "0")
                assert (await client.get("/ready")).status_code == 200
    finally:
        admin.close()


@pytest.mark.parametrize("how", ["stopped", "failover"])
async def test_a_lock_whose_primary_failed_is_released_once_its_replica_took_over(
    redis_cluster_replicas: RedisClusterNodes, how: str
) -> None:
    """The primary owning a conversation stops while a turn holds its lock: the turn's end
    cannot release it, and the next turn (another process) waited for the rest of
    ``lock_ttl`` (here 300 s) after the replica had taken over, the lock key with it. The
    store retries releasing its own token: the next turn runs once the replica serves. (A
    manual ``CLUSTER FAILOVER`` moves the lock with the slot: released at once.)"""
    cluster = redis_cluster_replicas
    store = RedisConversationStore(cluster.url, cluster=True, lock_ttl=300)
    other = RedisConversationStore(cluster.url, cluster=True, lock_ttl=300)
    try:
        await store.ping()
        await other.ping()  # knows every node, the URL's one included
        cid = next(
            f"conv-{n}"
            for n in range(1000)
            if cluster.port_of(store.lock_key(f"conv-{n}")) != cluster.ports[0]
        )
        primary = cluster.port_of(store.lock_key(cid))
        async with store.lock(cid):
            if how == "stopped":
                cluster.stop_node(primary)
            else:
                cluster.failover(primary)  # the replica serves the slot, the lock with it
        with anyio.fail_after(90):
            for _ in range(300):  # StoreUnavailableError until the replica serves
                try:
                    async with other.lock(cid, timeout=30):
                        break
                except StoreUnavailableError:
                    await anyio.sleep(0.2)
            else:
                pytest.fail("the cluster never served the conversation again")
    finally:
        await store.aclose()
        await other.aclose()


async def test_a_worker_starting_while_its_url_node_is_down(
    redis_cluster_replicas: RedisClusterNodes,
) -> None:
    """As docs/scaling.md says: a store made from ``REDIS_URL`` while that node is down finds
    no other node, even once its replica has taken over; one given a client with several
    startup nodes works."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    cluster = redis_cluster_replicas
    first = cluster.ports[0]
    replica = cluster.replica_of(first)
    cluster.stop_node(first)
    cluster.wait_taken_over(replica)
    with anyio.fail_after(60):
        store = RedisConversationStore(cluster.url, cluster=True)
        with pytest.raises(StoreUnavailableError):
            await store.ping()
        await store.aclose()
        nodes = [ClusterNode("127.0.0.1", port) for port in (first, replica)]
        client = RedisCluster(startup_nodes=nodes, socket_timeout=2, socket_connect_timeout=1)
        store = RedisConversationStore(client)
        await store.ping()
        async with store.lock("after"):
            pass
        await store.aclose()
        await client.aclose()


async def test_the_hand_off_listener_leaves_a_node_that_failed(
    redis_cluster_replicas: RedisClusterNodes,
) -> None:
    """A process's lock hand-offs arrive on one pub/sub channel, subscribed on the node owning
    its slot. Once that primary had stopped (its replica serving), the listener reconnected to
    it for ever: every hand-off of the process waited for the waiters' once-a-second check,
    the conversations of the healthy nodes too. A PUBLISH reaches every node of a cluster:
    the listener now subscribes on another node."""
    cluster = redis_cluster_replicas
    holder = RedisConversationStore(cluster.url, cluster=True)
    waiter = RedisConversationStore(cluster.url, cluster=True)

    def listening() -> list[int]:
        return [
            port
            for port in cluster.ports
            if "wake:" in cluster._cli("-p", str(port), "pubsub", "channels")
        ]

    async def until_listening() -> list[int]:
        for _ in range(300):
            if ports := listening():
                return ports
            await anyio.sleep(0.1)
        pytest.fail("the hand-off listener never subscribed")

    async def enter(cid: str) -> None:
        async with waiter.lock(cid, timeout=30):
            pass

    async def hand_off(cid: str) -> list[int]:
        async with anyio.create_task_group() as tasks, holder.lock(cid, timeout=30):
            tasks.start_soon(enter, cid)
            return await until_listening()  # the waiter queued: its process listens

    try:
        with anyio.fail_after(90):
            [node] = await hand_off("before")
            replica = cluster.replica_of(node)
            cluster.stop_node(node)
            cluster.wait_taken_over(replica)
            assert await until_listening() != [node]
            await hand_off("after")
    finally:
        await holder.aclose()
        await waiter.aclose()
