"""Per-turn metrics of the webhook path: what is measured, and the recorder that measures it.

The webhook's ``metrics: TurnMetrics | None`` (``None``: nothing is measured) measures
each webhook request and hands the finished :class:`WebhookRecord` to its sinks:

* :class:`~layercode_asgi.prometheus.PrometheusMetrics` (extra ``prometheus``): counters,
  histograms and a gauge, exposed at ``/metrics``;
* :class:`~layercode_asgi.otel.OtelMetrics` (extra ``otel``): a span per request and the
  same figures as OpenTelemetry instruments;
* :class:`MemoryMetrics`: the last records in memory (``layercode-asgi demo --metrics``,
  tests).

A record holds (seconds, from ``time.perf_counter``) the time to the first
``response.tts``, the request's duration, the lock wait, the event type, the status, and
for turns the outcome (:data:`OUTCOMES`). Signature rejections are counted by reason
(the middleware's ``on_rejected``). ``create_app`` uses :func:`metrics_from_settings`.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Final, Protocol

from .errors import ConfigurationError, check_positive_int, kind_of
from .logs import escape_log_value
from .turns import Turn, TurnStatus

if TYPE_CHECKING:
    from starlette.responses import Response

    from .config import Settings

__all__ = [
    "OUTCOMES",
    "MemoryMetrics",
    "MetricsSink",
    "TurnMetrics",
    "WebhookRecord",
    "metrics_from_settings",
]

logger = logging.getLogger("layercode_asgi.metrics")

#: How a turn ended, as the metrics name it.
COMPLETED: Final = "completed"
AGENT_ERROR: Final = "agent_error"
TIMEOUT: Final = "timeout"
CLIENT_DISCONNECT: Final = "client_disconnect"
#: Ended by the server (``abort_turns``, or the server cancelling it): shutting down.
ABORTED: Final = "aborted"
#: Never ran: answered with an error before its stream began (503 lock timeout, 400, …).
REJECTED: Final = "rejected"
OUTCOMES: Final = (COMPLETED, AGENT_ERROR, TIMEOUT, CLIENT_DISCONNECT, ABORTED, REJECTED)
#: The status of a request whose client left before any answer: nginx's "client closed request".
CLIENT_CLOSED_REQUEST: Final = 499

#: Histogram buckets (seconds). The time to the first ``response.tts``: voice wants it well
#: under a second.
FIRST_TTS_BUCKETS: Final = (
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
)
#: A whole turn: a sentence or two of speech, up to the default 30 s turn timeout.
TURN_DURATION_BUCKETS: Final = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
#: Waiting for the previous turn of the same conversation (usually none).
LOCK_WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0)
#: What a figure measures: Prometheus' help text, OpenTelemetry's description.
HELP: Final = {
    "requests": "Webhook requests answered, by event type and HTTP status.",
    "first_tts": "Time from the webhook's arrival to its first response.tts.",
    "duration": "Time from a turn's arrival to the end of its stream (turns that ran).",
    "lock_wait": "Time from a turn's arrival until it held its conversation's lock.",
    "open_streams": "Turn streams running now.",
    "rejections": "Webhook requests refused by the signature check, by reason.",
}

_BY_STATUS: Final = {
    TurnStatus.COMPLETED: COMPLETED,
    TurnStatus.FAILED: AGENT_ERROR,
    TurnStatus.TIMED_OUT: TIMEOUT,
    TurnStatus.DISCONNECTED: CLIENT_DISCONNECT,
    TurnStatus.ABORTED: ABORTED,
}
_TURN_TYPES: Final = frozenset({"session.start", "message"})

# The record of the request being answered, for the hooks deep in the turn (lock, run).
_CURRENT: ContextVar[WebhookRecord | None] = ContextVar("layercode_webhook_record", default=None)


class WebhookRecord:
    """The figures of one webhook request; every sink gets it when the request ends.

    Times are seconds; ``None`` where they do not apply (a ``data`` event has no first tts,
    a turn without a conversation store waits for no lock). ``event_type`` is ``None`` for a
    malformed body or an unknown type. ``outcome`` is set for turns only (:data:`OUTCOMES`).
    ``streaming``: the turn ran (it counted as an open stream).
    """

    __slots__ = (
        "_metrics",
        "_states",
        "_token",
        "arrived",
        "conversation_id",
        "duration",
        "error_type",
        "event_type",
        "first_tts",
        "lock_wait",
        "outcome",
        "status",
        "streaming",
        "turn",
        "turn_id",
    )

    def __init__(
        self,
        metrics: TurnMetrics | None,
        arrived: float,
        event_type: str | None,
        conversation_id: str | None,
        turn_id: str | None,
    ) -> None:
        self._metrics = metrics
        self._states: list[Any] = []
        self._token: Token[WebhookRecord | None] | None = None
        #: ``time.perf_counter()`` when the verified request reached the webhook.
        self.arrived = arrived
        self.event_type = event_type
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.status = 0
        self.duration: float | None = None
        self.lock_wait: float | None = None
        self.first_tts: float | None = None
        self.outcome: str | None = None
        #: An agent error's type as OpenTelemetry's ``error.type`` (its ``error_type`` if set).
        self.error_type: str | None = None
        self.streaming = False
        #: The running turn, until the request ends.
        self.turn: Turn | None = None

    @property
    def is_turn(self) -> bool:
        """Whether the request opened a turn (``session.start`` or ``message``)."""
        return self.event_type in _TURN_TYPES

    def finish(self, response: Response) -> None:
        """The request is over (``response`` was sent or the client left): record it."""
        if self._metrics is not None:
            self._metrics.finish(self, response)

    def __repr__(self) -> str:
        return (
            f"WebhookRecord(event_type={self.event_type!r}, turn_id={self.turn_id!r}, "
            f"status={self.status}, outcome={self.outcome!r}, first_tts={self.first_tts!r}, "
            f"duration={self.duration!r}, lock_wait={self.lock_wait!r})"
        )


class MetricsSink(Protocol):
    """Where a :class:`TurnMetrics` sends its figures (Prometheus, OpenTelemetry, memory).

    ``request_started`` returns whatever the sink wants back in ``request_finished``
    (OpenTelemetry: its span). A sink must not raise; if it does, the error is logged and
    the request is not affected.
    """

    def request_started(self, record: WebhookRecord) -> Any: ...

    def turn_started(self, record: WebhookRecord) -> None: ...

    def request_finished(self, record: WebhookRecord, state: Any) -> None: ...

    def signature_rejected(self, reason: str) -> None: ...


#: What a :class:`MetricsSink` must have.
_SINK = ("request_started", "turn_started", "request_finished", "signature_rejected")


class TurnMetrics:
    """The webhook's recorder: measures each request and hands it to ``sinks``.

    ``LayercodeWebhook(agent, metrics=TurnMetrics(PrometheusMetrics()))``; for the
    signature middleware's rejections pass ``on_rejected=metrics.signature_rejected``.
    With no sink at all it still measures (the webhook log line then has ``first_tts_ms``).
    """

    __slots__ = ("sinks",)

    def __init__(self, *sinks: MetricsSink) -> None:
        for index, sink in enumerate(sinks):
            if isinstance(sink, type) or not all(callable(getattr(sink, m, None)) for m in _SINK):
                raise TypeError(
                    f"TurnMetrics sinks[{index}] must be a metrics sink (with the methods "
                    f"{', '.join(_SINK)}), got {kind_of(sink)}"
                )
        self.sinks: tuple[MetricsSink, ...] = sinks

    def arrived(
        self,
        arrived: float,
        event_type: str | None,
        conversation_id: str | None,
        turn_id: str | None,
    ) -> WebhookRecord:
        """Start the record of a request that reached the webhook at ``arrived``
        (``time.perf_counter()``); call :meth:`WebhookRecord.finish` in the same task."""
        record = WebhookRecord(self, arrived, event_type, conversation_id, turn_id)
        record._states = self._each_sink("request_started", record)
        record._token = _CURRENT.set(record)
        return record

    def lock_acquired(self) -> None:
        """The current turn holds its conversation's lock now."""
        record = _CURRENT.get()
        if record is not None:
            record.lock_wait = time.perf_counter() - record.arrived

    def turn_started(self, turn: Turn) -> None:
        """The current request's turn starts running (its stream opens)."""
        record = _CURRENT.get()
        if record is None or record.streaming:
            return
        record.turn = turn
        record.streaming = True
        self._each_sink("turn_started", record)

    def finish(self, record: WebhookRecord, response: Response) -> None:
        """Complete ``record`` from ``response`` and the turn, then hand it to the sinks."""
        token, record._token = record._token, None
        if token is None:
            return  # finished already
        with contextlib.suppress(ValueError):  # another context: nothing to restore there
            _CURRENT.reset(token)
        record.duration = time.perf_counter() - record.arrived
        record.status = answered_status(response)
        turn = record.turn
        record.turn = None  # the turn holds the history and the agent's context: let it go
        if record.is_turn:
            left = bool(getattr(response, "disconnected", False))
            if turn is None:
                record.outcome = CLIENT_DISCONNECT if left else REJECTED
            else:
                outcome = _BY_STATUS.get(turn.status)
                if outcome is None:
                    outcome = CLIENT_DISCONNECT if left else COMPLETED
                elif outcome == CLIENT_DISCONNECT and not left:
                    outcome = ABORTED  # cancelled by the server (its shutdown), not the caller
                record.outcome = outcome
                if outcome == AGENT_ERROR and turn.error is not None:
                    record.error_type = _type_name(turn.error)
                if turn.first_tts_at is not None:
                    record.first_tts = turn.first_tts_at - record.arrived
        for sink, state in zip(self.sinks, record._states, strict=True):
            try:
                sink.request_finished(record, state)
            except Exception:
                logger.exception("metrics sink %s failed", type(sink).__name__)
        record._states = []

    def signature_rejected(self, reason: str) -> None:
        """Count a request the signature middleware refused (``reason``: ``replayed``, …)."""
        self._each_sink("signature_rejected", reason)

    def _each_sink(self, method: str, *args: Any) -> list[Any]:
        """What each sink's ``method(*args)`` returned (None where it raised: logged)."""
        results = []
        for sink in self.sinks:
            try:
                results.append(getattr(sink, method)(*args))
            except Exception:
                logger.exception("metrics sink %s failed", type(sink).__name__)
                results.append(None)
        return results


