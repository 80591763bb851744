"""Serving on trio for real: Hypercorn's trio worker (``--worker-class trio``) and anyio's
trio backend. What can run there works; what cannot (redis-py's asyncio client, the agent
frameworks) is refused at start-up with a message naming trio, and, where no start-up of
ours runs (an app of your own, a mounted app), answered 503 per request, never a 500."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from layercode_asgi import (
    LayercodeSignature,
    LayercodeWebhook,
    Settings,
    TurnContext,
    TurnEvent,
    echo_agent,
)
from layercode_asgi.testing import LayercodeTestClient, message_event

from .conftest import (
    NEEDS_TRIO,
    SECRET,
    serve_hypercorn,
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
