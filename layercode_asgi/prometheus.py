"""Prometheus: the per-turn metrics as prometheus-client counters, histograms and a gauge.

Needs the extra ``prometheus`` (``pip install 'layercode-asgi[prometheus]'``); importing
this module without it raises ``ImportError`` with that hint. ``create_app`` uses it when
``LAYERCODE_METRICS=true`` and serves the text format at ``/metrics`` (guarded by
``LAYERCODE_METRICS_API_KEYS`` when set). Anywhere else:

* :class:`PrometheusMetrics`: the sink (``TurnMetrics(PrometheusMetrics())``);
* :func:`render_metrics`: ``(body, content_type)`` of a scrape, for any framework's route;
* :class:`MetricsEndpoint`: the same as a guarded ASGI app (``Route("/metrics", …)``).

Several processes (``serve --workers N``, gunicorn): prometheus-client's multiprocess mode.
With ``PROMETHEUS_MULTIPROC_DIR`` set before the processes start, every process writes its
figures there and a scrape of any of them returns the sum; ``serve --workers`` sets it up by
itself (a fresh temporary directory) when the variable is not set.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, MutableMapping
from typing import Any, Final

import anyio.to_thread

try:
    import prometheus_client
    from prometheus_client import multiprocess
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "layercode_asgi.prometheus needs prometheus-client: "
        "pip install 'layercode-asgi[prometheus]'"
    ) from exc
from starlette.datastructures import Headers

from ._asgi import json_error, send_json_error
from .apikeys import api_key_allowed, encode_keys
from .metrics import (
    FIRST_TTS_BUCKETS,
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


class _Instruments:
    """The instruments of one registry (created once: a registry refuses a name twice)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        pc = prometheus_client
        self.requests = pc.Counter(
            "layercode_webhook_requests",
            "Webhook requests answered, by event type and HTTP status.",
            ["event_type", "status"],
            registry=registry,
        )
        self.turns = pc.Counter(
            "layercode_turns",
            "Turns (session.start and message webhooks), by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.first_tts = pc.Histogram(
            "layercode_turn_first_tts_seconds",
            "Time from the webhook's arrival to its first response.tts.",
            buckets=FIRST_TTS_BUCKETS,
            registry=registry,
        )
        self.duration = pc.Histogram(
            "layercode_turn_duration_seconds",
            "Time from a turn's arrival to the end of its stream (turns that ran).",
            buckets=TURN_DURATION_BUCKETS,
            registry=registry,
        )
        self.lock_wait = pc.Histogram(
            "layercode_turn_lock_wait_seconds",
            "Time from a turn's arrival until it held its conversation's lock.",
            buckets=LOCK_WAIT_BUCKETS,
            registry=registry,
        )
        self.open_streams = pc.Gauge(
            "layercode_open_streams",
            "Turn streams running now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.rejections = pc.Counter(
            "layercode_signature_rejections",
            "Webhook requests refused by the signature check, by reason.",
            ["reason"],
            registry=registry,
        )
        # Every known label value starts at 0, so rate() sees the first one.
        self.outcome = {outcome: self.turns.labels(outcome) for outcome in OUTCOMES}
        self.reason = {
            reason: self.rejections.labels(reason)
            for reason in [r.name.lower() for r in SignatureErrorReason] + ["replayed"]
        }
        self.by_request: dict[tuple[str, int], Any] = {}


_BY_REGISTRY: MutableMapping[Any, _Instruments] = weakref.WeakKeyDictionary()


class PrometheusMetrics:
    """The sink writing the per-turn figures to prometheus-client instruments.

    Args:
        registry: where the instruments live (default ``prometheus_client.REGISTRY``).
            Several sinks on one registry share its instruments.

    The names: :data:`METRIC_NAMES` (labels: ``event_type``, ``status``; ``outcome``;
    ``reason``). See docs/metrics.md.
    """

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        instruments = _BY_REGISTRY.get(self.registry)
        if instruments is None:
            instruments = _BY_REGISTRY[self.registry] = _Instruments(self.registry)
        self._i = instruments

    def request_started(self, record: WebhookRecord) -> None:
        return None

    def turn_started(self, record: WebhookRecord) -> None:
        self._i.open_streams.inc()

    def request_finished(self, record: WebhookRecord, state: Any) -> None:
        i = self._i
        key = (record.event_type or "unknown", record.status)
        counter = i.by_request.get(key)
        if counter is None:
            counter = i.by_request[key] = i.requests.labels(key[0], str(key[1]))
        counter.inc()
        outcome = record.outcome
        if outcome is None:
            return
        i.outcome[outcome].inc()
        if record.lock_wait is not None:
            i.lock_wait.observe(record.lock_wait)
        if record.first_tts is not None:
            i.first_tts.observe(record.first_tts)
        if record.streaming:
            i.open_streams.dec()
            if record.duration is not None:
                i.duration.observe(record.duration)

    def signature_rejected(self, reason: str) -> None:
        counter = self._i.reason.get(reason)
        if counter is None:
            counter = self._i.reason[reason] = self._i.rejections.labels(reason)
        counter.inc()


def render_metrics(
    registry: prometheus_client.CollectorRegistry | None = None,
) -> tuple[bytes, str]:
    """A scrape: ``(body, content_type)`` in Prometheus' text format.

    ``registry`` default: every process's figures when ``PROMETHEUS_MULTIPROC_DIR`` is set
    (multiprocess mode), else ``prometheus_client.REGISTRY``. Reads files in multiprocess
    mode: from async code, call it in a thread (:class:`MetricsEndpoint` does).
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
_NOT_ALLOWED: Final = json_error(405, "method not allowed; use GET", headers=[(b"allow", b"GET")])
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


# -- several workers (serve --workers N) ---------------------------------------------------------


def prepare_worker_directory(env: dict[str, str]) -> str | None:
    """Before the workers start: when neither ``env`` nor this process names a
    ``PROMETHEUS_MULTIPROC_DIR``, create a fresh temporary one and put it in ``env``.
    Returns the directory created (remove it with :func:`remove_worker_directory` once
    the workers are gone), or None when the user's own is used."""
    if env.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="layercode-metrics-")
    env["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def remove_worker_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int, env: dict[str, str]) -> None:
    """A worker died: drop its live gauge (open streams) from the sum; counters stay."""
    path = env.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
