"""Our servers under test, as uvicorn factories (``--app-dir benchmarks --factory``).

* ``ours``: ``create_app`` exactly as a user gets it (echo agent, signature middleware,
  in-memory conversation history with its per-conversation lock).
* ``ours_sleepy``: the same app with an agent that pauses between chunks (concurrency test).
* ``ours_metrics_sleepy``: ``ours_sleepy`` with ``LAYERCODE_METRICS=true`` (Prometheus, and
  OpenTelemetry's API with no SDK configured): what recording the per-turn metrics costs.
* ``ours_sse_starlette``: the same pipeline, but every turn is streamed through
  ``create_sse_response`` (sse-starlette's ``EventSourceResponse``) instead of our own
  ``EventStreamResponse``: the numbers behind the choice of our response.
* ``ours_no_history``: ``create_app`` with its webhook's conversation store removed (no
  per-conversation lock, no history read or written).
* ``ours_small_history``: ``create_app`` retaining the history of at most 100
  conversations instead of 10,000: how much of a turn is the cost of keeping state.

Only public APIs of the library are used here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from common import REPLY, SECRET, env_float, env_int, gc_probe, raise_nofile
from starlette.applications import Starlette
from starlette.routing import Route

from layercode_asgi import create_app
from layercode_asgi.agents import TurnContext, TurnEvent, echo_agent
from layercode_asgi.config import Settings
from layercode_asgi.conversation import ConversationManager
from layercode_asgi.middleware import LayercodeSignature
from layercode_asgi.sse import create_sse_response
from layercode_asgi.webhook import LayercodeWebhook

SLEEP_INTERVAL = env_float("BENCH_SLEEP_INTERVAL", 0.5)
SLEEP_CHUNKS = env_int("BENCH_SLEEP_CHUNKS", 10)
#: Seconds the agent "thinks" (awaits its LLM) before its first chunk: the paced benchmark.
THINK = env_float("BENCH_THINK", 0.0)

raise_nofile()
gc_probe()


def _settings() -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)


def ours() -> Any:
    return create_app(_settings())


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


def ours_metrics_sleepy() -> Any:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET, metrics=True)
    return create_app(settings, agent=sleepy)


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

            async def put(chunk: bytes, *, last: bool = False) -> None:
                await queue.put(chunk)

            async def run() -> None:
                try:
                    await producer(put)
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
