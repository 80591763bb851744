"""Conversation history: the manager, the bounded memory store, and Redis (a real server)."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import pytest

from layercode_asgi.config import Settings
from layercode_asgi.conversation import (
    ConversationLockTimeout,
    ConversationManager,
    ConversationStore,
    HistoryMessage,
    MemoryConversationStore,
    RedisConversationStore,
    StoreUnavailableError,
    check_conversation_id,
)
from layercode_asgi.errors import ConfigurationError, LayercodeError
from layercode_asgi.logs import escape_log_value

from . import redis_fixtures
from .conftest import BACKENDS
from .redis_fixtures import RedisServer

pytestmark = pytest.mark.anyio

redis_server = redis_fixtures.redis_server

U = "user"
A = "assistant"


def msg(role: Any, text: str, turn_id: str | None = None) -> HistoryMessage:
    return HistoryMessage(role=role, text=text, turn_id=turn_id)


class RecordingStore(MemoryConversationStore):
    """A memory store that records every ``append`` call and whether it was closed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.appends: list[list[HistoryMessage]] = []
        self.closed = False

    async def append(self, conversation_id: str, messages: Sequence[HistoryMessage]) -> None:
        self.appends.append(list(messages))
        await super().append(conversation_id, messages)

    async def aclose(self) -> None:
        self.closed = True


# -- manager ----------------------------------------------------------------------------------


async def test_manager_default_store_and_order() -> None:
    manager = ConversationManager()
    assert isinstance(manager.store, MemoryConversationStore)
    assert isinstance(manager.store, ConversationStore)
    await manager.add_message("c1", {"role": "user", "text": "hi"})
    await manager.add_message("c1", msg(A, "hello", "t1"))
    await manager.add_message("c2", {"role": "assistant", "text": "other", "turn_id": "x"})
    await manager.add_message("c1", {"role": "user", "text": "bye", "extra": "ignored"})
    assert await manager.get_history("c1") == [msg(U, "hi"), msg(A, "hello", "t1"), msg(U, "bye")]
    assert await manager.get_history("c2") == [msg(A, "other", "x")]
    assert await manager.get_history("unknown") == []
    await manager.clear("c1")
    assert await manager.get_history("c1") == []
    assert await manager.get_history("c2") == [msg(A, "other", "x")]


async def test_add_turn_is_one_atomic_append_and_skips_empty() -> None:
    store = RecordingStore()
    manager = ConversationManager(store)
    await manager.add_turn("c", "question", "answer", turn_id="t1")
    assert store.appends == [[msg(U, "question", "t1"), msg(A, "answer", "t1")]]
    await manager.add_turn("c", None, "welcome", turn_id="t0")
    await manager.add_turn("c", "  ", None)
    await manager.add_turn("c", "", "")
    assert store.appends[1:] == [[msg(A, "welcome", "t0")]]
    assert await manager.get_history("c") == [
        msg(U, "question", "t1"),
        msg(A, "answer", "t1"),
        msg(A, "welcome", "t0"),
    ]


async def test_concurrent_turns_stay_paired() -> None:
    manager = ConversationManager()

    async def turn(i: int) -> None:
        await anyio.lowlevel.checkpoint()
        await manager.add_turn("c", f"q{i}", f"a{i}", turn_id=str(i))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(turn, i)
    history = await manager.get_history("c")
    assert len(history) == 100
    for user, assistant in zip(history[::2], history[1::2], strict=True):
        assert (user.role, assistant.role) == (U, A)
        assert user.turn_id == assistant.turn_id


@pytest.mark.parametrize(
    "bad",
    [
        {"role": "system", "text": "x"},
        {"text": "no role"},
        {"role": "user"},
        {"role": "user", "text": 5},
        {"role": "user", "text": "x", "turn_id": 3},
        msg("system", "struct with a bad role"),
    ],
)
async def test_add_message_validates(bad: Any) -> None:
    manager = ConversationManager()
    with pytest.raises(ValueError):
        await manager.add_message("c", bad)
    assert await manager.get_history("c") == []


@pytest.mark.parametrize(
    ("user_text", "assistant_text", "turn_id", "named"),
    [
        (123, None, None, "user_text"),
        ("q", ["a"], None, "assistant_text"),
        (b"q", None, None, "user_text"),
        ("q", "a", 5, "turn_id"),
    ],
)
async def test_add_turn_and_record_turn_refuse_what_is_not_text(
    user_text: Any, assistant_text: Any, turn_id: Any, named: str
) -> None:
    """Before: ``AttributeError: 'int' object has no attribute 'strip'`` (or ``'int' object
    is not subscriptable``), and ``record_turn`` kept ``b"q"`` as the text of a message
    (Redis would have stored it base64-encoded). Now a ``TypeError`` naming the argument."""
    manager = ConversationManager()
    async with manager.lock("c"):
        _, generation = await manager.read_turn("c")
        with pytest.raises(TypeError, match=f"^{named} must be a str or None, got "):
            await manager.record_turn(
                "c", user_text, assistant_text, turn_id=turn_id, generation=generation
            )
    with pytest.raises(TypeError, match=f"^{named} must be a str or None, got "):
        await manager.add_turn("c", user_text, assistant_text, turn_id=turn_id)
    assert await manager.get_history("c") == []


