"""How the test kit and ``simulate`` reach a backend: :func:`check_url`, :func:`new_client`
(follows no redirect, notes each one) and :class:`BoundedApp` for an app run in-process.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.lowlevel
import httpx

from .errors import from_environment, held_in_host
from .redaction import escape_terminal, mask_url


class ReplyTooLarge(Exception):
    """Raised inside an in-process app when its reply passes the client's byte limit."""


def check_url(name: str, url: str) -> None:
    """Raise ValueError naming ``name`` unless ``url`` is an http(s) URL httpx can send to."""
    try:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port  # host: IDNA-decoded, may raise IDNAError
    except (httpx.InvalidURL, TypeError, ValueError) as exc:  # IDNAError is a ValueError
        reason = escape_terminal(str(exc))
        authority = str(url).partition("//")[2].partition("/")[0]
        if "[" in authority and "]" not in authority:  # httpx: "Invalid port: ':1'"
            reason = "its IPv6 address has no closing ']'"
        raise ValueError(f"{name} is not a valid URL: {reason}") from None
    if parsed.scheme not in ("http", "https") or not host:
        shown = escape_terminal(repr(mask_url(url)))
        raise ValueError(f"{name} must be an http(s) URL, got {shown}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{name} has port {port}, expected 1 to 65535")
    if (held := held_in_host(host)) is not None:
        raise ValueError(f"{name} is not a valid URL: its host holds {held!r}, which no host can")


def new_client(transport: httpx.AsyncBaseTransport | None, timeout: float) -> httpx.AsyncClient:
    """The kit's httpx client: follows no redirect, notes each one (:func:`note_redirect`);
    a ConfigurationError in an environment httpx cannot make it from."""
    return from_environment(
        lambda: httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            event_hooks={"response": [note_redirect]},
        ),
        "to send the events",
    )


#: The request extension :func:`note_redirect` leaves a redirect's status and Location in.
_REDIRECT: Final = "layercode_asgi.redirect"


async def note_redirect(response: httpx.Response) -> None:
    """A response hook: notes a redirect on its request. httpx parses ``Location`` even when
    not following it, and may raise on it: noted, that is reported as an ``http-error``."""
    if response.is_redirect:
        noted = (response.status_code, response.headers["location"])
        response.request.extensions[_REDIRECT] = noted


def noted_redirect(request: httpx.Request | None) -> tuple[int, str] | None:
    """The status and ``Location`` :func:`note_redirect` noted on ``request``, else None."""
    return None if request is None else request.extensions.get(_REDIRECT)


