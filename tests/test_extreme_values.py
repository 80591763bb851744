"""Every duration, size and count argument of the public API at its extremes: accepted and
working, or refused when built with a ValueError/TypeError naming the argument (never an
OverflowError, nor Python's "Exceeds the limit (4300 digits)" while formatting a message)."""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from layercode_asgi import (
    EventStreamResponse,
    LayercodeSignature,
    LayercodeWebhook,
    MemoryReplayCache,
    RedisReplayCache,
    Settings,
    SettingsError,
    create_app,
    format_sse_message,
    parse_webhook_payload,
)
from layercode_asgi.conversation import (
    HistoryMessage,
    MemoryConversationStore,
    RedisConversationStore,
)
from layercode_asgi.metrics import MemoryMetrics
from layercode_asgi.simulate import run_simulation
from layercode_asgi.sse import create_sse_response
from layercode_asgi.testing import LayercodeTestClient, TurnChecker
from layercode_asgi.turns import Turn, stream_turn

from .conftest import SECRET, event_body
from .redis_fixtures import running_redis

HUGE = 10**5000  # more digits than int() turns into text
BEYOND_FLOAT = 2**1024 - 1  # an int below 2**1024 that float() cannot hold

BAD_SECONDS = [float("nan"), float("inf"), -1, True, "5", BEYOND_FLOAT, HUGE, -HUGE]
GOOD_SECONDS = [1e-300, 1e308, int(sys.float_info.max)]
BAD_COUNTS = [*BAD_SECONDS, 1.5]  # a fine duration, not a count
GOOD_COUNTS = [sys.maxsize + 1, int(sys.float_info.max)]


async def agent(context: Any) -> AsyncIterator[str]:
    yield "hi"


async def app(scope: Any, receive: Any, send: Any) -> None:
    return None


async def nothing() -> AsyncIterator[str]:
    yield "x"


def turn(**options: Any) -> Turn:
    return Turn(parse_webhook_payload(event_body("message", text="hi")), agent, **options)


REDIS = "redis://127.0.0.1:1/0"  # never connected to: the arguments are checked when built
Build = Callable[[Any], object]
SECONDS: dict[str, Build] = {  # "where.argument": build with that argument
    "LayercodeSignature.body_timeout": lambda v: LayercodeSignature(
        app, secret=SECRET, body_timeout=v
    ),
    "LayercodeWebhook.turn_timeout": lambda v: LayercodeWebhook(agent, turn_timeout=v),
    "LayercodeWebhook.body_timeout": lambda v: LayercodeWebhook(agent, body_timeout=v),
    "LayercodeWebhook.turn_grace": lambda v: LayercodeWebhook(agent, turn_grace=v),
    "LayercodeWebhook.lock_timeout": lambda v: LayercodeWebhook(agent, lock_timeout=v),
    "LayercodeWebhook.lock_wait_grace": lambda v: LayercodeWebhook(agent, lock_wait_grace=v),
    "Turn.timeout": lambda v: turn(timeout=v),
    "Turn.grace": lambda v: turn(grace=v),
    "stream_turn.timeout": lambda v: stream_turn(event_body("message"), agent, timeout=v),
    "EventStreamResponse.close_timeout": lambda v: EventStreamResponse(agent, close_timeout=v),
    "create_sse_response.ping": lambda v: create_sse_response(nothing(), ping=v),
    "create_sse_response.send_timeout": lambda v: create_sse_response(nothing(), send_timeout=v),
    "MemoryConversationStore.lock timeout": lambda v: MemoryConversationStore(lock_timeout=v),
    "RedisConversationStore.lock timeout": lambda v: RedisConversationStore(REDIS, lock_timeout=v),
    "RedisConversationStore.lock_ttl": lambda v: RedisConversationStore(REDIS, lock_ttl=v),
    "RedisConversationStore.operation_timeout": lambda v: RedisConversationStore(
        REDIS, operation_timeout=v
    ),
    "RedisConversationStore.socket_timeout": lambda v: RedisConversationStore(
        REDIS, socket_timeout=v
    ),
    "RedisReplayCache.socket_connect_timeout": lambda v: RedisReplayCache(
        REDIS, socket_connect_timeout=v
    ),
    "RedisReplayCache.socket_timeout": lambda v: RedisReplayCache(REDIS, socket_timeout=v),
    "LayercodeTestClient.timeout": lambda v: LayercodeTestClient(app, secret=SECRET, timeout=v),
    "create_app.authorize_timeout": lambda v: create_app(
        Settings(layercode_webhook_secret=SECRET), authorize_timeout=v
    ),
}
COUNTS: dict[str, Build] = {
    "LayercodeSignature.tolerance": lambda v: LayercodeSignature(app, secret=SECRET, tolerance=v),
    "LayercodeSignature.max_body_size": lambda v: LayercodeSignature(
        app, secret=SECRET, max_body_size=v
    ),
    "LayercodeWebhook.max_body_size": lambda v: LayercodeWebhook(agent, max_body_size=v),
    "LayercodeWebhook.max_queued_turns": lambda v: LayercodeWebhook(agent, max_queued_turns=v),
    "MemoryReplayCache.max_entries": lambda v: MemoryReplayCache(v),
    "RedisReplayCache.max_connections": lambda v: RedisReplayCache(REDIS, max_connections=v),
    "MemoryConversationStore.max_conversations": lambda v: MemoryConversationStore(
        max_conversations=v
    ),
    "MemoryConversationStore.max_messages": lambda v: MemoryConversationStore(max_messages=v),
    "RedisConversationStore.max_bytes": lambda v: RedisConversationStore(REDIS, max_bytes=v),
    "RedisConversationStore.ttl": lambda v: RedisConversationStore(REDIS, ttl=v),
    "MemoryMetrics.maxlen": lambda v: MemoryMetrics(v),
    "LayercodeTestClient.max_bytes": lambda v: LayercodeTestClient(app, secret=SECRET, max_bytes=v),
    "LayercodeTestClient.max_events": lambda v: LayercodeTestClient(
        app, secret=SECRET, max_events=v
    ),
    "TurnChecker.max_events": lambda v: TurnChecker("turn_1", max_events=v),
    "format_sse_message.retry": lambda v: format_sse_message("x", retry=v),
}