async def test_conversation_id_validated() -> None:
    manager = ConversationManager()
    with pytest.raises(ValueError):
        await manager.get_history("")
    with pytest.raises(ValueError):
        await manager.add_turn("x" * 513, "a", "b")
    with pytest.raises(TypeError):
        await manager.clear(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await manager.add_message("c", ["user", "x"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "store", ["redis://127.0.0.1:6379/0", 42, object()], ids=lambda store: type(store).__name__
)
def test_a_manager_given_something_that_is_not_a_store_names_the_argument(store: Any) -> None:
    """Before: taken; every turn was then a 500 (``'str' object has no attribute 'lock'``),
    ``/ready`` a 503 and the server's shutdown failed on ``aclose``."""
    with pytest.raises(TypeError, match=r"^store must be a ConversationStore") as info:
        ConversationManager(store)
    if isinstance(store, str):
        assert "RedisConversationStore(url)" in str(info.value)
        assert "6379" not in str(info.value)  # a URL may hold a password: not quoted


@pytest.mark.parametrize(
    "conversations", [MemoryConversationStore(), 42], ids=lambda value: type(value).__name__
)
def test_a_webhook_given_a_store_instead_of_a_manager_names_the_argument(
    conversations: Any,
) -> None:
    """Before: a store was taken as ``conversations`` and every turn then failed to record
    (``record_turn() got an unexpected keyword argument 'turn_id'``, logged; the history
    stayed empty); anything else failed on every turn."""
    from layercode_asgi import LayercodeWebhook, create_app

    settings = Settings(env_file=None, environ={}, layercode_webhook_secret="x")
    for build in (
        lambda: LayercodeWebhook(lambda event, context: None, conversations=conversations),
        lambda: create_app(settings, lambda event, context: None, conversations=conversations),
    ):
        with pytest.raises(
            TypeError, match=r"^conversations must be a ConversationManager"
        ) as info:
            build()
        if isinstance(conversations, MemoryConversationStore):
            assert "ConversationManager(store)" in str(info.value)


async def test_manager_async_context_manager_closes_store() -> None:
    store = RecordingStore()
    async with ConversationManager(store) as manager:
        await manager.ping()
        assert not store.closed
    assert store.closed


async def test_from_settings_memory() -> None:
    settings = Settings(
        env_file=None,
        environ={},
        history_max_messages=5,
        history_max_conversations=7,
        turn_timeout=4,
    )
    manager = ConversationManager.from_settings(settings)
    store = manager.store
    assert isinstance(store, MemoryConversationStore)
    # The lock wait: the turn timeout plus the grace (LAYERCODE_LOCK_WAIT_GRACE, 5 s).
    assert (store.max_messages, store.max_conversations, store.lock_timeout) == (5, 7, 9.0)


async def test_from_settings_redis_is_lazy() -> None:
    pytest.importorskip("redis")
    settings = Settings(
        env_file=None,
        environ={"REDIS_URL": "redis://127.0.0.1:1/0", "LAYERCODE_HISTORY_TTL": "0"},
        history_max_messages=9,
    )
    async with ConversationManager.from_settings(settings) as manager:
        store = manager.store
        assert isinstance(store, RedisConversationStore)
        assert (store.max_messages, store.ttl, store.lock_timeout) == (9, None, 35.0)


# -- memory store -----------------------------------------------------------------------------


async def test_memory_message_cap_drops_oldest() -> None:
    store = MemoryConversationStore(max_messages=3)
    for i in range(5):
        await store.append("c", [msg(U, str(i))])
    assert [m.text for m in await store.get("c")] == ["2", "3", "4"]
    await store.append("c", [msg(U, "5"), msg(A, "6")])
    assert [m.text for m in await store.get("c")] == ["4", "5", "6"]


async def test_memory_lru_eviction() -> None:
    store = MemoryConversationStore(max_conversations=3)
    for cid in ("a", "b", "c"):
        await store.append(cid, [msg(U, cid)])
    await store.get("a")  # a read makes "a" recently used: "b" is now the oldest
    await store.append("d", [msg(U, "d")])
    assert len(store) == 3
    assert await store.get("b") == []
    assert [m.text for m in await store.get("a")] == ["a"]
    await store.append("c", [msg(U, "c2")])  # a write counts as use too: "d" is oldest
    await store.append("e", [msg(U, "e")])
    assert await store.get("d") == []
    assert sorted(store._histories) == ["a", "c", "e"]
    await store.append("x", [])  # an empty append creates nothing
    assert "x" not in store._histories


async def test_memory_bounded_under_many_conversation_ids() -> None:
    store = MemoryConversationStore(max_conversations=100, max_messages=2)
    manager = ConversationManager(store)
    for i in range(5000):
        await manager.add_turn(f"conv-{i}", "q", "a")
        await manager.get_history(f"never-stored-{i}")
    assert len(store) == 100
    assert len(store._locks) == 0


async def test_memory_invalid_caps() -> None:
    with pytest.raises(ConfigurationError):
        MemoryConversationStore(max_conversations=0)
    with pytest.raises(ConfigurationError):
        MemoryConversationStore(max_messages=-1)
    with pytest.raises(ConfigurationError):
        MemoryConversationStore(lock_timeout=-1)


async def test_memory_lock_mutual_exclusion() -> None:
    manager = ConversationManager()
    events: list[str] = []
    first_in = anyio.Event()

    async def first() -> None:
        async with manager.lock("c"):
            events.append("first-in")
            first_in.set()
            await anyio.sleep(0.05)
            events.append("first-out")

    async def second() -> None:
        await first_in.wait()
        async with manager.lock("c"):
            events.append("second-in")

    async def other_conversation() -> None:
        await first_in.wait()
        async with manager.lock("other"):  # not blocked by "c"
            events.append("other-in")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(second)
        tg.start_soon(other_conversation)
    assert events.index("first-out") < events.index("second-in")
    assert events.index("other-in") < events.index("first-out")


async def test_memory_lock_table_does_not_grow() -> None:
    store = MemoryConversationStore()
    for i in range(10_000):
        async with store.lock(f"c{i}"):
            assert len(store._locks) == 1
    assert len(store._locks) == 0


async def test_memory_lock_released_when_holder_cancelled() -> None:
    store = MemoryConversationStore()
    with anyio.move_on_after(0.05) as scope:
        async with store.lock("c"):
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert store._locks == {}
    async with store.lock("c", timeout=0.1):
        pass


async def test_memory_lock_waiter_cancelled_cleans_up() -> None:
    store = MemoryConversationStore()
    async with store.lock("c"):
        with anyio.move_on_after(0.02):
            async with store.lock("c", timeout=None):
                pytest.fail("acquired a held lock")
        assert not store._locks["c"].waiters  # the cancelled waiter left the queue
    assert store._locks == {}


async def test_memory_lock_is_first_come_first_served() -> None:
    store = MemoryConversationStore()
    order: list[str] = []
    release = anyio.Event()
    held = anyio.Event()

    async def holder() -> None:
        async with store.lock("c"):
            held.set()
            await release.wait()
            order.append("holder-out")

    async def waiter(name: str) -> None:
        async with store.lock("c", timeout=5):
            order.append(name)
            await anyio.sleep(0.001)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await held.wait()
            for name in ("w0", "w1", "w2", "w3"):
                tg.start_soon(waiter, name)
                await anyio.sleep(0.001)  # each one queues before the next starts
            assert order == []
            assert len(store._locks["c"].waiters or ()) == 4
            release.set()
            await anyio.lowlevel.checkpoint()
            # a newcomer arriving now queues behind the four, it does not overtake them
            tg.start_soon(waiter, "late")
    assert order == ["holder-out", "w0", "w1", "w2", "w3", "late"]
    assert store._locks == {}


async def test_memory_lock_timed_out_waiter_does_not_block_the_next() -> None:
    store = MemoryConversationStore()
    got: list[str] = []

    async def impatient() -> None:
        with pytest.raises(ConversationLockTimeout):
            async with store.lock("c", timeout=0.02):
                got.append("impatient")

    async def patient() -> None:
        async with store.lock("c", timeout=5):
            got.append("patient")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, store.lock("c"):
            tg.start_soon(impatient)
            await anyio.sleep(0.001)
            tg.start_soon(patient)
            await anyio.sleep(0.05)  # the impatient one has given up by now
            assert len(store._locks["c"].waiters or ()) == 1
    assert got == ["patient"]
    assert store._locks == {}


async def test_memory_lock_timeout() -> None:
    store = MemoryConversationStore(lock_timeout=0.05)
    manager = ConversationManager(store)
    async with manager.lock("c"):
        start = time.monotonic()
        with pytest.raises(ConversationLockTimeout) as info:
            async with manager.lock("c"):
                pytest.fail("acquired a held lock")
        assert 0.04 < time.monotonic() - start < 1
        assert isinstance(info.value, LayercodeError)
        assert isinstance(info.value, TimeoutError)
        assert info.value.conversation_id == "c"
        with pytest.raises(ConversationLockTimeout):
            async with manager.lock("c", timeout=0):
                pass
    assert store._locks == {}
    async with manager.lock("c", timeout=0):  # timeout=0 still takes a free lock
        pass


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_memory_a_late_record_by_a_task_of_an_ended_turn_releases_nothing(
    anyio_backend: str,
) -> None:
    """A task a turn started sees the turn's hold; when it records after the turn ended, the
    conversation's next holder keeps its lock (as with Redis, whose release checks a token)."""
    store = MemoryConversationStore()
    go, done = anyio.Event(), anyio.Event()

    async def late(generation: int) -> None:
        await go.wait()
        await store.record_turn("c", [msg(U, "late")], generation)
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with store.lock("c"):
                _, generation = await store.read_turn("c")
                tg.start_soon(late, generation)
            async with store.lock("c"):
                go.set()
                await done.wait()
                with pytest.raises(ConversationLockTimeout):
                    async with store.lock("c", timeout=0):
                        pytest.fail("took the lock the next turn holds")
    assert store._locks == {}


async def test_memory_lock_object_taken_again_is_released_again() -> None:
    """The object ``lock()`` returns may be entered again once left (as before the lock
    could be released by ``record_turn``): each hold is released, recorded or not."""
    store = MemoryConversationStore()
    hold = store.lock("c")
    for recorded in (True, False, False):
        async with hold:
            if recorded:
                await store.record_turn("c", [msg(U, "hi")], 0)
        assert store._locks == {}


# -- redis store (real redis-server) ----------------------------------------------------------


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain redis-py client on the test server, to inspect keys behind the store's back."""
    redis_asyncio: Any = pytest.importorskip("redis.asyncio")
    client = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_append_get_clear(redis_server: RedisServer, raw: Any) -> None:
    async with ConversationManager(RedisConversationStore(redis_server.url)) as manager:
        await manager.ping()
        await manager.add_turn("c1", "hi", "hello", turn_id="t1")
        await manager.add_message("c1", {"role": "user", "text": "ünïcode ✓"})
        await manager.add_message("c2", msg(A, "other"))
        assert await manager.get_history("c1") == [
            msg(U, "hi", "t1"),
            msg(A, "hello", "t1"),
            msg(U, "ünïcode ✓"),
        ]
        assert await manager.get_history("missing") == []
        assert await raw.llen("layercode:{c1}:history") == 3
        await manager.clear("c1")
        assert await manager.get_history("c1") == []
        assert await raw.exists("layercode:{c1}:history") == 0
        assert await manager.get_history("c2") == [msg(A, "other")]


async def test_redis_cap_ttl_and_prefix(redis_server: RedisServer, raw: Any) -> None:
    store = RedisConversationStore(redis_server.url, max_messages=3, ttl=100, key_prefix="app:")
    try:
        for i in range(4):
            await store.append("c", [msg(U, f"q{i}"), msg(A, f"a{i}")])
        assert [m.text for m in await store.get("c")] == ["a2", "q3", "a3"]
        assert await raw.llen("app:{c}:history") == 3
        assert 90 < await raw.ttl("app:{c}:history") <= 100
    finally:
        await store.aclose()
    forever = RedisConversationStore(redis_server.url, ttl=None)
    try:
        await forever.append("p", [msg(U, "x")])
        assert await raw.ttl("layercode:{p}:history") == -1
    finally:
        await forever.aclose()


async def test_redis_ttl_beyond_what_redis_can_expire(redis_server: RedisServer, raw: Any) -> None:
    # LAYERCODE_HISTORY_TTL accepts any integer; Redis refuses an EXPIRE beyond about 9.2e15 s:
    # every turn's record then failed (StoreError), after appending.
    store = RedisConversationStore(redis_server.url, ttl=10**30, max_messages=2)
    try:
        for i in range(3):
            async with store.lock("c"):
                _, generation = await store.read_turn("c")
                assert await store.record_turn("c", [msg(U, f"q{i}")], generation)
        assert [m.text for m in await store.get("c")] == ["q1", "q2"]
        assert await raw.ttl("layercode:{c}:history") > 10**14
    finally:
        await store.aclose()
    # LAYERCODE_HISTORY_MAX_MESSAGES too: LTRIM got -1e+17 ("value is not an integer").
    many = RedisConversationStore(redis_server.url, max_messages=10**17)
    try:
        await many.append("m", [msg(U, "kept")])
        assert [m.text for m in await many.get("m")] == ["kept"]
    finally:
        await many.aclose()


async def test_redis_turn_records_when_the_generation_key_expires_during_it(
    redis_server: RedisServer, raw: Any
) -> None:
    # The generation written by session.end expires a day later (GENERATION_TTL): a turn
    # that read it just before then found "0" when recording, and its exchange was lost.
    store = RedisConversationStore(redis_server.url)
    try:
        await store.clear("c")  # session.end: generation 1
        key = store.generation_key("c")
        # A day later, 500 ms before it expires (room for the lock and the read on a busy
        # machine: if it expired before the read, the turn would read generation 0).
        await raw.pexpire(key, 500)
        async with store.lock("c"):
            _, generation = await store.read_turn("c")
            assert generation == 1
            await anyio.sleep(0.6)  # the turn runs past the old expiry
            assert await store.record_turn("c", [msg(U, "kept")], generation)
        assert [m.text for m in await store.get("c")] == ["kept"]
        _, generation = await store.read_turn("c")  # a read by anyone but the holder too
        assert await raw.ttl(key) > 3600
    finally:
        await store.aclose()


async def test_redis_skips_undecodable_entries(
    redis_server: RedisServer, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisConversationStore(raw)
    await store.append("c", [msg(U, "ok")])
    await raw.rpush("layercode:{c}:history", b"not json", b'{"role":"system","text":"x"}')
    with caplog.at_level(logging.WARNING, logger="layercode_asgi.conversation"):
        assert await store.get("c") == [msg(U, "ok")]
    assert "undecodable" in caplog.text
    await store.aclose()  # does not close a client it did not create
    assert await raw.ping() is True


async def test_a_redis_history_over_the_bounds_is_read_within_them(
    redis_server: RedisServer, raw: Any
) -> None:
    """History kept under larger bounds (before ``LAYERCODE_HISTORY_MAX_BYTES`` or
    ``_MAX_MESSAGES`` were lowered, by a worker still run with the old ones, or written by
    hand) was read whole: each turn sent all of it to the model until a record trimmed it.
    A read keeps what a record would: the newest messages within both bounds, as the memory
    store keeps them."""
    said = [msg(U if i % 2 else A, f"{i:02d}é" * 10, f"t{i}") for i in range(20)]  # 40 B each
    wide = RedisConversationStore(raw, max_messages=100, max_bytes=10_000)
    await wide.append("c", said)
    await raw.rpush("layercode:{h}:history", msgspec.json.encode(msg(U, "€" * 500, "x" * 600)))
    memory = MemoryConversationStore(max_messages=5, max_bytes=130)
    await memory.append("c", said)
    await memory.append("h", [msg(U, "€" * 500, "x" * 600)])
    expected = await memory.get("c")
    assert [m.turn_id for m in expected] == ["t17", "t18", "t19"]
    narrow = RedisConversationStore(raw, max_messages=5, max_bytes=130)
    assert await narrow.get("c") == expected
    assert (await narrow.read_turn("c"))[0] == expected
    async with narrow.lock("c"):  # the holder's read, taken with the lock
        assert (await narrow.read_turn("c"))[0] == expected
    assert await narrow.get("h") == await memory.get("h") == [msg(U, "€" * 43, "x" * 512)]
    assert [m.text for m in await ConversationManager(narrow).get_history("c")] == [
        m.text for m in expected
    ]


@pytest.mark.parametrize("max_bytes", [1, 2, 3])
def test_a_byte_bound_below_a_character_is_refused(max_bytes: int) -> None:
    """Before: taken, and a message whose first character is longer (``"é"`` is 2 bytes, an
    emoji 4) was kept as an empty text, by both stores."""
    pytest.importorskip("redis")
    with pytest.raises(ConfigurationError, match=r"^max_bytes must be an integer >= 4 \("):
        MemoryConversationStore(max_bytes=max_bytes)
    with pytest.raises(ConfigurationError, match=r"^max_bytes must be an integer >= 4 \("):
        RedisConversationStore("redis://127.0.0.1:1/0", max_bytes=max_bytes)


async def test_the_smallest_byte_bound_keeps_a_character(raw: Any) -> None:
    stores = (MemoryConversationStore(max_bytes=4), RedisConversationStore(raw, max_bytes=4))
    for store in stores:
        await store.append("c1", [msg(U, "😀x")])
        await store.append("c2", [msg(A, "é€")])
        assert await store.get("c1") == [msg(U, "😀")]
        assert await store.get("c2") == [msg(A, "é")]


async def test_redis_lock_excludes_another_client(redis_server: RedisServer) -> None:
    a = RedisConversationStore(redis_server.url)
    b = RedisConversationStore(redis_server.url)
    events: list[str] = []
    a_in = anyio.Event()

    async def holder() -> None:
        async with a.lock("c"):
            events.append("a-in")
            a_in.set()
            await anyio.sleep(0.15)
            events.append("a-out")

    async def waiter() -> None:
        await a_in.wait()
        async with b.lock("c", timeout=5):
            events.append("b-in")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            tg.start_soon(waiter)
        assert events == ["a-in", "a-out", "b-in"]
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_lock_ttl_extended_while_held(redis_server: RedisServer, raw: Any) -> None:
    a = RedisConversationStore(redis_server.url, lock_ttl=0.3)
    b = RedisConversationStore(redis_server.url, lock_ttl=0.3)
    try:
        async with a.lock("c"):
            start = time.monotonic()
            with pytest.raises(ConversationLockTimeout):
                async with b.lock("c", timeout=1.0):
                    pytest.fail("acquired a lock held (and extended) by another client")
            assert time.monotonic() - start >= 0.95  # > 3 lock TTLs
            assert 0 < await raw.pttl("layercode:{c}:lock") <= 300
        assert await raw.exists("layercode:{c}:lock") == 0
        async with b.lock("c", timeout=0):
            pass
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_release_never_deletes_a_foreign_lock(
    redis_server: RedisServer, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisConversationStore(redis_server.url, lock_ttl=0.15)
    try:
        with caplog.at_level(logging.WARNING, logger="layercode_asgi.conversation"):
            async with store.lock("c"):
                # Our lock "expired" and another process took it.
                await raw.set("layercode:{c}:lock", "foreign-token", px=10_000)
                for _ in range(500):  # bounded (5 s): until the keep-alive notices
                    if "lost the lock" in caplog.text:
                        break
                    await anyio.sleep(0.01)
        assert await raw.get("layercode:{c}:lock") == b"foreign-token"
        assert 9000 < await raw.pttl("layercode:{c}:lock") <= 10_000  # not extended by us
        assert "lost the lock" in caplog.text
    finally:
        await store.aclose()


async def test_redis_lock_timeout(redis_server: RedisServer, raw: Any) -> None:
    store = RedisConversationStore(redis_server.url, lock_timeout=0.2)
    await raw.set("layercode:{c}:lock", "someone-else")
    try:
        start = time.monotonic()
        with pytest.raises(ConversationLockTimeout) as info:
            async with store.lock("c"):
                pytest.fail("acquired a held lock")
        assert 0.19 < time.monotonic() - start < 2
        assert "'c'" in str(info.value)
        assert await raw.get("layercode:{c}:lock") == b"someone-else"
    finally:
        await store.aclose()


async def test_redis_lock_released_when_holder_cancelled(
    redis_server: RedisServer, raw: Any
) -> None:
    store = RedisConversationStore(redis_server.url)
    try:
        with anyio.move_on_after(0.1) as scope:
            async with store.lock("c"):
                assert await raw.exists("layercode:{c}:lock") == 1
                await anyio.sleep(10)
        assert scope.cancelled_caught
        assert await raw.exists("layercode:{c}:lock") == 0
        # The holder's exception comes out as itself (not wrapped in an ExceptionGroup).
        with pytest.raises(RuntimeError, match="boom") as info:
            async with store.lock("c"):
                raise RuntimeError("boom") from KeyError("cause")
        assert isinstance(info.value.__cause__, KeyError)
        assert info.value.__context__ is None
        assert await raw.exists("layercode:{c}:lock") == 0
    finally:
        await store.aclose()


async def test_redis_down_fails_fast_then_recovers(redis_server: RedisServer) -> None:
    store = RedisConversationStore(redis_server.url)
    manager = ConversationManager(store)
    await manager.add_turn("c", "before", "outage")
    redis_server.stop()

    async def lock_once() -> None:
        async with manager.lock("c", timeout=10):
            pytest.fail("locked while Redis is down")

    operations: dict[str, Any] = {
        "ping": manager.ping,
        "get": lambda: manager.get_history("c"),
        "append": lambda: manager.add_message("c", {"role": "user", "text": "x"}),
        "clear": lambda: manager.clear("c"),
        "lock": lock_once,
    }
    for name, operation in operations.items():
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            await operation()
        assert time.monotonic() - start < 5, f"{name} did not fail fast"
        assert f"127.0.0.1:{redis_server.port}" in str(info.value)
        assert isinstance(info.value, LayercodeError)

    redis_server.start()  # same port, empty data (no persistence)
    await manager.ping()
    assert await manager.get_history("c") == []
    await manager.add_turn("c", "after", "restart")
    assert [m.text for m in await manager.get_history("c")] == ["after", "restart"]
    async with manager.lock("c", timeout=1):
        pass
    await manager.aclose()


async def test_redis_unresponsive_times_out_then_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisConversationStore(redis_server.url, socket_timeout=0.3, lock_ttl=1)
    # operation_timeout first: the error said "TimeoutError: " and nothing after it
    quick = RedisConversationStore(redis_server.url, operation_timeout=0.3, lock_ttl=1)
    try:
        await store.append("c", [msg(U, "hi")])
        redis_server.pause()
        try:
            for operation in (store.ping, lambda: store.get("c")):
                start = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="Timeout"):
                    await operation()
                assert time.monotonic() - start < 1.5
            with pytest.raises(StoreUnavailableError) as failed:
                await quick.get("c")
            assert str(failed.value).endswith("(get): TimeoutError: no answer within 0.3 s")
            with (
                caplog.at_level(logging.DEBUG, "layercode_asgi"),
                pytest.raises(StoreUnavailableError),
            ):
                async with quick.lock("c"):
                    pytest.fail("locked while Redis is frozen")
            assert "within 1 s): TimeoutError: no answer within 0.3 s" in caplog.text
        finally:
            redis_server.resume()
        assert await store.get("c") == [msg(U, "hi")]
    finally:
        await store.aclose()
        await quick.aclose()


async def test_redis_ping_of_a_non_redis_server_is_unavailable() -> None:
    pytest.importorskip("redis")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def answer_http() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        store = RedisConversationStore(f"redis://127.0.0.1:{port}")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, answer_http)
                with pytest.raises(StoreUnavailableError):
                    await store.ping()
        finally:
            await store.aclose()


async def test_redis_invalid_arguments() -> None:
    pytest.importorskip("redis")
    with pytest.raises(ConfigurationError):
        RedisConversationStore("redis://localhost", max_messages=0)
    with pytest.raises(ConfigurationError):
        RedisConversationStore("redis://localhost", lock_ttl=0)
    with pytest.raises(ConfigurationError):
        RedisConversationStore("redis://localhost", ttl=-1)
    for name in ("lock_ttl", "socket_timeout", "socket_connect_timeout", "operation_timeout"):
        for value in (float("nan"), float("inf"), True, -1):
            with pytest.raises(ConfigurationError, match=f"{name} must be a finite number > 0"):
                RedisConversationStore("redis://localhost", **{name: value})
    with pytest.raises(ConfigurationError, match="lock timeout must be a finite number >= 0"):
        RedisConversationStore("redis://localhost", lock_timeout=float("inf"))
    with pytest.raises(ConfigurationError, match="invalid Redis URL"):
        RedisConversationStore("http://user:pw@localhost")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://u:s3cret@127.0.0.1:7000/3", "Redis Cluster has only database 0"),
        ("redis://:s3cret@127.0.0.1:7000/?db=2", "Redis Cluster has only database 0"),
        ("unix://:s3cret@/tmp/redis.sock", "a unix socket, which Redis Cluster does not"),
        ("redis://:s3cret@/0", "names no host"),
    ],
)
def test_a_cluster_url_that_redis_cluster_cannot_use_is_refused(url: str, problem: str) -> None:
    """A database other than 0, a unix socket, no host: a ConfigurationError naming the
    problem, password masked (the store, the replay cache and create_app alike)."""
    pytest.importorskip("redis")
    from layercode_asgi import create_app
    from layercode_asgi.replay import RedisReplayCache

    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret="x", redis_url=url, redis_cluster=True
    )
    for build in (
        lambda: RedisConversationStore(url, cluster=True),
        lambda: RedisReplayCache(url, cluster=True),
        lambda: create_app(settings, lambda event, context: None),
    ):
        with pytest.raises(ConfigurationError, match=problem) as info:
            build()
        assert "s3cret" not in str(info.value) and ":***@" in str(info.value)
    RedisConversationStore("redis://127.0.0.1:7000/0", cluster=True)  # database 0 is fine


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://user:s3cret@localhost", "scheme must be redis://, rediss:// or unix://"),
        ("127.0.0.1:6379", "scheme must be redis://, rediss:// or unix://"),
        ("redis://:s3cret@127.0.0.1:6379/abc", "the database (its path) is not a number"),
        ("rediss://u:s3cret@127.0.0.1:6379/1x", "the database (its path) is not a number"),
        ("redis://:s3/cret@127.0.0.1:6379/0", "the database (its path) is not a number"),
        ("redis://:s3cret@127.0.0.1:65536/0", "(its port a number from 0 to 65535)"),
        ("redis://:1234567#s3cret@127.0.0.1/0", "(percent-encode special characters"),
    ],
)
def test_a_redis_url_with_a_bad_scheme_or_database_says_so(url: str, problem: str) -> None:
    """Before: a bad scheme (and a port out of range) was "invalid Redis URL (percent-encode
    special characters in the password ...)", and a database that is not a number silently
    meant database 0."""
    pytest.importorskip("redis")
    from layercode_asgi.replay import RedisReplayCache

    for make in (RedisConversationStore, RedisReplayCache):
        with pytest.raises(ConfigurationError, match=re.escape(problem)) as info:
            make(url)
        assert "s3cret" not in str(info.value)
    for fine in ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "rediss://h:1/15"):
        RedisConversationStore(fine)
    RedisConversationStore("unix:///tmp/redis.sock?db=2")  # a unix path is no database


