"""The authorize route over real HTTP (uvicorn, hypercorn on asyncio and trio) against a fake
LayerCode on 127.0.0.1: one app on several event loops, which key wins when two are sent,
hostile upstream answers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from layercode_asgi import create_app
from layercode_asgi.errors import ConfigurationError

from .asgi_stub import ASGIStub
from .conftest import NEEDS_TRIO, httpx_refuses, raw_http_server, serve, serve_hypercorn
from .test_server import FakeLayercode, settings


@pytest.fixture
def layercode() -> Iterator[tuple[FakeLayercode, str]]:
    fake = FakeLayercode()
    with serve(fake.app) as url:
        yield fake, url + "/v1"


@NEEDS_TRIO  # the later loop that failed is trio's
def test_authorize_on_a_later_event_loop(layercode: tuple[FakeLayercode, str]) -> None:
    """Mounted (no lifespan closes its client), one app is served on asyncio, then trio, then
    asyncio again: each loop gets its own upstream client, none a 500."""
    fake, api = layercode
    parent = Starlette(routes=[Mount("/voice", create_app(settings(layercode_api_url=api)))])
    for run in (serve, functools.partial(serve_hypercorn, trio_worker=True), serve):
        with run(parent) as url, httpx.Client(base_url=url, timeout=20) as client:
            for _ in range(2):  # the second call reuses this loop's pooled connection
                r = client.post("/voice/api/authorize", json={"agent_id": "a"})
                assert (r.status_code, r.json()) == (200, fake.answer)
    assert len(fake.requests) == 6


def guarded_app(api: str) -> Any:
    """``create_app`` whose authorize route and /metrics both take the key ``good``."""
    return create_app(
        settings(
            layercode_api_url=api, authorize_api_keys="good", metrics=True, metrics_api_keys="good"
        )
    )


def test_x_api_key_decides_when_both_keys_are_sent(layercode: tuple[FakeLayercode, str]) -> None:
    """One rule for the authorize route and /metrics: a non-empty ``X-Api-Key`` is the key
    checked, ``Authorization: Bearer`` only in its absence (a front end's own Bearer token,
    say, neither helps nor hurts)."""
    pytest.importorskip("prometheus_client")
    fake, api = layercode
    app = guarded_app(api)
    cases = [
        ({"x-api-key": "good", "authorization": "Bearer bad"}, 200),
        ({"x-api-key": "bad", "authorization": "Bearer good"}, 401),
        ({"x-api-key": "", "authorization": "Bearer good"}, 200),
        ({"authorization": "Bearer good"}, 200),
        ({"x-api-key": "bad"}, 401),
    ]
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        for headers, expected in cases:
            authorize = client.post("/api/authorize", json={"agent_id": "a"}, headers=headers)
            metrics = client.get("/metrics", headers=headers)
            assert (authorize.status_code, metrics.status_code) == (expected, expected), headers
            if expected == 401:
                assert authorize.json() == metrics.json() == {"error": "missing or invalid API key"}
    for _, headers, _ in fake.requests:  # the caller's keys stay here; ours goes upstream
        assert (headers["authorization"], "x-api-key" in headers) == ("Bearer lc_key", False)
    assert len(fake.requests) == 3


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nauthorization: Bearer lc_live_7f3a\x00\r\n\r\n",
        b"HTTP/1.1 200 lc_live_7f3a\x00\r\n\r\n",
    ],
)
def test_a_broken_upstream_answer_does_not_log_our_key(
    reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream (a proxy echoing our request) whose malformed answer holds our API key:
    502, and the log names the fault without the key."""
    with raw_http_server(lambda _: reply) as base:  # a LayerCode double answering `reply`
        app = create_app(settings(layercode_api_url=base + "/v1", layercode_api_key="lc_live_7f3a"))
        with (
            caplog.at_level(logging.INFO, logger="layercode_asgi"),
            serve(app) as url,
            httpx.Client(base_url=url, timeout=20) as client,
        ):
            r = client.post("/api/authorize", json={"agent_id": "a"})
    assert (r.status_code, r.json()) == (502, {"error": "LayerCode API unreachable"})
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "LayerCode authorize unreachable: RemoteProtocolError" in logged
    assert "lc_live_7f3a" not in logged


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_with_our_key(
    layercode: tuple[FakeLayercode, str], status: int
) -> None:
    """A LayerCode (or a proxy) redirecting elsewhere: 502, the key goes nowhere else."""
    fake, api = layercode
    thief = FakeLayercode()
    with serve(thief.app) as elsewhere:
        fake.status, fake.answer = status, b""
        fake.headers = {"location": elsewhere + "/v1/agents/web/authorize_session"}
        with serve(create_app(settings(layercode_api_url=api))) as url:
            r = httpx.post(url + "/api/authorize", json={"agent_id": "a"}, timeout=20)
    assert (r.status_code, r.json()) == (502, {"error": f"LayerCode API error ({status})"})
    assert len(fake.requests) == 1 and thief.requests == []


