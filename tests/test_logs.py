"""``setup_logging`` and ``log_webhook``."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from layercode_asgi.logs import (
    LOGGER_NAME,
    JsonFormatter,
    escape_log_value,
    log_webhook,
    setup_logging,
    webhook_log_enabled,
)


@pytest.fixture(autouse=True)
def restore_library_logger() -> Iterator[logging.Logger]:
    """Undo setup_logging's changes so other tests see the logger as they expect."""
    target = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(target.handlers), target.level, target.propagate
    root_handlers, root_level = list(logging.getLogger().handlers), logging.getLogger().level
    try:
        yield target
    finally:
        target.handlers[:] = handlers
        target.setLevel(level)
        target.propagate = propagate
        assert logging.getLogger().handlers == root_handlers
        assert logging.getLogger().level == root_level


def ours(target: logging.Logger) -> list[logging.Handler]:
    return [h for h in target.handlers if getattr(h, "_layercode_asgi_handler", None)]


def test_setup_is_idempotent_and_sets_levels(restore_library_logger: logging.Logger) -> None:
    target = restore_library_logger
    root_level = logging.getLogger().level
    setup_logging()
    assert target.level == logging.INFO
    assert len(ours(target)) == 1
    setup_logging(verbose=True)
    setup_logging(verbose=True)
    assert len(ours(target)) == 1
    assert target.level == logging.DEBUG
    assert logging.getLogger("layercode_asgi.webhook").isEnabledFor(logging.DEBUG)
    setup_logging(level="warning")
    assert target.level == logging.WARNING
    assert logging.getLogger().level == root_level  # the root logger is left alone
    with pytest.raises(ValueError):
        setup_logging(level="chatty")


@pytest.mark.parametrize("level", [3.5, True, b"INFO", ["INFO"]])
def test_a_log_level_of_another_type_is_refused(
    restore_library_logger: logging.Logger, level: Any
) -> None:
    # Before: an AttributeError ("'float' object has no attribute 'strip'"), or True taken
    # as level 1.
    target = restore_library_logger
    before = target.level
    with pytest.raises(TypeError, match="level must be an int or a str, got"):
        setup_logging(level=level)
    assert target.level == before


def test_an_unknown_log_format_is_refused(restore_library_logger: logging.Logger) -> None:
    # It fell back to text silently: LOG_FORMAT-style typos went unnoticed.
    target = restore_library_logger
    before = [(h, h.formatter) for h in ours(target)], target.level
    for bad in ("jsno", "", "xml"):
        with pytest.raises(ValueError, match="log format"):
            setup_logging(level="ERROR", log_format=bad)
    assert ([(h, h.formatter) for h in ours(target)], target.level) == before  # untouched
    setup_logging(log_format=" JSON ")  # the spellings Settings accepts
    assert isinstance(ours(target)[0].formatter, JsonFormatter)
    setup_logging()  # the text format again, for a handler other tests share


def test_stream_handler_format(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    logging.getLogger("layercode_asgi.test").info("hello %s", "world")
    logging.getLogger("layercode_asgi.test").debug("hidden at INFO")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "layercode_asgi.test" in line]
    assert len(lines) == 1
    line = lines[0]
    # "2025-01-01 12:00:00 INFO    layercode_asgi.test: hello world"
    date, clock, level, name, *message = line.split()
    assert len(date) == 10 and date[4] == "-" and len(clock) == 8 and clock[2] == ":"
    assert (level, name, " ".join(message)) == ("INFO", "layercode_asgi.test:", "hello world")


def test_log_webhook_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="layercode_asgi.webhook"):
        log_webhook("message", "c1", "t1", 200, 0.0123)
        log_webhook("session.end", "c2", None, 200, 0.5, agent="echo", chars=12)
    first, second = caplog.records
    assert first.getMessage() == (
        "webhook type=message conversation=c1 turn=t1 status=200 duration_ms=12.3"
    )
    assert first.name == "layercode_asgi.webhook"
    assert first.levelno == logging.INFO
    fields: Any = first
    assert (fields.event_type, fields.conversation_id, fields.turn_id) == ("message", "c1", "t1")
    assert (fields.status, fields.duration_ms) == (200, 12.3)
    assert second.getMessage() == (
        "webhook type=session.end conversation=c2 turn=- status=200 duration_ms=500.0"
        " agent=echo chars=12"
    )
    extra: Any = second
    assert (extra.agent, extra.chars, extra.turn_id) == ("echo", 12, None)


