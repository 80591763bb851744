"""``simulate`` and the test kit against backends no real server would be: bare sockets that
answer HTML 500s, the wrong content type, broken or endless streams, bad redirects, resets,
terminal escapes, a drip of bytes; and a terminal that cannot show what the backend says.
Every one must end in a specific verdict and the documented exit code, within the timeout,
without a traceback, a raw control character or the secret in the output."""

from __future__ import annotations

import functools
import gzip
import io
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi.cli import main, run_simulation
from layercode_asgi.errors import ConfigurationError
from layercode_asgi.reading import BodyDecoder
from layercode_asgi.testing import LayercodeTestClient, ProtocolViolation

from .conftest import SECRET, httpx_refuses, raw_http_server

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


def simulate(
    url: str, *extra: str, encoding: str = "utf-8", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``layercode-asgi simulate`` in a subprocess, as users run it, its standard streams in
    ``encoding``, ``env`` added to its environment: exit code, stdout, stderr."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LAYERCODE_")}
    environ.update(LAYERCODE_WEBHOOK_SECRET=SECRET, PYTHONIOENCODING=encoding, **(env or {}))
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
async def test_a_redirect_cut_short_is_a_connection_error_not_a_bad_location() -> None:
    def cut_short(event: dict[str, Any]) -> bytes:
        return b"HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 99\r\n\r\nabc"

    with raw_http_server(cut_short) as base:
        code, _, err = simulate(f"{base}/api/agent", "--timeout", "5")
        assert code == 1 and verdict(err) == "connection-error" and "valid URL" not in err
        client = LayercodeTestClient(base_url=base, secret=SECRET, timeout=5)
        with anyio.fail_after(10), pytest.raises(ProtocolViolation) as caught:
            await client.post({"type": "message"})
        assert caught.value.name == "connection-error"


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


# -- one specific verdict per kind of broken backend -----------------------------------------------


def _turns(stream: Any) -> Any:
    """A backend answering turns with ``stream(event)`` (raw bytes) and the rest correctly."""
    return lambda event: stream(event) if event.get("type") in TURNS else conforming(event)


def _drip(event: dict[str, Any]) -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
    for byte in sse({"type": "response.end", "turn_id": event["turn_id"]}):
        time.sleep(0.5)
        yield bytes([byte])


