"""Tests for layercode_asgi.events: typed webhook events and parse_webhook_payload."""

from __future__ import annotations

import gc
import json
import pickle
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layercode_asgi.errors import LayercodeError
from layercode_asgi.events import (
    EVENT_TYPES,
    DataPayload,
    InvalidPayloadError,
    LayercodeEventType,
    MessagePayload,
    SessionEndPayload,
    SessionStartPayload,
    SessionUpdatePayload,
    TranscriptItem,
    UnknownEventError,
    WebhookPayload,
    parse_webhook_payload,
)

#: The events that carry a ``turn_id`` (the two that open a turn, and ``data``).
TURN_ID_TYPES = frozenset({"session.start", "message", "data"})
WithTurnId = SessionStartPayload | MessagePayload | DataPayload

CLASSES: dict[str, type[Any]] = {
    "session.start": SessionStartPayload,
    "message": MessagePayload,
    "data": DataPayload,
    "session.update": SessionUpdatePayload,
    "session.end": SessionEndPayload,
}

COMMON_OPTIONAL = ("metadata", "custom_metadata", "from_phone_number", "to_phone_number")


def raw(body: Mapping[str, Any]) -> bytes:
    """The body as LayerCode would send it: compact JSON, UTF-8, no \\u escapes."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def parse_all_ways(body: Mapping[str, Any]) -> WebhookPayload:
    """Parse from bytes, str and Mapping; all three must agree."""
    from_bytes = parse_webhook_payload(raw(body))
    assert parse_webhook_payload(raw(body).decode()) == from_bytes
    assert parse_webhook_payload(body) == from_bytes
    return from_bytes


def expect_error(data: Any) -> InvalidPayloadError:
    with pytest.raises(InvalidPayloadError) as info:
        parse_webhook_payload(data)
    return info.value


# --------------------------------------------------------------------------------------
# Sample bodies, one per event type, with every field of PROTOCOL.md §3 and the seed
# --------------------------------------------------------------------------------------

IDS = {"session_id": "sess_abc123", "conversation_id": "conv_xyz789"}
PHONES = {"from_phone_number": "+14155550100", "to_phone_number": "+442071838750"}

FULL_BODIES: dict[str, dict[str, Any]] = {
    "session.start": {
        "type": "session.start",
        **IDS,
        "turn_id": "turn_0",
        "text": "Welcome! How can I help?",
        "metadata": {"user_id": "u1", "tier": 2},
        "custom_metadata": {"campaign": "spring", "nested": {"a": [1, 2]}},
        **PHONES,
    },
    "message": {
        "type": "message",
        **IDS,
        "turn_id": "turn_1",
        "text": "Quiero reservar una mesa para dos, por favor. 🍽",
        "recording_url": "https://example.com/rec/turn_1.wav",
        "recording_status": "completed",
        "transcript": [
            {"role": "assistant", "text": "Welcome!", "timestamp": 1731400000000},
            {"role": "user", "text": "Quiero reservar…", "timestamp": "2024-11-12T08:26:42Z"},
        ],
        "usage": {"stt_seconds": 2.5, "tokens": 37},
        "metadata": {"user_id": "u1"},
        "custom_metadata": {"k": "v"},
        **PHONES,
    },
    "data": {
        "type": "data",
        **IDS,
        "turn_id": "turn_2",
        "data": {"action": "button_click", "id": "confirm", "values": [1, 2.5, None, True]},
        "metadata": {"m": 1},
        "custom_metadata": {"c": 2},
        **PHONES,
    },
    "session.update": {
        "type": "session.update",
        **IDS,
        "recording_status": "completed",
        "recording_url": "https://example.com/rec/session.wav",
        "recording_duration": 183.25,
        "error_message": None,
        "metadata": {"m": 1},
        "custom_metadata": {"c": 2},
        **PHONES,
    },
    "session.end": {
        "type": "session.end",
        **IDS,
        "agent_id": "ag_123",
        "started_at": "2024-11-12T08:26:40.000Z",
        "ended_at": "2024-11-12T08:29:57.500Z",
        "duration": 197500,
        "transcription_duration_seconds": 61.5,
        "tts_duration_seconds": 88.75,
        "latency": 0.734,
        "ip_address": "203.0.113.42",
        "country_code": "GB",
        "recording_status": "enabled",
        "transcript": [
            {"role": "assistant", "text": "Hello there", "timestamp": 1731400000000},
            {"role": "user", "text": "Hi, ça va ?", "timestamp": 1731400002750.5},
            {"role": "assistant", "text": "Très bien.", "timestamp": "2024-11-12T08:26:45.250Z"},
            {"role": "user", "text": "Bye", "timestamp": None},
            {"role": "assistant", "text": ""},
        ],
        "metadata": {"user_id": "u1"},
        "custom_metadata": {"plan": "pro"},
        **PHONES,
    },
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "session.start": ("session_id", "conversation_id", "turn_id"),
    "message": ("session_id", "conversation_id", "turn_id"),
    "data": ("session_id", "conversation_id", "turn_id", "data"),
    "session.update": ("session_id", "conversation_id"),
    "session.end": ("session_id", "conversation_id"),
}

NUMBER_FIELDS: dict[str, tuple[str, ...]] = {
    "session.update": ("recording_duration",),
    "session.end": (
        "duration",
        "transcription_duration_seconds",
        "tts_duration_seconds",
        "latency",
    ),
}


def test_every_event_class_and_tag() -> None:
    assert set(CLASSES) == EVENT_TYPES == {member.value for member in LayercodeEventType}
    for type_name, cls in CLASSES.items():
        assert cls.type == type_name
        assert cls.__struct_config__.tag == type_name
        assert cls.__struct_config__.tag_field == "type"
        assert "type" not in cls.__struct_fields__
        assert cls.__struct_fields__[:2] == ("session_id", "conversation_id")
        for name in COMMON_OPTIONAL:
            assert name in cls.__struct_fields__
        assert ("turn_id" in cls.__struct_fields__) == (type_name in TURN_ID_TYPES)


@pytest.mark.parametrize("type_name", list(FULL_BODIES))
def test_full_body_every_field(type_name: str) -> None:
    body = FULL_BODIES[type_name]
    payload = parse_all_ways(body)
    assert type(payload) is CLASSES[type_name]
    assert payload.type == type_name
    assert payload.type == LayercodeEventType(type_name)
    for key, value in body.items():
        if key in ("type", "transcript"):
            continue
        assert getattr(payload, key) == value, key
    assert set(body) - {"type"} <= set(type(payload).__struct_fields__)


def test_full_message_fields_exactly() -> None:
    payload = parse_webhook_payload(raw(FULL_BODIES["message"]))
    assert isinstance(payload, MessagePayload)
    assert payload.session_id == "sess_abc123"
    assert payload.conversation_id == "conv_xyz789"
    assert payload.turn_id == "turn_1"
    assert payload.text == "Quiero reservar una mesa para dos, por favor. 🍽"
    assert payload.recording_url == "https://example.com/rec/turn_1.wav"
    assert payload.recording_status == "completed"
    assert payload.transcript == [
        TranscriptItem(role="assistant", text="Welcome!", timestamp=1731400000000),
        TranscriptItem(role="user", text="Quiero reservar…", timestamp="2024-11-12T08:26:42Z"),
    ]
    assert payload.usage == {"stt_seconds": 2.5, "tokens": 37}
    assert payload.metadata == {"user_id": "u1"}
    assert payload.custom_metadata == {"k": "v"}
    assert payload.from_phone_number == "+14155550100"
    assert payload.to_phone_number == "+442071838750"


def test_full_session_end_fields_exactly() -> None:
    payload = parse_webhook_payload(raw(FULL_BODIES["session.end"]))
    assert isinstance(payload, SessionEndPayload)
    assert payload.agent_id == "ag_123"
    assert payload.started_at == "2024-11-12T08:26:40.000Z"
    assert payload.ended_at == "2024-11-12T08:29:57.500Z"
    assert payload.duration == 197500
    assert type(payload.duration) is int
    assert payload.transcription_duration_seconds == 61.5
    assert payload.tts_duration_seconds == 88.75
    assert payload.latency == 0.734
    assert payload.ip_address == "203.0.113.42"
    assert payload.country_code == "GB"
    assert payload.recording_status == "enabled"
    assert payload.transcript is not None
    assert [item.role for item in payload.transcript] == ["assistant", "user"] * 2 + ["assistant"]
    assert [item.text for item in payload.transcript] == [
        "Hello there",
        "Hi, ça va ?",
        "Très bien.",
        "Bye",
        "",
    ]
    stamps = [item.timestamp for item in payload.transcript]
    assert stamps == [1731400000000, 1731400002750.5, "2024-11-12T08:26:45.250Z", None, None]
    assert [type(s) for s in stamps] == [int, float, str, type(None), type(None)]
    assert payload.metadata == {"user_id": "u1"}
    assert payload.custom_metadata == {"plan": "pro"}


def test_full_session_update_and_data() -> None:
    update = parse_webhook_payload(raw(FULL_BODIES["session.update"]))
    assert isinstance(update, SessionUpdatePayload)
    assert update.recording_status == "completed"
    assert update.recording_duration == 183.25
    assert update.error_message is None
    failed = parse_webhook_payload(
        raw(
            {
                "type": "session.update",
                **IDS,
                "recording_status": "failed",
                "error_message": "storage unavailable",
                "recording_duration": 12,
            }
        )
    )
    assert isinstance(failed, SessionUpdatePayload)
    assert failed.recording_status == "failed"
    assert failed.error_message == "storage unavailable"
    assert failed.recording_duration == 12.0
    assert type(failed.recording_duration) is float
    assert failed.recording_url is None

    data = parse_webhook_payload(raw(FULL_BODIES["data"]))
    assert isinstance(data, DataPayload)
    assert data.turn_id == "turn_2"
    assert data.data == {"action": "button_click", "id": "confirm", "values": [1, 2.5, None, True]}


@pytest.mark.parametrize("type_name", list(FULL_BODIES))
def test_only_required_fields(type_name: str) -> None:
    body = {"type": type_name, **{k: FULL_BODIES[type_name][k] for k in REQUIRED[type_name]}}
    payload = parse_all_ways(body)
    assert type(payload) is CLASSES[type_name]
    for name in type(payload).__struct_fields__:
        expected = body.get(name)
        assert getattr(payload, name) == expected, name


@pytest.mark.parametrize("type_name", list(FULL_BODIES))
def test_every_optional_field_null(type_name: str) -> None:
    cls = CLASSES[type_name]
    body: dict[str, Any] = {"type": type_name}
    for name in cls.__struct_fields__:
        body[name] = FULL_BODIES[type_name][name] if name in REQUIRED[type_name] else None
    payload = parse_all_ways(body)
    assert payload == parse_all_ways(
        {"type": type_name, **{k: body[k] for k in REQUIRED[type_name]}}
    )
    for name in NUMBER_FIELDS.get(type_name, ()):
        assert getattr(payload, name) is None


@pytest.mark.parametrize("type_name", list(FULL_BODIES))
def test_unknown_extra_fields_are_ignored(type_name: str) -> None:
    body = dict(FULL_BODIES[type_name])
    extra = {
        "zz_new_field": {"deep": [1, {"x": None}], "s": "é"},
        "another": [True, False, None, 1e300, -0.0, "x" * 1000],
        "agent_version": 7,
    }
    # the tag need not come first
    reordered = {**extra, **{k: v for k, v in body.items() if k != "type"}, "type": type_name}
    assert parse_all_ways({**body, **extra}) == parse_all_ways(body) == parse_all_ways(reordered)
    if "transcript" in body and isinstance(body["transcript"], list):
        # ...but those of transcript items are kept, readable in ``extra``
        items = [{**item, "confidence": 0.9, "words": []} for item in body["transcript"]]
        with_extras = parse_all_ways({**body, "transcript": items})
        plain = parse_all_ways(body)
        assert with_extras.transcript == [  # type: ignore[union-attr]
            msgspec.structs.replace(item, extra={"confidence": 0.9, "words": []})
            for item in plain.transcript  # type: ignore[union-attr]
        ]


@pytest.mark.parametrize("type_name", ["message", "session.end"])
def test_unknown_fields_of_transcript_items_are_kept_in_extra(type_name: str) -> None:
    base = {k: v for k, v in FULL_BODIES[type_name].items() if k != "transcript"}
    items = [
        {"role": "user", "text": "hi", "confidence": 0.93, "words": [{"w": "hi", "t": 10}]},
        {"role": "assistant", "text": "hello", "timestamp": 5},
        {"speaker_id": None, "text": "ok", "role": "user", "extra": 7},
    ]
    payload = parse_all_ways({**base, "transcript": items})
    assert payload.transcript == [  # type: ignore[union-attr]
        TranscriptItem(
            role="user", text="hi", extra={"confidence": 0.93, "words": [{"w": "hi", "t": 10}]}
        ),
        TranscriptItem(role="assistant", text="hello", timestamp=5),
        TranscriptItem(role="user", text="ok", extra={"speaker_id": None, "extra": 7}),
    ]
    assert payload.transcript[1].extra is None  # type: ignore[union-attr, index]
    # the rest of the event is decoded as usual
    assert payload == msgspec.structs.replace(
        parse_all_ways(base),
        transcript=payload.transcript,  # type: ignore[union-attr]
    )
    # encoding keeps them (under "extra") and decodes back to an equal event
    encoded = msgspec.json.encode(payload)
    assert json.loads(encoded)["transcript"][0]["extra"]["confidence"] == 0.93
    assert parse_webhook_payload(encoded) == payload


@pytest.mark.parametrize("name", ["a`b", "`", "x` - at `$.transcript[0]", "q\x1b[31m`\u2028"])
def test_transcript_item_fields_named_with_a_backtick_are_kept_in_extra(name: str) -> None:
    base = {k: v for k, v in FULL_BODIES["session.end"].items() if k != "transcript"}
    items = [{"role": "user", "text": "hi", name: 1}, {"role": "user", "text": "ok"}]
    payload = parse_all_ways({**base, "transcript": items})
    assert payload.transcript == [  # type: ignore[union-attr]
        TranscriptItem(role="user", text="hi", extra={name: 1}),
        TranscriptItem(role="user", text="ok"),
    ]


def _python_calls(data: bytes) -> int:
    """How many Python functions run while ``data`` is decoded (it must be refused)."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event == "call"

    enabled = gc.isenabled()
    gc.collect()  # no weakref callbacks of earlier tests' garbage counted in between
    gc.disable()
    sys.setprofile(count)
    try:
        expect_error(data)
    finally:
        sys.setprofile(None)
        if enabled:
            gc.enable()
    return calls


