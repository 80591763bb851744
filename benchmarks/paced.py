"""Paced streaming: the work real agents do, N clients in a closed loop.

    python benchmarks/paced.py [--levels 200,800,1600] [--duration 8] [--servers ours,floor]

Every agent "thinks" ``--think`` seconds (an LLM's time to first token, default 100 ms), then
speaks ``--chunks`` chunks ``--interval`` seconds apart (default 10 chunks, 50 ms). Each of N
clients holds one keep-alive connection and sends its next signed turn as soon as its last
one ended. Per server and N it reports completed turns, errors, the p50/p99 of the time to
the first ``response.tts`` minus the think time (the server's overhead before the first
word), the p50/p99 of the turn's extra duration (its wall time minus the agent's own
pauses), server CPU per turn, the load generator's CPU share (it must not be the limit:
kept under 80 %), and the server's RSS growth per open stream.

Servers (one uvicorn worker each, pinned to the first CPU; the load on the others):
``ours`` (create_app), ``ours-metrics`` (the same with ``LAYERCODE_METRICS=true``: the
cost of recording the per-turn metrics), ``sse-starlette`` (the same turn through sse-starlette's
``EventSourceResponse``), ``floor`` (a bare ASGI app with the same pacing and bytes) and
``reference`` (layercode-create-app's own server with the same pacing, in its own venv; see
``reference/setup_ref.py``); ``floor+cpu`` (the floor spending ``--busy-us`` µs of CPU per
turn: what CPU per turn alone does to the p99). The load generator reads bytes without
parsing events: it finds ``response.tts`` and the chunked terminator in what arrives.

Client ``i`` of ``N`` sends its first turn ``i/N`` of a turn's duration after the first one
(``--together``: all at once). Callers of a voice agent are independent; a closed loop
started in one instant stays in lockstep, every client's turn arriving in the same burst,
and its p99 then measures the burst more than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import PATH, message_body, raise_nofile, signature  # noqa: E402
from loadgen import Server, cpu_seconds, pinning, rss_kib  # noqa: E402

_TTS = b"response.tts"
_END = b"0\r\n\r\n"


@dataclass
class Pacing:
    think: float = 0.1
    chunks: int = 10
    interval: float = 0.05
    #: All clients send their first turn at once (``--together``). By default client ``i``
    #: of ``N`` starts ``i/N`` of a turn later: callers of a voice agent are independent, and
    #: a closed loop started in one instant stays in lockstep (every turn of every client
    #: arrives in the same burst), so its p99 measures the burst more than the server.
    together: bool = False

    @property
    def speaking(self) -> float:
        """What the agent itself spends on a turn: thinking plus the pauses between chunks."""
        return self.think + (self.chunks - 1) * self.interval

    def env(self) -> dict[str, str]:
        return {
            "BENCH_THINK": str(self.think),
            "BENCH_SLEEP_CHUNKS": str(self.chunks),
            "BENCH_SLEEP_INTERVAL": str(self.interval),
        }


@dataclass
class Level:
    """What one N measured on one server."""

    first_tts: list[float] = field(default_factory=list)
    extra: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class _Turns(asyncio.Protocol):
    """One client connection: sends a turn, times its first tts and its end, repeats."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.client.closed()


