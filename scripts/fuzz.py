"""Long fuzz run: signature header parsing, event decoding and the HTTP surface.

    .venv/bin/python scripts/fuzz.py --examples 100000      # per target

Each target is a hypothesis property run for ``--examples`` generated inputs (no shrinking
database, derandomised off so every run explores anew). Prints one line per target with
the number of inputs, the time taken and the outcome; exits 1 on the first failure, with
the failing input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layercode_asgi import (  # noqa: E402
    InvalidPayloadError,
    SignatureVerificationError,
    parse_webhook_payload,
    sign,
    verify_signature,
)

NOW = 1_700_000_000
header_texts = st.one_of(
    st.text(),
    st.text(alphabet="tv1=,0123456789abcdef \t"),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda t, vs: f"t={t}," + ",".join(f"v1={v}" for v in vs),
        st.text(max_size=20),
        st.lists(st.text(max_size=80), max_size=5),
    ),
)


def header_target(header: str, payload: bytes) -> None:
    try:
        assert verify_signature(payload, header, "whsec_fuzz", now=NOW) is True
        # a pass is only possible for a genuinely valid signature
        assert header.count("v1=") >= 1
    except SignatureVerificationError:
        pass


def roundtrip_target(payload: bytes, secret: str, t: int) -> None:
    assert verify_signature(payload, sign(payload, secret, timestamp=t), secret, now=t)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=12), c, max_size=5),
    max_leaves=30,
)
event_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["message", "session.start", "data", "session.update", "session.end"]
        )
        | st.text(max_size=12)
    },
    optional={
        k: json_values
        for k in (
            "session_id",
            "conversation_id",
            "turn_id",
            "text",
            "data",
            "transcript",
            "metadata",
            "duration",
            "latency",
        )
    },
)


def decode_target(raw: bytes) -> None:
    with contextlib.suppress(InvalidPayloadError):  # anything else fails the run
        parse_webhook_payload(raw)


def http_target(request: dict[str, Any]) -> None:
    from tests.test_fuzz import test_http_surface_never_500_never_leaks_never_lets_unsigned_in as t

    t.hypothesis.inner_test(request)  # type: ignore[attr-defined]


def run(name: str, test: Any, examples: int) -> bool:
    configured = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking cost unless something fails
        suppress_health_check=list(HealthCheck),
    )(test)
    started = time.perf_counter()
    try:
        configured()
    except Exception as exc:  # a property failed: report it
        print(f"{name:<28} FAILED after {time.perf_counter() - started:.1f} s: {exc!r}")
        return False
    print(f"{name:<28} {examples:>9,} inputs  {time.perf_counter() - started:8.1f} s  ok")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20_000, help="inputs per target")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error(f"--examples must be 1 or more, got {args.examples}")
    logging.disable(logging.CRITICAL)  # rejected requests log warnings by design; not news here
    from tests.test_fuzz import requests

    targets = [
        (
            "signature header parsing",
            given(header=header_texts, payload=st.binary(max_size=256))(header_target),
        ),
        (
            "sign/verify round trip",
            given(
                payload=st.binary(max_size=512),
                secret=st.text(min_size=1),
                t=st.integers(0, 10**12),
            )(roundtrip_target),
        ),
        ("event decoding: bytes", given(raw=st.binary(max_size=512))(decode_target)),
        ("event decoding: JSON", given(raw=event_like.map(msgspec.json.encode))(decode_target)),
        ("HTTP surface (create_app)", given(request=requests())(http_target)),
    ]
    ok = True
    for name, test in targets:
        n = args.examples if not name.startswith("HTTP") else max(1, args.examples // 10)
        ok = run(name, test, n) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    raise SystemExit(main())
