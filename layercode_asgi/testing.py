"""Test kit for LayerCode backends: event factories and :class:`LayercodeTestClient`, which
signs each event, POSTs it to an ASGI app in-process (``app=``, replies buffered, no lifespan)
or a running server (``base_url=``) and checks the reply against the protocol
(:mod:`layercode_asgi.protocol`, re-exported here). See docs/testing.md.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx

from . import protocol
from ._asgi import check_headers
from .errors import check_positive_int, check_seconds, check_type, kind_of
from .jsonwire import check_json_value
from .kitclient import BoundedApp, check_url, new_client, noting_app_errors
from .protocol import *  # noqa: F403 - the client's vocabulary, re-exported
from .protocol import (
    MAX_REPLY_BYTES,
    MAX_TURN_EVENTS,
    TURN_TYPES,
    JSONResult,
    OnEvent,
    ProtocolViolation,
    TurnResult,
    answering,
    check_event,
    encode_event,
    exchange,
    send_json_event,
    send_turn,
    signed_headers,
)
from .signature import SIGNATURE_HEADER, check_secret

__all__ = [
    *protocol.__all__,
    "LayercodeTestClient",
    "TranscriptEntry",
    "data_event",
    "message_event",
    "session_end_event",
    "session_start_event",
    "session_update_event",
]


# -- events to send ------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _event(
    kind: str,
    fields: Mapping[str, Any],
    session_id: str | None,
    conversation_id: str | None,
    **base: Any,
) -> dict[str, Any]:
    """``{"type": kind}``, the ids, ``base`` without its ``None`` values, then ``fields``; a
    ``None`` id (``turn_id`` too) gets a random one. A value JSON cannot carry is refused."""
    event: dict[str, Any] = {
        "type": kind,
        "session_id": _new_id("sess") if session_id is None else session_id,
        "conversation_id": _new_id("conv") if conversation_id is None else conversation_id,
    }
    if "turn_id" in base and base["turn_id"] is None:
        base["turn_id"] = _new_id("turn")
    event.update((key, value) for key, value in base.items() if value is not None)
    event.update(fields)
    for key, value in event.items():
        check_json_value(key, value)
    return event


def session_start_event(
    *,
    session_id: str | None = None,
    conversation_id: str | None = None,
    turn_id: str | None = None,
    text: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A ``session.start`` event; ids default to fresh random ones. Extra fields are added."""
    return _event("session.start", fields, session_id, conversation_id, turn_id=turn_id, text=text)


