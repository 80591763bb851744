"""Typed LayerCode webhook events (PROTOCOL.md §3), decoded from the raw body with msgspec.

Each of the five events is an immutable :class:`msgspec.Struct`; :func:`parse_webhook_payload`
decodes a body into the right one in a single pass. The decoding rules (unknown fields,
``null``, timestamps, the errors naming the field path) are in docs/events.md. Encoding
omits fields holding their default (``None``): an absent field and a ``null`` one decode
alike, and signatures are computed over the original bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Final, Literal, TypeAlias

import msgspec

from .errors import LayercodeError, check_type
from .jsonwire import without_lone_surrogates

__all__ = [
    "EVENT_TYPES",
    "DataPayload",
    "InvalidPayloadError",
    "LayercodeEventType",
    "MessagePayload",
    "SessionEndPayload",
    "SessionStartPayload",
    "SessionUpdatePayload",
    "TranscriptItem",
    "TurnEvent",
    "UnknownEventError",
    "WebhookPayload",
    "parse_webhook_payload",
]


class LayercodeEventType(StrEnum):
    """The five webhook event types, as sent in the ``type`` field (members are strings).

    ``__eq__`` is spelled out with ``str`` semantics so that ``payload.type ==
    LayercodeEventType.MESSAGE`` (a ``Literal`` string against a member) passes mypy --strict.
    """

    SESSION_START = "session.start"
    MESSAGE = "message"
    DATA = "data"
    SESSION_UPDATE = "session.update"
    SESSION_END = "session.end"

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)

    __hash__ = str.__hash__


EVENT_TYPES: Final[frozenset[str]] = frozenset(member.value for member in LayercodeEventType)
"""Every ``type`` string this version understands."""


# -- errors ----------------------------------------------------------------------------


class InvalidPayloadError(LayercodeError, ValueError):
    """A webhook body is not a valid LayerCode event.

    Attributes:
        path: JSON path of the offending value, ``$`` for the document itself
            (e.g. ``$.turn_id``, ``$.transcript[1].text``).
        detail: what was wrong, without the path.
    """

    def __init__(self, detail: str, path: str = "$") -> None:
        check_type("detail", detail, str, "a str")
        check_type("path", path, str, "a str")
        self.detail = detail
        self.path = path
        super().__init__(f"invalid webhook payload at `{path}`: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.detail, self.path))


class UnknownEventError(InvalidPayloadError):
    """A well-formed JSON object whose ``type`` string is not one of the five known events.

    Most likely LayerCode is newer than this library; servers usually acknowledge such
    events instead of rejecting them.

    Attributes:
        event_type: the ``type`` value as received (always a ``str``).
        conversation_id: the event's ``conversation_id`` when it is a string, else ``None``.
    """

    def __init__(self, event_type: str, conversation_id: str | None = None) -> None:
        check_type("event_type", event_type, str, "a str")
        check_type("conversation_id", conversation_id, str | None, "a str or None")
        self.event_type = event_type
        self.conversation_id = conversation_id
        shown = event_type if len(event_type) <= 80 else event_type[:77] + "..."
        super().__init__(f"unknown event type {shown!r}", "$.type")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.event_type, self.conversation_id))


# -- structs ---------------------------------------------------------------------------


class TranscriptItem(
    msgspec.Struct,
    kw_only=True,
    frozen=True,
    omit_defaults=True,
    repr_omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """One utterance of a transcript.

    ``gc=False``: frozen, and ``extra`` holds only decoded JSON, which cannot refer back to
    the item (decodes a long transcript about 10% faster).

    Attributes:
        role: who spoke, ``"user"`` or ``"assistant"`` (kept as a plain ``str``).
        text: what was said (required, as in the reference SDK).
        timestamp: unix milliseconds (``int`` or ``float``) or an ISO-8601 string, as
            received; ``None`` when absent or null.
        extra: the item's fields this version does not know (LayerCode adds fields over
            time), as decoded JSON by name; ``None`` when there are none. Encoding writes
            them under an ``extra`` key, which decodes back to an equal item.
    """

    role: str
    text: str
    timestamp: int | float | str | None = None
    extra: dict[str, Any] | None = None


class _WebhookPayloadBase(
    msgspec.Struct,
    tag_field="type",
    forbid_unknown_fields=False,
    kw_only=True,
    frozen=True,
    omit_defaults=True,
    repr_omit_defaults=True,
):
    """Shared configuration of the five event structs. No fields: msgspec puts a kw-only
    subclass's fields before its parent's, so each declares all its own, in wire order.
    ``type`` is the tag msgspec writes; the ClassVar of each subclass is for readers."""


class SessionStartPayload(_WebhookPayloadBase, tag="session.start", frozen=True):
    """``session.start``: a new voice session begins (the agent may speak first).

    Answered with an SSE stream. ``turn_id`` identifies the welcome turn.
    """

    type: ClassVar[Literal["session.start"]] = "session.start"

    session_id: str
    conversation_id: str
    turn_id: str
    text: str | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class MessagePayload(_WebhookPayloadBase, tag="message", frozen=True):
    """``message``: the user's speech was transcribed. Answered with an SSE stream.

    ``transcript`` is accepted either as a string (how the reference SDK types it) or as a
    list of :class:`TranscriptItem` (the shape ``session.end`` uses), whichever arrives.
    """

    type: ClassVar[Literal["message"]] = "message"

    session_id: str
    conversation_id: str
    turn_id: str
    text: str | None = None
    recording_url: str | None = None
    recording_status: str | None = None
    transcript: str | list[TranscriptItem] | None = None
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class DataPayload(_WebhookPayloadBase, tag="data", frozen=True):
    """``data``: the client sent structured JSON with ``client.response.data``.

    ``data`` may be *any* JSON value, relayed as the front end sent it (``{}`` when absent,
    as in the reference SDK): check its shape where it is used.
    """

    type: ClassVar[Literal["data"]] = "data"

    session_id: str
    conversation_id: str
    turn_id: str
    data: Any = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class SessionUpdatePayload(_WebhookPayloadBase, tag="session.update", frozen=True):
    """``session.update``: asynchronous session data is ready (e.g. a recording).

    Attributes (besides the common ones):
        recording_status: ``"completed"`` or ``"failed"``.
        recording_url: where to download the WAV recording.
        recording_duration: in seconds.
        error_message: details when the recording failed.
    """

    type: ClassVar[Literal["session.update"]] = "session.update"

    session_id: str
    conversation_id: str
    recording_status: str | None = None
    recording_url: str | None = None
    recording_duration: float | None = None
    error_message: str | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


class SessionEndPayload(_WebhookPayloadBase, tag="session.end", frozen=True):
    """``session.end``: the session finished; carries metrics and the full transcript.

    Attributes (besides the common ones):
        started_at, ended_at: ISO-8601 timestamps, as strings.
        duration: milliseconds; an ``int``, or a ``float`` if one is sent.
        transcription_duration_seconds, tts_duration_seconds, latency: seconds.
        recording_status: ``"enabled"`` or ``"disabled"``.
        transcript: the conversation, oldest first.
    """

    type: ClassVar[Literal["session.end"]] = "session.end"

    session_id: str
    conversation_id: str
    agent_id: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration: int | float | None = None
    transcription_duration_seconds: float | None = None
    tts_duration_seconds: float | None = None
    latency: float | None = None
    ip_address: str | None = None
    country_code: str | None = None
    recording_status: str | None = None
    transcript: list[TranscriptItem] | None = None
    metadata: dict[str, Any] | None = None
    custom_metadata: dict[str, Any] | None = None
    from_phone_number: str | None = None
    to_phone_number: str | None = None


WebhookPayload: TypeAlias = (
    SessionStartPayload | MessagePayload | DataPayload | SessionUpdatePayload | SessionEndPayload
)
"""Any webhook event; a union tagged on ``type``. Works with ``isinstance`` too."""

TurnEvent: TypeAlias = SessionStartPayload | MessagePayload
"""The two events that open a turn and are answered with a stream of events."""


# -- decoding --------------------------------------------------------------------------


class _TypeProbe(msgspec.Struct, frozen=True):
    """Used only after an unknown tag: checks the document and reads its ``type`` (and its
    ``conversation_id``, for the log line)."""

    type: str
    conversation_id: object = None


_decode_json = msgspec.json.Decoder(WebhookPayload).decode
_PROBE_DECODER: Final[msgspec.json.Decoder[_TypeProbe]] = msgspec.json.Decoder(_TypeProbe)

# msgspec's messages look like "Expected `str`, got `int` - at `$.turn_id`", or
# "... - at `key` in `$.metadata`" for a bad object key, or carry no location at all
# for the document itself. Field names never contain backticks, so the path does not.
_LOCATED = re.compile(r"\A(?P<detail>.*) - at (?P<key>`key` in )?`(?P<path>\$[^`]*)`\Z", re.DOTALL)
_MISSING = re.compile(r"\AObject missing required field `(?P<field>[^`]*)`\Z")
_BAD_TAG = "Invalid value "


def parse_webhook_payload(raw: bytes | str | Mapping[str, Any]) -> WebhookPayload:
    """Decode a LayerCode webhook body into the event struct matching its ``type``.

    Args:
        raw: the request body as received (``bytes``; ``bytearray``/``memoryview`` work
            too), the same JSON as ``str``, or an already-parsed mapping (converted with
            :func:`msgspec.convert` under the same rules as JSON: strict types, string
            keys, unknown fields ignored). Values inside free-form fields of a mapping
            (``data``, ``metadata``...) are taken over as they are, not copied or checked.

    Returns:
        A :class:`SessionStartPayload`, :class:`MessagePayload`, :class:`DataPayload`,
        :class:`SessionUpdatePayload` or :class:`SessionEndPayload`.

    Raises:
        UnknownEventError: well-formed JSON object whose ``type`` is an unknown string.
        InvalidPayloadError: anything else that is not a valid event (malformed or
            truncated JSON, invalid UTF-8 in what is read, too deep nesting, not an object,
            missing or mistyped field, unsupported input type). Nothing else is raised, except
            non-``ValueError`` exceptions from the methods of a caller's ``Mapping`` class.
    """
    # Hot path first: one C call. Only the decode runs inside ``try`` and no user code
    # runs during it, so the ``except`` clauses cannot hide anything but decode failures.
    try:
        return _decode_json(raw)  # type: ignore[arg-type]  # a Mapping raises TypeError
    except (ValueError, RecursionError) as exc:  # msgspec errors, UnicodeError, bad buffer
        repaired = without_lone_surrogates(raw)
        if repaired is None and not _is_item_extra(exc):
            raise _translate(exc, raw) from exc
    except TypeError:
        return _parse_other(raw)  # not bytes, str or a buffer
    # outside the except block: no chained errors
    if repaired is not None:
        return parse_webhook_payload(repaired)  # once: ``repaired`` has no lone half left
    return _parse_keeping_item_extras(raw)


def _parse_other(raw: object) -> WebhookPayload:
    """The inputs msgspec's JSON decoder does not take: mappings, ``str`` subclasses."""
    if isinstance(raw, Mapping):
        try:
            tag = raw.get("type")
            if isinstance(tag, str) and type(tag) is not str:
                # msgspec matches tags on exact ``str`` only; accept e.g. a
                # LayercodeEventType member, as JSON input would.
                raw = {**raw, "type": str.__str__(tag)}
            result: WebhookPayload = msgspec.convert(raw, WebhookPayload)
        except (ValueError, RecursionError) as exc:
            if not _is_item_extra(exc):
                raise _translate(exc, raw) from exc
            return _parse_keeping_item_extras(raw)
        return result
    if isinstance(raw, str):  # msgspec takes an exact ``str`` only
        return parse_webhook_payload(str.__str__(raw))
    raise InvalidPayloadError(f"expected bytes, str or a mapping, got {type(raw).__name__}")