def test_an_invalid_transcript_with_unknown_item_fields_is_refused_without_per_item_work() -> None:
    # Items with unknown fields take the slow pass (one Python step per item, up to a
    # quarter of a second for a 1 MiB body); an invalid transcript is refused before it.
    def body(items: int) -> bytes:
        head = {k: v for k, v in FULL_BODIES["session.end"].items() if k != "transcript"}
        return raw({**head, "transcript": [{"role": "u", "text": "a", "x": 1}] * items + [{}]})

    assert expect_error(body(10)).path == "$.transcript[10].role"
    assert _python_calls(body(2_000)) == _python_calls(body(10))


def test_transcript_item_extras_do_not_hide_errors() -> None:
    base = {k: v for k, v in FULL_BODIES["session.end"].items() if k != "transcript"}
    bad_text = [{"role": "u", "text": "a", "new": 1}, {"role": "u", "text": 7, "new": 2}]
    assert expect_error(raw({**base, "transcript": bad_text})).path == "$.transcript[1].text"
    assert expect_error({**base, "transcript": bad_text}).path == "$.transcript[1].text"
    not_an_item = [{"role": "u", "text": "a", "new": 1}, 3]
    assert expect_error(raw({**base, "transcript": not_an_item})).path == "$.transcript[1]"
    bad_id = {**base, "session_id": 5, "transcript": [{"role": "u", "text": "a", "new": 1}]}
    assert expect_error(raw(bad_id)).path == "$.session_id"
    truncated = raw({**base, "transcript": [{"role": "u", "text": "a", "new": 1}]})[:-1]
    error = expect_error(truncated)
    assert type(error) is InvalidPayloadError and error.path == "$"


