"""Keeping secrets and hostile text out of what we print: URL masking, terminal escaping.

:func:`mask_url` hides the credentials of a URL (a ``REDIS_URL`` in an error message, a
``repr``, a log line) without parsing it as a URL: a password may hold unencoded ``/``,
``#``, ``?`` or ``@``, which a URL parser reads as the start of the path, the fragment or
the query, and would then show. Everything between ``scheme://`` and the *last* ``@`` is
taken as credentials, so a mistake can only hide too much, never show a secret.

:func:`escape_terminal` makes text from a remote party safe to print on a terminal: every
control character (C0, DEL, C1, which includes ESC and the 8-bit CSI/OSC introducers) and
the Unicode line and paragraph separators become visible escapes (``\\x1b``, ``\\u2028``), so
the text can neither move the cursor, set the clipboard nor start a line of its own.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "escape_terminal", "mask_url"]

#: What replaces a secret.
MASK: Final = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
#: C0 controls, DEL, C1 controls, and U+2028 / U+2029 (line / paragraph separator).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def mask_url(url: str) -> str:
    """``url`` with its credentials hidden: ``redis://user:***@host:6379/0``.

    The user name is kept when a ``:`` separates it from a password; credentials without a
    ``:`` are hidden whole (some clients read a lone ``secret@host`` as a password). A URL
    without ``@`` has no credentials and is returned unchanged. Never raises.
    """
    match = _SCHEME.match(url)
    prefix, rest = (url[: match.end()], url[match.end() :]) if match else ("", url)
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{prefix}{user}:{MASK}@{host}" if colon else f"{prefix}{MASK}@{host}"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_terminal(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\n``, …)."""
    return _CONTROL.sub(_escape, text)
