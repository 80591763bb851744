"""The soak script: its audit catches loss and reordering, and its smoke run passes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from layercode_asgi import ConversationManager, HistoryMessage, RedisConversationStore

from .redis_fixtures import running_redis

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
assert spec is not None and spec.loader is not None
soak = importlib.util.module_from_spec(spec)
sys.modules["soak"] = soak  # dataclasses look their module up
spec.loader.exec_module(soak)


def test_audit_counts_lost_and_reordered_entries() -> None:
    with running_redis() as redis:

        async def scenario() -> object:
            async with ConversationManager(RedisConversationStore(redis.url)) as history:
                for role, text in [("user", "a"), ("assistant", "c"), ("user", "b")]:
                    await history.add_message("c1", HistoryMessage(role=role, text=text))
            summary = soak.Summary(duration_s=0, conversations=1, workers=1)
            wanted = [("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d")]
            await soak.audit(redis.url, {"c1": wanted}, summary)
            return summary

        summary = anyio.run(scenario)
    assert summary.history_entries_expected == 4
    assert summary.history_entries_lost == 1  # ("assistant", "d") never stored
    assert summary.history_entries_out_of_order == 2  # b and c swapped


@pytest.mark.slow
def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    temporary = tmp_path / "tmp"  # soak.py's Redis directory: not the shared system temp dir
    temporary.mkdir()
    result = subprocess.run(
        [sys.executable, "scripts/soak.py", "--smoke", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temporary)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = msgspec.json.decode(out.read_bytes())
    assert report["ok"] is True
    assert report["turns_answered"] == report["turns_sent"] > 20
    assert report["history_entries_lost"] == 0
    assert report["history_entries_out_of_order"] == 0
    assert report["errors"] == 0


@pytest.mark.parametrize(
    "arguments",
    [["--workers", "0"], ["--conversations", "0"], ["--duration", "nan"], ["--duration", "0"]],
)
def test_arguments_that_cannot_run_are_a_usage_error(
    arguments: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --workers 0 ended in a ZeroDivisionError traceback (after starting Redis),
    # --conversations 0 in a failed run with nothing to say why, --duration nan ran forever.
    monkeypatch.setattr(sys, "argv", ["soak.py", *arguments])
    with pytest.raises(SystemExit) as exited:
        soak.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {arguments[0]} must be" in err
    assert "Traceback" not in err
