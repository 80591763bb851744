"""Every model-backed agent against a provider that misbehaves as real ones do.

The fake OpenAI API (:mod:`tests.fake_openai`) refuses (401, 429 with ``Retry-After``,
5xx) or streams something broken; each agent of test_adapters.py's ``BUILDERS`` must end
its turn with ``response.end`` (after ``response.error`` or the timeout fallback), keep
the provider's answer and the key off the wire, and log the status with the key masked.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from layercode_asgi import ConfigurationError, Settings, create_app, get_agent
from layercode_asgi.conversation import ConversationManager
from layercode_asgi.testing import LayercodeTestClient, TurnResult

from .conftest import SECRET, serve
from .fake_openai import FakeOpenAI, Script, fake_openai, fake_openai_env
from .test_adapters import BUILDERS

KEY = "sk-test"  # what every agent of BUILDERS sends (OPENAI_API_KEY or its settings)
#: A provider refusing the key, echoing it (as proxies and some providers do).
REFUSAL = {
    "error": {
        "message": f"Incorrect API key provided: {KEY}. Check it at https://example.invalid",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with fake_openai_env(monkeypatch) as server:
        yield server


async def turn_of(name: str, **settings: Any) -> TurnResult:
    """One "hi" turn of ``create_app`` with agent ``name`` on a real uvicorn; the test
    fails after 20 s."""
    fields: dict[str, Any] = {"layercode_webhook_secret": SECRET, **settings}
    app = create_app(Settings(env_file=None, environ={}, **fields), BUILDERS[name](False))
    with serve(app) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            return await client.message("hi")


def ended_with_error(turn: TurnResult) -> bool:
    types = [event["type"] for event in turn.events]
    return types[-2:] == ["response.error", "response.end"] and types.count("response.end") == 1


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_a_refused_key_is_logged_with_the_status_and_the_key_masked(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the provider's error (its body echoing the API key) was logged as the SDK
    raised it, key and all, in the message and in the traceback's chained exceptions. And
    only pydantic-ai's line named the model (in its own words): the ``openai`` agent's,
    LangChain's and the Agents SDK's did not."""
    fake.push(Script(status=401, body=REFUSAL))
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    assert turn.errors[0]["error"] == "agent error"
    wire = msgspec.json.encode(turn.events).decode()
    assert "Incorrect" not in wire and KEY not in wire
    assert len(fake.requests) == 1  # a refused key is not retried
    failures = [r for r in caplog.records if r.getMessage().startswith("agent failed")]
    assert len(failures) == 1
    assert "HTTP 401" in failures[0].getMessage()
    assert "Incorrect API key provided: ***." in failures[0].getMessage()
    assert "HTTP 401 (model=gpt-5-nano): " in failures[0].getMessage()  # pydantic-ai's too
    assert KEY not in caplog.text  # nor in the traceback


