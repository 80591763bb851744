"""Server-Sent Events.

* :func:`format_sse_message`: one message, as the specification reads it.
* :func:`create_sse_response`: any async iterable, on sse-starlette's ``EventSourceResponse``
  (keep-alive pings, disconnect detection).
* :class:`EventStreamResponse`: the response of LayerCode turns. A producer pushes ready-made
  SSE bytes through ``emit``, which waits for the server; a disconnect cancels it at once.
  sse-starlette's response for the same turns had, on the paced benchmark, many times its
  p99 first-tts overhead and more CPU per turn (benchmarks/RESULTS.md).

Both responses are Starlette ``Response`` subclasses: return them from Starlette or FastAPI
handlers, from Litestar handlers annotated ``-> ASGIApp`` (or the class), or call them as
ASGI apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import math
import re
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ._asgi import check_headers, json_error, must_propagate, send_json_error
from .errors import ResponseError, check_positive_int, check_seconds, check_type
from .jsonwire import escape_json_text_line_breaks

__all__ = [
    "SSE_HEADERS",
    "Emit",
    "EventStreamResponse",
    "create_sse_response",
    "format_sse_message",
]

logger = logging.getLogger("layercode_asgi.sse")

#: Response headers of every event stream: no caching or transformation by proxies, and
#: no proxy buffering (nginx honours ``X-Accel-Buffering``).
SSE_HEADERS: Mapping[str, str] = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
}
_RAW_SSE_HEADERS = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SSE_HEADERS.items()]

# The SSE specification's line terminators: CRLF, lone LF, lone CR. (``str.splitlines``
# also splits on \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029, which SSE does not.)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class Emit(Protocol):
    """``await emit(chunk)`` sends one chunk of an event stream and returns once the server
    took it; ``await emit(chunk, last=True)`` sends the final chunk and ends the body with
    it (one write instead of two; nothing may be emitted after it)."""

    def __call__(self, chunk: bytes, /, *, last: bool = False) -> Awaitable[None]: ...


def format_sse_message(
    data: str,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> str:
    """Render one SSE message, ending with the blank line that dispatches it.

    A ``data`` with line breaks (``\\n``, ``\\r\\n`` or ``\\r``) becomes several ``data:``
    lines, which a client joins back with ``\\n``. ``event`` and ``id`` must be single
    lines (a line break there would let the text inject its own fields or events) and
    ``id`` must not contain NUL (clients ignore such ids): both raise ``ValueError``
    (``TypeError`` when either is not a ``str``).
    ``retry`` is the reconnection delay in milliseconds, a non-negative int. A ``data``
    that is a JSON document has raw U+0085, U+2028 and U+2029 written as ``\\u`` escapes
    (the same JSON value, which line readers that split on them cannot cut); other text
    is sent as it is.

    >>> format_sse_message("Hello, world!", event="message", id="msg-123")
    'event: message\\nid: msg-123\\ndata: Hello, world!\\n\\n'
    """
    if not isinstance(data, str):
        raise TypeError(f"data must be a str, got {type(data).__name__}")
    data = escape_json_text_line_breaks(data)  # JSON only: the same value, on one line
    parts: list[str] = []
    if event is not None:
        if not isinstance(event, str):
            raise TypeError(f"SSE event must be a str, got {type(event).__name__}")
        if _LINE_BREAK.search(event):
            raise ValueError("SSE event name must not contain a line break")
        parts.append(f"event: {event}\n")
    if id is not None:
        if not isinstance(id, str):
            raise TypeError(f"SSE id must be a str, got {type(id).__name__}")
        if _LINE_BREAK.search(id) or "\0" in id:
            raise ValueError("SSE id must not contain a line break or NUL")
        parts.append(f"id: {id}\n")
    if retry is not None:
        check_positive_int(retry, "SSE retry (ms)", zero=True)
        parts.append(f"retry: {retry}\n")
    parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    parts.append("\n")
    return "".join(parts)


def _to_sse(item: Any) -> Any:
    """What ``create_sse_response`` sends for one item of the user's iterable."""
    if isinstance(item, str):
        return format_sse_message(item).encode()
    if isinstance(item, dict) and isinstance(item.get("data"), str):
        return {**item, "data": escape_json_text_line_breaks(item["data"])}
    if isinstance(item, ServerSentEvent) and isinstance(item.data, str):
        item.data = escape_json_text_line_breaks(item.data)
    if isinstance(item, bytes | ServerSentEvent | dict):
        return item  # pre-formatted bytes, or sse-starlette's own event types
    raise TypeError(
        "create_sse_response items must be str (one data message), bytes (pre-formatted), "
        f"a ServerSentEvent or a dict of its fields; got {type(item).__name__}"
    )


