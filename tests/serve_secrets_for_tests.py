"""``python -m tests.serve_secrets_for_tests PORT``: create_app + setup_logging + run_server,
settings from the environment, with an agent, a ``data`` hook and an authorize guard that
each raise an error quoting every secret of the settings (``QUOTED``), for the log tests."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

from layercode_asgi import DataPayload, Settings, TurnEvent, create_app, setup_logging
from layercode_asgi.server import run_server

SETTINGS = Settings(env_file=None)
#: Every secret of the settings, as an SDK or an application would quote them.
QUOTED = (
    f"key {SETTINGS.layercode_api_key}, secrets {SETTINGS.layercode_webhook_secret}, "
    f"store {SETTINGS.redis_url}"
)


async def agent(event: TurnEvent) -> AsyncIterator[str]:
    raise RuntimeError(f"agent: auth failed with {QUOTED}")
    yield ""  # pragma: no cover - a generator agent


def hook(event: DataPayload) -> None:
    raise PermissionError(f"hook: auth failed with {QUOTED}")


def guard(request: Any) -> bool:
    who = request.query_params.get("who")  # a request's text, newlines and all
    raise ConnectionError(f"guard: auth failed with {QUOTED} for {who}")


if __name__ == "__main__":
    setup_logging(log_format=SETTINGS.log_format)
    app = create_app(SETTINGS, agent, on_data=hook, authorize_guard=guard)
    run_server(app, port=int(sys.argv[1]), grace_period=0, log_level="info")
