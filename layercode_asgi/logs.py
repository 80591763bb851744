"""Logging: ``setup_logging`` for the ``layercode_asgi`` loggers, and one line per webhook.

Library modules log through stdlib :mod:`logging` on loggers named ``layercode_asgi.*`` and
never configure anything themselves. An application (or the bundled server) calls
:func:`setup_logging` once at start-up::

    setup_logging(verbose=settings.log_level == "DEBUG", logfire_token=settings.logfire_token)

It touches only the ``layercode_asgi`` logger (level, one stderr handler), not the root
logger; records still propagate to it. Its formats mask every secret :func:`hide_in_logs`
was given in every line, whatever quoted it (message, argument, ``extra=`` field, traceback).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterable
from copy import copy, deepcopy
from datetime import UTC, datetime
from typing import Any, Final

from .config import SETTINGS_FIELDS, URL_FIELDS, Settings
from .errors import check_positive_int, check_type
from .redaction import MASK, mask_urls, url_secrets

__all__ = [
    "LOGGER_NAME",
    "WEBHOOK_LOGGER_NAME",
    "escape_log_value",
    "hide_in_logs",
    "mask_secrets",
    "setup_logging",
]

#: Name of the library's root logger.
LOGGER_NAME: Final = "layercode_asgi"
#: Logger of the one-line-per-webhook access log.
WEBHOOK_LOGGER_NAME: Final = "layercode_asgi.webhook"

LOG_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT: Final = "%Y-%m-%d %H:%M:%S"

# Marks the handlers that setup_logging installed, so a second call reuses them.
_MARK: Final = "_layercode_asgi_handler"

logger = logging.getLogger(LOGGER_NAME)
_webhook_logger = logging.getLogger(WEBHOOK_LOGGER_NAME)


def _marked(target: logging.Logger, kind: str) -> logging.Handler | None:
    for handler in target.handlers:
        if getattr(handler, _MARK, None) == kind:
            return handler
    return None


def _resolve_level(verbose: bool, level: int | str | None) -> int:
    if level is None:
        return logging.DEBUG if verbose else logging.INFO
    if isinstance(level, bool) or not isinstance(level, int | str):
        raise TypeError(f"level must be an int or a str, got {type(level).__name__}")
    if isinstance(level, int):
        check_positive_int(level, "level", zero=True)  # below 0 logs below DEBUG
        return level
    resolved = logging.getLevelName(level.strip().upper())
    if not isinstance(resolved, int):
        raise ValueError(f"unknown log level {level!r}")
    return resolved


def setup_logging(
    verbose: bool = False,
    logfire_token: str | None = None,
    *,
    level: int | str | None = None,
    log_format: str = "text",
) -> None:
    """Configure the ``layercode_asgi`` loggers: one concise line per record on stderr.

    Idempotent: calling it again updates the level and format but never adds a second
    handler.

    Args:
        verbose: log at DEBUG instead of INFO.
        logfire_token: also send logs to Logfire when the ``logfire`` package is installed
            (a warning is logged if it is not); another type than ``str`` raises ``TypeError``.
        level: explicit level (``"WARNING"``, ``logging.ERROR``...), overriding ``verbose``;
            an unknown name or a negative int raises ``ValueError``, another type ``TypeError``.
        log_format: ``"json"``: one JSON object per line (:class:`JsonFormatter`), with the
            record's structured fields (the webhook line's ``event_type``, ``status``…);
            ``"text"`` (the default): one line per record. Any other raises ``ValueError``.
    """
    check_type("verbose", verbose, bool, "a bool")
    check_type("logfire_token", logfire_token, str | None, "a str or None")
    fmt = log_format.strip().lower() if isinstance(log_format, str) else log_format
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r} (text or json)")
    target = logging.getLogger(LOGGER_NAME)
    target.setLevel(_resolve_level(verbose, level))
    formatter = JsonFormatter() if fmt == "json" else _LineFormatter(LOG_FORMAT, DATE_FORMAT)
    handler = _marked(target, "stream")
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        setattr(handler, _MARK, "stream")
        target.addHandler(handler)
    handler.setFormatter(formatter)
    if isinstance(handler, logging.StreamHandler) and handler.stream is not sys.stderr:
        # sys.stderr may have been replaced since the first call (test runners, daemons).
        # setStream flushes the old stream first, which fails if it was closed meanwhile.
        if getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr
        else:
            handler.setStream(sys.stderr)
    if logfire_token:
        _setup_logfire(target, logfire_token)


class _LineFormatter(logging.Formatter):
    """``LOG_FORMAT``, secrets masked, a record's further lines indented, tracebacks cut."""

    def format(self, record: logging.LogRecord) -> str:
        text = mask_secrets(super().format(record))
        return text if text.isprintable() else _one_record(text)

    def formatException(self, ei: Any) -> str:
        return cut_traceback(super().formatException(ei))


