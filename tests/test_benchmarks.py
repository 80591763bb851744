"""The benchmark harness runs end to end (``benchmarks/run.py --smoke``), so it cannot rot.

Needs ``wrk`` (the harness installs the Debian package when missing and it runs as root);
without it the end-to-end part is skipped by the harness with a note, and this test still
checks everything else. The reference server is used when its venv already exists
(``benchmarks/.ref-venv``); the smoke run never installs it.
"""

from __future__ import annotations

import importlib.util
import json
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
        for name in ("floor", "ours", "ours_sse_starlette", "stack_floor", "ours_no_history"):
            assert servers[name]["rps_median"] > 0, name
            assert servers[name]["errors"] == 0, (name, servers[name])
            assert servers[name]["ttfb_samples"] > 0, name
    else:
        assert any("wrk" in note for note in results["notes"]), results["notes"]

    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Headline: targets, as ratios measured in this run" in report
    assert "Smoke run" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the committed results are left alone
    assert "smoke run" not in (ROOT / "benchmarks" / "RESULTS.md").read_text()[:400]
