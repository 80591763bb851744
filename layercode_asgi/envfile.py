"""``.env`` files: one ``KEY=VALUE`` per line, read without executing anything.

Errors name the file, the line number and (where it can be read) the variable, never the
line's text: a garbled line may be part of a secret.

Not ``starlette.config.Config``'s reader (checked on Starlette 1.10): it keeps a BOM and
``export`` in the key and an inline comment in the value (``v # comment``), reads a FIFO or
a huge file unbounded, and skips a bad line without a word.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import SettingsError
from .redaction import escape_terminal

__all__ = [
    "MAX_SETTINGS_FILE_BYTES",
    "chosen_env_file",
    "parse_env_file",
    "read_settings_file",
    "settings_sources",
]


class _LineProblem(Exception):
    """What is wrong with one line (its text is never quoted)."""


_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
#: A quoted value and what follows it: single quotes literal, double quotes with escapes.
_QUOTED = {"'": re.compile(r"'([^']*)'(.*)"), '"': re.compile(r'"((?:[^"\\]|\\.)*)"(.*)')}


def _parse_env_line(line: str) -> tuple[str, str] | None:
    """Parse one line; ``None`` for blank lines and comments; ``_LineProblem`` when garbled."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("export") and text[6:7] in (" ", "\t"):
        text = text[6:].lstrip()
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep:
        raise _LineProblem("expected KEY=VALUE")
    if not _KEY_RE.fullmatch(key):
        raise _LineProblem("invalid variable name (letters, digits, '_' and '.' only)")
    rest = rest.lstrip()
    if not rest:
        return key, ""
    quote = rest[0]
    if quote not in ("'", '"'):
        # Unquoted: an inline comment starts at whitespace followed by '#'.
        match = re.search(r"\s#", rest)
        value = rest[: match.start()] if match else rest
        return key, value.strip()
    quoted = _QUOTED[quote].fullmatch(rest)
    if quoted is None:
        raise _LineProblem(f"{key}: unterminated {quote} quote (values span one line only)")
    value, trailing = quoted[1], quoted[2].strip()
    if trailing and not trailing.startswith("#"):
        raise _LineProblem(f"{key}: unexpected text after the closing quote")
    if quote == '"':
        value = re.sub(r"\\(.)", lambda escape: _ESCAPES.get(escape[1], escape[0]), value)
    return key, value


#: A settings file (``.env``, a system prompt) is small: a bigger one is refused unread.
MAX_SETTINGS_FILE_BYTES = 1 << 20
#: Garbled lines an error names; the rest are counted (a file of them is not a .env file).
_MAX_NAMED_LINES = 10


def read_settings_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a small settings file. ``OSError`` as ``open`` raises it; ``ValueError``
    when it is not a regular file (a device, a pipe, a directory: endless, or waiting for a
    writer) or is over :data:`MAX_SETTINGS_FILE_BYTES`, read no further."""
    # Non-blocking: opening a FIFO nobody writes returns at once (then is refused).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    with os.fdopen(fd, "rb") as stream:
        data = stream.read(MAX_SETTINGS_FILE_BYTES + 1)
    if len(data) > MAX_SETTINGS_FILE_BYTES:
        raise ValueError("larger than 1 MiB")
    return data


def parse_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``.env`` file into a dict; a missing file gives ``{}``.

    Supports ``KEY=VALUE``, an optional ``export`` prefix, ``#`` comments and blank lines,
    single quotes (literal) and double quotes (with ``\\n``, ``\\t``, ``\\"``, ``\\\\``
    escapes), and inline `` #`` comments after unquoted values. Later keys win. Raises
    :class:`SettingsError` naming the file and line of every garbled line, or the file if
    :func:`read_settings_file` refuses it.
    """
    file = escape_terminal(str(Path(path)))  # as the errors show it
    try:
        data = read_settings_file(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError([f"{file}: cannot read the file ({exc.strerror or exc})"]) from exc
    except ValueError as exc:
        raise SettingsError([f"{file}: cannot read the file: {exc}"]) from None
    try:
        content = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        # Named by its line and variable: the value (perhaps a secret) is never shown.
        lines = re.split(rb"\r\n?|\n", exc.object[: exc.start])
        key = re.match(rb"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=", lines[-1])
        where = f"line {len(lines)}: " + (f"{key[1].decode()}: " if key else "")
        raise SettingsError([f"{file}, {where}not valid UTF-8 ({exc.reason})"]) from None
    values: dict[str, str] = {}
    problems: list[str] = []
    # Lines end at line feeds only (reading translated \r\n and \r): str.splitlines also
    # splits at U+2028, U+0085, form feeds…, which a value may hold.
    for number, line in enumerate(content.split("\n"), start=1):
        try:
            parsed = _parse_env_line(line)
        except _LineProblem as exc:
            problems.append(f"{file}, line {number}: {exc}")
            continue
        if parsed is not None:
            values[parsed[0]] = parsed[1]
    if problems:
        if len(problems) > _MAX_NAMED_LINES:
            more = len(problems) - _MAX_NAMED_LINES
            problems[_MAX_NAMED_LINES:] = [f"{file}: {more} more garbled lines"]
        raise SettingsError(problems)
    return values


def settings_sources(
    env_file: str | os.PathLike[str] | None, environ: Mapping[str, str] | None
) -> tuple[Mapping[str, str], dict[str, str]]:
    """What ``Settings`` reads: ``environ`` (default ``os.environ``) and the values of
    ``env_file`` (none for ``None``); a :class:`SettingsError` naming either argument when
    it is not a mapping (with ``str`` keys), a path."""
    if environ is not None:
        kind = type(environ).__name__
        if isinstance(environ, Mapping):  # os.environb: its keys are bytes
            kind = next(
                (f"a {type(k).__name__} key" for k in environ if not isinstance(k, str)), ""
            )
        if kind:
            raise SettingsError([f"environ: expected a mapping such as os.environ, got {kind}"])
    if env_file is not None and not isinstance(env_file, str | os.PathLike):
        kind = type(env_file).__name__
        raise SettingsError([f"env_file: expected a path (str or os.PathLike) or None, got {kind}"])
    dotenv = parse_env_file(env_file) if env_file is not None else {}
    return (os.environ if environ is None else environ), dotenv


def chosen_env_file(given: str | None, environ: Mapping[str, str]) -> str:
    """The env file of ``serve``, ``simulate`` and ``app_from_env``: ``given`` (``--env-file``),
    else the one ``LAYERCODE_ENV_FILE`` names, else ``.env``; ``''`` for none. A file named
    either way that does not exist is a :class:`SettingsError` (``.env`` may be missing)."""
    named = f"--env-file {given}"
    if given is None:
        given = environ.get("LAYERCODE_ENV_FILE", ".env")
        named = f"LAYERCODE_ENV_FILE={given}"
    if given not in ("", ".env") and not os.path.exists(given):
        raise SettingsError([f"{escape_terminal(named)}: no such file"])
    return given
