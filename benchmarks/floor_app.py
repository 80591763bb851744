"""The floor: a bare ASGI app that reads the body and writes the same SSE bytes.

No routing, no signature verification, no JSON parsing, no agent: it answers every POST with
the two events our echo agent sends for a turn (``response.tts`` then ``response.end``, the
same headers, the same byte count) in the fewest ASGI messages possible (the start, then
one body message), so the difference between it and a real server is exactly the cost of
doing the work. ``sleepy_app`` sends the concurrency benchmark's chunks with its pauses.

Run: ``uvicorn --app-dir benchmarks floor_app:app`` (or ``floor_app:sleepy_app``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import FLOOR_TURN_ID, REPLY, echo_events, env_float, env_int, gc_probe, raise_nofile

_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]
_EVENTS = echo_events(FLOOR_TURN_ID)
_REPLY = b"".join(_EVENTS)
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}

SLEEP_INTERVAL = env_float("BENCH_SLEEP_INTERVAL", 0.5)
SLEEP_CHUNKS = env_int("BENCH_SLEEP_CHUNKS", 10)
#: Seconds the agent "thinks" (awaits its LLM) before its first chunk: the paced benchmark.
THINK = env_float("BENCH_THINK", 0.0)
_SLEEPY_CHUNK = echo_events(FLOOR_TURN_ID, REPLY[:24])[0]

raise_nofile()
gc_probe()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        return
    await _read_body(receive)
    await send(_START)
    await send({"type": "http.response.body", "body": _REPLY, "more_body": False})


#: ``busy_sleepy_app``: microseconds of pure CPU (a busy wait) per turn, at its request.
BUSY_US = env_float("BENCH_BUSY_US", 0.0)


async def busy_sleepy_app(scope: Any, receive: Any, send: Any) -> None:
    """``sleepy_app`` that first spends ``BENCH_BUSY_US`` µs of CPU on each request: a bare
    app as costly per turn as a real one, to tell what CPU per turn alone does to the p99."""
    if scope["type"] == "http":
        until = time.perf_counter() + BUSY_US / 1e6
        while time.perf_counter() < until:
            pass
    await sleepy_app(scope, receive, send)


async def sleepy_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        return
    await _read_body(receive)
    await send(_START)
    if THINK:
        await asyncio.sleep(THINK)
    for index in range(SLEEP_CHUNKS):
        if index:
            await asyncio.sleep(SLEEP_INTERVAL)
        await send({"type": "http.response.body", "body": _SLEEPY_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": _EVENTS[1], "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
