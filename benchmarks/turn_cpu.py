"""CPU per paced turn, in process: ``create_app`` with a pacing agent against the floor app.

    python benchmarks/turn_cpu.py [--n 400] [--rounds 5] [--duration 4] [--count-scopes]
    python benchmarks/turn_cpu.py --memory [--n 800] [--rounds 1]

No HTTP, no server: N clients in a closed loop call the ASGI app directly (uvloop), each
with its own conversation and signed ``message`` bodies made up front. The agent thinks
``--think`` s, then speaks ``--chunks`` chunks ``--interval`` s apart (paced.py's defaults);
the floor (``floor_app.sleepy_app``) writes the same pacing without any library. Each run
is its own process; ``ours`` and ``floor`` runs alternate, and the medians over ``--rounds``
are reported: CPU µs per turn (this harness's own share included, the same for both) and
ours minus floor. ``--base TREE`` also runs ours from another source tree (``base``),
interleaved: a change measured against the code before it (the paired ratio per round is
the figure to trust: this shared VM moves every run by 10-15 %). ``--count-scopes`` also
counts the anyio cancel scopes entered per turn. ``--memory`` reports, instead of CPU, the
bytes ``tracemalloc`` sees allocated per open turn at steady state (the traced total at
``--samples`` points of the window, each divided by the turns open then; the median), and
ours' top 15 source lines holding it (allocated after the harness built its bodies).

What it showed (N = 400, asyncio): a turn of ``create_app`` enters 5 cancel scopes (the body
read's deadline, the lock-wait scope, the response's cancel scope, the turn's deadline, the
shielded record), about 5 µs each of the ~210 µs per turn; removing three at once (breaking
behaviour) saved 7 % (paired). None can be merged with another: each ends where its own handling
runs (the turn's fallback under the lock, the 503 of a wait, the body's 408). Skipping the
record's scope for the in-memory store (it never waits) saved 3 % (paired), under the bar.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import PATH, message_body, signature  # noqa: E402

_STARTUP = {"type": "lifespan.startup"}


def _scope(body: bytes) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"layercode-signature", signature(body).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _start(app: Any) -> None:
    """Run the app's lifespan startup (``create_app`` has one)."""
    started = asyncio.Event()
    stop = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not started.is_set():
            return _STARTUP
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"].startswith("lifespan.startup"):
            started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    asyncio.get_running_loop().create_task(app(scope, receive, send))
    await asyncio.wait_for(started.wait(), 10)


async def _client(
    app: Any, index: int, n: int, turn_s: float, done: list[int], bodies: list[bytes]
) -> None:
    scopes = [_scope(body) for body in bodies]  # (made before tracemalloc starts: see _run)
    await asyncio.sleep(turn_s * index / n)  # spread, as paced.py does
    never = asyncio.Event()
    turn = 0
    while True:
        body = bodies[turn % 64]
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}  # noqa: B023
            await never.wait()
            return {"type": "http.disconnect"}

        ended = False

        async def send(message: dict[str, Any]) -> None:
            nonlocal ended
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True

        done[1] += 1  # open
        await app(scopes[turn % 64], receive, send)
        done[1] -= 1
        assert ended, "a turn did not end its body"
        done[0] += 1
        turn += 1


async def _run(
    which: str,
    n: int,
    warmup: float,
    duration: float,
    turn_s: float,
    entered: list[int],
    samples: int = 0,
) -> dict[str, Any]:
    if which == "ours":
        import ours_app

        app = ours_app.ours_sleepy()
        await _start(app)
    else:
        import floor_app

        app = floor_app.sleepy_app
    done = [0, 0]  # turns ended, turns open
    bodies = [[message_body("cpu01", i, turn) for turn in range(64)] for i in range(n)]
    tasks = [asyncio.ensure_future(_client(app, i, n, turn_s, done, bodies[i])) for i in range(n)]
    await asyncio.sleep(0)  # every client made its scopes and waits for its first turn
    if samples:
        tracemalloc.start()
    await asyncio.sleep(warmup)
    turns0, scopes0, cpu0 = done[0], entered[0], time.process_time()
    per_turn, top = [], []
    for sample in range(samples):
        await asyncio.sleep(duration / samples)
        per_turn.append(tracemalloc.get_traced_memory()[0] / max(done[1], 1))
        if sample == samples // 2:
            stats = tracemalloc.take_snapshot().statistics("lineno")[:15]
            top = [(str(s.traceback[0]), s.size / max(done[1], 1)) for s in stats]
    if not samples:
        await asyncio.sleep(duration)
    turns, cpu = done[0] - turns0, time.process_time() - cpu0
    scopes = entered[0] - scopes0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    result: dict[str, Any] = {"turns": turns, "cpu_us_per_turn": cpu / max(turns, 1) * 1e6}
    result["scopes_per_turn"] = scopes / max(turns, 1)
    if samples:
        result |= {"bytes_per_open_turn": statistics.median(per_turn), "top": top}
    return result


