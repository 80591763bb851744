"""The benchmark harness runs end to end (``benchmarks/run.py --smoke``), so it cannot rot.

Needs ``wrk`` (the harness installs the Debian package when missing and it runs as root);
without it the end-to-end part is skipped by the harness with a note, and this test still
checks everything else. The reference server is used when its venv already exists
(``benchmarks/.ref-venv``); the smoke run never installs it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

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
    assert results["failures"] == [], results["failures"]
    # every part ran and measured something
    assert results["micro"]["signature"]["rate_ratio"] > 0
    assert {row["case"] for row in results["micro"]["decode"]["results"]} >= {"message"}
    assert results["micro"]["turn_encoding"]["results"]["ours_turn"]["best_ns"] > 0
    # the headline: paced streaming turns, every server at the smoke level
    paced = results["paced"]["results"]
    for name in ("floor", "ours", "sse-starlette"):
        level = paced[name]["20"]
        assert level["turns"] > 0 and level["errors"] == 0, (name, level)
        assert level["first_tts_p99_ms"] is not None, (name, level)
    assert any(t["target"].startswith("paced: p99") for t in results["targets"])
    p99 = results["paced"]["p99_rounds"]
    assert len(p99) == 1 and p99[0]["ours"]["20"] > 0 and p99[0]["floor"]["20"] > 0, p99
    # the floor made as costly per turn as ours ran in the same rounds (its extra CPU may be
    # 0 here: a smoke window holds a few 10 ms clock ticks of server CPU, too coarse to tell
    # ours from the floor every time)
    assert p99[0]["floor+cpu"]["20"] > 0, p99
    assert isinstance(results["paced"]["busy_us"], float), results["paced"]
    assert results["paced"]["pacing"]["together"] is False  # starts spread over a turn
    target = next(t for t in results["targets"] if t["target"].startswith("paced: p99"))
    assert "interleaved rounds" in target["how"] and "N=20: " in target["how"], target
    assert "more CPU per turn (as much as ours, `floor+cpu`): N=20: " in target["how"], target
    # the metrics' cost: ours and ours-metrics interleaved, a CPU figure per server per round
    rounds = results["paced"]["metrics_rounds"]
    assert len(rounds) == 1 and rounds[0]["ours"]["20"] > 0, rounds
    assert rounds[0]["ours-metrics"]["20"] > 0, rounds
    cost = next(t for t in results["targets"] if t["target"].startswith("paced: metrics on"))
    assert cost["measured"].endswith("%") and "N=20:" in cost["how"], cost
    crowd = results["concurrency"]["ours"][0]
    assert crowd["streams"] == 20 and crowd["errors"] == 0, crowd
    if "e2e" in results:
        servers = results["e2e"]["servers"]
        for name in ("floor", "ours", "ours_sse_starlette", "ours_no_history"):
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
    assert "## Paced streaming: the work real agents do (the headline)" in report
    assert "Smoke run" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the committed results are left alone
    assert "smoke run" not in (ROOT / "benchmarks" / "RESULTS.md").read_text()[:400]


REF_VENV = ROOT / "benchmarks" / ".ref-venv"


def _reference_sources() -> list[Path]:
    found = sorted(REF_VENV.glob("lib/python3*/site-packages/layercode_create_app/**/*.py"))
    if not found:
        pytest.skip("the reference venv (benchmarks/.ref-venv) is not installed here")
    return found


_TRIVIAL = re.compile(r"""\A(#.*|\"\"\".*|["']?[\w.]+["']?,?|[()\[\]{},:]*)\Z""")


def _windows(text: str, size: int = 6) -> set[tuple[str, ...]]:
    """Every run of ``size`` consecutive lines that are code (stripped; blank lines,
    comments, brackets and lone names such as import lists of the same API left out)."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if not _TRIVIAL.match(line)]
    return {tuple(lines[i : i + size]) for i in range(len(lines) - size + 1)}


def test_no_code_of_the_reference_is_in_the_repository() -> None:
    """The reference is run from its installed package, never copied: no file tracked here
    shares six consecutive lines with any of its modules."""
    theirs: set[tuple[str, ...]] = set()
    for path in _reference_sources():
        theirs |= _windows(path.read_text(errors="replace"))
    assert len(theirs) > 100  # the check has something to compare with
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked
    copied = [
        name
        for name in tracked
        if (ROOT / name).exists() and _windows((ROOT / name).read_text()) & theirs
    ]
    assert copied == []


def test_decode_benchmark_compares_like_with_like() -> None:
    """Every decoder reads the same values from every benchmark body: ours and pydantic-best
    here, the reference in its own venv (when it is installed)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_decode
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    raws = {
        name: json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        for name, body in bench_decode.BODIES.items()
    }
    ref_python = bench_decode.default_ref_python()
    reference = (
        bench_decode.Reference(ref_python, raws, sample=0.0001, gc=True) if ref_python else None
    )
    try:
        for name, raw in raws.items():
            ref_fields = reference.decoded[name] if reference else None
            assert bench_decode._same_meaning(
                bench_decode.parse_webhook_payload(raw), ref_fields, bench_decode.best_parse(raw)
            ), name
        if reference:
            assert reference.versions["layercode-create-app"] == "0.2.0"
            sample = reference.round()  # one timing round: the pipe protocol works
            assert set(sample) == {(case, name) for case in raws for name in ("ref", "floor")}
            assert all(ns > 0 for ns in sample.values())
            # and the check itself can fail: a changed value is noticed
            changed = {**reference.decoded["message"], "text": "changed"}
            assert not bench_decode._same_meaning(
                bench_decode.parse_webhook_payload(raws["message"]),
                changed,
                bench_decode.best_parse(raws["message"]),
            )
    finally:
        if reference:
            reference.close()
    other = json.dumps({**bench_decode.BODIES["message"], "text": "changed"}).encode()
    assert not bench_decode._same_meaning(
        bench_decode.parse_webhook_payload(raws["message"]), None, bench_decode.best_parse(other)
    )


@pytest.mark.timeout(180)
def test_paced_redis_runs_briefly(tmp_path: Path) -> None:
    """``benchmarks/paced_redis.py`` (not part of run.py) shares paced.py's clients: a
    brief run of every variant, so a change there cannot break it unnoticed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out, markdown = tmp_path / "redis.json", tmp_path / "RESULTS-redis.md"
    brief = ["--levels", "4", "--duration", "1", "--warmup", "0.7"]
    written = ["--out", str(out), "--markdown", str(markdown)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paced_redis.py"), *brief, *written],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3, results
    for variant, levels in results.items():
        level = levels["4"]
        assert level["turns"] > 0 and level["errors"] == 0, (variant, level)
    assert "| Redis, 2 workers | 4 |" in markdown.read_text()


def test_the_report_survives_a_measured_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A smoke run on a busy machine measured a p50 latency of 0 ms: the report divided by
    it (ZeroDivisionError, no RESULTS.md). A ratio over 0 is now shown as nan."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report

    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    ours = results["e2e"]["servers"]["ours"]
    ours["lat_p50_ms"] = ours["rps_median"] = 0.0
    text = report.markdown(results)
    assert "latency p50 nan× lower" in text


@pytest.mark.timeout(120)
def test_turn_cpu_measures_turns_and_refuses_an_empty_window() -> None:
    """benchmarks/turn_cpu.py (CPU per paced turn, in process) runs briefly and counts the
    cancel scopes, and with ``--memory`` the bytes per open turn and the lines holding them; a
    window too short for any turn to end is an error, not a made-up figure."""
    script = str(ROOT / "benchmarks" / "turn_cpu.py")
    brief = ["--n=8", "--rounds=1", "--warmup=0.2", "--think=0.02", "--chunks=2"]
    pacing = ["--interval=0.01"]
    done = subprocess.run(
        [sys.executable, script, *brief, *pacing, "--duration=0.6", "--count-scopes"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ours = re.search(
        r"^ours +([\d.]+) µs CPU per turn .*?(\d+) turns per run\), ([\d.]+) scopes",
        done.stdout,
        re.M,
    )
    assert ours is not None, done.stdout
    assert float(ours[1]) > 0 and int(ours[2]) > 0 and float(ours[3]) >= 1, done.stdout
    assert re.search(r"^ours - floor: -?[\d.]+ µs per turn$", done.stdout, re.M), done.stdout

    memory = subprocess.run(
        [sys.executable, script, *brief, *pacing, "--duration=0.6", "--memory", "--samples=2"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert memory.returncode == 0, memory.stdout[-2000:] + memory.stderr[-2000:]
    for which in ("ours", "floor"):
        assert re.search(rf"^{which} +\d+ B traced per open turn", memory.stdout, re.M), (
            memory.stdout
        )
    assert re.search(r"^ours - floor: -?\d+ B per open turn$", memory.stdout, re.M), memory.stdout
    assert "layercode_asgi" in memory.stdout.split("top 15 lines")[1], memory.stdout

    slow_turns = ["--think=1.0", "--duration=0.2"]
    empty = subprocess.run(
        [sys.executable, script, *brief, *pacing, *slow_turns],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert empty.returncode != 0
    assert "no ours turn ended" in empty.stderr, empty.stderr
