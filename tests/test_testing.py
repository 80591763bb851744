"""layercode_asgi.testing: event factories, signing, the SSE parser, the checker, the client."""

from __future__ import annotations

import gc
import pickle
import re
import socket
import threading
import warnings
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from layercode_asgi import (
    Data,
    DataPayload,
    MessagePayload,
    SessionEndPayload,
    SessionStartPayload,
    SessionUpdatePayload,
    Settings,
    create_app,
    format_sse_message,
    parse_webhook_payload,
    verify_signature,
)
from layercode_asgi.testing import (
    VIOLATIONS,
    JSONResult,
    LayercodeTestClient,
    ProtocolViolation,
    SSEEvent,
    SSEParser,
    TurnChecker,
    TurnResult,
    data_event,
    encode_event,
    message_event,
    send_event,
    send_turn,
    session_end_event,
    session_start_event,
    session_update_event,
    signed_headers,
)

from .asgi_stub import read_body
from .conftest import BACKENDS, NEEDS_TRIO, SECRET, serve


def parse_all(*chunks: bytes | str) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    parser.close()
    return events


# -- SSE parser ------------------------------------------------------------------------------


def test_parser_line_endings_and_fields() -> None:
    stream = (
        b"data: one\r\n\r\n"  # CRLF
        b"data: two\r\r"  # lone CR
        b"data: three\n\n"  # LF
        b": a comment\n"
        b"event: custom\nid: 7\nretry: 1500\ndata:  four\ndata:five\ndata\n\n"
    )
    assert parse_all(stream) == [
        SSEEvent("one"),
        SSEEvent("two"),
        SSEEvent("three"),
        SSEEvent(" four\nfive\n", event="custom", id="7", retry=1500),
    ]


def test_parser_is_incremental_byte_by_byte() -> None:
    stream = "\ufeffdata: héllo 👋\r\ndata: x\r\n\r\ndata: y\r\n\r\n".encode()
    parser = SSEParser()
    seen: list[SSEEvent] = []
    for i in range(len(stream)):
        seen.extend(parser.feed(stream[i : i + 1]))
    assert seen == [SSEEvent("héllo 👋\nx"), SSEEvent("y")]


def test_parser_cr_at_chunk_end_then_lf_counts_once() -> None:
    # "\r" ends a chunk and "\n" starts the next: one line break, not a blank line.
    assert parse_all(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent("a\nb")]


def test_parser_ignores_what_the_spec_ignores() -> None:
    stream = (
        b"id: bad\x00id\nretry: 10s\nData: wrong case\nunknown: x\ndata: kept\n\n"
        b"event: empty\n\n"  # no data: nothing dispatched, event type reset
        b"data: after\n\n"
    )
    assert parse_all(stream) == [SSEEvent("kept"), SSEEvent("after")]


def test_parser_id_persists_and_unterminated_event_is_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 1\ndata: a\n\ndata: b\n\n") == [
        SSEEvent("a", id="1"),
        SSEEvent("b", id="1"),
    ]
    assert parser.feed(b"data: never dispatched\n") == []
    assert parser.pending
    assert parser.close() == []


def test_parser_invalid_utf8_becomes_replacement_character() -> None:
    assert parse_all(b"data: \xff\xfe ok\n\n") == [SSEEvent("\ufffd\ufffd ok")]


@given(
    st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30), max_size=5),
    st.data(),
)
def test_parser_reads_format_sse_message_back_whatever_the_chunking(
    messages: list[str], data: st.DataObject
) -> None:
    stream = "".join(format_sse_message(m) for m in messages).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    # A message's line breaks come back as "\n" (any of CRLF, CR, LF was a break).
    expected = [m.replace("\r\n", "\n").replace("\r", "\n") for m in messages]
    assert [e.data for e in parse_all(*chunks)] == expected


# -- factories and signing ----------------------------------------------------------------------


def test_factories_build_valid_events() -> None:
    cases: list[tuple[dict[str, Any], type]] = [
        (session_start_event(), SessionStartPayload),
        (message_event("hi"), MessagePayload),
        (data_event({"k": [1]}), DataPayload),
        (session_update_event(), SessionUpdatePayload),
        (session_end_event(transcript=[("user", "hi"), {"role": "assistant", "text": "yo"}]),
         SessionEndPayload),
    ]  # fmt: skip
    for event, kind in cases:
        parsed = parse_webhook_payload(encode_event(event))
        assert isinstance(parsed, kind)
        assert parsed.conversation_id == event["conversation_id"]
    end = parse_webhook_payload(encode_event(cases[-1][0]))
    assert isinstance(end, SessionEndPayload)
    assert [(t.role, t.text) for t in end.transcript or ()] == [("user", "hi"), ("assistant", "yo")]


def test_factories_random_ids_and_overrides() -> None:
    a, b = message_event("x"), message_event("x")
    assert a["turn_id"] != b["turn_id"] and a["conversation_id"] != b["conversation_id"]
    event = message_event(
        "x", turn_id="t1", conversation_id="c1", session_id="s1", metadata={"m": 1}
    )
    assert event == {
        "type": "message",
        "session_id": "s1",
        "conversation_id": "c1",
        "turn_id": "t1",
        "text": "x",
        "metadata": {"m": 1},
    }
    assert data_event(None, turn_id="t")["data"] is None


def test_transcript_pairs_may_be_any_two_item_sequence() -> None:
    # Before: ["user", "hi"] (a list, as from JSON) raised "dictionary update sequence
    # element #0 has length 4", and ("user", "hi", "x") silently lost its third item.
    [item] = session_end_event(transcript=[["user", "hi"]])["transcript"]
    assert (item["role"], item["text"]) == ("user", "hi")
    for bad in (("user", "hi", "x"), "hello", ("user",), 5):
        with pytest.raises(TypeError, match=r"^transcript items are mappings or \(role, text\)"):
            session_end_event(transcript=[bad])  # type: ignore[list-item]


