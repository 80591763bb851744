"""``format_sse_message`` against the SSE spec, and ``create_sse_response`` in each stack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio.lowlevel
import httpx
import pytest
from fastapi import FastAPI
from httpx_sse import aconnect_sse
from hypothesis import given
from hypothesis import strategies as st
from litestar import Litestar, post
from litestar.types import ASGIApp
from sse_starlette import ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from layercode_asgi import create_sse_response, format_sse_message

from .conftest import BACKENDS


def parse(message: str) -> dict[str, Any]:
    """A tiny, independent reading of one SSE message per the WHATWG algorithm."""
    fields: dict[str, Any] = {"data": []}
    assert message.endswith("\n\n")
    for line in message[:-1].split("\n")[:-1]:
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            fields["data"].append(value)
        else:
            fields[name] = value
    fields["data"] = "\n".join(fields["data"])
    return fields


def test_seed_example() -> None:
    assert format_sse_message("Hello, world!", event="message", id="msg-123") == (
        "event: message\nid: msg-123\ndata: Hello, world!\n\n"
    )


def test_plain_data() -> None:
    assert format_sse_message("hi") == "data: hi\n\n"
    assert format_sse_message("") == "data: \n\n"


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("a\nb", ["a", "b"]),
        ("a\r\nb", ["a", "b"]),
        ("a\rb", ["a", "b"]),
        ("a\n\nb\r\n", ["a", "", "b", ""]),
        ("\n", ["", ""]),
    ],
)
def test_line_breaks_become_data_lines(data: str, lines: list[str]) -> None:
    assert format_sse_message(data) == "".join(f"data: {x}\n" for x in lines) + "\n"


def test_only_sse_line_breaks_split() -> None:
    # \u2028, \x0b, \x0c, \x85 are line breaks for str.splitlines but not for SSE
    text = "a\u2028b\x0bc\x0cd\x85e"
    assert format_sse_message(text) == f"data: {text}\n\n"


@pytest.mark.parametrize("bad", [7, b"ev", 1.5])
def test_event_and_id_that_are_not_str_get_a_clear_type_error(bad: Any) -> None:
    # Before: the line-break regex's own "expected string or bytes-like object, got
    # 'int'" (or "cannot use a string pattern on a bytes-like object"), naming neither.
    with pytest.raises(TypeError, match=f"SSE event must be a str, got {type(bad).__name__}"):
        format_sse_message("x", event=bad)
    with pytest.raises(TypeError, match=f"SSE id must be a str, got {type(bad).__name__}"):
        format_sse_message("x", id=bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n"])
def test_event_and_id_injection_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        format_sse_message("x", event=bad)
    with pytest.raises(ValueError):
        format_sse_message("x", id=bad)


def test_id_with_nul_and_retry_validation() -> None:
    with pytest.raises(ValueError):
        format_sse_message("x", id="a\0b")
    assert format_sse_message("x", retry=1500) == "retry: 1500\ndata: x\n\n"
    for bad in (-1, True, 1.5, "10"):
        with pytest.raises(ValueError):
            format_sse_message("x", retry=bad)  # type: ignore[arg-type]


@given(
    data=st.text(),
    event=st.one_of(st.none(), st.text().filter(lambda s: "\n" not in s and "\r" not in s)),
    id_=st.one_of(st.none(), st.text().filter(lambda s: not ({"\n", "\r", "\0"} & set(s)))),
)
def test_round_trip_through_an_sse_reader(data: str, event: str | None, id_: str | None) -> None:
    message = format_sse_message(data, event=event, id=id_)
    fields = parse(message)
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert fields["data"] == expected
    if event is not None:
        assert fields["event"] == event
    if id_ is not None:
        assert fields["id"] == id_


# -- create_sse_response mounted in every stack, read with httpx-sse ----------------------------


async def numbers() -> AsyncIterator[Any]:
    yield "one"
    yield "two\nlines"
    yield format_sse_message("three", event="custom").encode()
    yield ServerSentEvent(data="four", event="e4")
    yield {"data": "five", "id": "5"}


def starlette_app() -> Any:
    async def route(request: Request) -> Response:
        return create_sse_response(numbers(), ping=0)

    return Starlette(routes=[Route("/sse", route, methods=["POST"])])


def fastapi_app() -> Any:
    app = FastAPI()

    @app.post("/sse")
    async def route() -> Response:
        return create_sse_response(numbers(), ping=0)

    return app


def litestar_app() -> Any:
    @post("/sse")
    async def route() -> ASGIApp:
        return create_sse_response(numbers(), ping=0)

    return Litestar(route_handlers=[route])


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The turn and stream tests run on both of anyio's backends."""
    return str(request.param)


@pytest.mark.anyio
@pytest.mark.parametrize("make", [starlette_app, fastapi_app, litestar_app])
async def test_create_sse_response_in_every_stack(make: Any) -> None:
    transport = httpx.ASGITransport(app=make())
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        aconnect_sse(client, "POST", "/sse") as source,
    ):
        response = source.response
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache, no-transform"
        assert response.headers["x-accel-buffering"] == "no"
        events = [(e.event, e.data, e.id) for e in [s async for s in source.aiter_sse()]]
    assert events == [
        ("message", "one", ""),
        ("message", "two\nlines", ""),
        ("custom", "three", ""),
        ("e4", "four", ""),
        ("message", "five", "5"),
    ]


