"""ASGI plumbing shared by the middleware, the webhook, the event stream and the server.

* :func:`read_body` (a whole body, with a size limit and a deadline); :class:`ReplayBody`
  (a ``receive`` handing on a body read already).
* :func:`route_path` (the path below ``root_path``); :func:`check_route`.
* :func:`json_error`: the one way an error is written, ``{"error": "..."}`` with its status,
  as two ASGI messages (:func:`send_json_error`) or a response (:func:`json_error_response`).
* :func:`must_propagate`: whether an exception from user code (an agent, a hook, a producer)
  goes on, or is answered as that code's failure.
"""

from __future__ import annotations

import asyncio
import math
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .errors import ConfigurationError, ResponseError, check_type, kind_of
from .redaction import escape_terminal

__all__ = [
    "CLIENT_LEFT",
    "HEADER_NAME",
    "MAX_ROUTE_LENGTH",
    "BodyAborted",
    "BodyTimeout",
    "BodyTooLarge",
    "JSONResponse",
    "ReplayBody",
    "answer_lifespan",
    "being_cancelled",
    "check_headers",
    "check_route",
    "compressed",
    "compressed_body_response",
    "declared_length",
    "error_response",
    "json_error",
    "json_error_response",
    "must_propagate",
    "not_allowed",
    "read_body",
    "route_path",
    "send_json_error",
]

_encode = msgspec.json.Encoder().encode

#: An HTTP header name (RFC 9110's token): ``HEADER_NAME.fullmatch(name)``.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A header value that goes out as it is: printable latin-1 (what a server writes) or ASCII
#: (what an HTTP client writes) and tabs: no CR, LF, NUL or other control character, which
#: would end the line or be refused.
_HEADER_VALUE = {
    False: re.compile(r"[\t\x20-\x7e\xa0-\xff]*").fullmatch,
    True: re.compile(r"[\t\x20-\x7e]*").fullmatch,
}
#: The body's framing, which the server (or the HTTP client) writes, never the caller.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_FRAMER = {
    False: "the server frames a streamed body, not the app",
    True: "the client sets it (the body's framing)",
}


def check_headers(
    name: str, headers: Mapping[str, str], *, client: bool
) -> list[tuple[bytes, bytes]]:
    """``headers`` (the argument ``name``) as raw headers with lower-case names, for a response
    or, with ``client``, for a request. ``ValueError`` naming the header (its value, maybe a
    credential, is not quoted) for a name that is no HTTP token or frames the body
    (``Content-Length``, ``Transfer-Encoding``), or a value that would not stay one line (CR,
    LF, NUL; beyond latin-1, or ASCII for a client); ``TypeError`` for non-``str`` items."""
    check_type(name, headers, Mapping, "a mapping of header names to values")
    value_ok = _HEADER_VALUE[client]
    raw = []
    for header, value in headers.items():
        if not isinstance(header, str) or not isinstance(value, str):
            kinds = f"{kind_of(header)}: {kind_of(value)}"
            raise TypeError(f"{name} must map str names to str values, got {kinds}")
        if not HEADER_NAME.fullmatch(header):
            raise ValueError(f"{name} {escape_terminal(repr(header))}: not a valid header name")
        if header.lower() in _FRAMING:
            raise ValueError(f"{name} {header}: " + _FRAMER[client])
        if not value_ok(value):
            raise ValueError(
                f"{name} {header}: the value may hold only printable "
                f"{'ASCII' if client else 'latin-1'} characters (no CR, LF, NUL or other control)"
            )
        raw.append((header.lower().encode("latin-1"), value.encode("latin-1")))
    return raw


class BodyTooLarge(Exception):
    """The request body passed the limit; raised by :func:`read_body`."""


class BodyTimeout(Exception):
    """The request body did not all arrive in time; raised by :func:`read_body`."""


class BodyAborted(Exception):
    """The read's scope in ``reads`` was cancelled (a drain's end); raised by :func:`read_body`."""


