"""Paced streaming with history on Redis: one worker with the memory store, one worker with
Redis, two workers with Redis.

    python benchmarks/paced_redis.py [--levels 200,800] [--duration 8] [--out results-redis.json]

The same closed loop as ``paced.py`` (every turn: think 100 ms, then 10 chunks 50 ms apart;
each client one conversation, whose turns come one after another, so no turn waits for
another). Per variant and N: turns/s, errors, p50/p99 of the first ``response.tts`` minus
the think time and of the turn's extra duration, the server's CPU per turn (all its worker
processes), Redis's CPU per turn, and
the Redis commands per turn from ``INFO commandstats``: the scripts clients ran (each one
round trip: ``EVALSHA``) and every command run, inside scripts included.

The server processes run on the first CPU, the load generator on the rest, and
``redis-server`` with the load (``--redis-cpu load``, default: it stands for a Redis server
of its own) or with the server (``--redis-cpu server``).
Writes its JSON (``--out``) and a markdown table (``--markdown``, default
``benchmarks/RESULTS-redis.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import raise_nofile  # noqa: E402
from loadgen import Server, cpu_seconds, free_port, pinning, rss_kib  # noqa: E402
from paced import Pacing, Run, summarise  # noqa: E402

#: What our client sends (one round trip each): scripts only (``INFO commandstats`` counts
#: the commands run inside a script too, so it cannot tell a client's ``GET`` from a
#: script's; ``tests/test_redis_scale.py`` checks with MONITOR that nothing else is sent).
SENT = ("evalsha", "eval")


def ours_redis_sleepy() -> Any:
    """``create_app`` with the paced agent and history on ``REDIS_URL`` (uvicorn factory)."""
    from common import SECRET
    from ours_app import sleepy

    from layercode_asgi import Settings, create_app

    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        redis_url=os.environ["REDIS_URL"],
    )
    return create_app(settings, agent=sleepy)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's workers)."""
    pids, index = [pid], 0
    while index < len(pids):
        current = pids[index]
        index += 1
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(child) for child in children)
    return pids


def _tree_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in _tree(pid) if Path(f"/proc/{p}").exists())


def _tree_rss(pid: int) -> int:
    return sum(rss_kib(p) for p in _tree(pid) if Path(f"/proc/{p}").exists())