@pytest.mark.parametrize("transcript", [None, "hi", b"hi", {"role": "user", "text": "hi"}, 5])
def test_a_transcript_that_is_no_list_of_items_is_a_type_error(transcript: Any) -> None:
    # Before: None was "'NoneType' object is not iterable", "hi" blamed its item 'h', and
    # a single item mapping was taken for a list of its keys ("got 'role'").
    with pytest.raises(TypeError, match=r"^transcript must be a list of items \(mappings or"):
        session_end_event(transcript=transcript)


def test_signed_headers_verify() -> None:
    body = encode_event(message_event("hi"))
    headers = signed_headers(body, SECRET)
    assert headers["content-type"] == "application/json"
    assert verify_signature(body, headers["layercode-signature"], SECRET)
    fixed = signed_headers('{"type":"message"}', "whsec_test", timestamp=1700000000)
    assert fixed["layercode-signature"].startswith("t=1700000000,v1=")
    assert verify_signature(
        '{"type":"message"}', fixed["layercode-signature"], "whsec_test", now=1700000000
    )


# -- the checker --------------------------------------------------------------------------------


def check(*events: str, turn_id: str = "t1", strict: bool = False) -> TurnChecker:
    checker = TurnChecker(turn_id, strict=strict)
    for data in events:
        checker.check(SSEEvent(data))
    checker.finish()
    return checker


TTS = '{"type":"response.tts","content":"hi","turn_id":"t1"}'
END = '{"type":"response.end","turn_id":"t1"}'


@pytest.mark.parametrize(
    ("events", "name"),
    [
        ([TTS], "missing-end"),
        ([TTS, END, END], "repeated-end"),
        ([END, TTS], "event-after-end"),
        (['{"type":"response.tts","content":"hi","turn_id":"t2"}', END], "wrong-turn-id"),
        (['{"type":"response.tts","content":"hi"}', END], "wrong-turn-id"),
        (["{nope", END], "bad-json"),
        (["[1, 2]", END], "bad-json"),
        (['{"type":"response.tts","content":"hi","turn_id":"t1","n":1e400}', END], "bad-json"),
        (['{"content":"hi","turn_id":"t1"}', END], "missing-type"),
        (['{"type":"response.tts","content":3,"turn_id":"t1"}', END], "invalid-event"),
    ],
)
def test_checker_names_each_violation(events: list[str], name: str) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        check(*events)
    assert caught.value.name == name
    assert caught.value.turn_id == "t1"
    assert name in VIOLATIONS
    # Before: "missing-end: the stream closed without a response.end", not saying which of
    # a test's turns; and 1e400 (valid JSON, beyond a float) was "not valid JSON".
    assert "'t1'" in str(caught.value) and "not valid JSON (Number" not in str(caught.value)


def test_checker_accepts_unknown_types_and_reports_errors() -> None:
    error = '{"type":"response.error","error":"agent error","turn_id":"t1"}'
    future = '{"type":"response.future","turn_id":"t1","x":1}'
    checker = check(TTS, future, error, END)
    assert [e["type"] for e in checker.events] == [
        "response.tts",
        "response.future",
        "response.error",
        "response.end",
    ]
    assert checker.errors == [{"type": "response.error", "error": "agent error", "turn_id": "t1"}]
    with pytest.raises(ProtocolViolation) as caught:
        check(TTS, error, END, strict=True)
    assert caught.value.name == "response-error"


@pytest.mark.parametrize(
    ("make", "said"),
    [
        # Before: accepted, then every event of the turn was a wrong-turn-id.
        (lambda: TurnChecker(None), "turn_id must be a str"),
        (lambda: TurnChecker(b"t1"), "turn_id must be a str"),
        (lambda: TurnChecker("t1", event_type=None), "event_type must be a str"),
        # Before: AttributeError: 'dict' object has no attribute 'data'.
        (lambda: TurnChecker("t1").check({"type": "response.end"}), "got dict"),
        (lambda: TurnChecker("t1").check(END), "got str"),
    ],
)
def test_the_checker_names_an_argument_of_the_wrong_type(make: Any, said: str) -> None:
    with pytest.raises(TypeError, match=said):
        make()


def test_protocol_violation_pickles_and_rejects_unknown_names() -> None:
    violation = ProtocolViolation("missing-end", "d", turn_id="t", status_code=200)
    copy = pickle.loads(pickle.dumps(violation))
    assert (copy.name, copy.detail, copy.turn_id, copy.status_code) == (
        "missing-end",
        "d",
        "t",
        200,
    )
    assert str(copy) == "missing-end: d"
    with pytest.raises(ValueError, match="unknown protocol violation"):
        ProtocolViolation("made-up", "x")


# -- the client ---------------------------------------------------------------------------------


def echo_app() -> Any:
    async def on_data(event: Any) -> dict[str, Any]:
        return {"got": event.data}

    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret=SECRET, authorize_api_keys="k"
    )
    return create_app(settings, "echo", on_data=on_data)


@pytest.mark.anyio
async def test_client_in_process_full_conversation() -> None:
    async with LayercodeTestClient(echo_app(), secret=SECRET, conversation_id="c-1") as client:
        start = await client.session_start()
        assert isinstance(start, TurnResult)
        assert start.text.startswith("Hello! I'm the echo agent")
        turn = await client.message("hello", turn_id="t-7")
        assert turn.turn_id == "t-7"
        assert turn.events == [
            {"type": "response.tts", "content": "You said: hello", "turn_id": "t-7"},
            {"type": "response.end", "turn_id": "t-7"},
        ]
        assert turn.tts == ["You said: hello"]
        assert turn.status_code == 200
        assert turn.headers["content-type"].startswith("text/event-stream")
        assert turn.time_to_first_tts is not None
        assert 0 <= turn.time_to_first_tts <= turn.duration
        data = await client.data({"x": 1})
        assert isinstance(data, JSONResult)
        assert data.body == {"got": {"x": 1}}
        assert (await client.session_update()).body == {"status": "ok"}
        assert (await client.session_end(transcript=[("user", "hello")])).body == {"status": "ok"}
        unsigned = await client.post(message_event("x"), signed=False)
        assert unsigned.status_code == 401
        wrong = await client.post(message_event("x"), headers=signed_headers(b"{}", "other-secret"))
        assert wrong.status_code == 401


