"""``LayercodeWebhook``: answer every LayerCode webhook event the way ``create_app`` does."""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._asgi import (
    CLIENT_LEFT,
    BodyTimeout,
    BodyTooLarge,
    JSONResponse,
    answer_lifespan,
    compressed,
    compressed_body_response,
    error_response,
    json_error,
    json_error_response,
    must_propagate,
    read_body,
    send_json_error,
)
from .agents import Agent, TurnEvent, bind_agent
from .conversation import (
    DEFAULT_LOCK_WAIT_GRACE,
    ConversationBackend,
    ConversationLockTimeout,
    HistoryMessage,
    StoreError,
    check_conversation_id,
    lock_wait_timeout,
)
from .conversation.manager import read_for_turn, record_for_turn, webhook_conversations
from .errors import (
    RETRY_AFTER_SECONDS,
    LayercodeError,
    ResponseError,
    check_callable,
    check_positive_int,
    check_seconds,
    check_text,
    check_type,
)
from .events import (
    DataPayload,
    InvalidPayloadError,
    MessagePayload,
    SessionEndPayload,
    SessionStartPayload,
    SessionUpdatePayload,
    UnknownEventError,
    WebhookPayload,
    parse_webhook_payload,
)
from .logs import (
    escape_error,
    escape_log_value,
    log_refused,
    log_slow_body,
    log_webhook,
    webhook_log_enabled,
)
from .metrics import TurnMetrics, answered_status
from .middleware import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_SIZE
from .sse import Emit, EventStreamResponse
from .turns import DEFAULT_TURN_GRACE, Turn, encode_content

__all__ = ["ConversationBackend", "EventHook", "JSONResponse", "LayercodeWebhook"]

logger = logging.getLogger("layercode_asgi.webhook")

#: Default bound of the turns waiting for one conversation (per process).
DEFAULT_MAX_QUEUED_TURNS = 8
#: What ``abort_turns`` says by default (``run_server`` when its grace period is over).
SHUTTING_DOWN = "server is shutting down"
_TOO_MANY_WAITING = "too many turns waiting for this conversation; retry later"
_NOT_POST = json_error(405, "method not allowed; use POST", headers=[(b"allow", b"POST")])
_OK = b'{"status":"ok"}'
_IGNORED = b'{"status":"ignored"}'
#: The log line's extra field of a request whose client left before the answer ended.
_LEFT: dict[str, Any] = {"outcome": "disconnected"}
_NO_EXTRA: dict[str, Any] = {}


#: A hook for the JSON-answered events (``on_data=``, ``on_session_update=``, ``on_session_end=``):
#: called with the event; sync or async; what ``on_data`` returns is the JSON answer.
EventHook = Callable[[Any], Any]


