"""Servers under test, wrk, and a raw-socket asyncio HTTP/1.1 client.

* :class:`Server` starts one uvicorn (one worker, uvloop, httptools) as a subprocess on its
  own 127.0.0.1 port, pinned to CPU 0 when there are two or more CPUs, and stops it.
* :func:`run_wrk` runs wrk with ``wrk_signed.lua`` over freshly signed bodies and returns
  the exact numbers its ``done()`` hook prints.
* :func:`read_turn` sends one request on an open connection and reads the reply, timing
  the first SSE byte and the end; :func:`probe_ttfb` uses it while wrk loads a server;
  :func:`concurrent_turns` opens N streams at once and samples the server's RSS meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PATH, http_request, message_body, raise_nofile, signature

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WRK_SCRIPT = HERE / "wrk_signed.lua"
UVICORN_ARGS = (
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--log-level",
    "warning",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The CPUs this process may use, read once at import: the harness later pins itself to
# the load side, and the split must not shrink with it.
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pinning() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load CPUs): the first CPU for the server, the rest for the load."""
    if len(_CPUS) < 2:
        return None, None
    return {_CPUS[0]}, set(_CPUS[1:])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """One server under test: ``python -m uvicorn --app-dir APP_DIR [--factory] SPEC``."""

    name: str
    python: str
    app_dir: Path
    spec: str
    factory: bool = False
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, log_dir: Path, timeout: float = 60.0) -> None:
        self.port = free_port()
        cmd = [
            self.python,
            "-m",
            "uvicorn",
            "--app-dir",
            str(self.app_dir),
            *(["--factory"] if self.factory else []),
            self.spec,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *UVICORN_ARGS,
        ]
        server_cpus, _ = pinning()
        self.log_path = log_dir / f"server-{self.name}.log"
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k not in ("PYENV_VERSION", "PYTHONPATH")}
        env.update(self.env)

        def pin() -> None:  # in the child, before exec
            raise_nofile()
            if server_cpus:
                os.sched_setaffinity(0, server_cpus)

        self.process = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=log, env=env, preexec_fn=pin
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up; see {self.log_path}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:.0f}s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        code = self.process.returncode
        self.process = None
        return code


# -- wrk -------------------------------------------------------------------------------------


def write_signed_requests(path: Path, prefix: str, count: int) -> None:
    """``<signature>\\t<body>`` lines for wrk_signed.lua, signed now."""
    now = int(time.time())
    with path.open("w") as out:
        for index in range(count):
            body = message_body(prefix, index)
            out.write(f"{signature(body, now)}\t{body.decode()}\n")


def wrk_version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    words = (done.stdout + done.stderr).split()  # "wrk debian/4.1.0-3+b2 [epoll] Copyright..."
    return words[1] if len(words) > 1 else "?"