def test_data_event_without_data_gets_an_empty_object() -> None:
    body = {k: v for k, v in FULL_BODIES["data"].items() if k != "data"}
    payload = parse_all_ways(body)
    assert isinstance(payload, DataPayload)
    assert payload.data == {}
    assert parse_all_ways({**body, "data": None}).data is None  # type: ignore[union-attr]


def test_phone_numbers_and_custom_metadata_on_every_event() -> None:
    for type_name in FULL_BODIES:
        body = {
            "type": type_name,
            **{k: FULL_BODIES[type_name][k] for k in REQUIRED[type_name]},
            "from_phone_number": "+15550001111",
            "to_phone_number": "+15550002222",
            "custom_metadata": {"crm_id": 42, "tags": ["vip"]},
        }
        payload = parse_all_ways(body)
        assert payload.from_phone_number == "+15550001111"
        assert payload.to_phone_number == "+15550002222"
        assert payload.custom_metadata == {"crm_id": 42, "tags": ["vip"]}
        assert payload.metadata is None


def test_message_transcript_as_string_or_list() -> None:
    base = {"type": "message", **IDS, "turn_id": "t"}
    as_string = parse_webhook_payload(raw({**base, "transcript": "user: hi\nagent: hello"}))
    assert isinstance(as_string, MessagePayload)
    assert as_string.transcript == "user: hi\nagent: hello"
    as_list = parse_webhook_payload(raw({**base, "transcript": [{"role": "user", "text": "hi"}]}))
    assert isinstance(as_list, MessagePayload)
    assert as_list.transcript == [TranscriptItem(role="user", text="hi")]
    assert parse_webhook_payload(raw({**base, "transcript": []})).transcript == []  # type: ignore[union-attr]
    error = expect_error(raw({**base, "transcript": 5}))
    assert error.path == "$.transcript"


@pytest.mark.parametrize(
    "stamp",
    [0, 1731400000000, -1, 1731400000000.25, 1e15, "2024-11-12T08:26:40Z", "2024-11-12", "", None],
)
def test_transcript_timestamps(stamp: Any) -> None:
    body = {
        **FULL_BODIES["session.end"],
        "transcript": [{"role": "user", "text": "x", "timestamp": stamp}],
    }
    payload = parse_all_ways(body)
    assert isinstance(payload, SessionEndPayload)
    assert payload.transcript is not None
    assert payload.transcript[0].timestamp == stamp
    assert type(payload.transcript[0].timestamp) is type(stamp)


