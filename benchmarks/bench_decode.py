"""Benchmark: decoding LayerCode webhook bodies from raw bytes.

For each event type (plus ``session.end`` with a 50-item transcript) three decoders run
on the same bytes, in one process:

* ``ours``  -- ``layercode_asgi.events.parse_webhook_payload(raw)``: one typed msgspec pass.
* ``ref``   -- the reference implementation, as its server parses a webhook: ``json.loads``
  then layercode-create-app 0.2.0's own ``parse_webhook_payload``, a pydantic v2
  ``TypeAdapter`` over the union of its five models (copied verbatim into
  ``reference/ref_events.py``).
* ``best``  -- informational: pydantic at its best on the same fields (``json.loads``, then
  a *discriminated* union of models with plain ``str`` literal tags), to show how much of
  ``ref``'s cost is the reference's modelling rather than pydantic itself.
* ``floor`` -- ``msgspec.json.decode(raw)`` untyped (to dicts/lists), the reference point
  for "cost of just reading the JSON".

Timing: every (case, decoder) pair is sampled in interleaved rounds across the whole run,
with the cyclic GC left on as in a server (``--no-gc`` for timeit's default). Each pair's
ns/op is the best (min) sample; ``ref/ours`` and ``ours/floor`` are ratios of those bests.
``paired`` (informational) is the median over rounds of ``ref/ours`` timed back to back.
Targets: ``message`` ref/ours >= 10; ``session.end-50`` ref/ours >= 8 and ours/floor <= 1.25.

Usage::

    python benchmarks/bench_decode.py            # full run; exit 1 if a target is missed
    python benchmarks/bench_decode.py --smoke    # fraction of a second per case; exit 0
    python benchmarks/bench_decode.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pydantic
from pydantic import BaseModel, Field, TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.ref_events import parse_webhook_payload as _reference_parse

from layercode_asgi.events import parse_webhook_payload

# --------------------------------------------------------------------------------------
# The reference implementation, and pydantic at its best
# --------------------------------------------------------------------------------------

# ``ref``: layercode-create-app 0.2.0's own models, copied verbatim into
# reference/ref_events.py, parsed as its server does: ``json.loads`` of the body, then its
# ``parse_webhook_payload`` (a pydantic ``TypeAdapter`` over the plain union of the five
# models, whose ``type`` fields are enum literals).


def ref_parse(raw: bytes) -> Any:
    return _reference_parse(json.loads(raw))


# ``pydantic-best`` (informational): the same fields declared the way pydantic decodes them
# fastest -- plain ``str`` literals and a *discriminated* union on ``type`` -- to show how
# much of ``ref``'s cost is the reference's modelling rather than pydantic itself. Two
# widenings so that it accepts the same bodies: ``custom_metadata`` is declared
# (PROTOCOL.md §3) and ``TranscriptItem.timestamp`` takes unix milliseconds as well.


class BestSessionStart(BaseModel):
    type: Literal["session.start"]
    session_id: str
    conversation_id: str
    turn_id: str
    text: str | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class BestMessage(BaseModel):
    type: Literal["message"]
    session_id: str
    conversation_id: str
    turn_id: str
    text: str | None = None
    recording_url: str | None = None
    recording_status: str | None = None
    transcript: str | None = None
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class BestData(BaseModel):
    type: Literal["data"]
    session_id: str
    conversation_id: str
    turn_id: str
    data: dict[str, Any]
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class BestSessionUpdate(BaseModel):
    type: Literal["session.update"]
    session_id: str
    conversation_id: str
    recording_status: str | None = None
    recording_url: str | None = None
    recording_duration: float | None = None
    error_message: str | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class BestTranscriptItem(BaseModel):
    role: str
    text: str
    timestamp: int | float | str | None = None


class BestSessionEnd(BaseModel):
    type: Literal["session.end"]
    session_id: str
    conversation_id: str
    agent_id: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration: int | None = None
    transcription_duration_seconds: float | None = None
    tts_duration_seconds: float | None = None
    latency: float | None = None
    ip_address: str | None = None
    country_code: str | None = None
    recording_status: str | None = None
    transcript: list[BestTranscriptItem] | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


BestPayload = Annotated[
    BestSessionStart | BestMessage | BestData | BestSessionUpdate | BestSessionEnd,
    Field(discriminator="type"),
]
BEST_ADAPTER: TypeAdapter[Any] = TypeAdapter(BestPayload)


def best_parse(raw: bytes) -> Any:
    return BEST_ADAPTER.validate_python(json.loads(raw))


def _same_meaning(ours: Any, ref: Any, best: Any) -> bool:
    """The three decoders read the same values (the reference drops fields it does not know)."""
    ours_fields = msgspec.to_builtins(ours)
    ref_fields = ref.model_dump(mode="json", exclude_none=True)
    shared = {key: value for key, value in ours_fields.items() if key in ref_fields}
    return shared == ref_fields and ours_fields == best.model_dump(exclude_none=True)


# --------------------------------------------------------------------------------------
# Realistic bodies
# --------------------------------------------------------------------------------------

_COMMON: dict[str, Any] = {
    "session_id": "sess_01JD8Q5W3YV2X7K9M4N6P8R0TB",
    "conversation_id": "conv_01JD8Q5VZ3H2K8M1N5P7R9T0WX",
    "metadata": {"user_id": "u_48213", "plan": "pro", "locale": "en-GB"},
}

_SENTENCES = [
    "Hi, I'd like to check the status of my order from last Tuesday, please.",
    "Of course! Could you give me the order number? It starts with LC- on your receipt.",
    "Sure, it's LC-20931. I paid with the card ending in 4412.",
    "Thanks. That order shipped yesterday and should arrive by Friday afternoon.",
    "Great. Can I change the delivery address to my office in Málaga instead?",
    "I can request that with the courier; there's no extra fee for a same-city change.",
]


def _transcript(n: int) -> list[dict[str, Any]]:
    return [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "text": _SENTENCES[i % len(_SENTENCES)],
            "timestamp": 1_731_400_000_000 + 2_750 * i,
        }
        for i in range(n)
    ]


def _session_end(n: int) -> dict[str, Any]:
    return {
        "type": "session.end",
        **_COMMON,
        "agent_id": "ag_7f3k2p",
        "started_at": "2024-11-12T08:26:40.000Z",
        "ended_at": "2024-11-12T08:29:57.500Z",
        "duration": 197_500,
        "transcription_duration_seconds": 61.42,
        "tts_duration_seconds": 88.9,
        "latency": 0.734,
        "ip_address": "203.0.113.42",
        "country_code": "GB",
        "recording_status": "enabled",
        "transcript": _transcript(n),
    }


BODIES: dict[str, dict[str, Any]] = {
    "session.start": {
        "type": "session.start",
        **_COMMON,
        "turn_id": "turn_01JD8Q5W4A1B2C3D4E5F6G7H8J",
        "custom_metadata": {"campaign": "winter-sale"},
    },
    "message": {
        "type": "message",
        **_COMMON,
        "turn_id": "turn_01JD8Q5X0K1L2M3N4P5Q6R7S8T",
        "text": "Hi, I'd like to check the status of my order from last Tuesday, please.",
        "recording_url": None,
        "recording_status": None,
    },
    "data": {
        "type": "data",
        **_COMMON,
        "turn_id": "turn_01JD8Q5Y6V7W8X9Y0Z1A2B3C4D",
        "data": {"action": "button_click", "button_id": "confirm_order", "value": 3},
    },
    "session.update": {
        "type": "session.update",
        **_COMMON,
        "recording_status": "completed",
        "recording_url": "https://api.layercode.com/v1/agents/ag_7f3k2p/sessions/sess_01JD8Q5W3YV2X7K9M4N6P8R0TB/recording",
        "recording_duration": 197.5,
    },
    "session.end": _session_end(6),
    "session.end-50": _session_end(50),
}

TARGETS: dict[str, dict[str, float]] = {
    "message": {"min_speedup": 10.0},
    "session.end-50": {"min_speedup": 8.0, "max_floor_ratio": 1.25},
}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _calibrate(timer: timeit.Timer, sample: float) -> int:
    """Loop count for one timing sample of about *sample* seconds."""
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= sample / 5 or number >= 10**7:
            return max(1, round(number * sample / max(elapsed, 1e-9)))
        number *= 10


def measure(
    raws: dict[str, bytes],
    fns: dict[str, Callable[[bytes], object]],
    *,
    sample: float,
    rounds: int,
    gc_enabled: bool,
) -> dict[tuple[str, str], list[float]]:
    """ns/op samples for every (case, decoder), interleaved round by round.

    Shared VMs drift in speed by tens of percent for seconds at a time. Each round times
    every decoder on every case back to back, so all of them see the same conditions
    throughout the run and the best (min) of each -- and their ratios -- compare like
    with like. ``stmt`` is a string so the loop calls the decoder directly (no lambda
    frame per call). With *gc_enabled* the cyclic GC stays on while timing, as in a
    server; plain ``timeit`` switches it off.
    """
    setup = "gc.enable()" if gc_enabled else "pass"
    timers = {
        (case, name): timeit.Timer("fn(raw)", setup=setup, globals={"fn": fn, "raw": raw, "gc": gc})
        for case, raw in raws.items()
        for name, fn in fns.items()
    }
    numbers = {key: _calibrate(timer, sample) for key, timer in timers.items()}
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            samples[key].append(timer.timeit(numbers[key]) / numbers[key] * 1e9)
    return samples


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="short run, always exit 0")
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--no-gc", action="store_true", help="disable the cyclic GC while timing (timeit default)"
    )
    args = parser.parse_args(argv)
    sample, rounds = (0.003, 5) if args.smoke else (0.01, 80)

    env = {
        "python": platform.python_version(),
        "msgspec": msgspec.__version__,
        "pydantic": pydantic.VERSION,
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "mode": "smoke" if args.smoke else "full",
        "gc_enabled_while_timing": not args.no_gc,
    }
    print(
        f"python {env['python']}  msgspec {env['msgspec']}  pydantic {env['pydantic']}  "
        f"nproc {env['nproc']}  cpu {env['cpu']}  ({env['mode']}, "
        f"gc {'on' if env['gc_enabled_while_timing'] else 'off'} while timing)"
    )

    raws = {
        name: json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        for name, body in BODIES.items()
    }
    for name, raw in raws.items():
        # Same bytes, same meaning: both decoders must agree before they are timed.
        assert _same_meaning(parse_webhook_payload(raw), ref_parse(raw), best_parse(raw)), name

    fns: dict[str, Callable[[bytes], object]] = {
        "ours": parse_webhook_payload,
        "ref": ref_parse,
        "best": best_parse,
        "floor": msgspec.json.decode,
    }
    samples = measure(raws, fns, sample=sample, rounds=rounds, gc_enabled=not args.no_gc)

    results: list[dict[str, Any]] = []
    header = (
        f"{'case':<16}{'bytes':>7}{'ours ns':>10}{'ref ns':>10}{'best ns':>10}{'floor ns':>10}"
        f"{'ref/ours':>10}{'best/ours':>11}{'ours/floor':>12}{'paired':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, raw in raws.items():
        ours, ref, best, floor = (min(samples[name, k]) for k in ("ours", "ref", "best", "floor"))
        paired = statistics.median(
            r / o for r, o in zip(samples[name, "ref"], samples[name, "ours"], strict=True)
        )
        row = {
            "case": name,
            "bytes": len(raw),
            "ours_ns": round(ours, 1),
            "ref_ns": round(ref, 1),
            "best_ns": round(best, 1),
            "floor_ns": round(floor, 1),
            "speedup": round(ref / ours, 2),
            "speedup_vs_best": round(best / ours, 2),
            "floor_ratio": round(ours / floor, 3),
            "speedup_paired_median": round(paired, 2),
        }
        results.append(row)
        print(
            f"{name:<16}{len(raw):>7}{ours:>10.0f}{ref:>10.0f}{best:>10.0f}{floor:>10.0f}"
            f"{ref / ours:>9.2f}x{best / ours:>10.2f}x{ours / floor:>11.2f}x{paired:>8.2f}x"
        )
    print("(ns/op: best of all rounds; ref/ours and ours/floor from those bests;")
    print(" paired: median over rounds of the ref/ours ratio measured back to back)")

    print()
    checks: list[dict[str, Any]] = []
    by_case = {row["case"]: row for row in results}
    for case, target in TARGETS.items():
        row = by_case[case]
        if "min_speedup" in target:
            ok = row["speedup"] >= target["min_speedup"]
            checks.append(
                {
                    "case": case,
                    "check": f"ref/ours >= {target['min_speedup']}",
                    "value": row["speedup"],
                    "pass": ok,
                }
            )
        if "max_floor_ratio" in target:
            ok = row["floor_ratio"] <= target["max_floor_ratio"]
            checks.append(
                {
                    "case": case,
                    "check": f"ours/floor <= {target['max_floor_ratio']}",
                    "value": row["floor_ratio"],
                    "pass": ok,
                }
            )
    for check in checks:
        verdict = "PASS" if check["pass"] else "FAIL"
        print(f"{verdict}  {check['case']:<16} {check['check']:<22} (measured {check['value']})")

    if args.json:
        Path(args.json).write_text(
            json.dumps({"env": env, "results": results, "checks": checks}, indent=2) + "\n"
        )
    if args.smoke:
        return 0
    return 0 if all(check["pass"] for check in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
