"""``LayercodeWebhook``: answer every LayerCode webhook event the way ``create_app`` does.

Use it as an ASGI app (``Route("/api/agent", webhook)``, or behind
:class:`~layercode_asgi.middleware.LayercodeSignature`), or from your own route handler in
any framework::

    webhook = LayercodeWebhook(agent)

    @app.post("/api/agent")                       # FastAPI / Starlette
    async def agent_route(request: Request):
        return await webhook.respond(await request.body())

What it answers (the body must already be verified — mount the middleware):

* ``session.start`` / ``message``: the agent's SSE reply (:mod:`layercode_asgi.turns`).
  With a conversation store, the turn holds the conversation's lock from before it reads
  the history until its stream has finished, then records the user's text and the reply.
* ``data``: JSON, what ``on_data(event)`` returns, else ``{"status": "ok"}``.
* ``session.update`` / ``session.end``: ``on_session_update`` / ``on_session_end``, then
  ``{"status": "ok"}``; ``session.end`` also clears the history unless ``keep_history``.
* a malformed body: 400 ``{"error": …, "path": "$.field"}``; an event type newer than this
  library: 200 ``{"status": "ignored"}`` and a warning in the log.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .agents import Agent, TurnEvent, bind_agent
from .conversation import (
    ConversationLockTimeout,
    ConversationManager,
    HistoryMessage,
    MemoryConversationStore,
    StoreError,
    _check_conversation_id,
    turn_messages,
)
from .errors import LayercodeError, ResponseError
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
from .logs import escape_log_value, log_webhook, webhook_log_enabled
from .middleware import DEFAULT_MAX_BODY_SIZE, BodyTooLarge, read_body
from .sse import Emit, EventStreamResponse
from .turns import Turn

__all__ = ["ConversationBackend", "JSONResponse", "LayercodeWebhook"]

logger = logging.getLogger("layercode_asgi.webhook")

_encode = msgspec.json.Encoder().encode
#: How long recording a finished turn may take before it is given up (logged).
RECORD_TIMEOUT = 5.0


class JSONResponse(Response):
    """A JSON response rendered with msgspec (compact, fast)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encode(content)


def _json(status: int, content: Any) -> JSONResponse:
    return JSONResponse(content, status_code=status)


_OK = b'{"status":"ok"}'
_IGNORED = b'{"status":"ignored"}'


class ConversationBackend(Protocol):
    """What the webhook needs of a conversation store (``ConversationManager`` has it)."""

    def lock(
        self, conversation_id: str, *, timeout: float | None = ...
    ) -> AbstractAsyncContextManager[Any]: ...

    async def get_history(self, conversation_id: str) -> list[HistoryMessage]: ...

    async def add_turn(
        self,
        conversation_id: str,
        user_text: str | None,
        assistant_text: str | None,
        *,
        turn_id: str | None = None,
    ) -> None: ...

    async def clear(self, conversation_id: str) -> None: ...


Hook = Callable[[Any], Any]


