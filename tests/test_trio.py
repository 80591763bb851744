"""Serving on trio for real: Hypercorn's trio worker (``--worker-class trio``) and anyio's
trio backend. What can run there works; what cannot (redis-py's asyncio client, the agent
frameworks) is refused at start-up with a message naming trio, and, where no start-up of
ours runs (an app of your own, a mounted app), answered 503 per request, never a 500."""

from __future__ import annotations

from typing import Any

from layercode_asgi import (
    LayercodeSignature,
    LayercodeWebhook,
    Settings,
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