@pytest.mark.parametrize("value", [None, 42, b"redis://127.0.0.1:6379", ["redis://h"]])
def test_a_redis_store_given_neither_a_url_nor_a_client_names_the_argument(value: Any) -> None:
    """Before: ``AttributeError: 'NoneType' object has no attribute 'register_script'`` from
    the store, and the replay cache took it and answered 503 to every webhook."""
    pytest.importorskip("redis")
    from layercode_asgi.replay import RedisReplayCache

    for make in (RedisConversationStore, RedisReplayCache):
        with pytest.raises(TypeError, match=r"^url_or_client must be a Redis URL"):
            make(value)


def test_a_redis_store_given_a_synchronous_client_names_the_argument() -> None:
    """Before: taken, then every operation failed with ``object list can't be used in
    'await' expression`` (``/ready`` 503, a turn's lock a TypeError)."""
    redis = pytest.importorskip("redis")
    from layercode_asgi.replay import RedisReplayCache

    client = redis.Redis.from_url("redis://127.0.0.1:1/0")
    for make in (RedisConversationStore, RedisReplayCache):
        with pytest.raises(TypeError, match=r"^url_or_client must be .* redis\.asyncio client"):
            make(client)
    client.close()


async def test_redis_store_without_the_redis_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigurationError, match=r"pip install '\./layercode-asgi\[redis\]'"):
        RedisConversationStore("redis://localhost")
    ConversationManager()  # the memory store needs nothing