class MaskingFormatter(logging.Formatter):
    """The lines of another formatter (``formatter``: its dotted name, built with
    ``options``), secrets masked as :func:`mask_secrets` masks them, and each record one
    as :class:`_LineFormatter` keeps it (the inner formatter's colour codes kept)."""

    def __init__(self, formatter: str, **options: Any) -> None:
        super().__init__()
        module, _, name = formatter.rpartition(".")
        self.inner: logging.Formatter = getattr(importlib.import_module(module), name)(**options)

    def format(self, record: logging.LogRecord) -> str:
        record = _args_cut(record)
        if not (record.exc_info or record.stack_info):
            text = self.inner.format(record)
            if text.isprintable():
                return mask_secrets(text)
        # Format again what the record holds, escaped as _LineFormatter escapes it, so that
        # only the inner formatter's own colour codes are left as they are.
        record = copy(record)
        record.msg = _one_record(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(map(_arg_escaped, record.args))
        elif isinstance(record.args, dict):
            record.args = {key: _arg_escaped(value) for key, value in record.args.items()}
        record.__dict__.pop("color_message", None)  # its codes would show escaped: the plain one
        if record.exc_info:
            record.exc_text = "    " + _one_record(self.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = "    " + _one_record(record.stack_info)
        return mask_secrets(self.inner.format(record))

    def formatException(self, ei: Any) -> str:
        return cut_traceback(self.inner.formatException(ei))


def _arg_escaped(value: object) -> object:
    """A message argument whose text cannot break the line (a number kept as it is)."""
    if isinstance(value, int | float):
        return value
    text = value if isinstance(value, str) else _safe_str(value)
    return value if text.isprintable() else _one_record(text)


def uvicorn_log_config(log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's own loggers (start-up, errors, access),
    what ``run_server`` gives uvicorn: with ``"json"``, :class:`JsonFormatter` lines to
    stderr; else uvicorn's own, through :class:`MaskingFormatter`. Secrets masked in both."""
    if log_format != "json":
        from uvicorn.config import LOGGING_CONFIG

        config = deepcopy(LOGGING_CONFIG)
        streams = {"default": sys.stderr, "access": sys.stdout}  # its handlers' (it asks stdout)
        for name, options in config["formatters"].items():
            options["formatter"] = options.pop("()")
            options["()"] = f"{__name__}.MaskingFormatter"
            stream = streams.get(name)
            colours = stream is not None and stream.isatty() and not os.environ.get("NO_COLOR")
            options["use_colors"] = colours  # on a terminal, unless NO_COLOR (no-color.org)
        return config
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"json": handler},
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["json"], "level": "INFO", "propagate": False},
        },
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the record's ``extra=`` fields (texts and message arguments cut at ``LOG_VALUE_MAX_CHARS``)
    and ``exception`` (:func:`cut_traceback`). All beyond ASCII is escaped, and every line is
    strict JSON: NaN and infinities become ``"nan"``, ``"inf"``, ``"-inf"``; what JSON has no
    type for (bytes, a set, a non-str key) its ``str()``, or ``"<unprintable TYPE>"``."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
            if len(message) > LOG_VALUE_MAX_CHARS:
                message = _args_cut(record).getMessage()
        except Exception:  # an argument's __str__ raised: log what can be logged
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            message = " ".join(map(_safe_str, (record.msg, *args)))
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in record.__dict__.items():
            # color_message: uvicorn's ANSI-coloured copy of the message, kept out
            if key not in _RESERVED and key != "color_message" and not str(key).startswith("_"):
                out.setdefault(key, _cut(value))
        if record.exc_info:
            out["exception"] = cut_traceback(self.formatException(record.exc_info))
        try:
            line = json.dumps(out, ensure_ascii=True, allow_nan=False, default=_safe_str)
        except (ValueError, TypeError, RecursionError):  # NaN, a cycle, a tuple key, a huge int
            line = json.dumps(_jsonable(out, 0), ensure_ascii=True, allow_nan=False)
        return mask_secrets(line)