@pytest.mark.parametrize("stamp", [True, [], {}])
def test_transcript_timestamp_wrong_type(stamp: Any) -> None:
    body = {
        **FULL_BODIES["session.end"],
        "transcript": [{"role": "u", "text": "x", "timestamp": stamp}],
    }
    error = expect_error(raw(body))
    assert error.path == "$.transcript[0].timestamp"


@pytest.mark.parametrize("value", [1500, 1500.5, 0, None, 10**30])
def test_session_end_duration_accepts_int_float_null(value: Any) -> None:
    payload = parse_all_ways({"type": "session.end", **IDS, "duration": value})
    assert isinstance(payload, SessionEndPayload)
    assert payload.duration == value
    assert type(payload.duration) is type(value)


@pytest.mark.parametrize(
    "value", [None, {"a": 1}, [1, 2], "text", 3, 2.5, True, {"deep": [[[{"x": []}]]]}]
)
def test_data_accepts_any_json_value(value: Any) -> None:
    payload = parse_all_ways({"type": "data", **IDS, "turn_id": "t", "data": value})
    assert isinstance(payload, DataPayload)
    assert payload.data == value


# --------------------------------------------------------------------------------------
# Examples from PROTOCOL.md and the seeds
# --------------------------------------------------------------------------------------


def test_protocol_signature_example_body_is_not_a_valid_event() -> None:
    # PROTOCOL.md §2 signs the body {"type":"message"}: it lacks the required ids.
    error = expect_error(b'{"type":"message"}')
    assert type(error) is InvalidPayloadError
    assert error.path == "$.session_id"
    assert "$.session_id" in str(error)


def test_seed_parse_example_with_a_mapping() -> None:
    # sdk-reference.txt: parse_webhook_payload({"type": "session.start", ...})
    payload = parse_webhook_payload(
        {"type": "session.start", "session_id": "s", "conversation_id": "c", "turn_id": "t"}
    )
    assert isinstance(payload, SessionStartPayload)
    assert (payload.session_id, payload.conversation_id, payload.turn_id) == ("s", "c", "t")
    assert payload.text is None and payload.metadata is None


@pytest.mark.parametrize(
    ("body", "event_type"),
    [
        # server-api-reference.txt request example and test-client example
        (
            {
                "type": "transcript",
                "call_id": "call_123",
                "agent_id": "agent_456",
                "timestamp": "2025-01-15T10:30:00Z",
                "transcript": "Hello, how are you?",
                "metadata": {},
            },
            "transcript",
        ),
        ({"type": "call_started", "call_id": "test-123"}, "call_started"),
    ],
)
def test_seed_server_examples_are_unknown_events(body: dict[str, Any], event_type: str) -> None:
    for data in (raw(body), body):
        error = expect_error(data)
        assert isinstance(error, UnknownEventError)
        assert error.event_type == event_type


def test_seed_usage_idiom_type_comparison() -> None:
    payload = parse_webhook_payload(raw(FULL_BODIES["message"]))
    if payload.type == "message":
        assert payload.text
    else:  # pragma: no cover
        pytest.fail("type comparison did not match")
    assert payload.type == LayercodeEventType.MESSAGE
    assert payload.type != LayercodeEventType.DATA
    assert payload.type in TURN_ID_TYPES
    assert isinstance(payload, WithTurnId)  # PEP 604 unions work with isinstance
    assert isinstance(payload, WebhookPayload)
    assert not isinstance(parse_webhook_payload(raw(FULL_BODIES["session.end"])), WithTurnId)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["session.start", "message", "data"])
def test_missing_turn_id(type_name: str) -> None:
    body = {k: v for k, v in FULL_BODIES[type_name].items() if k != "turn_id"}
    for data in (raw(body), body):
        error = expect_error(data)
        assert type(error) is InvalidPayloadError
        assert error.path == "$.turn_id"
        assert "$.turn_id" in str(error)
        assert "missing" in str(error).lower()


@pytest.mark.parametrize(
    ("patch", "path", "words"),
    [
        ({"turn_id": 5}, "$.turn_id", ("str", "int")),
        ({"session_id": None}, "$.session_id", ("str", "null")),
        ({"metadata": [1]}, "$.metadata", ("object", "array")),
        ({"usage": "lots"}, "$.usage", ("object", "str")),
        ({"text": {"a": 1}}, "$.text", ("str", "object")),
        (
            {"transcript": [{"role": "u", "text": "a"}, {"role": "u", "text": 7}]},
            "$.transcript[1].text",
            ("str", "int"),
        ),
        ({"transcript": [{"text": "a"}]}, "$.transcript[0].role", ("missing",)),
        (
            {"transcript": [{"role": "u", "text": "a"}, {"role": "u"}]},
            "$.transcript[1].text",
            ("missing",),
        ),
        ({"transcript": [{"role": "u", "text": "a"}, 3]}, "$.transcript[1]", ("int",)),
    ],
)
def test_field_errors_name_the_path(
    patch: dict[str, Any], path: str, words: tuple[str, ...]
) -> None:
    body = {**FULL_BODIES["message"], **patch}
    for data in (raw(body), body):
        error = expect_error(data)
        assert type(error) is InvalidPayloadError
        assert error.path == path
        assert f"`{path}`" in str(error)
        for word in words:
            assert word in str(error).lower()


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"duration": "5"}, "$.duration"),
        ({"duration": True}, "$.duration"),
        ({"latency": "fast"}, "$.latency"),
        ({"transcript": {"role": "u"}}, "$.transcript"),
        ({"transcript": [{"role": "u", "text": None}]}, "$.transcript[0].text"),
        ({"started_at": 1731400000}, "$.started_at"),
    ],
)
def test_session_end_field_errors(patch: dict[str, Any], path: str) -> None:
    body = {**FULL_BODIES["session.end"], **patch}
    for data in (raw(body), body):
        error = expect_error(data)
        assert type(error) is InvalidPayloadError
        assert error.path == path, str(error)


def test_number_out_of_range() -> None:
    error = expect_error(
        b'{"type":"session.end","session_id":"s","conversation_id":"c","latency":1e400}'
    )
    assert error.path == "$.latency"
    assert "range" in error.detail


