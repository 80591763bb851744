"""Agents loaded by import path ("tests.agents_for_tests:…") in server subprocess tests, and
:func:`cancelled_elsewhere` for agents and producers that misbehave in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from layercode_asgi import TurnContext, TurnEvent


async def history_agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
    """Reports which worker answered and how much history it saw; 'slow' turns take 1 s."""
    yield f"pid={os.getpid()} saw={len(context.history)} text={event.text}"
    if event.text and "slow" in event.text:
        await anyio.sleep(1.0)
        yield " (slow done)"


async def scripted_agent(event: TurnEvent) -> AsyncIterator[str]:
    """Misbehaves on demand, by what the user said."""
    text = event.text or ""
    if text == "raise-before":
        raise RuntimeError("failing before the first chunk")
    if text == "raise-after":
        yield "partial"
        raise RuntimeError("failing after the first chunk")
    if text == "hang":
        print("agent hang running", file=sys.stderr, flush=True)  # for a test to wait on
        await anyio.sleep_forever()
    if text == "slow":
        yield "start"
        await anyio.sleep(float(os.environ.get("SLOW_AGENT_SECONDS", "2")))
        yield " done"
        return
    if text == "disconnect-me":
        yield "first"
        await anyio.sleep(60)
    yield f"fine: {text}"


async def hanging_hook(event: Any) -> None:
    """An ``on_data`` / ``on_session_end`` hook that never returns: a hook slower than the
    shutdown grace period. Says on stderr that it runs (for a test to wait on)."""
    print(f"hook {event.type} running", file=sys.stderr, flush=True)
    await anyio.sleep_forever()


async def cancelled_elsewhere() -> asyncio.Task[None]:
    """A task someone else cancelled: awaiting it raises CancelledError in the awaiter."""
    task = asyncio.get_running_loop().create_task(asyncio.sleep(30))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)
    return task
