"""Server-Sent Events: message formatting and streaming responses.

* :func:`format_sse_message` renders one message exactly as the SSE specification reads it.
* :func:`create_sse_response` wraps any async iterable in sse-starlette's
  ``EventSourceResponse`` (keep-alive pings, disconnect detection), with the headers
  LayerCode and proxies need.
* :class:`EventStreamResponse` is the lean response LayerCode turns use: a producer
  coroutine pushes ready-made SSE bytes through ``emit``; each ``emit`` waits for the
  server's ``send`` (so a slow client slows the producer, nothing piles up), and a client
  disconnect cancels the producer at once. On asyncio it runs on native asyncio primitives
  (the hot path of every turn); elsewhere on anyio.

All three responses are Starlette ``Response`` subclasses: return them from Starlette or
FastAPI handlers, from Litestar handlers annotated ``-> ASGIApp`` (or the class), or call
them as ASGI apps ``await response(scope, receive, send)``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import types
from collections.abc import AsyncIterable, Awaitable, Callable, Generator, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .errors import ResponseError
from .jsonwire import escape_json_text_line_breaks

_sniffio: Any
try:
    import sniffio as _sniffio
except ImportError:  # anyio does not require it; without it, asyncio is the only option
    _sniffio = None

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
_encode_json = msgspec.json.Encoder().encode
_RAW_SSE_HEADERS = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SSE_HEADERS.items()]

# The SSE specification's line terminators: CRLF, lone LF, lone CR. (``str.splitlines``
# also splits on \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029, which SSE does not.)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

#: ``emit(chunk)`` sends one chunk of an event stream and returns once the server took it.
Emit = Callable[[bytes], Awaitable[None]]


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
    ``id`` must not contain NUL (clients ignore such ids): both raise ``ValueError``.
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
        if _LINE_BREAK.search(event):
            raise ValueError("SSE event name must not contain a line break")
        parts.append(f"event: {event}\n")
    if id is not None:
        if _LINE_BREAK.search(id) or "\0" in id:
            raise ValueError("SSE id must not contain a line break or NUL")
        parts.append(f"id: {id}\n")
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f"SSE retry must be a non-negative int (ms), got {retry!r}")
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
    async for item in source:
        yield _to_sse(item)


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

    Each ``str`` item becomes one ``data:`` message (split over several ``data:`` lines
    where it has line breaks); ``bytes`` are sent as they are (already formatted, e.g. by
    :func:`format_sse_message`); ``sse_starlette.ServerSentEvent`` objects and dicts of its
    fields (``data``, ``event``, ``id``, ``retry``, ``comment``) are formatted by
    sse-starlette. Headers: ``Content-Type: text/event-stream``,
    ``Cache-Control: no-cache, no-transform``, ``X-Accel-Buffering: no``. ``ping`` is the
    keep-alive comment interval in seconds (sse-starlette's default 15 s; 0 disables).
    """
    merged = dict(SSE_HEADERS)
    if headers:
        merged.update({k.lower(): v for k, v in headers.items()})
    return EventSourceResponse(
        _items(generator),
        status_code=status_code,
        headers=merged,
        ping=ping,
        sep="\n",
        background=background,
        send_timeout=send_timeout,
    )


