"""One LayerCode turn: an agent's replies become the SSE events of PROTOCOL.md section 4.

:class:`Turn` runs an agent (pull style: the agent yields replies) or a handler (push style,
like LayerCode's Node SDK: the handler calls ``stream.tts(...)``) and emits, for the turn's
``turn_id``::

    data: {"type":"response.tts","content":"Hello","turn_id":"t1"}
    data: {"type":"response.data","content":{...},"turn_id":"t1"}
    data: {"type":"response.hangup","turn_id":"t1"}
    data: {"type":"response.error","error":"agent error","turn_id":"t1"}
    data: {"type":"response.end","turn_id":"t1"}

Guarantees (docs/agent-contract.md): ``response.end`` exactly once and last; back-pressure
(the agent resumes once the server took its event); a disconnect cancels the agent at its
current ``await`` (it runs in the request's own task) and nothing more is sent.
:func:`stream_turn` and :func:`stream_response` wrap a turn in an
:class:`~layercode_asgi.sse.EventStreamResponse` for any route handler.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import anyio
import msgspec
from starlette.responses import JSONResponse, Response

from ._asgi import must_propagate
from .agents import Agent, Data, Hangup, Tts, TurnContext, TurnEvent, bind_agent
from .conversation import HistoryMessage
from .conversation.base import valid_text
from .errors import check_callable, check_seconds, check_text, check_type
from .events import (
    InvalidPayloadError,
    MessagePayload,
    SessionStartPayload,
    UnknownEventError,
    WebhookPayload,
    parse_webhook_payload,
)
from .jsonwire import encode_json  # msgspec, with U+2028 & co. escaped: one line per event
from .logs import cut_log_value, escape_log_value
from .sse import EventStreamResponse

__all__ = [
    "StreamHandler",
    "Turn",
    "TurnStatus",
    "TurnStream",
    "stream_response",
    "stream_turn",
]

logger = logging.getLogger("layercode_asgi.turns")

#: How long an agent stopped before its end (cancelled, timed out or failed) may take to run
#: its own cleanup (``aclose()``: its ``finally`` blocks), shielded from the cancellation.
AGENT_CLOSE_TIMEOUT = 1.0
#: The ``error`` text of ``response.error``. Exception details go to the log, not the wire.
AGENT_ERROR_MESSAGE = "agent error"
#: Default ``grace`` of a turn: how long its last events may take once its time is up.
DEFAULT_TURN_GRACE = 1.0
TIMEOUT_ERROR_MESSAGE = "turn timed out"
_NOT_RUNNING = "this turn is not running (Turn.run() was not called or ended)"

_TTS = b'data: {"type":"response.tts","content":'
_DATA = b'data: {"type":"response.data","content":'
_HANGUP = b'data: {"type":"response.hangup"'
_HANGUP_CONTENT = b'data: {"type":"response.hangup","content":'
_ERROR = b'data: {"type":"response.error","error":'
_END = b'data: {"type":"response.end"'


def _describe_non_reply(value: Any) -> str:
    """What a turn's log says when an agent returned ``value``, which is not a reply: its
    repr, cut at 80 characters as :func:`~layercode_asgi.logs.cut_log_value` cuts (secrets
    masked first: a secret across the cut would leave its prefix)."""
    try:
        shown = cut_log_value(repr(value), 80)
    except Exception:  # an int beyond 4300 digits, a __repr__ that raises
        shown = f"<unprintable {type(value).__name__}>"
    return (
        f"the agent returned {type(value).__name__} {shown}; expected an async iterable of "
        "replies (an async generator function), or an awaitable (a coroutine function) giving "
        "None, a reply, a list of replies or an async iterable of them; a reply is a str, "
        "Tts, Data or Hangup"
    )


class TurnStatus(enum.StrEnum):
    """How a turn ended."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    DISCONNECTED = "disconnected"
    ABORTED = "aborted"