@pytest.mark.anyio
async def test_redis_burst_larger_than_the_pool_waits_instead_of_failing() -> None:
    """Found by the soak: 200 conversations at once exhausted redis-py's default pool."""
    from layercode_asgi.conversation import ConversationManager, RedisConversationStore

    with redis_fixtures.running_redis() as server:
        store = RedisConversationStore(server.url, max_connections=2)
        async with ConversationManager(store) as history:
            results: list[int] = []

            async def one(i: int) -> None:
                async with history.lock(f"burst-{i}"):
                    await history.add_turn(f"burst-{i}", f"u{i}", f"a{i}")
                    results.append(len(await history.get_history(f"burst-{i}")))

            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(one, i)
    assert results == [2] * 40


async def test_lock_timeout_nan_is_refused() -> None:
    # NaN passed the ">= 0" check before (nan < 0 is False) and reached the lock's deadline.
    with pytest.raises(ConfigurationError, match="nan"):
        MemoryConversationStore(lock_timeout=float("nan"))
    manager = ConversationManager()
    with pytest.raises(ConfigurationError, match="nan"):
        async with manager.lock("c", timeout=float("nan")):
            pass


@pytest.mark.parametrize(
    "value", [float("inf"), True, "5", -1, pytest.param(10**400, id="10**400")]
)
async def test_lock_timeout_must_be_a_finite_number(value: Any) -> None:
    # One duration rule for the whole library (errors.check_seconds): None waits forever;
    # infinity, a bool or a string was accepted before; an int beyond a float's range
    # raised OverflowError.
    with pytest.raises(ConfigurationError, match="lock timeout must be a finite number >= 0"):
        MemoryConversationStore(lock_timeout=value)
    with pytest.raises(ConfigurationError, match="lock timeout must be a finite number >= 0"):
        async with ConversationManager().lock("c", timeout=value):
            pass