def _cut(value: object) -> object:
    return cut_log_value(value) if isinstance(value, str) else value


def _args_cut(record: logging.LogRecord) -> logging.LogRecord:
    """``record``, or a copy of it with its text arguments cut (:func:`cut_log_value`):
    uvicorn's access line quotes the request's whole target."""
    args = record.args
    if not isinstance(args, tuple) or all(
        len(a) <= LOG_VALUE_MAX_CHARS for a in args if isinstance(a, str)
    ):
        return record
    record = copy(record)
    record.args = tuple(map(_cut, args))
    return record


def _safe_str(value: object) -> str:
    try:
        return cut_log_value(str(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _jsonable(value: object, depth: int) -> object:
    """``value`` with only what strict JSON can hold (see :class:`JsonFormatter`)."""
    if isinstance(value, str | bool | None):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return value if value.bit_length() < 10_000 else _safe_str(value)
    if depth < 20 and isinstance(value, dict):
        return {
            k if isinstance(k, str) else _safe_str(k): _jsonable(v, depth + 1)
            for k, v in value.items()
        }
    if depth < 20 and isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value]
    return _safe_str(value)


def _one_record(text: str) -> str:
    """``text`` with its further lines indented and control characters escaped (U+2028,
    ``\x1c``… too: only ``\n`` ends a line), so that no line of it can pass for a record."""
    return "\n    ".join(map(_controls_escaped, text.split("\n")))


def _controls_escaped(line: str) -> str:
    """``line`` with its non-printable characters escaped (tabs and backslashes kept)."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else _escaped(c) for c in line)


def _setup_logfire(target: logging.Logger, token: str) -> None:
    try:
        logfire: Any = importlib.import_module("logfire")
    except ImportError:
        target.warning(
            "a Logfire token is set but the logfire package is not installed; "
            "logs stay local (pip install logfire to send them)"
        )
        return
    try:
        logfire.configure(token=token)
        if _marked(target, "logfire") is None:
            handler: logging.Handler = _MaskedRecords(logfire.LogfireLoggingHandler())
            setattr(handler, _MARK, "logfire")
            target.addHandler(handler)
    except Exception as exc:  # a telemetry problem must not stop the server
        target.warning("could not configure Logfire: %s: %s", type(exc).__name__, escape_error(exc))


class _MaskedRecords(logging.Handler):
    """Hands ``inner`` (Logfire's, which takes records, not lines) a copy of each record with
    the secrets masked (message, ``extra=`` fields, traceback); the original is left as is."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__()
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.inner.level:
            self.inner.handle(_masked_record(record))


def _masked_record(record: logging.LogRecord) -> logging.LogRecord:
    out = copy(record)
    try:
        message = record.getMessage()
    except Exception:  # an argument's __str__ raised: the inner handler's to report
        message = ""
    if mask_secrets(message) != message:
        out.msg, out.args = mask_secrets(message), None  # else the template, as logged
    for key, value in record.__dict__.items():
        if key in ("message", "exc_text") and isinstance(value, str):  # a formatter's cache
            out.__dict__[key] = mask_secrets(value)
        elif key not in _RESERVED and not isinstance(value, int | float | None):
            text = value if isinstance(value, str) else _safe_str(value)
            if mask_secrets(text) != text:
                out.__dict__[key] = mask_secrets(text)
    if record.exc_info:
        text = cut_traceback(_PLAIN.formatException(record.exc_info))
        if mask_secrets(text) != text:
            out.msg, out.args = f"{out.getMessage()}\n{mask_secrets(text)}", None
            out.exc_info = out.exc_text = None
    return out


_PLAIN: Final = logging.Formatter()


# -- configured secrets ----------------------------------------------------------------------

#: Shortest secret masked in the log, in characters: a shorter one would mask ordinary words.
MIN_SECRET_CHARS: Final = 8
#: Most secrets kept for masking; past that, the oldest given is dropped.
MAX_HIDDEN_SECRETS: Final = 64

_hidden: dict[str, None] = {}  # insertion-ordered: the oldest first
_hiding = threading.Lock()
# How the hidden secrets read in a line (as given, escaped, JSON-escaped), longest first.
_forms: tuple[str, ...] = ()


def hide_in_logs(*secrets: str | None) -> None:
    """Mask each of ``secrets`` as ``***`` in every line :func:`setup_logging`'s formats
    (and ``run_server``'s uvicorn lines) write from now on, in the process. Only a secret of
    ``MIN_SECRET_CHARS`` characters or more (spaces around it aside) is masked; ``None``
    and shorter ones are ignored. ``create_app`` calls it with :func:`settings_secrets`."""
    global _forms
    with _hiding:
        for secret in secrets:
            check_type("a secret", secret, str | None, "a str or None")
            if secret and len(secret.strip()) >= MIN_SECRET_CHARS:
                _hidden.pop(secret.strip(), None)
                _hidden[secret.strip()] = None
        while len(_hidden) > MAX_HIDDEN_SECRETS:
            del _hidden[next(iter(_hidden))]
        forms = set(_hidden)
        for secret in _hidden:
            escaped = escape_log_value(secret, None)
            forms |= {escaped, json.dumps(secret)[1:-1], json.dumps(escaped)[1:-1]}
        _forms = tuple(sorted(forms, key=len, reverse=True))


def mask_secrets(text: str) -> str:
    """``text`` with every secret given to :func:`hide_in_logs` replaced by ``***``."""
    for form in _forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def settings_secrets(settings: Settings) -> Iterable[str]:
    """The secrets of ``settings`` (each of several comma-separated ones, a URL's password),
    and of the environment's ``*API_KEY`` variables (which model SDKs read)."""
    values = settings.as_dict(mask_secrets=False)
    for spec in SETTINGS_FIELDS:
        value = values[spec.name]
        if spec.secret and value:
            yield from value.split(",") if isinstance(value, str) else value
        elif isinstance(value, str) and spec.name in URL_FIELDS:  # not a text quoting a URL
            yield from url_secrets(value)
    yield from (value for name, value in os.environ.items() if name.upper().endswith("API_KEY"))


# -- values from requests ----------------------------------------------------------------------

#: Longest text :func:`escape_log_value` keeps by default, in characters (before escaping).
LOG_VALUE_MAX_CHARS: Final = 1000
#: Longest traceback ``setup_logging``'s formats keep, in characters (before escaping); each
#: of its lines is cut at ``LOG_VALUE_MAX_CHARS``.
LOG_TRACEBACK_MAX_CHARS: Final = 20 * LOG_VALUE_MAX_CHARS


def cut_log_value(text: str, max_chars: int = LOG_VALUE_MAX_CHARS) -> str:
    """``text`` cut at ``max_chars``, ending with ``…(+N chars)`` when it was longer: how a
    request's value (an id) goes into a log record's field. A longer text has its secrets
    masked (:func:`mask_secrets`) before it is cut."""
    if len(text) <= max_chars:
        return text
    check_positive_int(max_chars, "max_chars", zero=True)
    text = mask_secrets(text)  # first: a secret across the cut would leave its prefix
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}…(+{len(text) - max_chars} chars)"


def cut_traceback(text: str) -> str:
    """A traceback (whose exception text may quote a request) with each line cut at
    ``LOG_VALUE_MAX_CHARS`` and the whole at ``LOG_TRACEBACK_MAX_CHARS``, as
    :func:`cut_log_value` cuts."""
    if len(text) <= LOG_VALUE_MAX_CHARS:
        return text
    return cut_log_value("\n".join(map(cut_log_value, text.split("\n"))), LOG_TRACEBACK_MAX_CHARS)


def escape_log_value(value: object, max_chars: int | None = LOG_VALUE_MAX_CHARS) -> str:
    """Make a value that came from a request safe to put in a log line.

    Every value a client controls (a path, a header, an exception text quoting them) goes
    through this before it reaches a logger, so that it cannot forge a line or drive a
    terminal: one line of printable characters, with JSON's escapes (``\\`` as ``\\\\``;
    ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``; any other non-printable character, bidi
    overrides and lone surrogates included, ``\\uXXXX``); quotes are kept.

    ``bytes`` are read as UTF-8 (undecodable bytes come out as ``\\udcXX``); any other
    object as ``str(value)`` (``<unprintable TYPE>`` if that raises). Text longer than
    ``max_chars`` has its secrets masked (:func:`mask_secrets`), then is cut there and
    ends with ``…(+N chars)``; ``None`` keeps everything, a negative one raises ``ValueError``.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        try:
            text = str(value)
        except Exception:  # an exception whose __str__ raises: logging it must not
            text = f"<unprintable {type(value).__name__}>"
    if max_chars is not None:
        text = cut_log_value(text, max_chars)  # its "…(+N chars)" needs no escape
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escaped, text))


def _escaped(char: str) -> str:
    """``char`` as JSON escapes it (never a quote: it is printable) unless it is printable."""
    return char if char.isprintable() and char != "\\" else json.dumps(char)[1:-1]


def escape_error(exc: BaseException) -> str:
    """:func:`escape_log_value` of an exception (a store's, say) with the credentials of every
    URL it quotes masked (:func:`~layercode_asgi.redaction.mask_urls`), then cut."""
    return cut_log_value(mask_urls(escape_log_value(exc, None)))


# -- one line per webhook --------------------------------------------------------------------

# Attributes a LogRecord already has; ``extra=`` must not overwrite them.
_RESERVED: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


def _value(value: object) -> str:
    """A log-safe token: ``-`` for None, bare when simple, else a JSON string (escaped)."""
    if value is None:
        return "-"
    text = escape_log_value(value)
    if text and not any(c in text for c in ' ="\\'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def log_refused(log: logging.Logger, scope: Any, reason: object) -> None:
    """Log (WARNING) a webhook request refused before its handler ran, with the reason."""
    method, path = escape_log_value(scope.get("method")), escape_log_value(scope.get("path"))
    log.warning("rejected webhook %s %s: %s", method, path, escape_log_value(reason))


def log_slow_body(log: logging.Logger, scope: Any, timeout: float) -> None:
    """Log (WARNING) a webhook request whose body did not arrive within ``timeout`` s."""
    method, path = escape_log_value(scope.get("method")), escape_log_value(scope.get("path"))
    log.warning("webhook body too slow (> %s s) %s %s", timeout, method, path)


def webhook_log_enabled(status: int, *, refused: bool = False) -> bool:
    """Whether :func:`log_webhook` would emit a line for a response with ``status``
    (lets a hot path skip gathering the fields when it would not)."""
    return _webhook_logger.isEnabledFor(_level_for(status, refused))


def _level_for(status: int, refused: bool = False) -> int:
    if status >= 500 and not refused:
        return logging.ERROR
    return logging.WARNING if status >= 400 else logging.INFO


def log_webhook(
    event_type: str | None,
    conversation_id: str | None,
    turn_id: str | None,
    status: int,
    duration_s: float,
    first_tts_s: float | None = None,
    *,
    refused: bool = False,
    **extra: Any,
) -> None:
    """Log one line for a handled webhook on ``layercode_asgi.webhook``.

    ``webhook type=message conversation=c1 turn=t1 status=200 duration_ms=12.3`` followed
    by `` first_tts_ms=4.5`` when ``first_tts_s`` is known (the metrics are on) and
    `` key=value`` for each ``extra``. The same fields (``event_type``,
    ``conversation_id``, ``turn_id``, ``status``, ``duration_ms``, ``first_tts_ms``, extras)
    are attached to the record for structured handlers (``LOG_FORMAT=json``), the ids cut as
    :func:`cut_log_value` cuts them. INFO below 400, WARNING for 4xx, ERROR for 5xx but
    a ``refused`` one (a 503 the server gives by design: a conversation too busy, shutting
    down), WARNING as a 4xx.
    """
    level = _level_for(status, refused)
    if not _webhook_logger.isEnabledFor(level):
        return
    duration_ms = round(duration_s * 1000, 1)
    fields: dict[str, Any] = {  # cut for every handler, not for the JSON format only
        "event_type": _cut(event_type),
        "conversation_id": _cut(conversation_id),
        "turn_id": _cut(turn_id),
        "status": status,
        "duration_ms": duration_ms,
    }
    fmt = "webhook type=%s conversation=%s turn=%s status=%d duration_ms=%.1f"
    args: list[object] = [*map(_value, (event_type, conversation_id, turn_id)), status, duration_ms]
    if first_tts_s is not None:
        fields["first_tts_ms"] = round(first_tts_s * 1000, 1)
        fmt += " first_tts_ms=%.1f"
        args.append(fields["first_tts_ms"])
    for key, value in extra.items():
        fmt += " " + _value(key).replace("%", "%%") + "=%s"
        args.append(_value(value))
        fields[f"extra_{key}" if key in _RESERVED or key in fields else key] = value
    _webhook_logger.log(level, fmt, *args, extra=fields)
