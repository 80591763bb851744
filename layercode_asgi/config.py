"""``Settings``: the application's configuration, read from the environment and a ``.env`` file.

Every setting is described once, in :data:`SETTINGS_FIELDS` (attribute name, environment
variable, type, default, description, converter); that table drives parsing, masking and
:func:`settings_table_markdown`. Every problem is collected into one :class:`SettingsError`,
one line naming each variable: ``LAYERCODE_TURN_TIMEOUT: expected a number > 0, got 'abc'``.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import SplitResult, urlsplit

from ._redis import not_a_database
from .apikeys import sendable_key
from .envfile import settings_sources
from .errors import MAX_NUMBER, SettingsError, held_in_host
from .redaction import escape_terminal, mask_url, port_problem

logger = logging.getLogger("layercode_asgi.config")

# Internal, not exported (the CLI's, the logs' and the docs'): SETTINGS_FIELDS, SettingField.
__all__ = ["Settings", "SettingsError", "settings_table_markdown"]


#: The longest quotation of an invalid (non-secret) value in an error message.
_MAX_QUOTED = 80
#: No value: a setting not given, an error quoting none.
_UNSET: Any = object()


class _Invalid(Exception):
    """Raised by a converter: what was expected, and the offending value (if any)."""

    def __init__(self, message: str, value: object = _UNSET) -> None:
        super().__init__(message)
        self.message = message
        self.value = value

    def describe(self, *, secret: bool = False) -> str:
        """The problem, quoting the value unless it is secret."""
        if self.value is _UNSET:
            return self.message
        try:  # repr fails on an int of too many digits (or a hostile __repr__)
            shown = "<hidden>" if secret else repr(self.value)
        except Exception:
            shown = f"<{type(self.value).__name__}>"
        if len(shown) > _MAX_QUOTED:
            shown = shown[: _MAX_QUOTED - 1] + "…"
        return f"{self.message}, got {shown}"


def _fail(expected: str, value: object) -> NoReturn:
    raise _Invalid(f"expected {expected}", value)


def _fail_type(expected: str, value: object) -> NoReturn:
    """Fail naming only the type of ``value`` (a URL, with its password, in a list...)."""
    raise _Invalid(f"expected {expected}, got {type(value).__name__}")


def _split_url(text: str, expected: str, shown: object) -> SplitResult:
    """``urlsplit(text)``, failing with ``expected`` (quoting ``shown``) on a bad URL/port/host."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        _fail(expected, shown)
    return parts if held_in_host(parts.hostname or "") is None else _fail(expected, shown)


# -- converters: each accepts a string (from the environment) or a native value (kwargs) -----


