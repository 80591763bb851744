"""Our servers under test, as uvicorn factories (``--app-dir benchmarks --factory``).

* ``ours``: ``create_app`` exactly as a user gets it (echo agent, signature middleware,
  in-memory conversation history with its per-conversation lock).
* ``ours_sleepy``: the same app with an agent that pauses between chunks (concurrency test).
* ``ours_sse_starlette``: the same pipeline, but every turn is streamed through
  ``create_sse_response`` (sse-starlette's ``EventSourceResponse``) instead of our lean
  ``EventStreamResponse``: the numbers behind the choice of the lean response.

The cost ladder (where a request's time goes, rung by rung, all built from ``create_app``):

* ``stack_floor``: ``create_app``'s webhook route (its dispatch, the drain check and
  ``LayercodeSignature``: body read, verification), with the floor's reply in place of the
  webhook.
* ``ours_no_history``: ``create_app`` with its webhook's conversation store removed (no
  per-conversation lock, no history read or written).
* ``minimal_pipeline`` (beside the ladder, a bound): the same parts fused into one frame,
  without the turn's guarantees (timeout, disconnect, errors, back-pressure, limits).
* ``ours_small_history`` (beside the ladder): ``create_app`` retaining the history of at
  most 100 conversations instead of 10,000: how much of the history rung is the cost of
  keeping state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from common import PATH, REPLY, SECRET, env_float, env_int, raise_nofile
from starlette.applications import Starlette
from starlette.routing import Route

from layercode_asgi import create_app
from layercode_asgi.agents import TurnContext, TurnEvent, echo_agent
from layercode_asgi.config import Settings
from layercode_asgi.conversation import ConversationManager, turn_messages
from layercode_asgi.events import MessagePayload, parse_webhook_payload
from layercode_asgi.middleware import LayercodeSignature
from layercode_asgi.signature import verify_signature
from layercode_asgi.sse import _RAW_SSE_HEADERS as _SSE
from layercode_asgi.sse import create_sse_response
from layercode_asgi.turns import _END, _TTS, _encode
from layercode_asgi.webhook import LayercodeWebhook

SLEEP_INTERVAL = env_float("BENCH_SLEEP_INTERVAL", 0.5)
SLEEP_CHUNKS = env_int("BENCH_SLEEP_CHUNKS", 10)
#: Seconds the agent "thinks" (awaits its LLM) before its first chunk: the paced benchmark.
THINK = env_float("BENCH_THINK", 0.0)

raise_nofile()


def _settings() -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)


def ours() -> Any:
    return create_app(_settings())


class _FloorReply:
    """Stands in for the webhook behind create_app's signature check: the floor's reply."""

    def __init__(self, floor: Any) -> None:
        self.floor = floor

    async def answer(self, body: bytes, scope: Any, receive: Any, send: Any) -> None:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await self.floor(scope, replay, send)


def stack_floor() -> Any:
    """create_app's webhook route up to and including the signature check, then the floor."""
    from floor_app import app as floor

    app = create_app(_settings())
    for route in app.routes:
        if getattr(route, "path", None) == PATH:
            route.app.webhook = _FloorReply(floor)  # type: ignore[attr-defined]
            return app
    raise RuntimeError(f"create_app has no {PATH} route")


def ours_small_history() -> Any:
    """``create_app`` retaining the history of at most 100 conversations (default 10,000)."""
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        history_max_conversations=100,
    )
    return create_app(settings)


def ours_no_history() -> Any:
    app = create_app(_settings())
    app.state.webhook.conversations = None
    return app


async def sleepy(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
    """Thinks ``THINK`` s, then speaks ``SLEEP_CHUNKS`` chunks ``SLEEP_INTERVAL`` s apart."""
    if THINK:
        await asyncio.sleep(THINK)
    for index in range(SLEEP_CHUNKS):
        if index:
            await asyncio.sleep(SLEEP_INTERVAL)
        yield REPLY[:24]


def ours_sleepy() -> Any:
    return create_app(_settings(), agent=sleepy)


class _SseStarletteWebhook(LayercodeWebhook):
    """``LayercodeWebhook`` whose turns go out through sse-starlette.

    The turn (history, lock, agent, encoding) is the very producer our lean response would
    run; only the response around it differs: chunks pass through a queue into the async
    iterator that ``EventSourceResponse`` consumes (its ping task and disconnect watcher
    run as usual).
    """

    def turn_response(self, event: TurnEvent, **options: Any) -> Any:
        producer = super().turn_response(event, **options).producer

        async def items() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def run() -> None:
                try:
                    await producer(queue.put)
                finally:
                    queue.put_nowait(None)

            task = asyncio.ensure_future(run())
            try:
                while (chunk := await queue.get()) is not None:
                    yield chunk
            finally:
                if not task.done():
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        return create_sse_response(items())


def ours_sse_starlette(agent: Any = echo_agent) -> Any:
    settings = _settings()
    webhook = _SseStarletteWebhook(
        agent,
        conversations=ConversationManager.from_settings(settings),
        turn_timeout=settings.turn_timeout,
        max_body_size=settings.max_body_size,
    )
    protected = LayercodeSignature(webhook, secret=SECRET, max_body_size=settings.max_body_size)
    return Starlette(routes=[Route("/api/agent", protected, methods=["POST"])])


def ours_sse_starlette_sleepy() -> Any:
    return ours_sse_starlette(sleepy)


class _MinimalPipeline:
    """A bound, not a product: the same library parts as ``ours`` in a single frame.

    Signature check (``verify_signature``), decode (``parse_webhook_payload``), the memory
    store's lock, history read and record, the echo agent and the same SSE bytes, written
    inline with nothing else: no turn timeout, no disconnect watcher, no back-pressure
    handover to streaming when the agent waits, no ``response.error`` for a failing
    agent, no body limits, no draining, no logging. What ``ours`` does beyond this is the
    cost of those guarantees and of the layering that provides them; this server measures
    how far a fused single-frame path for the default configuration could go.
    """

    def __init__(self, app: Any) -> None:
        endpoint = app._direct_endpoint()
        self.app = app
        self.secrets = endpoint.signature._secrets
        self.store = endpoint.webhook.conversations.store

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"layercode-signature":
                header = value.decode("latin-1")
        message = await receive()
        body = message.get("body", b"")
        try:
            verify_signature(body, header, self.secrets)
            event = parse_webhook_payload(body)
        except ValueError:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        assert isinstance(event, MessagePayload)
        store, cid = self.store, event.conversation_id
        async with store.lock(cid, timeout=None):
            context = TurnContext(event, await store.get(cid), {})
            suffix = b',"turn_id":' + _encode(event.turn_id) + b"}\n\n"
            chunks, spoken = [], []
            async for item in echo_agent(event, context):
                chunks.append(_TTS + _encode(item) + suffix)
                spoken.append(item)
            chunks.append(_END + suffix)
            await send({"type": "http.response.start", "status": 200, "headers": list(_SSE)})
            await send({"type": "http.response.body", "body": b"".join(chunks)})
            await store.append(cid, turn_messages(event.text, "".join(spoken), event.turn_id))


def minimal_pipeline() -> Any:
    """``ours``'s parts fused into one frame, without its guarantees (a bound; see above)."""
    return _MinimalPipeline(create_app(_settings()))