def test_log_webhook_levels_and_escaping(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="layercode_asgi.webhook"):
        log_webhook(None, "bad id\nINJECTED", None, 401, 0.001, reason="bad signature")
        log_webhook("message", "c", "t", 500, 0.0, name="reserved", msg="100%")
    first, second = caplog.records
    assert first.levelno == logging.WARNING
    assert first.getMessage() == (
        'webhook type=- conversation="bad id\\nINJECTED" turn=- status=401 duration_ms=1.0'
        ' reason="bad signature"'
    )
    assert "\n" not in first.getMessage()
    assert second.levelno == logging.ERROR
    assert second.getMessage().endswith(" name=reserved msg=100%")
    renamed: Any = second
    assert renamed.extra_name == "reserved"  # LogRecord attributes are never overwritten
    assert second.name == "layercode_asgi.webhook"


def test_log_webhook_a_refused_5xx_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # A 503 given by design (a busy conversation, shutting down) is a refusal, not a failure.
    with caplog.at_level(logging.WARNING, logger="layercode_asgi.webhook"):
        assert webhook_log_enabled(503, refused=True) and webhook_log_enabled(503)
        log_webhook("message", "c", "t", 503, 0.0, refused=True)
        log_webhook("message", "c", "t", 503, 0.0)
    refused, failed = caplog.records
    assert (refused.levelno, failed.levelno) == (logging.WARNING, logging.ERROR)
    assert refused.getMessage() == failed.getMessage()  # the same line: "refused" is no field
    assert not hasattr(refused, "refused")
    with caplog.at_level(logging.ERROR, logger="layercode_asgi.webhook"):
        assert not webhook_log_enabled(503, refused=True) and webhook_log_enabled(503)


def test_escape_log_value_cuts_at_max_chars_and_refuses_a_negative_one() -> None:
    assert escape_log_value("abcdefgh", 3) == "abc…(+5 chars)"
    assert escape_log_value("abcdefgh", 0) == "…(+8 chars)"
    assert escape_log_value("abcdefgh", None) == escape_log_value("abcdefgh", 8) == "abcdefgh"
    # Before: max_chars=-1 gave "abcdefg…(+9 chars)", counting more characters than there are.
    with pytest.raises(ValueError, match="max_chars must be an integer >= 0, got -1"):
        escape_log_value("abcdefgh", -1)


def test_log_webhook_fields_are_cut_for_every_handler(caplog: pytest.LogCaptureFixture) -> None:
    # The record's fields held a request's ids whole (up to the body limit): only the JSON
    # format cut them; Logfire's handler and an application's own got 100,000 characters.
    from layercode_asgi.logs import LOG_VALUE_MAX_CHARS

    with caplog.at_level(logging.INFO, logger="layercode_asgi.webhook"):
        log_webhook("x" * 100_000, "c" * 100_000, "t" * 5_000, 200, 0.0)
    fields: Any = caplog.records[0]
    assert fields.event_type == "x" * LOG_VALUE_MAX_CHARS + "…(+99000 chars)"
    assert fields.conversation_id == "c" * LOG_VALUE_MAX_CHARS + "…(+99000 chars)"
    assert fields.turn_id == "t" * LOG_VALUE_MAX_CHARS + "…(+4000 chars)"


def test_log_webhook_is_cheap_when_disabled(caplog: pytest.LogCaptureFixture) -> None:
    class Exploding:
        def __str__(self) -> str:
            raise AssertionError("formatted although the level is disabled")

    with caplog.at_level(logging.ERROR, logger="layercode_asgi.webhook"):
        log_webhook("message", "c", "t", 200, 0.1, payload=Exploding())
    assert caplog.records == []


