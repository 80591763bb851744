"""``python -m tests.serve_for_tests PORT GRACE [MAX_REQUESTS]``: create_app + run_server, for
SIGTERM tests (and uvicorn's limit_max_requests)."""

from __future__ import annotations

import os
import sys

from layercode_asgi import Settings, create_app
from layercode_asgi.server import run_server

from .agents_for_tests import hanging_hook, scripted_agent
from .conftest import SECRET

if __name__ == "__main__":
    port, grace = int(sys.argv[1]), float(sys.argv[2])
    # A third argument: uvicorn's limit_max_requests (and 1 s for its own graceful shutdown).
    limit: dict[str, int] = {}
    if len(sys.argv) > 3:
        limit = {"limit_max_requests": int(sys.argv[3]), "timeout_graceful_shutdown": 1}
    # LayerCode's API for the authorize route, when the test gives one.
    upstream = {
        k: v for k, v in os.environ.items() if k in ("LAYERCODE_API_URL", "LAYERCODE_API_KEY")
    }
    settings = Settings(env_file=None, environ=upstream, layercode_webhook_secret=SECRET)
    run_server(
        create_app(settings, scripted_agent, on_data=hanging_hook, on_session_end=hanging_hook),
        port=port,
        grace_period=grace,
        log_level="warning",
        **limit,
    )