def test_mapping_with_str_subclass_type() -> None:
    body = {**FULL_BODIES["data"], "type": LayercodeEventType.DATA}
    payload = parse_webhook_payload(body)
    assert isinstance(payload, DataPayload)
    assert payload == parse_webhook_payload(raw(FULL_BODIES["data"]))
    unknown = expect_error({"type": type("Tag", (str,), {})("later")})
    assert isinstance(unknown, UnknownEventError)
    assert type(unknown.event_type) is str


def test_bad_object_key_in_mapping() -> None:
    body = {**FULL_BODIES["message"], "metadata": {1: "x"}}
    error = expect_error(body)
    assert error.path == "$.metadata"
    top = expect_error({**FULL_BODIES["message"], 7: "x"})
    assert top.path == "$"


def test_unknown_event_type() -> None:
    body = {"type": "response.future", **IDS, "turn_id": "t", "whatever": [1, 2]}
    for data in (raw(body), raw(body).decode(), body):
        error = expect_error(data)
        assert type(error) is UnknownEventError
        assert isinstance(error, InvalidPayloadError)
        assert isinstance(error, ValueError)
        assert isinstance(error, LayercodeError)
        assert error.event_type == "response.future"
        assert error.conversation_id == "conv_xyz789"  # for the webhook's log line
        assert error.path == "$.type"
        assert "response.future" in str(error)
    for other in (7, None, ["c"]):  # not a string: none
        assert expect_error({**body, "conversation_id": other}).conversation_id is None


def test_unknown_event_type_not_first_and_minimal() -> None:
    error = expect_error(b'{"session_id":"s","extra":{"a":[1]},"type":"session.pause"}')
    assert isinstance(error, UnknownEventError)
    assert error.event_type == "session.pause"
    assert isinstance(expect_error(b'{"type":""}'), UnknownEventError)
    long_type = "x" * 10_000
    long_error = expect_error(raw({"type": long_type}))
    assert isinstance(long_error, UnknownEventError)
    assert long_error.event_type == long_type
    assert len(str(long_error)) < 200


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"response.future","session_id":"s",',  # truncated after the tag
        b'{"type":"response.future","session_id":"s", oops}',
        b'{"type":"response.future"}garbage',
        b'{"type":"response.future","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_unknown_type_in_malformed_document_is_invalid_not_unknown(data: bytes) -> None:
    error = expect_error(data)
    assert type(error) is InvalidPayloadError
    assert error.path == "$"


def test_skipped_fields_are_not_utf8_checked_either_way() -> None:
    # msgspec does not validate the UTF-8 of values it skips (unknown fields); known and
    # unknown event types behave alike, and a *decoded* field is always checked.
    assert isinstance(expect_error(b'{"type":"response.future","x":"\xff"}'), UnknownEventError)
    body = b'{"type":"session.update","session_id":"s","conversation_id":"c","x":"\xff"}'
    assert parse_webhook_payload(body).session_id == "s"
    error = expect_error(b'{"type":"session.update","session_id":"\xff","conversation_id":"c"}')
    assert type(error) is InvalidPayloadError
    assert "UTF-8" in str(error)


def test_missing_and_non_string_type() -> None:
    for body in ({**IDS, "turn_id": "t"}, {}):
        error = expect_error(raw(body))
        assert type(error) is InvalidPayloadError
        assert error.path == "$.type"
    for bad in (1, None, True, ["message"], {"name": "message"}):
        body = {"type": bad, **IDS, "turn_id": "t"}
        for data in (raw(body), body):
            error = expect_error(data)
            assert type(error) is InvalidPayloadError
            assert error.path == "$.type"


def test_duplicate_type_keys_are_invalid() -> None:
    error = expect_error(b'{"type":"nope","type":"message","session_id":"s","conversation_id":"c"}')
    assert type(error) is InvalidPayloadError
    assert error.path == "$.type"
    # whichever comes first (readers such as JSON.parse take the last one), and the error
    # says so without echoing the values (huge, or with control characters)
    ids = b',"session_id":"s","conversation_id":"c","turn_id":"t",'
    for first, last in [
        (b'"message"', b'"session.end"'),
        (b'"data"', b'"message"'),
        (b'"' + b"x" * 100_000 + b'"', b'"message"'),
        (b'"\\u001b[31m\\u0000\\n"', b'"session.start"'),
    ]:
        error = expect_error(b'{"type":' + first + ids + b'"type":' + last + b"}")
        assert type(error) is InvalidPayloadError
        assert error.path == "$.type"
        assert error.detail == "duplicate `type` keys with different values"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"null",
        b"true",
        b"0",
        b"-1.5e3",
        b'"message"',
        b"[]",
        b'[{"type":"message"}]',
        b"{",
        b'{"type":"message"',
        b'{"type":"message",}',
        b"{'type':'message'}",
        b'{"type":"message"} {}',
        b"\xff\xfe{}",
        b'{"type":"message","session_id":"\xc3\x28","conversation_id":"c","turn_id":"t"}',
        b'{"type":"message","session_id":"s\x00","conversation_id":"c","turn_id":"t"}',
        b"NaN",
        b'{"type":"session.end","session_id":"s","conversation_id":"c","latency":NaN}',
        b"[" * 100_000,
        b"{" * 100_000,
        b'{"a":' * 100_000,
        b'{"type":"data","session_id":"s","conversation_id":"c","turn_id":"t","data":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        b'{"type":"message","session_id":"s","conversation_id":"c","turn_id":"t","metadata":{"x":'
        + b'{"y":' * 60_000
        + b"1"
        + b"}" * 60_001
        + b"}",
    ],
)
def test_malformed_documents(data: bytes) -> None:
    for variant in (data, bytearray(data), memoryview(data)):
        error = expect_error(variant)
        assert type(error) is InvalidPayloadError
        assert error.path.startswith("$")
        assert str(error)


def test_moderately_nested_data_is_fine() -> None:
    nested: Any = "leaf"
    for _ in range(200):
        nested = [nested]
    payload = parse_all_ways({"type": "data", **IDS, "turn_id": "t", "data": nested})
    assert isinstance(payload, DataPayload)
    assert payload.data == nested


@pytest.mark.parametrize("data", [None, 42, 3.5, ["type"], object(), {"type"}, ("a",)])
def test_unsupported_input_types(data: Any) -> None:
    error = expect_error(data)
    assert type(error) is InvalidPayloadError
    assert error.path == "$"


