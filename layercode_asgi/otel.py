"""OpenTelemetry: a span per webhook request and the per-turn figures as OTel instruments.

Needs the extra ``otel`` (opentelemetry-api only). What is recorded goes to the SDK the
application configured (the global providers, or the ones passed in); without one, nothing.
``create_app`` uses it when ``LAYERCODE_METRICS=true`` and opentelemetry-api is installed,
and when ``LOGFIRE_TOKEN`` is set (Logfire, set up by ``setup_logging``).

The span ``webhook <event type>`` (kind SERVER) starts when the verified request reaches
the webhook and is current while the turn runs (an agent's spans nest in it); its
attributes, events (``first_tts``, ``end``) and error status: docs/metrics.md. The
instruments (meter ``layercode_asgi``): :data:`INSTRUMENT_NAMES`.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import MutableMapping
from typing import Any, Final

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "layercode_asgi.otel needs opentelemetry-api: pip install './layercode-asgi[otel]'"
    ) from exc

from ._version import __version__
from .errors import ConfigurationError, check_type
from .logs import escape_log_value
from .metrics import (
    AGENT_ERROR,
    FIRST_TTS_BUCKETS,
    HELP,
    LOCK_WAIT_BUCKETS,
    TURN_DURATION_BUCKETS,
    WebhookRecord,
)

__all__ = ["INSTRUMENT_NAMES", "OtelMetrics"]

#: The instruments, as an OpenTelemetry exporter names them.
INSTRUMENT_NAMES: Final = (
    "layercode.webhook.requests",
    "layercode.turns",
    "layercode.turn.first_tts",
    "layercode.turn.duration",
    "layercode.turn.lock_wait",
    "layercode.streams.open",
    "layercode.signature.rejections",
)

_SCOPE: Final = "layercode_asgi"
#: Without a tracer provider of its own, how often (seconds) the sink looks for an SDK.
SDK_CHECK_INTERVAL: Final = 1.0


def _histogram(meter: Any, figure: str, buckets: tuple[float, ...]) -> Any:
    name, description = f"layercode.turn.{figure}", HELP[figure]
    try:  # bucket advice: opentelemetry-api >= 1.23
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:
        return meter.create_histogram(name, unit="s", description=description)


def _not_loaded(variable: str) -> ConfigurationError:
    """OpenTelemetry failed to load the provider ``variable`` names (a misspelled one)."""
    return ConfigurationError(
        f"{variable} ({os.environ.get(variable)}): OpenTelemetry could not load this "
        "provider; is the name right and its package installed?"
    )


class _OpenStreams:
    """The turn streams running now, counted here and read by the SDK when it collects: an
    SDK set up while turns run reads the right number (with an UpDownCounter, a turn's +1
    went to the no-op instrument and its -1 to the SDK's). One per meter provider."""

    __slots__ = ("__weakref__", "count", "registered")

    def __init__(self) -> None:
        self.count = 0
        self.registered = False

    def observe(self, options: otel_metrics.CallbackOptions) -> list[otel_metrics.Observation]:
        return [otel_metrics.Observation(self.count)]


_OPEN_GLOBAL = _OpenStreams()  # the sinks on the global meter provider
_OPEN: MutableMapping[Any, _OpenStreams] = weakref.WeakKeyDictionary()


def _open_streams(meter: Any, provider: object) -> _OpenStreams:
    """The count of ``provider``'s sinks (an SDK keeps the first callback of a name only)."""
    try:
        holder = _OPEN_GLOBAL if provider is None else _OPEN.setdefault(provider, _OpenStreams())
    except TypeError:  # a provider that cannot be weakly referenced: a count of its own
        holder = _OpenStreams()
    if not holder.registered:
        holder.registered = True
        meter.create_observable_up_down_counter(
            "layercode.streams.open",
            callbacks=[holder.observe],
            unit="{stream}",
            description=HELP["open_streams"],
        )
    return holder


class OtelMetrics:
    """The sink sending spans and instruments through OpenTelemetry's API.

    Args:
        tracer_provider: where spans go (default: the global one, as configured by the
            application's SDK, Logfire, …).
        meter_provider: where the instruments report (default: the global one).

    A global provider named by ``OTEL_PYTHON_TRACER_PROVIDER`` or
    ``OTEL_PYTHON_METER_PROVIDER`` that cannot be loaded is a ``ConfigurationError``.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
    ) -> None:
        check_type(
            "tracer_provider", tracer_provider, trace.TracerProvider | None, "a TracerProvider"
        )
        check_type(
            "meter_provider", meter_provider, otel_metrics.MeterProvider | None, "a MeterProvider"
        )
        try:  # the global one: loaded from OTEL_PYTHON_TRACER_PROVIDER if that is set
            self._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider)
        except Exception as exc:
            raise _not_loaded("OTEL_PYTHON_TRACER_PROVIDER") from exc
        self._global_tracer = tracer_provider is None
        self._sdk_seen = False
        self._next_sdk_check = -math.inf
        try:
            meter = otel_metrics.get_meter(_SCOPE, __version__, meter_provider)
        except Exception as exc:
            raise _not_loaded("OTEL_PYTHON_METER_PROVIDER") from exc
        self._requests = meter.create_counter(
            "layercode.webhook.requests", unit="{request}", description=HELP["requests"]
        )
        self._turns = meter.create_counter(
            "layercode.turns", unit="{turn}", description="Turns, by outcome."
        )
        self._first_tts = _histogram(meter, "first_tts", FIRST_TTS_BUCKETS)
        self._duration = _histogram(meter, "duration", TURN_DURATION_BUCKETS)
        self._lock_wait = _histogram(meter, "lock_wait", LOCK_WAIT_BUCKETS)
        self._open = _open_streams(meter, meter_provider)
        self._rejections = meter.create_counter(
            "layercode.signature.rejections", unit="{request}", description=HELP["rejections"]
        )

    def request_started(self, record: WebhookRecord) -> tuple[Any, object, int] | None:
        if self._global_tracer and not self._sdk_seen:
            # No SDK (yet): every span would be a no-op, a fifth of the metrics' calls per
            # turn. Looked up at most once per SDK_CHECK_INTERVAL; found, it stays.
            if record.arrived < self._next_sdk_check:
                return None
            self._next_sdk_check = record.arrived + SDK_CHECK_INTERVAL
            if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                return None
            self._sdk_seen = True
        start_ns = time.time_ns() - int((time.perf_counter() - record.arrived) * 1e9)
        attributes: dict[str, str] = {"layercode.event_type": record.event_type or "unknown"}
        if record.conversation_id is not None:
            attributes["layercode.conversation_id"] = escape_log_value(record.conversation_id)
        if record.turn_id is not None:
            attributes["layercode.turn_id"] = escape_log_value(record.turn_id)
        span = self._tracer.start_span(
            f"webhook {record.event_type or 'unknown'}",
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=start_ns,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token, start_ns

    def turn_started(self, record: WebhookRecord) -> None:
        self._open.count += 1

    def request_finished(self, record: WebhookRecord, state: Any) -> None:
        event_type = record.event_type or "unknown"
        self._requests.add(
            1, {"layercode.event_type": event_type, "http.response.status_code": record.status}
        )
        outcome = record.outcome
        if outcome is not None:
            self._turns.add(1, {"layercode.outcome": outcome})
            if record.lock_wait is not None:
                self._lock_wait.record(record.lock_wait)
            if record.first_tts is not None:
                self._first_tts.record(record.first_tts)
            if record.streaming:
                self._open.count -= 1
                if record.duration is not None:
                    self._duration.record(record.duration)
        if state is None:
            return
        span, token, start_ns = state
        otel_context.detach(token)  # logs (never raises) if the context is not ours
        span.set_attribute("http.response.status_code", record.status)
        if outcome is not None:
            span.set_attribute("layercode.outcome", outcome)
        if record.first_tts is not None:
            span.add_event(
                "first_tts",
                {"layercode.first_tts_ms": round(record.first_tts * 1000, 3)},
                timestamp=start_ns + int(record.first_tts * 1e9),
            )
        end_ns = start_ns + int((record.duration or 0.0) * 1e9)
        span.add_event("end", timestamp=end_ns)
        if record.status >= 500 or outcome == AGENT_ERROR:
            # OpenTelemetry's conventions: the type in error.type; no description a status
            # code gives; never the exception's message (it may quote a request, a key).
            span.set_attribute("error.type", record.error_type or str(record.status))
            description = "agent error" if outcome == AGENT_ERROR else None
            span.set_status(trace.Status(trace.StatusCode.ERROR, description))
        span.end(end_time=end_ns)

    def signature_rejected(self, reason: str) -> None:
        self._rejections.add(1, {"layercode.reason": reason})