def start_wrk(
    url: str, requests_file: Path, *, threads: int, connections: int, duration: float
) -> subprocess.Popen[str]:
    _, load_cpus = pinning()

    def pin() -> None:
        if load_cpus:
            os.sched_setaffinity(0, load_cpus)

    return subprocess.Popen(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            str(requests_file),
            str(threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=pin,
    )


def parse_wrk(output: str) -> dict[str, Any]:
    match = re.search(r"^WRKJSON (\{.*\})$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{output}")
    data: dict[str, Any] = json.loads(match.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    data["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = (
        data["non_2xx"]
        + data["connect_errors"]
        + data["read_errors"]
        + data["write_errors"]
        + data["timeout_errors"]
    )
    return data


# -- a raw HTTP/1.1 client -------------------------------------------------------------------


@dataclass
class TurnResult:
    status: int
    ttfb: float  # seconds from the request's first byte written to the first SSE byte read
    total: float  # ... to the end of the response
    body: bytes


class ProtocolError(Exception):
    pass


async def read_turn(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> TurnResult:
    """Send ``request`` and read the whole response (chunked or with a content-length)."""
    started = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    ttfb: float | None = None
    body = bytearray()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunk = await reader.readexactly(size + 2)
            if ttfb is None:
                ttfb = time.perf_counter() - started
            body += chunk[:-2]
    elif "content-length" in headers:
        body += await reader.readexactly(int(headers["content-length"]))
    else:
        raise ProtocolError(f"response without length: {headers}")
    total = time.perf_counter() - started
    return TurnResult(status, total if ttfb is None else ttfb, total, bytes(body))


def check_echo_reply(result: TurnResult, turn_id: str | None) -> str | None:
    """None when ``result`` is a good turn for ``turn_id``, else what is wrong.

    ``turn_id=None`` (the floor, whose reply is constant) checks the shape only.
    """
    if result.status != 200:
        return f"status {result.status}: {result.body[:200]!r}"
    events = [
        json.loads(line[6:])
        for line in result.body.decode().split("\n")
        if line.startswith("data: ")
    ]
    if not events or events[-1].get("type") != "response.end":
        return f"no response.end: {events!r}"[:300]
    if turn_id is not None and any(e.get("turn_id") != turn_id for e in events):
        return f"events not all for {turn_id}: {events!r}"[:300]
    if not any(e.get("type") == "response.tts" for e in events):
        return "no response.tts"
    return None


async def probe_ttfb(
    port: int, stop: asyncio.Event, *, interval: float, prefix: str = "probe"
) -> dict[str, Any]:
    """One keep-alive connection sending signed turns until ``stop``; TTFB of each."""
    ttfbs: list[float] = []
    errors = 0
    index = 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            request = http_request(message_body(prefix, index))
            index += 1
            try:
                result = await asyncio.wait_for(read_turn(reader, writer, request), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if result.status == 200:
                ttfbs.append(result.ttfb)
            else:
                errors += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        writer.close()
    return {"samples": len(ttfbs), "errors": errors, **percentiles_ms(ttfbs)}


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": round(ordered[-1] * 1000, 3)}


async def concurrent_turns(
    port: int,
    pid: int,
    count: int,
    *,
    turn_timeout: float,
    prefix: str = "crowd",
    check_turn_ids: bool = True,
) -> dict[str, Any]:
    """Open ``count`` connections, start a turn on each at once, read all to the end.

    Meanwhile the server's RSS is sampled every 20 ms; ``baseline`` is taken before the
    first connection, ``peak`` is the largest sample while the streams are open.
    """
    baseline = rss_kib(pid)
    peak = baseline
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.02)

    errors: list[str] = []
    ttfbs: list[float] = []
    durations: list[float] = []

    async def one(index: int) -> None:
        body = message_body(prefix, index)
        turn_id = json.loads(body)["turn_id"]
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            result = await asyncio.wait_for(
                read_turn(reader, writer, http_request(body)), turn_timeout
            )
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        finally:
            if writer is not None:
                writer.close()
        problem = check_echo_reply(result, turn_id if check_turn_ids else None)
        if problem:
            errors.append(problem)
        else:
            ttfbs.append(result.ttfb)
            durations.append(result.total)

    sampler = asyncio.ensure_future(sample())
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    sampling = False
    await sampler
    after = rss_kib(pid)
    return {
        "streams": count,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "baseline_rss_kib": baseline,
        "peak_rss_kib": peak,
        "after_rss_kib": after,
        "rss_per_stream_kib": round((peak - baseline) / count, 2),
        "ttfb": percentiles_ms(ttfbs),
        "stream_duration_p50_s": round(statistics.median(durations), 3) if durations else None,
        "elapsed_s": round(elapsed, 3),
    }


async def one_turn(port: int, prefix: str = "check") -> tuple[TurnResult, str]:
    body = message_body(prefix, 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        result = await asyncio.wait_for(read_turn(reader, writer, http_request(body)), 30)
    finally:
        writer.close()
    return result, json.loads(body)["turn_id"]


__all__ = [
    "PATH",
    "Server",
    "check_echo_reply",
    "concurrent_turns",
    "cpu_seconds",
    "one_turn",
    "parse_wrk",
    "pinning",
    "probe_ttfb",
    "rss_kib",
    "start_wrk",
    "write_signed_requests",
    "wrk_version",
]
