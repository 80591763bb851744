"""The package as users get it: a wheel and an sdist that PyPI accepts, a demo that runs.

The built wheel is installed into a fresh venv and the demo runs from a temporary working
directory, so nothing from this source tree is on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import layercode_asgi

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_wheel_and_sdist_pass_twine_check_strict(dist: Path) -> None:
    files = [_one(dist, "*.whl"), _one(dist, "*.tar.gz")]
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_version_has_one_home(dist: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    wheel = _one(dist, "*.whl")
    assert wheel.name.startswith(f"layercode_asgi-{layercode_asgi.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    assert f"Version: {layercode_asgi.__version__}\n" in text
    assert "License-Expression: MIT\n" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "layercode_asgi/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "## " in (ROOT / "CHANGELOG.md").read_text()


def test_demo_runs_from_the_installed_wheel(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    wheel = _one(dist, "*.whl")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{wheel}[server]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYENV_VERSION")}
    where = subprocess.run(
        [str(python), "-c", "import layercode_asgi; print(layercode_asgi.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout
    demo = subprocess.run(
        [str(venv / "bin" / "layercode-asgi"), "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "agent: You said: Goodbye." in demo.stdout, demo.stdout
