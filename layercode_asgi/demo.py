"""``layercode-asgi demo``: the echo agent on a free local port, and a simulated conversation
(with ``--metrics``, then each turn's figures from :class:`MemoryMetrics`)."""

from __future__ import annotations

import argparse
import secrets
import socket
from typing import Any, Final

import anyio
import httpx

from .config import Settings
from .errors import ConfigurationError
from .metrics import MemoryMetrics, TurnMetrics
from .simulate import EXIT_OK, EXIT_VIOLATION, SimulationReport, check_sendable, run_simulation

__all__ = ["DEMO_DATA", "DEMO_MESSAGES", "StartError", "run_demo"]

DEMO_MESSAGES: Final = ("Hello there!", "What can you do?", "Goodbye.")
DEMO_DATA: Final = {"demo": True, "clicked": "button-1"}
#: How long ``demo`` waits for its server to start.
DEMO_START_TIMEOUT: Final = 10.0


class StartError(Exception):
    """The server could not start (a port in use, …); printed, exit code 2."""


async def run_demo(args: argparse.Namespace, uvicorn: Any) -> int:
    from .logs import setup_logging, uvicorn_log_config
    from .server import create_app

    if args.verbose:
        setup_logging(verbose=True)
    secret = secrets.token_urlsafe(24)
    messages = tuple(args.messages or DEMO_MESSAGES)
    check_sendable(secret, messages, DEMO_DATA, None, None)  # before anything is served
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=secret,
        # The demo never mints LayerCode sessions: guard the route with a key nobody has.
        authorize_api_keys=secrets.token_urlsafe(24),
    )
    app = create_app(settings, agent="echo")
    memory = MemoryMetrics() if args.metrics else None
    if memory is not None:
        app.state.webhook.metrics = TurnMetrics(memory)
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on accepted sockets whose
    # listening socket says TCP; with proto 0 every keep-alive request waits ~40 ms (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    level = "debug" if args.verbose else "warning"
    log_config = uvicorn_log_config(settings.log_format)  # masked and escaped, as `serve`'s
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=level, lifespan="on", log_config=log_config)
    )
    url = f"http://127.0.0.1:{port}/api/agent"
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            stopped.set()

    report: SimulationReport | None = None
    broken: BrokenPipeError | ConfigurationError | None = None
    with sock:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            try:
                with anyio.fail_after(DEMO_START_TIMEOUT):
                    while not server.started and not stopped.is_set():  # noqa: ASYNC110 - uvicorn exposes a bool
                        await anyio.sleep(0.01)
                if server.started:
                    try:
                        print(
                            f"demo: the echo agent is served on {url} (temporary secret {secret})",
                            flush=True,
                        )
                        report = await run_simulation(
                            url,
                            secret,
                            messages,
                            data=DEMO_DATA,
                            allow_errors=args.allow_errors,
                            # Its own server on 127.0.0.1: no proxy from the environment.
                            transport=httpx.AsyncHTTPTransport(trust_env=False),
                        )
                    except (BrokenPipeError, ConfigurationError) as exc:
                        # raised after the server stopped (in the task group it would be
                        # cancelled): the CLI exits 141, or 2
                        broken = exc
            finally:
                server.should_exit = True
    if broken is not None:
        raise broken
    if report is None:
        raise StartError("demo: the server did not start")
    if memory is not None:
        print("demo: per-turn metrics (first tts and duration from the webhook's arrival)")
        print(memory.table(), flush=True)
    if report.ok:
        print("demo: done. Serve your own agent with: layercode-asgi serve --help", flush=True)
        return EXIT_OK
    return EXIT_VIOLATION