def test_str_input_edge_cases() -> None:
    class MyStr(str):
        pass

    text = raw(FULL_BODIES["message"]).decode()
    assert parse_webhook_payload(MyStr(text)) == parse_webhook_payload(text)
    body = '{"type":"message","session_id":"\ud800","conversation_id":"c","turn_id":"t"}'
    assert type(expect_error(body)) is InvalidPayloadError
    assert type(expect_error(MyStr(body))) is InvalidPayloadError
    assert type(expect_error("")) is InvalidPayloadError
    assert isinstance(expect_error(MyStr('{"type":"later"}')), UnknownEventError)


def test_a_lone_surrogate_escape_decodes_as_u_fffd() -> None:
    """JavaScript's JSON.stringify writes half an emoji as a lone ``\\ud83d`` escape (a string
    cut between the two halves), and JSON.parse, the Node SDK and the reference SDK accept it.
    It was a 400 for the whole event (a user's turn, a session's transcript lost); each lone
    surrogate escape, anywhere in the body, now decodes as U+FFFD, which UTF-8 can hold."""
    head = b'{"type":"message","session_id":"s","conversation_id":"c","turn_id":"t","text":"'
    cases = {
        b'\\ud83d"}': "\ufffd",
        b'a\\uD83D b"}': "a\ufffd b",
        b'\\\\\\ud800"}': "\\\ufffd",  # an escaped backslash, then the escape
        b'\\ude00x"}': "\ufffdx",  # a low half alone
        b'\\ud83d\\ud83d\\ude00"}': "\ufffd\U0001f600",  # a high half, then a pair
        b'\\ud83d\\ude00\\ude00"}': "\U0001f600\ufffd",
        b'x","metadata":{"\\udbff":"\\udc00\\udc00"},"later":"\\ud83d"}': "x",
    }
    for tail, text in cases.items():
        for data in (head + tail, bytearray(head + tail), memoryview(head + tail)):
            event = parse_webhook_payload(data)
            assert isinstance(event, MessagePayload) and event.text == text
    event = parse_webhook_payload(head + b'x","metadata":{"\\udbff":"\\udc00\\udc00"}}')
    assert event.metadata == {"\ufffd": "\ufffd\ufffd"}  # type: ignore[union-attr]
    assert parse_webhook_payload((head + b'\\ud83d"}').decode()).text == "\ufffd"  # type: ignore[union-attr]
    # an escaped backslash followed by "ud83d" is plain text
    assert parse_webhook_payload(head + b'\\\\ud83d"}').text == "\\ud83d"  # type: ignore[union-attr]
    # other faults are still found, at the same byte
    assert expect_error(head + b"\\ud83d").detail == "Input data was truncated"
    same_length = expect_error(head + b'\\u00e9"} x').detail  # a plain escape of 6 bytes
    assert expect_error(head + b'\\ud83d"} x').detail == same_length
    assert same_length.startswith("JSON is malformed: trailing characters")
    error = expect_error(head + b'\\ud83d","turn_id":5}')
    assert error.path == "$.turn_id"
    later = b'{"type":"call.later","text":"\\ud83d"}'
    unknown = expect_error(later)
    assert isinstance(unknown, UnknownEventError) and unknown.event_type == "call.later"
    with_item = b'{"type":"session.end","session_id":"s","conversation_id":"c","transcript":'
    with_item += b'[{"role":"user","text":"\\ud83d","x":"\\ude00"}]}'
    item = parse_webhook_payload(with_item).transcript[0]  # type: ignore[union-attr]
    assert (item.text, item.extra) == ("\ufffd", {"x": "\ufffd"})


def test_buffer_inputs() -> None:
    data = raw(FULL_BODIES["session.end"])
    expected = parse_webhook_payload(data)
    assert parse_webhook_payload(bytearray(data)) == expected
    assert parse_webhook_payload(memoryview(data)) == expected
    assert isinstance(expect_error(memoryview(b'{"type":"later"}')), UnknownEventError)
    released = memoryview(data)
    released.release()
    assert type(expect_error(released)) is InvalidPayloadError


def test_mapping_inputs() -> None:
    body = FULL_BODIES["session.end"]
    expected = parse_webhook_payload(raw(body))
    assert parse_webhook_payload(MappingProxyType(body)) == expected
    nested = {**body, "metadata": MappingProxyType(body["metadata"])}
    assert parse_webhook_payload(nested) == expected
    assert isinstance(expect_error(MappingProxyType({"type": "later"})), UnknownEventError)
    # same strictness as JSON: no str -> number coercion
    assert expect_error({**body, "duration": "197500"}).path == "$.duration"


def test_error_pickles_and_str() -> None:
    error = InvalidPayloadError("Expected `str`, got `int`", "$.turn_id")
    assert str(error) == "invalid webhook payload at `$.turn_id`: Expected `str`, got `int`"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.path, copy.detail, str(copy)) == (
        InvalidPayloadError,
        "$.turn_id",
        error.detail,
        str(error),
    )
    unknown = pickle.loads(pickle.dumps(UnknownEventError("response.future", "c1")))
    assert type(unknown) is UnknownEventError
    assert (unknown.event_type, unknown.conversation_id) == ("response.future", "c1")
    assert unknown.path == "$.type"
    assert InvalidPayloadError("x").path == "$"


def test_error_keeps_the_cause() -> None:
    error = expect_error(b'{"type":"message"')
    assert isinstance(error.__cause__, msgspec.DecodeError)


