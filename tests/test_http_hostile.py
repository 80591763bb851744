"""Hostile HTTP against the real servers: what a webhook sender can get wrong on the wire.

Every test runs ``create_app`` (or the webhook alone) under a real uvicorn and hypercorn on
127.0.0.1 and talks to it over a raw socket, so nothing client-side rewrites the request.
"""

from __future__ import annotations

import gzip
import logging
import socket
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi import LayercodeWebhook, Settings, TurnEvent, create_app, sign

from .agents_for_tests import scripted_agent
from .asgi_stub import ASGIStub
from .conftest import SECRET, event_body, serve, serve_hypercorn

SERVERS: dict[str, Callable[[Any], AbstractContextManager[str]]] = {
    "uvicorn": serve,
    "hypercorn": serve_hypercorn,
}


def exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a fresh connection; read one answer with a Content-Length body
    (bounded in size and time). Returns its status, headers (lower-case names) and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        for _ in range(1000):
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:])
                }
                if len(body) >= int(headers.get("content-length", "-1")) >= 0:
                    return int(lines[0].split()[1]), headers, body
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    raise AssertionError(f"no complete answer: {received!r}")


def signed_post(body: bytes, *headers: str, path: str = "/api/agent") -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "host: test",
        f"content-length: {len(body)}",
        f"layercode-signature: {sign(body, SECRET)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def settings() -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)


@pytest.fixture(params=["create_app", "webhook"])
def app(request: pytest.FixtureRequest) -> Any:
    if request.param == "create_app":
        return create_app(settings(), scripted_agent)
    return LayercodeWebhook(scripted_agent)  # served alone: no signature check


@pytest.fixture(params=sorted(SERVERS))
def url(request: pytest.FixtureRequest, app: Any) -> Iterator[str]:
    with SERVERS[request.param](app) as base:
        yield base


# -- Content-Encoding ----------------------------------------------------------------------------

DATA = event_body("data")
COMPRESSED = "the request body is compressed (Content-Encoding): send it uncompressed"


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("br", lambda body: b"\x8b\x02\x80" + body + b"\x03"),
        ("GZIP, identity", gzip.compress),
    ],
)
def test_a_compressed_webhook_body_is_refused_by_name(
    url: str, coding: str, compress: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # Correctly signed (over the compressed bytes, as they travel): the body itself is
    # what cannot be read. The answer says so, not "JSON is malformed"; so does the log.
    caplog.set_level(logging.INFO, logger="layercode_asgi.webhook")
    status, headers, body = exchange(
        url, signed_post(compress(DATA), f"content-encoding: {coding}")
    )
    assert status == 415, body
    assert headers["content-type"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    assert msgspec.json.decode(body) == {"error": COMPRESSED}
    refused = [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.webhook"]
    assert f"rejected compressed webhook (Content-Encoding: {coding}): 415" in refused


@pytest.mark.anyio
async def test_the_log_of_a_compressed_webhook_escapes_its_encoding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="layercode_asgi.webhook")
    stub = ASGIStub(gzip.compress(DATA), headers=[(b"content-encoding", b"gz\x1b[31mip\n")])
    await stub.run(LayercodeWebhook(scripted_agent))
    assert stub.status == 415
    refused = [r.getMessage() for r in caplog.records if r.name == "layercode_asgi.webhook"]
    assert "rejected compressed webhook (Content-Encoding: gz\\u001b[31mip\\n): 415" in refused


@pytest.mark.parametrize("coding", ["identity", "", " Identity "])
def test_an_identity_content_encoding_is_read_as_it_is(url: str, coding: str) -> None:
    status, _, body = exchange(url, signed_post(DATA, f"content-encoding: {coding}"))
    assert (status, msgspec.json.decode(body)) == (200, {"status": "ok"})


def test_a_malformed_uncompressed_body_is_still_a_400(url: str) -> None:
    status, _, body = exchange(url, signed_post(b'{"type": "data"', "content-encoding: identity"))
    assert status == 400, body
    assert msgspec.json.decode(body)["path"] == "$"


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_compressed_authorize_body_is_refused_by_name(server: str) -> None:
    app = create_app(
        Settings(
            env_file=None,
            environ={},
            layercode_webhook_secret=SECRET,
            layercode_api_key="lc_key",
            layercode_api_url="http://127.0.0.1:9",  # never called: the body is refused
        )
    )
    body = gzip.compress(b'{"agent_id": "agent-1"}')
    head = (
        "POST /api/authorize HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        f"content-encoding: gzip\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    with SERVERS[server](app) as base:
        status, headers, answer = exchange(base, head.encode() + body)
    assert status == 415, answer
    assert headers["accept-encoding"] == "identity"
    assert msgspec.json.decode(answer) == {"error": COMPRESSED}


# -- pipelining ----------------------------------------------------------------------------------


async def pausing_agent(event: TurnEvent) -> AsyncIterator[str]:
    yield "first"
    await anyio.sleep(0.3)  # the next request is on the wire while this stream is open
    yield "second"


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_request_pipelined_behind_an_open_stream_is_answered_after_it(server: str) -> None:
    turn, data = event_body("message"), event_body("data")
    with SERVERS[server](create_app(settings(), pausing_agent)) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(signed_post(turn) + signed_post(data))
            received = b""
            for _ in range(1000):
                if received.endswith(b'{"status":"ok"}'):
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    stream, _, second_body = received.rpartition(b"HTTP/1.1 200")
    assert b"text/event-stream" in stream, received
    events = [line for line in stream.split(b"\n") if line.startswith(b"data: ")]
    assert [msgspec.json.decode(line[6:])["type"] for line in events] == [
        "response.tts",
        "response.tts",
        "response.end",
    ], received
    assert second_body.endswith(b'{"status":"ok"}'), received