@pytest.mark.anyio
async def test_client_against_a_server_streams_and_counts_events() -> None:
    async def agent(event: Any) -> AsyncIterator[Any]:
        yield "one "
        yield Data({"n": 1})
        yield "two"

    from layercode_asgi import LayercodeSignature, LayercodeWebhook

    app = LayercodeSignature(LayercodeWebhook(agent), secret=SECRET)
    seen: list[str] = []
    with serve(app) as base:
        client = LayercodeTestClient(base_url=base, secret=SECRET, path="api/agent")
        assert client.url == base + "/api/agent"
        turn = await client.send(message_event("x"), on_event=lambda e: seen.append(e["type"]))
    assert isinstance(turn, TurnResult)
    assert turn.text == "one two"
    assert turn.data == [{"n": 1}]
    assert not turn.hung_up
    assert seen == ["response.tts", "response.data", "response.tts", "response.end"]


@pytest.mark.anyio
async def test_client_sees_each_event_while_the_server_still_streams() -> None:
    from .test_servers import gated_backend

    gate = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "response.tts":
            gate.set()  # the backend sends the rest only after we saw the first event

    try:
        with serve(gated_backend(gate)) as base:
            client = LayercodeTestClient(base_url=base, secret=SECRET)
            turn = await client.send(message_event("x"), on_event=on_event)
    finally:
        gate.set()
    assert isinstance(turn, TurnResult)
    assert turn.text == "first, then second"


def test_client_send_sync() -> None:
    client = LayercodeTestClient(echo_app(), secret=SECRET)
    result = client.send_sync(message_event("sync"))
    assert isinstance(result, TurnResult)
    assert result.text == "You said: sync"
    update = client.send_sync(session_update_event())
    assert isinstance(update, JSONResult) and update.body == {"status": "ok"}
    # Before: a TypeError (no on_event), though send_sync is documented as send's twin.
    seen: list[str] = []
    client.send_sync(message_event("seen"), on_event=lambda event: seen.append(event["type"]))
    assert seen == ["response.tts", "response.end"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_send_sync_in_async_code_says_to_await_send() -> None:
    # Before: anyio's "Already running asyncio in this thread", naming neither the kit's
    # method nor what to call instead.
    client = LayercodeTestClient(echo_app(), secret=SECRET)
    with pytest.raises(RuntimeError, match=r"send_sync .*event loop.*await send\(\)"):
        client.send_sync(message_event("x"))
    assert (await client.send(message_event("after"))).status_code == 200


@pytest.mark.anyio
async def test_client_raises_named_violations() -> None:
    async def no_end(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b'data: {"type":"response.tts"',
                "more_body": True,
            }
        )
        await send({"type": "http.response.body", "body": b',"content":"x","turn_id":"t"}'})

    client = LayercodeTestClient(no_end, secret=SECRET)
    with pytest.raises(ProtocolViolation) as caught:
        await client.message("x", turn_id="t")
    assert caught.value.name == "missing-end"
    assert "not terminated by a blank line" in caught.value.detail

    with pytest.raises(ProtocolViolation) as caught:
        await LayercodeTestClient(echo_app(), secret="wrong").message("x")
    assert (caught.value.name, caught.value.status_code) == ("http-error", 401)
    assert caught.value.detail.startswith(f"message (turn_id {caught.value.turn_id!r}) answered")
    with pytest.raises(ProtocolViolation) as caught:
        await LayercodeTestClient(echo_app(), secret=SECRET).send({})  # no type: a 400
    assert str(caught.value).startswith("http-error: answered 400: ")  # before: "error:  answered"