# --------------------------------------------------------------------------------------
# Structs: encoding, immutability, the `type` attribute, LayercodeEventType
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", list(FULL_BODIES))
def test_encode_round_trip(type_name: str) -> None:
    payload = parse_webhook_payload(raw(FULL_BODIES[type_name]))
    encoded = msgspec.json.encode(payload)
    assert encoded.startswith(b'{"type":"' + type_name.encode() + b'"')
    assert parse_webhook_payload(encoded) == payload
    assert msgspec.json.decode(encoded, type=WebhookPayload) == payload
    assert msgspec.json.decode(encoded, type=CLASSES[type_name]) == payload

    # omit_defaults: nulls are dropped (nested ones too), everything else is kept
    def drop_nulls(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_nulls(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_nulls(v) for v in value]
        return value

    as_dict = json.loads(encoded)
    assert None not in as_dict.values()
    original = {k: v for k, v in FULL_BODIES[type_name].items() if v is not None}
    if isinstance(original.get("transcript"), list):
        original["transcript"] = drop_nulls(original["transcript"])
    assert as_dict == original


def test_encode_minimal_is_compact_and_builtins_have_type() -> None:
    payload = parse_webhook_payload(
        b'{"type":"session.update","session_id":"s","conversation_id":"c"}'
    )
    assert (
        msgspec.json.encode(payload)
        == b'{"type":"session.update","session_id":"s","conversation_id":"c"}'
    )
    assert msgspec.to_builtins(payload)["type"] == "session.update"
    assert repr(payload) == "SessionUpdatePayload(session_id='s', conversation_id='c')"


def test_structs_are_frozen_and_hashable_without_containers() -> None:
    payload = parse_webhook_payload(
        b'{"type":"session.start","session_id":"s","conversation_id":"c","turn_id":"t"}'
    )
    with pytest.raises(AttributeError):
        payload.session_id = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        payload.type = "message"  # type: ignore[misc]
    same = SessionStartPayload(session_id="s", conversation_id="c", turn_id="t")
    assert payload == same and hash(payload) == hash(same)
    assert len({payload, same}) == 1
    item = TranscriptItem(role="user", text="hi", timestamp=5)
    assert hash(item) == hash(TranscriptItem(role="user", text="hi", timestamp=5))


def test_type_is_class_attribute_not_field() -> None:
    payload = parse_webhook_payload(raw(FULL_BODIES["data"]))
    assert payload.type == "data"
    assert type(payload.type) is str
    assert DataPayload.type == "data"
    assert "type" not in msgspec.structs.asdict(payload)
    assert msgspec.structs.replace(payload, turn_id="t2").type == "data"


def test_layercode_event_type_enum() -> None:
    assert [m.value for m in LayercodeEventType] == [
        "session.start",
        "message",
        "data",
        "session.update",
        "session.end",
    ]
    assert LayercodeEventType.MESSAGE == "message"
    assert "message" == LayercodeEventType.MESSAGE  # noqa: SIM300 - reflected __eq__
    assert LayercodeEventType.MESSAGE != "data"
    assert LayercodeEventType("session.end") is LayercodeEventType.SESSION_END
    assert {"message": 1}[LayercodeEventType.MESSAGE] == 1
    assert {LayercodeEventType.DATA: 1}["data"] == 1
    assert f"{LayercodeEventType.SESSION_START}" == "session.start"
    assert json.dumps(LayercodeEventType.DATA) == '"data"'
    assert LayercodeEventType.MESSAGE in EVENT_TYPES
    with pytest.raises(ValueError):
        LayercodeEventType("response.tts")


def test_annotations_resolve_at_runtime() -> None:
    # `from __future__ import annotations` in the module: msgspec must still see the types
    schema = msgspec.json.schema(WebhookPayload)
    assert set(schema["$defs"]) == {
        "SessionStartPayload",
        "MessagePayload",
        "DataPayload",
        "SessionUpdatePayload",
        "SessionEndPayload",
        "TranscriptItem",
    }
    for cls in CLASSES.values():
        msgspec.json.Decoder(cls)
    assert (
        msgspec.convert({"role": "u", "text": "t", "timestamp": 1}, TranscriptItem).timestamp == 1
    )
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"role": "u", "text": "t", "timestamp": []}, TranscriptItem)


# --------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
texts = st.text(max_size=40)
opt_text = st.none() | texts
opt_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)
timestamps = (
    st.none()
    | st.integers(min_value=0, max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
transcript_items = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]) | texts, "text": texts},
    optional={"timestamp": timestamps},
)
transcripts = st.none() | st.lists(transcript_items, max_size=5)

COMMON_STRATEGIES = {
    "metadata": st.none() | json_objects,
    "custom_metadata": st.none() | json_objects,
    "from_phone_number": opt_text,
    "to_phone_number": opt_text,
}
TURN_REQUIRED = {"session_id": texts, "conversation_id": texts, "turn_id": texts}
IDS_REQUIRED = {"session_id": texts, "conversation_id": texts}

EVENT_STRATEGIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "session.start": (TURN_REQUIRED, {"text": opt_text, **COMMON_STRATEGIES}),
    "message": (
        TURN_REQUIRED,
        {
            "text": opt_text,
            "recording_url": opt_text,
            "recording_status": opt_text,
            "transcript": transcripts | texts,
            "usage": st.none() | json_objects,
            **COMMON_STRATEGIES,
        },
    ),
    "data": ({**TURN_REQUIRED, "data": json_values}, COMMON_STRATEGIES),
    "session.update": (
        IDS_REQUIRED,
        {
            "recording_status": st.none() | st.sampled_from(["completed", "failed"]) | texts,
            "recording_url": opt_text,
            "recording_duration": opt_float,
            "error_message": opt_text,
            **COMMON_STRATEGIES,
        },
    ),
    "session.end": (
        IDS_REQUIRED,
        {
            "agent_id": opt_text,
            "started_at": opt_text,
            "ended_at": opt_text,
            "duration": st.none()
            | st.integers(min_value=0, max_value=2**63)
            | st.floats(min_value=0, allow_nan=False, allow_infinity=False),
            "transcription_duration_seconds": opt_float,
            "tts_duration_seconds": opt_float,
            "latency": opt_float,
            "ip_address": opt_text,
            "country_code": opt_text,
            "recording_status": st.none() | st.sampled_from(["enabled", "disabled"]),
            "transcript": transcripts,
            **COMMON_STRATEGIES,
        },
    ),
}


@st.composite
def event_bodies(draw: st.DrawFn) -> dict[str, Any]:
    type_name = draw(st.sampled_from(sorted(EVENT_STRATEGIES)))
    required, optional = EVENT_STRATEGIES[type_name]
    fields = draw(st.fixed_dictionaries(required, optional=optional))
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    # never one of the event's own fields (Hypothesis also draws the names this file spells)
    known = CLASSES[type_name].__struct_fields__
    extra = {k: v for k, v in extra.items() if k not in known and k != "type"}
    return {"type": type_name, **extra, **fields}


def expected_struct(body: Mapping[str, Any]) -> WebhookPayload:
    cls = CLASSES[body["type"]]
    kwargs = {k: v for k, v in body.items() if k in cls.__struct_fields__}
    transcript = kwargs.get("transcript")
    if isinstance(transcript, list):
        kwargs["transcript"] = [TranscriptItem(**item) for item in transcript]
    result: WebhookPayload = cls(**kwargs)
    return result