async def test_lock_wait_beyond_any_float_means_no_limit() -> None:
    # Two huge but finite settings add up to infinity, which the lock's own check refuses:
    # every turn would then fail at its lock. The sum is "no limit" instead.
    from layercode_asgi.conversation import lock_wait_timeout

    assert lock_wait_timeout(1e308, 1e308) is None
    assert lock_wait_timeout(30.0, 5.0) == 35.0
    manager = ConversationManager()
    async with manager.lock("c", timeout=lock_wait_timeout(1e308, 1e308)):
        pass


async def test_a_turn_not_recorded_because_redis_is_down_logs_one_line(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopping during a turn: one warning naming the error, no traceback; an
    unexpected exception of a store keeps its traceback."""
    import httpx

    from layercode_asgi import LayercodeWebhook

    from .conftest import event_body

    async def agent(event: Any, context: Any) -> AsyncIterator[str]:
        yield "hello"
        redis_server.stop()  # Redis goes away while the turn runs: recording fails
        yield " world"

    class Broken(MemoryConversationStore):
        async def record_turn(self, *args: Any) -> bool:
            raise RuntimeError("a bug")

    stores = [RedisConversationStore(redis_server.url, operation_timeout=2), Broken()]
    for store in stores:
        async with ConversationManager(store) as manager:
            webhook = LayercodeWebhook(agent, conversations=manager)
            transport = httpx.ASGITransport(app=webhook)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                with caplog.at_level(logging.INFO, "layercode_asgi"), anyio.fail_after(30):
                    response = await client.post("/", content=event_body(text="hi"))
            assert response.status_code == 200 and "response.end" in response.text
    redis_failure, bug = [r for r in caplog.records if "record" in r.getMessage()]
    assert redis_failure.getMessage().startswith("turn may not have been recorded")
    assert bug.getMessage().startswith("could not record turn")
    assert redis_failure.levelno == logging.WARNING and redis_failure.exc_info is None
    assert "StoreUnavailableError: Redis at redis://127.0.0.1:" in redis_failure.getMessage()
    assert bug.levelno == logging.ERROR and bug.exc_info is not None


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        ("oom", "command not allowed when used memory > 'maxmemory'"),
        ("readonly", "You can't write against a read only replica"),
    ],
)
async def test_a_turn_redis_refused_to_record_logs_why_and_the_next_turn_records(
    redis_server: RedisServer,
    raw: Any,
    caplog: pytest.LogCaptureFixture,
    failure: str,
    cause: str,
) -> None:
    """Redis refusing writes mid-turn (full, or made a replica): the turn is answered, its
    record is lost with one warning that says why (Redis's reason was masked as the password
    of the store's URL: "Redis at redis://127.0.0.1:***@user_script:24."), and once Redis
    takes writes again the next turn records."""
    import httpx

    from layercode_asgi import LayercodeWebhook

    from .conftest import event_body, free_port

    async def refuse() -> None:
        if failure == "oom":
            await raw.config_set("maxmemory-policy", "noeviction")
            await raw.config_set("maxmemory", 1)
        else:
            await raw.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))

    async def agent(event: Any, context: Any) -> AsyncIterator[str]:
        if event.turn_id == "t1":
            await refuse()
        yield "said"

    async with ConversationManager(RedisConversationStore(redis_server.url)) as manager:
        webhook = LayercodeWebhook(agent, conversations=manager)
        transport = httpx.ASGITransport(app=webhook)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            try:
                with caplog.at_level(logging.WARNING, "layercode_asgi"), anyio.fail_after(30):
                    first = await client.post("/", content=event_body(text="hi", turn_id="t1"))
            finally:
                await raw.config_set("maxmemory", 0)
                await raw.execute_command("REPLICAOF", "NO", "ONE")
            with anyio.fail_after(30):
                second = await client.post("/", content=event_body(text="hey", turn_id="t2"))
        assert first.status_code == second.status_code == 200
        assert [m.text for m in await manager.get_history("conv-1")] == ["hey", "said"]
    (line,) = [r.getMessage() for r in caplog.records if "could not record turn" in r.getMessage()]
    assert cause in line, line


@pytest.mark.parametrize("ended", [False, True], ids=["lock-exit", "record-turn-no-messages"])
async def test_redis_lock_release_failures_say_what_happened(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, ended: bool
) -> None:
    """A turn that never got the lock (Redis down: the caller gets the error) logs no
    warning of a lock to release; a holder that cannot release says whose lock it is and
    that it frees itself within ``lock_ttl``, once: also when it ended with ``record_turn``
    of no messages (a turn with nothing to record), which tried, then leaving the lock
    tried again (two warnings, two background retries)."""
    store = RedisConversationStore(redis_server.url, lock_ttl=4)
    held = "held\x1b"
    try:
        with caplog.at_level(logging.DEBUG, "layercode_asgi"):
            async with store.lock(held):
                _, generation = await store.read_turn(held)
                redis_server.stop()
                if ended:
                    assert await store.record_turn(held, [], generation) is True
            with pytest.raises(StoreUnavailableError):
                async with store.lock("never-held"):
                    pytest.fail("locked while Redis is down")
    finally:
        await store.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        f"could not release the lock of conversation {escape_log_value(held)} "
        "(it frees itself within 4 s): ConnectionError: "
    )


async def test_redis_lock_hand_off_listener_logs_its_failure_escaped(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The pub/sub listener of a waiting turn that cannot connect logs why at debug level,
    escaped like every other line (here a unix socket path holding an ESC character)."""
    redis_asyncio = pytest.importorskip("redis.asyncio")
    with redis_fixtures.running_redis(unix_socket=True) as server:
        assert server.socket is not None
        link = tmp_path / "r\x1b.sock"
        link.symlink_to(server.socket)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = redis_asyncio.Redis(unix_socket_path=str(link), retry=Retry(NoBackoff(), 0))
        raw = redis_asyncio.Redis.from_url(server.url)
        store = RedisConversationStore(client, lock_ttl=60)

        async def wait() -> None:  # fails too once its connection is gone: no matter
            with contextlib.suppress(LayercodeError):
                async with store.lock("c", timeout=None):
                    pass

        lines: list[str] = []
        try:
            with (
                caplog.at_level(logging.DEBUG, "layercode_asgi.conversation"),
                anyio.fail_after(10),
            ):
                async with store.lock("c"), anyio.create_task_group() as tg:
                    tg.start_soon(wait)
                    for _ in range(1000):  # until the listener subscribed (bounded)
                        if await raw.execute_command("CLIENT LIST TYPE pubsub"):
                            break
                        await anyio.sleep(0.01)
                    link.unlink()  # then its connection is cut: it cannot connect again
                    await raw.execute_command("CLIENT KILL TYPE pubsub")
                    while not any(".sock" in line for line in lines):
                        await anyio.sleep(0.01)
                        lines = [r.getMessage() for r in caplog.records if "hand-off" in r.msg]
                    tg.cancel_scope.cancel()
        finally:
            await store.aclose()
            await client.aclose()
            await raw.aclose()
    line = next(line for line in lines if ".sock" in line)
    assert line.startswith("lock hand-off listener: ConnectionError: "), line
    assert "\x1b" not in line and escape_log_value(str(link)) in line


async def test_redis_lock_a_turn_could_not_release_is_released_once_redis_takes_writes(
    redis_server: RedisServer, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A turn ending while Redis refused writes (READONLY, as during a failover; a lost
    connection alike) left its conversation locked for the rest of ``lock_ttl`` (here
    300 s) after Redis took writes again: the next turn waited for it. The store retries
    releasing its own token, so the next turn gets the lock once Redis takes writes."""
    from .conftest import free_port

    store = RedisConversationStore(redis_server.url, lock_ttl=300)
    other = RedisConversationStore(redis_server.url, lock_ttl=300)
    try:
        with caplog.at_level(logging.WARNING, "layercode_asgi"):
            async with store.lock("c"):
                await raw.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        assert "could not release the lock of conversation c" in caplog.text
        assert await raw.exists("layercode:{c}:lock") == 1
        await raw.execute_command("REPLICAOF", "NO", "ONE")
        with anyio.fail_after(60):
            async with other.lock("c", timeout=20):
                assert await raw.exists("layercode:{c}:lock") == 1  # now the other's
    finally:
        await raw.execute_command("REPLICAOF", "NO", "ONE")
        await store.aclose()
        await other.aclose()


async def test_redis_a_lock_taken_after_its_turn_gave_up_is_released(
    redis_server: RedisServer,
) -> None:
    """Redis too slow to answer a turn's lock (the turn gave up: 503) took the lock once it
    could, and leaving the queue had failed too: the conversation stayed locked for the whole
    ``lock_ttl`` (here 300 s) with no turn running. Leaving is retried once Redis answers."""
    store = RedisConversationStore(
        redis_server.url, socket_timeout=0.3, operation_timeout=0.5, lock_ttl=300
    )
    other = RedisConversationStore(redis_server.url, lock_ttl=300)
    try:
        async with store.lock("warm"):  # the scripts loaded, a connection open
            pass
        redis_server.pause()
        try:
            with pytest.raises(StoreUnavailableError):
                async with store.lock("c", timeout=5):
                    pytest.fail("locked while Redis is frozen")
        finally:
            redis_server.resume()
        with anyio.fail_after(30):
            async with other.lock("c", timeout=5):
                pass
    finally:
        await store.aclose()
        await other.aclose()


async def test_a_record_redis_answered_too_late_is_logged_as_maybe_lost(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis frozen while a turn records: the record timed out and was logged as "could not
    record turn", but Redis ran it once it woke (the turn was recorded, releasing the lock);
    the retried release then logged "released the lock of conversation" though the lock was
    not its to release any more. Now the first says the turn may not have been recorded,
    and the second is not said."""
    import httpx

    from layercode_asgi import LayercodeWebhook

    from .conftest import event_body

    async def agent(event: Any, context: Any) -> AsyncIterator[str]:
        yield "hello"
        if event.conversation_id == "conv-1":
            redis_server.pause()

    store = RedisConversationStore(
        redis_server.url, socket_timeout=0.3, operation_timeout=0.5, lock_ttl=5
    )
    async with ConversationManager(store) as manager:
        webhook = LayercodeWebhook(agent, conversations=manager)
        transport = httpx.ASGITransport(app=webhook)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with caplog.at_level(logging.DEBUG, "layercode_asgi"), anyio.fail_after(30):
                # the scripts loaded (a frozen Redis would get their SHA only)
                await client.post("/", content=event_body(text="hi", conversation_id="warm"))
                async with manager.lock("warm"):
                    pass
                try:
                    response = await client.post("/", content=event_body(text="hi"))
                finally:
                    redis_server.resume()
                assert response.status_code == 200 and "response.end" in response.text
                for _ in range(200):  # the release is retried in the background
                    if "released" in caplog.text:
                        break
                    await anyio.sleep(0.05)
                assert [m.text for m in await manager.get_history("conv-1")] == ["hi", "hello"]
    lines = [r.getMessage() for r in caplog.records]
    (record,) = [line for line in lines if "recorded" in line or "record turn" in line]
    assert record.startswith("turn may not have been recorded (conversation=conv-1"), record
    assert "the lock of conversation conv-1 was released already" in caplog.text, lines
    assert "released the lock of conversation" not in caplog.text, lines


async def test_redis_a_turn_across_a_restart_that_lost_the_data_is_recorded(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted without persistence during a turn of a conversation ended once
    before (generation 1): the turn was dropped, logged as "conversation ended during the
    turn", though nothing ended it (a clear leaves its generation behind; here it was
    lost with the rest). A generation that is gone no longer refuses the record."""
    store = RedisConversationStore(redis_server.url)
    said = [msg(U, "said across the restart")]
    try:
        await store.clear("c")
        async with store.lock("c"):
            _, generation = await store.read_turn("c")
            assert generation == 1
            redis_server.stop()
            redis_server.start()  # same port, empty data
            assert await store.record_turn("c", said, generation)
        assert await store.get("c") == said
        async with store.lock("c"):  # the lock was released with the record
            _, generation = await store.read_turn("c")
            await store.clear("c")  # a real end still wins over a turn running then
            assert not await store.record_turn("c", said, generation)
        assert await store.get("c") == []
    finally:
        await store.aclose()


async def test_lone_surrogates_are_kept_as_u_fffd_by_both_stores(redis_server: RedisServer) -> None:
    """Python text UTF-8 cannot hold (a lone surrogate: half an emoji) is recorded with
    U+FFFD in its place, by both stores alike (Redis refused the whole turn); a pair
    becomes its character. A conversation id holding one is refused by both."""
    said = msg(U, "half \ud83d emoji \ud83d\ude00", "t\udc00")
    kept = msg(U, "half \ufffd emoji \U0001f600", "t\ufffd")
    for store in (MemoryConversationStore(), RedisConversationStore(redis_server.url)):
        async with ConversationManager(store) as manager:
            await manager.add_message("c", said)
            async with manager.lock("c"):
                _, generation = await manager.read_turn("c")
                await manager.record_turn("c", said.text, None, generation=generation)
            assert await manager.get_history("c") == [kept, msg(U, kept.text)]
            with pytest.raises(ValueError, match="conversation_id is not valid text"):
                await manager.add_message("c\ud83d", said)


async def test_a_long_turn_id_is_kept_cut_by_both_stores(redis_server: RedisServer) -> None:
    """A turn id is not text the byte bound counts: a signed webhook's 1 MB ``turn_id`` was
    kept whole with each message (100 turns: 100 MB for one conversation, far past the
    documented bound); both stores keep its first 512 characters, as an id's limit."""
    long_id = "t" * 600_000
    for store in (MemoryConversationStore(), RedisConversationStore(redis_server.url)):
        async with ConversationManager(store) as manager:
            await manager.add_turn("c", "hi", "hello", turn_id=long_id)
            async with manager.lock("c"):
                _, generation = await manager.read_turn("c")
                await manager.record_turn(
                    "c", "again", None, turn_id=long_id, generation=generation
                )
            history = await manager.get_history("c")
            assert [m.turn_id for m in history] == [long_id[:512]] * 3
            await manager.clear("c")


#: Every store method that takes a conversation id, with the rest of its arguments.
STORE_CALLS = [
    ("get", ()),
    ("append", ([msg(U, "hi")],)),
    ("read_turn", ()),
    ("record_turn", ([msg(U, "hi")], 0)),
    ("clear", ()),
]


async def test_the_redis_store_used_directly_refuses_a_lone_surrogate_id(
    redis_server: RedisServer,
) -> None:
    """Before: redis-py's UnicodeEncodeError when it encoded the key; now the ValueError the
    manager raises (a webhook answers 400). ``{`` in the id takes the hashed key path."""
    store = RedisConversationStore(redis_server.url)
    refused = pytest.raises(ValueError, match=r"^conversation_id is not valid text")
    try:
        for bad in ("c\ud83d", "{c\udc00}"):
            for name, args in STORE_CALLS:
                with refused:
                    await getattr(store, name)(bad, *args)
            with refused:
                async with store.lock(bad):
                    pass
            with refused:
                store.history_key(bad)
        await store.append("c\U0001f600", [msg(U, "hi")])  # a whole emoji is fine
        assert await store.get("c\U0001f600") == [msg(U, "hi")]
    finally:
        await store.aclose()


@pytest.fixture(params=["memory", "redis"])
async def either_store(request: pytest.FixtureRequest) -> AsyncIterator[ConversationStore]:
    """Each built-in store in turn (a fresh ``redis-server`` for the Redis one)."""
    if request.param == "memory":
        yield MemoryConversationStore()
        return
    with redis_fixtures.running_redis() as server:
        store = RedisConversationStore(server.url)
        try:
            yield store
        finally:
            await store.aclose()


@pytest.mark.parametrize(
    "bad",
    ["", "x" * 513, "c\ud83d", "{c\udc00}", None, 42, b"conv", ("c",), ["c"]],
    ids=lambda bad: repr(bad)[:12],
)
async def test_both_stores_used_directly_refuse_the_same_ids(
    either_store: ConversationStore, bad: Any
) -> None:
    """Before: the memory store kept anything hashable as an id (an empty one, 10 kB, a
    lone surrogate, ``None``...) while the Redis store refused some of these and failed on
    others with a bare ``TypeError`` from building its keys; both now refuse what
    ``ConversationManager`` refuses, through the one check (``check_conversation_id``)."""
    store: Any = either_store
    try:
        check_conversation_id(bad)
    except (TypeError, ValueError) as exc:
        expected = type(exc)
    else:  # pragma: no cover - every case is refused
        raise AssertionError(f"{bad!r} is accepted")
    for name, args in STORE_CALLS:
        with pytest.raises(expected):
            await getattr(store, name)(bad, *args)
    with pytest.raises(expected):
        async with store.lock(bad):
            pass
    manager = ConversationManager(store)  # which leaves the check to a built-in store
    with pytest.raises(expected):
        await manager.read_turn(bad)
    with pytest.raises(expected):
        async with manager.lock(bad):
            pass
    if isinstance(store, MemoryConversationStore):
        assert len(store) == 0
        assert not store._locks


@pytest.mark.parametrize(
    "good", ["x" * 512, "a{b}", " ", "\x00", "c\U0001f600"], ids=lambda good: repr(good)[:12]
)
async def test_both_stores_keep_the_same_odd_but_valid_ids(
    either_store: ConversationStore, good: str
) -> None:
    async with either_store.lock(good):
        await either_store.append(good, [msg(U, "hi")])
    assert await either_store.get(good) == [msg(U, "hi")]
    await either_store.clear(good)
    assert await either_store.get(good) == []


def test_a_lone_surrogate_in_a_redis_key_prefix_is_refused() -> None:
    """Before: accepted; every operation then failed with redis-py's UnicodeEncodeError
    (the replay cache's reached the middleware as a 500)."""
    pytest.importorskip("redis")
    from layercode_asgi.replay import RedisReplayCache

    for make in (RedisConversationStore, RedisReplayCache):
        with pytest.raises(ConfigurationError, match=r"^key_prefix is not valid text"):
            make("redis://127.0.0.1:1/0", key_prefix="lc\ud800:")


async def test_the_redis_replay_cache_refuses_a_lone_surrogate_key(
    redis_server: RedisServer,
) -> None:
    from layercode_asgi.replay import RedisReplayCache

    cache = RedisReplayCache(redis_server.url)
    try:
        with pytest.raises(ValueError, match=r"^replay key is not valid text"):
            await cache.seen("k\ud800", 10)
        assert not await cache.seen("k", 10)
    finally:
        await cache.aclose()


async def test_a_replay_check_redis_answered_too_late_does_not_refuse_the_retry(
    redis_server: RedisServer, raw: Any
) -> None:
    """Redis too slow to answer the replay check (the delivery got 503: not processed) ran
    the ``SET`` once it could: LayerCode's retry of the delivery got 409, as a replay. The
    cache forgets a key whose ``SET`` went unanswered, once Redis answers again."""
    from layercode_asgi.replay import RedisReplayCache

    cache = RedisReplayCache(redis_server.url, socket_timeout=0.3)
    try:
        await cache.ping()
        redis_server.pause()
        try:
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                await cache.seen("late", 60)
        finally:
            redis_server.resume()
        for _ in range(100):  # the forget runs in the background
            if not await raw.exists("layercode:replay:late"):
                break
            await anyio.sleep(0.05)
        assert not await cache.seen("late", 60)  # the retry is taken
        assert await cache.seen("late", 60)  # a replay of it still refused
    finally:
        await cache.aclose()


async def test_a_forget_after_an_unanswered_check_in_the_same_task_deletes_that_check(
    redis_server: RedisServer, raw: Any
) -> None:
    """One task checks several deliveries (an in-process client: httpx's ASGITransport). A
    check Redis answered too late (its SET ran later) is answered 503, whose forget must
    delete that check's value: it deleted the task's previous delivery's value instead, so
    the retry got 409 until the background undo ran."""
    from layercode_asgi.replay import RedisReplayCache

    cache = RedisReplayCache(redis_server.url, socket_timeout=0.3)
    try:
        assert not await cache.seen("k", 60)  # an earlier delivery, forgotten after its 503
        await cache.forget("k")
        redis_server.pause()
        try:
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                await cache.seen("k", 60)  # its retry: no reply in time
        finally:
            redis_server.resume()
        await cache.forget("k")  # that 503's forget, in the same task
        assert not await raw.exists("layercode:replay:k")
    finally:
        await cache.aclose()


async def test_replay_checks_failing_while_redis_is_down_start_no_task_each(
    redis_server: RedisServer,
) -> None:
    """Redis down (connections refused: no ``SET`` was sent): each delivery's failed replay
    check started its own background task, retrying a forget about once a second for the
    key's lifetime (up to 5 min): a connection attempt per second per delivery answered 503
    while Redis is down, and a burst of them once it is back."""
    import asyncio

    from layercode_asgi.replay import RedisReplayCache

    cache = RedisReplayCache(redis_server.url)
    try:
        await cache.ping()
        redis_server.stop()
        before = len(asyncio.all_tasks())
        for number in range(5):
            with pytest.raises(StoreUnavailableError):
                await cache.seen(f"k{number}", 300)
        assert len(asyncio.all_tasks()) - before <= 1
    finally:
        await cache.aclose()


async def test_undoing_a_replay_check_that_got_no_reply_spares_the_retrys_key(
    redis_server: RedisServer,
) -> None:
    """Redis down at the replay check (503: not processed), back at the delivery's retry:
    the background forget of the failed check's key, run after the retry took the key,
    deleted the retry's (one value per cache process), so a replay of it was taken. One
    connection: the forget waits for the retry's ``SET`` to be done with it."""
    import asyncio

    from layercode_asgi.replay import RedisReplayCache

    cache = RedisReplayCache(redis_server.url, max_connections=1)
    try:
        before = len(asyncio.all_tasks())
        redis_server.stop()
        with pytest.raises(StoreUnavailableError):
            await cache.seen("k", 60)
        redis_server.start()
        assert not await cache.seen("k", 60)  # the retry is taken
        for _ in range(200):  # the forget runs in the background
            if len(asyncio.all_tasks()) <= before:
                break
            await anyio.sleep(0.05)
        assert await cache.seen("k", 60)  # a replay of the retry is refused
    finally:
        await cache.aclose()


async def test_a_late_forget_of_a_delivery_spares_its_retrys_key(
    redis_server: RedisServer, raw: Any
) -> None:
    """A delivery answered 503 is forgotten. A forget Redis runs late (no reply in time),
    after the retry took the key through another connection, deleted any value of this
    cache, the retry's too, so a replay of the retry was taken: it deletes its own
    delivery's value only. Here the first value is lost behind the cache's back (as by a
    failover to a replica that had not got it) and the retry is another request's task."""
    from layercode_asgi.replay import RedisReplayCache

    cache = RedisReplayCache(redis_server.url)
    lost, retried = anyio.Event(), anyio.Event()

    async def first_delivery() -> None:  # a request's task: remembered, answered 503
        assert not await cache.seen("k", 60)
        await raw.delete("layercode:replay:k")
        lost.set()
        await retried.wait()
        await cache.forget("k")  # run late: after the retry's SET

    async def retry() -> None:  # another request's task
        assert not await cache.seen("k", 60)
        retried.set()

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first_delivery)
                await lost.wait()
                tg.start_soon(retry)
        assert await cache.seen("k", 60)  # a replay of the retry is refused
    finally:
        await cache.aclose()


@pytest.mark.parametrize(
    ("argument", "value"), [("max_connections", 0), ("max_connections", "8"), ("key_prefix", 5)]
)
def test_redis_replay_cache_names_a_bad_argument(argument: str, value: Any) -> None:
    """Not "invalid Redis URL" (the URL is fine), nor a TypeError at the first webhook."""
    pytest.importorskip("redis")
    from layercode_asgi.replay import RedisReplayCache

    with pytest.raises(ConfigurationError, match=f"^{argument} must be"):
        RedisReplayCache("redis://127.0.0.1:1/0", **{argument: value})


@pytest.mark.parametrize("value", [0, -1, "8", True, 2.5, None])
def test_memory_replay_cache_names_a_bad_max_entries(value: Any) -> None:
    """Not a bare TypeError from ``<=``, and True is not a count."""
    from layercode_asgi.replay import MemoryReplayCache

    with pytest.raises(ConfigurationError, match=r"^max_entries must be an integer > 0, got"):
        MemoryReplayCache(max_entries=value)


def test_a_count_too_large_for_a_float_is_named_so() -> None:
    """The message said "(at most 1.79769e+308)" of every bad count, an odd bound to quote."""
    from layercode_asgi.replay import MemoryReplayCache

    with pytest.raises(ConfigurationError, match=r"integer > 0 that a float can hold, got"):
        MemoryReplayCache(max_entries=10**400)


async def test_aclose_closes_the_connections_the_redis_clients_opened(
    redis_server: RedisServer, raw: Any
) -> None:
    """Before: ``aclose`` left the pool open (redis-py closes a pool given to ``Redis()`` only
    when told to): its connections stayed open on the server until garbage collection."""
    from layercode_asgi.replay import RedisReplayCache

    async def connections() -> int:
        return len(await raw.client_list()) - 1  # not ``raw``'s own

    store = RedisConversationStore(redis_server.url)
    cache = RedisReplayCache(redis_server.url)
    with anyio.fail_after(10):
        await store.append("c", [msg(U, "hi")])
        await cache.seen("k", 5)
        assert await connections() == 2
        await store.aclose()
        await cache.aclose()
        for _ in range(500):  # the server sees the close soon after
            if not await connections():
                break
            await anyio.sleep(0.01)
        assert await connections() == 0
