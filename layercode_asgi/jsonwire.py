"""JSON for SSE ``data:`` lines that no line reader cuts in two.

JSON allows U+0085 (NEL), U+2028 (LINE SEPARATOR) and U+2029 (PARAGRAPH SEPARATOR) raw
inside strings, and the SSE specification does not end lines on them either. Yet
Python's ``str.splitlines``, some proxies and other line readers do, and would cut an
event there. Every event this package writes has them escaped (``\\u2028``, ...):
the same JSON value, on one line for every reader.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

__all__ = ["encode_json", "escape_json_line_breaks", "escape_json_text_line_breaks"]

_encode: Final = msgspec.json.Encoder().encode
_TEXT_BREAKS: Final = re.compile("[\x85\u2028\u2029]")
_TEXT_ESCAPES: Final = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
# In UTF-8 these byte sequences can only be these characters (C2 and E2 are lead bytes).
_BYTE_ESCAPES: Final = tuple(
    (char.encode(), escaped.encode()) for char, escaped in _TEXT_ESCAPES.items()
)


def escape_json_line_breaks(data: bytes) -> bytes:
    """``data`` (UTF-8 JSON) with raw U+0085, U+2028 and U+2029 written as ``\\u`` escapes.

    Outside strings JSON has no place for these characters, so the result is the same
    JSON value. ASCII input (the usual case) is returned as it is, at once.
    """
    if data.isascii():
        return data
    for raw, escaped in _BYTE_ESCAPES:
        data = data.replace(raw, escaped)
    return data


def encode_json(value: Any) -> bytes:
    """``msgspec.json.encode(value)``, with :func:`escape_json_line_breaks` applied."""
    data = _encode(value)
    if data.isascii():
        return data
    return escape_json_line_breaks(data)


def escape_json_text_line_breaks(text: str) -> str:
    """``text`` with those characters escaped *if* it is a JSON document, else unchanged.

    For text that may or may not be JSON (an SSE ``data`` given as a ``str``): in JSON the
    escape keeps the value, in other text it would change the text, which SSE carries
    faithfully as it is. The JSON check runs only when such a character is present.
    """
    if text.isascii() or _TEXT_BREAKS.search(text) is None:
        return text
    try:
        msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):  # not JSON, or nested too deep to tell
        return text
    return _TEXT_BREAKS.sub(lambda match: _TEXT_ESCAPES[match.group()], text)