class MemoryMetrics:
    """A sink that keeps the last ``maxlen`` finished records (and rejections) in memory.

    ``records``: the :class:`WebhookRecord` objects, oldest first; ``rejections``: a count
    by reason. What ``layercode-asgi demo --metrics`` prints; handy in tests.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        check_positive_int(maxlen, "maxlen", zero=True)  # beyond sys.maxsize: no bound
        self.records = collections.deque[WebhookRecord](maxlen=min(maxlen, sys.maxsize))
        self.rejections: collections.Counter[str] = collections.Counter()

    def request_started(self, record: WebhookRecord) -> None:
        return None

    def turn_started(self, record: WebhookRecord) -> None:
        return None

    def request_finished(self, record: WebhookRecord, state: Any) -> None:
        self.records.append(record)

    def signature_rejected(self, reason: str) -> None:
        self.rejections[reason] += 1

    def turns(self) -> list[WebhookRecord]:
        """The records of turns (``session.start`` and ``message``), oldest first."""
        return [record for record in self.records if record.is_turn]

    def table(self) -> str:
        """The turns as a small text table (milliseconds): what ``demo --metrics`` prints."""
        rows = [("turn", "type", "status", "outcome", "first tts", "duration", "lock wait")]
        rows.extend(
            (
                escape_log_value(r.turn_id),  # a request's: no control character, cut
                str(r.event_type),
                str(r.status),
                str(r.outcome),
                _ms(r.first_tts),
                _ms(r.duration),
                _ms(r.lock_wait),
            )
            for r in self.turns()
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(
                cell.ljust(width) if i < 4 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )


def answered_status(response: Response) -> int:
    """``response``'s status, or :data:`CLIENT_CLOSED_REQUEST` when its client left before
    it began (an event stream sends its status with its first event)."""
    if getattr(response, "disconnected", False) and not getattr(response, "started", True):
        return CLIENT_CLOSED_REQUEST
    return response.status_code


def _type_name(exc: BaseException) -> str:
    """``exc``'s type (its ``error_type`` if that is one) as OpenTelemetry writes it."""
    kind = getattr(exc, "error_type", None)
    if not isinstance(kind, type):
        kind = type(exc)
    module, name = kind.__module__, kind.__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def metrics_from_settings(
    settings: Settings, extra_sinks: Sequence[MetricsSink] = (), registry: Any = None
) -> TurnMetrics | None:
    """The recorder ``create_app`` uses, or ``None`` when nothing asks for one.
    ``registry``: the Prometheus sink's (a TypeError unless a ``CollectorRegistry`` or None).

    * ``LAYERCODE_METRICS=true``: Prometheus when prometheus-client is installed, and
      OpenTelemetry when opentelemetry-api is (at least one of them is required);
    * ``LOGFIRE_TOKEN`` set (Logfire configures an OpenTelemetry SDK): OpenTelemetry
      (without opentelemetry-api: a warning, and no OpenTelemetry);
    * ``LOG_FORMAT=json`` alone: a recorder with no sink (the log line's ``first_tts_ms``).
    """
    sinks: list[MetricsSink] = list(extra_sinks)
    otel = bool(settings.metrics or settings.logfire_token) and installed("opentelemetry.trace")
    if settings.logfire_token and not otel:  # a telemetry gap must not stop the server
        logger.warning(
            "LOGFIRE_TOKEN is set but opentelemetry-api is not installed: no spans or metrics "
            "go to Logfire (pip install './layercode-asgi[otel]' logfire)"
        )
    if registry is not None and installed("prometheus_client"):  # checked with metrics off too
        from .prometheus import check_registry

        check_registry(registry)
    elif registry is not None:
        raise TypeError(
            "registry must be a prometheus_client.CollectorRegistry or None (prometheus-client "
            f"is not installed), got {kind_of(registry)}"
        )
    if settings.metrics:
        if installed("prometheus_client"):
            from .prometheus import PrometheusMetrics

            sinks.append(PrometheusMetrics(registry))
        if not sinks and not otel:
            raise ConfigurationError(
                "LAYERCODE_METRICS=true needs prometheus-client or opentelemetry-api: "
                "pip install './layercode-asgi[prometheus]' (a /metrics route) or "
                "'./layercode-asgi[otel]'"
            )
    if otel:
        from .otel import OtelMetrics

        sinks.append(OtelMetrics())
    if sinks or settings.log_format == "json":
        return TurnMetrics(*sinks)
    return None
