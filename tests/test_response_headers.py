"""Caller-given response headers (``headers=`` of the streaming responses) are refused when
they could not go out as one header line: never handed to the server to split a response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import EventStreamResponse, create_sse_response, stream_turn
from layercode_asgi.sse import Emit

from .conftest import event_body, serve

BAD_HEADERS: list[tuple[Any, type[Exception]]] = [
    ({"x-a": "b\r\nset-cookie: session=forged"}, ValueError),  # response splitting
    ({"x-a": "b\nx-forged: 1"}, ValueError),
    ({"x-a": "b\rx-forged: 1"}, ValueError),
    ({"x-a": "b\0"}, ValueError),
    ({"x-a": "caf€"}, ValueError),  # not latin-1: no byte for it on the wire
    ({"x-a\r\nx-forged": "1"}, ValueError),
    ({"x a": "1"}, ValueError),
    ({"": "1"}, ValueError),
    # The body's framing is the server's: a stream has no length, and a length given
    # would make the rest of the stream read as a next response.
    ({"Content-Length": "0"}, ValueError),
    ({"transfer-encoding": "identity"}, ValueError),
    ({"x-a": 5}, TypeError),
    ({b"x-a": "1"}, TypeError),
    ([("x-a", "1")], TypeError),  # not a mapping
    (0, TypeError),  # a falsy non-mapping was silently taken for "no headers"
    ("", TypeError),
    ([], TypeError),
]


async def _producer(emit: Emit) -> None:
    await emit(b"data: x\n\n")


async def _source() -> AsyncIterator[str]:
    yield "x"


def _builders() -> list[Any]:
    return [
        lambda headers: EventStreamResponse(_producer, headers=headers),
        lambda headers: create_sse_response(_source(), headers=headers),
        lambda headers: stream_turn(event_body("message", text="hi"), _agent, headers=headers),
    ]


async def _agent(event: Any, context: Any) -> AsyncIterator[str]:
    yield "hi"


@pytest.mark.parametrize("build", _builders(), ids=["EventStreamResponse", "sse", "stream_turn"])
@pytest.mark.parametrize(("headers", "error"), BAD_HEADERS)
def test_a_header_that_is_not_one_line_or_frames_the_body_is_refused(
    build: Any, headers: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="headers"):
        build(headers)


async def _turn(request: Request) -> Response:
    headers = {"x-note": "café\tok", "Cache-Control": "no-store"}
    kind = request.path_params["kind"]
    if kind == "sse":
        return create_sse_response(_source(), headers=headers)
    return stream_turn(await request.body(), _agent, headers=headers)


@pytest.mark.parametrize("kind", ["sse", "turn"])
def test_valid_headers_still_go_out_under_uvicorn(kind: str) -> None:
    app = Starlette(routes=[Route("/{kind}", _turn, methods=["POST"])])
    with serve(app) as url:
        reply = httpx.post(f"{url}/{kind}", content=event_body("message", text="hi"), timeout=10)
    assert reply.status_code == 200
    assert reply.headers.get_list("cache-control") == ["no-store"]
    assert reply.headers.raw[[k for k, _ in reply.headers.raw].index(b"x-note")][1] == (
        "café\tok".encode("latin-1")
    )
