"""``python -m tests.serve_for_tests PORT GRACE``: create_app + run_server, for SIGTERM tests."""

from __future__ import annotations

import sys

from layercode_asgi import Settings, create_app
from layercode_asgi.server import run_server

from .agents_for_tests import scripted_agent
from .conftest import SECRET

if __name__ == "__main__":
    port, grace = int(sys.argv[1]), float(sys.argv[2])
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    run_server(
        create_app(settings, scripted_agent), port=port, grace_period=grace, log_level="warning"
    )
