"""Prometheus: the per-turn metrics as prometheus-client counters, histograms and a gauge.

Needs the extra ``prometheus``. ``create_app`` uses it when ``LAYERCODE_METRICS=true`` and
serves ``/metrics`` (guarded by ``LAYERCODE_METRICS_API_KEYS`` when set). Anywhere else:

* :class:`PrometheusMetrics`: the sink (``TurnMetrics(PrometheusMetrics())``);
* :func:`render_metrics`: ``(body, content_type)`` of a scrape, for any framework's route;
* :class:`MetricsEndpoint`: the same as a guarded ASGI app (``Route("/metrics", …)``).

Several processes (``serve --workers N``, gunicorn): with ``PROMETHEUS_MULTIPROC_DIR`` set
before they start, each writes its figures there and a scrape of any returns the sum
(prometheus-client's multiprocess mode); ``serve --workers`` sets a fresh one if unset.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import weakref
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any, Final

import anyio.to_thread

try:
    import prometheus_client
    from prometheus_client import multiprocess
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "layercode_asgi.prometheus needs prometheus-client: "
        "pip install './layercode-asgi[prometheus]'"
    ) from exc
from starlette.datastructures import Headers

from ._asgi import json_error, send_json_error
from .apikeys import api_key_allowed, encode_keys
from .errors import ConfigurationError, check_type
from .metrics import (
    FIRST_TTS_BUCKETS,
    HELP,
    LOCK_WAIT_BUCKETS,
    OUTCOMES,
    TURN_DURATION_BUCKETS,
    WebhookRecord,
)
from .signature import SignatureErrorReason

__all__ = [
    "FIRST_TTS_BUCKETS",
    "LOCK_WAIT_BUCKETS",
    "METRIC_NAMES",
    "TURN_DURATION_BUCKETS",
    "MetricsEndpoint",
    "PrometheusMetrics",
    "render_metrics",
]

logger = logging.getLogger("layercode_asgi.prometheus")

#: The names as a scrape shows them (counters get ``_total``, histograms ``_bucket`` &co).
METRIC_NAMES: Final = (
    "layercode_webhook_requests_total",
    "layercode_turns_total",
    "layercode_turn_first_tts_seconds",
    "layercode_turn_duration_seconds",
    "layercode_turn_lock_wait_seconds",
    "layercode_open_streams",
    "layercode_signature_rejections_total",
)

_CONTENT_TYPE: Final = prometheus_client.CONTENT_TYPE_LATEST
_REQUESTS: Final = ("layercode_webhook_requests", HELP["requests"])
_TURNS: Final = ("layercode_turns", "Turns (session.start and message webhooks), by outcome.")
_FIRST_TTS: Final = ("layercode_turn_first_tts_seconds", HELP["first_tts"])
_DURATION: Final = ("layercode_turn_duration_seconds", HELP["duration"])
_LOCK_WAIT: Final = ("layercode_turn_lock_wait_seconds", HELP["lock_wait"])
_OPEN: Final = ("layercode_open_streams", HELP["open_streams"])
_REJECTIONS: Final = ("layercode_signature_rejections", HELP["rejections"])
_REASONS: Final = (*(r.name.lower() for r in SignatureErrorReason), "replayed")


class _Figures:
    """One process's figures as plain numbers, made metric families only when scraped.

    Per turn, all the recording took 8.3 µs with prometheus-client's locked instruments and
    under 4 µs with these (benchmarks/metrics_cost.py); paced benchmark server CPU per turn
    with metrics on: +6.7% / +4.2% -> +3.2% / +1.3% at N = 200 / 800 (issue 19's line: 5%).
    The event loop writes; a scrape, in a thread, reads copies made while holding the GIL.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.turns = dict.fromkeys(OUTCOMES, 0)
        self.first_tts = _Histogram(FIRST_TTS_BUCKETS)
        self.duration = _Histogram(TURN_DURATION_BUCKETS)
        self.lock_wait = _Histogram(LOCK_WAIT_BUCKETS)
        self.open_streams = 0
        self.rejections = dict.fromkeys(_REASONS, 0)

    def count_request(self, key: tuple[str, int]) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_turn(self, outcome: str) -> None:
        self.turns[outcome] += 1

    def streams(self, change: int) -> None:
        self.open_streams += change

    def rejected(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*_REQUESTS, labels=["event_type", "status"])
        for (event_type, status), count in dict(self.requests).items():
            requests.add_metric([event_type, str(status)], count)
        yield requests
        yield _counter(_TURNS, "outcome", self.turns)
        yield self.first_tts.family(_FIRST_TTS)
        yield self.duration.family(_DURATION)
        yield self.lock_wait.family(_LOCK_WAIT)
        yield GaugeMetricFamily(*_OPEN, value=self.open_streams)
        yield _counter(_REJECTIONS, "reason", self.rejections)

    describe = collect  # the names, for the registry's check of duplicates


class _Histogram:
    __slots__ = ("bounds", "counts", "labels", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # as prometheus-client's own histograms write them: "0.05", "1.0", "+Inf"
        self.labels = [floatToGoString(b) for b in (*bounds, math.inf)]  # type: ignore[no-untyped-call]
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name_and_help: tuple[str, str]) -> HistogramMetricFamily:
        buckets = list(zip(self.labels, itertools.accumulate(list(self.counts)), strict=True))
        return HistogramMetricFamily(*name_and_help, buckets=buckets, sum_value=self.total)


def _counter(name_and_help: tuple[str, str], label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(*name_and_help, labels=[label])
    for value, count in dict(counts).items():
        family.add_metric([value], count)
    return family


class _Instruments:
    """Several processes: prometheus-client's instruments, in the shared files a scrape sums."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        pc = prometheus_client
        self.requests = pc.Counter(*_REQUESTS, ["event_type", "status"], registry=registry)
        self.turns = pc.Counter(*_TURNS, ["outcome"], registry=registry)
        self.first_tts = pc.Histogram(*_FIRST_TTS, buckets=FIRST_TTS_BUCKETS, registry=registry)
        self.duration = pc.Histogram(*_DURATION, buckets=TURN_DURATION_BUCKETS, registry=registry)
        self.lock_wait = pc.Histogram(*_LOCK_WAIT, buckets=LOCK_WAIT_BUCKETS, registry=registry)
        self.open_streams = pc.Gauge(*_OPEN, registry=registry, multiprocess_mode="livesum")
        self.rejections = pc.Counter(*_REJECTIONS, ["reason"], registry=registry)
        # Every known label value starts at 0, so rate() sees the first one.
        self.outcome = {outcome: self.turns.labels(outcome) for outcome in OUTCOMES}
        for reason in _REASONS:
            self.rejections.labels(reason)
        self.by_request: dict[tuple[str, int], Any] = {}

    def count_request(self, key: tuple[str, int]) -> None:
        counter = self.by_request.get(key)
        if counter is None:
            counter = self.by_request[key] = self.requests.labels(key[0], str(key[1]))
        counter.inc()

    def count_turn(self, outcome: str) -> None:
        self.outcome[outcome].inc()

    def streams(self, change: int) -> None:
        self.open_streams.inc(change)

    def rejected(self, reason: str) -> None:  # rare: prometheus-client's own lookup
        self.rejections.labels(reason).inc()


_BY_REGISTRY: MutableMapping[Any, _Figures | _Instruments] = weakref.WeakKeyDictionary()
#: Several processes: the one registry writing this process's file, by (directory, pid).
_WRITER: dict[tuple[str, int], weakref.ref[Any]] = {}


def check_registry(registry: object) -> None:
    """Raise TypeError unless ``registry`` is a ``CollectorRegistry`` or None."""
    kinds = prometheus_client.CollectorRegistry | None
    check_type("registry", registry, kinds, "a prometheus_client.CollectorRegistry or None")


class PrometheusMetrics:
    """The sink writing the per-turn figures to prometheus-client instruments.

    Args:
        registry: where the instruments live (default ``prometheus_client.REGISTRY``).
            Several sinks on one registry share its instruments.

    The names: :data:`METRIC_NAMES` (see docs/metrics.md). A ``PROMETHEUS_MULTIPROC_DIR``
    that is not a writable directory, or with it a second registry in one process, is a
    :class:`~layercode_asgi.errors.ConfigurationError`.
    """

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        check_registry(registry)
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory and not os.path.isdir(directory):
            raise ConfigurationError(
                f"PROMETHEUS_MULTIPROC_DIR ({directory}) is not a directory: create it, empty, "
                "before the processes start"
            )
        recorder = _BY_REGISTRY.get(self.registry)
        if recorder is None:
            if directory:
                key = (directory, os.getpid())
                if key in _WRITER and _WRITER[key]() is not None:
                    raise ConfigurationError(
                        f"PROMETHEUS_MULTIPROC_DIR ({directory}) keeps one set of figures per "
                        "process: one registry per process (a second one, e.g. another app's "
                        "metrics_registry, would lose counts); leave metrics_registry out"
                    )
                try:  # it writes its files at once (the histograms, each outcome at 0)
                    recorder = _Instruments(self.registry)
                except OSError as exc:  # read-only: PermissionError; /proc: not found
                    raise ConfigurationError(
                        f"PROMETHEUS_MULTIPROC_DIR ({directory}) is not writable: every "
                        "process writes its figures there; give it a directory the server's "
                        "user can write"
                    ) from exc
                _WRITER[key] = weakref.ref(self.registry)
            else:
                recorder = _Figures()
                self.registry.register(recorder)
            _BY_REGISTRY[self.registry] = recorder
        self._recorder = recorder

    def request_started(self, record: WebhookRecord) -> None:
        return None

    def turn_started(self, record: WebhookRecord) -> None:
        self._recorder.streams(1)

    def request_finished(self, record: WebhookRecord, state: Any) -> None:
        recorder = self._recorder
        recorder.count_request((record.event_type or "unknown", record.status))
        outcome = record.outcome
        if outcome is None:
            return
        recorder.count_turn(outcome)
        if record.lock_wait is not None:
            recorder.lock_wait.observe(record.lock_wait)
        if record.first_tts is not None:
            recorder.first_tts.observe(record.first_tts)
        if record.streaming:
            recorder.streams(-1)
            if record.duration is not None:
                recorder.duration.observe(record.duration)

    def signature_rejected(self, reason: str) -> None:
        self._recorder.rejected(reason)


def render_metrics(
    registry: prometheus_client.CollectorRegistry | None = None,
) -> tuple[bytes, str]:
    """A scrape: ``(body, content_type)`` in Prometheus' text format.

    ``registry`` default: every process's figures when ``PROMETHEUS_MULTIPROC_DIR`` is set
    (it reads files: from async code, call it in a thread), else ``prometheus_client.REGISTRY``.
    """
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = prometheus_client.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), _CONTENT_TYPE


_UNAUTHORIZED: Final = json_error(
    401, "missing or invalid API key", headers=[(b"www-authenticate", b"Bearer")]
)
_NOT_ALLOWED: Final = json_error(
    405, "method not allowed; use GET or HEAD", headers=[(b"allow", b"GET, HEAD")]
)
_UNAVAILABLE: Final = json_error(503, "metrics unavailable")


class MetricsEndpoint:
    """``GET /metrics`` as an ASGI app: :func:`render_metrics`, behind an optional API key.

    Args:
        api_keys: keys a scraper must present (``Authorization: Bearer <key>`` or
            ``X-Api-Key``); none: open to anyone who can reach it.
        registry: see :func:`render_metrics`.

    A missing or wrong key gets 401 JSON; another method 405 JSON; a failure to render
    503 JSON (logged).
    """

    def __init__(
        self,
        api_keys: Iterable[str] = (),
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.keys = encode_keys(api_keys)
        check_registry(registry)
        self.registry = registry

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_json_error(send, _NOT_ALLOWED)
            return
        if not api_key_allowed(Headers(scope=scope), self.keys):
            await send_json_error(send, _UNAUTHORIZED)
            return
        try:
            body, content_type = await anyio.to_thread.run_sync(render_metrics, self.registry)
        except Exception:
            logger.exception("could not render the metrics")
            await send_json_error(send, _UNAVAILABLE)
            return
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
