"""scripts/bootstrap.sh (shared by scripts/test, scripts/demo and .ci/run), run in a sandbox.

The sandbox is a copy of the script and pyproject.toml with stand-ins on ``PATH``: the
venv's Python, ``apt-get``, ``redis-server`` and ``redis-cli`` only record how they were
called. Nothing is installed and nothing is started for real.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOOLS = (
    "bash",
    "cat",
    "sha256sum",
    "cut",
    "grep",
    "dirname",
    "rm",
    "touch",
    "seq",
    "sleep",
    "chmod",
)

RECORDER = """#!/bin/bash
echo "${{0##*/}} $*" >> "{log}"
{extra}
"""


def _stub(path: Path, log: Path, extra: str = "") -> None:
    path.write_text(RECORDER.format(log=log, extra=extra))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _sandbox(
    tmp_path: Path, *, redis_installed: bool, installed: bool
) -> tuple[Path, Path, dict[str, str]]:
    repo, tools, log = tmp_path / "repo", tmp_path / "tools", tmp_path / "calls.log"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    tools.mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo)
    _stub(repo / ".venv" / "bin" / "python", log, 'echo "Collecting msgspec"')
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    _stub(tools / "id", log, "echo 0")  # as root, so that apt-get is used
    _stub(tools / "redis-cli", log, "exit 1")  # nothing answers on 6379
    redis = tools / "redis-server"
    if redis_installed:
        _stub(redis, log)
    _stub(
        tools / "apt-get",
        log,
        f'printf \'#!/bin/bash\\necho "redis-server $*" >> "{log}"\\n\' > "{redis}"; chmod +x "{redis}"',
    )
    if installed:
        digest = subprocess.run(
            ["sha256sum"],
            input=(repo / "pyproject.toml").read_bytes(),
            capture_output=True,
            check=True,
        ).stdout.decode()[:16]
        (repo / ".venv" / f".installed-{digest}").touch()
    env = {"PATH": str(tools), "HOME": str(tmp_path)}
    return repo, log, env


def _source(repo: Path, env: dict[str, str], *args: str) -> tuple[str, list[str]]:
    done = subprocess.run(
        ["/bin/bash", "-c", 'source scripts/bootstrap.sh "$@"', "bootstrap", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    log = repo.parent / "calls.log"
    return done.stdout, log.read_text().splitlines() if log.exists() else []


def test_first_run_shows_progress_and_installs_redis_without_starting_it(tmp_path: Path) -> None:
    repo, _, env = _sandbox(tmp_path, redis_installed=False, installed=False)
    out, calls = _source(repo, env)
    assert "==> installing layercode-asgi" in out  # said before pip runs...
    assert "Collecting msgspec" in out  # ...and pip's own progress is shown
    pip = [call for call in calls if call.startswith("python -m pip install")]
    assert len(pip) == 1 and " -q" not in pip[0], pip
    assert any(call.startswith("apt-get") and "install" in call for call in calls), calls
    assert "==> installing redis-server" in out
    assert not [call for call in calls if call.startswith("redis-server")], calls


def test_no_daemon_is_started_when_redis_is_installed(tmp_path: Path) -> None:
    repo, _, env = _sandbox(tmp_path, redis_installed=True, installed=True)
    out, calls = _source(repo, env)
    assert not [call for call in calls if call.startswith(("redis-server", "apt-get"))], calls
    assert "6379" not in out


def test_demo_setup_skips_redis(tmp_path: Path) -> None:
    repo, _, env = _sandbox(tmp_path, redis_installed=False, installed=True)
    _, calls = _source(repo, env, "--no-redis")
    assert calls == []
    assert 'bootstrap.sh" --no-redis' in (ROOT / "scripts" / "demo").read_text()


@pytest.mark.skipif(os.name != "posix", reason="bash scripts")
def test_scripts_are_valid_bash() -> None:
    for name in ("bootstrap.sh", "demo", "test"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], check=True, timeout=30)


def _venv_is_current() -> bool:
    digest = subprocess.run(
        ["sha256sum"], input=(ROOT / "pyproject.toml").read_bytes(), capture_output=True, check=True
    ).stdout.decode()[:16]
    return (ROOT / ".venv" / f".installed-{digest}").exists()


@pytest.mark.skipif(
    not _venv_is_current(), reason="the set-up would reinstall .venv: run `bash scripts/test`"
)
def test_demo_script_runs_and_leaves_no_process_behind() -> None:
    """`bash scripts/demo`, as the README says, on a set-up machine."""
    process = subprocess.Popen(
        ["bash", "scripts/demo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait(10)
    assert process.returncode == 0, out
    assert "no protocol violation" in out.lower(), out
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # nothing of its process group is left running
