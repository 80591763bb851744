"""``serve --workers N``: N processes on one listening socket, each draining like one process.

The parent binds the socket, starts the workers (``multiprocessing``'s *spawn*: a fresh
interpreter each), and forwards SIGTERM / SIGINT to them. Each worker builds its app with
:func:`~layercode_asgi.server.app_from_env` from the environment it is given (which names
the env file to read, if any, in ``LAYERCODE_ENV_FILE``) and serves it with
:func:`~layercode_asgi.server.run_server`: on the first signal it drains (open turns finish
within the grace period, new webhooks get 503), on a second it stops at once. The parent
exits once every worker has. A worker that dies on its own is replaced (however soon after it
started: a SIGKILL is no failure to start), unless it exits with status 3, uvicorn's for "could
not start" (building the app or its start-up failed), or :data:`START_ATTEMPTS` workers in a
row ended before serving (a crash while starting): then the others are stopped and the
parent returns 3, as uvicorn's supervisor does.

With ``metrics`` (``LAYERCODE_METRICS=true``) and prometheus-client installed, the workers
share a ``PROMETHEUS_MULTIPROC_DIR`` (the user's, else a fresh temporary one, removed at
the end): a scrape of any worker sums them all.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["serve_workers"]

logger = logging.getLogger("layercode_asgi.workers")

#: Exit status of a worker that could not start (uvicorn's; it also exits so when the app's
#: start-up fails).
STARTUP_FAILURE = 3
#: Workers in a row that may end before serving (one killed while starting is replaced)
#: before ``serve`` stops: one that dies as it starts, every time, is no endless restart.
START_ATTEMPTS = 3


def _worker(
    sock: socket.socket, host: str, port: int, log_level: str, environ: dict[str, str], ready: Any
) -> None:
    """One worker process: its own process group (a terminal's Ctrl-C reaches the parent
    only, which forwards one SIGTERM), the app from the environment, a draining server;
    it drains and exits by itself if the parent dies."""
    os.setpgrp()
    # A Ctrl-C that reached the parent's group while this process started waited, blocked
    # (see start()): dropped, not a KeyboardInterrupt traceback (the parent forwards a SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(environ)
    parent = os.getppid()

    def watch_parent() -> None:  # out of the parent's group: end with it (drain first)
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    from .server import app_from_env, run_server

    try:
        app = app_from_env()
    except Exception:
        logger.exception("worker could not build the app")
        raise SystemExit(STARTUP_FAILURE) from None

    async def serving() -> None:  # uvicorn's first tick once it listens (then every 30 s)
        ready.set()

    run_server(
        app, host=host, port=port, log_level=log_level, sockets=[sock], callback_notify=serving
    )


def serve_workers(
    *,
    workers: int,
    host: str,
    port: int,
    log_level: str,
    environ: Mapping[str, str],
    metrics: bool = False,
    log_format: str = "text",
) -> int:
    """Serve ``app_from_env`` in ``workers`` processes until SIGTERM / SIGINT; return the
    exit status (0 once every worker has drained and exited; 128 + the signal's number
    when a second one stopped them at once)."""
    import uvicorn

    from .logs import uvicorn_log_config
    from .metrics import installed

    # Its "Uvicorn running on …" line: as JSON as the workers' own with LOG_FORMAT=json.
    log_config = uvicorn_log_config(log_format)
    config = uvicorn.Config(
        "layercode_asgi.server:app_from_env", host=host, port=port, log_config=log_config
    )
    context = multiprocessing.get_context("spawn")
    env = dict(environ)
    prometheus: Any = None
    metrics_dir: str | None = None
    signals: list[int] = []

    def start() -> Any:
        ready = context.Event()
        process = context.Process(
            target=_worker, args=(sock, host, port, log_level, env, ready), daemon=False
        )
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the child's too
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        serving[process] = ready
        return process

    previous: dict[int, Any] = {}
    processes: list[Any] = []
    serving: dict[Any, Any] = {}  # each process's Event, set once it serves
    early = 0  # workers in a row that ended before serving
    status = 0
    sock = config.bind_socket()
    try:  # what is opened here is closed in ``finally``, also when starting fails
        if metrics and installed("prometheus_client"):
            from . import prometheus

            metrics_dir = prometheus.prepare_worker_directory(env)
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda number, frame: signals.append(number))
        processes.extend(start() for _ in range(workers))  # each kept as it starts
        forwarded = 0
        while True:
            if len(signals) > forwarded:
                forwarded = len(signals)
                logger.info("forwarding the signal to %d worker(s)", len(processes))
                for process in processes:
                    if process.is_alive() and process.pid is not None:
                        os.kill(process.pid, signal.SIGTERM)
            if signals:
                if not any(process.is_alive() for process in processes):
                    break
            else:
                for index, process in enumerate(processes):
                    if process.is_alive():
                        continue
                    early = 0 if serving.pop(process).is_set() else early + 1
                    if process.exitcode == STARTUP_FAILURE or early >= START_ATTEMPTS:
                        logger.error("worker %s could not start; stopping", process.pid)
                        status = STARTUP_FAILURE
                        signals.append(signal.SIGTERM)
                        break
                    logger.warning(
                        "worker %s exited (status %s); starting another",
                        process.pid,
                        process.exitcode,
                    )
                    if prometheus is not None and process.pid is not None:
                        prometheus.worker_exited(process.pid, env)
                    processes[index] = start()
            time.sleep(0.1)
        if len(signals) > 1 and not status:  # stopped at once, not drained: as one process
            status = 128 + signals[-1]  # (130 after Ctrl-C, 143 after SIGTERM)
    finally:
        # A start failing (the first or a replacement): the started workers drain and exit,
        # else the parent, raising, would wait for them at exit (they are no daemons).
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        if metrics_dir is not None:
            prometheus.remove_worker_directory(metrics_dir)
    return status
