"""Benchmark: decoding LayerCode webhook bodies from raw bytes.

For each event type (plus ``session.end`` with a 50-item transcript) these decoders run on
the same bytes:

* ``ours``  -- ``layercode_asgi.events.parse_webhook_payload(raw)``: one typed msgspec pass.
* ``ref``   -- the reference implementation, as its server parses a webhook: ``json.loads``
  then layercode-create-app 0.2.0's own ``parse_webhook_payload`` (a pydantic v2
  ``TypeAdapter`` over the union of its five models). It runs in the reference's own venv
  (``benchmarks/.ref-venv``, Python >= 3.12, made by ``reference/setup_ref.py``), imported
  from the installed package by ``reference/ref_decode.py``, a timing script driven over a
  pipe: no code of the reference is copied into this repository.
* ``best``  -- informational: pydantic at its best on the same fields (``json.loads``, then
  a *discriminated* union of models with plain ``str`` literal tags), in our interpreter,
  to show how much of ``ref``'s cost is the reference's modelling rather than pydantic.
* ``floor`` -- ``msgspec.json.decode(raw)`` untyped (to dicts/lists), timed in *both*
  interpreters: the common baseline. Two processes (and two Python versions) are compared
  through it: ``ref/ours`` is ``(ref / floor in the reference's process) / (ours / floor
  in ours)``; the raw quotient ``ref ns / ours ns`` is shown beside it.

Timing: rounds alternate between the two processes, and within a process every (case,
decoder) pair is sampled back to back, with the cyclic GC left on as in a server
(``--no-gc`` for timeit's default). Each pair's ns/op is the best (min) sample; ratios come
from those bests. ``paired`` (informational) is the median over rounds of the normalised
``ref/ours`` of that round. Targets: ``message`` ref/ours >= 10; ``session.end-50``
ref/ours >= 8 and ours/floor <= 1.25.

Usage::

    python benchmarks/bench_decode.py            # full run; exit 1 if a target is missed
    python benchmarks/bench_decode.py --smoke    # fraction of a second per case; exit 0
    python benchmarks/bench_decode.py --json out.json [--ref-python PATH | --no-reference]

Without the reference's venv the ``ref`` columns stay empty and the targets are not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pydantic
from pydantic import BaseModel, Field, TypeAdapter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from decode_timing import Timers  # noqa: E402
from reference import setup_ref  # noqa: E402

from layercode_asgi.events import parse_webhook_payload  # noqa: E402

# --------------------------------------------------------------------------------------
# The reference implementation, in its own venv
# --------------------------------------------------------------------------------------


class Reference:
    """``reference/ref_decode.py`` running in the reference's venv, one round per request."""

    def __init__(self, python: str, raws: dict[str, bytes], *, sample: float, gc: bool) -> None:
        self.process = subprocess.Popen(
            [python, str(HERE / "reference" / "ref_decode.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYENV_VERSION")},
        )
        bodies = {case: raw.decode() for case, raw in raws.items()}
        hello = self._ask({"bodies": bodies, "sample": sample, "gc": gc})
        self.versions: dict[str, str] = hello["versions"]
        #: the reference's reading of every body (``model_dump(mode="json", exclude_none=True)``)
        self.decoded: dict[str, dict[str, Any]] = hello["decoded"]

    def _ask(self, request: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"ref_decode.py stopped (exit {self.process.wait(30)})")
        return json.loads(line)

    def round(self) -> dict[tuple[str, str], float]:
        sample = self._ask("round")
        return {tuple(key.split("|")): ns for key, ns in sample.items()}

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write('"stop"\n')
            self.process.stdin.close()
            self.process.wait(30)


def default_ref_python() -> str | None:
    venv = setup_ref.DEFAULT_VENV
    return str(setup_ref.venv_python(venv)) if setup_ref.is_ready(venv) else None


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


def _same_meaning(ours: Any, ref_fields: dict[str, Any] | None, best: Any) -> bool:
    """The decoders read the same values (the reference drops fields it does not know).

    ``ref_fields`` is the reference's reading as JSON (``None`` when it is not available).
    """
    ours_fields = msgspec.to_builtins(ours)
    if ref_fields is not None:
        shared = {key: value for key, value in ours_fields.items() if key in ref_fields}
        if shared != ref_fields:
            return False
    return bool(ours_fields == best.model_dump(exclude_none=True))


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
    parser.add_argument(
        "--ref-python",
        metavar="PATH",
        help="the reference venv's Python (default: benchmarks/.ref-venv's, when set up)",
    )
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    args = parser.parse_args(argv)
    sample, rounds = (0.003, 5) if args.smoke else (0.01, 80)
    gc_enabled = not args.no_gc
    ref_python = None if args.no_reference else (args.ref_python or default_ref_python())

    raws = {
        name: json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        for name, body in BODIES.items()
    }
    notes: list[str] = []
    reference = None
    if ref_python is None:
        notes.append(
            "reference not timed: its venv is not set up "
            "(python benchmarks/reference/setup_ref.py) or --no-reference"
        )
    else:
        reference = Reference(ref_python, raws, sample=sample, gc=gc_enabled)
    try:
        env = {
            "python": platform.python_version(),
            "msgspec": msgspec.__version__,
            "pydantic": pydantic.VERSION,
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "mode": "smoke" if args.smoke else "full",
            "gc_enabled_while_timing": gc_enabled,
            "reference": reference.versions if reference else None,
        }
        print(
            f"python {env['python']}  msgspec {env['msgspec']}  pydantic {env['pydantic']}  "
            f"nproc {env['nproc']}  cpu {env['cpu']}  ({env['mode']}, "
            f"gc {'on' if gc_enabled else 'off'} while timing)"
        )
        if reference:
            print("reference venv: " + "  ".join(f"{k} {v}" for k, v in reference.versions.items()))
        for name, raw in raws.items():
            # Same bytes, same meaning: the decoders must agree before they are timed.
            ref_fields = reference.decoded[name] if reference else None
            assert _same_meaning(parse_webhook_payload(raw), ref_fields, best_parse(raw)), name

        fns: dict[str, Callable[[bytes], object]] = {
            "ours": parse_webhook_payload,
            "best": best_parse,
            "floor": msgspec.json.decode,
        }
        timers = Timers(raws, fns, sample=sample, gc_enabled=gc_enabled)
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):  # alternate: both processes see the same conditions
            for key, ns in timers.round().items():
                samples.setdefault(key, []).append(ns)
            if reference:
                for (case, name), ns in reference.round().items():
                    renamed = "ref" if name == "ref" else "ref_floor"
                    samples.setdefault((case, renamed), []).append(ns)
    finally:
        if reference:
            reference.close()
    return report(raws, samples, env, notes, args)