# A transcript item with a field this version does not know (TranscriptItem forbids them,
# so that the one-pass decode stays the common case), or a non-object ``extra`` key. The
# field's name is as received: it may hold backticks.
_ITEM_EXTRA = re.compile(
    r"\A(Object contains unknown field `.*` - at `\$\.transcript\[\d+\]`"
    r"|.* - at `\$\.transcript\[\d+\]\.extra`)\Z",
    re.DOTALL,
)


class _ItemCheck(msgspec.Struct, frozen=True, gc=False):
    """A transcript item's known fields, its others ignored: checks items in one pass."""

    role: str
    text: str
    timestamp: int | float | str | None = None


def _is_item_extra(exc: BaseException) -> bool:
    return isinstance(exc, msgspec.ValidationError) and _ITEM_EXTRA.match(str(exc)) is not None


def _parse_keeping_item_extras(raw: object) -> WebhookPayload:
    """Second pass, when a transcript item has unknown fields: moved into its ``extra``."""
    document: Any = raw
    if not isinstance(raw, Mapping):
        try:
            document = msgspec.json.decode(raw)  # type: ignore[call-overload]  # bytes/str/buffer
        except (ValueError, RecursionError) as exc:
            raise _translate(exc, raw, probe_unknown=False) from exc
    items = document.get("transcript")
    if isinstance(items, list):
        document = {**document, "transcript": _items_keeping_extras(items)}
    try:
        result: WebhookPayload = msgspec.convert(document, WebhookPayload)
    except (ValueError, RecursionError) as exc:
        raise _translate(exc, document) from exc
    return result