async def _items(source: AsyncIterable[Any]) -> AsyncIterable[Any]:
    iterator = aiter(source)
    try:
        while True:
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            yield _to_sse(item)
    finally:  # a generator is closed on every exit (a refused item too), not left to the
        # garbage collector; any other source (a caller's stream) is the caller's to close
        if inspect.isasyncgen(iterator):
            await iterator.aclose()


def create_sse_response(
    generator: AsyncIterable[Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    ping: float | None = None,
    background: BackgroundTask | None = None,
    send_timeout: float | None = None,
) -> EventSourceResponse:
    """Stream an async iterable as Server-Sent Events (on sse-starlette).

    Each ``str`` item is one ``data:`` message (several ``data:`` lines where it has line
    breaks); ``bytes`` go out as they are (formatted already, e.g. by
    :func:`format_sse_message`); an ``sse_starlette.ServerSentEvent`` or a dict of its fields
    (``data``, ``event``, ``id``, ``retry``, ``comment``) is formatted by sse-starlette.
    Headers: :data:`SSE_HEADERS`, those in ``headers`` replacing the defaults of their name.
    ``ping``: the keep-alive comment interval in seconds (sse-starlette's default 15 s; 0
    disables). ``send_timeout``: the bound of each send (None: none; it does not hold under
    Hypercorn's trio worker, whose writes cannot be cancelled).

    Raises ``ValueError`` for a ``ping`` or ``send_timeout`` that is not a finite number
    (``ping`` >= 0, ``send_timeout`` > 0), a ``status_code`` outside 100 to 599, or a header
    that would not stay one line (CR, LF, NUL, ...) or frames the body (``Content-Length``,
    ``Transfer-Encoding``); ``TypeError`` for a ``status_code`` that is no int, or a
    ``generator`` that is not an async iterable.
    """
    if not hasattr(generator, "__aiter__"):
        raise TypeError(
            "create_sse_response streams an async iterable (e.g. an async generator), "
            f"got {type(generator).__name__}"
        )
    check_seconds("ping", ping, zero=True, none=True)
    check_seconds("send_timeout", send_timeout, zero=False, none=True)
    check_type("status_code", status_code, int, "an int from 100 to 599")
    if isinstance(status_code, bool) or not 100 <= status_code <= 599:
        raise ValueError(f"status_code must be an int from 100 to 599, got {status_code!r}")
    merged = dict(SSE_HEADERS)
    if headers is not None:
        check_headers("headers", headers, client=False)  # one line each, else an error
        merged.update({k.lower(): v for k, v in headers.items()})
    response = EventSourceResponse(
        _items(generator),
        status_code=status_code,
        headers=merged,
        # 0 disables pings: sse-starlette 3.0 (our lowest) to 3.4.1 at least pinged in a busy loop
        ping=math.inf if ping == 0 else ping,
        sep="\n",
        background=background,
        send_timeout=send_timeout,
    )
    # sse-starlette sets X-Accel-Buffering itself, over ours: the one given wins here too.
    response.headers["x-accel-buffering"] = merged["x-accel-buffering"]
    return response


#: The answer of a stream whose client left before it began. Nobody reads it (servers drop
#: it), but Starlette's ``BaseHTTPMiddleware`` raises ``RuntimeError: No response returned.``
#: without one. 499, as the webhook's log line and metrics count it.
_LEFT = json_error(499, "client disconnected before the response began", close=True)

#: ``emit`` yields to the event loop once per this many chunks.
_YIELD_EVERY = 8


class _DetachedSend:
    """On trio, each send of a stream's body runs in a trio system task while the producer
    waits for it: a deadline or a disconnect stops the wait even though Hypercorn's trio
    worker shields its write (a client that stopped reading would hold the producer, its
    deadline and its conversation). A write left behind holds nothing either: the response
    returns, the server closes the connection, the write ends with it. Writes stay in order,
    each in a copy of the producer's context (a middleware's ``send`` wrapper sees the
    request's context variables, as on asyncio)."""

    __slots__ = ("error", "send", "sent", "spawn")

    def __init__(self, send: Send) -> None:
        import trio.lowlevel  # on trio only (an optional dependency)

        self.spawn = trio.lowlevel.spawn_system_task
        self.send = send
        self.sent: anyio.Event | None = None  # set once the last write returned
        self.error: Exception | None = None

    async def __call__(self, message: Message) -> None:
        if self.sent is not None:
            await self.sent.wait()
        if self.error is None:  # (a write left behind may have failed: none after it)
            sent = self.sent = anyio.Event()
            self.spawn(self._write, message, sent, context=contextvars.copy_context())
            await sent.wait()
        error, self.error = self.error, None
        if error is not None:
            raise error

    async def _write(self, message: Message, sent: anyio.Event) -> None:
        try:
            await self.send(message)
        except Exception as exc:  # the producer's (an OSError: the client left)
            self.error = exc  # (a system task must not raise)
        finally:
            sent.set()


class EventStreamResponse(Response):
    """A ``text/event-stream`` response driven by a producer coroutine.

    ``producer(emit)`` pushes ready-made SSE bytes with ``await emit(chunk)``, which returns
    once the server took the chunk (a slow client slows the producer; nothing piles up). The
    status line and headers go out with the first chunk; the body closes when the producer
    returns. A :class:`~layercode_asgi.errors.ResponseError` raised before the first chunk is
    the client's answer as JSON (e.g. 503 when the conversation store is down); any other
    exception is logged and is a JSON 500 before the stream starts, or ends the stream after
    (never a second status line).

    The producer runs in the request's own task; a watcher task waits for
    ``http.disconnect`` meanwhile, and when the client leaves (or a send fails with
    ``OSError``) the producer is cancelled at its current ``await`` (an anyio cancellation,
    on asyncio and trio alike). :attr:`disconnected` tells afterwards whether the client left
    early; one that left before the first chunk is answered 499 JSON (for middleware outside:
    nobody reads it). ``close_timeout`` bounds the final (empty) frame, so a client that
    stopped reading does not hold the response open (None: no bound; else a finite number
    >= 0, or ``ValueError``). ``headers`` replace the defaults of their name; one that would
    not stay one header line (CR, LF, NUL, ...) or that frames the body (``Content-Length``,
    ``Transfer-Encoding``) raises ``ValueError``.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        producer: Callable[[Emit], Awaitable[None]],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
        close_timeout: float | None = None,
    ) -> None:
        check_seconds("close_timeout", close_timeout, zero=True, none=True)
        self.producer = producer
        self.status_code = status_code
        self.background = background
        self.close_timeout = close_timeout
        self.body = b""
        self.raw_headers = list(_RAW_SSE_HEADERS)
        if headers is not None:  # a header given replaces the default of that name
            given = check_headers("headers", headers, client=False)
            names = {name for name, _ in given}
            self.raw_headers = [h for h in self.raw_headers if h[0] not in names] + given
        self.disconnected = False
        self.started = False
        self.closed = False
        self._send: Send | None = None
        self._send_body: Send | None = None  # trio: a _DetachedSend
        self._cancel: anyio.CancelScope | None = None
        self._failure: BaseException | None = None
        self._unyielded = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = self._send_body = send
        # The producer runs in this task, so it starts at once, not one trip through the event
        # loop later (a trip was 30% of the p99 first-tts overhead, paced benchmark, N = 800).
        # On asyncio the watcher is a plain task, not a task group: the group cost 33 µs more
        # per paced turn, and at N = 800 took server CPU per turn from 287 to 330 µs and p99
        # first-tts overhead from 2.3 to 2.9 ms. The watcher is cancelled once the producer is
        # done (waiting for ``http.disconnect`` cost 5% of CPU per paced turn). Inline, not in
        # methods: one coroutine frame fewer held by every open turn.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no asyncio loop: trio
            loop = None
        if loop is None:  # (outside the handler: the agent's errors get no __context__)
            async with anyio.create_task_group() as task_group:
                self._cancel = task_group.cancel_scope
                self._send_body = _DetachedSend(send)
                task_group.start_soon(self._watch_disconnect, receive)
                await self._run_producer()
                task_group.cancel_scope.cancel()
        else:
            cancel = self._cancel = anyio.CancelScope()
            watcher = loop.create_task(self._watch_disconnect(receive))
            try:
                with cancel:
                    await self._run_producer()
            finally:
                watcher.cancel()
        if not self.disconnected:
            await self._finish(send, self._failure)
        elif not self.started:  # nobody reads it, but middleware outside needs an answer
            with contextlib.suppress(OSError):
                await send_json_error(send, _LEFT)
        # no cycle through the producer
        self._send = self._send_body = self._cancel = self._failure = None
        if self.background is not None:
            await self.background()

    async def emit(self, chunk: bytes, *, last: bool = False) -> None:
        """Send one chunk of the stream; returns once the server took it (the producer's
        ``emit``, see :class:`Emit`). The status line and headers go out with the first
        chunk; ``last=True`` ends the body with this chunk."""
        send, send_body = self._send, self._send_body
        if send is None or send_body is None or self.closed:
            raise RuntimeError("this response is not streaming")
        try:
            if not self.started:
                await send(self._start_message())
                self.started = True  # once sent: a send cut by a deadline sent nothing
            self.closed = last
            await send_body({"type": "http.response.body", "body": chunk, "more_body": not last})
        except OSError:
            self.disconnected = True
            if self._cancel is not None:
                self._cancel.cancel()
            await anyio.lowlevel.checkpoint()  # the cancellation, here in the producer
        # A server's send often returns without suspending (always, once the client is gone):
        # yield now and then, so the watcher, timeouts and other requests run. Not per chunk:
        # two checkpoints a chunk made a 10-chunk turn cost 280 instead of 190 µs of library
        # CPU (in-process, asyncio); a real agent awaits between chunks anyway.
        self._unyielded += 1
        if self._unyielded >= _YIELD_EVERY:
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()

    async def _run_producer(self) -> None:
        try:
            await self.producer(self.emit)
        except BaseException as exc:  # a CancelledError of the producer's own too
            if must_propagate(exc):
                raise
            self._failure = exc

    def _start_message(self) -> Message:
        return {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }

    async def _finish(self, send: Send, failure: BaseException | None) -> None:
        try:
            if failure is not None and not self.started:
                answer = _error_answer(failure)
                self.status_code = answer[0]["status"]
                await send_json_error(send, answer)
                return
            if failure is not None:
                logger.error("event stream producer failed", exc_info=failure)
            if self.closed:  # the producer's last chunk ended the body
                return
            if not self.started:  # the status line, unbounded: the bound is the final frame's
                await send(self._start_message())
                self.started = True
            limit = math.inf if self.close_timeout is None else self.close_timeout
            with anyio.move_on_after(limit) as scope:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            if scope.cancelled_caught:
                logger.warning("event stream: the client stopped reading; stream closed")
        except OSError:
            self.disconnected = True

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.closed:  # (else the body is complete: the producer just finishes up)
            self.disconnected = True
            if self._cancel is not None:
                self._cancel.cancel()


def _error_answer(failure: BaseException) -> tuple[Message, Message]:
    """The JSON answer of a producer that failed before its first event."""
    if isinstance(failure, ResponseError):
        return json_error(failure.status_code, failure.message, headers=failure.headers)
    logger.error("event stream producer failed before its first event", exc_info=failure)
    return json_error(500, "internal error")
