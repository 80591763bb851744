"""``simulate`` and the test kit against backends no real server would be: bare sockets that
answer HTML 500s, the wrong content type, broken or endless streams, bad redirects, resets,
terminal escapes, a drip of bytes; and a terminal that cannot show what the backend says.
Every one must end in a specific verdict and the documented exit code, within the timeout,
without a traceback, a raw control character or the secret in the output."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi.testing import LayercodeTestClient, ProtocolViolation

from .conftest import SECRET, raw_http_server

TURNS = ("session.start", "message")


def _forbidden(text: str) -> list[str]:
    """Characters a terminal may act on (what simulate must escape)."""
    return [
        c
        for c in text
        if (ord(c) < 32 and c != "\n")
        or 0x7F <= ord(c) <= 0x9F
        or c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    ]


def reply(status: int, content_type: str, body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 %d X\r\ncontent-type: %s\r\n" % (status, content_type.encode())
    head += b"".join(line + b"\r\n" for line in extra)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(event) + b"\n\n" for event in events)


def conforming(event: dict[str, Any], said: str = "hi") -> bytes:
    """What a backend that follows the protocol answers to ``event``."""
    if event.get("type") not in TURNS:
        return reply(200, "application/json", b'{"status":"ok"}')
    tid = event["turn_id"]
    stream = sse(
        {"type": "response.tts", "content": said, "turn_id": tid},
        {"type": "response.end", "turn_id": tid},
    )
    return reply(200, "text/event-stream", stream)


def simulate(url: str, *extra: str, encoding: str = "utf-8") -> tuple[int, str, str]:
    """``layercode-asgi simulate`` in a subprocess, as users run it, its standard streams in
    ``encoding``: exit code, stdout, stderr."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LAYERCODE_")}
    environ.update(LAYERCODE_WEBHOOK_SECRET=SECRET, PYTHONIOENCODING=encoding)
    argv = [sys.executable, "-m", "layercode_asgi", "simulate", "--url", url, *extra, "hello"]
    done = subprocess.run(argv, env=environ, capture_output=True, timeout=60)
    out, err = done.stdout.decode(encoding), done.stderr.decode(encoding)
    assert "Traceback" not in err and SECRET not in out + err
    assert _forbidden(out) == [] and _forbidden(err) == [], (out, err)
    return done.returncode, out, err


def verdict(err: str) -> str:
    """The violation's name from simulate's 'PROTOCOL VIOLATION: <name>: …' line."""
    lines = [line for line in err.splitlines() if line.startswith("PROTOCOL VIOLATION: ")]
    assert len(lines) == 1, err
    return lines[0].split(": ")[1]


# -- a redirect whose Location httpx cannot read ---------------------------------------------------

#: Locations httpx parses even though the redirect is not followed, and fails on.
BAD_LOCATIONS = [b"javascript:alert(1)", b"http://xn--/", b"http://[::1", b"http://\x1b[2J/"]


def redirect_to(location: bytes) -> Any:
    return lambda event: (
        b"HTTP/1.1 302 Found\r\nlocation: %s\r\ncontent-length: 0\r\n\r\n" % (location)
    )


@pytest.mark.parametrize("location", BAD_LOCATIONS)
def test_simulate_a_redirect_to_an_unreadable_location_is_an_http_error(location: bytes) -> None:
    # Before: an httpx.InvalidURL or idna IDNAError traceback (httpx builds the redirect's
    # request even when it does not follow it), or a `connection-error` for a 3xx.
    with raw_http_server(redirect_to(location)) as base:
        code, _, err = simulate(f"{base}/api/agent", "--timeout", "5")
    assert code == 1 and verdict(err) == "http-error"
    assert "302" in err and "not followed" in err


@pytest.mark.anyio
@pytest.mark.parametrize("location", BAD_LOCATIONS)
async def test_the_test_kit_reports_a_redirect_to_an_unreadable_location(location: bytes) -> None:
    async def in_process(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"location", location)]
        await send({"type": "http.response.start", "status": 307, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    with raw_http_server(redirect_to(location)) as base:
        for client in (
            LayercodeTestClient(base_url=base, secret=SECRET, timeout=5),
            LayercodeTestClient(in_process, secret=SECRET, timeout=5),
        ):
            for send_one in (
                functools.partial(client.message, "x"),
                client.session_update,
                functools.partial(client.post, {"type": "message"}),
            ):
                with anyio.fail_after(10), pytest.raises(ProtocolViolation) as caught:
                    await send_one()
                assert caught.value.name == "http-error"
                assert caught.value.status_code in (302, 307)
                assert "not followed" in caught.value.detail


# -- a terminal that cannot show what the backend says ---------------------------------------------

SAID = "Grüße, こんにちは 😀"


@pytest.mark.parametrize("encoding", ["latin-1", "ascii", "cp1252"])
def test_simulate_escapes_what_stdout_cannot_encode(encoding: str) -> None:
    # Windows writes a redirected stdout in its ANSI code page; a latin-1 locale does too.
    # Before: a UnicodeEncodeError traceback as soon as the agent said a character outside it.
    with raw_http_server(lambda event: conforming(event, SAID)) as base:
        code, out, _ = simulate(f"{base}/api/agent", encoding=encoding)
        assert code == 0 and "OK: 2 turns" in out
        assert "\\u3053" in out and "\\U0001f600" in out  # shown escaped
        code, out, _ = simulate(f"{base}/api/agent", "--json", "-q", encoding=encoding)
        assert code == 0
        assert msgspec.json.decode(out)["turns"][1]["text"] == SAID  # still valid JSON
