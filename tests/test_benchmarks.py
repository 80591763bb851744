"""The benchmark harness runs end to end (``benchmarks/run.py --smoke``), so it cannot rot.

Needs ``wrk`` (the harness installs the Debian package when missing and it runs as root);
without it the end-to-end part is skipped by the harness with a note, and this test still
checks everything else. The reference server is used when its venv already exists
(``benchmarks/.ref-venv``); the smoke run never installs it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_smoke_run_writes_its_outputs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "smoke"
    assert results["failures"] == []
    # every part ran and measured something
    assert results["micro"]["signature"]["rate_ratio"] > 0
    assert {row["case"] for row in results["micro"]["decode"]["results"]} >= {"message"}
    assert results["micro"]["turn_encoding"]["results"]["ours_turn"]["best_ns"] > 0
    crowd = results["concurrency"]["ours"][0]
    assert crowd["streams"] == 20 and crowd["errors"] == 0
    if "e2e" in results:
        servers = results["e2e"]["servers"]
        for name in (
            "floor",
            "ours",
            "ours_sse_starlette",
            "stack_floor",
            "ours_no_history",
            "minimal_pipeline",
        ):
            assert servers[name]["rps_median"] > 0, name
            assert servers[name]["errors"] == 0, (name, servers[name])
            assert servers[name]["ttfb_samples"] > 0, name
        if shutil.which("perf") is not None and not any(
            "perf" in note for note in results["notes"]
        ):
            # where each server's CPU goes, natively, as µs per request
            for name in ("floor", "ours"):
                native = results["native"][name]
                assert native["cpu_us_per_request"] > 0, native
                assert any("python" in dso for dso, _, _ in native["by_dso"]), native
    else:
        assert any("wrk" in note for note in results["notes"]), results["notes"]

    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Headline: targets, as ratios measured in this run" in report
    assert "Smoke run" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the committed results are left alone
    assert "smoke run" not in (ROOT / "benchmarks" / "RESULTS.md").read_text()[:400]


REF_EVENTS = ROOT / "benchmarks" / "reference" / "ref_events.py"
MARKER = "# ---- original file below ----\n"


def test_reference_models_are_a_verbatim_copy() -> None:
    """The decode baseline is the reference implementation's own code, byte for byte."""
    text = REF_EVENTS.read_text()
    assert text.count(MARKER) == 1
    copy = text.split(MARKER, 1)[1]
    assert (
        "_WEBHOOK_PAYLOAD_ADAPTER: TypeAdapter[WebhookPayload] = TypeAdapter(WebhookPayload)"
        in copy
    )
    installed = sorted(
        (ROOT / "benchmarks" / ".ref-venv").glob(
            "lib/python3*/site-packages/layercode_create_app/sdk/events.py"
        )
    )
    if not installed:
        pytest.skip("the reference venv (benchmarks/.ref-venv) is not installed here")
    assert copy == installed[0].read_text()


def test_decode_benchmark_compares_like_with_like() -> None:
    """All three decoders read the same values from every benchmark body."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_decode
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name, body in bench_decode.BODIES.items():
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        ref = bench_decode.ref_parse(raw)
        assert type(ref).__module__ == "reference.ref_events", name
        assert bench_decode._same_meaning(
            bench_decode.parse_webhook_payload(raw), ref, bench_decode.best_parse(raw)
        ), name
    # and the check itself can fail: a changed value is noticed
    raw = json.dumps(bench_decode.BODIES["message"]).encode()
    other = json.dumps({**bench_decode.BODIES["message"], "text": "changed"}).encode()
    assert not bench_decode._same_meaning(
        bench_decode.parse_webhook_payload(raw),
        bench_decode.ref_parse(other),
        bench_decode.best_parse(raw),
    )
