"""The LayerCode protocol as a client checks it (PROTOCOL.md §4): send a signed event with an
httpx client and check the reply, raising :class:`ProtocolViolation` (the test kit's and
``simulate``'s base)."""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx
import msgspec

from ._asgi import check_headers
from .errors import check_callable, check_positive_int, check_seconds, check_type, kind_of
from .jsonwire import check_json_value, decode_json, number_out_of_range
from .kitclient import ReplyTooLarge, drained, noted_redirect, open_reply, raised_by_app, speaks_tls
from .reading import ACCEPT_ENCODING, BodyDecoder, UnsupportedEncoding, read_prefix
from .redaction import mask_url
from .signature import SIGNATURE_HEADER, sign
from .sse_parser import SSEEvent, SSEParser

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_TURN_EVENTS",
    "TURN_TYPES",
    "VIOLATIONS",
    "JSONResult",
    "OnEvent",
    "ProtocolViolation",
    "ReplyTooLarge",
    "SSEEvent",
    "SSEParser",
    "TurnChecker",
    "TurnResult",
    "encode_event",
    "send_event",
    "send_json_event",
    "send_turn",
    "signed_headers",
]

#: Event types answered with an SSE stream (a "turn"); every other type is answered with JSON.
TURN_TYPES: Final[frozenset[str]] = frozenset({"session.start", "message"})

#: Every :attr:`ProtocolViolation.name`, with what it means. The names are stable.
VIOLATIONS: Final[Mapping[str, str]] = {
    "http-error": "the backend answered with an unexpected HTTP status (a turn needs 200, "
    "other events 2xx)",
    "connection-error": "the backend could not be reached, or the connection broke",
    "wrong-content-type": "a turn was not answered with Content-Type text/event-stream",
    "bad-json": "an SSE event's data is not a JSON object, or a reply's body is not valid JSON "
    "(or holds a number out of range, such as 1e400)",
    "missing-type": "an SSE event is a JSON object without a string 'type'",
    "invalid-event": "an event is malformed (its turn_id, or a response.tts content, is not a "
    "string)",
    "missing-end": "the stream closed without a response.end",
    "repeated-end": "a second response.end in one turn",
    "event-after-end": "an event after response.end",
    "wrong-turn-id": "an event without the request's turn_id",
    "response-error": "the turn contained a response.error (only with strict checking)",
    "timeout": "no complete reply within the timeout",
    "too-large": "a reply exceeded the client's bounds (max_bytes decoded bytes, or max_events "
    "events in one turn)",
    "bad-encoding": "a reply's Content-Encoding is not one the client asked for (gzip, deflate)",
}

#: Default bound on the decoded bytes of one reply (a turn's whole stream, or a JSON body).
MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
#: Default bound on the events of one turn.
MAX_TURN_EVENTS: Final = 100_000

_encode = msgspec.json.Encoder().encode
#: What decoding a backend's JSON raises: invalid, or nested deeper than the decoder goes.
_UNDECODABLE: Final = (msgspec.DecodeError, RecursionError)
#: How much of an unexpected error body a violation message quotes.
_BODY_EXCERPT = 200