def _reset(event: dict[str, Any]) -> Iterator[bytes | None]:
    yield b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {"type":'
    yield None


def _http_1_0(event: dict[str, Any]) -> bytes:
    """A close-delimited HTTP/1.0 answer: no length, no chunks, the end of the body is the close."""
    return conforming(event).replace(b"HTTP/1.1", b"HTTP/1.0").split(b"content-length")[0] + (
        b"\r\n" + conforming(event).partition(b"\r\n\r\n")[2]
    )


def _gzip(event: dict[str, Any]) -> bytes:
    head, _, body = conforming(event).partition(b"\r\n\r\n")
    packed = gzip.compress(body)
    head = head.split(b"content-length")[0] + b"content-encoding: gzip\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(packed) + packed


def _gzip_members(event: dict[str, Any]) -> bytes:
    """The SSE stream gzipped as one member per event (RFC 1952: members follow each other;
    a server compressing each flush on its own sends that)."""
    head, _, body = conforming(event).partition(b"\r\n\r\n")
    packed = b"".join(gzip.compress(part + b"\n\n") for part in body.split(b"\n\n")[:-1])
    head = head.split(b"content-length")[0] + b"content-encoding: gzip\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(packed) + packed


ESCAPES = b"\x1b[2J\x1b]52;c;cGF5bG9hZA==\x07\x00\x9b\xff\xe2\x80\xae"
HEADER_ESCAPES = b"HTTP/1.1 200 \x1b[2J\r\ncontent-type: text/\x1b]0;x\x07\x9b\xff\r\nx-a: \x1b[31m\r\ncontent-length: 0\r\n\r\n"
HOSTILE = {
    "html-500": (lambda e: reply(500, "text/html", b"<html>" + ESCAPES + b"</html>"), "http-error"),
    "401": (lambda e: reply(401, "application/json", b'{"error":"bad signature"}'), "http-error"),
    "403": (lambda e: reply(403, "text/plain", b"forbidden " * 10_000), "http-error"),
    "json-for-a-turn": (_turns(lambda e: reply(200, "application/json", b"{}")), "wrong-content-type"),
    "escapes-in-headers": (_turns(lambda e: HEADER_ESCAPES), "wrong-content-type"),
    "nul-in-a-header": (_turns(lambda e: HEADER_ESCAPES.replace(b"x-a: ", b"x-a: \x00")), "connection-error"),
    "no-response-end": (
        _turns(lambda e: reply(200, "text/event-stream", sse({"type": "response.tts", "content": "hi", "turn_id": e["turn_id"]}))),
        "missing-end",
    ),
    "a-50-mb-line": (_turns(lambda e: reply(200, "text/event-stream", b"data: " + b"x" * 50_000_000 + b"\n\n")), "bad-json"),
    "not-json": (_turns(lambda e: reply(200, "text/event-stream", b"data: " + ESCAPES + b"\n\n")), "bad-json"),
    "an-array": (_turns(lambda e: reply(200, "text/event-stream", b"data: [1, 2]\n\n")), "bad-json"),
    "a-number": (_turns(lambda e: reply(200, "text/event-stream", b"data: 42\n\n")), "bad-json"),
    "nested-deep": (_turns(lambda e: reply(200, "text/event-stream", b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n")), "bad-json"),
    "no-type": (_turns(lambda e: reply(200, "text/event-stream", b'data: {"type": [1]}\n\n')), "missing-type"),
    "redirect-loop": (lambda e: b"HTTP/1.1 307 R\r\nlocation: /api/agent\r\ncontent-length: 0\r\n\r\n", "http-error"),
    "redirect-elsewhere": (lambda e: b"HTTP/1.1 302 R\r\nlocation: http://u:pw@elsewhere.example/?key=k\r\ncontent-length: 0\r\n\r\n", "http-error"),
    "redirect-to-file": (lambda e: b"HTTP/1.1 301 R\r\nlocation: file:///etc/passwd\r\ncontent-length: 0\r\n\r\n", "http-error"),
    "reset-midway": (_turns(_reset), "connection-error"),
    "not-http": (lambda e: ESCAPES + b"\r\n\r\n", "connection-error"),
    "a-drip": (_turns(_drip), "timeout"),
    "brotli": (_turns(lambda e: reply(200, "text/event-stream", b"xx", b"content-encoding: br")), "bad-encoding"),
    "not-gzip": (_turns(lambda e: reply(200, "text/event-stream", b"xx", b"content-encoding: gzip")), "bad-encoding"),
    "http-1.0": (_http_1_0, None),
    "gzip": (_gzip, None),
    "gzip-members": (_turns(_gzip_members), None),
}  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_broken_backend_gets_one_specific_verdict(kind: str) -> None:
    answer, name = HOSTILE[kind]
    # 1 s only where the verdict is the timeout: the others (a 50 MB line...) are not paced
    # by it, and must not turn into a timeout on a busy machine.
    timeout = "1" if name == "timeout" else "15"
    with raw_http_server(answer) as base:
        code, out, err = simulate(f"{base}/api/agent", "--timeout", timeout)
    if name is None:  # nothing wrong: exit 0
        assert code == 0 and "OK: 2 turns and 2 other events" in out, (out, err)
    else:
        assert code == 1 and verdict(err) == name, (out, err)
    assert "ESC" not in err and "pw@" not in err and "key=k" not in err


def test_a_backend_that_never_accepts_is_a_timeout_saying_so() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:  # never accept()ed
        code, _, err = simulate(
            f"http://127.0.0.1:{listener.getsockname()[1]}/api/agent", "--timeout", "1"
        )
    assert code == 1 and verdict(err) == "timeout"
    assert "not answered within 1 s" in err  # before: "(no response.end)", as if it had


def test_https_to_a_plain_http_port_is_a_connection_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def plain_http() -> None:  # answers whatever it reads (a TLS hello) with a 400
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

        thread = threading.Thread(target=plain_http, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        code, _, err = simulate(f"https://127.0.0.1:{port}/api/agent", "--timeout", "5")
        thread.join(10)
    assert code == 1 and verdict(err) == "connection-error" and "SSL" in err


def _tls_context(directory: Any) -> ssl.SSLContext:
    """A server's TLS context with a self-signed certificate made in ``directory``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder(subject_name=name, issuer_name=name, public_key=key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


@contextmanager
def tls_server(context: ssl.SSLContext) -> Iterator[int]:
    """A TLS port on 127.0.0.1 (a thread): each connection gets a handshake, then is closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass  # a plain-HTTP request fails its handshake: closed without a reply
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        listener.close()


@pytest.mark.anyio
async def test_http_to_a_tls_port_is_a_connection_error_that_says_https(tmp_path: Any) -> None:
    # Before: "RemoteProtocolError: Server disconnected without sending a response." (or a
    # ReadError with no detail): nothing said the port speaks TLS.
    with tls_server(_tls_context(tmp_path)) as port:
        url = f"http://127.0.0.1:{port}/api/agent"
        with anyio.fail_after(20):
            report = await run_simulation(url, SECRET, ["hi"], timeout=5, quiet=True)
            client = LayercodeTestClient(base_url=f"http://127.0.0.1:{port}", secret=SECRET)
            with pytest.raises(ProtocolViolation) as caught:
                await client.message("hi")
            # Before: post() alone said "connection-error: ReadError: the connection broke".
            with pytest.raises(ProtocolViolation) as posted:
                await client.post(b"{}")
    assert report.violation is not None and report.violation["name"] == "connection-error"
    assert "(the server speaks TLS: use https:// in the URL)" in report.violation["detail"]
    for violation in (caught.value, posted.value):
        assert violation.name == "connection-error" and "use https://" in violation.detail


# -- an environment httpx cannot make a client from ------------------------------------------------


@pytest.mark.parametrize(
    "variable",
    [
        "ALL_PROXY=socks5://127.0.0.1:1",  # httpx[socks] is not installed
        "HTTP_PROXY=ftp://user:s3cret@127.0.0.1",
        "ALL_PROXY=http://user:s3cret@[::1",
        "SSL_CERT_FILE=/nonexistent/ca.pem",
    ],
)
def test_an_environment_httpx_cannot_use_is_one_error_line(variable: str) -> None:
    # Before: an ImportError, ValueError, InvalidURL or FileNotFoundError traceback, exit 1.
    name, _, value = variable.partition("=")
    if not httpx_refuses(name, value):
        pytest.skip(f"this httpx makes a client with {variable}")
    with raw_http_server(conforming) as base:
        code, out, err = simulate(f"{base}/api/agent", env={name: value, "NO_PROXY": ""})
    assert code == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "s3cret" not in err


@pytest.mark.anyio
async def test_the_test_kit_names_an_environment_httpx_cannot_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")  # httpx[socks] is not installed
    monkeypatch.setenv("NO_PROXY", "")
    client = LayercodeTestClient(base_url="http://127.0.0.1:9", secret=SECRET)
    # Before: httpx's ImportError.
    with pytest.raises(ConfigurationError, match=r"ALL_PROXY.*socksio"):
        await client.message("x")


@pytest.mark.parametrize(
    "proxy",
    [
        "ALL_PROXY=socks5://127.0.0.1:1",  # httpx[socks] is not installed
        "HTTP_PROXY=http://127.0.0.1:1",  # nothing listens there
        "ALL_PROXY=http://user:s3cret@[::1",
    ],
)
def test_demo_talks_to_its_own_server_whatever_proxy_the_environment_names(
    proxy: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name, _, value = proxy.partition("=")
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_PROXY", "")
    # Before: the demo's requests to its own server on 127.0.0.1 went to the proxy: exit 1
    # (connection-error), or exit 2 for a proxy httpx cannot use (and, before that, an
    # ExceptionGroup traceback logged by uvicorn).
    assert main(["demo"], environ={}) == 0
    captured = capsys.readouterr()
    assert "OK: 4 turns and 3 other events" in captured.out and captured.err == ""


# -- arguments that are not UTF-8 ------------------------------------------------------------------

#: Command-line bytes a UTF-8 (or C) locale decodes to a lone surrogate, as Python does.
NOT_UTF8 = {
    "a-message": ([b"\xff"], {}, None),
    "conversation-id": ([b"--conversation-id", b"c\xff"], {}, None),
    "session-id": ([b"--session-id", b"\xed\xa0\x80"], {}, None),
    "data": ([b"--data", b'{"a": "\xff"}'], {}, None),
    # stdin as Python reads it in the C locale (in a UTF-8 one, it refuses the bytes itself)
    "piped-stdin": ([], {b"PYTHONIOENCODING": b"utf-8:surrogateescape"}, b"hello\n\xfe\xff\n"),
    "secret-option": ([b"--secret", b"whsec_\xff"], {}, None),
    "secret-environment": ([], {b"LAYERCODE_WEBHOOK_SECRET": b"whsec_\xff"}, None),
}


@pytest.mark.parametrize("kind", NOT_UTF8)
def test_simulate_refuses_arguments_that_are_not_utf8_in_one_line(kind: str) -> None:
    # Before: a UnicodeEncodeError traceback and exit 1 (a protocol violation's code) when the
    # event was sent; a secret that is not UTF-8 signed bytes no server verifies (serve refuses
    # such a secret), exit 0.
    argv, env, stdin = NOT_UTF8[kind]
    environ = {k.encode(): v.encode() for k, v in os.environ.items() if not k.startswith("LAYER")}
    environ.update({b"LAYERCODE_WEBHOOK_SECRET": SECRET.encode(), **env})
    with raw_http_server(conforming) as base:
        command = [sys.executable.encode(), b"-m", b"layercode_asgi", b"simulate"]
        command += [b"--url", f"{base}/api/agent".encode(), *argv]
        done = subprocess.run(command, env=environ, input=stdin, capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"", (done.returncode, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "not valid text" in err
    assert "whsec_" not in err


@pytest.mark.parametrize(
    ("message", "error"),
    [(os.fsdecode(b"\xff"), "is not valid text"), ("", "must not be empty"), (" ", "or blank")],
)
def test_demo_refuses_a_message_it_cannot_send_before_serving(
    capsys: pytest.CaptureFixture[str], message: str, error: str
) -> None:
    # Before: "cannot start: ExceptionGroup: unhandled errors in a TaskGroup", after uvicorn
    # logged the UnicodeEncodeError's traceback.
    assert main(["demo", "hi", message], environ={}) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: message 2 ") and error in err, err
    # Before: refused only once served ("demo: the echo agent is served on ..." on stdout).
    assert out == ""


def test_sign_refuses_a_secret_that_is_not_utf8(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: exit 0 and a signature of bytes no server verifies (serve refuses the secret).
    for environ, argv in [
        ({"LAYERCODE_WEBHOOK_SECRET": "whsec_\udcff"}, []),
        ({}, ["--secret", "whsec_\udcff"]),
    ]:
        assert main(["sign", "--body", "{}", *argv], environ=environ) == 2
        out, err = capsys.readouterr()
        assert (
            out == "" and err == "error: the webhook secret is not valid text (a lone surrogate)\n"
        )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"messages": ["hi", "\udcff"]}, "message 2 is not valid text"),
        ({"conversation_id": "\udcff"}, "conversation_id is not valid text"),
        ({"data": {"a": "\udcff"}}, "data cannot be sent as JSON"),
        ({"data": {"k": object()}}, "data cannot be sent as JSON"),
        # Before: sent changed (a set as an array, NaN as null), as if that were the data.
        ({"data": {"k": {1}}}, r"data cannot be sent as JSON: data\['k'\] is set"),
        ({"data": {"k": float("nan")}}, r"data cannot be sent as JSON: data\['k'\] is nan"),
        ({"data": object()}, "data must be a JSON object, got object"),
    ],
)
async def test_run_simulation_refuses_what_it_cannot_send_before_sending(
    arguments: dict[str, Any], named: str
) -> None:
    # Before: a UnicodeEncodeError or TypeError from the middle of the conversation.
    with pytest.raises(ConfigurationError, match=named):
        await run_simulation("http://127.0.0.1:9/api/agent", SECRET, out=io.StringIO(), **arguments)


# -- a standard stream closed at start (`>&-`, some supervisors) ------------------------------------

#: Runs ``python -m layercode_asgi ARGV`` with the descriptor ``sys.argv[1]`` closed.
CLOSING = (
    "import os, sys; os.close(int(sys.argv[1])); "
    "os.execv(sys.executable, [sys.executable, '-m', 'layercode_asgi', *sys.argv[2:]])"
)


def with_closed(fd: int, *argv: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LAYERCODE_")}
    environ["LAYERCODE_WEBHOOK_SECRET"] = SECRET
    command = [sys.executable, "-c", CLOSING, str(fd), *argv]
    kept = {"stdout": subprocess.PIPE} if fd == 2 else {"stderr": subprocess.PIPE}
    return subprocess.run(command, env=environ, timeout=60, **kept)  # type: ignore[call-overload,no-any-return]


@pytest.mark.parametrize(
    "argv",
    [["simulate", "hi"], ["simulate", "--json", "hi"], ["sign", "--body", "{}"], ["list-agents"]],
)
def test_a_closed_stdout_is_no_traceback(argv: list[str]) -> None:
    # Before: an AttributeError traceback ('NoneType' object has no attribute 'write'), exit 1.
    with raw_http_server(conforming) as base:
        done = with_closed(1, *argv, *(["--url", f"{base}/api/agent"] if "hi" in argv else []))
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert (b"OK: 2 turns" in done.stderr) is ("--json" in argv)  # the commentary's place


@pytest.mark.parametrize(
    ("answer", "code"), [(conforming, 0), (lambda e: reply(404, "text/html", b"x"), 1)]
)
def test_simulate_json_with_a_closed_stderr_prints_only_the_json(answer: Any, code: int) -> None:
    # Before: print(file=None) wrote the commentary meant for stderr to stdout, before the JSON.
    with raw_http_server(answer) as base:
        done = with_closed(2, "simulate", "--json", "--url", f"{base}/api/agent", "hi")
    assert done.returncode == code
    assert msgspec.json.decode(done.stdout)["ok"] is (code == 0)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("coding", "member", "text"),
    [
        # Before: decoding stopped after the first member, the rest of the body ignored (a
        # backend gzipping each flush on its own had "missing-end").
        ("gzip", 700, b"".join(b"data: %d\n\n" % n for n in range(300))),
        # Before: a member inflating to more than PIECE left what followed it both in the
        # decompressor's unused data and in its unconsumed tail: the next member came twice.
        ("gzip", 100_000, b"".join(b"data: %d\n\n" % n for n in range(30_000))),
        # Before: raw deflate (no zlib header) whose first piece was under 2 bytes was taken
        # for zlib-wrapped (no header error yet), then failed on the next piece.
        ("deflate", 0, b"".join(b"data: %d\n\n" % n for n in range(300))),
        ("deflate", -1, b"".join(b"data: %d\n\n" % n for n in range(300))),
    ],
)
def test_compressed_bodies_decode_whole_in_any_pieces(
    coding: str, member: int, text: bytes
) -> None:
    if member > 0:  # gzip members that follow each other
        body = b"".join(gzip.compress(text[n : n + member]) for n in range(0, len(text), member))
    else:  # deflate: zlib-wrapped (0) or raw (-1)
        body = zlib.compress(text) if member == 0 else _raw_deflate(text)
    for size in (1, 2, 7, 4096, len(body)):
        decoder = BodyDecoder(coding)
        pieces = [body[n : n + size] for n in range(0, len(body), size)]
        assert b"".join(b"".join(decoder.feed(piece)) for piece in pieces) == text, size
    decoder = BodyDecoder("gzip")  # what follows the last member and is none stays ignored
    assert b"".join(decoder.feed(gzip.compress(text) + b"\x1f\x8c trailing")) == text
