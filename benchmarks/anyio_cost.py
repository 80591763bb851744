"""What running a turn on anyio costs over native asyncio, per use (uvloop, one task).

    python benchmarks/anyio_cost.py [--n 20000] [--rounds 3]

A turn on trio uses one anyio task group (``EventStreamResponse``'s disconnect watcher; on
asyncio it is a plain task, the figure in RESULTS.md's design notes) and, on both, a few
cancel scopes (the turn's deadline, the lock wait, the shielded record, the body read, the
producer's). Each pair below does the same work, once with anyio and once with asyncio's own
task or ``asyncio.timeout``; the difference, times the uses per turn, is what native asyncio
saves.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio
import uvloop


async def _child() -> None:
    await asyncio.sleep(0)


async def anyio_task_group() -> None:
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_child)
        await asyncio.sleep(0)


async def asyncio_task() -> None:
    task = asyncio.ensure_future(_child())
    await asyncio.sleep(0)
    await task


async def anyio_cancel_scope() -> None:
    with anyio.CancelScope(deadline=anyio.current_time() + 30):
        await asyncio.sleep(0)


async def asyncio_timeout() -> None:
    async with asyncio.timeout(30):
        await asyncio.sleep(0)


async def _per_call_us(fn: Callable[[], Awaitable[None]], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - start) / n * 1e6


async def measure(n: int, rounds: int) -> dict[str, float]:
    """Best of ``rounds`` µs per call, the pairs interleaved."""
    fns = [anyio_task_group, asyncio_task, anyio_cancel_scope, asyncio_timeout]
    best = {fn.__name__: float("inf") for fn in fns}
    for _ in range(rounds):
        for fn in fns:
            best[fn.__name__] = min(best[fn.__name__], await _per_call_us(fn, n))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best = uvloop.run(measure(args.n, args.rounds))
    for name, us in best.items():
        print(f"{name:20s} {us:6.1f} µs per call")
    print(
        f"task group over task: {best['anyio_task_group'] - best['asyncio_task']:.1f} µs; "
        f"cancel scope over asyncio.timeout: "
        f"{best['anyio_cancel_scope'] - best['asyncio_timeout']:.1f} µs"
    )


if __name__ == "__main__":
    main()