class LayercodeWebhook:
    """Answers LayerCode webhooks with an agent.

    An ASGI app (``Route("/api/agent", webhook)``, behind
    :class:`~layercode_asgi.middleware.LayercodeSignature`), or called from your own route
    handler in any framework::

        webhook = LayercodeWebhook(agent)

        @app.post("/api/agent")                       # FastAPI / Starlette
        async def agent_route(request: Request):
            return await webhook.respond(await request.body())

    What it answers (the body must already be verified — mount the middleware):

    * ``session.start`` / ``message``: the agent's SSE reply (:mod:`layercode_asgi.turns`).
      With a conversation store, the turn holds the conversation's lock from before it reads
      the history until it has recorded the user's text and the reply, just before its
      ``response.end`` (a client that saw the end finds the turn in the history) -- unless
      the conversation ended meanwhile. A turn waits for the previous one at most
      ``lock_timeout`` (then 503); at most ``max_queued_turns`` turns of a conversation wait
      at a time (more: 503 at once), each keeping only its raw body.
    * ``data``: JSON, what ``on_data(event)`` returns, else ``{"status": "ok"}``.
    * ``session.update`` / ``session.end``: ``on_session_update`` / ``on_session_end``, then
      ``{"status": "ok"}``; ``session.end`` also clears the history unless ``keep_history``
      (at once: a turn still running will not record).
    * a malformed body: 400 ``{"error": …, "path": "$.field"}``; an event type newer than this
      library: 200 ``{"status": "ignored"}`` and a warning in the log. With a conversation
      store, a ``conversation_id`` it refuses (empty, over 512 characters) is a 400 on every event.

    Args:
        agent: the agent (a plain async callable, see :mod:`layercode_asgi.agents`).
        conversations: where history lives and turns are serialised (e.g. a
            ``ConversationManager``). Default ``"memory"``: a new bounded in-memory
            ``ConversationManager`` (one process), as ``create_app`` without Redis;
            ``None`` keeps no history and takes no lock.
        on_data: hook (sync or async) called with each ``data`` event; what it returns is
            the JSON reply (``None``: ``{"status": "ok"}``).
        on_session_update: hook (sync or async) called with each ``session.update`` event.
        on_session_end: hook (sync or async) called with each ``session.end`` event.
        turn_timeout: seconds a turn may take; ``None`` = no limit.
        timeout_message: spoken when a turn times out (if blank or None: ``response.error``).
        turn_grace: once a turn's time is up, how long its fallback (or ``response.error``)
            and ``response.end`` may take to send (> 0); then its stream is closed and its
            lock released (a client that stops reading does not hold its conversation).
        keep_history: keep a conversation's history after ``session.end``.
        lock_timeout: seconds a turn waits for the previous turn of its conversation before
            it is answered 503. Default ``None``: ``turn_timeout + lock_wait_grace`` (the turn
            ahead may take its whole timeout, then send its final events and record; a turn's
            own timeout starts once it holds the lock); no limit when ``turn_timeout`` is
            ``None``.
        lock_wait_grace: see ``lock_timeout``.
        max_queued_turns: turns of one conversation that may wait behind the running one
            (in this process); one more is answered 503 at once.
        extras: objects handed to agents as ``context.extras``.
        max_body_size: body limit (413) when used as an ASGI app, as the middleware's.
        body_timeout: seconds the body may take to arrive then (408); ``None``: no limit.
        metrics: a :class:`~layercode_asgi.metrics.TurnMetrics` measuring each request
            (first tts, duration, lock wait, outcome); ``None``: nothing is measured.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        conversations: ConversationBackend | Literal["memory"] | None = "memory",
        on_data: EventHook | None = None,
        on_session_update: EventHook | None = None,
        on_session_end: EventHook | None = None,
        turn_timeout: float | None = 30.0,
        timeout_message: str | None = None,
        turn_grace: float = DEFAULT_TURN_GRACE,
        keep_history: bool = False,
        lock_timeout: float | None = None,
        lock_wait_grace: float = DEFAULT_LOCK_WAIT_GRACE,
        max_queued_turns: int = DEFAULT_MAX_QUEUED_TURNS,
        extras: Mapping[str, Any] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        metrics: TurnMetrics | None = None,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        if not callable(agent):
            raise TypeError(f"agent must be an async callable, got {type(agent).__name__}")
        self.agent = agent
        # Bound once: an agent that cannot be called as one fails here, not per turn.
        self._bound = bind_agent(agent)
        check_positive_int(max_queued_turns, "max_queued_turns", zero=True)
        check_positive_int(max_body_size, "max_body_size")
        check_seconds("body_timeout", body_timeout, zero=False, none=True)
        check_seconds("turn_timeout", turn_timeout, zero=False, none=True)
        check_seconds("turn_grace", turn_grace, zero=False, none=False)
        check_seconds("lock_timeout", lock_timeout, zero=True, none=True)
        check_seconds("lock_wait_grace", lock_wait_grace, zero=True, none=False)
        check_text("timeout_message", timeout_message)
        check_callable("on_data", on_data)
        check_callable("on_session_update", on_session_update)
        check_callable("on_session_end", on_session_end)
        check_type("extras", extras, Mapping | None, "a mapping or None")
        check_type("metrics", metrics, TurnMetrics | None, "a TurnMetrics or None")
        self.conversations: ConversationBackend | None = webhook_conversations(conversations)
        self.on_data = on_data
        self.on_session_update = on_session_update
        self.on_session_end = on_session_end
        self.turn_timeout = turn_timeout
        self.timeout_message = timeout_message
        self.turn_grace = turn_grace
        check_type("keep_history", keep_history, bool, "a bool")
        self.keep_history = keep_history
        if lock_timeout is None:
            lock_timeout = lock_wait_timeout(turn_timeout, lock_wait_grace)
        self.lock_timeout = lock_timeout
        self.max_queued_turns = max_queued_turns
        # Turns of each conversation waiting for or holding its lock (generic stores).
        self._pending: dict[str, int] = {}
        # What abort_turns() ends: the running turns, the waits for a lock, the hooks.
        self._running: set[Turn] = set()
        self._waiting: set[anyio.CancelScope] = set()
        self._abort_message = SHUTTING_DOWN  # what the last abort_turns() said
        self.extras: Mapping[str, Any] = {} if extras is None else extras
        self.max_body_size = max_body_size
        self._too_large = json_error(413, f"request body exceeds {max_body_size} bytes", close=True)
        self._body_timeout = math.inf if body_timeout is None else float(body_timeout)
        self._timed_out = json_error(
            408, f"request body not received within {body_timeout} s", close=True
        )
        self.metrics = metrics

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            elif scope["type"] == "lifespan":
                await answer_lifespan(receive, send)
            return
        if scope["method"] != "POST":
            await send_json_error(send, _NOT_POST)
            return
        try:
            body = await read_body(receive, self.max_body_size, self._body_timeout)
        except BodyTooLarge:  # the rest may still be on the wire: the 413 closes the connection
            log_refused(logger, scope, f"request body exceeds {self.max_body_size} bytes")
            await send_json_error(send, self._too_large)
        except BodyTimeout:
            log_slow_body(logger, scope, self._body_timeout)
            await send_json_error(send, self._timed_out)
        else:  # None: the client left, answered for middleware outside
            await (
                send_json_error(send, CLIENT_LEFT)
                if body is None
                else self.answer(body, scope, receive, send)
            )

    async def answer(self, body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a POST whose whole (verified) body was read already (``create_app``'s route
        gets it from the signature check); ``receive`` only notices the client leaving. Logs
        the request."""
        started = time.perf_counter()
        response, event, refused = await self._respond(body, scope)
        unknown = None
        if isinstance(event, UnknownEventError):  # for the log line, not a metrics label
            unknown, event = event, None
        # Keep what the log line needs, not the event: a waiting turn keeps no decoded copy.
        kind = None if event is None else str(event.type)
        conversation_id = None if event is None else event.conversation_id
        turn_id = getattr(event, "turn_id", None)
        event = None
        metrics = self.metrics  # metrics: one record per request, only when enabled
        measured = (
            None if metrics is None else metrics.arrived(started, kind, conversation_id, turn_id)
        )
        try:
            await response(scope, receive, send)
        finally:
            if measured is not None:
                measured.finish(response)
            status = answered_status(response)
            if not refused:  # a turn's: known once it ran
                producer = getattr(response, "producer", None)
                refused = isinstance(producer, _TurnProducer) and producer.refused
            if webhook_log_enabled(status, refused=refused):
                log_webhook(
                    kind if unknown is None else unknown.event_type,
                    conversation_id if unknown is None else unknown.conversation_id,
                    turn_id,
                    status,
                    time.perf_counter() - started,
                    first_tts_s=None if measured is None else measured.first_tts,
                    refused=refused,
                    **(_LEFT if getattr(response, "disconnected", False) else _NO_EXTRA),
                )

    # -- framework-neutral entry point --------------------------------------------------------

    async def respond(self, body: bytes | str | Mapping[str, Any]) -> Response:
        """Return the response to a webhook whose (verified) body is ``body``."""
        return (await self._respond(body))[0]

    async def _respond(
        self, body: bytes | str | Mapping[str, Any], scope: Scope | None = None
    ) -> tuple[Response, WebhookPayload | UnknownEventError | None, bool]:
        """The response; what it answered: the event, an unknown event's error, or None; and
        whether it is a 503 given by design (a busy conversation, shutting down: logged as a
        refusal, not a failure; a turn's is known once it ran, see ``_TurnProducer``).
        ``scope``: the request's, read for its ``Content-Encoding`` when the body is bad."""
        try:
            event = parse_webhook_payload(body)
        except UnknownEventError as exc:
            logger.warning("ignoring webhook of unknown type %s", escape_log_value(exc.event_type))
            return Response(_IGNORED, media_type="application/json"), exc, False
        except InvalidPayloadError as exc:
            encoding = None if scope is None else compressed(scope)
            if encoding is not None:  # unreadable because compressed: say so
                logger.info(
                    "rejected compressed webhook (Content-Encoding: %s): 415",
                    escape_log_value(encoding),
                )
                return compressed_body_response(), None, False
            logger.info("rejected malformed webhook: %s", escape_log_value(exc))
            invalid = JSONResponse({"error": str(exc), "path": exc.path}, status_code=400)
            return invalid, None, False

        if isinstance(event, SessionStartPayload | MessagePayload):
            return self.turn_response(event, body=body), event, False
        hook = anyio.CancelScope()  # abort_turns() ends it (503), as a turn waiting for its lock
        self._waiting.add(hook)
        try:
            with hook:
                return await self._answer_json(event), event, False
        except ResponseError as exc:
            return error_response(exc), event, False
        except (StoreError, ConversationLockTimeout) as exc:  # a hook's use of a store too
            busy = isinstance(exc, ConversationLockTimeout)
            return error_response(_unavailable(exc, f"webhook {event.type!s} failed")), event, busy
        except BaseException as exc:  # a hook's own kind too, as an agent's in a turn
            if must_propagate(exc):
                raise
            logger.exception(
                "webhook hook failed for %s (conversation=%s)",
                str(event.type),
                escape_log_value(event.conversation_id),
            )
            return json_error_response(500, f"{event.type!s} handler failed"), event, False
        finally:
            self._waiting.discard(hook)
        return error_response(self._aborted()), event, True

    async def _answer_json(self, event: WebhookPayload) -> Response:
        conversations = self.conversations
        if conversations is not None:  # the store's limit, on every event as on turns
            try:
                check_conversation_id(event.conversation_id)
            except ValueError as exc:
                raise _invalid_id(exc) from exc
        if isinstance(event, DataPayload):
            hook = self.on_data
        elif isinstance(event, SessionUpdatePayload):
            hook = self.on_session_update
        else:
            hook = self.on_session_end
        result = None if hook is None else hook(event)
        if inspect.isawaitable(result):
            result = await result
        if (
            isinstance(event, SessionEndPayload)
            and not self.keep_history
            and conversations is not None
        ):
            # Not behind the lock: a running turn will not record (the generation moved on).
            try:
                await conversations.clear(event.conversation_id)
            except ValueError as exc:
                raise _invalid_id(exc) from exc
            except LayercodeError as exc:
                raise _unavailable(exc, "conversation store failed clearing the history") from exc
        if result is None or not isinstance(event, DataPayload):  # on_data's result answers
            return Response(_OK, media_type="application/json")
        if isinstance(result, Response):
            return result
        try:  # as a turn's response.data: a hook echoing the client's broken text is no 500
            return Response(encode_content(result), media_type="application/json")
        except TypeError as exc:
            logger.error(
                "on_data returned a value JSON cannot carry (conversation=%s): %s",
                escape_log_value(event.conversation_id),
                escape_error(exc),
            )
            return json_error_response(500, "data handler returned a value JSON cannot carry")

    def turn_response(
        self, event: TurnEvent, *, body: bytes | str | Mapping[str, Any] | None = None
    ) -> EventStreamResponse:
        """The SSE response of one turn, with history and the conversation lock if any.

        ``body``: what ``event`` was decoded from; a turn that waits for its conversation
        keeps only ``body``, and decodes it again once it holds the lock.
        """
        # A client that stopped reading gets the turn's grace for the final frame too.
        return EventStreamResponse(_TurnProducer(self, event, body), close_timeout=self.turn_grace)

    def _start_turn(
        self, event: TurnEvent, history: Sequence[HistoryMessage], locked_at: float | None
    ) -> Turn:
        """A turn abort_turns() can reach (the caller discards it from ``_running`` after it
        ran); its deadline counts from ``locked_at`` (an ``anyio.current_time()``)."""
        turn = Turn(
            event,
            self._bound,
            history=history,
            extras=self.extras,
            timeout=self.turn_timeout,
            timeout_message=self.timeout_message,
            grace=self.turn_grace,
            started_at=locked_at,
        )
        self._running.add(turn)
        if self.metrics is not None:
            self.metrics.turn_started(turn)
        return turn

    # -- shutting down ------------------------------------------------------------------------

    def abort_turns(self, message: str = SHUTTING_DOWN) -> None:
        """End every open turn now (``run_server`` calls it when its grace period is over).

        A running turn stops its agent, ends its stream with ``response.error`` (``message``:
        a ``str`` of valid text) and ``response.end``, and records what was spoken; a turn
        still waiting for its conversation or reading its history, and a running ``data`` /
        ``session.*`` hook, are answered 503 ``{"error": message}``. Call it from the turns'
        event loop."""
        check_text("message", message)
        self._abort_message = message
        for scope in list(self._waiting):
            scope.cancel()
        for turn in list(self._running):
            turn.abort(message)

    def _aborted(self) -> ResponseError:
        """The 503 of a waiting turn (or hook) ended by :meth:`abort_turns`."""
        return ResponseError(503, self._abort_message, retry_after=RETRY_AFTER_SECONDS)