@PROPERTY_SETTINGS
@given(event_bodies())
def test_property_valid_events_decode_and_round_trip(body: dict[str, Any]) -> None:
    data = msgspec.json.encode(body)
    payload = parse_webhook_payload(data)
    assert type(payload) is CLASSES[body["type"]]
    assert payload == expected_struct(body)
    assert payload.type == body["type"]
    assert parse_webhook_payload(body) == payload
    assert parse_webhook_payload(data.decode()) == payload
    encoded = msgspec.json.encode(payload)
    assert parse_webhook_payload(encoded) == payload
    assert msgspec.json.encode(parse_webhook_payload(encoded)) == encoded


def _only_invalid(data: Any) -> WebhookPayload | InvalidPayloadError:
    try:
        return parse_webhook_payload(data)
    except InvalidPayloadError as error:
        assert error.path.startswith("$")
        assert isinstance(error, ValueError)
        if isinstance(error, UnknownEventError):
            assert isinstance(error.event_type, str)
            assert error.event_type not in EVENT_TYPES
        return error


@PROPERTY_SETTINGS
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes_only_raise_invalid_payload(data: bytes) -> None:
    _only_invalid(data)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return
    _only_invalid(text)


@PROPERTY_SETTINGS
@given(
    st.sampled_from(
        [b"", b'{"type":"message",', b'{"type":"data","session_id":"s","data":']
    ).flatmap(lambda prefix: st.binary(max_size=60).map(lambda tail: prefix + tail))
)
def test_property_json_like_bytes_only_raise_invalid_payload(data: bytes) -> None:
    _only_invalid(data)


@PROPERTY_SETTINGS
@given(json_values)
def test_property_arbitrary_json_only_raises_invalid_payload(value: Any) -> None:
    result = _only_invalid(msgspec.json.encode(value))
    if not isinstance(value, dict):
        assert isinstance(result, InvalidPayloadError)
        assert result.path == "$"
    if isinstance(value, dict):
        assert type(_only_invalid(value)) is type(result)


FIELD_NAMES = sorted(
    {name for cls in CLASSES.values() for name in cls.__struct_fields__} | {"type"}
)


@st.composite
def almost_events(draw: st.DrawFn) -> dict[Any, Any]:
    body: dict[Any, Any] = {}
    if draw(st.integers(0, 9)):
        body["type"] = draw(st.sampled_from(sorted(EVENT_TYPES)) | texts | json_values)
    if draw(st.booleans()):
        required, _ = EVENT_STRATEGIES[draw(st.sampled_from(sorted(EVENT_STRATEGIES)))]
        body.update(draw(st.fixed_dictionaries(required)))
    keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=6)
    body.update(draw(st.dictionaries(keys, json_values | transcripts, max_size=6)))
    return body


@PROPERTY_SETTINGS
@given(almost_events())
def test_property_random_fields_only_raise_invalid_payload(body: dict[str, Any]) -> None:
    from_bytes = _only_invalid(msgspec.json.encode(body))
    from_mapping = _only_invalid(body)
    assert type(from_bytes) is type(from_mapping)
    if isinstance(from_bytes, InvalidPayloadError):
        assert isinstance(from_mapping, InvalidPayloadError)
        assert from_bytes.path == from_mapping.path
    else:
        assert from_bytes == from_mapping
        assert parse_webhook_payload(msgspec.json.encode(from_bytes)) == from_bytes


@PROPERTY_SETTINGS
@given(event_bodies(), st.data())
def test_property_one_corrupted_field_names_its_path(
    body: dict[str, Any], data: st.DataObject
) -> None:
    cls = CLASSES[body["type"]]
    field = data.draw(st.sampled_from([f for f in cls.__struct_fields__ if f != "data"]))
    # every typed field rejects an object of the wrong shape: a list of lists of bools
    bad = [[True]]
    broken = {**body, field: bad}
    error = expect_error(msgspec.json.encode(broken))
    assert type(error) is InvalidPayloadError
    assert error.path.startswith(f"$.{field}"), (field, str(error))


def test_a_data_event_without_data_is_answered_not_refused() -> None:
    import anyio

    from layercode_asgi import Settings, create_app
    from layercode_asgi.testing import LayercodeTestClient

    settings = Settings(env_file=None, environ={}, layercode_webhook_secret="whsec_x")
    seen: list[Any] = []

    async def talk() -> Any:
        app = create_app(settings, on_data=lambda event: seen.append(event.data))
        async with LayercodeTestClient(app, secret="whsec_x") as client:
            event = {"type": "data", "session_id": "s", "conversation_id": "c", "turn_id": "t"}
            return await client.send(event)

    reply = anyio.run(talk)
    assert (reply.status_code, reply.body) == (200, {"status": "ok"})
    assert seen == [{}]


def test_bodies_read_differently_or_slowly_answered_over_http() -> None:
    """Through ``create_app`` under uvicorn, signed: the answers of the cases above."""
    import httpx

    from layercode_asgi import Settings, create_app

    from .conftest import SECRET, serve, signed_headers

    ended: list[SessionEndPayload] = []
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, on_session_end=ended.append)
    end = {k: v for k, v in FULL_BODIES["session.end"].items() if k != "transcript"}
    twice = b'{"type":"\\u001b[2J' + b"x" * 100_000 + b'","type":"message"'
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:

        def post(body: bytes) -> httpx.Response:
            return client.post("/api/agent", content=body, headers=signed_headers(body))

        answer = post(twice + b',"session_id":"s","conversation_id":"c","turn_id":"t"}')
        assert answer.status_code == 400
        assert answer.json() == {
            "error": "invalid webhook payload at `$.type`: duplicate `type` keys with different values",
            "path": "$.type",
        }
        answer = post(raw({**end, "transcript": [{"role": "user", "text": "hi", "a`b": 1}]}))
        assert answer.status_code == 200, answer.text
        assert ended[-1].transcript == [TranscriptItem(role="user", text="hi", extra={"a`b": 1})]
        answer = post(raw({**end, "transcript": [{"role": "u", "text": "a", "x": 1}, {"x": 1}]}))
        assert answer.status_code == 400
        assert answer.json()["path"] == "$.transcript[1].role"
