"""The package's shape, as issue 16 fixed it: modules of one concern (none over 600 lines), on
public APIs only (no private module or name of CPython, asyncio, anyio, sniffio, hashlib or
any other project), and no module reaching into another's private names: a shared helper
gets a home (``_asgi``, ``_redis``...) whose names are public to the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "layercode_asgi"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 600


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _offences(path: Path) -> list[str]:
    """Each import of a private module or name, and each private attribute read from an
    imported module, as ``line: what``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    modules: set[str] = set()  # local names bound to an imported module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if any(map(_private, alias.name.split("."))):
                    found.append(f"{node.lineno}: import {alias.name}")
                modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            # Our own private modules (level > 0: ``from ._asgi import ...``) are the homes
            # of shared helpers; another project's (``anyio._core``) are not ours to use.
            if node.level == 0 and any(map(_private, parts)):
                found.append(f"{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name) and node.module != "__future__":
                    # ``from . import _redis`` imports a module: its names are checked below
                    if node.level and node.module is None:
                        modules.add(alias.asname or alias.name)
                        continue
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                elif node.level and node.module is None:
                    modules.add(alias.asname or alias.name)
    found.extend(
        f"{node.lineno}: {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and _private(node.attr)
    )
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines (split it by concern)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_module_or_name_of_another_module_is_used(path: Path) -> None:
    assert _offences(path) == []


@pytest.mark.parametrize(
    "source",
    [
        "import _hashlib",
        "from anyio._core._eventloop import get_async_backend",
        "from asyncio import _get_running_loop",
        "import asyncio\nasyncio._get_running_loop()",
        "import sniffio._impl",
        "from .webhook import _TurnProducer",
        "from . import sse\nsse._DetachedSend",
    ],
)
def test_the_check_finds_each_kind_of_offence(source: str, tmp_path: Path) -> None:
    """The check itself can fail: each of these is an offence it reports."""
    module = tmp_path / "module.py"
    module.write_text(source + "\n", encoding="utf-8")
    assert _offences(module)


def test_the_check_lets_the_homes_of_shared_helpers_be_used(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "from __future__ import annotations\nfrom ._asgi import read_body\n"
        "from . import _redis\n_redis.connect\nclass A:\n    def __init__(self): ...\n",
        encoding="utf-8",
    )
    assert _offences(module) == []
