"""What reaches the log (``setup_logging``'s two formats) and the caller when an agent or a
hook raises, its exception quoting a hostile request or being one of ours: create_app under
a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from layercode_asgi import (
    ConfigurationError,
    DataPayload,
    InvalidPayloadError,
    LayercodeSignature,
    LayercodeWebhook,
    Settings,
    SignatureErrorReason,
    SignatureVerificationError,
    TurnEvent,
    create_app,
)
from layercode_asgi.conversation import (
    ConversationManager,
    MemoryConversationStore,
    StoreUnavailableError,
)
from layercode_asgi.logs import LOG_TRACEBACK_MAX_CHARS, LOG_VALUE_MAX_CHARS
from layercode_asgi.metrics import MemoryMetrics, TurnMetrics

from .conftest import SECRET, event_body, logged, serve, signed_headers

#: Characters Python's str.splitlines() breaks a line at, besides \n: C0 separators, U+0085,
#: U+2028, U+2029 (and \r, \v, \f).
BREAKS = "a\rb\x0bc\x0cd\x1ce\x1df\x1eg\x85h\u2028i\u2029j"
#: A line far longer than LOG_VALUE_MAX_CHARS, then many lines.
LONG = "x" * 200_000 + "\n" * 50_000 + "end"


async def quoting_agent(event: TurnEvent) -> AsyncIterator[str]:
    raise ValueError(f"cannot read {event.text}")
    yield ""  # pragma: no cover - a generator agent


def quoting_hook(event: DataPayload) -> None:
    raise LookupError(f"no such item: {event.data['k']}")


def post_hostile_requests() -> list[httpx.Response]:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, quoting_agent, on_data=quoting_hook)
    bodies = [
        event_body("message", text=f"{BREAKS}{LONG}"),
        event_body("data", data={"k": f"{BREAKS}{LONG}"}),
    ]
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        return [client.post("/api/agent", content=b, headers=signed_headers(b)) for b in bodies]


def assert_generic_answers(replies: list[httpx.Response]) -> None:
    turn, data = replies
    assert turn.status_code == 200 and '"error":"agent error"' in turn.text
    assert "cannot read" not in turn.text
    assert data.status_code == 500 and data.json() == {"error": "data handler failed"}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_request_quoted_by_an_exception_is_cut_in_its_traceback(log_format: str) -> None:
    # The log line's message cut the exception's text at LOG_VALUE_MAX_CHARS, but the
    # traceback below it carried all of it (a 200,000-character line, then 50,000 lines),
    # in both formats.
    with logged(log_format) as stream:
        replies = post_hostile_requests()
    assert_generic_answers(replies)
    logs = stream.getvalue()
    assert "cannot read" in logs and "no such item" in logs
    assert " chars)" in logs  # the cut is shown
    # two tracebacks of at most LOG_TRACEBACK_MAX_CHARS, empty lines (text: indented)
    assert len(logs) < 12 * LOG_TRACEBACK_MAX_CHARS, len(logs)
    for line in logs.rstrip("\n").split("\n"):
        if log_format == "text":
            assert len(line) < 2 * LOG_VALUE_MAX_CHARS, line[:200]
        else:
            fields: dict[str, Any] = json.loads(line)
            assert len(fields.get("exception", "")) < LOG_TRACEBACK_MAX_CHARS + 100


def test_a_traceback_keeps_the_line_breaks_other_than_newline_escaped() -> None:
    # The text format split a traceback at every character str.splitlines() breaks at:
    # U+2028, U+0085, \x1c... vanished from the exception's text, which went on, indented,
    # on a line of its own.
    with logged("text") as stream:
        replies = post_hostile_requests()
    assert_generic_answers(replies)
    logs = stream.getvalue()
    escaped = "a\\rb\\u000bc\\fd\\u001ce\\u001df\\u001eg\\u0085h\\u2028i\\u2029j"
    lines = logs.split("\n")
    traceback_lines = [line for line in lines if line.startswith("    ") and "Error: " in line]
    assert len(traceback_lines) == 2, logs[:2000]
    for line in traceback_lines:
        assert escaped in line, line[:200]


def hook_raising(error: Exception) -> Any:
    def hook(event: DataPayload) -> None:
        raise error

    return hook


@pytest.mark.parametrize(
    "error",
    [
        InvalidPayloadError("a forwarded event is not valid"),  # parse_webhook_payload's
        SignatureVerificationError(
            SignatureErrorReason.NO_MATCHING_SIGNATURE
        ),  # verify_signature's
        ConfigurationError("LAYERCODE_WEBHOOK_SECRET whsec_x is not for this"),
    ],
    ids=type,
)
def test_a_hook_raising_one_of_our_errors_is_its_handler_failing(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    # Any LayercodeError from a hook was answered as a conversation store failure: 503
    # "conversation store unavailable" with Retry-After (LayerCode retries), the traceback
    # left out of the log. Only the store's own errors mean that.
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, on_data=hook_raising(error))
    body = event_body("data")
    with serve(app) as url:
        reply = httpx.post(f"{url}/api/agent", content=body, headers=signed_headers(body))
    assert (reply.status_code, reply.json()) == (500, {"error": "data handler failed"})
    assert "retry-after" not in reply.headers
    failed = [r for r in caplog.records if r.getMessage().startswith("webhook hook failed")]
    assert len(failed) == 1 and failed[0].exc_info is not None


def test_a_hook_meeting_the_store_down_is_still_a_503() -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, on_data=hook_raising(StoreUnavailableError("redis at 10.0.0.1")))
    body = event_body("data")
    with serve(app) as url:
        reply = httpx.post(f"{url}/api/agent", content=body, headers=signed_headers(body))
    assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
    assert reply.json() == {"error": "conversation store unavailable"}


async def lingering_agent(event: TurnEvent) -> AsyncIterator[str]:
    yield "one moment"
    if event.text == "linger":
        await anyio.sleep(30)  # the client leaves first


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_webhook_line_names_an_unknown_type_and_a_turn_cut_short(log_format: str) -> None:
    # Before: an event of unknown type logged ``type=-`` (its type only in the warning
    # above), then ``conversation=-`` though the body had one; and a turn whose client left
    # mid-stream ``status=200`` as if it had completed.
    memory = MemoryMetrics()
    webhook = LayercodeWebhook(lingering_agent, conversations=None, metrics=TurnMetrics(memory))
    with logged(log_format) as stream, serve(webhook) as url, httpx.Client(base_url=url) as c:
        unknown_body = event_body("future\nevent", conversation_id="conv\n9")
        assert c.post("/", content=unknown_body).json() == {"status": "ignored"}
        assert "response.end" in c.post("/", content=event_body("message", text="hi")).text
        with c.stream("POST", "/", content=event_body("message", text="linger")) as cut:
            assert "one moment" in next(cut.iter_lines())
        for _ in range(500):  # the server's line for the cut turn: once it noticed
            if stream.getvalue().count("webhook type=") == 3:
                break
            time.sleep(0.02)
    assert [r.event_type for r in memory.records] == [None, "message", "message"]  # labels
    lines = [line for line in stream.getvalue().splitlines() if "webhook type=" in line]
    if log_format == "json":
        fields = [json.loads(line) for line in lines]
        assert [
            (f["event_type"], f["conversation_id"], f["status"], f.get("outcome")) for f in fields
        ] == [
            ("future\nevent", "conv\n9", 200, None),
            ("message", "conv-1", 200, None),
            ("message", "conv-1", 200, "disconnected"),
        ]
        lines = [f["message"] for f in fields]
    unknown, completed, left = (line[line.index("webhook type=") :] for line in lines)
    assert unknown.startswith(
        'webhook type="future\\nevent" conversation="conv\\n9" turn=- status=200 '
    )
    assert "outcome" not in completed and "outcome" not in unknown
    assert left.startswith("webhook type=message ") and " status=200 " in left
    assert left.endswith(" outcome=disconnected")


#: A store's error quoting the URL it could not reach, password and all.
URL_PASSWORD = "pw-4c1e9b77d2"
QUOTING_URL = f"cannot reach redis://app:{URL_PASSWORD}@cache.internal:6379/0, giving up"


class DownStore(MemoryConversationStore):
    async def ping(self) -> None:
        raise StoreUnavailableError(QUOTING_URL)

    async def record_turn(self, *args: Any) -> bool:
        raise StoreUnavailableError(QUOTING_URL)


class DownReplayCache:
    async def seen(self, key: str, ttl: float) -> bool:
        raise ConnectionError(QUOTING_URL)

    async def aclose(self) -> None:
        pass


def test_a_store_error_quoting_a_url_reaches_the_log_with_its_password_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: escaped but not masked, the replay cache's 503 (and /ready's, a hook's 503, a
    # turn not recorded) logged redis://app:<password>@… as the store's error quoted it.
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(
        settings,
        lingering_agent,
        conversations=ConversationManager(DownStore()),
        on_data=hook_raising(StoreUnavailableError(QUOTING_URL)),
    )
    replay = LayercodeSignature(app, secret=SECRET, replay_protection=DownReplayCache())
    data, turn = event_body("data"), event_body("message", text="hi")
    caplog.set_level(logging.INFO, "layercode_asgi")
    with serve(replay) as other, serve(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/ready").status_code == 503
        assert (
            client.post("/api/agent", content=data, headers=signed_headers(data)).status_code == 503
        )
        assert (
            "response.end"
            in client.post("/api/agent", content=turn, headers=signed_headers(turn)).text
        )
        replayed = httpx.post(other + "/api/agent", content=data, headers=signed_headers(data))
        assert replayed.status_code == 503
    quoting = [r.getMessage() for r in caplog.records if "cache.internal" in r.getMessage()]
    assert len(quoting) == 4, quoting  # /ready, the hook, the turn's record, the replay check
    for message in quoting:
        assert URL_PASSWORD not in message
        assert "redis://app:***@cache.internal:6379/0, giving up" in message


def webhook_lines(caplog: pytest.LogCaptureFixture) -> dict[str, logging.LogRecord]:
    """The webhook line of each turn (by turn id) or other event (by type)."""
    lines = {}
    for record in caplog.records:
        if record.getMessage().startswith("webhook type="):
            fields: Any = record
            lines[fields.turn_id if fields.event_type == "message" else fields.event_type] = record
    return lines


@contextlib.contextmanager
def holding(webhook: LayercodeWebhook) -> Iterator[tuple[str, Iterator[str]]]:
    """``webhook`` served, a turn of ``conv-1`` holding its conversation: the URL and the
    rest of the holder's lines (kept: a discarded iterator closes the connection)."""
    with serve(webhook) as url, httpx.Client(base_url=url) as client:
        holder = event_body("message", turn_id="holder", text="linger")
        with client.stream("POST", "/", content=holder) as running:
            lines = running.iter_lines()
            assert "one moment" in next(lines)
            yield url, lines