class Redis:
    """A ``redis-server`` for the run, no persistence, pinned to ``cpus``."""

    def __init__(self, work: Path, cpus: set[int] | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def command(self, *args: str) -> str:
        """One command over a fresh connection (inline protocol); a bulk reply's text."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            data = b""
            while b"\r\n" not in data:
                data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n")
            if not head.startswith(b"$"):
                return head.decode()
            size = int(head[1:])
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        return rest[:size].decode()

    def commandstats(self) -> dict[str, int]:
        stats: dict[str, int] = {}
        for line in self.command("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line.partition(":")
                calls = dict(part.split("=") for part in rest.split(","))["calls"]
                stats[name.removeprefix("cmdstat_")] = int(calls)
        return stats

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


async def _level(
    server: Server,
    redis: Redis | None,
    pacing: Pacing,
    clients: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """``paced.Run.go`` measured over every worker process, plus Redis's share."""
    run = Run(pacing, warmup, duration)
    start = time.monotonic()
    run.measure_from = start + warmup
    run.measure_to = run.measure_from + duration
    rss_before = _tree_rss(server.pid)
    tasks = run.launch(server.port, clients)
    await asyncio.sleep(warmup)
    stats0 = redis.commandstats() if redis else {}
    redis_cpu0 = cpu_seconds(redis.process.pid) if redis else 0.0
    cpu0, load0, t0 = _tree_cpu(server.pid), time.process_time(), time.monotonic()
    rss_peak = rss_before
    while time.monotonic() < run.measure_to:
        await asyncio.sleep(0.5)
        rss_peak = max(rss_peak, _tree_rss(server.pid))
    cpu1, load1, t1 = _tree_cpu(server.pid), time.process_time(), time.monotonic()
    stats1 = redis.commandstats() if redis else {}
    redis_cpu1 = cpu_seconds(redis.process.pid) if redis else 0.0
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            run.level.error(type(result).__name__)
    turns = len(run.level.first_tts)
    out = summarise(
        run.level,
        clients=clients,
        seconds=t1 - t0,
        server_cpu=cpu1 - cpu0,
        load_cpu=load1 - load0,
        rss_growth_kib=rss_peak - rss_before,
        turns=turns,
    )
    if redis is not None and turns:
        # Turns are counted by when they were sent, commands while the window was open:
        # close enough over thousands of turns.
        delta = {k: v - stats0.get(k, 0) for k, v in stats1.items()}
        delta["info"] = delta.get("info", 0) - 1  # our own INFO
        sent = sum(delta.get(name, 0) for name in SENT)
        total = sum(v for k, v in delta.items() if k != "info")
        out["redis_round_trips_per_turn"] = round(sent / turns, 2)
        out["redis_commands_per_turn"] = round(total / turns, 2)
        out["redis_commands"] = {k: v for k, v in sorted(delta.items()) if v > 0 and k != "info"}
        out["redis_cpu_us_per_turn"] = round((redis_cpu1 - redis_cpu0) / turns * 1e6, 1)
    return out


#: name: (uvicorn factory, workers, needs Redis, label)
VARIANTS = {
    "memory-1": ("ours_app:ours_sleepy", 1, False, "memory, 1 worker"),
    "redis-1": ("paced_redis:ours_redis_sleepy", 1, True, "Redis, 1 worker"),
    "redis-2": ("paced_redis:ours_redis_sleepy", 2, True, "Redis, 2 workers"),
}


async def measure(
    variants: list[str],
    levels: list[int],
    pacing: Pacing,
    warmup: float,
    duration: float,
    work: Path,
    redis_cpus: set[int] | None,
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in variants:
        spec, workers, needs_redis, _ = VARIANTS[name]
        redis = Redis(work, redis_cpus) if needs_redis else None
        env = {**pacing.env(), **({"REDIS_URL": redis.url} if redis else {})}
        server = Server(f"paced-{name}", sys.executable, HERE, spec, True, env, workers)
        try:
            server.start(work)
            await asyncio.sleep(1.0 if workers > 1 else 0.2)  # every worker listening
            out[name] = {}
            for clients in levels:
                result = await _level(server, redis, pacing, clients, warmup, duration)
                out[name][str(clients)] = result
                print(f"  {name:9s} N={clients:5d} {json.dumps(result)}", flush=True)
                await asyncio.sleep(1.0)
        finally:
            server.stop()
            if redis is not None:
                redis.stop()
    return out


def markdown(
    results: dict[str, dict[str, Any]], pacing: Pacing, duration: float, redis_cpu: str
) -> str:
    where = (
        "redis-server on the load generator's CPUs (standing for a Redis server of its own)"
        if redis_cpu == "load"
        else "redis-server on the server's CPU"
    )
    lines = [
        "# Paced streaming with history on Redis",
        "",
        f"`python benchmarks/paced_redis.py`: think {pacing.think * 1000:.0f} ms, then "
        f"{pacing.chunks} chunks {pacing.interval * 1000:.0f} ms apart; each client one "
        "conversation, its turns one after another, the clients' first turns spread over "
        f"one turn; {duration:g} s measured per level. Server processes on one CPU, "
        f"{where}. Round trips: commands sent to Redis per turn; commands: every "
        "command Redis ran per turn, inside scripts included (`INFO commandstats`).",
        "",
        "| variant | N | turns/s | errors | first tts p50 / p99 (ms) | extra p50 / p99 (ms) "
        "| server CPU/turn (µs) | Redis CPU/turn (µs) | round trips/turn | commands/turn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, levels in results.items():
        for n, r in levels.items():
            lines.append(
                f"| {VARIANTS[name][3]} | {n} | {r['turns_per_s']} | {r['errors']} "
                f"| {r['first_tts_p50_ms']} / {r['first_tts_p99_ms']} "
                f"| {r['extra_p50_ms']} / {r['extra_p99_ms']} "
                f"| {r['server_cpu_us_per_turn']} | {r.get('redis_cpu_us_per_turn', '—')} "
                f"| {r.get('redis_round_trips_per_turn', '—')} "
                f"| {r.get('redis_commands_per_turn', '—')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="200,800", help="client counts, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS-redis.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--redis-cpu",
        choices=("load", "server"),
        default="load",
        help="pin redis-server with the load generator (default: Redis stands for a "
        "server of its own) or with the server under test",
    )
    args = parser.parse_args(argv)
    raise_nofile()
    server_cpus, load_cpus = pinning()
    redis_cpus = load_cpus if args.redis_cpu == "load" else server_cpus
    variants = [v.strip() for v in args.variants.split(",")]
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    pacing = Pacing()
    levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as work:
        results = asyncio.run(
            measure(variants, levels, pacing, args.warmup, args.duration, Path(work), redis_cpus)
        )
    if args.out:
        args.out.write_text(json.dumps({"pacing": vars(pacing), "results": results}, indent=2))
    args.markdown.write_text(markdown(results, pacing, args.duration, args.redis_cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