def replying_app(content_type: bytes, body: bytes) -> Any:
    """Answers every event with ``body`` under ``content_type`` (a turn's events end it)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        turn_id = msgspec.json.decode(await read_body(receive)).get("turn_id")
        end = b'data: {"type":"response.end","turn_id":"%s"}\n\n' % str(turn_id).encode()
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body.replace(b"END", end)})

    return app


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content_type", "name"),
    [
        (b"text/event-stream", None),
        (b"Text/Event-Stream ; charset=utf-8", None),
        # Before: accepted, as the check was startswith("text/event-stream").
        (b"text/event-streams", "wrong-content-type"),
        (b"text/event-stream-x; charset=utf-8", "wrong-content-type"),
        (b"text/event-stream,application/json", "wrong-content-type"),
        (b"text/event-stream, text/event-stream", None),  # the header sent twice
    ],
)
async def test_a_turn_needs_exactly_the_event_stream_media_type(
    content_type: bytes, name: str | None
) -> None:
    client = LayercodeTestClient(replying_app(content_type, b"END"), secret=SECRET)
    if name is None:
        assert (await client.message("x")).events[0]["type"] == "response.end"
        return
    with pytest.raises(ProtocolViolation) as caught:
        await client.message("x", turn_id="t7")
    assert caught.value.name == name
    # Before: "message answered Content-Type …", not saying which turn.
    assert caught.value.detail.startswith("message (turn_id 't7') answered Content-Type")


@pytest.mark.anyio
async def test_a_json_reply_of_any_value_is_accepted() -> None:
    # The docs' violations table said a reply's body must be an object; on_data may return
    # any JSON value, so the checker takes any (an SSE event's data stays an object).
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, "echo", on_data=lambda event: [event.data, None])
    async with LayercodeTestClient(app, secret=SECRET) as client:
        assert (await client.data({"a": 1})).body == [{"a": 1}, None]


def misusing_app(*messages: dict[str, Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        for message in messages:
            await send(message)

    return app


_START = {"type": "http.response.start", "status": 200, "headers": []}
_BODY = {"type": "http.response.body", "body": b""}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([_START, _START], "http.response.start after the response started"),
        ([_BODY], "http.response.body before http.response.start"),
        ([_START, _BODY, _BODY], "http.response.body after the response ended"),
        ([_START, {**_BODY, "body": "text"}], "a body that is not bytes: 'text'"),
        ([_START, {**_BODY, "body": None}], "a body that is not bytes: None"),
        ([{**_START, "status": "200"}, _BODY], "a status that is not an integer: '200'"),
        # Before: "answered True" / "answered 1000", an http-error.
        ([{**_START, "status": True}, _BODY], "a status that is not an integer: True"),
        ([{**_START, "status": 1000}, _BODY], "a status outside 100-999: 1000"),
        # Before: a bare AssertionError, a ValueError from unpacking, an AttributeError or a
        # KeyError from httpx's ASGI transport; or the message was ignored.
        ([{**_START, "headers": None}, _BODY], "headers that are not (name, value) pairs: None"),
        (
            [{**_START, "headers": [(b"a",)]}, _BODY],
            "headers that are not (name, value) pairs: [(b'a',)]",
        ),
        (["hello"], "a message that is not a dict: 'hello'"),
        ([{}], "a message of type None, not http.response.start or http.response.body"),
        (
            [_START, {"type": "http.response.trailers"}, _BODY],
            "a message of type "
            "'http.response.trailers', not http.response.start or http.response.body",
        ),
    ],
)
async def test_an_in_process_app_breaking_asgi_is_told_how(
    messages: list[dict[str, Any]], said: str
) -> None:
    # Before: a bare AssertionError or TypeError from httpx's ASGI transport (or from len()),
    # and a string status came back as "answered 200", an http-error.
    with pytest.raises(RuntimeError) as caught:
        await LayercodeTestClient(misusing_app(*messages), secret=SECRET).message("x")
    assert str(caught.value) == f"the ASGI app sent {said}"


@pytest.mark.anyio
async def test_post_is_bounded_like_every_other_method() -> None:
    async def never_answers(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep_forever()

    async def endless(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        while True:
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})

    # Before: post() waited forever (httpx's timeout does not reach an in-process app), and
    # an endless reply raised the internal ReplyTooLarge.
    for app, name in ((never_answers, "timeout"), (endless, "too-large")):
        client = LayercodeTestClient(app, secret=SECRET, timeout=0.5, max_bytes=100_000)
        with anyio.fail_after(10), pytest.raises(ProtocolViolation) as caught:
            await client.post(message_event("x"))
        assert caught.value.name == name


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
@pytest.mark.parametrize("starts", [False, True])
async def test_an_apps_own_timeout_error_propagates(starts: bool) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if starts:  # as Starlette's error middleware: a 500 started, then the error re-raised
            await send({"type": "http.response.start", "status": 500, "headers": []})
        raise TimeoutError("the app's own deadline")  # asyncio.wait_for's, say

    # Before: a "timeout" violation ("not answered within 30 s", "answered 500 and did not
    # end it") raised at once, the app's error and its traceback dropped.
    client = LayercodeTestClient(app, secret=SECRET)
    calls = (lambda: client.message("x"), lambda: client.data({}), lambda: client.post(b"{}"))
    for call in calls:
        with pytest.raises(TimeoutError, match="the app's own deadline"):
            await call()
    seen: list[str] = []

    def on_event(event: dict[str, Any]) -> None:  # the test's own callback, timing out
        seen.append(event["type"])
        raise TimeoutError("on_event's own")

    with pytest.raises(TimeoutError, match="on_event's own"):
        await LayercodeTestClient(echo_app(), secret=SECRET).message("x", on_event=on_event)
    assert seen == ["response.tts"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
@pytest.mark.parametrize("starts", [False, True])
@pytest.mark.parametrize(
    "make_error",
    [lambda: httpx.ConnectError("the route's own call failed"), lambda: zlib.error("app's own")],
    ids=["httpx-error", "zlib-error"],
)
async def test_an_apps_own_httpx_or_zlib_error_propagates(starts: bool, make_error: Any) -> None:
    def raising_app(error: Exception) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            if starts:  # as Starlette's error middleware: a 500 started, then the error re-raised
                await send({"type": "http.response.start", "status": 500, "headers": []})
            raise error

        return app

    # Before: a "connection-error" violation (the app's error only its __cause__) or a
    # "bad-encoding" one (the app's error and its traceback dropped).
    for call in ("message", "data", "post"):
        error = make_error()
        client = LayercodeTestClient(raising_app(error), secret=SECRET)
        with pytest.raises(type(error)) as caught:
            await (client.post(b"{}") if call == "post" else getattr(client, call)("x"))
        assert caught.value is error and caught.traceback[-1].name == "app"
    error = make_error()

    def on_event(event: dict[str, Any]) -> None:  # the test's own callback: not the kit's read
        raise error

    with pytest.raises(type(error)) as caught:
        await LayercodeTestClient(echo_app(), secret=SECRET).message("x", on_event=on_event)
    assert caught.value is error


@pytest.mark.anyio
async def test_an_app_shielded_from_cancellation_is_waited_for_then_a_timeout() -> None:
    # As docs/testing.md says: the timeout cancels an in-process app where it awaits; a part
    # it shields runs to its end first, and the request is then a `timeout` violation.
    shielded_ends: list[str] = []

    async def shielded(scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.3)
            shielded_ends.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    client = LayercodeTestClient(shielded, secret=SECRET, timeout=0.05)
    for send_one in (client.session_start, client.session_end, lambda: client.post(b"{}")):
        with anyio.fail_after(10), pytest.raises(ProtocolViolation) as caught:
            await send_one()
        assert caught.value.name == "timeout"
    assert shielded_ends == ["/api/agent"] * 3


@pytest.mark.anyio
async def test_a_redirect_is_not_followed_and_says_where_it_led() -> None:
    calls: list[str] = []

    async def redirects(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await receive()
        location = (b"location", b"https://user:pw@elsewhere.example/api/agent")
        await send({"type": "http.response.start", "status": 307, "headers": [location]})
        await send({"type": "http.response.body", "body": b""})

    with pytest.raises(ProtocolViolation) as caught:
        await LayercodeTestClient(redirects, secret=SECRET).message("x")
    # Before: "message answered 307: ", without where to or whether it was followed.
    assert caught.value.name == "http-error" and calls == ["/api/agent"]
    detail = caught.value.detail
    assert "https://user:***@elsewhere.example/api/agent" in detail and "not followed" in detail


@pytest.mark.anyio
async def test_a_connection_error_without_a_message_still_says_what_broke() -> None:
    def reset(request: Any) -> Any:
        raise httpx.ReadError("")  # what httpx raises when the peer resets the connection

    async with httpx.AsyncClient(transport=httpx.MockTransport(reset)) as http:
        with pytest.raises(ProtocolViolation) as caught:
            event = message_event("x", turn_id="t1")
            await send_turn(http, "http://backend/api/agent", event, SECRET)
    # Before: "ReadError: ", an empty explanation (and, until the turn was named, no turn id).
    assert caught.value.name == "connection-error"
    detail = "message (turn_id 't1'): ReadError: the connection broke (no detail given)"
    assert caught.value.detail == detail


@pytest.mark.anyio
async def test_an_in_process_app_that_leaves_its_reply_unfinished_is_a_violation() -> None:
    # Before: a bare AssertionError from httpx's ASGI transport, with no message.
    async def returns_without_answering(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async def starts_a_stream_and_returns(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    silent = LayercodeTestClient(returns_without_answering, secret=SECRET)
    for kind in ("message", "session.update"):
        with pytest.raises(ProtocolViolation) as caught:
            await (silent.message("x") if kind == "message" else silent.session_update())
        assert (caught.value.name, caught.value.status_code) == ("http-error", 500)
        assert "returned without starting a response" in caught.value.detail
    unfinished = LayercodeTestClient(starts_a_stream_and_returns, secret=SECRET)
    with pytest.raises(ProtocolViolation) as caught:
        await unfinished.message("x")
    assert caught.value.name == "missing-end"


def test_client_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LayercodeTestClient(secret=SECRET)
    with pytest.raises(ValueError, match="exactly one"):
        LayercodeTestClient(echo_app(), base_url="http://x", secret=SECRET)
    with pytest.raises(ValueError, match="secret"):
        LayercodeTestClient(echo_app(), secret="")
    # Accepted before: the first request then failed with "'function' object is not iterable".
    from starlette.applications import Starlette

    with pytest.raises(TypeError, match=r"app must be an ASGI app, got the class Starlette \("):
        LayercodeTestClient(Starlette, secret=SECRET)
    # Accepted before: NaN failed every request inside httpx, 0 timed each one out.
    for timeout in (float("nan"), 0, -1, "30"):
        with pytest.raises(ValueError, match="timeout must be a finite number > 0"):
            LayercodeTestClient(echo_app(), secret=SECRET, timeout=timeout)  # type: ignore[arg-type]
    # Accepted before: NaN and infinity made the bound never trip, a string failed mid-request.
    for name in ("max_bytes", "max_events"):
        for bound in (float("nan"), float("inf"), 0, -1, "10", 1.5, True):
            with pytest.raises(ValueError, match=f"{name} must be an integer > 0"):
                LayercodeTestClient(echo_app(), secret=SECRET, **{name: bound})
    # Accepted before: each request then failed with an OverflowError (in an ExceptionGroup),
    # an IDNAError or httpx.InvalidURL, or a connection-error for a scheme httpx cannot send.
    for url in ("http://127.0.0.1:99999", "http://xn--", "http://[::1", "ftp://x", "x"):
        with pytest.raises(ValueError, match="base_url"):
            LayercodeTestClient(base_url=url, secret=SECRET)
    # Before: an h11 LocalProtocolError from inside httpx, on every request.
    for name in ("Content-Length", "transfer-encoding"):
        with pytest.raises(ValueError, match=f"headers {name}: the client sets it"):
            LayercodeTestClient(echo_app(), secret=SECRET, headers={name: "1"})
    # Before: a UnicodeEncodeError on every request, or (over HTTP) an h11 LocalProtocolError.
    for headers in ({"X-A": "é"}, {"Bad Name": "v"}, {"X-A": "a\nb"}, {"X-A\0": "v"}):
        with pytest.raises(ValueError, match=r"^headers "):
            LayercodeTestClient(echo_app(), secret=SECRET, headers=headers)


@pytest.mark.parametrize("headers", [{"X-A": 5}, {"X-A": None}, {b"X-A": "v"}])
def test_request_headers_of_another_type_are_a_type_error(headers: Any) -> None:
    # It was a ValueError saying the value "may hold only printable ASCII characters" (or the
    # name was "not a valid header name" for bytes): request and response headers were
    # checked by two near-copies; response headers of another type were a TypeError.
    with pytest.raises(TypeError, match=r"^headers must map str names to str values"):
        LayercodeTestClient(echo_app(), secret=SECRET, headers=headers)


@pytest.mark.anyio
async def test_connection_error_is_named() -> None:
    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LayercodeTestClient(base_url=f"http://127.0.0.1:{port}", secret=SECRET, timeout=5)
    # Before: post() let httpx.ConnectError through; the others dropped it as the cause.
    requests = {
        "message (turn_id 't1'): ": lambda: client.message("x", turn_id="t1"),
        "session.update: ": client.session_update,
        "": lambda: client.post("{}"),
    }
    for named, request in requests.items():
        with pytest.raises(ProtocolViolation) as caught:
            await request()
        assert caught.value.name == "connection-error"
        # Before: "ConnectError: …" for every event, naming neither the event nor its turn.
        assert caught.value.detail.startswith(named + "ConnectError: "), caught.value.detail
        assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_a_path_httpx_cannot_send_is_a_value_error() -> None:
    # Before: httpx.InvalidURL from every request, with app= or base_url=.
    for where in ({"app": echo_app()}, {"base_url": "http://127.0.0.1:1"}):
        with pytest.raises(ValueError, match=r"^path is not a valid URL: .*non-printable"):
            LayercodeTestClient(**where, secret=SECRET, path="/api\x00agent")
    # Before: taken, each request then failing as a connection-error (httpx sent 'a%20b').
    for url, held in (("http://a b:8000", " "), ("http://a%3Cb", "<"), ("http://a\\b", "\\")):
        with pytest.raises(
            ValueError,
            match="^base_url is not a valid URL: its host holds " + re.escape(repr(held)),
        ):
            LayercodeTestClient(base_url=url, secret=SECRET)
    for url in (
        "http://b\u00fccher.example",
        "http://a_b-c.d",
        "http://[::1]:8",
        "http://[fe80::1%25eth0]",
    ):
        LayercodeTestClient(base_url=url, secret=SECRET)  # hosts a URL may hold
    # Before: taken, the path appended to the query or fragment ('http://h:8000?k=1/api/agent'):
    # every event went to '/', or to the base path.
    for url in ("http://127.0.0.1:8000?k=1", "http://127.0.0.1:8000/pre/#f", "http://h/?"):
        with pytest.raises(ValueError, match=r"^base_url must not hold a query or fragment"):
            LayercodeTestClient(base_url=url, secret=SECRET)


@pytest.mark.anyio
async def test_post_checks_its_own_headers() -> None:
    client = LayercodeTestClient(echo_app(), secret=SECRET)
    # Before: a UnicodeEncodeError from inside httpx.
    with pytest.raises(ValueError, match=r"^headers X-A: the value may hold only printable"):
        await client.post("{}", headers={"X-A": "é"})


@pytest.mark.anyio
@pytest.mark.parametrize("event", ["hello", None, [("type", "message")], b"{}"])
async def test_an_event_that_is_no_mapping_is_a_type_error(event: Any) -> None:
    client = LayercodeTestClient(echo_app(), secret=SECRET)
    # Before: an AttributeError ("'str' object has no attribute 'get'") from send, send_sync
    # and protocol.send_event, which read the event's type before checking it.
    expected = r"^event must be a mapping \(such as message_event\(\.\.\.\)\), got "
    with pytest.raises(TypeError, match=expected):
        await client.send(event)
    async with httpx.AsyncClient() as http:
        with pytest.raises(TypeError, match=expected):
            await send_event(http, "http://127.0.0.1:1/", event, SECRET)
    with pytest.raises(TypeError, match=expected):
        await anyio.to_thread.run_sync(client.send_sync, event)


@pytest.mark.anyio
async def test_a_nested_async_with_keeps_the_one_http_client() -> None:
    ports: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        ports.append(scope["client"][1])
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    with serve(app) as base:
        client = LayercodeTestClient(base_url=base, secret=SECRET, timeout=10)
        async with client:
            await client.session_update()
            async with client:  # e.g. a test entering the client its fixture entered
                await client.session_update()
            await client.session_update()
    # Before: the inner `async with` opened a second HTTP client (the first was never
    # closed: its connection leaked), and its exit left the outer block with none, so each
    # later request opened a connection of its own: three connections, not one.
    assert len(ports) == 3 and len(set(ports)) == 1, ports


@pytest.mark.anyio
async def test_the_signature_goes_under_the_apps_header_name() -> None:
    # Before: the kit always signed under layercode-signature, so an app whose middleware has
    # header_name= could not be tested with the checked methods (every turn a 401).
    from layercode_asgi import LayercodeSignature, LayercodeWebhook

    seen: list[list[str]] = []

    async def agent(event: Any) -> AsyncIterator[str]:
        yield "Hi"

    checked = LayercodeSignature(LayercodeWebhook(agent), secret=SECRET, header_name="X-Proxy-Sig")

    async def signed(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append([name.decode() for name, _ in scope["headers"] if b"sig" in name])
        await checked(scope, receive, send)

    with serve(signed) as base:
        for where in ({"app": signed}, {"base_url": base}):
            async with LayercodeTestClient(
                **where, secret=SECRET, signature_header="X-Proxy-Sig"
            ) as client:
                assert (await client.message("hello")).text == "Hi"
                assert (await client.session_update()).body == {"status": "ok"}
                assert (await client.post(session_update_event())).status_code == 200
                assert (await client.post(session_update_event(), signed=False)).status_code == 401
    assert seen == ([["x-proxy-sig"]] * 3 + [[]]) * 2  # never under layercode-signature
    with pytest.raises(ValueError, match=r"^signature_header 'a b': not a valid header name"):
        LayercodeTestClient(signed, secret=SECRET, signature_header="a b")


@pytest.mark.anyio
async def test_the_turn_helpers_take_on_event() -> None:
    # Before: on_event= went into the event as a field, and encoding it raised a TypeError.
    seen: list[str] = []
    async with LayercodeTestClient(echo_app(), secret=SECRET) as client:
        await client.session_start(on_event=lambda event: seen.append(event["type"]))
        turn = await client.message("hi", on_event=lambda event: seen.append(event["type"]))
    assert seen == ["response.tts", "response.end", "response.tts", "response.end"]
    assert turn.text == "You said: hi"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["Layercode-Signature", "Content-Type"])
async def test_post_headers_replace_the_kits_own_whatever_their_case(name: str) -> None:
    # Before: post(headers={"Layercode-Signature": ...}) sent the kit's own signature header
    # too (lowercase), so the app saw two, and "headers override" did not hold.
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(list(scope["headers"]))
        await read_body(receive)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = LayercodeTestClient(app=app, secret=SECRET, headers={"X-Fixed": "1"})
    reply = await client.post(message_event("x"), headers={name: "given", "x-FIXED": "2"})
    assert reply.status_code == 204
    (headers,) = seen
    assert [v for k, v in headers if k == name.lower().encode()] == [b"given"], headers
    assert [v for k, v in headers if k == b"x-fixed"] == [b"2"], headers


@pytest.mark.parametrize(
    ("data", "error", "said"),
    [
        (object(), TypeError, r"^data is object: JSON cannot carry it as it is"),
        (float("nan"), ValueError, r"^data is nan: JSON has no NaN or infinity"),
        ({"a": [1, float("inf")]}, ValueError, r"^data\['a'\]\[1\] is inf: JSON has no NaN"),
        (b"hi", TypeError, r"^data is bytes: JSON cannot carry it"),
        ({"tags": {"a"}}, TypeError, r"^data\['tags'\] is set: JSON cannot carry it"),
        ({1: 2}, TypeError, r"^data has the key 1, not a str: JSON keys are strings"),
        # Before: a UnicodeEncodeError from msgspec when sent, naming neither.
        ({"a": "\udcff"}, ValueError, r"^data\['a'\] is not valid text \(a lone surrogate"),
        ({"\udcff": 1}, ValueError, r"^data\['\\udcff'\] is not valid text \(a lone"),
    ],
)
def test_data_json_cannot_carry_as_it_is_is_refused(data: Any, error: type, said: str) -> None:
    # Before: msgspec's bare "Encoding objects of type object is unsupported" when sent (not
    # naming the argument), or sent changed: NaN as null, bytes as base64, a set as an array,
    # {1: 2} as {"1": 2}.
    with pytest.raises(error, match=said):
        data_event(data)
    with pytest.raises(error, match=said.replace("data", "metadata", 1)):
        message_event("x", metadata=data)
    assert data_event({"a": [1, 2.5, None, True, "é"], "b": (1,)})["data"]["b"] == (1,)


@pytest.mark.anyio
async def test_the_client_refuses_data_json_cannot_carry_before_sending() -> None:
    sent: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append(await read_body(receive))

    client = LayercodeTestClient(app, secret=SECRET)
    with pytest.raises(ValueError, match=r"^data is nan: JSON has no NaN or infinity"):
        await client.data(float("nan"))  # before: sent as null, answered as if all was well
    with pytest.raises(TypeError, match=r"^data is object: JSON cannot carry it as it is"):
        await client.data(object())
    # Before: an event made by hand (or a factory's, changed) was sent changed: a NaN as
    # null, bytes as base64; post() too, and raw bytes in a bytearray became a base64 string.
    event = {**session_update_event(), "x": float("nan")}
    with pytest.raises(ValueError, match=r"^event\['x'\] is nan: JSON has no NaN"):
        await client.send(event)
    with pytest.raises(TypeError, match=r"^event\['b'\] is bytes: JSON cannot carry it"):
        await client.post({"b": b"raw"})
    assert sent == []


@pytest.mark.anyio
async def test_post_sends_raw_bytes_of_any_bytes_like_type_as_they_are() -> None:
    sent: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append(await read_body(receive))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = LayercodeTestClient(app, secret=SECRET)
    for body in (b'{"a":1}', bytearray(b'{"a":1}'), memoryview(b'{"a":1}'), '{"a":1}'):
        assert (await client.post(body)).status_code == 204
    assert sent == [b'{"a":1}'] * 4  # before: a bytearray or memoryview as '"eyJhIjoxfQ=="'


def test_signing_with_an_empty_secret_is_refused_as_the_client_refuses_it() -> None:
    # Before: signed_headers signed with "" (a signature anybody can make) without a word;
    # and both took a blank one ("  "), which verify_signature refuses as no secret.
    for secret in ("", "  ", "\t\r\n"):
        with pytest.raises(ValueError, match=r"^secret is required \(the webhook secret"):
            signed_headers(b"{}", secret)
        with pytest.raises(ValueError, match=r"^secret is required \(the webhook secret"):
            LayercodeTestClient(echo_app(), secret=secret)


@pytest.mark.anyio
@pytest.mark.parametrize("starts", [False, True])
async def test_a_timeout_names_the_turn_id(starts: bool) -> None:
    async def late(scope: Any, receive: Any, send: Any) -> None:
        if starts:
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        await anyio.sleep_forever()

    client = LayercodeTestClient(late, secret=SECRET, timeout=0.05)
    for send_one in (
        lambda: client.message("x", turn_id="turn-late"),
        lambda: client.data({}, turn_id="turn-late"),
    ):
        with anyio.fail_after(10), pytest.raises(ProtocolViolation) as caught:
            await send_one()
        # Before: "message not answered within 0.05 s (...)", the turn only on .turn_id.
        assert caught.value.name == "timeout" and caught.value.turn_id == "turn-late"
        assert "(turn_id 'turn-late')" in str(caught.value)
    with anyio.fail_after(10), pytest.raises(ProtocolViolation) as caught:
        await client.session_update()  # no turn_id: none named
    assert caught.value.detail.startswith("session.update ") and "turn_id" not in str(caught.value)


@pytest.mark.parametrize("name", ["conversation_id", "session_id"])
def test_an_empty_id_is_refused_by_the_client_and_kept_by_the_factories(name: str) -> None:
    # Before: the client silently used a random id instead (the server answers 400 to "").
    with pytest.raises(ValueError, match=f"^{name} must not be empty"):
        LayercodeTestClient(echo_app(), secret=SECRET, **{name: ""})
    # Before: a factory replaced "" with a random id too: a test of the 400 sent a valid event.
    assert message_event("x", **{name: ""})[name] == ""
    assert message_event("x", turn_id="")["turn_id"] == ""


async def stopping_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers a turn's text: ``refused`` 401 with a long body (the request body unread),
    ``wrong-turn-id`` / ``bad-json`` / ``too-large`` that violation, then more; else a turn."""

    message = await receive()  # one chunk of the body: the rest is left unread
    event = msgspec.json.decode(message["body"]) if not message["more_body"] else {}
    text, turn = event.get("text", "refused"), str(event.get("turn_id")).encode()
    first = {
        "wrong-turn-id": b'data: {"type":"response.tts","content":"a","turn_id":"other"}\n\n',
        "bad-json": b"data: {nope\n\n",
        "too-large": b": " + b"x" * 300 + b"\n\n",
    }.get(text, b'data: {"type":"response.tts","content":"a","turn_id":"%s"}\n\n' % turn)
    status, kind = (401, b"text/plain") if text == "refused" else (200, b"text/event-stream")
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
    )
    await send(
        {
            "type": "http.response.body",
            "body": b"no " * 100 if status == 401 else first,
            "more_body": True,
        }
    )
    end = b'data: {"type":"response.end","turn_id":"%s"}\n\n' % turn
    await send({"type": "http.response.body", "body": end})