@pytest.mark.parametrize("bound", ["max_queued_turns", "lock_timeout"])
def test_a_turn_refused_because_its_conversation_is_busy_is_a_warning(
    bound: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: "webhook type=message … status=503" at ERROR, as a server failing, for a
    # conversation with too many turns waiting or one whose wait timed out: refusals the
    # server gives by design (with Retry-After), WARNING as the other refusals.
    options: dict[str, Any] = {bound: 0 if bound == "max_queued_turns" else 0.2}
    webhook = LayercodeWebhook(lingering_agent, **options)
    caplog.set_level(logging.INFO, "layercode_asgi")
    with holding(webhook) as (url, _):
        refused = httpx.post(url, content=event_body("message", turn_id="refused"))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    line = webhook_lines(caplog)["refused"]
    assert " status=503 " in line.getMessage() and line.levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_turns_and_hooks_ended_by_abort_turns_are_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def aborting(event: DataPayload) -> None:
        webhook.abort_turns("maintenance")  # this hook too: it ends in a 503
        await anyio.sleep(30)

    webhook = LayercodeWebhook(lingering_agent, on_data=aborting)
    caplog.set_level(logging.INFO, "layercode_asgi")
    with holding(webhook) as (url, lines):
        replies: list[httpx.Response] = []
        waiting = threading.Thread(
            target=lambda: replies.append(
                httpx.post(url, content=event_body("message", turn_id="waiting"))
            )
        )
        waiting.start()
        for _ in range(500):  # the waiting turn has arrived
            if webhook._pending.get("conv-1") == 2:
                break
            time.sleep(0.01)
        aborted = httpx.post(url, content=event_body("data"))
        waiting.join(10)
        assert "maintenance" in "".join(lines)
    assert (aborted.status_code, aborted.json()) == (503, {"error": "maintenance"})
    [waited] = replies
    assert (waited.status_code, waited.json()) == (503, {"error": "maintenance"})
    logged_lines = webhook_lines(caplog)
    assert logged_lines["data"].levelno == logged_lines["waiting"].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_hook_meeting_the_store_down_is_still_an_error(caplog: pytest.LogCaptureFixture) -> None:
    webhook = LayercodeWebhook(lingering_agent, on_data=hook_raising(StoreUnavailableError("x")))
    caplog.set_level(logging.INFO, "layercode_asgi")
    with serve(webhook) as url:
        assert httpx.post(url, content=event_body("data")).status_code == 503
    assert webhook_lines(caplog)["data"].levelno == logging.ERROR
