"""JSON for SSE ``data:`` lines that no line reader cuts in two.

JSON allows U+0085 (NEL), U+2028 (LINE SEPARATOR) and U+2029 (PARAGRAPH SEPARATOR) raw
inside strings, and the SSE specification does not end lines on them either. Yet
Python's ``str.splitlines``, some proxies and other line readers do, and would cut an
event there. Every event this package writes has them escaped (``\\u2028``, ...):
the same JSON value, on one line for every reader.

:func:`decode_json` reads JSON as JavaScript writes it: a ``\\u`` escape of half an emoji
(a lone UTF-16 surrogate, which msgspec refuses) decodes as U+FFFD.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

import msgspec

from .errors import check_text, kind_of

__all__ = [
    "check_json_value",
    "decode_json",
    "encode_json",
    "escape_json_text_line_breaks",
    "number_out_of_range",
    "without_lone_surrogates",
]

_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.decode
_TEXT_BREAKS: Final = re.compile("[\x85\u2028\u2029]")
_TEXT_ESCAPES: Final = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
# In UTF-8 these byte sequences can only be these characters (C2 and E2 are lead bytes).
_BYTE_ESCAPES: Final = tuple(
    (char.encode(), escaped.encode()) for char, escaped in _TEXT_ESCAPES.items()
)


def encode_json(value: Any) -> bytes:
    """``msgspec.json.encode(value)``, with raw U+0085, U+2028 and U+2029 written as ``\\u``
    escapes: outside strings JSON has no place for them, so it is the same JSON value.
    ASCII output (the usual case) is returned as it is, at once."""
    data = _encode(value)
    if data.isascii():
        return data
    for raw, escaped in _BYTE_ESCAPES:
        data = data.replace(raw, escaped)
    return data


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
    except (ValueError, RecursionError):  # not JSON, not UTF-8 (a lone surrogate), too deep
        return text
    return _TEXT_BREAKS.sub(lambda match: _TEXT_ESCAPES[match.group()], text)


# A ``\\u`` escape of a UTF-16 surrogate, not preceded by an escaping backslash: a pair
# (an emoji) or half of one. JavaScript's JSON.stringify writes a string cut inside an emoji
# with a lone half, which msgspec refuses; JSON.parse (and the reference SDK) accept it.
_SURROGATE_ESCAPE: Final = re.compile(
    rb"(?<!\\)((?:\\\\)*)(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)


def without_lone_surrogates(raw: object) -> bytes | None:
    """JSON text ``raw`` with each ``\\u`` escape of a lone UTF-16 surrogate (half an emoji)
    made ``\\ufffd`` (as long: error offsets stay), or ``None`` when it holds none."""
    if not isinstance(raw, str | bytes | bytearray | memoryview):
        return None
    try:
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
    except ValueError:  # a released buffer; a str holding a lone surrogate itself
        return None
    if b"\\u" not in data:
        return None
    repaired = _SURROGATE_ESCAPE.sub(_replace_lone_half, data)
    return None if repaired == data else repaired


def _replace_lone_half(match: re.Match[bytes]) -> bytes:
    return match[0] if len(match[2]) == 12 else match[1] + b"\\ufffd"


def decode_json(data: bytes | bytearray | str) -> Any:
    """``msgspec.json.decode(data)``, where a ``\\u`` escape of half an emoji decodes as
    U+FFFD (as JSON.parse takes it) instead of failing; other errors are msgspec's."""
    try:
        return _decode(data)
    except ValueError:
        repaired = without_lone_surrogates(data)
        if repaired is None:
            raise
    return _decode(repaired)


def number_out_of_range(data: bytes | bytearray | str) -> str | None:
    """The first number of JSON text ``data`` beyond a float's range (``1e400``, as written, cut
    after 40 characters) when that is why :func:`decode_json` refuses it (RFC 8259 allows it)."""
    found: list[str] = []

    def note(text: str) -> float:
        if math.isinf(value := float(text)) and not found:
            found.append(text if len(text) <= 40 else text[:40] + "…")
        return value

    try:
        msgspec.json.Decoder(float_hook=note).decode(without_lone_surrogates(data) or data)
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None


def check_json_value(name: str, value: object) -> None:
    """Raise TypeError (ValueError for a NaN or an infinity), saying where in ``value`` (an
    argument called ``name``), unless JSON carries it as it is: dicts with str keys, lists,
    tuples, str, int, finite float, bool, None. msgspec would send a NaN as null, bytes as
    base64, a set as an array, ``{1: 2}`` as ``{"1": 2}``; a value containing itself, or a
    str with a lone surrogate (msgspec's bare UnicodeEncodeError), is a ValueError."""
    _check_json(name, value, set())


def _check_json(where: str, value: object, open_ids: set[int]) -> None:
    if isinstance(value, str):
        check_text(where, value)  # a lone surrogate: a ValueError
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}: JSON has no NaN or infinity (sent as null)")
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return
    if not isinstance(value, dict | list | tuple):
        raise TypeError(f"{where} is {kind_of(value)}: JSON cannot carry it as it is")
    if id(value) in open_ids:
        raise ValueError(f"{where} contains itself: JSON cannot carry it")
    open_ids.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {key!r:.40}, not a str: JSON keys are strings"
                )
            check_text(f"{where}[{key!r}]", key)
            _check_json(f"{where}[{key!r}]", item, open_ids)
    else:
        for index, item in enumerate(value):
            _check_json(f"{where}[{index}]", item, open_ids)
    open_ids.discard(id(value))