@pytest.fixture(scope="module")
def stopping_server() -> Any:
    with serve(stopping_app) as url:
        yield url


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [pytest.param("trio", marks=NEEDS_TRIO)])
@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "server"])
@pytest.mark.parametrize("text", ["refused", "wrong-turn-id", "bad-json", "too-large", "on_event"])
async def test_a_reply_left_unread_leaves_no_async_generator_to_the_garbage_collector(
    text: str, in_process: bool, stopping_server: str
) -> None:
    """Before: on trio, each of these left the kit's, httpx's and httpcore's async generators
    (the reply's stream, the request body) unfinished, and trio warned as the garbage
    collector took them (``ResourceWarning: Async generator ... was garbage collected``): a
    test run with ``-W error::ResourceWarning`` failed on an "Exception ignored"."""

    def boom(event: dict[str, Any]) -> None:
        raise KeyError("on_event's own")

    where: dict[str, Any] = {"base_url": stopping_server} if not in_process else {}
    if text == "too-large":
        where["max_bytes"] = 200
    client = LayercodeTestClient(stopping_app if in_process else None, secret=SECRET, **where)
    body = "x" * 4_000_000 if text == "refused" and not in_process else text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with anyio.fail_after(10):
                await client.message(body, on_event=boom if text == "on_event" else None)
        except (ProtocolViolation, KeyError) as exc:
            raised = exc.name if isinstance(exc, ProtocolViolation) else "on_event"
        gc.collect()
    assert raised in (text, "http-error", "connection-error")
    left = [str(w.message)[16:80] for w in caught if "garbage collected" in str(w.message)]
    assert left == []


