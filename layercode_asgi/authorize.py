"""The authorize route of :func:`~layercode_asgi.server.create_app`: mints a browser session
key at LayerCode for a caller the guard lets through.

Limits toward LayerCode: ``timeout`` bounds the whole upstream call (connect, request and
every byte of the answer), an answer larger than :data:`AUTHORIZE_MAX_UPSTREAM_BODY` or
compressed (it asks for ``accept-encoding: identity``) is a 502, and of a 4xx answer only
LayerCode's ``error`` message is relayed (one printable line of at most
:data:`AUTHORIZE_MAX_ERROR_CHARS` characters), never its other fields or headers (but the
``Retry-After`` of a 429 or 503, in seconds). An answer that would show the caller our API
key (a proxy echoing our request) is not relayed.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive

from ._asgi import (
    CLIENT_LEFT,
    BodyTimeout,
    BodyTooLarge,
    JSONResponse,
    compressed,
    compressed_body_response,
    declared_length,
    json_error_response,
    must_propagate,
    read_body,
    send_json_error,
)
from .apikeys import api_key_allowed, encode_keys
from .config import Settings
from .errors import check_callable, from_environment
from .jsonwire import decode_json, without_lone_surrogates
from .logs import escape_log_value
from .loops import PerLoop

__all__ = [
    "AUTHORIZE_MAX_BODY",
    "AUTHORIZE_MAX_ERROR_CHARS",
    "AUTHORIZE_MAX_UPSTREAM_BODY",
    "AUTHORIZE_PATH",
    "AuthorizeGuard",
    "AuthorizeRoute",
]

logger = logging.getLogger("layercode_asgi.server")

#: A custom check for the authorize route: return True to let the request through.
AuthorizeGuard = Callable[[Request], bool | Awaitable[bool]]

#: LayerCode's endpoint, below ``settings.layercode_api_url``.
AUTHORIZE_PATH = "/agents/web/authorize_session"
#: Largest accepted authorize request body (it is a small JSON object).
AUTHORIZE_MAX_BODY = 64 * 1024
#: Largest accepted answer of LayerCode's authorize API (bigger: 502).
AUTHORIZE_MAX_UPSTREAM_BODY = 1024 * 1024
#: Longest upstream ``error`` message relayed to the caller, in characters.
AUTHORIZE_MAX_ERROR_CHARS = 200

_INVALID = "LayerCode API sent an invalid response"
# The answers refused unread (:class:`_Refused`): the caller's message, the log line.
_ENCODED = "LayerCode authorize answer refused: content-encoding %s (asked for identity)"
_TOO_LARGE = (
    f"LayerCode API response too large (over {AUTHORIZE_MAX_UPSTREAM_BODY} bytes)",
    "LayerCode authorize answer larger than %d bytes",
    AUTHORIZE_MAX_UPSTREAM_BODY,
)
_encode = msgspec.json.encode


class AuthorizeRoute:
    """The authorize route: guard, validate, relay to LayerCode, map every failure to JSON."""

    def __init__(self, settings: Settings, guard: AuthorizeGuard | None, timeout: float) -> None:
        self.url = settings.layercode_api_url + AUTHORIZE_PATH
        self.api_key = settings.layercode_api_key
        self.keys = encode_keys(settings.authorize_api_keys, "LAYERCODE_AUTHORIZE_API_KEYS")
        check_callable("authorize_guard", guard)
        self.guard = guard
        self.timeout = timeout
        self.body_timeout = settings.body_timeout
        # One client per event loop, the first made here (an environment httpx refuses fails at
        # start-up), not in the lifespan: a mounted sub-app gets none.
        self._clients: PerLoop[httpx.AsyncClient] | None = None
        if self.api_key:
            self._clients = PerLoop(self._new_client(), self._new_client)

    def _new_client(self) -> httpx.AsyncClient:
        make = functools.partial(httpx.AsyncClient, timeout=self.timeout)
        return from_environment(make, "for LayerCode's API")

    async def aclose(self) -> None:
        """Close this event loop's client (another loop's connections are its own)."""
        client = self._clients.take() if self._clients is not None else None
        if client is not None:
            await client.aclose()

    async def allowed(self, request: Request) -> bool:
        if self.guard is None:
            return api_key_allowed(request.headers, self.keys)
        try:
            verdict = self.guard(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            return bool(verdict)
        except BaseException as exc:  # its own kind too: Starlette's JSON 500, as any failure
            if isinstance(exc, Exception) or must_propagate(exc):
                raise
            raise RuntimeError(f"authorize_guard raised {type(exc).__name__}") from exc

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        reader = _BodyOnce(receive, self.body_timeout)
        response = await self.respond(Request(scope, reader), reader)
        if response is None:  # the caller left: answered for middleware outside
            await send_json_error(send, CLIENT_LEFT)
        else:
            await response(scope, receive, send)

    async def respond(self, request: Request, reader: _BodyOnce) -> Response | None:
        """The answer to ``request``; ``None`` if the caller left before sending its body."""
        try:
            return await self._respond(request, reader)
        except BodyTooLarge:  # a guard's read of the body, too
            return _too_large()
        except BodyTimeout:
            logger.warning("authorize body too slow (> %s s)", self.body_timeout)
            return json_error_response(
                408,
                f"request body not received within {self.body_timeout} s",
                {"connection": "close"},
            )
        except Exception:
            if reader.left:  # while a guard read the body (Starlette's ClientDisconnect)
                return None
            if reader.done and reader.failure is None and _object(reader.body) is None:
                return _not_an_object(request)  # the guard failed on it: the route's answer
            raise

    async def _respond(self, request: Request, reader: _BodyOnce) -> Response | None:
        if not await self.allowed(request):
            return json_error_response(
                401, "missing or invalid API key", {"www-authenticate": "Bearer"}
            )
        if not self.api_key:
            return json_error_response(
                503, "authorize route not configured: LAYERCODE_API_KEY is not set"
            )
        declared = request.headers.get("content-length")
        length = None if declared is None else declared_length(declared)
        if declared is not None and length is None:  # as the webhook route answers it
            return json_error_response(
                400, "invalid content-length header", {"connection": "close"}
            )
        if length is not None and length > AUTHORIZE_MAX_BODY:
            return _too_large()  # refused before any byte of it is read
        body = await reader.read()
        if body is None:  # the caller left
            return None
        fields = _fields(body)
        if fields is None:
            return _not_an_object(request)
        agent_id = _value(fields.get("agent_id"))
        if not isinstance(agent_id, str) or not agent_id.strip():
            return json_error_response(400, "agent_id is required (a non-empty string)")

        try:
            # The whole call, not each read: a slowly dripping upstream cannot hold the request.
            with anyio.fail_after(self.timeout):
                status, content, retry_after = await self._call_upstream(body)
        except (TimeoutError, httpx.TimeoutException):
            logger.warning("LayerCode authorize timed out after %ss", self.timeout)
            return json_error_response(502, "LayerCode API timed out")
        except _Refused as exc:
            logger.warning(*exc.log)
            return json_error_response(502, exc.answer)
        except httpx.HTTPError as exc:
            detail = str(exc)  # may quote the answer's bytes: an echo of our key, say
            assert self.api_key  # checked above
            if self.api_key in detail or repr(self.api_key.encode())[2:-1] in detail:
                detail = "(not shown: it holds our LAYERCODE_API_KEY)"
            logger.warning(
                "LayerCode authorize unreachable: %s: %s",
                type(exc).__name__,
                escape_log_value(detail),
            )
            return json_error_response(502, "LayerCode API unreachable")
        except (httpx.InvalidURL, ValueError) as exc:  # a redirect's Location httpx cannot read
            logger.warning("LayerCode authorize answer refused: %s", escape_log_value(exc))
            return json_error_response(502, _INVALID)

        unreadable: Exception | None = None
        try:
            answer = decode_json(content) if content else None
        except (msgspec.DecodeError, RecursionError) as exc:  # an integer of 5000 digits, say
            answer, unreadable = None, exc
        if 200 <= status < 300:
            key = answer.get("client_session_key") if isinstance(answer, dict) else None
            if unreadable is not None:  # (relayed as read: its key echoed in escapes is found)
                why = escape_log_value(unreadable)
                logger.warning("LayerCode authorize answer refused: not JSON it can read: %s", why)
                return json_error_response(502, _INVALID)
            if not isinstance(key, str) or not key:  # the browser could not connect with it
                logger.warning("LayerCode authorize answer refused: no client_session_key")
                return json_error_response(502, _INVALID)
            relayed_answer = JSONResponse(answer)
            if self._echoes_key(bytes(relayed_answer.body)):
                return json_error_response(502, _INVALID)
            return relayed_answer
        if 400 <= status < 500:
            logger.info("LayerCode authorize refused with %s", status)
            # Only LayerCode's own message is relayed (and a 429's Retry-After): no other field.
            message = answer.get("error") if isinstance(answer, dict) else None
            line = _printable(message, AUTHORIZE_MAX_ERROR_CHARS * 4)  # the cut hides no key
            if line is not None and self._echoes_key(_encode([message, line])):
                line = None
            relayed = line[:AUTHORIZE_MAX_ERROR_CHARS] if line else None
            return json_error_response(
                status, relayed or f"LayerCode API refused the request ({status})", retry_after
            )
        logger.warning("LayerCode authorize failed upstream with %s", status)
        return json_error_response(502, f"LayerCode API error ({status})", retry_after)

    def _echoes_key(self, relayed: bytes) -> bool:
        """Whether JSON for the caller holds our API key (a proxy echoing our request, say)."""
        assert self.api_key  # checked before calling upstream
        if _encode(self.api_key)[1:-1] not in relayed:
            return False
        logger.warning("LayerCode authorize answer holds our API key: not relayed")
        return True

    async def _call_upstream(self, body: bytes) -> tuple[int, bytes, dict[str, str] | None]:
        """POST to LayerCode: its status, body (bounded) and ``Retry-After`` to pass on."""
        assert self._clients is not None  # with an api_key, checked before calling upstream
        async with self._clients.get().stream(
            "POST",
            self.url,
            content=body,
            headers={
                "authorization": f"Bearer {self.api_key}",
                "content-type": "application/json",
                "accept-encoding": "identity",
            },
        ) as upstream:
            # A compressed answer (a proxy's) would be decompressed without bound: refused unread.
            encoding = upstream.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                raise _Refused(_INVALID, _ENCODED, escape_log_value(encoding))
            declared = declared_length(upstream.headers.get("content-length", ""))
            if declared is not None and declared > AUTHORIZE_MAX_UPSTREAM_BODY:
                raise _Refused(*_TOO_LARGE)
            chunks: list[bytes] = []
            size = 0
            async for chunk in upstream.aiter_bytes():
                size += len(chunk)
                if size > AUTHORIZE_MAX_UPSTREAM_BODY:
                    raise _Refused(*_TOO_LARGE)
                chunks.append(chunk)
            status = upstream.status_code
            return status, b"".join(chunks), _retry_after(status, upstream.headers)


class _BodyOnce:
    """The ``receive`` of an authorize request: the body read once, bounded (size, timeout),
    whether a guard reads it first (``await request.json()``) or the route: the same bytes."""

    __slots__ = ("body", "done", "failure", "given", "receive", "within")

    def __init__(self, receive: Receive, within: float) -> None:
        self.receive = receive
        self.within = within
        self.done = self.given = False
        self.body: bytes | None = None
        self.failure: BodyTooLarge | BodyTimeout | None = None

    @property
    def left(self) -> bool:
        """The caller left before its body was complete."""
        return self.done and self.body is None and self.failure is None

    async def read(self) -> bytes | None:
        """The whole body, ``None`` if the caller left; raises BodyTooLarge or BodyTimeout
        (on every call, once the read failed)."""
        if not self.done:
            try:
                self.body = await read_body(self.receive, AUTHORIZE_MAX_BODY, self.within)
            except (BodyTooLarge, BodyTimeout) as exc:
                self.failure = exc
            self.done = True
        if self.failure is not None:
            raise self.failure
        return self.body

    async def __call__(self) -> Message:
        if self.given:  # after the body: the server's next message (http.disconnect)
            return await self.receive()
        self.given = True
        body = await self.read()
        if body is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}


class _Refused(Exception):
    """LayerCode's answer, refused unread: the caller's 502 message and the log line."""

    def __init__(self, answer: str, *log: object) -> None:
        super().__init__(answer)
        self.answer = answer
        self.log = log


def _retry_after(status: int, headers: httpx.Headers) -> dict[str, str] | None:
    """The ``Retry-After`` of LayerCode's 429 or 503 as a header for the caller: whole
    seconds, a day at most; none for another status or another form (a date, say)."""
    value = headers.get("retry-after", "").strip()
    if status not in (429, 503) or not (value.isascii() and value.isdigit()):
        return None
    seconds = min(int(value), 86400) if len(value) <= 9 else 86400
    return {"retry-after": str(seconds)}


def _printable(message: object, limit: int) -> str | None:
    """``message`` as one printable line of at most ``limit`` characters, or ``None``."""
    if not isinstance(message, str):
        return None
    text = "".join(
        c if c.isprintable() else " " if c.isspace() else "" for c in message[: limit * 4]
    )
    text = " ".join(text.split())[:limit]
    return text or None


def _object(body: bytes | None) -> dict[str, Any] | None:
    """``body`` decoded, if it is a JSON object."""
    try:
        payload = decode_json(body) if body is not None else None
    except (msgspec.DecodeError, RecursionError):  # invalid, or nested too deep
        return None
    return payload if isinstance(payload, dict) else None


def _fields(body: bytes) -> dict[str, msgspec.Raw] | None:
    """The fields of JSON object ``body``, each value's JSON as sent (not read: the body goes
    upstream as it is, and only ``agent_id`` is read here, whatever numbers the others hold:
    an integer beyond Python's 4300 digits, ``1e400``); ``None`` if it is no JSON object."""
    try:
        return msgspec.json.decode(without_lone_surrogates(body) or body, type=_FIELDS)
    except (msgspec.DecodeError, RecursionError):
        return None


_FIELDS: Final = dict[str, msgspec.Raw]


def _value(raw: msgspec.Raw | None) -> object:
    """The value of a field's JSON (``None`` for no field, or JSON it cannot read)."""
    try:
        return None if raw is None else decode_json(bytes(raw))
    except (msgspec.DecodeError, RecursionError):
        return None


def _not_an_object(request: Request) -> Response:
    if compressed(request.scope):
        return compressed_body_response()
    return json_error_response(400, "body must be a JSON object with agent_id")


def _too_large() -> Response:
    """413, closing the connection: the rest of the body may still be on the wire."""
    return json_error_response(
        413, f"request body exceeds {AUTHORIZE_MAX_BODY} bytes", {"connection": "close"}
    )