@pytest.mark.slow  # paced by the SDKs' back-off and the turn timeout
@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_rate_limits_and_server_errors_are_retried_a_bounded_number_of_times(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    refusals = [
        Script(status=429, body=REFUSAL, headers=[("retry-after", "0")]),
        Script(status=500, body=REFUSAL),
        Script(status=502, body=REFUSAL),
        Script(status=503, body=REFUSAL, headers=[("retry-after", "0")]),
    ] * 5
    fake.push(*refusals)
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    assert 1 < len(fake.requests) <= 4  # the SDK's own retries (2), then the failure
    assert KEY not in caplog.text
    status = {1: "429", 2: "500", 3: "502", 4: "503"}[len(fake.requests)]
    assert f"HTTP {status}" in caplog.text


#: LangGraph and the Agents SDK wait out the retry in tasks of their own, and tell no one.
WAITS_IN_OUR_TASK = [name for name in BUILDERS if name not in ("langgraph-agent", "openai-agents")]


@pytest.mark.slow  # paced by the turn timeout
@pytest.mark.anyio
@pytest.mark.parametrize("name", WAITS_IN_OUR_TASK)
async def test_a_turn_timing_out_while_the_sdk_waits_out_a_retry_after_names_the_429(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a 429 whose ``Retry-After`` outlasts the turn left only ``turn timed out``
    in our log (the SDK was sleeping before its retry): not the 429, nor the model."""
    fake.push(Script(status=429, body=REFUSAL, headers=[("retry-after", "20")]))
    with caplog.at_level(logging.WARNING, logger="layercode_asgi"):
        turn = await turn_of(name, turn_timeout=1.0)
    assert turn.errors[0]["error"] == "turn timed out"
    assert len(fake.requests) == 1  # the retry never came
    waits = [r for r in caplog.records if "HTTP 429" in r.getMessage()]
    assert len(waits) == 1
    assert waits[0].name.startswith("layercode_asgi") and waits[0].levelname == "WARNING"
    assert "(model=gpt-5-nano)" in waits[0].getMessage()
    assert "Retry-After: 20" in waits[0].getMessage()
    assert KEY not in caplog.text


@pytest.mark.anyio
async def test_a_base_url_with_credentials_and_a_slash_is_used_and_masked_in_the_log(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """The base URL's user and password (which httpx sends as Basic auth, in place of the
    key), echoed by a proxy refusing the request, are masked too."""
    pytest.importorskip("openai")
    from layercode_asgi.agents import openai_agent

    basic = base64.b64encode(b"bob:PASSWORD9").decode()
    echo = {"error": {"message": f"no route for bob:PASSWORD9 (Authorization: Basic {basic})"}}
    with fake_openai() as (proxy, base_url):
        proxy.push(Script(status=403, body=echo))
        base = base_url.replace("http://", "http://bob:PASSWORD9@") + "/"
        agent = openai_agent(api_key="sk-live-0123456789", base_url=base)
        settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
        with (
            caplog.at_level(logging.ERROR, logger="layercode_asgi"),
            serve(create_app(settings, agent)) as url,
            anyio.fail_after(20),
        ):
            async with LayercodeTestClient(base_url=url, secret=SECRET) as client:
                turn = await client.message("hi")
    assert ended_with_error(turn)
    assert [request["path"] for request in proxy.requests] == ["/chat/completions"]
    assert (
        "HTTP 403" in caplog.text
        and "no route for bob:*** (Authorization: Basic ***)" in caplog.text
    )
    assert "PASSWORD9" not in caplog.text and basic not in caplog.text
    assert not fake.requests


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_a_stream_cut_short_fails_the_turn(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a stream that ended without its finish (chat completions: no
    ``finish_reason``, no ``[DONE]``; Responses: no ``response.completed``: a proxy or the
    provider cut it) ended the turn as if the answer were whole, with no ``response.error``
    and nothing in the log (every agent but ``openai``)."""
    fake.push(*[Script(text=["One.", " Two.", " Three"], cut=True)] * 3)
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    assert turn.text.startswith("One. Two.")  # spoken as it came
    if name == "openai-agents":  # the SDK's own check
        assert "Model did not produce a final response" in caplog.text
    else:  # the model asked is named (before: not by our own checks)
        failures = [r.getMessage() for r in caplog.records if "agent failed" in r.getMessage()]
        assert len(failures) == 1
        assert "the model's answer ended before its finish" in failures[0]
        assert "(model=gpt-5-nano)" in failures[0]


#: Why the fake model stops early (chat completions' ``finish_reason``) -> the Responses
#: API's ``incomplete_details.reason`` for it.
STOPS = {"length": "max_output_tokens", "content_filter": "content_filter"}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("stop", list(STOPS))
async def test_an_answer_the_model_cut_short_is_spoken_and_logged_once(
    name: str, stop: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: an answer the model stopped early (max tokens hit, its content filter: chat
    completions' ``finish_reason``, the Responses API's ``response.incomplete``) was spoken
    and the turn ended as whole with nothing logged; the Agents SDK failed the turn (its own
    check), the reason in its own words. Now every agent logs one WARNING naming the reason
    and the model; the Agents SDK's failure names them the same way."""
    fake.push(*[Script(text=["One.", " Two.", " Thr"], stop=stop)] * 3)
    with caplog.at_level(logging.WARNING, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert len(fake.requests) == 1
    chat = fake.requests[0]["path"] == "/chat/completions"
    said = f"cut short: {stop if chat else STOPS[stop]} (model=gpt-5-nano)"
    lines = [r for r in caplog.records if "cut short" in r.getMessage()]
    assert len(lines) == 1
    if name == "openai-agents":  # the SDK's own check fails the turn
        assert ended_with_error(turn) and turn.text.startswith("One. Two.")
        assert lines[0].levelno == logging.ERROR and said in lines[0].getMessage()
    else:  # the caller keeps what was said; the operator is told
        assert turn.text == "One. Two. Thr" and turn.errors == []
        assert (lines[0].levelname, lines[0].getMessage()) == ("WARNING", f"answer {said}")


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["whole", "cut-short", "max-tokens"])
async def test_langchain_on_the_responses_api_fails_only_a_stream_cut_short(
    ending: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """``ChatOpenAI(use_responses_api=True)`` reports how its answer ended in ``status``,
    not ``finish_reason``: a whole answer is spoken, one cut short fails the turn, one the
    model ended early (``incomplete``: max tokens hit) is spoken and logged as a warning."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from layercode_asgi.adapters import from_langchain

    cut, stop = ending == "cut-short", "length" if ending == "max-tokens" else None
    fake.push(Script(text=["One.", " Two.", " Three"], cut=cut, stop=stop))
    model = langchain_openai.ChatOpenAI(model="gpt-5-nano", use_responses_api=True)
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    logs = caplog.at_level(logging.WARNING, logger="layercode_asgi.adapters")
    with logs, serve(create_app(settings, from_langchain(model))) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hi")
    assert [request["path"] for request in fake.requests] == ["/responses"]
    assert ended_with_error(turn) is cut
    assert turn.text == ("One. Two. " if cut else "One. Two. Three")
    warned = ["answer cut short: max_output_tokens (model=gpt-5-nano)"] if stop else []
    assert [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()] == warned


#: What chat models of other providers put in ``response_metadata`` (LangChain's own
#: ``model_provider`` names), whole or cut short before the event that reports the end.
REPORTED_ENDS = {
    "anthropic-whole": ({"model_provider": "anthropic", "stop_reason": "end_turn"}, False),
    "anthropic-cut": ({"model_provider": "anthropic"}, True),
    "anthropic-cut-none": ({"model_provider": "anthropic", "stop_reason": None}, True),
    "google-whole": ({"model_provider": "google_genai", "finish_reason": "STOP"}, False),
    "anthropic-max-tokens-early": (
        {"model_provider": "anthropic", "stop_reason": "max_tokens"},
        False,
    ),
    "google-safety-early": ({"model_provider": "google_genai", "finish_reason": "SAFETY"}, False),
    "google-cut": ({"model_provider": "google_genai", "model_name": "gemini"}, True),
    "vertex-cut": ({"model_provider": "google_vertexai"}, True),
    "reports-nothing": ({}, False),
    "unknown-provider": ({"model_provider": "homegrown"}, False),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(REPORTED_ENDS))
async def test_langchain_fails_a_cut_short_answer_of_any_provider_that_reports_its_end(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: only ``ChatOpenAI``'s answer ended before its finish failed the turn: one of
    ``ChatAnthropic`` (no ``stop_reason``) or ``ChatGoogleGenerativeAI`` (no
    ``finish_reason``), cut short by a proxy, was spoken as if whole. A model that reports
    no end at all still answers. One the model ended early (``-early``) is spoken, with a
    warning."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage

    from .test_adapters import langchain_turn

    metadata, cut = REPORTED_ENDS[case]
    answer = AIMessage(content="One. Two.", response_metadata=metadata)
    with caplog.at_level(logging.WARNING, logger="layercode_asgi.adapters"):
        turn = await langchain_turn(FakeMessagesListChatModel(responses=[answer]))
    assert ended_with_error(turn) is cut
    assert turn.text == ("One. " if cut else "One. Two.")  # what came before the failure
    warned = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert len(warned) == case.endswith("-early")


@pytest.mark.anyio
async def test_langchain_streams_a_model_that_reports_no_end() -> None:
    """A streaming chat model that reports nothing of how its answer ended (LangChain's own
    ``GenericFakeChatModel``) is not taken for one cut short."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    from .test_adapters import langchain_turn

    turn = await langchain_turn(GenericFakeChatModel(messages=iter(["One. Two. Three."])))
    assert not ended_with_error(turn) and turn.errors == []
    assert turn.text == "One. Two. Three."


class APIError(Exception):
    """An application's own error class that happens to share an SDK's name (a payments
    client's, say): raised by a tool, it is no provider failure."""


def provider_failures() -> list[BaseException]:
    """A real exception of each installed SDK for a provider failure without a status."""
    failures: list[BaseException] = []
    with suppress(ImportError):
        import openai

        failures.append(openai.APIConnectionError(request=httpx.Request("POST", "http://x")))
    with suppress(ImportError):
        from pydantic_ai.exceptions import UnexpectedModelBehavior

        failures.append(UnexpectedModelBehavior("the model answered nonsense"))
    with suppress(ImportError):
        from agents.exceptions import ModelBehaviorError

        failures.append(ModelBehaviorError("the model answered nonsense"))
    with suppress(ImportError):
        from langchain_core.exceptions import ModelConnectionError

        failures.append(ModelConnectionError("the provider is unreachable"))
    return failures


def test_provider_failures_are_told_by_the_sdks_classes_not_by_name() -> None:
    """Before: any exception class named ``APIError`` (or ``ModelAPIError``…) was taken for
    a provider's failure, an application's own too: a tool's error was logged as "the model
    API failed", its traceback dropped; and LangChain's own model errors
    (``langchain_core.exceptions.ModelError``: a connection failure, say) were not, logged
    with the provider's message as it was. The SDKs' public classes decide now."""
    from layercode_asgi.adapters.voice import model_api_error

    failures = provider_failures()
    assert failures
    for failure in failures:
        assert model_api_error(failure) is not None, failure
    named = str(model_api_error(failures[0], "gpt-x\nFORGED"))
    assert named.startswith("the model API failed (model=gpt-x\\nFORGED): ")  # escaped
    assert model_api_error(APIError("the payments service is down")) is None


@pytest.mark.anyio
async def test_a_tool_failing_with_an_error_named_like_an_sdks_keeps_its_traceback(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from layercode_asgi.adapters import from_pydantic_ai

    def charge_card(amount: int) -> str:
        """Charge the caller's card."""
        raise APIError("the payments service is down")

    agent = pydantic_ai.Agent("openai-chat:gpt-5-nano", tools=[charge_card])
    fake.push(Script(text=[], tool_call=("charge_card", '{"amount": 5}')))
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, from_pydantic_ai(agent))
    logs = caplog.at_level(logging.ERROR, logger="layercode_asgi")
    with logs, serve(app) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("Pay, please.")
    assert ended_with_error(turn)
    assert "the model API failed" not in caplog.text
    assert "charge_card" in caplog.text and "the payments service is down" in caplog.text


def sse(data: Any, kind: str | None = None) -> bytes:
    head = f"event: {kind}\n".encode() if kind else b""
    return head + b"data: " + msgspec.json.encode(data) + b"\n\n"


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_an_error_event_in_the_stream_is_logged_with_the_key_masked_on_one_line(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a provider's error sent in the stream (HTTP 200, then an ``error`` event,
    its message echoing the key) was logged as the SDK raised it: the key in clear, and the
    message's line breaks starting lines of their own in the traceback."""
    message = f"Incorrect API key provided: {KEY}.\nFORGED log line"
    if name in ("pydantic-ai-responses", "starter", "openai-agents"):  # the Responses API
        error = {"type": "error", "code": "bad_key", "message": message, "param": None}
        raw = [sse({**error, "sequence_number": 0}, "error")]
    else:
        start = chat_chunk({"role": "assistant", "content": "Hi. "})
        raw = [start, sse({"error": {"message": message, "type": "invalid_request_error"}})]
    fake.push(*[Script(raw=raw)] * 3)
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    assert len(fake.requests) == 1
    assert "Incorrect API key provided: ***." in caplog.text
    assert KEY not in caplog.text
    assert not any(line.startswith("FORGED") for line in caplog.text.splitlines())


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["starter", "openai"])
async def test_an_error_event_echoing_a_key_from_the_settings_is_masked(
    name: str, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The built-in agents' key may come from ``.env`` (a setting), not the environment;
    pydantic-ai's error for an ``error`` event on the Responses API holds no request whose
    header would name it."""
    pytest.importorskip("pydantic_ai" if name == "starter" else "openai")
    key = f"sk-{name}-settings-only-4d1f"
    monkeypatch.delenv("OPENAI_API_KEY")
    error = {"type": "error", "code": "bad_key", "message": f"bad key {key}", "param": None}
    chat = [sse({"error": {"message": f"bad key {key}", "type": "invalid_request_error"}})]
    fake.push(Script(raw=chat if name == "openai" else [sse({**error, "sequence_number": 0})]))
    fields = {"openai_api_key": key, "layercode_webhook_secret": SECRET}
    app = create_app(Settings(env_file=None, environ={}, **fields), name)
    with (
        caplog.at_level(logging.ERROR, logger="layercode_asgi"),
        serve(app) as base,
        anyio.fail_after(20),
    ):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hi")
    assert ended_with_error(turn)
    assert "bad key ***" in caplog.text and key not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize(
    "garbage",
    [b"data: {not json\n\n", b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n'],
    ids=["malformed-json", "not-utf-8"],
)
async def test_a_malformed_event_fails_the_turn(
    name: str, garbage: bytes, fake: FakeOpenAI
) -> None:
    fake.push(Script(text=["Fine. ", "And the rest."], garbage=garbage))
    turn = await turn_of(name)
    assert ended_with_error(turn)
    assert "And the rest." not in turn.text
    assert len(fake.requests) == 1


@pytest.mark.slow  # paced by the SDKs' back-off and the turn timeout
@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_a_model_stalling_past_the_turn_timeout_gets_the_fallback_and_the_history_holds_what_was_said(
    name: str, fake: FakeOpenAI
) -> None:
    """The model stops before its last delta (held) past the turn's timeout: the fallback is
    spoken, the turn ends, and the history records what the caller heard, not the rest."""
    fake.push(Script(hold=True))
    conversations = ConversationManager()
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        turn_timeout=1.0,
        turn_timeout_message="Sorry, one moment.",
    )
    app = create_app(settings, BUILDERS[name](False), conversations=conversations)
    try:
        with serve(app) as base, anyio.fail_after(20):
            async with LayercodeTestClient(
                base_url=base, secret=SECRET, conversation_id="conv_stall"
            ) as client:
                turn = await client.message("hi")
            # the timeout cancelled the model request (closed, not left to run on)
            closed = fake.closed_early.wait(10)
    finally:
        fake.release()
    assert closed, "the model request outlived the timed-out turn"
    assert [event["type"] for event in turn.events][-2:] == ["response.tts", "response.end"]
    assert turn.tts[-1] == "Sorry, one moment."
    assert "you today?" not in turn.text
    history = await conversations.get_history("conv_stall")
    assert [(m.role, m.text) for m in history] == [("user", "hi"), ("assistant", turn.text)]


@pytest.mark.slow  # paced by the SDKs' back-off and the turn timeout
@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_a_late_first_token_within_the_timeout_is_answered(
    name: str, fake: FakeOpenAI
) -> None:
    fake.push(Script(delay=0.5))
    turn = await turn_of(name, turn_timeout=10.0)
    assert turn.text == "Hello there. How can I help you today?"
    assert turn.errors == []


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One chat completions stream event, as the API sends it."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + msgspec.json.encode({**data, "choices": [choice]}) + b"\n\n"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["openai", "pydantic-ai-chat", "starter-chat"])
async def test_a_refusal_is_spoken(name: str, fake: FakeOpenAI) -> None:
    """Before: a refusal (the answer in the delta's ``refusal`` field, ``content`` empty)
    ended the turn in silence (the ``openai`` agent), or failed it with ``agent error``
    (pydantic-ai: its ``ContentFilterError``, or "ended before its finish")."""
    refusal = "I can't help with that."
    fake.push(
        Script(
            raw=[
                chat_chunk({"role": "assistant", "content": None, "refusal": ""}),
                chat_chunk({"refusal": refusal}),
                chat_chunk({}, "stop"),
                b"data: [DONE]\n\n",
            ]
        )
    )
    turn = await turn_of(name)
    assert turn.text == refusal
    assert turn.errors == []
    assert len(fake.requests) == 1


def responses_refusal(refusal: str) -> list[bytes]:
    """A Responses API stream whose answer is ``refusal`` (a ``refusal`` content part)."""
    numbers = iter(range(100))
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress"}
    done_part = {"type": "refusal", "refusal": refusal}
    done_item = {**item, "status": "completed", "content": [done_part]}
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    usage |= {"input_tokens_details": {"cached_tokens": 0}}
    usage |= {"output_tokens_details": {"reasoning_tokens": 0}}

    def response(status: str, output: list[Any]) -> dict[str, Any]:
        fields = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m"}
        fields |= {"parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        return {**fields, "status": status, "output": output, "usage": usage}

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(numbers), **fields}, kind)

    return [
        event("response.created", response=response("in_progress", [])),
        event("response.output_item.added", output_index=0, item={**item, "content": []}),
        event("response.content_part.added", **where, part={"type": "refusal", "refusal": ""}),
        event("response.refusal.delta", **where, delta=refusal),
        event("response.refusal.done", **where, refusal=refusal),
        event("response.content_part.done", **where, part=done_part),
        event("response.output_item.done", output_index=0, item=done_item),
        event("response.completed", response=response("completed", [done_item])),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["pydantic-ai-responses", "starter", "openai-agents"])
async def test_a_refusal_on_the_responses_api_is_spoken(name: str, fake: FakeOpenAI) -> None:
    """Before: the Agents SDK adapter read only text deltas, and the SDK then raised its
    ``ModelRefusalError``: the caller got ``agent error``, not the refusal."""
    refusal = "I can't help with that."
    fake.push(Script(raw=responses_refusal(refusal)))
    turn = await turn_of(name)
    assert turn.text == refusal
    assert turn.errors == []
    assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_langchain_speaks_a_refusal_on_the_responses_api(fake: FakeOpenAI) -> None:
    """Before: ``ChatOpenAI(use_responses_api=True)`` streams a refusal as a ``refusal``
    content block, which the adapter did not read: the turn failed as one without text."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from layercode_asgi.adapters import from_langchain

    refusal = "I can't help with that."
    fake.push(Script(raw=responses_refusal(refusal)))
    model = langchain_openai.ChatOpenAI(model="gpt-5-nano", use_responses_api=True)
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    with serve(create_app(settings, from_langchain(model))) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hi")
    assert turn.text == refusal
    assert turn.errors == []


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize(
    "script",
    [
        Script(text=[]),
        Script(text=[" ", "\n"]),
        Script(text=[], tool_call=("lookup", "{}")),
        Script(text=[], stop="content_filter"),
    ],
    ids=["empty", "blank", "tool-call-only", "filtered-empty"],
)
async def test_an_answer_without_text_fails_the_turn(
    name: str, script: Script, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: an answer without text (empty, blank, or only a call of a tool the agent
    does not have) ended the turn with ``response.end`` alone: the caller heard nothing,
    and nothing was logged (the ``openai`` agent was fixed first; then the LangChain and
    Agents SDK adapters). An empty answer its content filter ended is no answer cut short
    (nothing was spoken): no such warning. Every agent's one line names the model (before:
    not LangChain's or the Agents SDK's "held no text", nor pydantic-ai's own errors, the
    ``ContentFilterError`` followed by its indented JSON body)."""
    fake.push(*[script] * 4)  # pydantic-ai asks again (its output retries), then fails
    with caplog.at_level(logging.WARNING, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    assert [text for text in turn.tts if text != "One moment."] == []  # a filler at most
    assert len(fake.requests) <= 4
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("cut short" in r.getMessage() for r in warned)
    if name == "openai":
        finish = script.stop or ("tool_calls" if script.tool_call else "stop")
        said = f"the model's answer held no text (finish_reason={finish}) (model=gpt-5-nano)"
        assert said in caplog.text
    failures = [r for r in caplog.records if r.getMessage().startswith("agent failed")]
    assert len(failures) == 1
    error = str(failures[0].exc_info[1])  # the traceback's last line
    assert "(model=gpt-5-nano)" in error and "\\n" not in error and len(error) <= 1100
    if script.stop and ("pydantic" in name or "starter" in name):  # the cause, then the body
        said = "failed (model=gpt-5-nano): ContentFilterError: Content filter triggered."
        assert said in error


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["langchain-chat-model", "langchain-chain", "langgraph-agent"])
async def test_langchain_logs_an_empty_answer_as_the_models_failure(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: an empty 200 answer (not one event in the stream) failed a LangChain turn
    with a bare ``ValueError: No generation chunks were returned`` (``No generations found
    in stream.`` from a graph) in the log, where the other adapters log a
    ``ModelAPIError``."""
    fake.push(Script(raw=[]))
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent")]
    assert len(failures) == 1
    said = ": ModelAPIError: the model's answer held no text (LangChain: No generation"
    assert "(model=gpt-5-nano)" in failures[0]
    assert said in failures[0]
    assert "ValueError" not in caplog.text


@pytest.mark.parametrize("name", ["openai", "starter"])
def test_a_default_model_without_a_model_name_refuses_to_start(name: str) -> None:
    """Before: ``DEFAULT_MODEL=openai:`` started (``/ready`` showed ``openai:openai:`` for the
    ``openai`` agent) and every turn asked the API for the model ``"openai:"``."""
    pytest.importorskip("pydantic_ai" if name == "starter" else "openai")
    settings = Settings(env_file=None, environ={}, openai_api_key=KEY, default_model="openai:")
    with pytest.raises(ConfigurationError, match=r"^DEFAULT_MODEL 'openai:' names no model"):
        get_agent(name, settings)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["openai", "starter"])
async def test_blanks_around_the_default_models_name_are_not_sent(
    name: str, fake: FakeOpenAI
) -> None:
    """Before: ``DEFAULT_MODEL=openai: gpt-x`` asked the API for the model ``" gpt-x"``."""
    pytest.importorskip("pydantic_ai" if name == "starter" else "openai")
    fields = {
        "openai_api_key": KEY,
        "default_model": "openai: gpt-x",
        "layercode_webhook_secret": SECRET,
    }
    app = create_app(Settings(env_file=None, environ={}, **fields), name)
    with serve(app) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hi")
        async with httpx.AsyncClient() as http:
            ready = (await http.get(base + "/ready")).json()
    assert turn.text == "Hello there. How can I help you today?"
    assert [request["body"]["model"] for request in fake.requests] == ["gpt-x"]
    assert ready["model"] == "openai:gpt-x"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["openai", "starter"])
async def test_openai_base_url_in_the_env_file_is_used(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Before: ``OPENAI_API_KEY`` was read from ``.env`` but ``OPENAI_BASE_URL`` was not
    (the SDK reads the process environment only): the key went to OpenAI's API instead of
    the one configured."""
    pytest.importorskip("pydantic_ai" if name == "starter" else "openai")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with fake_openai() as (fake, base_url):
        env_file = tmp_path / ".env"
        env_file.write_text(f"OPENAI_API_KEY={KEY}\nOPENAI_BASE_URL={base_url}/\n")
        settings = Settings(
            env_file=env_file, environ={}, layercode_webhook_secret=SECRET, turn_timeout=5.0
        )
        with serve(create_app(settings, name)) as base, anyio.fail_after(20):
            async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
                turn = await client.message("hi")
    assert turn.text == "Hello there. How can I help you today?"
    assert len(fake.requests) == 1
    assert settings.openai_base_url == base_url  # without the trailing slash
    masked = Settings(
        env_file=None, environ={}, openai_base_url="https://bob:PASSWORD9@llm.example/v1/"
    )
    assert "PASSWORD9" not in repr(masked) and "bob:***@llm.example" in repr(masked)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["openai", "pydantic-ai-chat"])
async def test_a_huge_or_multiline_provider_error_is_logged_on_one_bounded_line(
    name: str, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the provider's error answer went into the traceback's last line as it was:
    a megabyte of it, and its line breaks starting lines of their own in the log."""
    body = {"error": {"message": "overloaded\nFORGED log line " + "x" * 1_000_000}}
    fake.push(*[Script(status=400, body=body)] * 3)
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of(name)
    assert ended_with_error(turn)
    assert "HTTP 400" in caplog.text
    assert len(caplog.text) < 50_000
    assert not any(line.startswith("FORGED") for line in caplog.text.splitlines())


@pytest.mark.anyio
async def test_a_stream_chunk_not_of_the_apis_shape_is_logged_as_the_models_failure(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a chunk without ``choices`` (a proxy's or an "OpenAI-compatible" API's own
    object in the stream) failed the ``openai`` agent's turn with ``TypeError: 'NoneType'
    object is not iterable`` and its traceback in the log, saying nothing of the model."""
    pytest.importorskip("openai")
    notice = sse({"object": "proxy.notice", "detail": "upstream busy"})
    fake.push(Script(raw=[notice, b"data: [DONE]\n\n"]))
    with caplog.at_level(logging.ERROR, logger="layercode_asgi"):
        turn = await turn_of("openai")
    assert ended_with_error(turn)
    said = "ModelAPIError: the model's answer ended before its finish_reason (model=gpt-5-nano)"
    assert said in caplog.text
    assert "TypeError" not in caplog.text


@pytest.mark.anyio
async def test_an_emoji_split_across_deltas_is_spoken_whole(fake: FakeOpenAI) -> None:
    """Before: the ``openai`` agent (and any adapter with ``chunking="delta"``) spoke each
    half of an emoji whose UTF-16 surrogates came in two deltas (``"\\ud83d"`` escapes,
    as a JavaScript proxy splitting text writes them) as a ``response.tts`` of its own:
    the caller got two U+FFFD where the phrase chunking kept the emoji."""
    pytest.importorskip("openai")
    high, low = b'"Hi \\ud83d"', b'"\\ude00 there."'
    start = chat_chunk({"role": "assistant", "content": ""})
    deltas = [chat_chunk({"content": "X"}).replace(b'"X"', half) for half in (high, low)]
    fake.push(Script(raw=[start, *deltas, chat_chunk({}, "stop"), b"data: [DONE]\n\n"]))
    turn = await turn_of("openai")
    assert turn.errors == []
    assert turn.text == "Hi \U0001f600 there."


#: The provider's failure each agent sees for a refused key: what a span's ``error.type`` names.
REFUSED_KEY_ERROR = {
    "openai": "openai.AuthenticationError",
    "pydantic-ai-chat": "pydantic_ai.exceptions.ModelAuthenticationError",
    "langchain-chat-model": "langchain_openai.chat_models.base.OpenAIAuthenticationError",
    "openai-agents": "openai.AuthenticationError",
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(REFUSED_KEY_ERROR))
async def test_a_providers_failure_is_named_by_its_type_in_the_span(
    name: str, fake: FakeOpenAI
) -> None:
    """Before: every provider failure of an adapter or a built-in agent set the span's
    ``error.type`` to ``layercode_asgi.adapters.voice.ModelAPIError`` (our wrapper, whose
    module is not even public), never the SDK's type docs/metrics.md names
    (``openai.APITimeoutError``): a 401, a 429 and a timeout were one error to a trace."""
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from layercode_asgi import LayercodeWebhook, TurnMetrics
    from layercode_asgi.otel import OtelMetrics

    spans = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = TurnMetrics(OtelMetrics(tracer_provider=provider))
    fake.push(Script(status=401, body=REFUSAL))
    webhook = LayercodeWebhook(BUILDERS[name](False), metrics=metrics)
    with serve(webhook) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET, path="/") as client:
            turn = await client.message("hi")
    assert ended_with_error(turn)
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["error.type"] == REFUSED_KEY_ERROR[name]
    assert KEY not in repr(span.attributes)


@pytest.mark.anyio
async def test_a_turn_timing_out_while_its_own_code_backs_off_an_http_error_blames_no_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``speak``'s pieces wait (in their ``except``) after another service's 404 when the
    turn times out: the cancellation's context is that 404, which no model API answered,
    and no SDK was waiting to retry. Review: logged as ``the model API answered HTTP 404``."""
    from layercode_asgi.adapters.voice import speak

    async def pieces() -> Any:
        request = httpx.Request("GET", "https://crm.invalid/callers/1")
        try:
            httpx.Response(404, request=request).raise_for_status()
        except httpx.HTTPStatusError:
            await anyio.sleep(20)  # its own back-off: the turn times out meanwhile
        yield "Hello."

    async def agent(event: Any, context: Any) -> Any:
        async for reply in speak(pieces(), context):
            yield reply

    fields: dict[str, Any] = {"layercode_webhook_secret": SECRET, "turn_timeout": 0.2}
    app = create_app(Settings(env_file=None, environ={}, **fields), agent)
    with caplog.at_level(logging.WARNING, logger="layercode_asgi"), anyio.fail_after(20):
        async with LayercodeTestClient(app, secret=SECRET) as client:
            turn = await client.message("hi")
    assert turn.errors[0]["error"] == "turn timed out"
    assert "the model API answered" not in caplog.text


def test_log_stopped_retry_keeps_the_cancellation_when_a_response_has_no_header_mapping() -> None:
    """An error whose ``response`` has a ``status_code`` but ``headers`` of None (another
    HTTP library's, a hand-made one). Review: ``log_stopped_retry`` raised AttributeError
    from the turn's ``except BaseException``, in place of the cancellation it re-raises."""
    from layercode_asgi.adapters.voice import log_stopped_retry

    class Answer:
        status_code = 429
        headers = None

    class Refused(Exception):
        response = Answer()

    try:
        try:
            raise Refused
        except Refused:
            raise asyncio.CancelledError  # noqa: B904 (its context, as the SDK sleeping has)
    except asyncio.CancelledError as stopped:
        log_stopped_retry(stopped, "gpt-5-nano")