# -- turn ids: told briefly, of the right type ------------------------------------------------


def test_a_wrong_turn_id_is_told_briefly_and_names_the_turn_as_other_violations() -> None:
    # Before: the expected id in full (a 10,000-character id, a 10,000-character message),
    # and "(event #1)" without the "of turn_id …" every other violation of a turn says.
    huge = "t" * 10_000
    shown = repr(huge)[:79] + "…"
    with pytest.raises(ProtocolViolation) as caught:
        TurnChecker(huge).check(SSEEvent('{"type":"response.tts","content":"a","turn_id":"t2"}'))
    assert caught.value.name == "wrong-turn-id"
    assert caught.value.detail == f"'response.tts' (event #1 of turn_id {shown}) has turn_id 't2'"
    with pytest.raises(ProtocolViolation) as caught:
        check('{"type":"response.end"}')
    assert caught.value.detail == "'response.end' (event #1 of turn_id 't1') has no turn_id"
    with pytest.raises(ProtocolViolation) as caught:  # the request had none: it says so
        check(END, turn_id="")
    assert caught.value.detail == "'response.end' (event #1) has turn_id 't1', expected ''"


@pytest.mark.parametrize(
    ("turn_id", "kind"),
    [("5", "a number"), ("5.0", "a number"), ("null", "null"), ("true", "a boolean"),
     ('["t1"]', "an array"), ('{"id":"t1"}', "an object")],
)  # fmt: skip
def test_a_turn_id_that_is_no_string_is_an_invalid_event_naming_its_type(
    turn_id: str, kind: str
) -> None:
    # Before: "wrong-turn-id: … has turn_id 5, expected '5'" (null too, as None).
    for start in ('"response.tts","content":"a"', '"response.error","error":"e"'):
        event = f'{{"type":{start},"turn_id":{turn_id}}}'
        with pytest.raises(ProtocolViolation) as caught:
            TurnChecker("5").check(SSEEvent(event))
        assert caught.value.name == "invalid-event"
        assert caught.value.detail.endswith(
            f"(event #1 of turn_id '5') turn_id is {kind}, not a string"
        )