def _utf8(text: str, *, url: bool = False) -> str:
    """``text``, unless it holds a lone surrogate (environment bytes that are not UTF-8);
    the error quotes a ``url`` masked."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            shown = mask_url(text) if url else text
            _fail("UTF-8 text (the value holds bytes that are not UTF-8)", shown)
    return text


def _optional_path(value: object) -> str | None:
    if not isinstance(value, str | None):
        _fail("a string", value)
    return (value or "").strip() or None


def _optional_str(value: object) -> str | None:
    text = _optional_path(value)  # a file name may be any bytes; a text may not
    return None if text is None else _utf8(text)


def _header_value(value: object) -> str | None:
    text = _optional_str(value)
    return None if text is None else _header_values((text,))[0]


def _header_values(value: object) -> tuple[str, ...]:
    """Keys sent in HTTP headers (comma-separated): each :func:`~.apikeys.sendable_key`."""
    keys = _str_list(value)
    if not all(map(sendable_key, keys)):
        _fail("printable ASCII (an HTTP header value)", value)
    return keys


def _non_empty_str(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail("a non-empty string", value)
    return _utf8(value.strip())


def _float_gt0(value: object) -> float:
    try:
        if isinstance(value, str) and value.strip().isascii():  # ASCII digits, as for integers
            number = float(value.strip())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        else:
            _fail("a number > 0", value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond a float's range
        _fail("a number > 0", value)
    if not math.isfinite(number) or number <= 0:
        _fail("a number > 0", value)
    return number


def _int_converter(minimum: int) -> Callable[[object], int]:
    expected = "an integer > 0" if minimum == 1 else f"an integer >= {minimum}"

    def convert(value: object) -> int:
        if isinstance(value, str):
            text = value.strip()
            # int()'s own syntax: single underscores between digits only ("1_000", not "1__0").
            if not re.fullmatch(r"[+-]?[0-9]+(?:_[0-9]+)*", text):
                _fail(expected, value)
            try:
                number = int(text)
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                raise _Invalid(f"expected {expected}, got a number of {len(text)} digits") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            _fail(expected, value)
        if not minimum <= number <= MAX_NUMBER:  # as create_app's check_positive_int
            _fail(expected if number < minimum else f"at most {MAX_NUMBER:g}", value)
        return number

    return convert


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    _fail("a boolean (1/0, true/false, yes/no, on/off)", value)


def _str_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items: Iterable[object] = value.split(",")
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        _fail("a comma-separated string or a list of strings", value)
    result: list[str] = []
    for item in items:
        if not isinstance(item, str):
            _fail("a list of strings", value)
        item = _utf8(item.strip())
        if item:
            result.append(item)
    return tuple(result)


def _http_url(value: object) -> str:
    if not isinstance(value, str):  # (a blank one is the default, never converted)
        _fail_type("an http(s) URL", value)
    text = _utf8(value.strip(), url=True)
    parts = _split_url(text, "an http(s) URL", mask_url(text))
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        _fail("an http(s) URL", mask_url(text))
    return text.rstrip("/")


def _redis_url(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        _fail_type("a string", value)
    text = _utf8((value or "").strip(), url=True)
    if not text:
        return None
    expected = "a redis://, rediss:// or unix:// URL"
    hint = port_problem(text) or "a password's / ? # percent-encoded: %2F %3F %23"  # masked
    parts = _split_url(text, f"{expected} ({hint})", mask_url(text))
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        _fail(expected, mask_url(text))
    if scheme == "unix" and not parts.path:
        _fail("a unix:// URL with a socket path", mask_url(text))
    if not_a_database(text):
        _fail("a database number as its path (a / in a password: %2F)", mask_url(text))
    return text


def _origin(item: str) -> str:
    if item == "*":
        return item
    candidate = item[:-1] if item.endswith("/") else item
    shown = mask_url(item)  # an origin with credentials: an error never shows them
    parts = _split_url(candidate, "'*' or http(s) origins like 'https://app.example.com'", shown)
    if (
        parts.scheme.lower() not in ("http", "https")
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or parts.username is not None
        or any(mark in candidate for mark in "?#*")  # "*": CORS compares whole origins
    ):
        _fail("'*' or http(s) origins like 'https://app.example.com' (no path, no pattern)", shown)
    # As a browser sends it (CORS compares exactly): lower case, without the default port,
    # an internationalised host in punycode (xn--).
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower().rstrip(":")
    if not netloc.isascii():
        host, colon, port = netloc.rpartition(":") if parts.port is not None else (netloc, "", "")
        try:
            # IDNA 2003 maps ß, ς and the joiners where browsers keep them: refused.
            if any(c in host for c in "\u00df\u03c2\u200c\u200d"):
                raise UnicodeError(host)
            netloc = host.encode("idna").decode("ascii") + colon + port
        except UnicodeError:
            _fail("'*' or http(s) origins whose host is a valid domain name (IDNA)", shown)
    if parts.port == (443 if scheme == "https" else 80):
        netloc = netloc.rpartition(":")[0]
    return f"{scheme}://{netloc}"


def _cors_origins(value: object) -> tuple[str, ...]:
    try:
        items = _str_list(value)
    except _Invalid as exc:  # an origin may hold credentials: not quoted
        raise _Invalid(f"{exc.message}, got a {type(value).__name__}") from None
    origins = tuple(_origin(item) for item in items)
    if "*" in origins and len(origins) > 1:
        raise _Invalid(f"'*' cannot be combined with other origins, got {origins!r}")
    return origins


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: object) -> str:
    text = value.strip().upper() if isinstance(value, str) else ""
    text = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(text, text)
    if text in _LEVELS:
        return text
    _fail("one of " + ", ".join(_LEVELS), value)


def _log_format(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in ("text", "json"):
        return value.strip().lower()
    _fail("text or json", value)


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingField:
    """One row of :data:`SETTINGS_FIELDS`: ``name``, ``env`` (its variable), ``type``, ``default``,
    ``doc``, ``secret`` (masked in ``repr``); ``convert`` parses a value."""

    name: str
    env: str
    type: str
    default: Any
    doc: str
    secret: bool = False
    convert: Callable[[object], Any] = field(default=_optional_str, repr=False, compare=False)


_F = SettingField

#: Every setting, in documentation order. This table drives parsing and the docs' settings table.
SETTINGS_FIELDS: tuple[SettingField, ...] = (
    _F("layercode_api_key", "LAYERCODE_API_KEY", "str | None", None,
       "LayerCode API key, used by the authorize route and REST calls.", secret=True,
       convert=_header_value),
    _F("layercode_webhook_secret", "LAYERCODE_WEBHOOK_SECRET", "str | None", None,
       "Webhook signing secret; several comma-separated secrets are accepted for rotation.",
       secret=True),
    _F("layercode_api_url", "LAYERCODE_API_URL", "http(s) URL", "https://api.layercode.com/v1",
       "Base URL of LayerCode's REST API (trailing slash removed).", convert=_http_url),
    _F("redis_url", "REDIS_URL", "redis://, rediss:// or unix:// URL | None", None,
       "Redis for conversation history and locks; unset keeps history in memory.",
       convert=_redis_url),
    _F("redis_cluster", "LAYERCODE_REDIS_CLUSTER", "bool", False,
       "REDIS_URL names a node of a Redis Cluster (history, locks and replay keys spread "
       "over its nodes).", convert=_bool),
    _F("default_model", "DEFAULT_MODEL", "str", "openai:gpt-5-nano",
       "Model used by the built-in LLM agents.", convert=_non_empty_str),
    _F("openai_api_key", "OPENAI_API_KEY", "str | None", None, "OpenAI API key.", secret=True,
       convert=_header_value),
    _F("openai_base_url", "OPENAI_BASE_URL", "http(s) URL | None", None,
       "OpenAI-compatible API of the built-in LLM agents; unset = OpenAI's.",
       convert=lambda value: None if value is None else _http_url(value)),
    _F("google_generativeai_api_key", "GOOGLE_GENERATIVEAI_API_KEY", "str | None", None,
       "Google Generative AI API key.", secret=True, convert=_header_value),
    _F("system_prompt", "LAYERCODE_SYSTEM_PROMPT", "str | None", None,
       "System prompt of the built-in LLM agents; unset = their own short-answers prompt."),
    _F("system_prompt_file", "LAYERCODE_SYSTEM_PROMPT_FILE", "path | None", None,
       "File holding the system prompt (UTF-8), instead of LAYERCODE_SYSTEM_PROMPT.",
       convert=_optional_path),
    _F("logfire_token", "LOGFIRE_TOKEN", "str | None", None,
       "Logfire token; enables Logfire when the logfire package is installed.", secret=True,
       convert=_header_value),
    _F("cors_origins", "LAYERCODE_CORS_ORIGINS", "comma-separated origins", (),
       "Browser origins allowed to call the server ('*' alone, or http(s) origins).",
       convert=_cors_origins),
    _F("authorize_api_keys", "LAYERCODE_AUTHORIZE_API_KEYS", "comma-separated strings", (),
       "API keys guarding the authorize route (X-Api-Key or Bearer); empty = unguarded.",
       secret=True, convert=_header_values),
    _F("turn_timeout", "LAYERCODE_TURN_TIMEOUT", "float > 0 (seconds)", 30.0,
       "Maximum duration of one agent turn.", convert=_float_gt0),
    _F("turn_timeout_message", "LAYERCODE_TURN_TIMEOUT_MESSAGE", "str | None", None,
       "Text spoken when a turn times out; unset = say nothing."),
    _F("turn_grace", "LAYERCODE_TURN_GRACE", "float > 0 (seconds)", 1.0,
       "How long a timed-out turn's last events may take; then it closes.", convert=_float_gt0),
    _F("lock_wait_grace", "LAYERCODE_LOCK_WAIT_GRACE", "float > 0 (seconds)", 5.0,
       "A turn waits for the previous turn of its conversation up to the turn timeout plus "
       "this (its final events and recording); longer: 503.", convert=_float_gt0),
    _F("max_queued_turns", "LAYERCODE_MAX_QUEUED_TURNS", "int >= 0", 8,
       "Turns of one conversation waiting behind the running one, per process; more: 503 "
       "at once.", convert=_int_converter(0)),
    _F("max_body_size", "LAYERCODE_MAX_BODY_SIZE", "int > 0 (bytes)", 1048576,
       "Largest accepted webhook body.", convert=_int_converter(1)),
    _F("signature_tolerance", "LAYERCODE_SIGNATURE_TOLERANCE", "int >= 0 (seconds)", 300,
       "Accepted clock difference for webhook signature timestamps.", convert=_int_converter(0)),
    _F("body_timeout", "LAYERCODE_BODY_TIMEOUT", "float > 0 (seconds)", 10.0,
       "Longest wait for the rest of a request body (slow senders get 408).", convert=_float_gt0),
    _F("replay_protection", "LAYERCODE_REPLAY_PROTECTION", "bool", False,
       "Reject a webhook signature seen before (within the tolerance window) with 409; "
       "shared through Redis when REDIS_URL is set.", convert=_bool),
    _F("keep_history", "LAYERCODE_KEEP_HISTORY", "bool", False,
       "Keep conversation history after session.end.", convert=_bool),
    _F("history_max_messages", "LAYERCODE_HISTORY_MAX_MESSAGES", "int > 0", 200,
       "Messages kept per conversation (oldest dropped first).", convert=_int_converter(1)),
    _F("history_max_conversations", "LAYERCODE_HISTORY_MAX_CONVERSATIONS", "int > 0", 10000,
       "Conversations kept in memory (least recently used dropped first).",
       convert=_int_converter(1)),
    _F("history_max_bytes", "LAYERCODE_HISTORY_MAX_BYTES", "int >= 4 (bytes)", 262144,
       "UTF-8 bytes of text kept per conversation (oldest messages dropped first; a longer "
       "single message is cut to it).", convert=_int_converter(4)),
    _F("history_ttl", "LAYERCODE_HISTORY_TTL", "int >= 0 (seconds)", 86400,
       "Expiry of a conversation's history in Redis; 0 = never expire.",
       convert=_int_converter(0)),
    _F("shutdown_grace_period", "LAYERCODE_SHUTDOWN_GRACE_PERIOD", "float > 0 (seconds)",
       30.0, "On SIGTERM, how long open turns may take to finish (new webhooks get 503).",
       convert=_float_gt0),
    _F("gc_tuning", "LAYERCODE_GC_TUNING", "bool", True,
       "create_app: while it runs, the objects of start-up are frozen out of the garbage "
       "collector's way (gc.freeze), its young passes run every 20,000 allocations instead of "
       "700 and its full passes a tenth as often (undone at shutdown): shorter and fewer "
       "pauses of every open stream.", convert=_bool),
    _F("agent", "LAYERCODE_AGENT", "str", "echo", "Name of the agent to serve.",
       convert=_non_empty_str),
    _F("log_level", "LOG_LEVEL", "DEBUG | INFO | WARNING | ERROR | CRITICAL", "INFO",
       "Log level of the layercode_asgi loggers.", convert=_log_level),
    _F("log_format", "LOG_FORMAT", "text | json", "text",
       "Log lines as text, or one JSON object per line.", convert=_log_format),
    _F("metrics", "LAYERCODE_METRICS", "bool", False,
       "Per-turn metrics: Prometheus at /metrics (extra prometheus) and OpenTelemetry "
       "(extra otel), whichever is installed; see docs/metrics.md.", convert=_bool),
    _F("metrics_api_keys", "LAYERCODE_METRICS_API_KEYS", "comma-separated strings", (),
       "API keys guarding /metrics (Bearer or X-Api-Key); empty = open.",
       secret=True, convert=_header_values),
)  # fmt: skip

_BY_NAME: dict[str, SettingField] = {f.name: f for f in SETTINGS_FIELDS}


def settings_table_markdown() -> str:
    """Render :data:`SETTINGS_FIELDS` as a Markdown table (for docs/settings.md)."""
    rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for spec in SETTINGS_FIELDS:
        empty = spec.default is None or spec.default == ()
        default = "—" if empty else f"`{spec.default}`"
        cells = (f"`{spec.env}`", spec.type, default, spec.doc)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


#: Settings holding a URL, shown with any credentials masked.
URL_FIELDS = frozenset({"redis_url", "layercode_api_url", "openai_base_url"})


def _reject_unknown(names: Iterable[str]) -> None:
    """Raise naming every unknown setting, with a suggestion for likely typos."""
    unknown = sorted(set(names) - _BY_NAME.keys())
    if not unknown:
        return
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, _BY_NAME, n=1)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    plural = "s" if len(unknown) > 1 else ""
    raise SettingsError([f"unknown setting{plural}: {', '.join(described)}"])


def _warn_unknown(names: Iterable[str], where: str) -> None:
    """Warn of each ``LAYERCODE_*`` variable (in any case) no setting reads: a misspelt one
    is ignored."""
    ours = [spec.env[10:] for spec in SETTINGS_FIELDS if spec.env.startswith("LAYERCODE_")]
    ours.append("ENV_FILE")  # the commands' and app_from_env's
    for name in names:
        if re.fullmatch("(?i)LAYERCODE_[A-Z0-9_]+", name) and name[10:] not in ours:
            close = difflib.get_close_matches(name[10:].upper(), ours, n=1)
            hint = f" (did you mean LAYERCODE_{close[0]}?)" if close else ""
            logger.warning("%s (%s) is no setting: ignored%s", name, where, hint)


class Settings:
    """Application settings from keyword arguments, the environment and a ``.env`` file,
    in that precedence, then defaults; an empty value (``FOO=``) means the default.

    Args:
        env_file: ``.env`` file to read (relative to the working directory); ``None`` to
            skip. A missing file is fine.
        environ: the environment to read (default ``os.environ``).
        **fields: values for any attribute in :data:`SETTINGS_FIELDS`; strings are parsed
            the same way as environment values, native values (numbers, lists) are checked.

    Raises:
        SettingsError: (a ``ConfigurationError``) listing every invalid or unknown setting.
    """

    layercode_api_key: str | None
    layercode_webhook_secret: str | None
    layercode_api_url: str
    redis_url: str | None
    redis_cluster: bool
    default_model: str
    openai_api_key: str | None
    openai_base_url: str | None
    google_generativeai_api_key: str | None
    system_prompt: str | None
    system_prompt_file: str | None
    logfire_token: str | None
    cors_origins: tuple[str, ...]
    authorize_api_keys: tuple[str, ...]
    turn_timeout: float
    turn_timeout_message: str | None
    turn_grace: float
    lock_wait_grace: float
    max_queued_turns: int
    max_body_size: int
    signature_tolerance: int
    body_timeout: float
    replay_protection: bool
    keep_history: bool
    history_max_messages: int
    history_max_conversations: int
    history_max_bytes: int
    history_ttl: int
    shutdown_grace_period: float
    gc_tuning: bool
    agent: str
    log_level: str
    log_format: str
    metrics: bool
    metrics_api_keys: tuple[str, ...]

    __slots__ = tuple(spec.name for spec in SETTINGS_FIELDS)

    def __init__(
        self,
        *,
        env_file: str | os.PathLike[str] | None = ".env",
        environ: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> None:
        _reject_unknown(fields)
        env, dotenv = settings_sources(env_file, environ)
        _warn_unknown(env, "the environment")
        _warn_unknown(dotenv, escape_terminal(str(env_file)))
        problems: list[str] = []
        for spec in SETTINGS_FIELDS:
            if spec.name in fields:
                label, raw = spec.name, fields[spec.name]
            else:
                label, raw = spec.env, env.get(spec.env, dotenv.get(spec.env, _UNSET))
            if raw is _UNSET or (isinstance(raw, str) and not raw.strip()):
                value = spec.default
            else:
                try:
                    value = spec.convert(raw)
                except _Invalid as exc:
                    problems.append(f"{label}: {exc.describe(secret=spec.secret)}")
                    continue
            object.__setattr__(self, spec.name, value)
        if problems:
            raise SettingsError(problems)

    @property
    def webhook_secrets(self) -> tuple[str, ...]:
        """The webhook secret(s): ``layercode_webhook_secret`` split on commas, stripped."""
        return _str_list(self.layercode_webhook_secret or "")

    def require(self, *names: str) -> None:
        """Raise :class:`SettingsError` unless every named setting (``"layercode_api_key"``)
        has a value; the error names the variables: ``"LAYERCODE_API_KEY is not set"``."""
        _reject_unknown(names)
        missing = []
        for name in names:
            value = (
                self.webhook_secrets if name == "layercode_webhook_secret" else getattr(self, name)
            )
            if value is None or value == () or value == "":
                missing.append(f"{_BY_NAME[name].env} is not set")
        if missing:
            raise SettingsError(missing)

    def require_webhook_secret(self) -> tuple[str, ...]:
        """Return :attr:`webhook_secrets`, or raise "LAYERCODE_WEBHOOK_SECRET is not set"."""
        self.require("layercode_webhook_secret")
        return self.webhook_secrets

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated like constructor keyword arguments)."""
        return _rebuild({**self.as_dict(mask_secrets=False), **changes})

    def as_dict(self, *, mask_secrets: bool = True) -> dict[str, Any]:
        """Every setting by attribute name; secrets replaced by ``"***"`` unless asked."""
        result: dict[str, Any] = {}
        for spec in SETTINGS_FIELDS:
            value = getattr(self, spec.name)
            if mask_secrets and spec.secret and value:
                value = tuple("***" for _ in value) if isinstance(value, tuple) else "***"
            elif mask_secrets and spec.name in URL_FIELDS and value:
                value = mask_url(value)
            result[spec.name] = value
        return result

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Settings is immutable; use settings.replace(...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Settings is immutable; use settings.replace(...)")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, spec.name) for spec in SETTINGS_FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        # as_dict masks every secret and URL credential: a repr never shows them.
        body = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items())
        return f"Settings({body})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.as_dict(mask_secrets=False),))


def _rebuild(values: dict[str, Any]) -> Settings:
    return Settings(env_file=None, environ={}, **values)
