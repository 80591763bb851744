"""Griffe extension: the package's reST roles shown as code in the API reference.

The docstrings are written for reading in the source and with ``help()``; their Sphinx
roles (``:class:`~layercode_asgi.X```, ``:func:`sign```...) would be rendered literally by
mkdocstrings. This turns each into a Markdown code span of the name as a reader would
write it (the last component after a ``~``), in the docstrings of the loaded package only.
Loaded by mkdocs.yml (``extensions:`` of the python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|data|mod|attr|exc|obj|const):`(?P<tilde>~?)(?P<name>[^`]+)`"
)


def _plain(match: re.Match[str]) -> str:
    name = match["name"]
    if match["tilde"]:
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


class ReSTRoles(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring of the package to ```target```."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_plain, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]
