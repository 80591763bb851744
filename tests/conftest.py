"""Shared fixtures: a real uvicorn server on 127.0.0.1 and signing helpers."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import importlib.util
import io
import logging
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from layercode_asgi import setup_logging, sign

SECRET = "whsec_test_secret"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: Loggers that tests configure as a side effect: ``setup_logging`` (``app_from_env``, the
#: CLI in-process) and uvicorn (every ``uvicorn.Config`` runs ``logging.config.dictConfig``).
#: Both bind a handler to the ``sys.stderr`` of the moment: a capturing test's stream, which
#: pytest closes when the test ends.
#: Litestar puts a queue handler on the root logger (and its own): its listener thread
#: writes records later, to the stream of the test that built the app.
CONFIGURED_LOGGERS = (
    "",
    "layercode_asgi",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "litestar",
)


def closed_stream_handlers() -> list[str]:
    """``logger name: handler`` for every handler left writing to a closed stream."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        f"{getattr(logger, 'name', '?')}: {handler!r}"
        for logger in loggers
        for handler in getattr(logger, "handlers", ())
        for writer in (handler, *getattr(getattr(handler, "listener", None), "handlers", ()))
        if getattr(getattr(writer, "stream", None), "closed", False)
    ]


def _drain_queue_listeners(limit: int = 10_000) -> None:
    """Hand every record still queued in a queue handler to its listener's handlers now.

    Litestar logs through a queue handler (on the root logger) whose listener thread
    writes to the ``sys.stderr`` of the moment its logging was configured: a capturing
    test's stream, which pytest closes. Records that reached it later printed "Logging
    error ... I/O operation on closed file". Its writers get the current stream back and
    what is queued is written now, while the test's capture is still open.
    """
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            listener = getattr(handler, "listener", None)
            pending = getattr(handler, "queue", None)
            if listener is None or not isinstance(pending, queue.Queue):
                continue
            for writer in listener.handlers:  # bound to an earlier test's (closed) stream
                if getattr(getattr(writer, "stream", None), "closed", False):
                    writer.stream = sys.stderr  # type: ignore[attr-defined]
            for _ in range(limit):
                try:
                    record = pending.get_nowait()
                except queue.Empty:
                    break
                listener.handle(record)
                pending.task_done()


#: Test files that share something outside their temp dirs: the fixed ports the docs name
#: (8000...), and the checkout, where building the package (test_packaging) and the docs'
#: ``pip install --dry-run`` lines write ``layercode_asgi.egg-info``.
SHARED_CHECKOUT_FILES = frozenset({"test_docs.py", "test_readme.py", "test_packaging.py"})