class ProtocolViolation(Exception):
    """A backend broke the LayerCode protocol (or could not be reached).

    Attributes:
        name: one of :data:`VIOLATIONS` (``"missing-end"``, ``"wrong-turn-id"``, …).
        detail: what exactly was wrong.
        event_type: the type of the webhook event being answered, when known.
        turn_id: its ``turn_id``, when it has one.
        status_code: the HTTP status, when a response arrived.
    """

    def __init__(
        self,
        name: str,
        detail: str,
        *,
        event_type: str | None = None,
        turn_id: str | None = None,
        status_code: int | None = None,
    ) -> None:
        check_type("name", name, str, "a str (one of VIOLATIONS)")
        check_type("detail", detail, str, "a str")
        if name not in VIOLATIONS:
            raise ValueError(f"unknown protocol violation name {name!r}")
        self.name = name
        self.detail = detail
        self.event_type = event_type
        self.turn_id = turn_id
        self.status_code = status_code
        super().__init__(f"{name}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProtocolViolation, (self.name, self.detail), self.__dict__.copy())


def encode_event(event: Any) -> bytes:
    """The compact JSON body of ``event`` (a dict, or a payload struct); a value JSON cannot
    carry as it is (a NaN, bytes, a set) is refused as the event factories refuse it."""
    if not isinstance(event, msgspec.Struct):
        check_json_value("event", event)  # not sent changed (a NaN as null, bytes as base64)
    return _encode(event)


def signed_headers(body: bytes | str, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """Request headers for ``body``: JSON content type and a valid ``layercode-signature``."""
    # sign refuses a secret of another type (TypeError), then an empty one (ValueError)
    return {"content-type": "application/json", SIGNATURE_HEADER: sign(body, secret, timestamp)}


def check_event(event: object) -> None:
    """Raise TypeError unless ``event`` (an event to send) is a mapping."""
    check_type("event", event, Mapping, "a mapping (such as message_event(...))")


def answering(where: Mapping[str, Any]) -> str:
    """The event a reply answers, for a violation: ``message (turn_id 't1')``, or the type."""
    kind, turn_id = where.get("event_type") or "", where.get("turn_id")
    return f"{kind} (turn_id {_brief(turn_id)})" if turn_id else kind


#: What a decoded JSON value is, by its Python type, for a message.
_JSON_KINDS: Final[Mapping[type, str]] = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def json_kind(value: object) -> str:
    """What ``value`` is as JSON (``a number``, ``null``, ...), else its type's name."""
    return _JSON_KINDS.get(type(value)) or kind_of(value)


def _brief(value: Any) -> str:
    """``repr(value)``, at most 80 characters."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:79] + "…"


class TurnChecker:
    """Checks the SSE events of one turn against the protocol, one event at a time.

    :meth:`check` takes each dispatched :class:`SSEEvent` and returns its JSON object, or
    raises :class:`ProtocolViolation`; :meth:`finish` is called when the stream closed.
    ``response.error`` events are collected in :attr:`errors`; with ``strict=True`` the
    first one is a violation (``response-error``). Without it, the official Node SDK's error
    stream is accepted as an errored turn: a ``response.error`` (its ``turn_id`` may be
    missing) and then the end of the stream without ``response.end`` (PROTOCOL.md §4).
    Unknown event types are accepted. More than ``max_events`` events is ``too-large``.
    """

    def __init__(
        self,
        turn_id: str,
        *,
        event_type: str = "message",
        strict: bool = False,
        max_events: int = MAX_TURN_EVENTS,
    ) -> None:
        check_positive_int(max_events, "max_events")
        check_type("strict", strict, bool, "a bool")
        check_type("turn_id", turn_id, str, "a str (the turn_id of the request)")
        check_type("event_type", event_type, str, "a str")
        self.turn_id = turn_id
        self.event_type = event_type
        self.strict = strict
        self.max_events = max_events
        self.events: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.ended = False
        self._of_turn = f" of turn_id {_brief(turn_id)}" if turn_id else ""  # in its messages

    def violation(self, name: str, detail: str) -> ProtocolViolation:
        return ProtocolViolation(name, detail, event_type=self.event_type, turn_id=self.turn_id)

    def check(self, sse: SSEEvent) -> dict[str, Any]:
        check_type("sse", sse, SSEEvent, "an SSEEvent (from SSEParser.feed)")
        position = len(self.events) + 1
        at, data = f"event #{position}{self._of_turn}", sse.data[:80]
        if position > self.max_events:
            detail = f"more than {self.max_events} events in one turn ({at}, max_events)"
            raise self.violation("too-large", detail)
        try:
            event = decode_json(sse.data)
        except _UNDECODABLE as exc:
            why = _out_of_range(sse.data) or f"is not valid JSON ({exc})"
            raise self.violation("bad-json", f"SSE {at} {why}: {data!r}") from None
        if not isinstance(event, dict):
            raise self.violation("bad-json", f"SSE {at} is JSON but not an object: {data!r}")
        kind = event.get("type")
        if not isinstance(kind, str):
            raise self.violation("missing-type", f"SSE {at} has no string 'type': {data!r}")
        if self.ended:
            if kind == "response.end":
                raise self.violation("repeated-end", f"a second response.end ({at})")
            raise self.violation("event-after-end", f"{_brief(kind)} ({at}) after response.end")
        if kind == "response.error" and self.strict:
            self.errors.append(event)
            error = _brief(event.get("error"))
            raise self.violation("response-error", f"response.error ({at}): {error}")
        turn_id = event.get("turn_id")
        if "turn_id" in event and not isinstance(turn_id, str):  # a string (PROTOCOL.md §4)
            detail = f"{_brief(kind)} ({at}) turn_id is {json_kind(turn_id)}, not a string"
            raise self.violation("invalid-event", detail)
        # the Node SDK's response.error carries no turn_id
        node_error = kind == "response.error" and "turn_id" not in event
        if turn_id != self.turn_id and not node_error:
            has = "no turn_id" if turn_id is None else f"turn_id {_brief(turn_id)}"
            expected = "" if self.turn_id else ", expected ''"  # else ``at`` names it
            raise self.violation("wrong-turn-id", f"{_brief(kind)} ({at}) has {has}{expected}")
        if kind == "response.tts" and not isinstance(event.get("content"), str):
            raise self.violation("invalid-event", f"response.tts ({at}) content is not a string")
        if kind == "response.end":
            self.ended = True
        elif kind == "response.error":
            self.errors.append(event)
        self.events.append(event)
        return event

    def finish(self, *, pending: bool = False) -> None:
        if self.ended or (self.errors and not self.strict):
            return  # ended, or the Node SDK's error stream (response.error, then close)
        detail = f"the stream closed without a response.end{self._of_turn}"
        if pending:
            detail += " (the last event was not terminated by a blank line, so it never counted)"
        raise self.violation("missing-end", detail)


@dataclass(slots=True)
class TurnResult:
    """The checked reply to a turn (``session.start`` or ``message``).

    Attributes:
        turn_id: the request's ``turn_id``.
        events: every SSE event as a dict, in order, ``response.end`` included.
        status_code / headers: of the HTTP response.
        time_to_first_tts: seconds from sending the request to the first ``response.tts``
            (``None`` when nothing was spoken).
        duration: seconds from sending the request to the end of the stream.
        errors: the ``response.error`` events (reported, not violations unless strict).
    """

    turn_id: str
    events: list[dict[str, Any]]
    status_code: int
    headers: Mapping[str, str]
    time_to_first_tts: float | None
    duration: float
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """Everything spoken: the ``response.tts`` contents, concatenated."""
        return "".join(self.tts)

    @property
    def tts(self) -> list[str]:
        """The ``response.tts`` contents, one per event."""
        return [e["content"] for e in self.events if e["type"] == "response.tts"]

    @property
    def data(self) -> list[Any]:
        """The ``content`` of each ``response.data`` event."""
        return [e.get("content") for e in self.events if e["type"] == "response.data"]

    @property
    def hung_up(self) -> bool:
        return any(e["type"] == "response.hangup" for e in self.events)


@dataclass(slots=True)
class JSONResult:
    """The checked reply to a non-turn event (``data``, ``session.update``, ``session.end``)."""

    body: Any
    status_code: int
    headers: Mapping[str, str]
    duration: float
    empty: bool = False  #: the reply had no body (``body`` is None, as for a JSON ``null``)


#: Called with each checked event of a turn as it arrives (``simulate`` prints with it).
OnEvent = Callable[[dict[str, Any]], None]


def _excerpt(content: bytes, more: bool = False) -> str:
    text = content[:_BODY_EXCERPT].decode("utf-8", "replace")
    return text + ("…" if more or len(content) > _BODY_EXCERPT else "")


def _out_of_range(data: bytes | bytearray | str) -> str | None:
    number = number_out_of_range(data)  # valid JSON all the same: not "not JSON"
    return None if number is None else f"holds a number out of range ({number})"


def _too_large(max_bytes: int, where: dict[str, Any]) -> ProtocolViolation:
    detail = f"{answering(where)} reply longer than {max_bytes} bytes (max_bytes)"
    return ProtocolViolation("too-large", detail.lstrip(), **where)


def signed_request(
    client: httpx.AsyncClient,
    url: str,
    event: Mapping[str, Any],
    secret: str,
    headers: Mapping[str, str] | None,
) -> httpx.Request:
    """The POST of the signed ``event``; ``headers`` replace the kit's, whatever their case."""
    check_headers("headers", headers or {}, client=True)
    body = encode_event(event)
    request_headers = httpx.Headers(
        {"accept-encoding": ACCEPT_ENCODING, **signed_headers(body, secret)}
    )
    request_headers.update(headers or {})
    return client.build_request("POST", url, content=body, headers=request_headers)


@asynccontextmanager
async def exchange(
    client: httpx.AsyncClient,
    request: httpx.Request,
    timeout: float,  # noqa: ASYNC109 - a protocol bound, reported as a violation
    max_bytes: int,
    where: dict[str, Any],
    ok: range,
    late: str | Callable[[], str],
    read: bool = False,
) -> AsyncIterator[httpx.Response]:
    """Send ``request``, require a status in ``ok`` (``read``: and read the whole body); any
    failure is a ProtocolViolation, ``late`` saying what a timeout missed."""
    check_seconds("timeout", timeout, zero=False, none=False)
    check_positive_int(max_bytes, "max_bytes")
    in_block = False  # the caller's block runs at the yield: its errors (on_event's) are its own
    try:
        with anyio.fail_after(timeout) as deadline:
            reply = await open_reply(client, request)
            try:
                where["status_code"] = status = reply.status_code
                if status not in ok:
                    prefix, more = await read_prefix(reply, _BODY_EXCERPT)
                    answered = f"{answering(where)} answered {status}".lstrip()
                    location = reply.headers.get("location")
                    if 300 <= status < 400 and location:  # the signed body goes nowhere else
                        answered += f" (a redirect to {_brief(mask_url(location))}, not followed)"
                    detail = f"{answered}: {_excerpt(prefix, more)}" if prefix else answered
                    raise ProtocolViolation("http-error", detail, **where)
                if read:
                    await reply.aread()
                in_block = True
                yield reply
                in_block = False
            finally:
                await reply.aclose()
    except TimeoutError:
        if not deadline.cancelled_caught:  # an in-process app's own, or on_event's: not ours
            raise
        detail = f"{answering(where)} {late if isinstance(late, str) else late()}"
        raise ProtocolViolation("timeout", detail.lstrip(), **where) from None
    except ReplyTooLarge:
        raise _too_large(max_bytes, where) from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        violation = None if in_block else http_violation(exc, timeout, where, request)
        if violation is None:
            raise
        if (  # broken before any status line, on a port that speaks TLS: say so
            violation.name == "connection-error"
            and "status_code" not in where
            and not isinstance(exc, httpx.ConnectError)
            and await speaks_tls(request.url, deadline.deadline - anyio.current_time())
        ):
            detail = f"{violation.detail} (the server speaks TLS: use https:// in the URL)"
            violation = ProtocolViolation("connection-error", detail, **where)
        raise violation from exc


def http_violation(
    exc: Exception, timeout: float, where: Mapping[str, Any], request: httpx.Request | None = None
) -> ProtocolViolation | None:
    """The violation the failure ``exc`` of a request is (``http-error`` after a noted
    redirect, ``timeout``, ``connection-error``); None for another error (an app's own)."""
    noted = noted_redirect(request)
    if noted is not None:
        status, location = noted
        detail = f"{answering(where) or 'POST'} answered {status} (a redirect to "
        detail += f"{_brief(mask_url(location))}, not a valid URL: {exc}; not followed)"
        return ProtocolViolation("http-error", detail, **{**where, "status_code": status})
    if not isinstance(exc, httpx.HTTPError) or raised_by_app(exc):
        return None
    if isinstance(exc, httpx.TimeoutException):
        detail = f"{answering(where)} no answer within {timeout:g} s ({exc!r})"
        return ProtocolViolation("timeout", detail.lstrip(), **where)
    detail = f"{type(exc).__name__}: {str(exc) or 'the connection broke (no detail given)'}"
    if answering(where):
        detail = f"{answering(where)}: {detail}"
    return ProtocolViolation("connection-error", detail, **where)


async def _decoded(
    reply: httpx.Response, max_bytes: int, seconds: float, where: dict[str, Any]
) -> AsyncGenerator[bytes, None]:
    """The reply's body, decoded, in chunks; its failures (not the caller's) as violations."""
    try:
        decoder = BodyDecoder(reply.headers.get("content-encoding"))
    except UnsupportedEncoding as exc:
        raise ProtocolViolation("bad-encoding", str(exc), **where) from None
    received = 0
    try:
        async with drained(reply) as raw:
            async for data in raw:
                for chunk in decoder.feed(data):
                    received += len(chunk)
                    if received > max_bytes:
                        raise _too_large(max_bytes, where)
                    yield chunk
    except zlib.error as exc:
        detail = f"the body does not decode: {exc}"
        raise ProtocolViolation("bad-encoding", detail, **where) from None
    except httpx.HTTPError as exc:  # a read over the network (an in-process body is buffered)
        violation = http_violation(exc, seconds, where)
        if violation is None:
            raise
        raise violation from exc


async def send_turn(
    client: httpx.AsyncClient,
    url: str,
    event: Mapping[str, Any],
    secret: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - a protocol bound, reported as a violation
    strict: bool = False,
    on_event: OnEvent | None = None,
    max_bytes: int = MAX_REPLY_BYTES,
    max_events: int = MAX_TURN_EVENTS,
) -> TurnResult:
    """POST a signed turn event to ``url`` and check the SSE reply as it streams.

    ``on_event`` sees each event as soon as it is parsed and checked. Raises
    :class:`ProtocolViolation`; the whole turn must complete within ``timeout`` seconds,
    in at most ``max_bytes`` (decoded) and ``max_events`` events (else ``too-large``).
    """
    check_event(event)
    check_callable("on_event", on_event, sync=True)
    turn_id = event.get("turn_id", "")  # not str(): a 5 or None compared as "5" or "None"
    check_type(
        "event['turn_id']", turn_id, str, "a str (to test a backend's answer to another, post() it)"
    )
    kind = str(event.get("type", ""))
    checker = TurnChecker(turn_id, event_type=kind, strict=strict, max_events=max_events)
    parser = SSEParser()
    where: dict[str, Any] = {"event_type": kind, "turn_id": turn_id}

    def late() -> str:
        state = "after response.end the stream stayed open" if checker.ended else "no response.end"
        if "status_code" not in where:
            return f"not answered within {timeout:g} s (no status line and headers)"
        return f"turn not complete within {timeout:g} s ({state})"

    first_tts: float | None = None
    started = time.perf_counter()
    request = signed_request(client, url, event, secret, headers)
    async with exchange(client, request, timeout, max_bytes, where, range(200, 201), late) as reply:
        content_type = reply.headers.get("content-type", "")
        # the essence of the last of several values, as Fetch takes it
        if content_type.rpartition(",")[2].partition(";")[0].strip().lower() != "text/event-stream":
            raise ProtocolViolation(
                "wrong-content-type",
                f"{answering(where)} answered Content-Type {_brief(content_type or '(none)')}, "
                "expected text/event-stream",
                **where,
            )
        async with aclosing(_decoded(reply, max_bytes, timeout, where)) as chunks:
            async for chunk in chunks:
                for sse in parser.feed(chunk):
                    checked = checker.check(sse)
                    if first_tts is None and checked["type"] == "response.tts":
                        first_tts = time.perf_counter() - started
                    if on_event is not None:
                        on_event(checked)
        parser.close()
        checker.finish(pending=parser.pending)
    return TurnResult(
        turn_id=turn_id,
        events=checker.events,
        status_code=reply.status_code,
        headers=dict(reply.headers),
        time_to_first_tts=first_tts,
        duration=time.perf_counter() - started,
        errors=checker.errors,
    )


async def send_json_event(
    client: httpx.AsyncClient,
    url: str,
    event: Mapping[str, Any],
    secret: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - a protocol bound, reported as a violation
    max_bytes: int = MAX_REPLY_BYTES,
) -> JSONResult:
    """POST a signed non-turn event to ``url``; require a 2xx reply, its body JSON or none
    (``body`` is then ``None``), ``max_bytes`` at most."""
    check_event(event)
    kind = str(event.get("type", ""))
    where: dict[str, Any] = {"event_type": kind, "turn_id": event.get("turn_id")}
    started = time.perf_counter()
    content = bytearray()
    late = f"not answered within {timeout:g} s"
    request = signed_request(client, url, event, secret, headers)
    async with (
        exchange(client, request, timeout, max_bytes, where, range(200, 300), late) as reply,
        aclosing(_decoded(reply, max_bytes, timeout, where)) as chunks,
    ):
        async for chunk in chunks:
            content += chunk
    try:  # no body (a 204, an empty 2xx) is an answer too: LayerCode needs only the status
        answer = decode_json(content) if content else None
    except _UNDECODABLE:
        why = _out_of_range(content) or "is not JSON"
        detail = f"{answering(where)} reply {why}: {_excerpt(bytes(content))!r}".lstrip()
        raise ProtocolViolation("bad-json", detail, **where) from None
    return JSONResult(
        body=answer,
        status_code=reply.status_code,
        headers=dict(reply.headers),
        duration=time.perf_counter() - started,
        empty=not content,
    )


async def send_event(
    client: httpx.AsyncClient,
    url: str,
    event: Mapping[str, Any],
    secret: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - a protocol bound, reported as a violation
    strict: bool = False,
    on_event: OnEvent | None = None,
    max_bytes: int = MAX_REPLY_BYTES,
    max_events: int = MAX_TURN_EVENTS,
) -> TurnResult | JSONResult:
    """:func:`send_turn` for ``session.start`` / ``message``, :func:`send_json_event` else."""
    check_event(event)
    if event.get("type") in TURN_TYPES:
        return await send_turn(
            client,
            url,
            event,
            secret,
            headers=headers,
            timeout=timeout,
            strict=strict,
            on_event=on_event,
            max_bytes=max_bytes,
            max_events=max_events,
        )
    return await send_json_event(
        client, url, event, secret, headers=headers, timeout=timeout, max_bytes=max_bytes
    )