def message_event(
    text: str,
    *,
    session_id: str | None = None,
    conversation_id: str | None = None,
    turn_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A ``message`` event: the user said ``text``."""
    return _event("message", fields, session_id, conversation_id, turn_id=turn_id, text=text)


def data_event(
    data: Any,
    *,
    session_id: str | None = None,
    conversation_id: str | None = None,
    turn_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A ``data`` event carrying ``data`` (what the browser sent with ``response.data``)."""
    return _event("data", {"data": data, **fields}, session_id, conversation_id, turn_id=turn_id)


def session_update_event(
    *,
    session_id: str | None = None,
    conversation_id: str | None = None,
    recording_status: str | None = "completed",
    **fields: Any,
) -> dict[str, Any]:
    """A ``session.update`` event (by default: the recording is ``completed``)."""
    return _event(
        "session.update", fields, session_id, conversation_id, recording_status=recording_status
    )


#: One item of ``session_end_event(transcript=...)``: a mapping (its fields as given) or a
#: ``(role, text)`` pair.
TranscriptEntry = Mapping[str, Any] | Sequence[str]


def session_end_event(
    *,
    transcript: Sequence[TranscriptEntry] = (),
    session_id: str | None = None,
    conversation_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A ``session.end`` event with ``transcript`` and plausible metrics.

    ``transcript`` items are ``{"role", "text", "timestamp"}`` mappings or ``(role, text)``
    pairs, tuples or lists (stamped with the current time in unix milliseconds).
    """
    if isinstance(transcript, str | bytes | bytearray | Mapping) or not isinstance(
        transcript, Iterable
    ):
        raise TypeError(
            "transcript must be a list of items (mappings or (role, text) pairs), "
            f"got {kind_of(transcript)}"
        )
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    items = [_transcript_item(entry, now_ms) for entry in transcript]
    stamp = now.isoformat(timespec="milliseconds")
    defaults: dict[str, Any] = {
        "agent_id": "agent_test",
        "started_at": stamp,
        "ended_at": stamp,
        "duration": 0,
        "transcription_duration_seconds": 0.0,
        "tts_duration_seconds": 0.0,
        "latency": 0.0,
        "ip_address": "127.0.0.1",
        "country_code": None,
        "recording_status": "disabled",
        "transcript": items,
    }
    defaults.update(fields)
    return _event("session.end", defaults, session_id, conversation_id)


def _transcript_item(entry: TranscriptEntry, now_ms: int) -> dict[str, Any]:
    if isinstance(entry, Mapping):
        return dict(entry)
    if not isinstance(entry, Sequence) or isinstance(entry, str | bytes) or len(entry) != 2:
        shown = f"{entry!r:.80}"
        raise TypeError(f"transcript items are mappings or (role, text) pairs, got {shown}")
    return {"role": entry[0], "text": entry[1], "timestamp": now_ms}


def _unfinished(timeout: ProtocolViolation, status: int, seconds: float) -> ProtocolViolation:
    """The ``timeout`` of an in-process reply the app started and did not end (httpx returns
    it only once the app is done: the client alone would call it "not answered")."""
    where = {"event_type": timeout.event_type, "turn_id": timeout.turn_id}
    detail = (
        f"{answering(where) or 'POST'} reply not complete within {seconds:g} s: the app "
        f"answered {status} and did not end it (in-process, a reply is read once the app returns)"
    )
    return ProtocolViolation("timeout", detail, **where, status_code=status)


# -- the client ----------------------------------------------------------------------------------


class LayercodeTestClient:
    """Send signed LayerCode events to an ASGI app or a server and get checked replies.

    Args:
        app: an ASGI app, called in-process (replies are buffered; no lifespan is run).
        base_url: or the URL of a running server (``http://127.0.0.1:8000``).
        secret: the webhook secret to sign with.
        path: the webhook path (default ``/api/agent``).
        headers: extra headers on every request (LayerCode's custom headers).
        timeout: seconds per request (a finite number > 0). With ``app=`` it cancels the app
            where it awaits: a part shielded from cancellation runs to its end first.
        strict: treat ``response.error`` as a violation.
        max_bytes: the most (decoded) bytes one reply may have (else ``too-large``).
        max_events: the most events one turn may have (else ``too-large``).
        conversation_id: the conversation id used by the helper methods (random by default).
        session_id: the session id used by the helper methods (random by default).
        signature_header: the header the signature goes under, as the app's
            ``LayercodeSignature(header_name=...)`` (default ``layercode-signature``).

    Use it as ``async with LayercodeTestClient(...) as client`` (one HTTP client for all
    requests; the outermost ``async with`` closes it) or call the methods directly (a client
    per call). Every method raises :class:`ProtocolViolation`.
    """

    def __init__(
        self,
        app: Any = None,
        *,
        base_url: str | None = None,
        secret: str,
        path: str = "/api/agent",
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        strict: bool = False,
        conversation_id: str | None = None,
        session_id: str | None = None,
        max_bytes: int = MAX_REPLY_BYTES,
        max_events: int = MAX_TURN_EVENTS,
        signature_header: str = SIGNATURE_HEADER,
    ) -> None:
        if (app is None) == (base_url is None):
            raise ValueError("pass exactly one of app= (an ASGI app) or base_url= (a server URL)")
        check_type("secret", secret, str, "a str")  # first: 0 or None is no empty secret
        check_secret(secret)
        # a class is no ASGI 3 app unless awaitable
        if app is not None and (
            not callable(app) or (isinstance(app, type) and not hasattr(app, "__await__"))
        ):
            raise TypeError(f"app must be an ASGI app, got {kind_of(app)}")
        check_type("path", path, str, "a str")
        for name, given in (("conversation_id", conversation_id), ("session_id", session_id)):
            check_type(name, given, str | None, "a str or None")
            if given == "":  # a server answers 400: a random id stands for None only
                raise ValueError(f"{name} must not be empty (None for a random one)")
        if base_url is not None:
            check_url("base_url", base_url)
            if "?" in base_url or "#" in base_url:  # the path would be appended to it
                raise ValueError("base_url must not hold a query or fragment (give it in path=)")
        check_headers("headers", headers or {}, client=True)
        check_type("signature_header", signature_header, str, "a str")
        check_headers("signature_header", {signature_header: ""}, client=True)
        check_seconds("timeout", timeout, zero=False, none=False)
        check_positive_int(max_bytes, "max_bytes")  # NaN would never trip, "5" fail later
        check_positive_int(max_events, "max_events")
        self.app = app
        self.base_url = (base_url or "http://testserver").rstrip("/")
        self.url = self.base_url + "/" + path.lstrip("/")
        check_url("path", self.url)
        self.secret = secret
        self.headers = dict(headers or {})
        self.timeout = timeout
        check_type("strict", strict, bool, "a bool")
        self.strict = strict
        self.max_bytes = max_bytes
        self.max_events = max_events
        self.signature_header = signature_header
        self.conversation_id = _new_id("conv") if conversation_id is None else conversation_id
        self.session_id = _new_id("sess") if session_id is None else session_id
        self._client: httpx.AsyncClient | None = None
        self._entered = 0

    def _new_client(self) -> httpx.AsyncClient:
        transport: httpx.AsyncBaseTransport | None = None
        if self.app is not None:
            transport = httpx.ASGITransport(app=BoundedApp(self.app, self.max_bytes))
        client = new_client(transport, self.timeout)
        if self.signature_header.lower() != SIGNATURE_HEADER:
            client.event_hooks = {**client.event_hooks, "request": [self._move_signature]}
        return client

    async def _move_signature(self, request: httpx.Request) -> None:
        """A request hook: the signature goes under :attr:`signature_header`."""
        signature = request.headers.pop(SIGNATURE_HEADER, None)
        if signature is not None:
            request.headers.setdefault(self.signature_header, signature)

    async def __aenter__(self) -> LayercodeTestClient:
        if self._client is None:
            self._client = self._new_client()
        self._entered += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._entered -= 1
        if self._entered > 0:
            return  # a nested ``async with``: the outermost closes the client
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[httpx.AsyncClient]:
        with noting_app_errors() as started:
            client = self._new_client() if self._client is None else nullcontext(self._client)
            try:
                async with client as open_client:
                    yield open_client
            except ProtocolViolation as exc:
                if exc.name != "timeout" or exc.status_code is not None or not started:
                    raise
                raise _unfinished(exc, started[0], self.timeout) from None

    async def send(
        self, event: Mapping[str, Any], *, on_event: OnEvent | None = None
    ) -> TurnResult | JSONResult:
        """Sign and POST ``event``; a :class:`TurnResult` for turns, else :class:`JSONResult`."""
        check_event(event)
        if event.get("type") in TURN_TYPES:
            return await self.send_turn(event, on_event=on_event)
        return await self.send_json(event)

    async def send_turn(
        self, event: Mapping[str, Any], *, on_event: OnEvent | None = None
    ) -> TurnResult:
        """Send a turn event (whatever its type) and check the SSE reply."""
        async with self._http() as client:
            return await send_turn(
                client,
                self.url,
                event,
                self.secret,
                headers=self.headers,
                timeout=self.timeout,
                strict=self.strict,
                on_event=on_event,
                max_bytes=self.max_bytes,
                max_events=self.max_events,
            )

    async def send_json(self, event: Mapping[str, Any]) -> JSONResult:
        """Send a non-turn event (whatever its type) and check the JSON reply."""
        async with self._http() as client:
            return await send_json_event(
                client,
                self.url,
                event,
                self.secret,
                headers=self.headers,
                timeout=self.timeout,
                max_bytes=self.max_bytes,
            )

    def send_sync(
        self, event: Mapping[str, Any], *, on_event: OnEvent | None = None
    ) -> TurnResult | JSONResult:
        """:meth:`send` for synchronous code (runs its own event loop; not inside one)."""
        if self._client is not None:
            raise RuntimeError("send_sync cannot be used inside 'async with'; await send()")
        ran = False

        async def run() -> TurnResult | JSONResult:
            nonlocal ran
            ran = True
            return await self.send(event, on_event=on_event)

        try:
            return anyio.run(run)
        except RuntimeError as exc:
            if ran:  # the app's, or the kit's own: not the loop already running
                raise
            detail = "send_sync cannot run inside an event loop (async code); await send()"
            raise RuntimeError(detail) from exc

    async def post(
        self,
        body: bytes | str | Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        signed: bool = True,
    ) -> httpx.Response:
        """POST ``body`` (an event or raw bytes) unchecked, for testing error answers.

        Signed with the client's secret unless ``signed=False``; ``headers`` override. Not
        answered within ``timeout``: a ``timeout`` violation; an in-process reply past
        ``max_bytes``: ``too-large``; no connection: ``connection-error``.
        """
        check_headers("headers", headers or {}, client=True)
        if isinstance(body, bytes | bytearray | memoryview):
            content = bytes(body)  # raw bytes, as they are (msgspec sends others as base64)
        else:
            content = body.encode() if isinstance(body, str) else encode_event(body)
        kits = signed_headers(content, self.secret) if signed else {}
        request_headers = httpx.Headers({"content-type": "application/json", **kits})
        request_headers.update(self.headers)  # a name given replaces, whatever its case
        request_headers.update(headers or {})

        async with self._http() as client:
            request = client.build_request(
                "POST", self.url, content=content, headers=request_headers
            )
            late = f"POST not answered within {self.timeout:g} s"
            answered = range(100, 1000)  # any status is an answer
            async with exchange(
                client, request, self.timeout, self.max_bytes, {}, answered, late, read=True
            ) as reply:
                return reply

    # -- one helper per event, with the client's conversation and session ids --

    def _ids(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"conversation_id": self.conversation_id, "session_id": self.session_id, **fields}

    async def session_start(self, *, on_event: OnEvent | None = None, **fields: Any) -> TurnResult:
        """Send ``session.start`` (the welcome turn); ``on_event`` as for :meth:`send`."""
        return await self.send_turn(session_start_event(**self._ids(fields)), on_event=on_event)

    async def message(
        self, text: str, *, on_event: OnEvent | None = None, **fields: Any
    ) -> TurnResult:
        """Send a ``message`` turn: the user said ``text``; ``on_event`` as for :meth:`send`."""
        return await self.send_turn(message_event(text, **self._ids(fields)), on_event=on_event)

    async def data(self, data: Any, **fields: Any) -> JSONResult:
        """Send a ``data`` event."""
        return await self.send_json(data_event(data, **self._ids(fields)))

    async def session_update(self, **fields: Any) -> JSONResult:
        """Send ``session.update``."""
        return await self.send_json(session_update_event(**self._ids(fields)))

    async def session_end(self, **fields: Any) -> JSONResult:
        """Send ``session.end`` (``transcript=[("user", "hi"), …]`` to include one)."""
        return await self.send_json(session_end_event(**self._ids(fields)))
