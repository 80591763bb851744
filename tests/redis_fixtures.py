"""A real, throw-away ``redis-server`` for tests: started on a free port, stoppable, restartable.

Use the ``redis_server`` fixture (import it into a test module), or ``running_redis``
directly. Tests are skipped only when the ``redis-server`` binary is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from .conftest import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One ``redis-server`` subprocess on 127.0.0.1; ``stop()`` / ``start()`` keep the port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="layercode-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers ``PING``."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"redis-server exited early: {err}")
            if self._pong():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections open but nothing ever answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused server (SIGCONT)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case it is paused
            process.kill()
        process.wait(10)
        if process.stderr:
            process.stderr.close()

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        self._dir.cleanup()


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit.

    Skips the test when the ``redis-server`` binary or the ``redis`` package is missing.
    """
    if REDIS_SERVER is None:
        if os.environ.get("CI"):  # CI installs redis-server: its absence is a failure there
            pytest.fail("redis-server binary not found on PATH in CI")
        pytest.skip("redis-server binary not found on PATH (install redis-server)")
    if os.environ.get("CI"):
        import redis  # noqa: F401 - must be installed in CI (dev extra)
    pytest.importorskip("redis", reason="the redis extra is not installed")
    server = RedisServer(REDIS_SERVER)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` subprocess for one test."""
    with running_redis() as server:
        yield server