async def open_reply(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``client.send(request, stream=True)``; a noted redirect is forgotten once the reply is
    there (a later failure, reading its body, is not its ``Location``'s)."""
    request.stream = _Body(request.content)
    reply = await client.send(request, stream=True)
    request.extensions.pop(_REDIRECT, None)
    return reply


class _Body(httpx.AsyncByteStream):
    """A request body in one chunk, by no async generator: trio warns (ResourceWarning) of
    each one finalized unfinished, as httpx's is when the body is refused mid-way."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.chunks: list[bytes] = []

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.chunks = [self.body]
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop()


@asynccontextmanager
async def drained(reply: httpx.Response) -> AsyncIterator[AsyncIterator[bytes]]:
    """``reply.aiter_raw()``; on exit ``reply`` is closed and the iterator drained (which
    ends httpx's async generators under it at once)."""
    chunks = reply.aiter_raw()
    try:
        yield chunks
    finally:
        await reply.aclose()
        with suppress(Exception):  # StopAsyncIteration, or the error of a closed stream
            for _ in range(65_536):  # at most one per byte httpcore read (64 KiB a read)
                await anext(chunks)


async def speaks_tls(url: httpx.URL, seconds: float) -> bool:
    """Whether the server of the ``http://`` ``url`` completes a TLS handshake (certificate
    unchecked) within ``seconds``: a hint that the URL wants ``https://``."""
    if url.scheme != "http" or seconds <= 0:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with anyio.move_on_after(seconds):
        try:
            stream = await anyio.connect_tcp(url.host, url.port or 80, ssl_context=context)
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            return False
        with suppress(OSError, anyio.BrokenResourceError):  # its close_notify, unanswered
            await stream.aclose()
        return True
    return False


# -- an app run in-process ------------------------------------------------------------------------


@dataclass
class _Noted:
    """What :class:`BoundedApp` notes (httpx runs the app in the client's task and context)."""

    raised: list[BaseException] = field(default_factory=list)  #: what the app raised itself
    started: list[int] = field(default_factory=list)  #: the status it started its reply with


_NOTED: ContextVar[_Noted | None] = ContextVar("layercode_in_process", default=None)


@contextmanager
def noting_app_errors() -> Iterator[list[int]]:
    """Within it, :class:`BoundedApp` notes what its app raises and (in the list it gives)
    the status it started its reply with."""
    token = _NOTED.set(noted := _Noted())
    try:
        yield noted.started
    finally:
        _NOTED.reset(token)


def raised_by_app(exc: BaseException) -> bool:
    """Whether an in-process app raised ``exc`` itself (no transport failure: no violation)."""
    noted = _NOTED.get()
    return noted is not None and any(exc is raised for raised in noted.raised)


def _misuse(what: str) -> RuntimeError:
    return RuntimeError(f"the ASGI app sent {what}")


class _StoppedReading(OSError):
    """Raised by ``send`` past ``max_bytes``: ASGI's error of a send to a closed client."""


class BoundedApp:
    """Wraps an in-process app for ``httpx.ASGITransport`` (which buffers a whole reply).

    Past ``max_bytes`` each ``send`` raises an ``OSError``, as a server's once the client
    left, and the transport then gets :class:`ReplyTooLarge`. Each ``send`` is a
    cancellation point (the timeout stops an app that streams forever) and refuses a
    message that breaks ASGI with a RuntimeError. A reply left unfinished is ended as a
    server would (a 500, or the body's end). What the app raises is noted, and goes on."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sent = 0
        started = finished = too_large = False

        async def bounded_send(message: Any) -> None:
            nonlocal sent, started, finished, too_large
            await anyio.lowlevel.checkpoint()
            if too_large:
                raise _StoppedReading("the test client stopped reading (max_bytes)")
            if not isinstance(message, dict):
                raise _misuse(f"a message that is not a dict: {message!r:.80}")
            kind = message.get("type")
            if kind == "http.response.start":
                if started:
                    raise _misuse("http.response.start after the response started")
                status, headers = message.get("status"), message.get("headers", [])
                if type(status) is not int:
                    raise _misuse(f"a status that is not an integer: {status!r}")
                if not 100 <= status <= 999:
                    raise _misuse(f"a status outside 100-999: {status}")
                try:  # (name, value) pairs of bytes (or str, which httpx takes too)
                    pairs = [(name, value) for name, value in headers]
                    valid = all(isinstance(x, bytes | str) for pair in pairs for x in pair)
                except (TypeError, ValueError):
                    valid = False
                if not valid:
                    raise _misuse(f"headers that are not (name, value) pairs: {headers!r:.80}")
                message = {**message, "headers": pairs}  # read once, even from a generator
                started = True
                if (noted := _NOTED.get()) is not None:
                    noted.started.append(status)
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if not started:
                    raise _misuse("http.response.body before http.response.start")
                if finished:
                    raise _misuse("http.response.body after the response ended")
                if not isinstance(body, bytes | bytearray | memoryview):
                    raise _misuse(f"a body that is not bytes: {body!r:.80}")
                sent += len(body)
                if sent > self.max_bytes:  # the client leaves: to the app, as over HTTP
                    too_large = True
                    raise _StoppedReading("the test client stopped reading (max_bytes)")
                finished = not message.get("more_body", False)
            else:
                raise _misuse(
                    f"a message of type {kind!r:.80}, not http.response.start or http.response.body"
                )
            await send(message)

        try:
            with suppress(_StoppedReading):  # an app may let the send's OSError out
                await self.app(scope, receive, bounded_send)
        except Exception as exc:
            if (noted := _NOTED.get()) is not None:
                noted.raised.append(exc)
            raise
        if too_large:
            raise ReplyTooLarge(f"reply longer than {self.max_bytes} bytes")
        if scope.get("type") != "http" or finished:
            return
        if not started:
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
        body = b"" if started else b"the ASGI app returned without starting a response"
        await send({"type": "http.response.body", "body": body})
