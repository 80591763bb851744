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
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

from .conftest import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One ``redis-server`` subprocess on 127.0.0.1; ``stop()`` / ``start()`` keep the port."""

    def __init__(self, binary: str, port: int | None = None, *, unix_socket: bool = False) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="layercode-redis-")
        #: With ``unix_socket``: the server also listens on a unix socket in its directory.
        self.socket = os.path.join(self._dir.name, "redis.sock") if unix_socket else None
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
                *(["--unixsocket", self.socket, "--unixsocketperm", "700"] if self.socket else []),
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
def running_redis(*, unix_socket: bool = False) -> Iterator[RedisServer]:
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
    server = RedisServer(REDIS_SERVER, unix_socket=unix_socket)
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


@pytest.fixture(scope="module")
def module_redis_server() -> Iterator[RedisServer]:
    """One ``redis-server`` subprocess shared by the tests of a module (keep their keys
    apart, e.g. by conversation id)."""
    with running_redis() as server:
        yield server


# -- several uvicorn workers sharing one Redis ---------------------------------------------------


async def worker_agent(event: Any, context: Any) -> AsyncIterator[str]:
    """Says which process answered and how much history it saw; ``sleep:<s> …`` sleeps."""
    yield f"pid={os.getpid()} saw={len(context.history)} text={event.text}"
    text = event.text or ""
    if text.startswith("sleep:"):
        await anyio.sleep(float(text.split()[0].split(":")[1]))
        yield " done"


def workers_app() -> Any:
    """``uvicorn --factory tests.redis_fixtures:workers_app``: settings from the environment
    (no ``.env``), history on ``REDIS_URL`` with the lock TTL of ``TEST_LOCK_TTL``."""
    from layercode_asgi import ConversationManager, RedisConversationStore, Settings, create_app
    from layercode_asgi.conversation import lock_wait_timeout

    settings = Settings(env_file=None)
    assert settings.redis_url
    store = RedisConversationStore(
        settings.redis_url,
        lock_ttl=float(os.environ.get("TEST_LOCK_TTL", "10")),
        lock_timeout=lock_wait_timeout(settings.turn_timeout, settings.lock_wait_grace),
        **({"cluster": True} if getattr(settings, "redis_cluster", False) else {}),
    )
    return create_app(settings, worker_agent, conversations=ConversationManager(store))


@contextmanager
def uvicorn_workers(
    redis_url: str, workers: int = 2, lock_ttl: float = 10.0, **environ: str
) -> Iterator[str]:
    """``uvicorn --workers N`` serving :func:`workers_app` on 127.0.0.1; yields its URL."""
    from .conftest import SECRET, start_server_process

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "REDIS_"))}
    env.update(
        REDIS_URL=redis_url,
        LAYERCODE_WEBHOOK_SECRET=SECRET,
        TEST_LOCK_TTL=str(lock_ttl),
        **environ,
    )
    command = [sys.executable, "-m", "uvicorn", "--factory", "tests.redis_fixtures:workers_app",
               "--workers", str(workers), "--host", "127.0.0.1", "--port", "{port}",
               "--log-level", "warning"]  # fmt: skip
    with start_server_process(command, env=env) as server:
        yield server.url


# -- a local Redis Cluster ------------------------------------------------------------------------

REDIS_CLI = shutil.which("redis-cli")


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes:
    """Three ``redis-server --cluster-enabled yes --appendonly yes`` on 127.0.0.1, made one
    cluster by ``redis-cli --cluster create``; a node can be stopped and started again."""

    def __init__(self, binary: str, cli: str, count: int = 3, replicas: int = 0) -> None:
        self.binary = binary
        self.cli = cli
        self.replicas = replicas
        self.ports = [_cluster_port() for _ in range(count * (1 + replicas))]
        self._dir = tempfile.TemporaryDirectory(prefix="layercode-cluster-")
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int, timeout: float = 10.0) -> None:
        """Start (or restart) one node in its own directory (its AOF and nodes.conf kept)."""
        directory = os.path.join(self._dir.name, str(port))
        os.makedirs(directory, exist_ok=True)
        self._processes[port] = subprocess.Popen(
            [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--appendonly", "yes",
                "--save", "",
                "--dir", directory,
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        server = RedisServer(self.binary, port)
        deadline = time.monotonic() + timeout
        while not server._pong():
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node {port} did not start")
            time.sleep(0.02)

    def stop_node(self, port: int) -> None:
        """Stop one node (SIGTERM: it writes its AOF and exits) and wait for it."""
        process = self._processes.pop(port)
        process.terminate()
        process.wait(10)

    def _cli(self, *args: str, timeout: float = 30.0) -> str:
        done = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        return done.stdout + done.stderr

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says ``cluster_state:ok`` (and every replica is in sync)."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self._cli("-p", str(p), "cluster", "info") for p in self.ports]
            synced = [self._cli("-p", str(p), "info", "replication") for p in self.ports]
            replicas = sum("master_link_status:up" in state for state in synced)
            if all("cluster_state:ok" in state for state in states) and replicas == len(
                self.ports
            ) * self.replicas // (1 + self.replicas):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.1)

    def port_of(self, key: str) -> int:
        """The port of the node serving ``key``."""
        slot = int(self._cli("-p", str(self.ports[0]), "cluster", "keyslot", key).strip())
        for line in self._cli("-p", str(self.ports[0]), "cluster", "nodes").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return port
        raise RuntimeError(f"no node serves slot {slot}")

    def replica_of(self, port: int) -> int:
        """The port of a replica of the primary on ``port``."""
        nodes = [
            line.split() for line in self._cli("-p", str(port), "cluster", "nodes").splitlines()
        ]
        primary = next(fields[0] for fields in nodes if "myself" in fields[2])
        for fields in nodes:
            if fields[3] == primary and "fail" not in fields[2]:
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no replica of {port}")

    def failover(self, primary: int, timeout: float = 30.0) -> int:
        """``CLUSTER FAILOVER`` on a replica of ``primary``; once it serves the primary's
        slots (and the cluster is ok), its port."""
        replica = self.replica_of(primary)
        self._cli("-p", str(replica), "cluster", "failover")
        self.wait_taken_over(replica, timeout)
        self.wait_ok(timeout)
        return replica

    def wait_taken_over(self, replica: int, timeout: float = 30.0) -> None:
        """Until ``replica`` is a primary and says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while True:
            role = self._cli("-p", str(replica), "info", "replication")
            state = self._cli("-p", str(replica), "cluster", "info")
            if "role:master" in role and "cluster_state:ok" in state:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica} did not take over: {role} {state}")
            time.sleep(0.05)

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        out = self._cli("--cluster", "create", *addresses, "--cluster-replicas",
                        str(self.replicas), "--cluster-yes")  # fmt: skip
        if "[OK]" not in out:
            raise RuntimeError(f"redis-cli --cluster create failed: {out}")
        self.wait_ok()

    def close(self) -> None:
        for port in list(self._processes):
            process = self._processes.pop(port)
            process.kill()
            process.wait(10)
        self._dir.cleanup()


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A fresh three-node Redis Cluster for one test."""
    yield from _cluster(replicas=0)


@pytest.fixture
def redis_cluster_replicas() -> Iterator[RedisClusterNodes]:
    """A fresh Redis Cluster of three primaries, each with one replica, for one test."""
    yield from _cluster(replicas=1)


@pytest.fixture(scope="module")
def module_redis_cluster() -> Iterator[RedisClusterNodes]:
    """One three-node Redis Cluster shared by the tests of a module."""
    yield from _cluster(replicas=0)


def _cluster(replicas: int) -> Iterator[RedisClusterNodes]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server / redis-cli not found on PATH in CI")
        pytest.skip("redis-server and redis-cli are needed for the cluster tests")
    pytest.importorskip("redis", reason="the redis extra is not installed")
    cluster = RedisClusterNodes(REDIS_SERVER, REDIS_CLI, replicas=replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
