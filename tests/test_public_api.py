"""The public API's surface (issue 16, 6): what ``__all__`` lists exists and is documented,
and every name a public signature's annotations use can be imported from a public module
(``layercode_asgi``, ``layercode_asgi.testing``, ``layercode_asgi.adapters``): a user can
write the same annotation without reaching into a submodule."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

import layercode_asgi
from layercode_asgi import adapters, testing

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = (layercode_asgi, testing, adapters)
EXPORTED = [(module, name) for module in PUBLIC for name in module.__all__]
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
#: Public signatures that name an internal type on purpose, and why.
INTERNAL_ON_PURPOSE = {
    # ``timeout=`` of a store's lock: a float or None, or left out for the store's default
    # (a sentinel, ``STORE_DEFAULT``, which only the library passes on).
    *(
        (f"layercode_asgi.{store}.lock", "LockTimeout")
        for store in ("ConversationManager", "MemoryConversationStore", "RedisConversationStore")
    ),
}


def _label(module: ModuleType, name: str) -> str:
    return f"{module.__name__}.{name}"


@cache
def _doc_comments(module_name: str) -> frozenset[str]:
    """The names a module documents as the API reference reads them: a ``#:`` comment just
    above the assignment, or a string just below it."""
    lines = inspect.getsource(sys.modules[module_name]).splitlines()
    body = ast.parse("\n".join(lines)).body
    found = set()
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not isinstance(node, ast.Assign | ast.AnnAssign):
            continue
        targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
        commented = node.lineno >= 2 and lines[node.lineno - 2].lstrip().startswith("#:")
        docstring = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if commented or docstring:
            found.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(found)


@pytest.mark.parametrize(("module", "name"), EXPORTED, ids=lambda v: getattr(v, "__name__", v))
def test_every_exported_name_exists_and_is_documented(module: ModuleType, name: str) -> None:
    assert hasattr(module, name), f"{_label(module, name)} is in __all__ but does not exist"
    value = getattr(module, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__dict__.get("__doc__") or value.__doc__, f"{name} has no docstring"
        return
    # A constant or an alias: documented where it is assigned (the module it comes from).
    homes = [m for m in list(sys.modules) if m.startswith("layercode_asgi")]
    documented = name == "__version__" or any(name in _doc_comments(m) for m in homes)
    assert documented, f"{_label(module, name)}: no docstring or #: comment"


@cache
def _imported(module_name: str) -> dict[str, str]:
    """Each name a module imports from this package (also under ``TYPE_CHECKING``): its
    source module."""
    module = sys.modules[module_name]
    package = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                found[alias.asname or alias.name] = source
    return found


def _annotations(value: Any) -> list[str]:
    """The annotations (as written) of a callable's parameters and result."""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return []
    found = [p.annotation for p in signature.parameters.values()]
    found.append(signature.return_annotation)
    return [a if isinstance(a, str) else repr(a) for a in found if a is not inspect.Parameter.empty]


def _signatures() -> list[tuple[str, Any]]:
    """Every public callable: exported functions and classes, and the public methods and
    properties of exported classes (with their class-level field annotations)."""
    found: list[tuple[str, Any]] = []
    for module, name in EXPORTED:
        value = getattr(module, name)
        if inspect.isfunction(value):
            found.append((_label(module, name), value))
        elif inspect.isclass(value) and value.__module__.startswith("layercode_asgi"):
            found.append((_label(module, name), value))
            for attr, member in vars(value).items():
                if attr.startswith("_"):
                    continue
                member = getattr(member, "fget", None) or getattr(member, "__func__", member)
                if inspect.isfunction(member):
                    found.append((f"{_label(module, name)}.{attr}", member))
    return found


def _unimportable(label: str, value: Any) -> list[str]:
    home = value.__module__
    names = vars(sys.modules[home])
    imported = _imported(home)
    texts = _annotations(value)
    if inspect.isclass(value):
        texts += [str(a) for a in inspect.get_annotations(value).values()]
    missing = []
    for ident in sorted({i for text in texts for i in _IDENTIFIER.findall(text)}):
        ours = ident in imported or (
            ident in names and getattr(names[ident], "__module__", "").startswith("layercode_asgi")
        )
        if (
            not ours
            or isinstance(names.get(ident), TypeVar)
            or (label, ident) in INTERNAL_ON_PURPOSE
        ):
            continue
        target = names.get(ident)
        public = any(
            ident in module.__all__ and (target is None or getattr(module, ident) is target)
            for module in PUBLIC
        )
        if not public and not isinstance(target, ModuleType):
            missing.append(ident)
    return missing


@pytest.mark.parametrize(("label", "value"), _signatures(), ids=[s[0] for s in _signatures()])
def test_the_names_of_every_public_signature_are_importable(label: str, value: Any) -> None:
    assert _unimportable(label, value) == [], (
        f"{label}: its annotations name types no public module exports"
    )


def test_the_walkthrough_in_the_package_docstring_names_what_exists() -> None:
    """``layercode_asgi``'s docstring walks one webhook request through the code by name
    (``module.Class.method``): each of those exists. Before, two steps named functions gone
    since (``produce``, ``_locked_turn``)."""
    text = layercode_asgi.__doc__ or ""
    modules = {m.name for m in pkgutil.iter_modules(layercode_asgi.__path__)}
    named = [n for n in re.findall(r"``(\w+(?:\.\w+)+)", text) if n.split(".")[0] in modules]
    assert len(named) > 5
    missing = []
    for dotted in named:
        value: Any = layercode_asgi
        for part in dotted.split("."):
            value = getattr(value, part, None)
            if value is None:
                missing.append(dotted)
                break
    assert missing == []
    for bare in re.findall(r"``(_?[a-z]\w*)``", text):  # a method named without its class
        owners = [vars(sys.modules[m]) for m in list(sys.modules) if m.startswith("layercode_asgi")]
        assert any(
            bare in owner or any(bare in vars(v) for v in owner.values() if inspect.isclass(v))
            for owner in owners
        ), bare


def test_module_level_type_aliases_in_public_signatures_are_exported() -> None:
    """A type alias assigned in one of our modules (``Hook = Callable[[Any], Any]``) is
    a typing object, not a class of ``layercode_asgi``: find those by their assignment."""
    aliases: set[str] = set()
    package = Path(layercode_asgi.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and not node.targets[0].id.startswith("_")
                and isinstance(node.value, (ast.Subscript, ast.BinOp))
            ):
                aliases.add(node.targets[0].id)
    exported = {name for module in PUBLIC for name in module.__all__}
    missing = sorted(
        (label, ident)
        for label, value in _signatures()
        for ident in sorted({i for text in _annotations(value) for i in _IDENTIFIER.findall(text)})
        if ident in aliases and ident not in exported and (label, ident) not in INTERNAL_ON_PURPOSE
    )
    assert missing == []
