"""Issue 14 item 8: no event this package writes can be cut by a Unicode line reader.

U+0085, U+2028 and U+2029 are legal raw inside JSON strings and are not SSE line ends,
but ``str.splitlines`` (and some proxies) split on them. Every path that writes events
escapes them inside JSON; the decoded values stay equal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import (
    Data,
    Hangup,
    LayercodeSignature,
    LayercodeWebhook,
    create_sse_response,
    format_sse_message,
    parse_webhook_payload,
    stream_response,
)

from .conftest import SECRET, event_body, serve, signed_headers

TRICKY = "one\u2028two\u2029three\x85four, é and ✓"
RAW_BREAKS = ("\u2028", "\u2029", "\x85")


def data_values(wire: str) -> list[Any]:
    """Every ``data:`` line of a raw event stream, decoded as JSON, after checking that
    a Unicode line reader sees exactly the stream's own lines."""
    assert wire.endswith("\n\n") and "\r" not in wire
    assert wire.splitlines() == wire.split("\n")[:-1], "a line was cut by str.splitlines"
    assert not any(char in wire for char in RAW_BREAKS)
    return [
        msgspec.json.decode(line.removeprefix("data: "))
        for line in wire.split("\n")
        if line.startswith("data: ")
    ]


def test_format_sse_message_escapes_them_in_json_data() -> None:
    value = {"text": TRICKY, "list": [TRICKY]}
    message = format_sse_message(msgspec.json.encode(value).decode(), event="x", id="1")
    assert data_values(message) == [value]
    # text that is not JSON is carried as it is: SSE does not split on these characters
    assert format_sse_message(f"not json: {TRICKY}") == f"data: not json: {TRICKY}\n\n"


def test_text_the_json_check_cannot_read_is_carried_as_it_is() -> None:
    # Before: the JSON check itself raised out of format_sse_message (UnicodeEncodeError
    # for a lone surrogate, RecursionError for deep nesting), only when such text also
    # held U+2028 & co.; without them the same text went through as it is.
    for text in ("\ud800 and \u2028", '"\ud800\u2028"', "[" * 100_000 + "\u2028"):
        assert format_sse_message(text) == f"data: {text}\n\n"


def test_text_nested_too_deep_to_be_json_is_carried_as_it_is() -> None:
    # Deciding whether it is JSON hit the decoder's depth limit: a RecursionError.
    text = "[" * 100_000 + " \u2028"
    assert format_sse_message(text) == f"data: {text}\n\n"


def test_create_sse_response_over_uvicorn() -> None:
    value = {"text": TRICKY}

    async def items() -> AsyncIterator[Any]:
        yield msgspec.json.encode(value).decode()
        yield {"data": msgspec.json.encode([TRICKY]).decode(), "event": "list"}

    async def route(request: Request) -> Response:
        return create_sse_response(items(), ping=0)

    app = Starlette(routes=[Route("/events", route)])
    with serve(app) as url:
        wire = httpx.get(f"{url}/events", timeout=10).text
    assert data_values(wire) == [value, [TRICKY]]


async def tricky_agent(event: Any) -> AsyncIterator[Any]:
    yield TRICKY
    yield Data({"caption": TRICKY, TRICKY: 1})
    yield Hangup(TRICKY)


def test_turn_events_over_uvicorn() -> None:
    app = LayercodeSignature(LayercodeWebhook(tricky_agent), secret=SECRET)
    turn_id = "turn\u2028id"
    body = event_body(turn_id=turn_id, text=TRICKY)
    with serve(app) as url:
        wire = httpx.post(f"{url}/api/agent", content=body, headers=signed_headers(body)).text
    assert data_values(wire) == [
        {"type": "response.tts", "content": TRICKY, "turn_id": turn_id},
        {"type": "response.data", "content": {"caption": TRICKY, TRICKY: 1}, "turn_id": turn_id},
        {"type": "response.hangup", "content": TRICKY, "turn_id": turn_id},
        {"type": "response.end", "turn_id": turn_id},
    ]


def test_node_style_stream_over_uvicorn() -> None:
    async def handler(stream: Any) -> None:
        await stream.tts(TRICKY)
        await stream.data([TRICKY])
        await stream.end()

    async def route(request: Request) -> Response:
        return stream_response(parse_webhook_payload(await request.body()), handler)

    app = Starlette(routes=[Route("/api/agent", route, methods=["POST"])])
    body = event_body()
    with serve(app) as url:
        wire = httpx.post(f"{url}/api/agent", content=body).text
    assert data_values(wire) == [
        {"type": "response.tts", "content": TRICKY, "turn_id": "turn-1"},
        {"type": "response.data", "content": [TRICKY], "turn_id": "turn-1"},
        {"type": "response.end", "turn_id": "turn-1"},
    ]