def shown(value: Any) -> str:
    names = {HUGE: "huge", -HUGE: "-huge", BEYOND_FLOAT: "beyond_float", sys.maxsize + 1: "2**63"}
    names[int(sys.float_info.max)] = "float_max"
    return names[value] if isinstance(value, int) and value in names else repr(value)


@pytest.mark.parametrize("value", BAD_COUNTS, ids=shown)
@pytest.mark.parametrize("name", [*SECONDS, *COUNTS])
def test_a_bad_number_is_refused_naming_the_argument(name: str, value: Any) -> None:
    build = SECONDS.get(name) or COUNTS[name]
    if name in SECONDS and value == 1.5:
        return  # a fine duration
    with pytest.raises((ValueError, TypeError)) as caught:
        build(value)
    assert name.partition(".")[2] in str(caught.value)
    assert "Exceeds the limit" not in str(caught.value)


@pytest.mark.parametrize("value", GOOD_SECONDS, ids=shown)
@pytest.mark.parametrize("name", list(SECONDS))
def test_an_extreme_but_valid_duration_is_accepted(name: str, value: Any) -> None:
    SECONDS[name](value)


@pytest.mark.parametrize("value", GOOD_COUNTS, ids=shown)
@pytest.mark.parametrize("name", list(COUNTS))
def test_a_count_up_to_a_floats_range_is_accepted(name: str, value: Any) -> None:
    COUNTS[name](value)


@pytest.mark.anyio
@pytest.mark.parametrize("value", [0, -1, float("nan"), "5", BEYOND_FLOAT, HUGE], ids=shown)
async def test_run_simulation_refuses_a_bad_timeout(value: Any) -> None:
    webhook_app = create_app(Settings(layercode_webhook_secret=SECRET), agent="echo")
    out = io.StringIO()
    with pytest.raises((ValueError, TypeError), match="timeout"):
        await run_simulation(
            "http://testserver/api/agent",
            SECRET,
            ["hi"],
            timeout=value,
            out=out,
            err=out,
            transport=httpx.ASGITransport(app=webhook_app),
        )