def _items_keeping_extras(items: list[Any]) -> list[TranscriptItem]:
    """``{"role", "text", "timestamp", **others}`` items -> items with ``extra=others``.

    One C pass checks every item first, so a bad transcript costs no Python step per item;
    then each item's other fields are copied out with C calls only (two dict
    comprehensions per item held the event loop for a quarter of a second on 1 MiB).
    """
    try:
        checked = msgspec.convert(items, list[_ItemCheck])
    except (ValueError, RecursionError) as exc:
        error = _translate(exc, items, probe_unknown=False)
        raise InvalidPayloadError(error.detail, "$.transcript" + error.path[1:]) from exc
    result = []
    for item, known in zip(items, checked, strict=True):
        others = dict(item)
        del others["role"], others["text"]
        others.pop("timestamp", None)
        result.append(
            TranscriptItem(
                role=known.role, text=known.text, timestamp=known.timestamp, extra=others or None
            )
        )
    return result


def _translate(
    exc: BaseException, raw: object, *, probe_unknown: bool = True
) -> InvalidPayloadError:
    """Turn a decode failure into the :class:`InvalidPayloadError` to raise."""
    if isinstance(exc, msgspec.ValidationError) and probe_unknown:
        return _unknown_or_invalid(exc, raw)
    if isinstance(exc, msgspec.DecodeError):  # ValidationError included
        return _invalid_from_msgspec(exc)
    if isinstance(exc, UnicodeError):
        return InvalidPayloadError(f"input is not valid UTF-8 ({exc})")
    if isinstance(exc, RecursionError):
        return InvalidPayloadError("JSON is nested too deeply")
    return InvalidPayloadError(f"unreadable input ({exc})")  # e.g. a released memoryview


