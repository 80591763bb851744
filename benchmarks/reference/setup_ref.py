"""Create the reference implementation's venv: ``layercode-create-app`` 0.2.0 on Python >= 3.12.

    python benchmarks/reference/setup_ref.py [--venv DIR] [--python PATH]

The reference requires Python >= 3.12, so it gets its own venv (default
``benchmarks/.ref-venv``, git-ignored), made with the first Python >= 3.12 found: ``--python``,
``$BENCH_REF_PYTHON``, pyenv's installed versions, then ``python3.12``/``python3.13``/
``python3.14`` on ``PATH``. Idempotent: a venv whose stamp matches is reused as it is.
Standard library only (it runs before anything is installed).
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

REF_PACKAGE = "layercode-create-app==0.2.0"
#: The reference's own dependencies already bring these; pinned here so that every server
#: in the benchmark runs under the same uvicorn/uvloop/httptools line-up.
SERVER_PACKAGES = ("uvicorn[standard]",)


def baseline_packages() -> tuple[str, ...]:
    """msgspec at the version ours runs: bench_decode.py's common baseline in both venvs."""
    try:
        return (f"msgspec=={importlib.metadata.version('msgspec')}",)
    except importlib.metadata.PackageNotFoundError:
        return ("msgspec",)


def _stamp_text() -> str:
    return " ".join((REF_PACKAGE, *SERVER_PACKAGES, *baseline_packages()))


DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".ref-venv"
_STAMP = ".bench-ref-installed"


class SetupError(RuntimeError):
    """The reference venv could not be created; the message says why."""


def _version_ok(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(int(sys.version_info >= (3, 12)))"],
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if k != "PYENV_VERSION"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "1"


def find_python(explicit: str | None = None) -> str:
    """A Python >= 3.12 interpreter, or :class:`SetupError` listing what was tried."""
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("BENCH_REF_PYTHON"):
        candidates.append(os.environ["BENCH_REF_PYTHON"])
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for minor in ("12", "13", "14"):
        candidates.extend(
            sorted(glob.glob(f"{pyenv_root}/versions/3.{minor}*/bin/python3.{minor}"))
        )
    for name in ("python3.12", "python3.13", "python3.14"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    for candidate in candidates:
        if _version_ok(candidate):
            return candidate
    raise SetupError(
        "no Python >= 3.12 found (the reference requires it); tried: "
        + (", ".join(candidates) or "nothing")
        + ". Install one (e.g. `pyenv install 3.12`) or set BENCH_REF_PYTHON."
    )


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path) -> bool:
    stamp = venv / _STAMP
    return venv_python(venv).exists() and stamp.exists() and stamp.read_text() == _stamp_text()


def setup(venv: Path = DEFAULT_VENV, python: str | None = None, quiet: bool = True) -> Path:
    """Create (or reuse) the venv; return its Python. Raises :class:`SetupError`."""
    if is_ready(venv):
        return venv_python(venv)
    steps: list[list[str]] = []
    if not _version_ok(str(venv_python(venv))):  # else: a venv of ours to complete
        interpreter = find_python(python)
        if venv.exists():
            shutil.rmtree(venv)
        steps.append([interpreter, "-m", "venv", str(venv)])
    steps.append(
        [
            str(venv_python(venv)),
            "-m",
            "pip",
            "install",
            *(["-q"] if quiet else []),
            "--disable-pip-version-check",
            REF_PACKAGE,
            *SERVER_PACKAGES,
            *baseline_packages(),
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "PYENV_VERSION"}
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            errors = [
                line
                for line in (done.stderr + done.stdout).splitlines()
                if "is ignored: it is neither" not in line
            ]
            raise SetupError(
                f"`{' '.join(step)}` failed ({done.returncode}):\n" + "\n".join(errors[-20:])
            )
    (venv / _STAMP).write_text(_stamp_text())
    return venv_python(venv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--python", help="a Python >= 3.12 to create the venv with")
    args = parser.parse_args()
    try:
        python = setup(args.venv, args.python, quiet=False)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