@pytest.mark.anyio
async def test_ping_0_sends_no_keep_alive_comments() -> None:
    # sse-starlette 3.0 (the lowest allowed) to 3.4.1 at least took ping=0 as "every 0 s":
    # its ping loop spun, and a stream pausing for a moment carried thousands of comments.
    async def pausing() -> AsyncIterator[str]:
        yield "a"
        for _ in range(50):  # what any real wait does: the event loop runs other tasks
            await anyio.lowlevel.checkpoint()
        yield "b"

    app = Starlette(routes=[Route("/", lambda request: create_sse_response(pausing(), ping=0))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        reply = await c.get("/")
    assert reply.text == "data: a\n\ndata: b\n\n"


@pytest.mark.anyio
async def test_create_sse_response_headers_replace_the_default_ones() -> None:
    # Before: sse-starlette set X-Accel-Buffering: no over the one given (as docs/stacks.md
    # says, a header given replaces the default of that name).
    given = {"X-Accel-Buffering": "yes", "Cache-Control": "no-store", "x-extra": "1"}

    async def one() -> AsyncIterator[str]:
        yield "a"

    app = Starlette(routes=[Route("/", lambda request: create_sse_response(one(), headers=given))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        reply = await c.get("/")
    sent = [(name, value) for name, value in reply.headers.raw if name != b"connection"]
    assert sorted(sent) == [
        (b"cache-control", b"no-store"),
        (b"content-type", b"text/event-stream"),
        (b"x-accel-buffering", b"yes"),
        (b"x-extra", b"1"),
    ]


@pytest.mark.anyio
async def test_create_sse_response_refuses_unknown_items() -> None:
    closed = []

    async def bad() -> AsyncIterator[Any]:
        try:
            yield 42
        finally:
            closed.append(True)

    response = create_sse_response(bad(), ping=0)
    with pytest.raises(TypeError, match="create_sse_response items"):
        async for _ in response.body_iterator:
            pass
    # Closed at once (before: left to the garbage collector; on trio a ResourceWarning).
    assert closed == [True]


@pytest.mark.anyio
async def test_create_sse_response_leaves_a_callers_stream_open_and_takes_a_bare_iterator() -> None:
    # A memory stream the caller goes on using is the caller's to close (a change this
    # morning closed it under the caller); and an async
    # iterable whose iterator has __anext__ but no __aiter__ is still read (it raised
    # "'async for' requires an object with __aiter__ method").
    send, receive = anyio.create_memory_object_stream[str](2)
    await send.send("a")
    await send.aclose()
    response = create_sse_response(receive, ping=0)
    assert [item async for item in response.body_iterator] == [b"data: a\n\n"]
    with pytest.raises(anyio.EndOfStream):  # still open (closed: ClosedResourceError)
        receive.receive_nowait()
    await receive.aclose()

    class Counter:
        def __init__(self) -> None:
            self.left = 2

        async def __anext__(self) -> str:
            if not self.left:
                raise StopAsyncIteration
            self.left -= 1
            return f"n{self.left}"

    class Items:
        def __aiter__(self) -> Counter:
            return Counter()

    response = create_sse_response(Items(), ping=0)
    assert [item async for item in response.body_iterator] == [b"data: n1\n\n", b"data: n0\n\n"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("send_timeout", float("nan")),  # before: "deadline must not be NaN" mid-stream
        ("send_timeout", -1),  # before: every send timed out, the stream cut
        ("send_timeout", 0),
        ("send_timeout", "5"),
        ("ping", float("nan")),  # before: accepted, and no keep-alive was ever sent
        ("ping", float("inf")),
    ],
)
def test_create_sse_response_refuses_invalid_durations(option: str, value: Any) -> None:
    async def items() -> AsyncIterator[str]:
        yield "x"

    with pytest.raises(ValueError, match=f"{option} must be a finite number"):
        create_sse_response(items(), **{option: value})


def test_create_sse_response_accepts_valid_durations() -> None:
    async def items() -> AsyncIterator[str]:
        yield "x"

    for options in ({"ping": 0}, {"ping": 5, "send_timeout": 2.5}, {"ping": None}):
        create_sse_response(items(), **options)  # type: ignore[arg-type]


def _sync_items() -> Any:
    yield "x"


@pytest.mark.parametrize("source", [["a", "b"], _sync_items(), "ab", None])
def test_create_sse_response_refuses_what_is_not_an_async_iterable(source: Any) -> None:
    # Before: accepted, then a 200 status line and the stream cut by "'async for'
    # requires an object with __aiter__ method" once the server ran the response.
    with pytest.raises(TypeError, match=f"an async iterable.*got {type(source).__name__}"):
        create_sse_response(source)