class EventStreamResponse(Response):
    """A lean ``text/event-stream`` response driven by a producer coroutine.

    ``producer(emit)`` pushes ready-made SSE bytes with ``await emit(chunk)``. The status
    line and headers go out with the first chunk; each chunk is sent as the producer emits
    it; the body closes when the producer returns. (On asyncio, the chunks a producer emits
    before it first waits for anything go out together, at that first wait or at its end:
    a reply computed without waiting costs one write, not one per event; at most 64 KiB
    are held that way.) If the producer raises
    :class:`~layercode_asgi.errors.ResponseError` before its first chunk, the client gets
    that error as JSON instead (e.g. 503 when the conversation store is down); any other
    exception is logged and answered with a JSON 500 before the stream starts, or ends the
    stream quietly after it started (never a second status line).

    While it runs, a watcher waits for ``http.disconnect``; when the client leaves, the
    producer is cancelled at its current ``await``. A send that fails because the
    connection is gone (``OSError``) ends it the same way. :attr:`disconnected` tells
    afterwards whether the client left early.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        producer: Callable[[Emit], Awaitable[None]],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.producer = producer
        self.status_code = status_code
        self.background = background
        self.body = b""
        self.raw_headers = list(_RAW_SSE_HEADERS)
        if headers:
            self.raw_headers.extend(
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            )
        self.disconnected = False
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _other_async_library():
            await self._stream_anyio(receive, send)
        else:
            await self._stream_asyncio(receive, send)
        if self.background is not None:
            await self.background()

    async def _stream_asyncio(self, receive: Receive, send: Send) -> None:
        """The stream on asyncio, with native primitives (the hot path of every turn).

        Same behaviour as :meth:`_stream_anyio`, at a fraction of the cost:

        * The producer's first step (up to its first real suspension) runs right here, its
          chunks collected; a producer that finishes without ever waiting (a scripted
          reply, a cached answer) is answered with one write of all its bytes. Once it
          waits for anything, what it produced so far goes out at once, and from then on
          every chunk is sent as it is emitted. (More than ``_BUFFER_LIMIT`` bytes are
          never held: past that, chunks are sent right away, with back-pressure.)
        * The streaming task is only looked up (``asyncio.current_task()``, a system call
          on Python 3.11) once the producer waits, or a send fails: a producer that
          finishes in its first step never needs it.
        * The disconnect watcher is a plain task, started only once the producer waits.
        * A disconnect cancels this task once (``Task.cancel``), which the producer sees
          as ``CancelledError`` at its current ``await``; the cancellation is then taken
          back with ``Task.uncancel`` (as ``asyncio.timeout`` does), so anything else
          cancelling this task still propagates.
        * ``emit`` yields to the event loop every ``_YIELD_EVERY`` chunks rather than after
          each: chunks produced back to back go out back to back, and a producer that
          never awaits anything else still lets the watcher, timeouts and other requests
          run.
        """
        stream = _AsyncioStream(self, receive, send)
        failure: Exception | None = None
        try:
            steps = self.producer(stream.emit).__await__()
            try:
                suspended = steps.send(None)
            except StopIteration:
                pass  # done without waiting: everything is in stream.pending
            else:
                stream.first_step = False
                stream.resolve()
                if stream.on_suspend is not None:
                    for callback in stream.on_suspend:
                        callback()  # e.g. a turn's deadline, deferred until now
                # It waits for something: what it produced so far goes out now.
                try:
                    await stream.flush()
                except OSError:
                    self.disconnected = True
                    stream.cancel()  # delivered at the producer's await, just below
                    await _resume(steps, suspended)
                except BaseException as exc:  # cancelled while sending: the producer too
                    await _throw(steps, exc)
                else:
                    stream.start_watcher()
                    await _resume(steps, suspended)
        except Exception as exc:
            failure = exc
        except asyncio.CancelledError:
            # Ours (the client left) is taken back; any other cancellation propagates.
            task = stream.task
            if not stream.cancelled or task is None or task.uncancel() > stream.baseline:
                raise
            stream.cancelled = False
        finally:
            stream.stop()
        if stream.cancelled and stream.task is not None:
            # The producer swallowed our CancelledError: still take the cancellation back.
            stream.task.uncancel()
        if self.disconnected:
            return
        try:
            if failure is not None and not self.started:
                self.status_code = await _send_error(send, failure)
                return
            if failure is not None:
                logger.error("event stream producer failed", exc_info=failure)
            self.started = True
            await stream.flush(last=True)
        except OSError:
            self.disconnected = True

    async def _watch_asyncio(self, receive: Receive, guard: _AsyncioStream) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    guard.cancel()
                    return
        except Exception:  # a plain task: nobody awaits it, so report here
            logger.exception("event stream: waiting for the client's disconnect failed")

    async def _finish(self, send: Send, start: Message, failure: Exception | None) -> None:
        if self.disconnected:
            return
        try:
            if failure is not None and not self.started:
                self.status_code = await _send_error(send, failure)
            else:
                if failure is not None:
                    logger.error("event stream producer failed", exc_info=failure)
                if not self.started:
                    self.started = True
                    await send(start)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.disconnected = True

    async def _stream_anyio(self, receive: Receive, send: Send) -> None:
        """The stream on any other event loop (trio), with anyio's task group."""
        start = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }

        async def emit(chunk: bytes) -> None:
            try:
                if not self.started:
                    self.started = True
                    await send(start)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError:
                self.disconnected = True
                cancel_scope.cancel()
            # Yield to the event loop once per chunk. A server's send often returns without
            # suspending (always, once the client is gone), so a producer that awaits
            # nothing else would otherwise starve the disconnect watcher and never see a
            # timeout or cancellation.
            await anyio.lowlevel.checkpoint()

        failure: Exception | None = None
        async with anyio.create_task_group() as task_group:
            cancel_scope = task_group.cancel_scope
            task_group.start_soon(self._watch_disconnect, receive, cancel_scope)
            try:
                await self.producer(emit)
            except Exception as exc:
                failure = exc
            finally:
                cancel_scope.cancel()  # stop the watcher (or confirm the disconnect)
        await self._finish(send, start, failure)

    async def _watch_disconnect(self, receive: Receive, cancel_scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                cancel_scope.cancel()
                return


#: On asyncio, ``emit`` yields to the event loop once per this many chunks.
_YIELD_EVERY = 8
#: Most bytes collected during a producer's first step before they are sent anyway.
_BUFFER_LIMIT = 64 * 1024


class _AsyncioStream:
    """One asyncio event stream: its ``emit``, its first-step buffer, and its watcher.

    ``pending`` holds the chunks emitted during the producer's first step (``None`` once
    streaming). ``armed`` is true while the producer runs; the watcher only runs while the
    streaming task is suspended, so its cancellation always lands inside the producer.
    ``task`` (the streaming task) and ``baseline`` (its ``cancelling()`` count before any
    cancellation of ours) are looked up by :meth:`resolve`, only when first needed.
    """

    __slots__ = (
        "armed",
        "baseline",
        "cancelled",
        "first_step",
        "loop",
        "on_suspend",
        "pending",
        "pending_size",
        "receive",
        "resolved",
        "response",
        "send",
        "sent_start",
        "task",
        "unyielded",
        "watcher",
    )

    def __init__(self, response: EventStreamResponse, receive: Receive, send: Send) -> None:
        self.response = response
        self.task: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.baseline = 0
        self.resolved = False
        self.receive = receive
        self.send = send
        self.pending: list[bytes] | None = []
        self.pending_size = 0
        self.sent_start = False
        self.armed = True
        self.cancelled = False
        self.unyielded = 0
        self.watcher: asyncio.Task[None] | None = None
        self.first_step = True
        self.on_suspend: list[Callable[[], None]] | None = None

    async def emit(self, chunk: bytes) -> None:
        pending = self.pending
        if pending is not None:
            # The producer's first step: collect (the stream has started all the same).
            self.response.started = True
            pending.append(chunk)
            self.pending_size += len(chunk)
            if self.pending_size <= _BUFFER_LIMIT:
                return
            chunk = b""  # too much to hold: send what there is, and stream from here on
        response = self.response
        try:
            if self.pending is not None:
                await self.flush()
            else:
                if not response.started:
                    response.started = True
                if not self.sent_start:
                    self.sent_start = True
                    await self.send(self._start())
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            response.disconnected = True
            self.cancel()
            await _sleep0()  # take the cancellation here, inside the producer
        self.unyielded += 1
        if self.unyielded >= _YIELD_EVERY:
            self.unyielded = 0
            await _sleep0()

    def _start(self) -> Message:
        response = self.response
        return {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }

    async def flush(self, *, last: bool = False) -> None:
        """Send the collected chunks (all in one message) and stream from now on."""
        pending = self.pending
        self.pending = None
        if not self.sent_start and (last or pending):
            self.sent_start = True
            await self.send(self._start())
        if last or pending:
            body = b"".join(pending) if pending else b""
            await self.send({"type": "http.response.body", "body": body, "more_body": not last})

    def resolve(self) -> asyncio.Task[Any] | None:
        """The streaming task (looked up once; None if no asyncio task runs this stream)."""
        if not self.resolved:
            self.resolved = True
            try:
                task = asyncio.current_task()
            except RuntimeError:  # driven by something other than an asyncio loop
                task = None
            if task is not None:
                self.task = task
                self.loop = task.get_loop()
                self.baseline = task.cancelling()
        return self.task

    def start_watcher(self) -> None:
        if self.armed and self.watcher is None and self.resolve() is not None:
            assert self.loop is not None
            self.watcher = self.loop.create_task(self.response._watch_asyncio(self.receive, self))

    def cancel(self) -> None:
        if self.armed and not self.cancelled:
            task = self.resolve()
            if task is not None:
                self.cancelled = True
                task.cancel()

    def stop(self) -> None:
        self.armed = False
        # Drop what refers back to this stream, so that it is freed at once, not by the
        # cyclic GC: the callbacks, and the watcher task (whose cancellation's traceback
        # holds the watcher's frame, which holds this stream).
        self.on_suspend = None
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None


async def _throw(steps: Generator[Any, None, Any], exc: BaseException) -> None:
    """Raise ``exc`` at the current ``await`` of a suspended awaitable, then await it."""
    try:
        suspended = steps.throw(exc)
    except StopIteration:
        return
    await _resume(steps, suspended)


@types.coroutine
def _resume(steps: Generator[Any, None, Any], suspended: Any) -> Generator[Any, Any, Any]:
    """``await`` the rest of an awaitable whose first step already ran (and yielded
    ``suspended``): ``yield from`` semantics (PEP 380), values and exceptions included;
    returns the awaitable's result."""
    value = suspended
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:
            try:
                value = steps.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                value = steps.send(sent)
            except StopIteration as done:
                return done.value


def asyncio_stream(emit: Emit) -> _AsyncioStream | None:
    """The asyncio :class:`EventStreamResponse` stream that ``emit`` belongs to, or None.

    Lets a producer (a :class:`~layercode_asgi.turns.Turn`) know it runs on asyncio, in
    that stream's task, without asking the event loop (a system call on Python 3.11).
    """
    owner = getattr(emit, "__self__", None)
    return owner if type(owner) is _AsyncioStream else None


def defer_until_suspended(stream: _AsyncioStream, callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the stream's producer first suspends.

    Only while the producer runs its first step (returns False otherwise, and nothing is
    registered): a producer that finishes without ever waiting never runs ``callback``.
    Lets a turn arm its deadline only once it actually waits for something, at no cost to
    a turn that does not. The stream's task is resolved before ``callback`` runs.
    """
    if not stream.first_step:
        return False
    if stream.on_suspend is None:
        stream.on_suspend = [callback]
    else:
        stream.on_suspend.append(callback)
    return True


@types.coroutine
def _sleep0() -> Generator[None, None, None]:
    """``asyncio.sleep(0)`` without its wrapper: one bare yield to the event loop."""
    yield


def _other_async_library() -> bool:
    """True when sniffio says this code runs under an async library other than asyncio
    (trio); asyncio is assumed otherwise. No system call: trio marks its threads."""
    return (
        _sniffio is not None
        and (
            _sniffio.thread_local.name is not None
            or _sniffio.current_async_library_cvar.get() is not None
        )
        and _sniffio.current_async_library() != "asyncio"
    )


def on_asyncio() -> bool:
    """True when the running event loop is asyncio's (not trio, not a loop in a loop).

    Decides between the native asyncio hot paths and the anyio ones; as cheap as a check
    can be, since it runs a few times per request.
    """
    if _sniffio is not None and (
        _sniffio.thread_local.name is not None
        or _sniffio.current_async_library_cvar.get() is not None
    ):
        return bool(_sniffio.current_async_library() == "asyncio")
    return asyncio._get_running_loop() is not None


async def _send_error(send: Send, failure: Exception) -> int:
    if isinstance(failure, ResponseError):
        status, message = failure.status_code, failure.message
    else:
        logger.error("event stream producer failed before its first event", exc_info=failure)
        status, message = 500, "internal error"
    body = _encode_json({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status
