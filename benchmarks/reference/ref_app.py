"""The reference implementation, ``layercode-create-app`` 0.2.0, serving its own echo agent.

Runs only in the reference venv (Python >= 3.12, see ``setup_ref.py``):
``.ref-venv/bin/uvicorn --app-dir benchmarks/reference --factory ref_app:echo``.

Built exactly the way its CLI (``layercode-create-app run --agent echo``) builds the app:
``AppSettings`` from the environment, ``create_agent("echo", model)``, ``setup_logging``
and ``create_app(settings, agent)`` -- without the CLI's own uvicorn call, so that every
server in the benchmark runs under the same uvicorn command line. The harness sets
``LOG_LEVEL=WARNING`` (the CLI honours it): otherwise loguru prints one line per webhook
to stdout, a cost our server is not charged either.

``sleepy`` is the same app with an agent that pauses between chunks (concurrency test).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPLY, SECRET, env_float, env_int, gc_probe, raise_nofile
from layercode_create_app.agents import create_agent
from layercode_create_app.agents import echo as _echo  # noqa: F401  (registers "echo")
from layercode_create_app.agents.base import BaseLayercodeAgent
from layercode_create_app.config import AppSettings
from layercode_create_app.logging import setup_logging
from layercode_create_app.server.app import create_app

SLEEP_INTERVAL = env_float("BENCH_SLEEP_INTERVAL", 0.5)
SLEEP_CHUNKS = env_int("BENCH_SLEEP_CHUNKS", 10)
#: Seconds the agent "thinks" (awaits its LLM) before its first chunk: the paced benchmark.
THINK = env_float("BENCH_THINK", 0.0)

raise_nofile()
gc_probe()


def _settings() -> Any:
    os.environ.setdefault("LAYERCODE_WEBHOOK_SECRET", SECRET)
    os.environ.setdefault("LAYERCODE_API_KEY", "bench-unused")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    settings = AppSettings(_env_file=None)
    setup_logging(settings, level=None)
    return settings


def echo() -> Any:
    settings = _settings()
    return create_app(settings, create_agent("echo", settings.default_model))


class SleepyAgent(BaseLayercodeAgent):
    """Speaks ``SLEEP_CHUNKS`` short chunks, ``SLEEP_INTERVAL`` seconds apart."""

    name = "sleepy"
    description = "benchmark agent"

    async def handle_session_start(self, payload: Any, stream: Any) -> None:
        stream.end()

    async def handle_message(self, payload: Any, stream: Any, history: Any) -> list[Any]:
        if THINK:
            await asyncio.sleep(THINK)
        for index in range(SLEEP_CHUNKS):
            if index:
                await asyncio.sleep(SLEEP_INTERVAL)
            stream.tts(REPLY[:24])
        stream.end()
        return []


def sleepy() -> Any:
    settings = _settings()
    return create_app(settings, SleepyAgent(settings.default_model))
