"""Serving on trio for real: Hypercorn's trio worker (``--worker-class trio``) and anyio's
trio backend. What can run there works; what cannot (redis-py's asyncio client, the agent
frameworks) is refused at start-up with a message naming trio, and, where no start-up of
ours runs (an app of your own, a mounted app), answered 503 per request, never a 500."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.testclient import TestClient

from layercode_asgi import (
    ConversationManager,
    LayercodeSignature,
    LayercodeWebhook,
    RedisConversationStore,
    Settings,
    TurnContext,
    TurnEvent,
    create_app,
    echo_agent,
)
from layercode_asgi.errors import ConfigurationError
from layercode_asgi.replay import RedisReplayCache
from layercode_asgi.testing import LayercodeTestClient, message_event

from .conftest import (
    NEEDS_TRIO,
    PYTHON,
    SECRET,
    event_body,
    serve_hypercorn,
    signed_headers,
    start_server_process,
)

pytestmark = NEEDS_TRIO

#: Nothing listens there: each refusal below comes before any connection to Redis.
NO_REDIS = "redis://127.0.0.1:1/0"


def settings(**fields: Any) -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET, **fields)


def test_a_raw_asgi_app_starts_under_hypercorns_trio_worker() -> None:
    """Before: ``LayercodeWebhook`` returned from a ``lifespan`` scope without a word, and
    Hypercorn's trio worker then failed to start at all (``trio.ClosedResourceError`` sending
    ``lifespan.startup``): the *Raw ASGI* app of docs/stacks.md could not be served on trio.
    It answers the lifespan protocol (it has nothing to set up)."""
    app = LayercodeSignature(LayercodeWebhook(echo_agent), secret=SECRET)
    with serve_hypercorn(app, trio_worker=True) as url:
        result = LayercodeTestClient(base_url=url, secret=SECRET).send_sync(message_event("hi"))
    assert "".join(result.tts) == "You said: hi"  # type: ignore[union-attr]


@pytest.mark.parametrize("replay", [False, True])
def test_redis_on_trio_is_refused_at_start_up(replay: bool) -> None:
    """Before: ``create_app`` with ``REDIS_URL`` started on trio, then every turn answered
    500 (the store) or 503 (the replay cache), logging ``no running event loop``: redis-py's
    asyncio client runs on asyncio only. Its start-up fails, naming trio; on asyncio it
    starts as before."""
    app = create_app(settings(redis_url=NO_REDIS, replay_protection=replay))
    refused = pytest.raises(ConfigurationError, match=r"REDIS_URL.*asyncio only, not on trio")
    with refused, TestClient(app, backend="trio"):
        pass
    with TestClient(app):  # asyncio: no connection is opened at start-up
        pass


def test_hypercorn_trio_with_redis_exits_at_start_up(tmp_path: Path) -> None:
    """The same through the documented command (the app factory, Hypercorn's trio worker):
    the server exits at start-up saying why, rather than serving failing turns. Hypercorn
    0.18's supervisor exits 0 when its worker failed (docs/deploying.md); with the
    documented ``--workers 0`` the exit status says so."""
    env = dict(os.environ, LAYERCODE_WEBHOOK_SECRET=SECRET, REDIS_URL=NO_REDIS)
    command = [PYTHON, "-m", "hypercorn", "--worker-class", "trio", "--workers", "0", "--bind"]
    command += ["127.0.0.1:{port}", "layercode_asgi.server:app_from_env()"]
    with start_server_process(command, env=env, cwd=tmp_path, wait=False) as server:
        status = server.process.wait(30)
        output = server.output()
    assert "ConfigurationError: Redis (REDIS_URL" in output and "not on trio" in output
    assert status == 1


def test_redis_stores_on_trio_close_and_keep_the_refusal() -> None:
    """Before: ``aclose()`` of the Redis conversation store and replay cache raised
    ``RuntimeError: no running event loop`` on trio (cancelling their background tasks asked
    for the asyncio loop first, with none started): leaving ``async with
    ConversationManager(...)`` replaced the refusal that names trio with that error."""

    async def main() -> None:
        await RedisReplayCache(NO_REDIS).aclose()
        with pytest.raises(ConfigurationError, match="asyncio only, not on trio"):
            async with ConversationManager(RedisConversationStore(NO_REDIS)) as manager:
                await manager.get_history("c")

    anyio.run(main, backend="trio")


def adapted_agent() -> Any:
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.test import TestModel

    from layercode_asgi.adapters import from_pydantic_ai

    return from_pydantic_ai(pydantic_ai.Agent(TestModel(custom_output_text="Hi.")))


def test_an_adapted_agent_on_trio_is_refused_at_start_up() -> None:
    """Before: ``create_app`` with an adapted agent started on trio, then every turn failed
    with ``agent error`` (the frameworks start asyncio tasks of their own). Its start-up
    fails, naming trio; on asyncio it starts and answers."""
    app = create_app(settings(), adapted_agent())
    refused = pytest.raises(ConfigurationError, match="asyncio only, not on trio")
    with refused, TestClient(app, backend="trio"):
        pass
    with TestClient(app) as client:
        body = event_body("message", text="hello")
        reply = client.post("/api/agent", content=body, headers=signed_headers(body))
    assert reply.status_code == 200 and "Hi." in reply.text


def test_redis_in_an_app_of_your_own_on_trio_answers_503_naming_trio(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No start-up of ours runs in an app of your own: each request that needs Redis is
    answered 503 (before: the store's turns 500), the log saying why (before: ``no running
    event loop``)."""
    caplog.set_level(logging.WARNING, "layercode_asgi")
    conversations = ConversationManager(RedisConversationStore(NO_REDIS))
    stores = LayercodeSignature(
        LayercodeWebhook(echo_agent, conversations=conversations), secret=SECRET
    )
    replay = LayercodeSignature(
        LayercodeWebhook(echo_agent), secret=SECRET, replay_protection=RedisReplayCache(NO_REDIS)
    )
    for app, error in [
        (stores, "conversation store unavailable"),
        (replay, "replay protection unavailable"),
    ]:
        caplog.clear()
        with serve_hypercorn(app, trio_worker=True) as url:
            body = event_body("message", text="hi")
            reply = httpx.post(url, content=body, headers=signed_headers(body), timeout=20)
        assert (reply.status_code, reply.json()) == (503, {"error": error})
        assert "not on trio" in caplog.text
        assert "no running event loop" not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_an_agent_failure_on_trio_carries_no_stray_exception(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: on trio a turn's agent ran inside the response's ``except RuntimeError`` (the
    check for an asyncio loop): ``sys.exc_info()`` in the agent was that ``RuntimeError``,
    and each failure was logged "During handling of the above exception (RuntimeError: no
    running event loop), another exception occurred"."""
    seen: list[object] = []

    async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
        seen.append(sys.exc_info()[1])
        yield "partial"
        raise ValueError("the agent's own failure")

    with anyio.fail_after(10):
        result = await LayercodeTestClient(LayercodeWebhook(agent), secret=SECRET).message("hi")
    assert [event["type"] for event in result.events][-2:] == ["response.error", "response.end"]
    assert seen == [None]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("agent failed")]
    assert record.exc_info is not None and record.exc_info[1] is not None
    assert record.exc_info[1].__context__ is None
    assert "no running event loop" not in caplog.text
