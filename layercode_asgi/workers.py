"""``serve --workers N``: N processes on one listening socket, each draining like one process.

The parent binds the socket, starts the workers (*spawn*) and forwards SIGTERM / SIGINT to
them. Each serves :func:`~layercode_asgi.server.app_from_env` with
:func:`~layercode_asgi.server.run_server` (first signal: drain; second: stop at once); the
parent exits once every worker has. A dead worker is replaced, unless it exits with status 3
(uvicorn's "could not start") or :data:`START_ATTEMPTS` in a row ended before serving: then
the others are stopped and the parent returns 3. With ``metrics``, the workers share a
``PROMETHEUS_MULTIPROC_DIR`` (the user's, else a temporary one): a scrape sums them all.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["serve_workers"]

logger = logging.getLogger("layercode_asgi.workers")

#: Exit status of a worker that could not start (uvicorn's, also when the app's start-up fails).
STARTUP_FAILURE = 3
#: Workers in a row that may end before serving (one killed while starting is replaced)
#: before ``serve`` stops, rather than restarting for ever one that dies as it starts.
START_ATTEMPTS = 3
_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def _worker(
    sock: socket.socket, host: str, port: int, log_level: str, environ: dict[str, str], ready: Any
) -> None:
    """One worker process: its own process group (a terminal's Ctrl-C reaches the parent
    only, which forwards one SIGTERM); it drains and exits by itself if the parent dies."""
    os.setpgrp()
    # A Ctrl-C that reached the parent's group while this process started waited, blocked
    # (see start()): dropped, not a KeyboardInterrupt traceback (the parent forwards a SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(environ)
    parent = os.getppid()

    def watch_parent() -> None:
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
    metrics_dir = own_dir = None  # the workers' PROMETHEUS_MULTIPROC_DIR; made here: removed
    signals: list[int] = []
    previous: dict[int, Any] = {}
    processes: list[Any] = []
    serving: dict[Any, Any] = {}  # each process's Event, set once it serves
    early = status = 0  # workers in a row that ended before serving; the exit status

    def start() -> Any:
        ready = context.Event()
        process = context.Process(target=_worker, args=(sock, host, port, log_level, env, ready))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the child's too
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        serving[process] = ready
        return process

    sock = config.bind_socket()
    try:  # what is opened here is closed in ``finally``, also when starting fails
        if metrics and installed("prometheus_client"):
            from prometheus_client import multiprocess

            metrics_dir = env.get(_METRICS_DIR) or os.environ.get(_METRICS_DIR)
            if not metrics_dir:
                metrics_dir = own_dir = tempfile.mkdtemp(prefix="layercode-metrics-")
                env[_METRICS_DIR] = own_dir
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda number, frame: signals.append(number))
        processes.extend(start() for _ in range(workers))  # each kept as it starts
        forwarded = 0
        while not (signals or status) or any(process.is_alive() for process in processes):
            if len(signals) > forwarded:
                forwarded = len(signals)
                logger.info("forwarding the signal to %d worker(s)", len(processes))
                for process in processes:
                    process.terminate()  # SIGTERM
            elif not (signals or status):
                for index, process in enumerate(processes):
                    if process.is_alive():
                        continue
                    early = 0 if serving.pop(process).is_set() else early + 1
                    if process.exitcode == STARTUP_FAILURE or early >= START_ATTEMPTS:
                        logger.error("worker %s could not start; stopping", process.pid)
                        status = STARTUP_FAILURE
                        for other in processes:
                            other.terminate()
                        break
                    logger.warning(
                        "worker %s exited (status %s); starting another",
                        process.pid,
                        process.exitcode,
                    )
                    if metrics_dir:  # its live gauge (open streams) leaves the sum
                        multiprocess.mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]
                    processes[index] = start()
            time.sleep(0.1)
        if len(signals) > 1 and not status:  # stopped at once, not drained: as one process
            status = 128 + signals[-1]  # (130 after Ctrl-C, 143 after SIGTERM)
    finally:
        # A start failing (the first or a replacement): the started workers drain and exit,
        # else the parent, raising, would wait for them at exit (they are no daemons).
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return status