@pytest.fixture(scope="module", autouse=True)
def _one_shared_checkout_file_at_a_time(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist (``scripts/test`` runs the suite in 4 processes, a file in each),
    the files of :data:`SHARED_CHECKOUT_FILES` run one at a time: each holds a lock shared
    by the processes of this run (in their common temp dir) for as long as its tests run."""
    if "PYTEST_XDIST_WORKER" not in os.environ or request.path.name not in SHARED_CHECKOUT_FILES:
        yield
        return
    import fcntl

    lock = tmp_path_factory.getbasetemp().parent / "shared-checkout.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file is closed
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield
    _drain_queue_listeners()  # before the test's fixtures (capsys, capfd) close their streams


@pytest.fixture(autouse=True)
def _isolate_library_logging() -> Iterator[None]:
    """Undo the logging configuration a test caused, then check that no logger is left
    writing to a closed stream.

    Left in place, such a handler makes any later record -- from a later test, or from a
    server thread still stopping after the session -- print a "Logging error ... I/O
    operation on closed file" traceback.
    """
    saved = [
        (logger, list(logger.handlers), logger.level, logger.propagate, logger.disabled)
        for logger in map(logging.getLogger, CONFIGURED_LOGGERS)
    ]
    try:
        yield
    finally:
        for logger, handlers, level, propagate, disabled in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled
    left = closed_stream_handlers()
    if left:
        pytest.fail(f"loggers left writing to a closed stream: {left}")


def signed_headers(body: bytes | str, secret: str = SECRET, **extra: str) -> dict[str, str]:
    """Headers for a correctly signed webhook request with ``body``."""
    return {"layercode-signature": sign(body, secret), "content-type": "application/json", **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers run as subprocesses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any, *, servers: list[uvicorn.Server] | None = None, **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn on 127.0.0.1 in a thread; yield its base URL (the
    uvicorn server is appended to ``servers``, to see its open connections)."""
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only for TCP sockets
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto", **config))
    if servers is not None:
        servers.append(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def serve_hypercorn(app: Any, *, trio_worker: bool = False, root_path: str = "") -> Iterator[str]:
    """Run ``app`` under hypercorn (its asyncio worker, or its trio one) in a thread on
    127.0.0.1 (``root_path``: as ``hypercorn --root-path``); yield its base URL."""
    from hypercorn.config import Config

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.root_path = root_path
    config.accesslog = None
    stop = threading.Event()
    if trio_worker:
        import trio
        from hypercorn.trio import serve as trio_serve

        trigger = functools.partial(trio.to_thread.run_sync, stop.wait)
        serving = functools.partial(trio_serve, app, config, shutdown_trigger=trigger)
        target: Any = functools.partial(trio.run, serving)
    else:
        from hypercorn.asyncio import serve as asyncio_serve

        async def main() -> None:
            await asyncio_serve(app, config, shutdown_trigger=lambda: asyncio.to_thread(stop.wait))

        target = functools.partial(asyncio.run, main())
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                stop.set()
                raise RuntimeError("hypercorn did not start") from None
            time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(10)


@contextmanager
def raw_http_server(
    answer: Callable[[dict[str, Any]], bytes | Iterable[bytes | None]],
) -> Iterator[str]:
    """A bare TCP server on 127.0.0.1 in a thread, for backends no real server would be: it
    reads each request (head, then a Content-Length body, a JSON event), writes what
    ``answer(event)`` returns as it is (status line, headers, body: bytes, or pieces of
    bytes written one by one, where a ``None`` resets the connection; a ``connection: close``
    header is added to a head without one), then closes the connection. Yields its base URL."""
    import msgspec

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 1 << 16:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line[15:])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk
        reply = answer(msgspec.json.decode(body) if body else {})
        for index, piece in enumerate([reply] if isinstance(reply, bytes) else reply):
            if index == 0 and piece is not None and b"\r\n" in piece:
                # It closes after one answer: say so, or a client may send its next request
                # on this connection before the close reaches it (a ReadError, under load).
                status_line, _, rest = piece.partition(b"\r\n")
                head = b"\r\n" + rest.partition(b"\r\n\r\n")[0].lower()
                if b"\r\nconnection:" not in head:
                    piece = status_line + b"\r\nconnection: close\r\n" + rest
            if piece is None:  # close with a TCP reset
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.sendall(piece)

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                one(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def event_body(kind: str = "message", **fields: Any) -> bytes:
    """The JSON body of a LayerCode webhook event of type ``kind``."""
    import msgspec

    base: dict[str, Any] = {"type": kind, "session_id": "sess-1", "conversation_id": "conv-1"}
    if kind in ("message", "session.start", "data"):
        base["turn_id"] = "turn-1"
    if kind == "message":
        base["text"] = "hello there"
    if kind == "data":
        base["data"] = {"clicked": True}
    base.update(fields)
    return msgspec.json.encode(base)


#: The Python running the tests (``[PYTHON, "-m", "uvicorn", ...]``).
PYTHON = sys.executable


class ServerProcess:
    """A server run as its own process on 127.0.0.1, from :func:`start_server_process`.

    ``url`` is its base URL; everything it writes (stdout and stderr) goes to ``log``, read
    with :meth:`output`. As a context manager it is stopped (SIGTERM, then SIGKILL) at exit.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        log: Path,
        *,
        temporary: bool = False,
        group: bool = False,
    ) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.temporary = temporary  # the log is removed at exit
        self.group = group  # a process group of its own: signals go to all of it

    def output(self) -> str:
        """What the process has written so far."""
        return self.log.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30) -> None:
        """Wait until the output contains ``text`` (an event the process reports, instead
        of a pause "long enough" for it); bounded by ``timeout``."""
        for _ in range(int(timeout / 0.02)):
            if text in self.output():
                return
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in the output:\n{self.output()}")

    def wait_ready(
        self, ready_path: str | None = "/health", ready_text: str = "", timeout: float = 30
    ) -> None:
        """Wait until ``GET ready_path`` answers 200 (with ``None``: until the port accepts
        connections) and the output contains ``ready_text``; bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if ready_text in self.output() and self._answers(ready_path):
                return
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        output = self.output()
        self.__exit__()
        raise RuntimeError(
            f"{self.process.args} did not become ready (exit status {self.process.returncode})"
            f":\n{output}"
        )

    def _answers(self, ready_path: str | None) -> bool:
        try:
            if ready_path is None:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            return httpx.get(self.url + ready_path, timeout=1).status_code == 200
        except (OSError, httpx.HTTPError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``sig`` (to its whole process group, if it has one of its own) and wait,
        then kill; return the exit status."""
        if self.process.poll() is None:
            self._signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self.temporary:
            self.log.unlink(missing_ok=True)


@functools.cache
def _log_dir() -> Path:
    """Where servers' temporary logs go: one directory for the test run, removed when it
    ends (a server stopped with ``stop()`` rather than ``with`` leaves its log until then)."""
    path = Path(tempfile.mkdtemp(prefix="layercode-test-servers-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def start_server_process(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    log: Path | None = None,
    ready_path: str | None = "/health",
    ready_text: str = "",
    timeout: float = 30,
    port: int | None = None,
    wait: bool = True,
    group: bool = False,
) -> ServerProcess:
    """Start ``command`` (``{port}`` in an argument or an ``env`` value is replaced by a free
    port) in ``cwd``
    and wait until it is ready (:meth:`ServerProcess.wait_ready`; ``wait=False``: the
    caller waits; ``group``: in a process group of its own, stopped as a whole, for a
    shell command). ``env`` is its whole environment (default: this process's), as for
    :class:`subprocess.Popen`; its output goes to ``log`` (a temporary file by default)."""
    port = free_port() if port is None else port
    temporary = log is None
    if log is None:
        handle, name = tempfile.mkstemp(prefix="server-", suffix=".log", dir=_log_dir())
        os.close(handle)
        log = Path(name)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [arg.replace("{port}", str(port)) for arg in command],
            cwd=cwd,
            env=None
            if env is None
            else {k: v.replace("{port}", str(port)) for k, v in env.items()},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=group,
        )
    server = ServerProcess(process, port, log, temporary=temporary, group=group)
    if wait:
        server.wait_ready(ready_path, ready_text, timeout)
    return server


#: anyio's backends for the stream and turn tests: asyncio, and trio when it is installed
#: (the dev extra has it).
NEEDS_TRIO = pytest.mark.skipif(
    importlib.util.find_spec("trio") is None, reason="trio is not installed"
)
BACKENDS = ["asyncio", pytest.param("trio", marks=NEEDS_TRIO)]


def httpx_refuses(variable: str, value: str) -> bool:
    """Whether this httpx refuses to make a client with ``variable=value`` in the
    environment (an older httpx reads ``SSL_CERT_FILE`` only later, or not at all)."""
    import os

    previous = os.environ.get(variable)
    os.environ[variable] = value
    try:
        httpx.AsyncClient()
    except Exception:
        return True
    finally:
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous
    return False


@contextmanager
def logged(log_format: str) -> Iterator[io.StringIO]:
    """What ``setup_logging(log_format=...)`` writes to stderr (the logger is restored after
    each test, see above)."""
    stream = io.StringIO()
    saved, sys.stderr = sys.stderr, stream
    try:
        setup_logging(log_format=log_format)
    finally:
        sys.stderr = saved
    yield stream