@pytest.mark.parametrize("location", ["javascript:alert(1)", "http://xn--/", "http://[::1"])
def test_a_redirect_to_a_location_httpx_cannot_read_is_a_502(
    layercode: tuple[FakeLayercode, str], location: str
) -> None:
    """httpx reads a redirect's Location even when it does not follow it, and raises when it
    cannot: before, an httpx.InvalidURL or IDNAError, a 500 "internal error"."""
    fake, api = layercode
    fake.status, fake.answer, fake.headers = 302, b"", {"location": location}
    with serve(create_app(settings(layercode_api_url=api))) as url:
        r = httpx.post(url + "/api/authorize", json={"agent_id": "a"}, timeout=20)
    assert r.status_code == 502
    assert r.json() in (
        {"error": "LayerCode API sent an invalid response"},
        {"error": "LayerCode API unreachable"},  # httpx's RemoteProtocolError ('[::1')
    )


def test_a_json_body_is_read_whatever_its_content_type(
    layercode: tuple[FakeLayercode, str],
) -> None:
    """``fetch(url, {method: "POST", body: JSON.stringify(...)})`` sends ``text/plain``: the
    body is JSON all the same (as the reference backends read it), and goes upstream as JSON."""
    fake, api = layercode
    body = b'{"agent_id":"a"}'
    with serve(create_app(settings(layercode_api_url=api))) as url, httpx.Client() as client:
        for content_type in ("text/plain;charset=UTF-8", None, "application/json"):
            headers = {"content-type": content_type} if content_type else {}
            r = client.post(url + "/api/authorize", content=body, headers=headers, timeout=20)
            assert (r.status_code, r.json()) == (200, fake.answer)
        r = client.post(url + "/api/authorize", data={"agent_id": "a"}, timeout=20)  # a form
        assert (r.status_code, r.json()) == (
            400,
            {"error": "body must be a JSON object with agent_id"},
        )
    assert [(h["content-type"], sent) for _, h, sent in fake.requests] == [
        ("application/json", body)
    ] * 3