def _invalid_from_msgspec(exc: msgspec.DecodeError) -> InvalidPayloadError:
    """Translate a msgspec error into an :class:`InvalidPayloadError` with its path."""
    message = str(exc)
    located = _LOCATED.match(message)
    if located is None:
        detail, path = message, "$"
    else:
        detail, path = located["detail"], located["path"]
        if located["key"]:
            detail += " (in an object key)"
    missing = _MISSING.match(detail)
    if missing is not None:
        path = f"{path}.{missing['field']}"
    return InvalidPayloadError(detail, path)


def _unknown_or_invalid(exc: msgspec.ValidationError, raw: object) -> InvalidPayloadError:
    """The error of a failed typed decode of *raw* (bytes, buffer or mapping).

    msgspec reports an unknown ``type`` as an invalid value at ``$.type`` and may stop there:
    then a probe of ``type`` alone reads the whole document. A well-formed object with a
    string ``type`` is an *unknown* event, anything else invalid for the probe's reason.
    """
    error = _invalid_from_msgspec(exc)
    if error.path != "$.type" or not error.detail.startswith(_BAD_TAG):
        return error
    try:
        if isinstance(raw, Mapping):
            probe: _TypeProbe = msgspec.convert(raw, _TypeProbe)
        else:
            probe = _PROBE_DECODER.decode(raw)  # type: ignore[arg-type]  # bytes/buffer
    except (ValueError, RecursionError) as probe_exc:
        return _translate(probe_exc, raw, probe_unknown=False)
    if probe.type in EVENT_TYPES:  # the probe saw a later ``type`` key (JSON.parse's)
        return InvalidPayloadError("duplicate `type` keys with different values", "$.type")
    conversation_id = probe.conversation_id
    return UnknownEventError(
        str.__str__(probe.type),
        str.__str__(conversation_id) if isinstance(conversation_id, str) else None,
    )
