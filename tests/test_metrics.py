"""Per-turn metrics (issue 19), checked with the real SDKs after a known conversation.

One conversation on a real uvicorn: two completed turns, one whose agent raises, one that
times out, one the client leaves mid-stream, plus a request with a bad signature. Then the
figures are read back through the real OpenTelemetry SDK (in-memory exporter and reader)
and a real Prometheus text parser (``prometheus_client.parser``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from layercode_asgi import (
    ConfigurationError,
    LayercodeSignature,
    LayercodeWebhook,
    Settings,
    create_app,
)
from layercode_asgi.agents import TurnContext, TurnEvent
from layercode_asgi.metrics import MemoryMetrics, TurnMetrics, metrics_from_settings

from .conftest import NEEDS_TRIO, SECRET, event_body, serve, serve_hypercorn, signed_headers

otel_sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
prometheus_client = pytest.importorskip("prometheus_client")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from layercode_asgi.otel import OtelMetrics  # noqa: E402
from layercode_asgi.prometheus import (  # noqa: E402
    MetricsEndpoint,
    PrometheusMetrics,
    render_metrics,
)

TURN_TIMEOUT = 0.5
#: Where the agent's own spans go (the conversation's tracer provider).
AGENT_TRACER: dict[str, Any] = {"tracer": trace.get_tracer("agent-under-test")}


async def scripted(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
    """What each message asks for: ``fail``, ``stall`` (past the timeout), ``linger`` (one
    chunk, then waits: the client leaves), else two chunks; an agent span around it all."""
    with AGENT_TRACER["tracer"].start_as_current_span("agent"):
        text = event.text or ""
        if text == "fail":
            raise RuntimeError("the agent broke")
        if text == "stall":
            await anyio.sleep(30)
        yield f"you said {text}"
        if text == "linger":
            await anyio.sleep(30)
        yield " and that is all."


class Sinks:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        tracer_provider = otel_sdk_trace.TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer_provider = tracer_provider
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.registry = prometheus_client.CollectorRegistry()
        self.memory = MemoryMetrics()
        self.metrics = TurnMetrics(
            PrometheusMetrics(self.registry),
            OtelMetrics(tracer_provider=tracer_provider, meter_provider=self.meter_provider),
            self.memory,
        )

    def prometheus(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        body, content_type = render_metrics(self.registry)
        assert content_type.startswith("text/plain")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def otel_points(self) -> dict[str, list[Any]]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            metric.name: list(metric.data.data_points)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(
    scope="module", params=["uvicorn", pytest.param("hypercorn-trio", marks=NEEDS_TRIO)]
)
def conversation(request: pytest.FixtureRequest) -> Iterator[Sinks]:
    """The known conversation, played once per server (uvicorn; Hypercorn's trio worker);
    the sinks hold its figures."""
    sinks = Sinks()
    # The agent's own spans go to the same provider, to check they nest in the webhook's.
    AGENT_TRACER["tracer"] = sinks.tracer_provider.get_tracer("agent-under-test")
    webhook = LayercodeWebhook(scripted, turn_timeout=TURN_TIMEOUT, metrics=sinks.metrics)
    app = LayercodeSignature(webhook, secret=SECRET, on_rejected=sinks.metrics.signature_rejected)
    running = serve(app) if request.param == "uvicorn" else serve_hypercorn(app, trio_worker=True)
    with running as url, httpx.Client(base_url=url, timeout=10) as client:
        url_path = "/api/agent"

        def turn(turn_id: str, kind: str = "message", **fields: Any) -> httpx.Response:
            body = event_body(kind, turn_id=turn_id, **fields)
            return client.post(url_path, content=body, headers=signed_headers(body))

        assert turn("t1", "session.start").status_code == 200
        assert turn("t2", text="hello").status_code == 200
        assert "agent error" in turn("t3", text="fail").text
        assert "turn timed out" in turn("t4", text="stall").text
        body = event_body("message", turn_id="t5", text="linger")
        with (
            httpx.Client(base_url=url, timeout=10) as leaving,
            leaving.stream(
                "POST", url_path, content=body, headers=signed_headers(body)
            ) as response,
        ):
            for line in response.iter_lines():
                if "response.tts" in line:
                    break  # leave mid-stream: the connection closes
        assert (
            client.post(
                url_path, content=b"{}", headers=signed_headers(b"{}", "whsec_other")
            ).status_code
            == 401
        )
        data = event_body("data")
        assert client.post(url_path, content=data, headers=signed_headers(data)).status_code == 200
        _wait_for(lambda: len(sinks.memory.records) == 6, "the six requests to be recorded")
    yield sinks


def test_memory_records_each_turn(conversation: Sinks) -> None:
    turns = {r.turn_id: r for r in conversation.memory.turns()}
    assert {t: r.outcome for t, r in turns.items()} == {
        "t1": "completed",
        "t2": "completed",
        "t3": "agent_error",
        "t4": "timeout",
        "t5": "client_disconnect",
    }
    for turn_id in ("t1", "t2", "t5"):
        record = turns[turn_id]
        assert record.first_tts is not None and record.duration is not None
        assert 0 < record.first_tts <= record.duration
    assert turns["t3"].first_tts is None and turns["t4"].first_tts is None
    # (an event loop may fire a timer a fraction of a millisecond early: 0.49987 s was seen)
    assert turns["t4"].duration is not None and turns["t4"].duration >= TURN_TIMEOUT - 0.005
    assert all(r.lock_wait is not None and r.lock_wait >= 0 for r in turns.values())
    assert conversation.memory.rejections == {"no_matching_signature": 1}
    table = conversation.memory.table()
    assert "client_disconnect" in table and "first tts" in table


def test_prometheus_figures(conversation: Sinks) -> None:
    samples = conversation.prometheus()

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("layercode_turns_total", outcome="completed") == 2
    assert value("layercode_turns_total", outcome="agent_error") == 1
    assert value("layercode_turns_total", outcome="timeout") == 1
    assert value("layercode_turns_total", outcome="client_disconnect") == 1
    assert value("layercode_turns_total", outcome="rejected") == 0
    assert value("layercode_webhook_requests_total", event_type="message", status="200") == 4
    assert value("layercode_webhook_requests_total", event_type="session.start", status="200") == 1
    assert value("layercode_webhook_requests_total", event_type="data", status="200") == 1
    assert value("layercode_turn_first_tts_seconds_count") == 3
    assert value("layercode_turn_first_tts_seconds_bucket", le="5.0") == 3
    assert value("layercode_turn_duration_seconds_count") == 5
    assert value("layercode_turn_lock_wait_seconds_count") == 5
    assert value("layercode_open_streams") == 0
    assert value("layercode_signature_rejections_total", reason="no_matching_signature") == 1
    assert value("layercode_signature_rejections_total", reason="missing_header") == 0
    buckets = [
        float(dict(labels)["le"])
        for (name, labels) in samples
        if name == "layercode_turn_first_tts_seconds_bucket"
    ]
    assert min(buckets) == 0.05 and max(b for b in buckets if b != float("inf")) == 5.0


def test_otel_spans(conversation: Sinks) -> None:
    spans = conversation.spans.get_finished_spans()
    webhook_spans = {
        s.attributes["layercode.turn_id"]: s
        for s in spans
        if s.name.startswith("webhook ") and s.attributes and "layercode.turn_id" in s.attributes
    }
    assert set(webhook_spans) == {"t1", "t2", "t3", "t4", "t5", "turn-1"}  # turn-1: the data event
    outcomes = {t: s.attributes.get("layercode.outcome") for t, s in webhook_spans.items()}
    assert outcomes == {
        "t1": "completed",
        "t2": "completed",
        "t3": "agent_error",
        "t4": "timeout",
        "t5": "client_disconnect",
        "turn-1": None,
    }
    for turn_id, span in webhook_spans.items():
        assert span.kind is trace.SpanKind.SERVER
        assert span.attributes["layercode.conversation_id"] == "conv-1"
        events = [e.name for e in span.events]
        assert events[-1] == "end"
        assert ("first_tts" in events) == (turn_id in ("t1", "t2", "t5"))
        assert span.start_time <= span.end_time
    assert webhook_spans["t2"].name == "webhook message"
    # OpenTelemetry's error conventions: the exception's type in error.type; its message
    # (which may quote a request or a key) in neither the status nor an event.
    failed = webhook_spans["t3"]
    assert (failed.status.status_code, failed.status.description) == (
        trace.StatusCode.ERROR,
        "agent error",
    )
    assert failed.attributes["error.type"] == "RuntimeError"
    assert "the agent broke" not in repr([(e.name, e.attributes) for e in failed.events])
    for turn_id in ("t2", "t4", "t5"):
        assert webhook_spans[turn_id].status.status_code is not trace.StatusCode.ERROR
        assert "error.type" not in webhook_spans[turn_id].attributes
    # the agent's own span is a child of its webhook span
    agent_spans = [s for s in spans if s.name == "agent"]
    assert len(agent_spans) == 5
    parents = {s.parent.span_id for s in agent_spans if s.parent is not None}
    assert parents == {s.context.span_id for t, s in webhook_spans.items() if t != "turn-1"}


@pytest.mark.parametrize("status", [503, 500, 404])
def test_an_otel_span_of_a_refused_request_follows_the_http_conventions(status: int) -> None:
    # A 5xx: status ERROR without a description (the status code says it) and error.type the
    # status code; a 4xx on a server span: no error.
    from starlette.responses import Response

    sinks = Sinks()
    record = sinks.metrics.arrived(time.perf_counter(), "message", "conv-1", "t1")
    record.finish(Response(status_code=status))
    (span,) = sinks.spans.get_finished_spans()
    assert span.attributes is not None
    if status >= 500:
        assert (span.status.status_code, span.status.description) == (trace.StatusCode.ERROR, None)
        assert span.attributes["error.type"] == str(status)
    else:
        assert span.status.status_code is trace.StatusCode.UNSET
        assert "error.type" not in span.attributes


def test_otel_instruments(conversation: Sinks) -> None:
    points = conversation.otel_points()
    turns = {dict(p.attributes)["layercode.outcome"]: p.value for p in points["layercode.turns"]}
    assert turns == {"completed": 2, "agent_error": 1, "timeout": 1, "client_disconnect": 1}
    requests = {
        (p.attributes["layercode.event_type"], p.attributes["http.response.status_code"]): p.value
        for p in points["layercode.webhook.requests"]
    }
    assert requests == {("session.start", 200): 1, ("message", 200): 4, ("data", 200): 1}
    (first_tts,) = points["layercode.turn.first_tts"]
    assert first_tts.count == 3
    assert first_tts.explicit_bounds[0] == 0.05 and first_tts.explicit_bounds[-1] == 5.0
    assert points["layercode.turn.duration"][0].count == 5
    assert points["layercode.turn.lock_wait"][0].count == 5
    assert points["layercode.streams.open"][0].value == 0
    rejections = points["layercode.signature.rejections"]
    assert [(dict(p.attributes), p.value) for p in rejections] == [
        ({"layercode.reason": "no_matching_signature"}, 1)
    ]


# -- create_app: LAYERCODE_METRICS, the /metrics guard ---------------------------------------


def _settings(**overrides: Any) -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET, **overrides)


def test_create_app_serves_metrics_when_enabled() -> None:
    app = create_app(_settings(metrics=True))
    sinks = {type(s).__name__ for s in app.state.metrics.sinks}
    assert sinks == {"PrometheusMetrics", "OtelMetrics"}
    with serve(app) as url:
        body = event_body("message", text="hi")
        headers = signed_headers(body)
        assert httpx.post(url + "/api/agent", content=body, headers=headers).status_code == 200
        bad = httpx.post(url + "/api/agent", content=body, headers={"layercode-signature": "x"})
        assert bad.status_code == 401
        scrape = httpx.get(url + "/metrics")
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(scrape.text)}
        assert {
            "layercode_webhook_requests",
            "layercode_turns",
            "layercode_turn_first_tts_seconds",
            "layercode_turn_duration_seconds",
            "layercode_turn_lock_wait_seconds",
            "layercode_open_streams",
            "layercode_signature_rejections",
        } <= names
        assert 'layercode_signature_rejections_total{reason="malformed_header"}' in scrape.text
        refused = httpx.post(url + "/metrics")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"  # HEAD is answered too
        assert httpx.head(url + "/metrics").status_code == 200


def test_two_apps_with_a_registry_each_scrape_their_own_figures() -> None:
    # Two create_app apps in one process (tests, several tenants) both used
    # prometheus-client's default registry: each /metrics showed the turns of both.
    registries = [prometheus_client.CollectorRegistry() for _ in range(2)]
    first, second = (create_app(_settings(metrics=True), metrics_registry=r) for r in registries)
    with serve(first) as url_first, serve(second) as url_second:
        body = event_body("message", text="hi")
        response = httpx.post(url_first + "/api/agent", content=body, headers=signed_headers(body))
        assert response.status_code == 200
        scraped = [httpx.get(url + "/metrics").text for url in (url_first, url_second)]
    assert 'layercode_turns_total{outcome="completed"} 1.0' in scraped[0]
    assert 'layercode_turns_total{outcome="completed"} 0.0' in scraped[1]
    assert scraped[1] == render_metrics(registries[1])[0].decode()  # that registry only
    for metrics in (True, False):  # before: with metrics off, not checked (silently ignored)
        with pytest.raises(TypeError, match=r"registry must be a prometheus_client\.Collector"):
            create_app(_settings(metrics=metrics), metrics_registry="default")


def test_metrics_route_absent_when_disabled() -> None:
    with serve(create_app(_settings())) as url:
        response = httpx.get(url + "/metrics")
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "Basic c2NyYXBlOmtleQ=="}, 401),
        ({"authorization": "Bearer"}, 401),
        ({"authorization": "Bearer \udcff"}, 401),
        ({"authorization": "Bearer scrape-key"}, 200),
        ({"x-api-key": "scrape-key"}, 200),
        # An empty X-Api-Key (a front end sending "" when it has none) hid a valid Bearer.
        ({"x-api-key": "", "authorization": "Bearer scrape-key"}, 200),
        ({"x-api-key": "wrong", "authorization": "Bearer scrape-key"}, 401),
    ],
)
def test_metrics_guard(headers: dict[str, str], status: int) -> None:
    app = create_app(_settings(metrics=True, metrics_api_keys="other-key,scrape-key"))
    with serve(app) as url:
        raw = [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in headers.items()]
        response = httpx.get(url + "/metrics", headers=raw)
    assert response.status_code == status
    if status == 401:
        assert response.json() == {"error": "missing or invalid API key"}
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("keys", ["s3cret", b"s3cret", None, 7])
def test_metrics_endpoint_refuses_keys_that_are_not_a_list(keys: Any) -> None:
    """One string was read as one key per character: ``X-Api-Key: s`` passed; ``None`` (an
    unset variable) or a number raised ``TypeError`` ("'NoneType' object is not iterable")."""
    with pytest.raises(ConfigurationError, match=r"api_keys must be a list of keys") as info:
        MetricsEndpoint(api_keys=keys)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "key",
    [b"s3cret", None, 7, "", " s3cret", "s3cret\n", "s3\x00cret", "s3cret\udcff", "s3clé"],
)
def test_metrics_endpoint_refuses_a_key_no_client_can_send(key: Any) -> None:
    """A key of another type raised ``AttributeError`` (``UnicodeEncodeError`` with a lone
    surrogate); an empty one, or one with a blank at either end or a control character,
    was taken and then matched no request ever (servers strip a header's blanks). "s3clé"
    was taken: curl sends it as UTF-8, browsers and requests as latin-1, httpx not at all."""
    with pytest.raises(ConfigurationError, match=r"api_keys\[1\]") as info:
        MetricsEndpoint(api_keys=["other-key", key])
    assert "s3" not in str(info.value)  # a key is a secret: not shown


@pytest.mark.parametrize("setting", ["metrics_api_keys", "authorize_api_keys"])
def test_settings_name_the_setting_of_a_key_no_client_can_send(setting: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{setting}: expected printable") as info:
        _settings(metrics=True, **{setting: "other-key,s3\x01cret"})
    assert "s3" not in str(info.value)


@pytest.mark.parametrize("setting", ["metrics_api_keys", "authorize_api_keys"])
@pytest.mark.parametrize(
    ("key", "named"),
    [(SECRET, "LAYERCODE_WEBHOOK_SECRET"), ("lc-api-key", "LAYERCODE_API_KEY")],
)
def test_a_route_key_that_is_a_server_secret_is_refused(setting: str, key: str, named: str) -> None:
    """A key equal to the webhook secret (or LayerCode's API key) was taken: every scrape
    (every browser's authorize call) then carried the secret that signs webhooks."""
    settings = Settings(
        env_file=None,
        environ={},
        metrics=True,
        layercode_webhook_secret=f"whsec_rotated_out,{SECRET}",
        layercode_api_key="lc-api-key",
        **{setting: f"other-key,{key}"},
    )
    with pytest.raises(ConfigurationError) as info:
        create_app(settings)
    assert str(info.value) == (
        f"LAYERCODE_{setting.upper()}[1] is the {named}: a client holding it could do what that secret "
        "does; give the route a key of its own"
    )


_OPEN_METRICS = (
    "the metrics route /metrics is not guarded: anyone who can reach it can read the metrics "
    "(set LAYERCODE_METRICS_API_KEYS)"
)
_OPEN_AUTHORIZE = (
    "the authorize route /api/authorize is not guarded: anyone who can reach it can mint "
    "LayerCode sessions (set LAYERCODE_AUTHORIZE_API_KEYS or authorize_guard)"
)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("metrics_keys", "authorize_keys", "expected"),
    [
        ("", "k", [_OPEN_METRICS]),
        ("scrape-key", "k", []),
        ("", "", [_OPEN_AUTHORIZE, _OPEN_METRICS]),
    ],
)
async def test_an_unguarded_metrics_route_warns_at_start_up(
    caplog: pytest.LogCaptureFixture, metrics_keys: str, authorize_keys: str, expected: list[str]
) -> None:
    settings = _settings(
        metrics=True, metrics_api_keys=metrics_keys, authorize_api_keys=authorize_keys
    )
    app = create_app(settings)
    with caplog.at_level(logging.WARNING, logger="layercode_asgi"):
        async with app.router.lifespan_context(app):
            pass
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == expected


# -- the pieces: the middleware's reasons, turns without a store, the log line, the demo -----


def test_signature_rejections_by_reason() -> None:
    reasons: list[str] = []
    webhook = LayercodeWebhook(scripted)
    app = LayercodeSignature(
        webhook, secret=SECRET, replay_protection=True, on_rejected=reasons.append
    )
    body = event_body("data")
    headers = signed_headers(body)
    with serve(app) as url:
        post = lambda **h: httpx.post(url, content=body, headers=h).status_code  # noqa: E731
        assert post(**{"content-type": "application/json"}) == 401
        assert post(**{"layercode-signature": "nonsense"}) == 401
        assert post(**{"layercode-signature": "t=1000,v1=" + "0" * 64}) == 401
        signed = headers["layercode-signature"]
        wrong = signed[:-1] + ("1" if signed.endswith("0") else "0")  # "00" was 1 in 256 right
        assert post(**{"layercode-signature": wrong}) == 401
        assert post(**headers) == 200
        assert post(**headers) == 409
    assert reasons == [
        "missing_header",
        "malformed_header",
        "timestamp_out_of_tolerance",
        "no_matching_signature",
        "replayed",
    ]


def test_an_on_rejected_callback_that_raises_leaves_the_answer_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A callback of the application's that raised (a counter of its own, say) turned each
    # refused request into uvicorn's plain-text 500 instead of its 401/409 JSON.
    def broken(reason: str) -> None:
        raise RuntimeError(f"counter down ({reason})")

    webhook = LayercodeWebhook(scripted)
    app = LayercodeSignature(webhook, secret=SECRET, replay_protection=True, on_rejected=broken)
    body = event_body("data")
    headers = signed_headers(body)
    with serve(app) as url:
        post = lambda **h: httpx.post(url, content=body, headers=h)  # noqa: E731
        missing = post()
        assert missing.status_code == 401 and "error" in missing.json()
        signed = headers["layercode-signature"]
        wrong = signed[:-1] + ("1" if signed.endswith("0") else "0")
        bad = post(**{"layercode-signature": wrong})
        assert bad.status_code == 401 and "error" in bad.json()
        assert post(**headers).status_code == 200
        replayed = post(**headers)
        assert replayed.status_code == 409 and "error" in replayed.json()
    failures = [r for r in caplog.records if r.getMessage().startswith("on_rejected failed")]
    assert len(failures) == 3


def test_turns_without_a_store_wait_for_no_lock(caplog: pytest.LogCaptureFixture) -> None:
    memory = MemoryMetrics()
    webhook = LayercodeWebhook(scripted, conversations=None, metrics=TurnMetrics(memory))
    caplog.set_level(logging.INFO, "layercode_asgi.webhook")
    with serve(webhook) as url:
        body = event_body("message", text="hi")
        assert "response.end" in httpx.post(url, content=body).text
        assert httpx.post(url, content=b"{not json").status_code == 400
        _wait_for(lambda: len(memory.records) == 2, "two records")
    turn, malformed = memory.records
    assert turn.outcome == "completed" and turn.lock_wait is None
    assert turn.first_tts is not None and turn.duration is not None
    assert malformed.event_type is None and malformed.status == 400
    assert malformed.outcome is None and malformed.first_tts is None
    lines = [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.webhook"]
    assert "first_tts_ms=" in lines[0] and "first_tts_ms" not in lines[1]


def test_a_turn_refused_before_it_ran_is_rejected() -> None:
    memory = MemoryMetrics()
    webhook = LayercodeWebhook(scripted, max_queued_turns=0, metrics=TurnMetrics(memory))
    with serve(webhook) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = event_body("message", turn_id="a", text="linger")
        with (
            httpx.Client(base_url=url, timeout=10) as other,
            other.stream("POST", "/", content=first) as running,
        ):
            lines = running.iter_lines()  # kept: a discarded iterator closes the connection
            assert "response.tts" in next(lines)  # the first turn speaks, holding the lock
            second = client.post("/", content=event_body("message", turn_id="b", text="x"))
            assert second.status_code == 503, second.text
        _wait_for(lambda: len(memory.records) == 2, "two records")
    outcomes = {r.turn_id: r.outcome for r in memory.records}
    assert outcomes == {"a": "client_disconnect", "b": "rejected"}


def test_logfire_token_turns_opentelemetry_on() -> None:
    metrics = metrics_from_settings(_settings(logfire_token="lf-token"))
    assert metrics is not None
    assert [type(s).__name__ for s in metrics.sinks] == ["OtelMetrics"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_json_logs_writes_json_lines_only(workers: str) -> None:
    # With --workers, the supervisor's uvicorn logged "Uvicorn running on …" as text; the
    # settings' own warning (a misspelt variable) and serve's about Redis were text too.
    from .conftest import start_server_process

    server = start_server_process(
        [
            *(sys.executable, "-m", "layercode_asgi", "serve", "--env-file", ""),
            *("--port", "{port}", "--workers", workers),
        ],
        env={
            **os.environ,
            "LAYERCODE_WEBHOOK_SECRET": SECRET,
            "LOG_FORMAT": "json",
            "LAYERCODE_TURN_TIMOUT": "3",
        },
    )
    try:
        body = event_body("message", text="hello")
        reply = httpx.post(server.url + "/api/agent", content=body, headers=signed_headers(body))
        assert "response.end" in reply.text
    finally:
        assert server.stop() == 0
    lines = [line for line in server.output().splitlines() if line.strip()]
    banner = [line for line in lines if line.startswith("layercode-asgi ")]
    records = [json.loads(line) for line in lines if line not in banner]  # all JSON
    assert len(banner) == 1 and records
    messages = [r["message"] for r in records if r["level"] == "WARNING"]
    assert any(m.startswith("LAYERCODE_TURN_TIMOUT (the environment) is no") for m in messages)
    assert any("2 workers without REDIS_URL" in m for m in messages) is (workers == "2")
    (webhook,) = [r for r in records if r["logger"] == "layercode_asgi.webhook"]
    assert webhook["event_type"] == "message" and webhook["status"] == 200
    assert webhook["first_tts_ms"] <= webhook["duration_ms"]
    assert any(r["logger"] == "uvicorn.access" for r in records)
    assert all("color_message" not in r for r in records)


OTEL_GLOBAL_SCRIPT = """
import anyio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from layercode_asgi import Settings, create_app
from layercode_asgi.testing import LayercodeTestClient

# the app first, the SDK after it (as setup_logging configures Logfire after create_app)
app = create_app(Settings(env_file=None, environ={}, layercode_webhook_secret="whsec_g", metrics=True))
spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

async def main():
    async with LayercodeTestClient(app, secret="whsec_g") as client:
        await client.session_start()
        await client.message("hi")

anyio.run(main)
print(sorted(span.name for span in spans.get_finished_spans()))
data = reader.get_metrics_data()
print(sorted(m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics))
"""


def test_create_app_reports_to_the_sdk_the_application_configured() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", OTEL_GLOBAL_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
    )
    assert done.returncode == 0, done.stderr
    span_names, metric_names = done.stdout.splitlines()
    assert span_names == "['webhook message', 'webhook session.start']"
    for name in ("layercode.turns", "layercode.turn.first_tts", "layercode.webhook.requests"):
        assert f"'{name}'" in metric_names


def test_one_process_and_several_processes_expose_the_same_figures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """One process keeps plain numbers and builds the families when scraped; several
    processes (``PROMETHEUS_MULTIPROC_DIR``) use prometheus-client's instruments. The same
    records give the same scrape either way (its ``_created`` lines aside)."""
    from layercode_asgi.metrics import WebhookRecord

    def records() -> list[WebhookRecord]:
        out = []
        for index, (kind, status, outcome, first_tts, lock_wait) in enumerate(
            [
                ("message", 200, "completed", 0.04, 0.0),  # below the first bucket
                ("message", 200, "completed", 0.1, 0.002),  # on a bound: le="0.1"
                ("session.start", 200, "timeout", None, 0.3),
                ("message", 503, "rejected", None, None),
                ("data", 200, None, None, None),
                ("message", 200, "agent_error", 9.0, 40.0),  # above every bound: +Inf
            ]
        ):
            record = WebhookRecord(None, 0.0, kind, "c", f"t{index}")
            record.status, record.outcome = status, outcome
            record.first_tts, record.lock_wait = first_tts, lock_wait
            record.streaming = outcome not in (None, "rejected")
            record.duration = 0.5 + index
            out.append(record)
        return out

    def scrape(multiprocess: bool) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        if multiprocess:
            monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        else:
            monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        registry = prometheus_client.CollectorRegistry()
        sink = PrometheusMetrics(registry)
        for record in records():
            if record.streaming:
                sink.turn_started(record)
            sink.request_finished(record, None)
        sink.turn_started(records()[0])  # one stream still open
        sink.signature_rejected("no_matching_signature")
        sink.signature_rejected("replayed")
        text = prometheus_client.generate_latest(registry).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    one, several = scrape(False), scrape(True)
    assert one == several
    assert one[("layercode_open_streams", ())] == 1
    assert one[("layercode_turn_first_tts_seconds_bucket", (("le", "0.05"),))] == 1
    assert one[("layercode_turn_first_tts_seconds_bucket", (("le", "0.1"),))] == 2
    assert one[("layercode_turn_first_tts_seconds_bucket", (("le", "5.0"),))] == 2
    assert one[("layercode_turn_first_tts_seconds_bucket", (("le", "+Inf"),))] == 3
    assert one[("layercode_turn_first_tts_seconds_sum", ())] == pytest.approx(9.14)
    assert (
        one[("layercode_webhook_requests_total", (("event_type", "message"), ("status", "503")))]
        == 1
    )
    assert one[("layercode_signature_rejections_total", (("reason", "replayed"),))] == 1


def test_one_process_in_multiprocess_mode_refuses_a_second_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # With PROMETHEUS_MULTIPROC_DIR, two sinks on two registries in one process (two apps,
    # metrics_registry=) wrote the same figures of the process's file, each from its own
    # count: three turns scraped as two.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    first = prometheus_client.CollectorRegistry()
    PrometheusMetrics(first)
    PrometheusMetrics(first)  # the same registry: the same figures, shared
    with pytest.raises(ConfigurationError, match="one registry per process") as refused:
        create_app(_settings(metrics=True), metrics_registry=prometheus_client.CollectorRegistry())
    assert str(tmp_path) in str(refused.value)


CONFIG_CHECK = """
from layercode_asgi import ConfigurationError, Settings, create_app

try:
    create_app(Settings(env_file=None, environ={}, layercode_webhook_secret="whsec_m", metrics=True))
except ConfigurationError as exc:
    print(exc)
"""


def _configuration_error(env: dict[str, str]) -> str:
    """What ``create_app`` with metrics on says in a process of its own with ``env``
    (prometheus-client and OpenTelemetry read their variables when imported)."""
    done = subprocess.run(
        [sys.executable, "-c", CONFIG_CHECK], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_multiprocess_directory_that_is_none_is_named(tmp_path: Any, kind: str) -> None:
    # It was a FileNotFoundError (NotADirectoryError) traceback from prometheus-client's
    # files. prometheus-client reads the variable when imported: a process of its own.
    path = tmp_path / "metrics"
    if kind == "file":
        path.write_text("")
    assert _configuration_error({**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}) == (
        f"PROMETHEUS_MULTIPROC_DIR ({path}) is not a directory: create it, empty, before the "
        "processes start"
    )


def test_a_multiprocess_directory_this_process_cannot_write_is_named(tmp_path: Any) -> None:
    # It was a PermissionError traceback from prometheus-client's files at create_app (a
    # FileNotFoundError naming a file for a directory that exists, on a read-only one).
    if os.geteuid() == 0:  # root writes any mode: a directory no process may create files in
        path = "/proc"
    else:
        path = str(tmp_path / "read-only")
        os.mkdir(path, 0o555)
    assert _configuration_error({**os.environ, "PROMETHEUS_MULTIPROC_DIR": path}) == (
        f"PROMETHEUS_MULTIPROC_DIR ({path}) is not writable: every process writes its "
        "figures there; give it a directory the server's user can write"
    )


@pytest.mark.parametrize("variable", ["OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER"])
def test_an_opentelemetry_provider_that_cannot_be_loaded_is_named(variable: str) -> None:
    # A misspelled provider name stopped create_app with a bare StopIteration traceback
    # from OpenTelemetry's entry-point lookup. The global provider: a process of its own.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    assert _configuration_error({**env, variable: "sdk_tracer_provder"}) == (
        f"{variable} (sdk_tracer_provder): OpenTelemetry could not load this provider; is "
        "the name right and its package installed?"
    )


SDK_MID_TURN = """
import anyio
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from layercode_asgi import LayercodeWebhook, TurnMetrics
from layercode_asgi.otel import OtelMetrics
from layercode_asgi.testing import LayercodeTestClient

reader = InMemoryMetricReader()


async def agent(event):
    yield "Hello."
    if event.text == "configure":  # the application sets its SDK up while this turn runs
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    yield " Bye."


async def main():
    webhook = LayercodeWebhook(agent, metrics=TurnMetrics(OtelMetrics()))
    async with LayercodeTestClient(webhook, secret="whsec_unused", path="/") as client:
        await client.message("configure")
        await client.message("again")


anyio.run(main)
points = {
    metric.name: [point.value for point in metric.data.data_points]
    for resource in reader.get_metrics_data().resource_metrics
    for scope in resource.scope_metrics
    for metric in scope.metrics
    if metric.name in ("layercode.streams.open", "layercode.turns")
}
print(points)
"""


def test_open_streams_stay_right_when_the_sdk_is_set_up_during_a_turn() -> None:
    # The turn running when the SDK came counted +1 into the no-op instrument and -1 into
    # the SDK's: layercode.streams.open read -1 from then on.
    done = subprocess.run(
        [sys.executable, "-c", SDK_MID_TURN], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "{'layercode.turns': [2], 'layercode.streams.open': [0]}"


SDK_LATER = """
import time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.responses import Response
from layercode_asgi.metrics import TurnMetrics
from layercode_asgi.otel import SDK_CHECK_INTERVAL, OtelMetrics

metrics = TurnMetrics(OtelMetrics())
spans = InMemorySpanExporter()
start = time.perf_counter()

def request(at):
    metrics.arrived(start + at, "message", "c1", "t1").finish(Response(status_code=200))
    return len(spans.get_finished_spans())

assert request(0.0) == 0  # no SDK yet: no span work
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
assert request(0.1) == 0  # looked up at most once a second
assert request(SDK_CHECK_INTERVAL + 0.1) == 1  # found, and kept from then on
assert request(0.2) == 2
print("ok")
"""


def test_an_sdk_configured_later_is_used_within_a_second() -> None:
    """The global tracer provider is set once per process: a process of its own."""
    done = subprocess.run(
        [sys.executable, "-c", SDK_LATER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.anyio
async def test_otel_span_attributes_from_the_request_are_cut_and_escaped() -> None:
    # A signed data event with a 100,000-character conversation_id made a span attribute
    # of that size (the OpenTelemetry SDK sets no length limit by default); and its control
    # characters (ESC, CR/LF, a bidi override) reached the span as they were, for a trace
    # viewer or a console exporter to render, where the log line has them escaped.
    from layercode_asgi.logs import LOG_VALUE_MAX_CHARS

    sinks = Sinks()
    # No store: with one, a conversation_id over 512 characters is a 400 (measured alike).
    webhook = LayercodeWebhook(scripted, metrics=sinks.metrics, conversations=None)
    app = LayercodeSignature(webhook, secret=SECRET)
    hostile = "\x1b[31m\r\n\u202e\x00"  # 9 characters
    body = event_body("data", conversation_id=hostile + "c" * 99_991, turn_id=f"t{hostile}")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/api/agent", content=body, headers=signed_headers(body))
    assert response.status_code == 200
    (span,) = [s for s in sinks.spans.get_finished_spans() if s.name.startswith("webhook ")]
    assert span.attributes is not None
    cid = span.attributes["layercode.conversation_id"]
    tid = span.attributes["layercode.turn_id"]
    escaped = "\\u001b[31m\\r\\n\\u202e\\u0000"
    assert cid == escaped + "c" * (LOG_VALUE_MAX_CHARS - 9) + "…(+99000 chars)"
    assert tid == f"t{escaped}"


@pytest.mark.anyio
async def test_request_values_never_become_metric_labels() -> None:
    # 1,000 unknown event types and hostile ids: the labels stay the known event types and
    # "unknown", and no byte of a request reaches the scrape (or a span's name).
    sinks = Sinks()
    app = LayercodeSignature(LayercodeWebhook(scripted, metrics=sinks.metrics), secret=SECRET)
    hostile = 'x"}\n# TYPE evil counter\nevil 1\x00\u2028'
    bodies = [json.dumps({"type": f"{hostile}{i}", "conversation_id": "c"}) for i in range(1000)]
    bodies.append(event_body("data", conversation_id=hostile, turn_id=hostile).decode())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for body in bodies:
            response = await client.post("/", content=body, headers=signed_headers(body))
            assert response.status_code == 200
    scraped = render_metrics(sinks.registry)[0].decode()
    assert "evil" not in scraped
    labels = {
        labels for name, labels in sinks.prometheus() if name == "layercode_webhook_requests_total"
    }
    assert labels == {
        (("event_type", "unknown"), ("status", "200")),
        (("event_type", "data"), ("status", "200")),
    }
    points = sinks.otel_points()["layercode.webhook.requests"]
    assert {p.attributes["layercode.event_type"]: p.value for p in points} == {
        "unknown": 1000,
        "data": 1,
    }
    assert {s.name for s in sinks.spans.get_finished_spans()} == {"webhook unknown", "webhook data"}


class _Started(MemoryMetrics):
    """A memory sink that also notes the turn ids of the requests that reached the webhook."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str | None] = []

    def request_started(self, record: Any) -> None:
        self.started.append(record.turn_id)


def test_a_client_leaving_while_its_turn_waits_for_the_lock_is_no_200(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It was counted (and logged) as status 200, the stream's status, though nothing was
    # ever sent: now 499 (client closed request), with the outcome client_disconnect.
    import socket

    caplog.set_level(logging.INFO, "layercode_asgi.webhook")
    app = create_app(_settings(metrics=True), agent=scripted)
    sink = _Started()
    app.state.metrics.sinks += (sink,)
    with serve(app) as url:
        first = event_body("message", turn_id="a", text="linger")
        second = event_body("message", turn_id="b", text="hi")
        with (
            httpx.Client(base_url=url, timeout=10) as holder,
            holder.stream(
                "POST", "/api/agent", content=first, headers=signed_headers(first)
            ) as running,
        ):
            lines = running.iter_lines()  # kept: a discarded iterator closes the connection
            assert "response.tts" in next(lines)  # the first turn holds the lock
            host, port = url.removeprefix("http://").split(":")
            head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(second).items())
            request = (
                f"POST /api/agent HTTP/1.1\r\nhost: {host}\r\n{head}"
                f"content-length: {len(second)}\r\n\r\n"
            ).encode() + second
            with socket.create_connection((host, int(port)), timeout=10) as waiting:
                waiting.sendall(request)
                _wait_for(lambda: "b" in sink.started, "the second turn to reach the webhook")
            _wait_for(lambda: len(sink.records) == 1, "the second turn to be recorded")
            (left,) = sink.records
            assert (left.turn_id, left.outcome, left.status) == ("b", "client_disconnect", 499)
            scraped = httpx.get(url + "/metrics").text
            assert 'layercode_webhook_requests_total{event_type="message",status="499"}' in scraped
    lines = [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.webhook"]
    assert any("turn=b status=499" in line for line in lines), lines


def test_a_turn_the_server_cut_at_shutdown_is_aborted_not_a_client_disconnect() -> None:
    # A server's own shutdown (uvicorn's timeout_graceful_shutdown) cancelling a running
    # turn was counted as client_disconnect, though the caller never left.
    memory = MemoryMetrics()
    registry = prometheus_client.CollectorRegistry()
    metrics = TurnMetrics(PrometheusMetrics(registry), memory)
    webhook = LayercodeWebhook(scripted, turn_timeout=30, metrics=metrics)
    body = event_body("message", turn_id="cut", text="linger")
    with httpx.Client(timeout=10) as client:
        with serve(webhook, timeout_graceful_shutdown=0.2) as url:
            response = client.send(client.build_request("POST", url, content=body), stream=True)
            lines = response.iter_lines()  # kept: a discarded iterator closes the connection
            assert "response.tts" in next(lines)
        # the server is gone; its shutdown cancelled the turn while the client still read
        response.close()
    ((record),) = memory.records
    assert (record.turn_id, record.outcome) == ("cut", "aborted")
    scraped = render_metrics(registry)[0].decode()
    assert 'layercode_turns_total{outcome="aborted"} 1.0' in scraped
    assert 'layercode_turns_total{outcome="client_disconnect"} 0.0' in scraped
    assert "layercode_open_streams 0.0" in scraped


@pytest.mark.parametrize("trio_worker", [False, True])
def test_a_client_leaving_mid_stream_under_hypercorn_is_a_client_disconnect(
    trio_worker: bool,
) -> None:
    # The other side of the test above: a caller who left is told apart from the server's
    # own cancellation under Hypercorn's workers too (uvicorn and Hypercorn's trio worker:
    # the module's conversation).
    memory = MemoryMetrics()
    webhook = LayercodeWebhook(scripted, turn_timeout=30, metrics=TurnMetrics(memory))
    body = event_body("message", turn_id="left", text="linger")
    with serve_hypercorn(webhook, trio_worker=trio_worker) as url:
        with httpx.Client(timeout=10) as client, client.stream("POST", url, content=body) as sent:
            for line in sent.iter_lines():
                if "response.tts" in line:
                    break  # leave mid-stream: the connection closes
        _wait_for(lambda: len(memory.records) == 1, "the turn to be recorded")
    ((record),) = memory.records
    assert (record.turn_id, record.outcome, record.status) == ("left", "client_disconnect", 200)