class TurnStream:
    """The Node-SDK-style handle of a push-style turn: ``await stream.tts("Hi")``.

    Every method waits until the server took the event (back-pressure). :meth:`end` is
    idempotent; after it, sending raises ``RuntimeError``. If the handler returns without
    calling :meth:`end`, the turn ends it.
    """

    __slots__ = ("_turn",)

    def __init__(self, turn: Turn) -> None:
        self._turn = turn

    @property
    def event(self) -> TurnEvent:
        return self._turn.event

    @property
    def context(self) -> TurnContext:
        return self._turn.context

    async def tts(self, text: str) -> None:
        """Speak ``text`` (``response.tts``)."""
        await self._turn.deliver(Tts(text))

    async def data(self, content: Any) -> None:
        """Send ``content`` to the browser (``response.data``)."""
        await self._turn.deliver(Data(content))

    async def hangup(self, content: Any = None) -> None:
        """End the call (``response.hangup``)."""
        await self._turn.deliver(Hangup(content))

    async def tts_stream(self, chunks: AsyncIterable[str]) -> str:
        """Speak every chunk of ``chunks`` as it arrives (whitespace alone with the next
        chunk, never as a ``response.tts`` of its own); return the whole text."""
        spoken: list[str] = []
        waiting = ""  # whitespace not sent yet
        async for chunk in chunks:
            spoken.append(chunk)
            if isinstance(chunk, str) and chunk.isspace():
                waiting += chunk
            elif chunk:
                await self._turn.deliver(Tts(waiting + chunk if waiting else chunk))
                waiting = ""
        return "".join(spoken)

    async def end(self) -> None:
        """Send ``response.end`` (once; later calls do nothing)."""
        await self._turn.end()

    @property
    def ended(self) -> bool:
        return self._turn.ended


#: A push-style handler: ``async def handler(stream): await stream.tts("Hi")``.
StreamHandler: TypeAlias = Callable[[TurnStream], Awaitable[None]]