def _count_scopes() -> list[int]:
    """Count every anyio cancel scope entered (on the running backend's class)."""
    import anyio

    cls = type(anyio.CancelScope())
    entered = [0]
    enter = cls.__enter__

    def counting(self: Any) -> Any:
        entered[0] += 1
        return enter(self)

    cls.__enter__ = counting  # type: ignore[method-assign]
    return entered


def _child(args: argparse.Namespace) -> None:
    import uvloop

    turn_s = args.think + (args.chunks - 1) * args.interval

    async def main() -> dict[str, Any]:
        entered = _count_scopes() if args.count_scopes else [0]
        samples = args.samples if args.memory else 0
        return await _run(args.child, args.n, args.warmup, args.duration, turn_s, entered, samples)

    result = uvloop.run(main())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--think", type=float, default=0.1)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--count-scopes", action="store_true")
    parser.add_argument("--memory", action="store_true", help="tracemalloc bytes per open turn")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument(
        "--base", help="also run ours from this source tree (e.g. another worktree): 'base'"
    )
    parser.add_argument("--child", choices=["ours", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (
        min(args.n, args.rounds, args.chunks, args.samples) < 1
        or not args.duration > 0
        or args.warmup < 0
    ):
        parser.error("--n, --rounds, --chunks and --samples take 1 or more, --duration more than 0")
    if args.child:
        _child(args)
        return
    env = {
        **os.environ,
        "BENCH_THINK": str(args.think),
        "BENCH_SLEEP_CHUNKS": str(args.chunks),
        "BENCH_SLEEP_INTERVAL": str(args.interval),
    }
    common = [f"--{k}={getattr(args, k)}" for k in ("n", "warmup", "duration")]
    common += [f"--think={args.think}", f"--chunks={args.chunks}", f"--interval={args.interval}"]
    common += [f"--samples={args.samples}"]
    common += [f"--{k.replace('_', '-')}" for k in ("count_scopes", "memory") if getattr(args, k)]
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "floor": []}
    if args.base:
        results["base"] = []
    for _ in range(args.rounds):
        for which in results:
            run_env = env if which != "base" else {**env, "PYTHONPATH": args.base}
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "ours" if which == "base" else which,
                    *common,
                ],
                env=run_env,
                check=True,
                timeout=args.warmup + args.duration + 60,
                capture_output=True,
                text=True,
            ).stdout
            results[which].append(json.loads(out.strip().splitlines()[-1]))
            print(which, {k: v for k, v in results[which][-1].items() if k != "top"}, flush=True)
            if not results[which][-1]["turns"]:
                sys.exit(
                    f"error: no {which} turn ended in --duration {args.duration} s: lengthen it"
                )
    if args.memory:
        _report_memory(results)
        return
    medians = {w: statistics.median(r["cpu_us_per_turn"] for r in rs) for w, rs in results.items()}
    for which, rs in results.items():
        turns = statistics.median(r["turns"] for r in rs)
        best = min(r["cpu_us_per_turn"] for r in rs)
        line = f"{which:5s} {medians[which]:6.1f} µs CPU per turn (median of {len(rs)}; "
        line += f"best {best:.1f}; "
        line += f"{turns:.0f} turns per run)"
        if args.count_scopes:
            line += f", {statistics.median(r['scopes_per_turn'] for r in rs):.2f} scopes per turn"
        print(line)
    if args.base:
        paired = statistics.median(
            o["cpu_us_per_turn"] / b["cpu_us_per_turn"]
            for o, b in zip(results["ours"], results["base"], strict=True)
        )
        print(f"ours / base, paired by round: {paired:.3f}")
    for which in sorted(medians.keys() - {"floor"}):
        print(f"{which} - floor: {medians[which] - medians['floor']:.1f} µs per turn")


def _report_memory(results: dict[str, list[dict[str, Any]]]) -> None:
    medians = {
        w: statistics.median(r["bytes_per_open_turn"] for r in rs) for w, rs in results.items()
    }
    for which, value in medians.items():
        print(f"{which:5s} {value:8.0f} B traced per open turn (median of {len(results[which])})")
    for which in sorted(medians.keys() - {"floor"}):
        print(f"{which} - floor: {medians[which] - medians['floor']:.0f} B per open turn")
    print("ours: top 15 lines (B per open turn, one snapshot):")
    for where, size in results["ours"][0]["top"]:
        print(f"  {size:8.0f}  {where}")


if __name__ == "__main__":
    main()
