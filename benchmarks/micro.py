"""Micro benchmarks, in process: signature verification and a turn's SSE encoding.

Timing: every function of a comparison is timed in interleaved rounds (round 1: A, B, C;
round 2: A, B, C; ...), each sample a loop of about ``sample`` seconds calibrated up front.
This VM drifts in speed by tens of percent for seconds at a time; interleaving makes every
function see the same conditions, so the best sample of each -- and the ratio of the
bests -- compare like with like. The paired median (the median over rounds of the ratio
measured back to back) is reported beside it as a robustness check.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import msgspec
from common import SECRET, message_body, signature
from sse_starlette import ServerSentEvent

from layercode_asgi.agents import echo_agent
from layercode_asgi.events import MessagePayload, parse_webhook_payload
from layercode_asgi.signature import verify_signature
from layercode_asgi.turns import Turn


def _calibrate(timer: timeit.Timer, sample: float) -> int:
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= sample / 5 or number >= 10**7:
            return max(1, round(number * sample / max(elapsed, 1e-9)))
        number *= 10


def interleave(
    fns: dict[str, Callable[[], object]], *, sample: float, rounds: int
) -> dict[str, list[float]]:
    """ns per call of each function, one sample per round, interleaved; GC stays on."""
    timers = {
        name: timeit.Timer(fn, setup="gc.enable()", globals={"gc": gc}) for name, fn in fns.items()
    }
    numbers = {name: _calibrate(timer, sample) for name, timer in timers.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]) / numbers[name] * 1e9)
    return samples


def _summary(samples: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        out[name] = {
            "best_ns": round(min(values), 1),
            "median_ns": round(statistics.median(values), 1),
            "paired_vs_base": round(
                statistics.median(b / v for v, b in zip(values, samples[base], strict=True)), 3
            ),
        }
    return out


# -- verify_signature against the bare hmac loop -------------------------------------------


def bench_signature(*, sample: float, rounds: int) -> dict[str, Any]:
    body = message_body("micro", 1)
    header = signature(body)
    t = header.split(",", 1)[0][2:]
    v1 = header.rsplit("v1=", 1)[1]
    key = SECRET.encode()
    sha256 = hashlib.sha256

    def bare() -> bool:
        # exactly: hmac.new(key, f"{t}.".encode() + body, sha256).hexdigest() + compare_digest
        return hmac.compare_digest(hmac.new(key, f"{t}.".encode() + body, sha256).hexdigest(), v1)

    def ours() -> bool:
        return verify_signature(body, header, SECRET)

    assert bare() and ours(), "both must accept the same signed body"
    samples = interleave(
        {"bare_hmac": bare, "verify_signature": ours}, sample=sample, rounds=rounds
    )
    summary = _summary(samples, "bare_hmac")
    best_ratio = summary["bare_hmac"]["best_ns"] / summary["verify_signature"]["best_ns"]
    return {
        "body_bytes": len(body),
        "results": summary,
        # rate of ours / rate of bare = time of bare / time of ours
        "rate_ratio": round(best_ratio, 3),
        "rate_ratio_paired_median": summary["verify_signature"]["paired_vs_base"],
    }


# -- encoding one turn's SSE events ----------------------------------------------------------


def bench_turn_encoding(*, sample: float, rounds: int) -> dict[str, Any]:
    """A whole echo turn's SSE bytes (``response.tts`` + ``response.end``), per turn."""
    event = parse_webhook_payload(message_body("micro", 1))
    assert isinstance(event, MessagePayload)
    text = event.text or ""
    loop = asyncio.new_event_loop()
    collected: list[bytes] = []

    async def emit(chunk: bytes) -> None:
        collected.append(chunk)

    def ours() -> list[bytes]:
        # The whole turn, run to its end on the event loop (which the figure includes).
        collected.clear()
        loop.run_until_complete(Turn(event, echo_agent, timeout=30.0).run(emit))
        return collected

    encode = msgspec.json.encode
    suffix = b',"turn_id":' + encode(event.turn_id) + b"}\n\n"
    reply = f"You said: {text}"

    def ours_encoding() -> list[bytes]:
        # the same expressions as Turn.deliver / Turn.end: prefix + msgspec + suffix
        return [
            b'data: {"type":"response.tts","content":' + encode(reply) + suffix,
            b'data: {"type":"response.end"' + suffix,
        ]

    def sse_starlette() -> list[bytes]:
        return [
            ServerSentEvent(
                data=json.dumps(
                    {
                        "type": "response.tts",
                        "content": f"You said: {text}",
                        "turn_id": event.turn_id,
                    },
                    separators=(",", ":"),
                ),
                sep="\n",
            ).encode(),
            ServerSentEvent(
                data=json.dumps(
                    {"type": "response.end", "turn_id": event.turn_id}, separators=(",", ":")
                ),
                sep="\n",
            ).encode(),
        ]

    def timed() -> tuple[list[bytes], dict[str, list[float]]]:
        ours_bytes = list(ours())
        # Same events, same bytes.
        assert ours_bytes == sse_starlette() == ours_encoding(), (ours_bytes, sse_starlette())
        samples = interleave(
            {
                "ours_turn": ours,
                "ours_encoding": ours_encoding,
                "sse_starlette_events": sse_starlette,
            },
            sample=sample,
            rounds=rounds,
        )
        return ours_bytes, samples

    try:
        ours_bytes, samples = timed()
    finally:
        loop.close()
    summary = _summary(samples, "ours_turn")
    return {
        "events_per_turn": len(ours_bytes),
        "bytes_per_turn": sum(map(len, ours_bytes)),
        "results": summary,
        "ours_encoding_over_ours": round(
            summary["ours_encoding"]["best_ns"] / summary["ours_turn"]["best_ns"], 2
        ),
        "sse_starlette_over_encoding": round(
            summary["sse_starlette_events"]["best_ns"] / summary["ours_encoding"]["best_ns"], 2
        ),
        "sse_starlette_over_ours": round(
            summary["sse_starlette_events"]["best_ns"] / summary["ours_turn"]["best_ns"], 2
        ),
    }