def report(
    raws: dict[str, bytes],
    samples: dict[tuple[str, str], list[float]],
    env: dict[str, Any],
    notes: list[str],
    args: argparse.Namespace,
) -> int:
    """Print the table and the target checks; write the JSON; the exit status."""
    results: list[dict[str, Any]] = []
    header = (
        f"{'case':<16}{'bytes':>7}{'ours ns':>10}{'ref ns':>10}{'best ns':>10}{'floor ns':>10}"
        f"{'ref floor':>11}{'ref/ours':>10}{'raw':>8}{'best/ours':>11}{'ours/floor':>12}"
        f"{'paired':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, raw in raws.items():
        ours, best, floor = (min(samples[name, k]) for k in ("ours", "best", "floor"))
        row: dict[str, Any] = {
            "case": name,
            "bytes": len(raw),
            "ours_ns": round(ours, 1),
            "ref_ns": None,
            "best_ns": round(best, 1),
            "floor_ns": round(floor, 1),
            "ref_floor_ns": None,
            "speedup": None,
            "speedup_raw": None,
            "speedup_vs_best": round(best / ours, 2),
            "floor_ratio": round(ours / floor, 3),
            "speedup_paired_median": None,
        }
        if (name, "ref") in samples:
            ref, ref_floor = min(samples[name, "ref"]), min(samples[name, "ref_floor"])
            paired = statistics.median(
                (r / rf) / (o / f)
                for r, rf, o, f in zip(
                    samples[name, "ref"],
                    samples[name, "ref_floor"],
                    samples[name, "ours"],
                    samples[name, "floor"],
                    strict=True,
                )
            )
            row.update(
                ref_ns=round(ref, 1),
                ref_floor_ns=round(ref_floor, 1),
                speedup=round((ref / ref_floor) / (ours / floor), 2),
                speedup_raw=round(ref / ours, 2),
                speedup_paired_median=round(paired, 2),
            )
        results.append(row)

        def cell(key: str, width: int, unit: str = "", row: dict[str, Any] = row) -> str:
            value = row[key]
            text = "-" if value is None else f"{value:.0f}" if not unit else f"{value:.2f}{unit}"
            return f"{text:>{width}}"

        print(
            f"{name:<16}{len(raw):>7}{cell('ours_ns', 10)}{cell('ref_ns', 10)}"
            f"{cell('best_ns', 10)}{cell('floor_ns', 10)}{cell('ref_floor_ns', 11)}"
            f"{cell('speedup', 10, 'x')}{cell('speedup_raw', 8, 'x')}"
            f"{cell('speedup_vs_best', 11, 'x')}{cell('floor_ratio', 12, 'x')}"
            f"{cell('speedup_paired_median', 9, 'x')}"
        )
    print("(ns/op: best of all rounds. floor = msgspec untyped decode, timed in our process;")
    print(" ref floor = the same in the reference's process. ref/ours = (ref / ref floor) /")
    print(" (ours / floor); raw = ref ns / ours ns; paired: median over rounds of ref/ours)")
    for note in notes:
        print(f"note: {note}")

    print()
    checks: list[dict[str, Any]] = []
    by_case = {row["case"]: row for row in results}
    for case, target in TARGETS.items():
        row = by_case[case]
        if "min_speedup" in target and row["speedup"] is not None:
            checks.append(
                {
                    "case": case,
                    "check": f"ref/ours >= {target['min_speedup']}",
                    "value": row["speedup"],
                    "pass": row["speedup"] >= target["min_speedup"],
                }
            )
        if "max_floor_ratio" in target:
            checks.append(
                {
                    "case": case,
                    "check": f"ours/floor <= {target['max_floor_ratio']}",
                    "value": row["floor_ratio"],
                    "pass": row["floor_ratio"] <= target["max_floor_ratio"],
                }
            )
    for check in checks:
        verdict = "PASS" if check["pass"] else "FAIL"
        print(f"{verdict}  {check['case']:<16} {check['check']:<22} (measured {check['value']})")

    if args.json:
        Path(args.json).write_text(
            json.dumps({"env": env, "results": results, "checks": checks, "notes": notes}, indent=2)
            + "\n"
        )
    if args.smoke:
        return 0
    return 0 if all(check["pass"] for check in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
