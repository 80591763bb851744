"""Supported Pythons and dependency ranges: ``nox -l`` lists the sessions.

* ``tests-3.11``: the whole suite (what ``bash scripts/test`` runs);
* ``quick-3.12``, ``quick-3.13``: the suite without the tests marked ``slow``;
* ``lowest``: the quick suite with every core dependency at the lowest version
  ``pyproject.toml`` declares (``>=X`` read as ``==X``).

With pyenv, make the other Pythons visible first:
``PYENV_VERSION=3.11.7:3.12.1:3.13.0 nox``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
EXTRAS = ".[dev,redis,server]"
#: What the quick suite imports besides the core (the LLM frameworks' tests skip without them).
LOWEST_TEST_DEPS = (
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "fastapi",
    "litestar",
    "httpx-sse",
    "hypercorn",
    "openai",
    "build",
    "twine",
)
QUICK = ("-m", "not slow", "-q")

nox.options.sessions = ["tests", "quick", "lowest"]
nox.options.default_venv_backend = "venv"


def lowest_pins() -> list[str]:
    """``name==X`` for every core dependency declared as ``name>=X``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)>=([0-9][^,;\s]*)", requirement.strip())
        if match is None:
            raise ValueError(f"no lower bound to pin in {requirement!r}")
        pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", EXTRAS)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=["3.12", "3.13"])
def quick(session: nox.Session) -> None:
    session.install("-e", EXTRAS)
    session.run("python", "-m", "pytest", *QUICK, *session.posargs)


@nox.session(python="3.11")
def lowest(session: nox.Session) -> None:
    constraints = Path(session.create_tmp()) / "lowest.txt"
    constraints.write_text("\n".join(lowest_pins()) + "\n")
    session.install("-c", str(constraints), "-e", ".[redis,server]", *LOWEST_TEST_DEPS)
    session.run("python", "-m", "pip", "freeze")
    session.run("python", "-m", "pytest", *QUICK, *session.posargs)
