"""Per-turn metrics (issue 19), the parts that need no extra: the settings, the recorder
being off by default, JSON log lines, ``demo --metrics``. (tests/test_metrics.py reads the
figures back through the OpenTelemetry SDK and prometheus-client.)"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from layercode_asgi import Settings, create_app
from layercode_asgi.logs import LOGGER_NAME, log_webhook, setup_logging
from layercode_asgi.metrics import metrics_from_settings

from .conftest import SECRET


def _settings(**overrides: Any) -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET, **overrides)


def test_metrics_off_by_default_costs_nothing() -> None:
    assert metrics_from_settings(_settings()) is None
    app = create_app(_settings())
    assert app.state.webhook.metrics is None
    assert app.state.metrics is None


def test_metrics_setting_needs_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import layercode_asgi.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "installed", lambda module: False)
    from layercode_asgi import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"layercode-asgi\[prometheus\]"):
        metrics_from_settings(_settings(metrics=True))


@pytest.mark.parametrize("metrics", [False, True])
def test_logfire_token_without_opentelemetry_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, metrics: bool
) -> None:
    # A token asks for traces: without opentelemetry-api the app starts, and says what to add.
    import layercode_asgi.metrics as metrics_module

    if metrics:  # metrics on build the Prometheus sink: the extra must really be there
        pytest.importorskip("prometheus_client")
    monkeypatch.setattr(metrics_module, "installed", lambda module: module == "prometheus_client")
    with caplog.at_level(logging.WARNING, logger="layercode_asgi.metrics"):
        recorder = metrics_from_settings(_settings(logfire_token="lf-token", metrics=metrics))
    if metrics:
        assert recorder is not None
        assert [type(s).__name__ for s in recorder.sinks] == ["PrometheusMetrics"]
    else:
        assert recorder is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "LOGFIRE_TOKEN is set but opentelemetry-api is not installed: no spans or metrics "
        "go to Logfire (pip install './layercode-asgi[otel]' logfire)"
    ]


def test_settings_parse_the_new_variables() -> None:
    settings = Settings(
        env_file=None,
        environ={
            "LAYERCODE_METRICS": "true",
            "LAYERCODE_METRICS_API_KEYS": "a, b",
            "LOG_FORMAT": "JSON",
        },
    )
    assert settings.metrics is True
    assert settings.metrics_api_keys == ("a", "b")
    assert settings.log_format == "json"
    assert "metrics_api_keys=('***', '***')" in repr(settings)
    from layercode_asgi import SettingsError

    with pytest.raises(SettingsError, match="LOG_FORMAT: expected text or json"):
        Settings(env_file=None, environ={"LOG_FORMAT": "xml"})


@pytest.fixture
def restore_library_logger() -> Iterator[None]:
    target = logging.getLogger(LOGGER_NAME)
    handlers, level = list(target.handlers), target.level
    try:
        yield
    finally:
        target.handlers[:] = handlers
        target.setLevel(level)


@pytest.mark.usefixtures("restore_library_logger")
def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(log_format="json")
    log_webhook("message", "conv\n1", "t1", 200, 0.0123, first_tts_s=0.0045)
    log_webhook("data", "conv-1", "t2", 503, 0.002)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("layercode_asgi.test").exception("it failed \u2028 here")
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["event_type"] == "message"
    assert first["conversation_id"] == "conv\n1"
    assert first["turn_id"] == "t1"
    assert first["status"] == 200
    assert first["duration_ms"] == 12.3
    assert first["first_tts_ms"] == 4.5
    assert first["level"] == "INFO" and first["logger"] == "layercode_asgi.webhook"
    assert first["message"].startswith("webhook type=message")
    assert "first_tts_ms" not in second and second["level"] == "ERROR"
    assert "Traceback" in third["exception"] and third["message"] == "it failed \u2028 here"
    setup_logging()  # back to text on the same handler
    log_webhook("message", "c", "t", 200, 0.001, first_tts_s=0.0005)
    text = capsys.readouterr().err
    assert (
        "webhook type=message conversation=c turn=t status=200 duration_ms=1.0 first_tts_ms=0.5"
        in text
    )


def test_json_log_format_alone_measures_first_tts() -> None:
    metrics = metrics_from_settings(_settings(log_format="json"))
    assert metrics is not None and metrics.sinks == ()


def test_demo_prints_each_turns_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from layercode_asgi.cli import main

    assert main(["demo", "--metrics", "ping"], environ={}) == 0
    out = capsys.readouterr().out
    table = out.split("demo: per-turn metrics")[1].splitlines()[1:4]
    assert table[0].split()[:4] == ["turn", "type", "status", "outcome"]
    assert table[1].split()[1:4] == ["session.start", "200", "completed"]
    assert table[2].split()[1:4] == ["message", "200", "completed"]
    assert table[2].count(" ms") == 3


def test_memory_table_escapes_and_cuts_a_requests_turn_id() -> None:
    # Before: a turn_id from a request went to the terminal as it came: "\x1b]0;…\x07"
    # drove it, a line feed forged a row, a 1 MB id made a 1 MB table.
    from layercode_asgi.metrics import MemoryMetrics, WebhookRecord

    memory = MemoryMetrics()
    for turn_id in ("t\x1b]0;pwned\x07\nforged row", "x" * 100_000):
        memory.records.append(WebhookRecord(None, 0.0, "message", "c", turn_id))
    lines = memory.table().splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:3] == ["t\\u001b]0;pwned\\u0007\\nforged", "row", "message"]
    assert all(line.isprintable() and len(line) < 2000 for line in lines)