class Client:
    def __init__(self, run: Run, index: int) -> None:
        self.run, self.index, self.turn = run, index, 0
        self.protocol: _Turns | None = None
        self.sent = self.tts_at = 0.0
        self.head_checked = False
        self.tail = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.turn_over: asyncio.Event = asyncio.Event()

    async def connect(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        _, self.protocol = await loop.create_connection(lambda: _Turns(self), "127.0.0.1", port)

    def send(self) -> None:
        assert self.protocol is not None and self.protocol.transport is not None
        # One conversation per client, as a caller's session is: its history grows turn by
        # turn (each server keeps it as it does), and nothing else accumulates.
        body = message_body(f"p{self.index % 10000:04d}", 0, turn=self.turn)
        head = (
            f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"layercode-signature: {signature(body)}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.turn += 1
        self.sent, self.tts_at, self.head_checked, self.tail = time.monotonic(), 0.0, False, b""
        self.turn_over.clear()
        self.protocol.transport.write(head.encode() + body)

    def received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.head_checked:
            self.head_checked = True
            if not data.startswith(b"HTTP/1.1 200"):
                self.finish(now, f"status {data[9:12].decode(errors='replace')}")
                return
        seen = self.tail + data
        if not self.tts_at and _TTS in seen:
            self.tts_at = now
        if seen.endswith(_END):
            self.finish(now, None if self.tts_at else "no tts")
            return
        self.tail = seen[-16:]

    def finish(self, now: float, error: str | None) -> None:
        self.run.record(self, now, error)
        self.turn_over.set()

    def closed(self) -> None:
        if not self.turn_over.is_set():
            self.finish(time.monotonic(), "connection lost")

    async def loop(self, port: int, stop_at: float, delay: float) -> None:
        await self.connect(port)
        await asyncio.sleep(delay)
        try:
            while time.monotonic() < stop_at:
                self.send()
                try:
                    await asyncio.wait_for(self.turn_over.wait(), self.run.turn_timeout)
                except TimeoutError:
                    self.run.level.error("timeout")
                    return
                if self.protocol is None or self.protocol.lost.done():
                    await self.connect(port)
        finally:
            if self.protocol is not None and self.protocol.transport is not None:
                self.protocol.transport.close()


class Run:
    """N clients against one server for ``warmup + duration`` seconds."""

    def __init__(self, pacing: Pacing, warmup: float, duration: float) -> None:
        self.pacing = pacing
        self.level = Level()
        self.measure_from = self.measure_to = 0.0
        self.turn_timeout = pacing.speaking + 30.0
        self.warmup, self.duration = warmup, duration

    def record(self, client: Client, now: float, error: str | None) -> None:
        if not self.measure_from <= client.sent < self.measure_to:
            return
        if error is not None:
            self.level.error(error)
            return
        self.level.first_tts.append(client.tts_at - client.sent - self.pacing.think)
        self.level.extra.append(now - client.sent - self.pacing.speaking)

    def launch(self, port: int, clients: int) -> list[asyncio.Future[None]]:
        """Start ``clients`` clients (their first turns spread over one turn unless
        ``pacing.together``), each looping until ``measure_to``."""
        spread = 0.0 if self.pacing.together else self.pacing.speaking / clients
        return [
            asyncio.ensure_future(Client(self, i).loop(port, self.measure_to, spread * i))
            for i in range(clients)
        ]

    async def go(self, server: Server, clients: int) -> dict[str, Any]:
        start = time.monotonic()
        self.measure_from = start + self.warmup
        self.measure_to = self.measure_from + self.duration
        rss_before = rss_kib(server.pid)
        tasks = self.launch(server.port, clients)
        await asyncio.sleep(self.warmup)
        cpu0, load0, t0 = cpu_seconds(server.pid), time.process_time(), time.monotonic()
        rss_peak = rss_before
        while time.monotonic() < self.measure_to:
            await asyncio.sleep(0.5)
            rss_peak = max(rss_peak, rss_kib(server.pid))
        cpu1, load1, t1 = cpu_seconds(server.pid), time.process_time(), time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.level.error(type(result).__name__)
        turns = len(self.level.first_tts)
        # Open streams at a time: each client spends ~speaking/(speaking + gap) in a turn.
        return summarise(
            self.level,
            clients=clients,
            seconds=t1 - t0,
            server_cpu=cpu1 - cpu0,
            load_cpu=load1 - load0,
            rss_growth_kib=rss_peak - rss_before,
            turns=turns,
        )


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(
    level: Level,
    *,
    clients: int,
    seconds: float,
    server_cpu: float,
    load_cpu: float,
    rss_growth_kib: int,
    turns: int,
) -> dict[str, Any]:
    ms = 1000.0
    p = {
        f"{name}_{tag}_ms": (None if (v := _pct(values, q)) is None else round(v * ms, 2))
        for name, values in (("first_tts", level.first_tts), ("extra", level.extra))
        for tag, q in (("p50", 0.5), ("p99", 0.99))
    }
    return {
        "clients": clients,
        "turns": turns,
        "turns_per_s": round(turns / seconds, 1) if seconds else 0.0,
        "errors": level.errors,
        "error_kinds": level.error_kinds,
        **p,
        "first_tts_mean_ms": round(statistics.fmean(level.first_tts) * ms, 2)
        if level.first_tts
        else None,
        "server_cpu_us_per_turn": round(server_cpu / turns * 1e6, 1) if turns else None,
        "server_cpu_share": round(server_cpu / seconds, 3) if seconds else None,
        "load_cpu_share": round(load_cpu / seconds, 3) if seconds else None,
        "rss_kib_per_stream": round(rss_growth_kib / clients, 2),
    }


def servers(
    names: list[str], pacing: Pacing, ref_python: str | None, busy_us: float = 0.0
) -> dict[str, Server]:
    """The servers ``names`` asks for; ``floor+cpu`` is the floor spending ``busy_us`` µs of
    CPU per turn (``floor_app.busy_sleepy_app``)."""
    env = pacing.env()
    python = sys.executable
    known = {
        "ours": Server("ours-paced", python, HERE, "ours_app:ours_sleepy", factory=True, env=env),
        "ours-metrics": Server(
            "ours-metrics-paced",
            python,
            HERE,
            "ours_app:ours_metrics_sleepy",
            factory=True,
            env=env,
        ),
        "sse-starlette": Server(
            "sse-starlette-paced",
            python,
            HERE,
            "ours_app:ours_sse_starlette_sleepy",
            factory=True,
            env=env,
        ),
        "floor": Server("floor-paced", python, HERE, "floor_app:sleepy_app", env=env),
        "floor+cpu": Server(
            "floor-cpu-paced",
            python,
            HERE,
            "floor_app:busy_sleepy_app",
            env={**env, "BENCH_BUSY_US": str(busy_us)},
        ),
    }
    if ref_python:
        known["reference"] = Server(
            "reference-paced",
            ref_python,
            HERE / "reference",
            "ref_app:sleepy",
            factory=True,
            env={
                **env,
                "LOG_LEVEL": "WARNING",
                "LOGFIRE_CONSOLE": "false",
                "LOGFIRE_SEND_TO_LOGFIRE": "false",
            },
        )
    return {name: known[name] for name in names if name in known}


async def measure(
    chosen: dict[str, Server],
    levels: list[int],
    pacing: Pacing,
    warmup: float,
    duration: float,
    work: Path,
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, server in chosen.items():
        gc_log = work / f"gc-{server.name}.json"
        server.env = {**server.env, "BENCH_GC_LOG": str(gc_log)}
        windows: dict[str, tuple[float, float]] = {}
        server.start(work)
        try:
            out[name] = {}
            # An unmeasured first level: what the server allocates once (caches, first use
            # of every code path) is not counted as memory per open stream.
            await Run(pacing, 0.0, min(warmup, 1.0) + pacing.speaking).go(server, min(levels))
            await asyncio.sleep(1.0)
            for clients in levels:
                run = Run(pacing, warmup, duration)
                result = await run.go(server, clients)
                windows[str(clients)] = (run.measure_from, run.measure_to)
                out[name][str(clients)] = result
                print(f"  {name:14s} N={clients:5d} {json.dumps(result)}", flush=True)
                await asyncio.sleep(1.0)  # let the last connections close
        finally:
            server.stop()
        add_gc_pauses(out[name], windows, gc_log)
    return out


async def interleave(
    chosen: dict[str, Server],
    levels: list[int],
    pacing: Pacing,
    warmup: float,
    duration: float,
    rounds: int,
    work: Path,
) -> list[dict[str, dict[str, dict[str, Any]]]]:
    """Every server at every N, round after round: ``Run.go``'s figures.

    All servers stay up (pinned to the same CPU; the idle ones cost nothing) and each N runs
    on each of them back to back, the order reversed every other round: the machine's drift
    in speed, which moves a figure by several percent over a minute, reaches both sides of
    a ratio alike. One dict per round: ``{server: {N: figures}}``.
    """
    for server in chosen.values():
        server.start(work)
    try:
        for server in chosen.values():  # first use of every code path, not measured
            await Run(pacing, 0.0, min(warmup, 1.0) + pacing.speaking).go(server, min(levels))
        out: list[dict[str, dict[str, dict[str, Any]]]] = []
        for index in range(rounds):
            figures: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in chosen}
            order = list(chosen.items())
            for clients in levels:
                for name, server in order if index % 2 == 0 else order[::-1]:
                    result = await Run(pacing, warmup, duration).go(server, clients)
                    figures[name][str(clients)] = result
                    await asyncio.sleep(0.5)  # let the last connections close
            brief = {
                name: {
                    n: (r["first_tts_p99_ms"], r["server_cpu_us_per_turn"]) for n, r in got.items()
                }
                for name, got in figures.items()
            }
            print(
                f"  round {index + 1}/{rounds} (p99 ms, CPU µs/turn) {json.dumps(brief)}",
                flush=True,
            )
            out.append(figures)
        return out
    finally:
        for server in chosen.values():
            server.stop()


def add_gc_pauses(
    results: dict[str, dict[str, Any]], windows: dict[str, tuple[float, float]], log: Path
) -> None:
    """Per level, the server's garbage collections inside the measured window (from the
    server's own log, ``common.gc_probe``): full (generation 2) collections, the longest
    pause of any generation, and the share of the window spent collecting."""
    if not log.exists():
        return
    events = json.loads(log.read_text())
    for level, (start, end) in windows.items():
        inside = [(gen, ms) for at, gen, ms in events if start <= at < end]
        results[level]["gc_full_collections"] = sum(1 for gen, _ in inside if gen == 2)
        results[level]["gc_max_pause_ms"] = round(max((ms for _, ms in inside), default=0.0), 2)
        share = sum(ms for _, ms in inside) / 1000.0 / (end - start)
        results[level]["gc_time_share"] = round(share, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="200,800,1600", help="client counts, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--servers",
        default="floor,ours,sse-starlette,reference",
        help="comma-separated: floor, floor+cpu, ours, ours-metrics, sse-starlette, reference",
    )
    parser.add_argument(
        "--busy-us", type=float, default=0.0, help="floor+cpu: µs of CPU it spends per turn"
    )
    parser.add_argument("--think", type=float, default=0.1)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument(
        "--together", action="store_true", help="all clients start at once (default: spread)"
    )
    parser.add_argument("--ref-python", default=None, help="the reference venv's python")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    raise_nofile()
    _, load_cpus = pinning()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    pacing = Pacing(args.think, args.chunks, args.interval, args.together)
    ref_python = args.ref_python
    if ref_python is None and (HERE / ".ref-venv/bin/python").exists():
        ref_python = str(HERE / ".ref-venv/bin/python")
    chosen = servers(args.servers.split(","), pacing, ref_python, args.busy_us)
    levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as work:
        results = asyncio.run(
            measure(chosen, levels, pacing, args.warmup, args.duration, Path(work))
        )
    if args.out:
        args.out.write_text(json.dumps({"pacing": vars(pacing), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