class LayercodeWebhook:
    """Answers LayerCode webhooks with an agent. See the module docstring.

    Args:
        agent: the agent (a plain async callable, see :mod:`layercode_asgi.agents`).
        conversations: where history lives and turns are serialised (e.g. a
            ``ConversationManager``); ``None`` keeps no history and takes no lock.
        on_data / on_session_update / on_session_end: optional hooks (sync or async),
            called with the typed event. ``on_data``'s return value is the JSON reply.
        turn_timeout: seconds a turn may take; ``None`` = no limit.
        timeout_message: spoken when a turn times out (else ``response.error``).
        keep_history: keep a conversation's history after ``session.end``.
        lock_timeout: seconds a turn waits for the previous turn of its conversation
            before it is answered with 503.
        extras: objects handed to agents as ``context.extras``.
        max_body_size: body limit when used as an ASGI app without the middleware.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        conversations: ConversationBackend | None = None,
        on_data: Hook | None = None,
        on_session_update: Hook | None = None,
        on_session_end: Hook | None = None,
        turn_timeout: float | None = 30.0,
        timeout_message: str | None = None,
        keep_history: bool = False,
        lock_timeout: float = 30.0,
        extras: Mapping[str, Any] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if not callable(agent):
            raise TypeError(f"agent must be an async callable, got {type(agent).__name__}")
        self.agent = agent
        self._bound_agent: Agent = agent
        self._call = bind_agent(agent)
        self.conversations = conversations
        self.on_data = on_data
        self.on_session_update = on_session_update
        self.on_session_end = on_session_end
        self.turn_timeout = turn_timeout
        self.timeout_message = timeout_message
        self.keep_history = keep_history
        self.lock_timeout = lock_timeout
        self.extras: Mapping[str, Any] = {} if extras is None else extras
        self.max_body_size = max_body_size

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope["method"] != "POST":
            response: Response = _json(405, {"error": "method not allowed; use POST"})
            response.headers["allow"] = "POST"
        else:
            try:
                body = await read_body(receive, self.max_body_size)
            except BodyTooLarge:
                body, response = (
                    None,
                    _json(413, {"error": f"request body exceeds {self.max_body_size} bytes"}),
                )
            else:
                if body is None:
                    return  # the client left before sending its body
                await self.answer(body, scope, receive, send)
                return
        await response(scope, receive, send)

    async def answer(self, body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a POST whose whole (verified) body has been read already.

        What the ASGI app does once it has the body, for callers that read it themselves
        (``create_app``'s webhook route gets it from the signature check): ``receive`` is
        only used to notice the client leaving, and the request is logged.
        """
        started = time.perf_counter()
        response, event = await self._respond(body)
        try:
            await response(scope, receive, send)
        finally:
            if webhook_log_enabled(response.status_code):
                log_webhook(
                    None if event is None else str(event.type),
                    None if event is None else event.conversation_id,
                    getattr(event, "turn_id", None),
                    response.status_code,
                    time.perf_counter() - started,
                )

    # -- framework-neutral entry point -------------------------------------------------------

    async def respond(self, body: bytes | str | Mapping[str, Any]) -> Response:
        """Return the response to a webhook whose (verified) body is ``body``."""
        response, _ = await self._respond(body)
        return response

    async def _respond(
        self, body: bytes | str | Mapping[str, Any]
    ) -> tuple[Response, WebhookPayload | None]:
        try:
            event = parse_webhook_payload(body)
        except UnknownEventError as exc:
            logger.warning("ignoring webhook of unknown type %s", escape_log_value(exc.event_type))
            return Response(_IGNORED, media_type="application/json"), None
        except InvalidPayloadError as exc:
            logger.info("rejected malformed webhook: %s", escape_log_value(exc))
            return _json(400, {"error": str(exc), "path": exc.path}), None

        if isinstance(event, SessionStartPayload | MessagePayload):
            return self.turn_response(event), event
        try:
            return await self._answer_json(event), event
        except ResponseError as exc:
            return _json(exc.status_code, {"error": exc.message}), event
        except LayercodeError as exc:
            failure = _unavailable(exc, f"webhook {_kind(event)} failed")
            return _json(503, {"error": failure.message}), event
        except Exception:
            logger.exception(
                "webhook hook failed for %s (conversation=%s)",
                _kind(event),
                escape_log_value(event.conversation_id),
            )
            return _json(500, {"error": f"{_kind(event)} handler failed"}), event

    def turn_response(self, event: TurnEvent) -> EventStreamResponse:
        """The SSE response of one turn, with history and the conversation lock if any."""
        conversations = self.conversations

        if conversations is None:
            turn = self._turn(event, ())
            return EventStreamResponse(turn.run)
        store = getattr(conversations, "store", None)
        if type(conversations) is ConversationManager and type(store) is MemoryConversationStore:
            return EventStreamResponse(self._memory_producer(event, store))

        async def produce(emit: Callable[[bytes], Awaitable[None]]) -> None:
            cid = event.conversation_id
            acquired = False
            try:
                async with conversations.lock(cid, timeout=self.lock_timeout):
                    acquired = True
                    try:
                        history = await conversations.get_history(cid)
                    except LayercodeError as exc:
                        raise _unavailable(exc, "conversation history unavailable") from exc
                    turn = self._turn(event, history)
                    try:
                        await turn.run(emit)
                    finally:
                        await self._record(conversations, event, turn)
            except LayercodeError as exc:
                if acquired or isinstance(exc, ResponseError):
                    raise
                raise _unavailable(exc, "conversation unavailable") from exc
            except ValueError as exc:
                if acquired:
                    raise
                # an id the store refuses (empty, too long)
                raise ResponseError(400, f"invalid conversation_id: {exc}") from exc

        return EventStreamResponse(produce)

    def _memory_producer(
        self, event: TurnEvent, store: MemoryConversationStore
    ) -> Callable[[Emit], Awaitable[None]]:
        """The turn's producer for the default store: the same steps and answers as the
        general one, with the store's synchronous operations (no coroutine per call)."""

        async def produce(emit: Emit) -> None:
            cid = event.conversation_id
            try:
                _check_conversation_id(cid)
            except ValueError as exc:
                raise ResponseError(400, f"invalid conversation_id: {exc}") from exc
            if not store.try_lock(cid):
                try:
                    await store.wait_lock(cid, self.lock_timeout)
                except LayercodeError as exc:
                    raise _unavailable(exc, "conversation unavailable") from exc
            try:
                turn = self._turn(event, store.get_now(cid))
                try:
                    await turn.run(emit)
                finally:
                    user_text = event.text or None
                    reply = turn.reply_text or None
                    if user_text is not None or reply is not None:
                        try:
                            store.append_now(cid, turn_messages(user_text, reply, event.turn_id))
                        except Exception:
                            logger.exception(
                                "could not record turn (conversation=%s turn=%s)",
                                escape_log_value(cid),
                                escape_log_value(event.turn_id),
                            )
            finally:
                store.unlock(cid)

        return produce

    # -- internals ---------------------------------------------------------------------------

    def _turn(self, event: TurnEvent, history: Sequence[HistoryMessage]) -> Turn:
        agent = self.agent
        if agent is not self._bound_agent:  # bound once, again only if ``agent`` changed
            self._call = bind_agent(agent)
            self._bound_agent = agent
        return Turn._bound(
            event, self._call, history, self.extras, self.turn_timeout, self.timeout_message
        )

    async def _record(
        self, conversations: ConversationBackend, event: TurnEvent, turn: Turn
    ) -> None:
        """Record the user's text and what was actually spoken, whatever the outcome."""
        user_text = event.text or None
        reply = turn.reply_text or None
        if user_text is None and reply is None:
            return
        # A store that never suspends cannot be cancelled or delayed: skip the shielded,
        # time-limited scope (the costly part) that any other store needs.
        never_suspends = getattr(getattr(conversations, "store", None), "never_suspends", False)
        guard: AbstractContextManager[anyio.CancelScope | None] = (
            contextlib.nullcontext()
            if never_suspends
            else anyio.move_on_after(RECORD_TIMEOUT, shield=True)
        )
        with guard as scope:
            try:
                await conversations.add_turn(
                    event.conversation_id, user_text, reply, turn_id=event.turn_id
                )
            except Exception:
                logger.exception(
                    "could not record turn (conversation=%s turn=%s)",
                    escape_log_value(event.conversation_id),
                    escape_log_value(event.turn_id),
                )
        if scope is not None and scope.cancelled_caught:
            logger.error(
                "recording turn timed out (conversation=%s turn=%s)",
                escape_log_value(event.conversation_id),
                escape_log_value(event.turn_id),
            )

    async def _answer_json(self, event: WebhookPayload) -> Response:
        if isinstance(event, DataPayload):
            if self.on_data is None:
                return Response(_OK, media_type="application/json")
            result = await _maybe_await(self.on_data(event))
            if isinstance(result, Response):
                return result
            if result is None:
                return Response(_OK, media_type="application/json")
            return _json(200, result)
        if isinstance(event, SessionUpdatePayload):
            if self.on_session_update is not None:
                await _maybe_await(self.on_session_update(event))
            return Response(_OK, media_type="application/json")
        assert isinstance(event, SessionEndPayload)
        if self.on_session_end is not None:
            await _maybe_await(self.on_session_end(event))
        if self.conversations is not None and not self.keep_history:
            try:
                await self.conversations.clear(event.conversation_id)
            except ValueError as exc:
                raise ResponseError(400, f"invalid conversation_id: {exc}") from exc
        return Response(_OK, media_type="application/json")


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _kind(event: WebhookPayload) -> str:
    return str(event.type)


def _unavailable(exc: LayercodeError, context: str) -> ResponseError:
    """The 503 for a conversation store failure: what is wrong in words for the caller,
    the details (Redis host, port, driver text) only in the log."""
    logger.warning("%s: %s: %s", context, type(exc).__name__, escape_log_value(exc))
    if isinstance(exc, StoreError):
        return ResponseError(503, "conversation store unavailable")
    if isinstance(exc, ConversationLockTimeout):
        return ResponseError(
            503, "conversation unavailable: another turn of this conversation is still running"
        )
    return ResponseError(503, "conversation unavailable")