async def read_body(
    receive: Receive,
    limit: int,
    within: float = math.inf,
    reads: set[anyio.CancelScope] | None = None,
) -> bytes | None:
    """Read a whole request body of at most ``limit`` bytes; ``None`` if the client left.

    Raises :class:`BodyTooLarge` as soon as the bytes read pass ``limit`` (the rest is not
    read), :class:`BodyTimeout` if it has not all arrived ``within`` seconds. With a
    deadline, the read's cancel scope is in ``reads`` while it lasts: cancelling it ends the
    read with :class:`BodyAborted`. A body in one message is returned without a copy.
    """
    # No deadline to keep: none given, or the body was read already (by the middleware).
    if within == math.inf or (isinstance(receive, ReplayBody) and receive._body is not None):
        return await _read_body(receive, limit)
    with anyio.move_on_after(within) as reading:
        if reads is None:
            return await _read_body(receive, limit)
        reads.add(reading)
        try:
            return await _read_body(receive, limit)
        finally:
            reads.discard(reading)
    if reading.deadline > anyio.current_time():  # cancelled before its deadline
        raise BodyAborted
    raise BodyTimeout


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    # One buffer, not a list: a body sent a byte a chunk (hypercorn passes each chunk on)
    # would cost a bytes object and a list slot, ~41 bytes, per byte.
    first = b""
    rest: bytearray | None = None
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            if not first:
                first = chunk
            elif rest is None:
                rest = bytearray(first)
                rest += chunk
            else:
                rest += chunk
        if not message.get("more_body", False):
            break
    return first if rest is None else bytes(rest)


class ReplayBody:
    """A ``receive`` that returns an already-read body once, then defers to the server's."""

    __slots__ = ("_body", "_receive")

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        body = self._body
        if body is None:  # later calls wait for http.disconnect, as without the body read
            return await self._receive()
        # A probe in a cancelled scope (Starlette's ``is_disconnected``) must not take the
        # body: it is cancelled here, as it would be on the server's ``receive``.
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._body = None
        return {"type": "http.request", "body": body, "more_body": False}


def compressed(scope: Scope) -> str | None:
    """The request's ``Content-Encoding`` (as sent, for the log) if it is not identity."""
    for name, value in scope["headers"]:
        if name == b"content-encoding" and value.strip(b" \t").lower() not in (b"", b"identity"):
            encoding: str = value.decode("latin-1")
            return encoding
    return None