class _TurnProducer:
    """One turn's producer: wait for the conversation's lock, run the turn, record it.

    An object, not closures: every object an open turn keeps alive is work for the garbage
    collector, whose pauses are the tail of the paced benchmark. ``refused``: it was answered
    503 by design (too many turns waiting, its wait timed out, ``abort_turns``), which its
    log line says as a refusal (WARNING), not as a failure.
    """

    __slots__ = ("body", "event", "generation", "refused", "webhook")

    def __init__(
        self,
        webhook: LayercodeWebhook,
        event: TurnEvent,
        body: bytes | str | Mapping[str, Any] | None,
    ) -> None:
        self.webhook = webhook
        self.event: TurnEvent | None = event
        self.body = body
        self.generation: int | None = None  # the history's, read with it
        self.refused = False

    async def __call__(self, emit: Emit) -> None:
        webhook = self.webhook
        event, self.event = self.event, None  # the turn holds it from here on
        assert event is not None
        conversations = webhook.conversations
        if conversations is None:
            turn = webhook._start_turn(event, (), None)
            try:
                await turn.run(emit)
            finally:
                webhook._running.discard(turn)
            return
        cid = event.conversation_id
        pending = webhook._pending
        count = pending.get(cid, 0)
        if count > webhook.max_queued_turns:  # one holds it, max_queued_turns wait
            self.refused = True
            raise ResponseError(503, _TOO_MANY_WAITING, retry_after=RETRY_AFTER_SECONDS)
        pending[cid] = count + 1
        body = self.body
        if count and body is not None:
            event = None  # it waits: keep the raw body only
        # abort_turns() cancels it until the turn runs; it encloses the whole ``async with``
        # because a store's lock may open cancel scopes of its own.
        waiting = anyio.CancelScope()
        acquired = False
        webhook._waiting.add(waiting)
        try:
            with waiting:
                async with conversations.lock(cid, timeout=webhook.lock_timeout):
                    acquired = True
                    locked_at = anyio.current_time()  # the turn's deadline counts from here
                    if webhook.metrics is not None:
                        webhook.metrics.lock_acquired()
                    if event is None:  # it waited: decode its (valid) body again
                        decoded = parse_webhook_payload(body)  # type: ignore[arg-type]
                        assert isinstance(decoded, SessionStartPayload | MessagePayload)
                        event = decoded
                    try:
                        history, generation = await read_for_turn(conversations, cid)
                    except LayercodeError as exc:
                        failure = "conversation store failed reading the history"
                        raise _unavailable(exc, failure) from exc
                    if waiting.cancel_called:  # aborted during a read that did not notice
                        self.refused = True
                        raise webhook._aborted()
                    webhook._waiting.discard(waiting)  # from here on, abort_turns aborts the turn
                    self.generation = generation
                    turn = webhook._start_turn(event, history, locked_at)
                    turn.before_end = self.record_history  # Turn.end runs it once, then clears it
                    try:  # here, not in a method: one coroutine frame fewer per open turn
                        await turn.run(emit)
                    finally:
                        webhook._running.discard(turn)
                        if turn.before_end is not None:  # it stopped without its response.end
                            await self.record_history(turn)
        except LayercodeError as exc:
            if acquired or isinstance(exc, ResponseError):
                raise
            self.refused = isinstance(exc, ConversationLockTimeout)  # busy, not failing
            raise _unavailable(exc, "could not lock the conversation") from exc
        except ValueError as exc:
            if acquired:
                raise
            raise _invalid_id(exc) from exc  # refused by the store
        finally:
            webhook._waiting.discard(waiting)
            left = pending[cid] - 1
            if left:
                pending[cid] = left
            else:
                del pending[cid]
        if waiting.cancelled_caught:
            self.refused = True
            raise webhook._aborted()

    async def record_history(self, turn: Turn) -> None:
        """Record what was said and spoken: just before ``response.end`` (a client that saw
        the end finds the turn in the history), or once the turn stopped without one."""
        conversations = self.webhook.conversations
        assert conversations is not None  # a turn without a store is not recorded
        await record_for_turn(conversations, turn.event, turn.reply_text, self.generation)


def _unavailable(exc: LayercodeError, context: str) -> ResponseError:
    """The 503 for a conversation store failure: what is wrong in words for the caller,
    the details (Redis host, port, driver text) only in the log."""
    logger.warning("%s: %s: %s", context, type(exc).__name__, escape_error(exc))
    message = (
        "conversation unavailable: another turn of this conversation is still running"
        if isinstance(exc, ConversationLockTimeout)
        else "conversation store unavailable"
    )
    return ResponseError(503, message, retry_after=RETRY_AFTER_SECONDS)


def _invalid_id(exc: ValueError) -> ResponseError:
    """The 400 of a ``conversation_id`` the conversation store refuses (empty, too long)."""
    return ResponseError(400, f"invalid conversation_id: {exc}")