def test_half_an_emoji_from_the_front_end_or_from_layercode_is_not_refused(
    layercode: tuple[FakeLayercode, str],
) -> None:
    """JavaScript's JSON.stringify writes a string cut inside an emoji as a lone UTF-16
    surrogate escape (valid JSON): the front end's body goes upstream as it was sent, and such
    an answer is relayed with U+FFFD (before: 400 "body must be a JSON object", and 502)."""
    fake, api = layercode
    body = b'{"agent_id":"a","metadata":{"name":"cut \\ud83d"}}'
    fake.answer = b'{"client_session_key":"csk","conversation_id":"c","note":"\\ude00!"}'
    with serve(create_app(settings(layercode_api_url=api))) as url:
        r = httpx.post(url + "/api/authorize", content=body, timeout=20)
    expected = {"client_session_key": "csk", "conversation_id": "c", "note": "\ufffd!"}
    assert (r.status_code, r.json()) == (200, expected)
    assert [sent for _, _, sent in fake.requests] == [body]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ALL_PROXY", "socks5://127.0.0.1:1"), ("SSL_CERT_FILE", "/nonexistent/ca.pem")],
)
def test_an_environment_httpx_cannot_use_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Before: create_app started, and every authorize request was a 500 "internal error"
    (httpx's ImportError or FileNotFoundError, making its client)."""
    if not httpx_refuses(variable, value):
        pytest.skip(f"this httpx makes a client with {variable}={value}")
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(ConfigurationError, match=f"HTTP client for LayerCode's API.*{variable}"):
        create_app(settings())
    create_app(settings(layercode_api_key=None))  # no authorize route to serve: no client


@pytest.mark.parametrize(
    "answer",
    [
        b"{}",
        b'{"conversation_id":"c","config":{}}',
        b'{"client_session_key":""}',
        b'{"client_session_key":null,"conversation_id":"c"}',
        b'{"client_session_key":["csk"]}',
    ],
)
def test_a_success_without_a_session_key_is_a_502(
    layercode: tuple[FakeLayercode, str], answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 whose object has no ``client_session_key`` (a string) gives the browser nothing
    to connect with: before, relayed as a 200 (the front end failed later, no log said why)."""
    fake, api = layercode
    fake.answer = answer
    with (
        caplog.at_level(logging.WARNING, logger="layercode_asgi"),
        serve(create_app(settings(layercode_api_url=api))) as url,
    ):
        r = httpx.post(url + "/api/authorize", json={"agent_id": "a"}, timeout=20)
    assert (r.status_code, r.json()) == (502, {"error": "LayerCode API sent an invalid response"})
    logged = [record.getMessage() for record in caplog.records]
    assert "LayerCode authorize answer refused: no client_session_key" in logged


@pytest.mark.parametrize(
    ("status", "sent", "expected_status", "relayed"),
    [
        (429, "30", 429, "30"),
        (429, "007", 429, "7"),
        (429, "99999999", 429, "86400"),  # a day at most
        (503, "12", 502, "12"),
        (429, "soon", 429, None),
        (429, "-1", 429, None),
        (429, "1e3", 429, None),
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", 429, None),
        (502, "30", 502, None),  # a Retry-After means something on a 429 or 503 only
        (403, "30", 403, None),
    ],
)
def test_a_rate_limited_or_unavailable_upstream_passes_its_retry_after(
    layercode: tuple[FakeLayercode, str],
    status: int,
    sent: str,
    expected_status: int,
    relayed: str | None,
) -> None:
    """LayerCode's 429 (or 503) says when to try again: the caller is told so too, in seconds
    (before, no header of the answer was relayed: a front end retried at once)."""
    fake, api = layercode
    fake.status, fake.answer, fake.headers = status, {"error": "slow down"}, {"retry-after": sent}
    with serve(create_app(settings(layercode_api_url=api))) as url:
        r = httpx.post(url + "/api/authorize", json={"agent_id": "a"}, timeout=20)
    assert (r.status_code, r.headers.get("retry-after")) == (expected_status, relayed)
    assert r.headers["content-type"] == "application/json"


def test_one_app_on_two_event_loops_at_once_keeps_a_client_for_each() -> None:
    """One app served by two servers at once (two threads, two event loops: a test client
    beside a server, say): each loop keeps its own pooled connection to LayerCode. Before,
    each request on the other loop replaced the one client, leaving the old one's connection
    open and unclosed: a new connection to LayerCode per request (20 here)."""
    fake = FakeLayercode()
    connections: set[tuple[str, int]] = set()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            connections.add(tuple(scope["client"]))
        await fake.app(scope, receive, send)

    with serve(upstream, timeout_keep_alive=60) as api:
        app = create_app(settings(layercode_api_url=api + "/v1"))
        with serve(app) as first, serve(app) as second, httpx.Client(timeout=20) as client:
            for _ in range(10):
                for url in (first, second):
                    r = client.post(url + "/api/authorize", json={"agent_id": "a"})
                    assert (r.status_code, r.json()) == (200, fake.answer)
    assert len(fake.requests) == 20
    # one per loop; a third or fourth only if a pooled connection idled out (httpx: 5 s)
    assert len(connections) <= 4, len(connections)


def test_a_key_header_sent_twice_is_refused(layercode: tuple[FakeLayercode, str]) -> None:
    """Two ``X-Api-Key`` (or, without one, two ``Authorization``) headers: which is meant is
    anyone's guess (a proxy in front may check the other one), so neither is taken. Before,
    the first one decided: the same headers in another order were let through."""
    pytest.importorskip("prometheus_client")
    fake, api = layercode
    app = guarded_app(api)
    cases = [
        ([("x-api-key", "good"), ("x-api-key", "bad")], 401),
        ([("x-api-key", "bad"), ("x-api-key", "good")], 401),
        ([("x-api-key", "good"), ("x-api-key", "good")], 401),
        ([("authorization", "Bearer good"), ("authorization", "Bearer bad")], 401),
        ([("authorization", "Bearer good"), ("authorization", "Basic eA==")], 401),
        # the key checked is sent once: the other header may be repeated
        ([("x-api-key", "good"), ("authorization", "Bearer a"), ("authorization", "b")], 200),
        ([("x-api-key", ""), ("authorization", "Bearer good")], 200),
    ]
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        for headers, expected in cases:
            authorize = client.post("/api/authorize", json={"agent_id": "a"}, headers=headers)
            metrics = client.get("/metrics", headers=headers)
            assert (authorize.status_code, metrics.status_code) == (expected, expected), headers
    assert len(fake.requests) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/api/authorize", "/api/agent"])
@pytest.mark.parametrize(
    "declared",
    ["\u00b2".encode("latin-1"), b"\xb9", b"9" * 5000, b"x", b"-1"],
    ids=["superscript-2", "superscript-1", "5000-digits", "x", "-1"],
)
async def test_a_content_length_that_is_no_number_is_a_400_on_both_routes(
    path: str, declared: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that passes the header on as it came (an in-process ASGI client, a lax
    server: uvicorn and hypercorn refuse it themselves). ``str.isdigit`` takes '²' (a
    latin-1 byte) and 5000 digits, which ``int()`` refuses: the authorize route answered
    500 and logged a traceback. Both routes now answer the webhook's 400, closing."""
    stub = ASGIStub(b'{"agent_id": "a"}', path=path, headers=[(b"content-length", declared)])
    stub.scope["state"] = {}  # as a server that ran the app's lifespan passes it
    with caplog.at_level(logging.INFO):
        await stub.run(create_app(settings(layercode_api_url="http://127.0.0.1:9/v1")))
    assert stub.status == 400, stub.body
    assert stub.body == b'{"error":"invalid content-length header"}'
    assert stub.headers["connection"] == "close"
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("chunks", "sender", "expected"),
    [
        ([b'{"agent_id": "ag_1"}'], "", 200),
        ([b'{"agent_id": "ag_2"}'], "", 401),
        ([b'{"agent_id": "ag_1", "pad": "', b"x" * 70_000, b'"}'], "", 413),
        ([b'{"agent_id": '], "stalls", 408),
        ([b'{"agent_id": '], "leaves", 400),
        ([b'{"agent_id": "ag_1"'], "", 400),
        ([b'["ag_1"]'], "", 400),
    ],
    ids=["its-agent", "another-agent", "too-large", "too-slow", "caller-left", "no-json", "list"],
)
async def test_a_guard_may_read_the_body_bounded_as_the_route(
    layercode: tuple[FakeLayercode, str],
    chunks: list[bytes],
    sender: str,
    expected: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A guard that checks the ``agent_id`` asked for (``await request.json()``). Before, the
    route then waited for a body already read: every caller the guard let in got 408 after
    the body timeout; and the guard read the body with neither the route's 64 KiB bound nor
    its timeout (a slow sender held the request for as long as it liked). A caller that
    leaves mid-body is answered as the route answers it (for middleware outside), not with a
    traceback of the guard's ``ClientDisconnect``; a body that is no JSON object, which the
    guard fails to read, gets the route's 400, not a 500 and a traceback."""
    fake, api = layercode

    async def guard(request: Any) -> bool:
        return bool((await request.json()).get("agent_id") == "ag_1")

    app = create_app(settings(layercode_api_url=api, body_timeout=0.5), authorize_guard=guard)
    stub = ASGIStub(
        chunks=chunks,
        path="/api/authorize",
        stall_mid_body=sender == "stalls",
        leave_mid_body=sender == "leaves",
    )
    stub.scope["state"] = {}
    await stub.run(app)
    assert stub.status == expected, stub.body
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    if expected == 400 and not sender:
        assert stub.body == b'{"error":"body must be a JSON object with agent_id"}'
    if expected == 200:
        assert fake.requests[0][2] == chunks[0]  # relayed exactly as sent
    else:
        assert not fake.requests


#: An integer beyond Python's int/str conversion limit (4300 digits): valid JSON all the same.
HUGE_INT = b"9" * 5000


@pytest.mark.parametrize("number", [HUGE_INT, b"-" + HUGE_INT, b"1e400"])
def test_a_body_with_a_number_python_cannot_read_goes_upstream_as_sent(
    layercode: tuple[FakeLayercode, str], number: bytes
) -> None:
    """Before: 400 "body must be a JSON object with agent_id" for a JSON object with an
    ``agent_id`` whose metadata held an integer of over 4300 digits or a number beyond a
    float's range (RFC 8259 allows both): only ``agent_id`` is read, the body is relayed."""
    fake, api = layercode
    body = b'{"agent_id":"a","metadata":{"n":' + number + b',"list":[' + number + b"]}}"
    with serve(create_app(settings(layercode_api_url=api))) as url:
        r = httpx.post(url + "/api/authorize", content=body, timeout=20)
    assert (r.status_code, r.json()) == (200, fake.answer)
    assert [sent for _, _, sent in fake.requests] == [body]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"agent_id":' + HUGE_INT + b"}", "agent_id is required (a non-empty string)"),
        (b'{"agent_id":"a","n":' + HUGE_INT + b",}", "body must be a JSON object with agent_id"),
        (b"[" + HUGE_INT + b"]", "body must be a JSON object with agent_id"),
    ],
)
def test_a_huge_integer_where_it_does_not_belong_is_a_400(
    layercode: tuple[FakeLayercode, str], body: bytes, error: str
) -> None:
    fake, api = layercode
    with serve(create_app(settings(layercode_api_url=api))) as url:
        r = httpx.post(url + "/api/authorize", content=body, timeout=20)
    assert (r.status_code, r.json()) == (400, {"error": error})
    assert not fake.requests