def declared_length(value: bytes | str) -> int | None:
    """A ``Content-Length`` value as a number; ``None`` unless it is 1 to 18 ASCII digits
    (``str.isdigit`` alone takes a latin-1 '\u00b2', and thousands of digits)."""
    if len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol of an app with nothing to set up or close: each message
    answered ``<type>.complete``, until shutdown. (Returning at once instead stops
    Hypercorn's trio worker at start-up: it still sends ``lifespan.startup``.)"""
    while True:
        kind = (await receive())["type"]
        await send({"type": f"{kind}.complete"})
        if kind == "lifespan.shutdown":
            return


def route_path(scope: Scope) -> str:
    """The request path below the mount point (``root_path``), as Starlette's router sees it.

    ``root_path`` is removed only at a ``/`` boundary: below ``/ap``, ``/ap/agent`` gives
    ``/agent`` and ``/ap`` gives ``""``; ``/api/agent``, not below it, is returned whole (the
    same object), as is any path not starting with ``root_path``.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        below = path[len(root_path) :]
        if not below or below[0] == "/":
            return below
    return path


#: The longest route :func:`check_route` accepts (far below what servers read of a request).
MAX_ROUTE_LENGTH = 2048
# RFC 3986's ASCII path characters but '%' (requests are matched decoded) and '*' (no wildcard).
_ROUTE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "/-._~!$&'()+,;=:@")
_ROUTE_HINTS = {
    "{": "Starlette would read '{...}' as a parameter matching many paths",
    "%": "requests are matched decoded: write the character itself, not its %-escape",
    "?": "a query string is not part of the path",
    "*": "it is no wildcard (only a trailing '*' of LayercodeSignature paths makes a prefix)",
}


def check_route(name: str, path: str) -> None:
    """Refuse (:class:`~layercode_asgi.errors.ConfigurationError` naming ``name``) a route
    no request can match as written: a character that is not one of a URL path (control
    characters, spaces, ``?``, ``#``, ``%``, ``{``, ``*``; non-ASCII letters are fine), an
    empty, ``.`` or ``..`` segment (``//``, ``/./``: clients rewrite them), or a path
    longer than :data:`MAX_ROUTE_LENGTH`."""
    if len(path) > MAX_ROUTE_LENGTH:
        raise ConfigurationError(
            f"{name} is {len(path)} characters long, more than {MAX_ROUTE_LENGTH}"
        )
    for char in path:
        if char not in _ROUTE_CHARACTERS and (
            char.isascii() or char.isspace() or not char.isprintable()
        ):
            hint = _ROUTE_HINTS.get("{" if char == "}" else char, "not a URL path character")
            raise ConfigurationError(f"{name} {path!r} cannot contain {char!r}: {hint}")
    segments = path.split("/")[1:]
    if "" in segments[:-1] or "." in segments or ".." in segments:
        raise ConfigurationError(
            f"{name} {path!r} has an empty, '.' or '..' segment, which clients and proxies "
            "rewrite: write the path they would request"
        )


def json_error(
    status: int,
    message: str,
    *,
    close: bool = False,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> tuple[Message, Message]:
    """The two ASGI messages of ``{"error": message}`` with ``status``. ``close``: the rest
    of the request may still be on the wire, do not reuse the connection."""
    body = _encode({"error": message})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw.extend(headers)
    if close:
        raw.append((b"connection", b"close"))
    start: Message = {"type": "http.response.start", "status": status, "headers": raw}
    return start, {"type": "http.response.body", "body": body, "more_body": False}


def not_allowed(allow: str) -> tuple[str, str]:
    """The message and the sorted ``Allow`` header of a 405 whose ``Allow`` is ``allow``: the
    message names every method the header lists."""
    methods = sorted({method.strip() for method in allow.split(",")} - {""})
    message = f"method not allowed; use {' or '.join(methods)}" if methods else "method not allowed"
    return message, ", ".join(methods)


#: The answer to a client that left before sending its whole body. Nobody reads it (servers
#: drop it), but middleware outside may need one: Starlette's ``BaseHTTPMiddleware`` raises
#: ``RuntimeError: No response returned.`` without it.
CLIENT_LEFT = json_error(400, "client disconnected before sending the whole body", close=True)


async def send_json_error(send: Send, answer: tuple[Message, Message]) -> None:
    """Send a JSON error, the messages of :func:`json_error`."""
    start, body = answer
    # Outer middleware may edit the messages in place (CORS adds headers to the list):
    # hand out copies, never shared pre-rendered ones.
    await send({**start, "headers": list(start["headers"])})
    await send(dict(body))


class JSONResponse(Response):
    """A JSON response rendered with msgspec (compact)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encode(content)


def compressed_body_response() -> JSONResponse:
    """The 415 of a body unreadable because it was sent compressed (see :func:`compressed`)."""
    message = "the request body is compressed (Content-Encoding): send it uncompressed"
    return json_error_response(415, message, {"accept-encoding": "identity"})


def error_response(error: ResponseError) -> JSONResponse:
    """The JSON answer of a :class:`~layercode_asgi.errors.ResponseError` (its headers too)."""
    headers = {name.decode(): value.decode() for name, value in error.headers}
    return json_error_response(error.status_code, error.message, headers)


def json_error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """``{"error": message}`` with ``status``, as a Starlette response."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def being_cancelled() -> bool:
    """Whether this task is being cancelled (a cancel scope, or asyncio's ``task.cancel()``).

    False for a ``CancelledError`` that user code raised of its own on asyncio (it awaited
    a task or future that something else cancelled): that is the code failing, answered
    like any other exception (a turn's ``response.error`` and ``response.end``).
    """
    if anyio.current_effective_deadline() == -math.inf:
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio: its Cancelled only ever comes from a cancellation
        return True
    return task is None or task.cancelling() > 0


def must_propagate(exc: BaseException) -> bool:
    """Whether ``exc``, raised by user code (an agent, a hook, a producer), goes on rather
    than being answered as that code's failure: an interrupt, an exit, this task's own
    cancellation, or a group (a task group's) holding one of them. Any other exception,
    ``GeneratorExit``, a ``BaseException`` of the code's own or a group of those included,
    is the code failing."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(must_propagate(inner) for inner in exc.exceptions)
    return isinstance(exc, anyio.get_cancelled_exc_class()) and being_cancelled()