class Turn:
    """One turn of one conversation: runs the agent and emits the SSE events.

    Args:
        event: the ``session.start`` or ``message`` event opening the turn.
        agent: a pull-style agent (see :mod:`layercode_asgi.agents`); or None with
        handler: a push-style handler receiving a :class:`TurnStream`.
        history: the conversation's earlier messages, for ``context.history``.
        extras: application objects for ``context.extras``.
        timeout: seconds the whole turn may take (agent, encoding and sending, up to the
            last byte); None = no limit. It counts from ``started_at`` (an
            ``anyio.current_time()``; default: when :meth:`run` starts).
        timeout_message: spoken when the timeout hits; without it (or blank) ``response.error``.
        grace: once the time is up (or the turn is aborted), how long the fallback or
            ``response.error`` and ``response.end`` may take to send; then :meth:`run`
            returns (the client is not reading: the stream is closed).

    Raises ``ValueError`` when ``timeout`` is not a finite number > 0 (or None) or
    ``grace`` not a finite number > 0, and when ``timeout_message`` is not a ``str``
    (``TypeError``) or not valid text.

    After :meth:`run`, :attr:`status`, :attr:`spoken` (the ``response.tts`` texts actually
    emitted) and :attr:`error` describe what happened; :attr:`first_tts_at` is the
    ``time.perf_counter()`` when the server took the first ``response.tts`` (or None).
    """

    __slots__ = (
        "_abort",
        "_call",
        "_emit",
        "_handler",
        "_response",
        "_scope",
        "_suffix",
        "before_end",
        "context",
        "ended",
        "error",
        "event",
        "first_tts_at",
        "grace",
        "spoken",
        "started_at",
        "status",
        "timeout",
        "timeout_message",
    )

    def __init__(
        self,
        event: TurnEvent,
        agent: Agent | None = None,
        *,
        handler: StreamHandler | None = None,
        history: Sequence[HistoryMessage] = (),
        extras: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        timeout_message: str | None = None,
        grace: float = DEFAULT_TURN_GRACE,
        started_at: float | None = None,
    ) -> None:
        if (agent is None) == (handler is None):
            raise TypeError("Turn needs exactly one of agent= or handler=")
        check_seconds("timeout", timeout, zero=False, none=True)
        check_seconds("grace", grace, zero=False, none=False)
        check_text("timeout_message", timeout_message)
        self.event = event
        self._call = bind_agent(agent).call if agent is not None else None
        self._handler = handler
        self.grace = grace
        self.started_at = started_at
        self.context = TurnContext(event, history, {} if extras is None else extras)
        self.timeout = timeout
        self.timeout_message = timeout_message
        turn_id = event.turn_id
        if isinstance(turn_id, str):  # from a mapping: maybe a str subclass, or half an emoji
            turn_id = valid_text(str.__str__(turn_id))
        self._suffix = b',"turn_id":' + encode_json(turn_id) + b"}\n\n"
        self._emit: Callable[[bytes], Awaitable[None]] | None = None
        self._response: EventStreamResponse | None = None  # whose emit ``emit`` is
        self.spoken: list[str] = []
        self.first_tts_at: float | None = None
        self.status = TurnStatus.RUNNING
        self.error: BaseException | None = None
        self.ended = False
        self._abort: str | None = None
        self._scope: anyio.CancelScope | None = None
        #: Awaited once, by :meth:`end`, just before ``response.end`` (the webhook records then).
        self.before_end: Callable[[Turn], Awaitable[None]] | None = None

    def abort(self, message: str) -> None:
        """Stop the running turn now (e.g. the server is shutting down): its agent is
        cancelled and the stream ends with ``response.error`` (``message``) and
        ``response.end``. Call it from the turn's event loop; no effect once it ended.
        A ``message`` that is not a ``str`` of valid text raises ``TypeError``/``ValueError``."""
        check_text("message", message)
        if self.status is not TurnStatus.RUNNING or self._abort is not None:
            return
        self._abort = message
        if self._scope is not None:
            self._scope.cancel()

    @property
    def reply_text(self) -> str:
        """Everything spoken this turn, concatenated as emitted."""
        return "".join(self.spoken)

    async def run(self, emit: Callable[[bytes], Awaitable[None]]) -> None:
        """Run the turn, emitting its events through ``emit``; ``response.end`` comes last.

        ``emit(chunk)`` sends one chunk and returns once it was taken: an
        :class:`~layercode_asgi.sse.EventStreamResponse`'s own (``response.end`` then ends
        the body in the same write) or any async callable of yours. The deadline covers the
        agent and every send. When it passes (or on :meth:`abort`) the agent is cancelled;
        the fallback or ``response.error`` and ``response.end`` get :attr:`grace` seconds to
        go out, then it returns all the same.
        """
        self._emit = emit
        response = getattr(emit, "__self__", None)  # emit: an EventStreamResponse's own?
        self._response = response if isinstance(response, EventStreamResponse) else None
        started = anyio.current_time() if self.started_at is None else self.started_at
        deadline = math.inf if self.timeout is None else started + self.timeout
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                self._scope = scope
                if self._abort is None:
                    try:
                        await self._run_agent()
                    except BaseException as exc:  # a CancelledError of the agent's own too
                        if must_propagate(exc):
                            raise
                        await self._failed(exc, scope.cancel_called)
                    # An agent that caught its cancellation returns (or raises in its cleanup):
                    # it timed out (or was aborted) all the same.
                    if not scope.cancel_called:
                        await self.end()
            if not self.ended and (scope.cancel_called or self._abort is not None):
                with anyio.move_on_after(self.grace) as last:
                    await self._stopped()
                    await self.end()
                if last.cancelled_caught:
                    if self._response is not None:  # the grace bounded the close: not twice
                        self._response.close_timeout = 0
                    logger.warning(
                        "turn's last events not sent within %ss (the client is not reading) %s",
                        self.grace,
                        self._ids(),
                        extra=self._extra(),
                    )
            elif scope.cancelled_caught and self.status is TurnStatus.RUNNING:
                # The deadline (or abort) cut the write of response.end itself: the end is
                # not resent (its first write may have been partly taken); this only logs.
                await self._stopped()
            elif self.status is TurnStatus.RUNNING:
                self.status = TurnStatus.COMPLETED
        except anyio.get_cancelled_exc_class():
            self.status = TurnStatus.DISCONNECTED
            raise
        finally:
            # Nothing is emitted after the turn; dropping ``emit`` also breaks the
            # response -> producer -> turn -> emit reference cycle.
            self._emit = self._response = None
            self._scope = None

    async def _run_agent(self) -> None:
        if self._handler is not None:
            await self._handler(TurnStream(self))
            return
        assert self._call is not None
        result = self._call(self.event, self.context)
        if not hasattr(result, "__aiter__"):
            if not hasattr(result, "__await__"):
                raise TypeError(_describe_non_reply(result))
            result = await result
            if not hasattr(result, "__aiter__"):
                for item in _as_replies(result):
                    await self.deliver(item)
                return
        iterator = result.__aiter__()
        try:
            async for item in iterator:
                await self.deliver(item)
        except BaseException:
            await self._close(iterator)
            raise

    async def _close(self, iterator: Any) -> None:
        """Run a stopped agent's own cleanup (``aclose``), shielded from this turn's
        cancellation; what ``aclose`` raises is logged (why the agent stopped goes on)."""
        aclose = getattr(iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(AGENT_CLOSE_TIMEOUT, shield=True):
            try:
                await aclose()
            except BaseException as exc:
                if must_propagate(exc):
                    raise
                logger.exception("agent raised while closing %s", self._ids())

    async def deliver(self, item: Any) -> None:
        """Emit one reply (``str``, :class:`Tts`, :class:`Data` or :class:`Hangup`)."""
        if self.ended:
            raise RuntimeError("this turn already sent response.end")
        if isinstance(item, str | Tts):
            text = item if isinstance(item, str) else item.content
            if not isinstance(text, str):
                raise TypeError(f"Tts content must be a str, got {type(text).__name__}")
            if not text:
                return
            emit = self._emit  # ``_send``, inlined on the path every reply takes
            if emit is None:
                raise RuntimeError(_NOT_RUNNING)
            try:
                chunk = _TTS + encode_json(text) + self._suffix
            except (UnicodeEncodeError, TypeError):  # half an emoji: as U+FFFD; a str subclass
                text = valid_text(str.__str__(text))
                chunk = _TTS + encode_json(text) + self._suffix
            await emit(chunk)
            if not self.spoken:
                self.first_tts_at = time.perf_counter()  # for the metrics
            self.spoken.append(text)
        elif isinstance(item, Data):
            await self._send(_DATA + encode_content(item.content) + self._suffix)
        elif isinstance(item, Hangup):
            if item.content is None:
                await self._send(_HANGUP + self._suffix)
            else:
                await self._send(_HANGUP_CONTENT + encode_content(item.content) + self._suffix)
        else:
            raise TypeError(
                f"an agent yielded {type(item).__name__}; expected str, Tts, Data or Hangup"
            )

    async def end(self) -> None:
        """Emit ``response.end`` unless it was already emitted."""
        if not self.ended:
            emit = self._emit
            if emit is None:
                raise RuntimeError(_NOT_RUNNING)
            hook, self.before_end = self.before_end, None
            if hook is not None:
                await hook(self)
            self.ended = True
            if self._response is not None:
                await self._response.emit(_END + self._suffix, last=True)
            else:
                await emit(_END + self._suffix)

    async def _send(self, chunk: bytes) -> None:
        emit = self._emit
        if emit is None:
            raise RuntimeError(_NOT_RUNNING)
        await emit(chunk)

    async def _failed(self, exc: BaseException, stopped: bool) -> None:
        """``stopped``: the agent raised once its time was up (or the turn aborted): logged,
        and the turn ends as timed out (or aborted), not as failed."""
        self.error = exc
        logger.error(
            "agent failed %s: %s: %s",
            self._ids(),
            type(exc).__name__,
            escape_log_value(exc),
            exc_info=exc,
            extra=self._extra(),
        )
        if stopped and not self.ended:
            return  # run() sends the fallback (or response.error) and the end
        self.status = TurnStatus.FAILED
        if not self.ended:
            await self._send(_ERROR + encode_json(AGENT_ERROR_MESSAGE) + self._suffix)

    async def _stopped(self) -> None:
        """Log why the turn was stopped (the timeout or :meth:`abort`) and, unless it ended,
        send the fallback or ``response.error``."""
        aborted = self._abort
        if aborted is not None:
            self.status = TurnStatus.ABORTED
            logger.warning("turn aborted (%s) %s", aborted, self._ids(), extra=self._extra())
        else:
            self.status = TurnStatus.TIMED_OUT
            logger.warning(
                "turn timed out after %ss %s", self.timeout, self._ids(), extra=self._extra()
            )
        if self.ended:
            return
        fallback = self.timeout_message  # (an abort has none)
        if aborted is None and fallback and not fallback.isspace():  # blank: none
            await self.deliver(Tts(fallback))
        else:
            error = TIMEOUT_ERROR_MESSAGE if aborted is None else aborted
            await self._send(_ERROR + encode_json(error) + self._suffix)

    def _ids(self) -> str:
        event = self.event
        return (
            f"(conversation={escape_log_value(event.conversation_id)} "
            f"turn={escape_log_value(event.turn_id)})"
        )

    def _extra(self) -> dict[str, str]:
        return {"conversation_id": self.event.conversation_id, "turn_id": self.event.turn_id}


def encode_content(content: Any) -> bytes:
    """``content`` as ``response.data`` sends it (the webhook's ``on_data`` answer too): text
    UTF-8 cannot hold with U+FFFD, a ``str``/``int``/``float`` subclass as its plain value,
    NaN and infinities as null (msgspec's rule); anything JSON cannot carry: ``TypeError``."""
    try:
        try:
            return encode_json(content)
        except (UnicodeEncodeError, TypeError):  # half an emoji: as U+FFFD; str subclasses
            return encode_json(_valid_texts(msgspec.to_builtins(content, enc_hook=_plain)))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise TypeError(f"reply content is not JSON-serialisable: {exc}") from exc


def _plain(value: Any) -> Any:
    """msgspec's ``enc_hook``: a ``str``, ``int`` or ``float`` subclass as its plain value."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    raise TypeError(f"Encoding objects of type {type(value).__name__} is unsupported")


def _valid_texts(value: Any) -> Any:
    """``value`` (built-in types only) with every text and key made :func:`valid_text`."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list | tuple):
        return [_valid_texts(item) for item in value]
    if isinstance(value, dict):
        return {_valid_texts(key): _valid_texts(item) for key, item in value.items()}
    return value


def _as_replies(value: Any) -> Iterable[Any]:
    """What a coroutine agent returned, as replies: None, one reply, or an iterable."""
    if value is None:
        return ()
    if isinstance(value, str | Tts | Data | Hangup):
        return (value,)
    if isinstance(value, list | tuple):
        return value
    raise TypeError(_describe_non_reply(value))


def stream_turn(
    event: WebhookPayload | bytes | str,
    agent: Agent,
    *,
    history: Sequence[HistoryMessage] = (),
    extras: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    timeout_message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The SSE response answering ``event`` with ``agent``. An event that opens no turn
    (``data``, ``session.*``) is answered as ``create_app`` does without hooks: 200
    ``{"status": "ok"}`` (JSON), calling no agent."""
    return _stream(event, agent, None, history, extras, timeout, timeout_message, headers)


def stream_response(
    event: WebhookPayload | bytes | str,
    handler: StreamHandler,
    *,
    history: Sequence[HistoryMessage] = (),
    extras: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    timeout_message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Node-SDK style: ``handler(stream)`` calls ``stream.tts(...)``; an event that opens
    no turn is answered as by :func:`stream_turn`."""
    return _stream(event, None, handler, history, extras, timeout, timeout_message, headers)


def _stream(
    event: WebhookPayload | bytes | str,
    agent: Agent | None,
    handler: StreamHandler | None,
    history: Sequence[HistoryMessage],
    extras: Mapping[str, Any] | None,
    timeout: float | None,
    timeout_message: str | None,
    headers: Mapping[str, str] | None,
) -> Response:
    """One :class:`Turn` in one :class:`EventStreamResponse`. A raw body ``event`` of an
    unknown type is answered 200 ``{"status": "ignored"}``, a malformed one 400 ``{"error",
    "path"}``, as ``create_app`` answers them; a dict, None, ...: ``TypeError``."""
    check_seconds("timeout", timeout, zero=False, none=True)  # on every event, turn or not
    check_callable("handler", handler)
    check_type("extras", extras, Mapping | None, "a mapping or None")
    if isinstance(history, str) or not isinstance(history, Sequence):
        raise TypeError(f"history must be a list of HistoryMessage, got {type(history).__name__}")
    for message in history:
        check_type("history", message, HistoryMessage, "a list of HistoryMessage")
    if isinstance(event, bytes | str):
        try:
            event = parse_webhook_payload(event)
        except UnknownEventError as exc:
            logger.warning("ignoring webhook of unknown type %s", escape_log_value(exc.event_type))
            return Response(b'{"status":"ignored"}', media_type="application/json")
        except InvalidPayloadError as exc:
            logger.info("rejected malformed webhook: %s", escape_log_value(exc))
            return JSONResponse({"error": str(exc), "path": exc.path}, status_code=400)
    elif not isinstance(event, WebhookPayload):
        raise TypeError(
            "event must be the raw request body (bytes or str) or a parsed event "
            f"(parse_webhook_payload), got {type(event).__name__}"
        )
    if not isinstance(event, SessionStartPayload | MessagePayload):
        return Response(b'{"status":"ok"}', media_type="application/json")
    turn = Turn(
        event,
        agent,
        handler=handler,
        history=history,
        extras=extras,
        timeout=timeout,
        timeout_message=timeout_message,
    )
    return EventStreamResponse(turn.run, headers=headers, close_timeout=turn.grace)