def test_logfire_token_without_logfire_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "logfire", None)  # makes `import logfire` fail
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        setup_logging(logfire_token="lf-token")
    assert "logfire package is not installed" in caplog.text
    assert "lf-token" not in caplog.text
    assert len(ours(logging.getLogger(LOGGER_NAME))) == 1


def test_logfire_configured_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    class FakeHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

    fake = types.ModuleType("logfire")
    fake.configure = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    fake.LogfireLoggingHandler = FakeHandler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "logfire", fake)
    target = logging.getLogger(LOGGER_NAME)
    setup_logging(logfire_token="tok")
    setup_logging(logfire_token="tok")
    assert calls == [{"token": "tok"}, {"token": "tok"}]
    # Logfire's handler, behind the one handing it records with their secrets masked.
    assert sum(isinstance(getattr(h, "inner", h), FakeHandler) for h in target.handlers) == 1
    setup_logging()  # no token: logfire untouched
    assert len(calls) == 2


def test_logfire_failure_does_not_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def configure(**kwargs: Any) -> None:
        raise RuntimeError("bad token")

    fake = types.ModuleType("logfire")
    fake.configure = configure  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "logfire", fake)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        setup_logging(logfire_token="tok")
    assert "could not configure Logfire: RuntimeError: bad token" in caplog.text


def test_json_log_fields_are_cut_like_text_values() -> None:
    # A request's 1 MB conversation_id made a 1 MB JSON log line; the text format cuts
    # every request value at LOG_VALUE_MAX_CHARS.
    import json
    import logging

    from layercode_asgi.logs import LOG_VALUE_MAX_CHARS

    record = logging.LogRecord("layercode_asgi.webhook", logging.INFO, __file__, 1, "m", (), None)
    record.conversation_id = "c" * 100_000
    record.status = 200
    line = JsonFormatter().format(record)
    fields = json.loads(line)
    assert len(line) < 2 * LOG_VALUE_MAX_CHARS
    assert fields["conversation_id"] == "c" * LOG_VALUE_MAX_CHARS + "…(+99000 chars)"
    assert fields["status"] == 200


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


def _strict_json(line: str) -> dict[str, Any]:
    """``json.loads`` that refuses ``NaN``/``Infinity``, as strict parsers do."""
    import json

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    assert "\n" not in line
    fields: dict[str, Any] = json.loads(line, parse_constant=refuse)
    return fields


def test_json_log_lines_stay_json_for_any_value() -> None:
    # extra={"ratio": float("nan")} wrote a bare NaN (not JSON); a value whose str()
    # raised, or a message argument whose str() raised, gave no line at all.
    record = logging.LogRecord(
        "layercode_asgi", logging.INFO, __file__, 1, "m %s %s", (float("inf"), _Unprintable()), None
    )
    record.ratio = float("nan")
    record.spans = [float("-inf"), {"nested": float("nan")}, {(1, 2): "tuple key"}]
    record.raw = b"\xff\n"
    record.tags = {"a"}
    record.odd = _Unprintable()
    loop: list[object] = []
    loop.append(loop)
    record.loop = loop
    record.huge = 10**5000
    record.__dict__[1] = "extra={1: ...}"
    fields = _strict_json(JsonFormatter().format(record))
    assert fields["ratio"] == "nan"
    assert fields["spans"][:2] == ["-inf", {"nested": "nan"}]
    assert fields["raw"] == str(b"\xff\n")
    assert fields["tags"] == "{'a'}"
    assert fields["odd"] == "<unprintable _Unprintable>"
    assert "<unprintable" in fields["message"] and fields["message"].startswith("m ")
    assert isinstance(fields["loop"], list)
    assert "huge" in fields
    assert fields["1"] == "extra={1: ...}"
    bad_format = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d", ("ten",), None)
    assert _strict_json(JsonFormatter().format(bad_format))["message"] == "n=%d ten"