@pytest.mark.anyio
@pytest.mark.parametrize("cache", ["memory", "redis"])
@pytest.mark.parametrize(
    "ttl",
    [float("nan"), float("inf"), -float("inf"), -1, 0, 0.0, BEYOND_FLOAT, HUGE, True],
    ids=shown,
)
async def test_a_replay_cache_refuses_a_ttl_that_is_not_a_finite_positive_number(
    cache: str, ttl: Any
) -> None:
    # Before, MemoryReplayCache took NaN (never remembered: a replay passed), 0 and -1 (the
    # same), infinity (remembered forever); RedisReplayCache raised Python's own ValueError
    # or OverflowError for NaN, infinity and a huge int, and made 0 or -1 one second. Both
    # took True (a bool, which the other seconds arguments refuse) for 1 s.
    replay = MemoryReplayCache() if cache == "memory" else RedisReplayCache(REDIS)
    with pytest.raises(ValueError, match=r"^ttl must be a finite number > 0, got "):
        await replay.seen("k", ttl)  # refused before any Redis command: none runs there
    if isinstance(replay, MemoryReplayCache):
        assert len(replay) == 0


@pytest.mark.parametrize(
    "variable",
    ["LAYERCODE_SIGNATURE_TOLERANCE", "LAYERCODE_MAX_BODY_SIZE", "LAYERCODE_HISTORY_TTL"],
)
@pytest.mark.parametrize("value", [str(2**1024), "9" * 400], ids=["2**1024", "400 digits"])
def test_settings_refuse_an_int_that_create_app_would_refuse(variable: str, value: str) -> None:
    # Before, a 400-digit tolerance passed Settings, then create_app refused it as
    # "LayercodeSignature tolerance", not the variable's name.
    with pytest.raises(SettingsError, match=f"^{variable}: expected "):
        Settings(env_file=None, environ={variable: value}, layercode_webhook_secret=SECRET)


def test_the_largest_settings_build_an_app() -> None:
    create_app(
        Settings(
            layercode_webhook_secret=SECRET,
            signature_tolerance=int(sys.float_info.max),
            max_body_size=int(sys.float_info.max),
            max_queued_turns=int(sys.float_info.max),
            history_max_messages=int(sys.float_info.max),
            history_max_conversations=int(sys.float_info.max),
            history_max_bytes=int(sys.float_info.max),
            history_ttl=int(sys.float_info.max),
            turn_timeout=1e308,
            body_timeout=1e308,
        )
    )


@pytest.mark.anyio
@pytest.mark.parametrize("lock_ttl", [1e17, 1e308])
async def test_a_lock_ttl_beyond_what_redis_can_expire_still_locks(lock_ttl: float) -> None:
    # Before, 1e17 made every lock a StoreError ("value is not an integer or out of range":
    # Redis refuses a PX beyond about 9.2e18 ms), every turn a 503; 1e308 an OverflowError.
    with running_redis() as redis:
        store = RedisConversationStore(redis.url, lock_ttl=lock_ttl)
        try:
            with anyio.fail_after(10):
                async with store.lock("conv_1"):
                    await store.append("conv_1", [HistoryMessage(role="user", text="hi")])
                assert [m.text for m in await store.get("conv_1")] == ["hi"]
        finally:
            await store.aclose()


def huge_in(body: bytes) -> bytes:
    """``body`` with its ``"HUGE"`` strings made an integer of 5000 digits (valid JSON)."""
    return body.replace(b'"HUGE"', b"9" * 5000)


@pytest.mark.parametrize(
    ("body", "status", "path"),
    [
        (event_body("data", data="HUGE"), 400, "$.data"),
        (event_body("data", data={"n": ["HUGE"]}), 400, "$.data[...][0]"),
        (event_body("message", metadata={"n": "HUGE"}), 400, "$.metadata[...]"),
        (event_body("session.start", metadata={"n": "HUGE"}), 400, "$.metadata[...]"),
        (event_body("message", extra_field="HUGE"), 200, None),  # a field not read: ignored
        (event_body("session.update", extra_field="HUGE"), 200, None),
        (event_body("later.type", n="HUGE"), 200, None),  # an unknown type: ignored
    ],
)
def test_a_webhook_with_an_integer_of_5000_digits_is_a_400_or_ignored(
    body: bytes, status: int, path: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """An integer beyond Python's int/str conversion limit (4300 digits) in what the webhook
    reads is a 400 naming where, never a 500 (the echoing ``on_data`` never sees it)."""
    from .conftest import serve, signed_headers

    async def agent(event: Any) -> AsyncIterator[str]:
        yield "heard"

    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent, on_data=lambda event: event.data)
    body = huge_in(body)
    with serve(app) as url:
        reply = httpx.post(url + "/api/agent", content=body, headers=signed_headers(body))
    assert reply.status_code == status, reply.text
    if path is not None:
        assert reply.json() == {
            "error": f"invalid webhook payload at `{path}`: Integer value out of range",
            "path": path,
        }
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
