"""One conversation, three stores: memory, Redis and a Redis Cluster give an agent the same
``context.history`` and keep the same messages, whatever the turn's outcome.

Every scenario goes through ``create_app`` (in-process, the testing kit or an ASGI stub for
a client that leaves) and reads what the store holds through the app's
``ConversationManager``. One Redis server and one cluster serve the whole module: each test
keeps to conversation ids of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from layercode_asgi import Data, Settings, TurnContext, TurnEvent, create_app
from layercode_asgi.testing import LayercodeTestClient, signed_headers

from . import redis_fixtures
from .asgi_stub import ASGIStub
from .conftest import SECRET, event_body

pytestmark = pytest.mark.anyio

module_redis_server = redis_fixtures.module_redis_server
module_redis_cluster = redis_fixtures.module_redis_cluster

Seen = dict[str, list[list[tuple[str, str]]]]


@pytest.fixture(params=["memory", "redis", pytest.param("cluster", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The settings that choose the store."""
    if request.param == "memory":
        yield {}
    elif request.param == "redis":
        yield {"redis_url": request.getfixturevalue("module_redis_server").url}
    else:
        yield {
            "redis_url": request.getfixturevalue("module_redis_cluster").url,
            "redis_cluster": True,
        }


def cid(name: str) -> str:
    """A conversation id of this test only (the Redis servers are the module's)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def make_app(
    store: dict[str, Any],
    seen: Seen,
    gates: tuple[anyio.Event, anyio.Event] | None = None,
    **values: Any,
) -> Any:
    """``create_app`` on ``store`` with an agent that notes the history of every turn and
    misbehaves by what the user said (``wait``: sets ``gates[0]``, waits for ``gates[1]``)."""

    async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[Any]:
        seen.setdefault(event.conversation_id, []).append(
            [(m.role, m.text) for m in context.history]
        )
        if event.text == "":  # a turn with nothing to record: no text, nothing spoken
            yield Data({"n": 0})
            return
        text = event.text or ""
        if text == "raise":
            yield "partial"
            raise RuntimeError("failing after the first chunk")
        if text in ("hang", "leave"):
            yield "first"
            await anyio.sleep(30)  # cut by the turn timeout, or by the client leaving
        if text == "wait" and gates is not None:
            yield "first"
            gates[0].set()
            await gates[1].wait()
        if text == "data":
            yield Data({"n": 1})
            return
        if text.startswith("echo:"):
            yield text[5:]
            return
        yield f"re: {text}"

    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret=SECRET, **store, **values
    )
    return create_app(settings, agent)


async def stored(app: Any, conversation_id: str) -> list[tuple[str, str, str | None]]:
    return [
        (m.role, m.text, m.turn_id)
        for m in await app.state.conversations.get_history(conversation_id)
    ]


@pytest.fixture
async def close() -> AsyncIterator[list[Any]]:
    """Apps whose conversation store is closed at the end of the test."""
    apps: list[Any] = []
    yield apps
    for app in apps:
        await app.state.conversations.aclose()


async def test_plain_failed_and_timed_out_turns(store: dict[str, Any], close: list[Any]) -> None:
    seen: Seen = {}
    app = make_app(store, seen, turn_timeout=0.3, turn_timeout_message="Sorry.")
    close.append(app)
    c = cid("outcomes")
    async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
        for n, text in enumerate(["hello", "raise", "hang", "data", "bye"]):
            await client.message(text, turn_id=f"t{n}")
        assert (await client.data({"clicked": True}, turn_id="d")).status_code == 200
    assert await stored(app, c) == [
        ("user", "hello", "t0"),
        ("assistant", "re: hello", "t0"),
        ("user", "raise", "t1"),
        ("assistant", "partial", "t1"),  # what was spoken before the failure
        ("user", "hang", "t2"),
        ("assistant", "firstSorry.", "t2"),  # spoken, then the fallback, joined as is
        ("user", "data", "t3"),  # response.data is not recorded
        ("user", "bye", "t4"),
        ("assistant", "re: bye", "t4"),
    ]
    assert [len(history) for history in seen[c]] == [0, 2, 4, 6, 7]


async def test_a_client_that_leaves_after_the_first_chunk(
    store: dict[str, Any], close: list[Any]
) -> None:
    seen: Seen = {}
    app = make_app(store, seen)
    close.append(app)
    c = cid("leave")
    body = event_body(conversation_id=c, text="leave", turn_id="t0")
    headers = [(k.encode(), v.encode()) for k, v in signed_headers(body, SECRET).items()]
    stub = ASGIStub(body, path="/api/agent", headers=headers, disconnect_after=1)
    await stub.run(app)
    assert stub.disconnected and b"first" in stub.body
    async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
        assert (await client.message("next", turn_id="t1")).text == "re: next"
    assert seen[c][1] == [("user", "leave"), ("assistant", "first")]
    assert await stored(app, c) == [
        ("user", "leave", "t0"),
        ("assistant", "first", "t0"),
        ("user", "next", "t1"),
        ("assistant", "re: next", "t1"),
    ]


async def test_session_end_then_a_new_turn(store: dict[str, Any], close: list[Any]) -> None:
    seen: Seen = {}
    app = make_app(store, seen)
    close.append(app)
    c = cid("ended")
    async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
        await client.message("one", turn_id="t0")
        assert (await client.session_end()).status_code == 200
        assert await stored(app, c) == []
        await client.message("two", turn_id="t1")
    assert seen[c] == [[], []]
    assert await stored(app, c) == [("user", "two", "t1"), ("assistant", "re: two", "t1")]


async def test_session_end_while_a_turn_runs_and_turns_without_text(
    store: dict[str, Any], close: list[Any]
) -> None:
    seen: Seen = {}
    running, gate = anyio.Event(), anyio.Event()
    app = make_app(store, seen, (running, gate))
    close.append(app)
    c = cid("hangup")
    async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
        await client.message("one", turn_id="t0")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.message("wait", turn_id="t1"))
            with anyio.fail_after(10):
                await running.wait()
            assert (await client.session_end()).status_code == 200  # a hang-up mid-reply
            gate.set()
        assert await stored(app, c) == []  # the running turn did not write it back
        await client.session_start(turn_id="t2")  # no user text
        await client.message("   ", turn_id="t3")  # blank: only the reply is kept
    assert seen[c][2:] == [[], [("assistant", "re: ")]]
    assert await stored(app, c) == [
        ("assistant", "re: ", "t2"),
        ("assistant", "re:    ", "t3"),
    ]


async def test_history_bounds(store: dict[str, Any], close: list[Any]) -> None:
    seen: Seen = {}
    app = make_app(store, seen, history_max_messages=3, history_max_bytes=16)
    close.append(app)
    c = cid("bounds")
    async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
        await client.message("echo:ab", turn_id="t0")  # 7 + 2 bytes
        await client.message("echo:cd", turn_id="t1")  # 4 messages: the oldest goes
        after_messages = await stored(app, c)
        await client.message("echo:" + "é" * 10, turn_id="t2")  # 20 + 15 bytes: cut
        after_bytes = await stored(app, c)
    assert after_messages == [
        ("assistant", "ab", "t0"),
        ("user", "echo:cd", "t1"),
        ("assistant", "cd", "t1"),
    ]
    # each message is cut to 16 bytes on a character boundary, then only the newest fits
    assert after_bytes == [("assistant", "é" * 8, "t2")]
    assert seen[c] == [
        [],
        [("user", "echo:ab"), ("assistant", "ab")],
        [m[:2] for m in after_messages],
    ]


async def test_max_conversations_bounds_the_memory_store_only(
    store: dict[str, Any], close: list[Any]
) -> None:
    seen: Seen = {}
    app = make_app(store, seen, history_max_conversations=2)
    close.append(app)
    ids = [cid(f"many{n}") for n in range(3)]
    async with LayercodeTestClient(app, secret=SECRET) as client:
        for n, c in enumerate(ids):
            await client.message("hi", conversation_id=c, turn_id=f"t{n}")
    kept = [bool(await stored(app, c)) for c in ids]
    # "Conversations kept in memory": Redis bounds them by their TTL instead
    assert kept == ([False, True, True] if not store else [True, True, True])


async def test_unicode_and_100_kb_texts(store: dict[str, Any], close: list[Any]) -> None:
    seen: Seen = {}
    app = make_app(store, seen)  # 256 KiB of text per conversation
    close.append(app)
    c = cid("big")
    # JSON escapes some of these (\u0000, \u0001, \", \\, \n): longer in Redis than as text
    odd = '\x00\x01"\\\n\u2028😀é中'
    texts = [f"echo:{n}{odd}" + "\x01😀" * 20_000 for n in range(3)]  # 100 KB each
    async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
        for n, text in enumerate(texts):
            assert (await client.message(text, turn_id=f"t{n}")).text == text[5:]
    turn = [
        [("user", text, f"t{n}"), ("assistant", text[5:], f"t{n}")] for n, text in enumerate(texts)
    ]
    # two turns are over 256 KiB: the older one's two messages go, oldest first
    assert await stored(app, c) == turn[2]
    assert seen[c] == [[], [m[:2] for m in turn[0]], [m[:2] for m in turn[1]]]


async def test_two_conversations_interleaved(store: dict[str, Any], close: list[Any]) -> None:
    seen: Seen = {}
    app = make_app(store, seen)
    close.append(app)
    a, b = cid("a"), cid("b")
    async with (
        LayercodeTestClient(app, secret=SECRET) as client,
        anyio.create_task_group() as tg,
    ):
        for c in (a, b):
            tg.start_soon(turns, client, c)
    for c in (a, b):
        assert await stored(app, c) == [
            (role, text, f"{c}-{n}")
            for n in range(3)
            for role, text in (("user", f"{c} {n}"), ("assistant", f"re: {c} {n}"))
        ]
        assert [len(h) for h in seen[c]] == [0, 2, 4]


async def turns(client: LayercodeTestClient, c: str) -> None:
    for n in range(3):
        await client.message(f"{c} {n}", conversation_id=c, turn_id=f"{c}-{n}")


ODD_IDS = ["{", "}", "a{b}c", ":", "a:b:history", "*", "?[x]*", "with spaces ", "ü" * 512]


async def test_conversation_ids_that_matter_to_redis_keys(
    store: dict[str, Any], close: list[Any]
) -> None:
    seen: Seen = {}
    app = make_app(store, seen)
    close.append(app)
    tag = uuid.uuid4().hex[:6]
    ids = [tag + i if len(i) < 500 else i[: 512 - len(tag)] + tag for i in ODD_IDS]
    async with LayercodeTestClient(app, secret=SECRET) as client:
        for n in range(2):
            for c in ids:
                assert (await client.message(f"{n}", conversation_id=c, turn_id="t")).text == (
                    f"re: {n}"
                )
        for c in ids:
            assert await stored(app, c) == [
                ("user", "0", "t"),
                ("assistant", "re: 0", "t"),
                ("user", "1", "t"),
                ("assistant", "re: 1", "t"),
            ], c
        # over 512 characters: refused alike, with a clear 400
        long = "x" * 1024
        response = await client.post(event_body(conversation_id=long, text="hi"))
        assert response.status_code == 400, response.text
        assert "conversation_id" in response.json()["error"]
        assert long not in response.text


@pytest.mark.parametrize("first", ["one", ""], ids=["recorded", "nothing-to-record"])
async def test_a_client_that_stops_reading_before_the_end_does_not_hold_its_conversation(
    store: dict[str, Any], close: list[Any], first: str
) -> None:
    """The turn is recorded just before its response.end goes out, and the conversation is
    free from then on: a client that never reads the end does not hold the next turn. Also
    a turn with nothing to record (no text, nothing spoken): it held the conversation until
    its response.end was sent, so the next turn waited for the stalled client."""
    seen: Seen = {}
    app = make_app(store, seen)  # a turn timeout of 30 s: the test's bounds stop it first
    close.append(app)
    c = cid("stalled")
    body = event_body(conversation_id=c, text=first, turn_id="t0")
    headers = [(k.encode(), v.encode()) for k, v in signed_headers(body, SECRET).items()]
    stalled = ASGIStub(body, path="/api/agent", headers=headers, block_send_after=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stalled.run, app, 20)
        with anyio.fail_after(10):
            for _ in range(1000):  # until its first frame is out (its response.end is not)
                if stalled.bodies:
                    break
                await anyio.sleep(0.01)
            async with LayercodeTestClient(app, secret=SECRET, conversation_id=c) as client:
                assert (await client.message("two", turn_id="t1")).text == "re: two"
        assert not stalled.complete
        tg.cancel_scope.cancel()
    before = ["one", "re: one"] if first else []
    assert seen[c] == [[], [("user", "one"), ("assistant", "re: one")] if first else []]
    assert [m[1] for m in await stored(app, c)] == [*before, "two", "re: two"]


async def test_record_turn_with_no_messages_ends_the_turn(
    store: dict[str, Any], close: list[Any]
) -> None:
    """A turn with nothing to say still ends with ``record_turn``: both stores release the
    lock it holds there (the next turn need not wait), and both answer True."""
    app = make_app(store, {})
    close.append(app)
    backend = app.state.conversations.store
    c = cid("silent")
    for clear in (False, True):  # recorded, or the conversation ended meanwhile
        with anyio.fail_after(10):
            async with backend.lock(c):
                _, generation = await backend.read_turn(c)
                if clear:
                    await backend.clear(c)
                assert await backend.record_turn(c, [], generation) is True
                async with backend.lock(c, timeout=0):  # free: the turn has ended
                    pass


class _Text(str):
    """A str subclass, as some libraries hand out (or a mapping event parsed as it is)."""


async def test_str_subclass_texts_are_kept_by_every_store(
    store: dict[str, Any], close: list[Any]
) -> None:
    """A user text that is a ``str`` subclass (``respond(mapping)`` keeps a mapping's str
    subclasses; ``add_turn`` takes any str): the memory store kept it, the Redis stores
    failed the write (msgspec encodes exact types only: ``could not record turn``, the
    turn lost from the history)."""
    app = make_app(store, {})
    close.append(app)
    c = cid("subclass")
    manager = app.state.conversations
    await manager.add_turn(c, _Text("hi"), _Text("re: hi"), turn_id=_Text("t1"))
    assert await stored(app, c) == [("user", "hi", "t1"), ("assistant", "re: hi", "t1")]