@pytest.mark.anyio
async def test_a_backend_echoing_the_turn_id_as_a_number_is_an_invalid_event() -> None:
    body = b'data: {"type":"response.tts","content":"x","turn_id":7}\n\nEND'
    client = LayercodeTestClient(replying_app(b"text/event-stream", body), secret=SECRET)
    with pytest.raises(ProtocolViolation) as caught:
        await client.message("x", turn_id="7")
    assert caught.value.name == "invalid-event"
    assert caught.value.detail == (
        "'response.tts' (event #1 of turn_id '7') turn_id is a number, not a string"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("turn_id", [7, None, ["t"]])
async def test_a_turn_whose_own_turn_id_is_no_string_is_a_type_error(turn_id: Any) -> None:
    # Before: sent, its turn_id compared as str(turn_id): 7 as "7", None as "None".
    sent: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append(await read_body(receive))

    client = LayercodeTestClient(app, secret=SECRET)
    with pytest.raises(TypeError, match=r"^event\['turn_id'\] must be a str \(.*\), got "):
        await client.send({**message_event("x"), "turn_id": turn_id})
    assert sent == []


@pytest.mark.parametrize("secret", [0, None, False, b"", []])
def test_a_secret_of_another_type_is_a_type_error_even_when_falsy(secret: Any) -> None:
    # Before: "secret is required" (ValueError) for these, TypeError for 5 or [SECRET].
    with pytest.raises(TypeError, match="secret must be a str"):
        LayercodeTestClient(echo_app(), secret=secret)
    if secret != b"":  # signing takes bytes too (sign's rule): b"" is an empty one
        with pytest.raises(TypeError, match="secret must be a str"):
            signed_headers(b"{}", secret)