def test_a_guard_reading_a_huge_integer_gets_the_route_400(
    layercode: tuple[FakeLayercode, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette's ``request.json()`` (``json.loads``) refuses an integer of over 4300
    digits: the guard fails on the body, which is the route's 400, not a 500."""
    fake, api = layercode

    async def guard(request: Any) -> bool:
        return bool((await request.json()).get("agent_id") == "a")

    body = b'{"agent_id":"a","n":' + HUGE_INT + b"}"
    app = create_app(settings(layercode_api_url=api), authorize_guard=guard)
    with serve(app) as url:
        r = httpx.post(url + "/api/authorize", content=body, timeout=20)
    assert r.status_code == 400 and not fake.requests
    assert not [record for record in caplog.records if record.exc_info]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, (502, "LayerCode API sent an invalid response")),
        (400, (400, "LayerCode API refused the request (400)")),
        (429, (429, "LayerCode API refused the request (429)")),
        (503, (502, "LayerCode API error (503)")),
    ],
)
def test_an_answer_with_a_huge_integer_is_not_relayed_and_the_log_says_why(
    layercode: tuple[FakeLayercode, str],
    caplog: pytest.LogCaptureFixture,
    status: int,
    expected: tuple[int, str],
) -> None:
    """An answer whose JSON Python cannot read (an integer of over 4300 digits) cannot be
    relayed as read: a success is a 502 whose log line gave a wrong reason before ("no
    client_session_key", though it had one); a refusal's message is not relayed."""
    fake, api = layercode
    fake.status = status
    fake.answer = b'{"client_session_key":"csk","error":"no","n":' + HUGE_INT + b"}"
    with (
        caplog.at_level(logging.INFO, logger="layercode_asgi"),
        serve(create_app(settings(layercode_api_url=api))) as url,
    ):
        r = httpx.post(url + "/api/authorize", json={"agent_id": "a"}, timeout=20)
    assert (r.status_code, r.json()) == (expected[0], {"error": expected[1]})
    assert not [record for record in caplog.records if record.exc_info]
    if status == 200:
        logged = [record.getMessage() for record in caplog.records]
        why = "LayerCode authorize answer refused: not JSON it can read: Integer value out of"
        assert [line for line in logged if line.startswith(why)], logged
