"""What recording one turn's metrics costs, in-process: the recorder alone and with each sink.

    python benchmarks/metrics_cost.py [--n 20000] [--rounds 5]

One turn's calls as the webhook makes them (``arrived``, ``lock_acquired``,
``turn_started``, ``finish``), with ``TurnMetrics()`` and no sink, with Prometheus, with
OpenTelemetry (its API, no SDK configured) and with both. Best of ``rounds``, µs per turn.
The paced benchmark's metrics line (``run.py``) is the measure that counts; this one shows
where the microseconds go.
"""

from __future__ import annotations

import argparse
import time
import timeit

from starlette.responses import Response

from layercode_asgi.metrics import MetricsSink, TurnMetrics
from layercode_asgi.otel import OtelMetrics
from layercode_asgi.prometheus import PrometheusMetrics
from layercode_asgi.turns import TurnStatus


class _Turn:
    """What ``TurnMetrics`` reads of a finished turn."""

    status = TurnStatus.COMPLETED
    first_tts_at: float | None = None


def per_turn_us(metrics: TurnMetrics, n: int, rounds: int) -> float:
    response = Response(status_code=200)

    def one() -> None:
        now = time.perf_counter()
        record = metrics.arrived(now, "message", "conv-1", "turn-1")
        metrics.lock_acquired()
        turn = _Turn()
        turn.first_tts_at = now + 0.1
        metrics.turn_started(turn)  # type: ignore[arg-type]
        record.finish(response)

    one()
    return min(timeit.repeat(one, number=n, repeat=rounds)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    prometheus = PrometheusMetrics()
    variants: dict[str, tuple[MetricsSink, ...]] = {
        "recorder, no sink": (),
        "prometheus": (prometheus,),
        "opentelemetry (no SDK)": (OtelMetrics(),),
        "both": (prometheus, OtelMetrics()),
    }
    for name, sinks in variants.items():
        us = per_turn_us(TurnMetrics(*sinks), args.n, args.rounds)
        print(f"{name:24s} {us:5.1f} µs per turn")


if __name__ == "__main__":
    main()
