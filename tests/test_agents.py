"""The agent registry, the echo agent, and the OpenAI agent against a local fake API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from layercode_asgi import (
    AgentNotFoundError,
    ConfigurationError,
    HistoryMessage,
    LayercodeSignature,
    LayercodeWebhook,
    Settings,
    TurnContext,
    echo_agent,
    get_agent,
    list_agents,
    openai_agent,
    parse_webhook_payload,
    register_agent,
)
from layercode_asgi.agents import AgentImportError

from .conftest import SECRET, event_body, serve, signed_headers
from .test_turns import read_events


def test_list_and_get_builtin_agents() -> None:
    assert {"echo", "openai", "starter"} <= set(list_agents())
    assert get_agent("echo") is echo_agent


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(AgentNotFoundError, match="echo, openai, starter") as info:
        get_agent("nope")
    assert isinstance(info.value, LookupError)
    assert info.value.name == "nope"


def test_import_path_agents() -> None:
    agent = get_agent("tests.agents_for_tests:history_agent")
    assert agent.__name__ == "history_agent"
    with pytest.raises(AgentImportError, match="has no attribute 'missing'"):
        get_agent("tests.agents_for_tests:missing")
    # a dotted attribute names the object that lacks the part, not the module
    with pytest.raises(
        AgentImportError, match=r"agents_for_tests:history_agent has no attribute .missing."
    ):
        get_agent("tests.agents_for_tests:history_agent.missing.deeper")
    with pytest.raises(AgentImportError, match="No module named 'no_such_module_xyz'"):
        get_agent("no_such_module_xyz:agent")
    with pytest.raises(ConfigurationError, match="not callable"):
        get_agent("tests.test_agents:SECRET")


REGISTER = """
from layercode_asgi import get_agent, list_agents, register_agent
from layercode_asgi.agents import agent_factory

async def mine(event):
    yield "mine"

factory = lambda settings: mine
register_agent("mine", factory)
assert get_agent("mine") is mine and agent_factory("mine") is factory
assert list_agents() == ["echo", "mine", "openai", "starter"]
print("ok")
"""


def test_register_agent() -> None:
    """In a process of its own: the registry has no public way to forget a name."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", REGISTER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_register_agent_refuses_what_would_break_the_registry() -> None:
    """Before: any name and factory were stored. A name that is not a str (None, 5) made
    every later list_agents() and every unknown name's AgentNotFoundError raise
    "TypeError: '<' not supported between instances of 'int' and 'str'" (list-agents and
    a misspelled --agent crashed far from the cause); a factory that is not callable
    failed only in get_agent, with "'str' object is not callable"."""
    before = list_agents()
    for name in (None, 5, b"mine", ("mine",)):
        with pytest.raises(TypeError, match="agent name must be a str"):
            register_agent(name, lambda settings: echo_agent)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory for 'mine' is not callable"):
        register_agent("mine", "tests.agents_for_tests:history_agent")  # type: ignore[arg-type]
    assert before == list_agents()
    with pytest.raises(AgentNotFoundError):
        get_agent("nope")


@pytest.mark.anyio
async def test_echo_agent_turns() -> None:
    app = LayercodeSignature(LayercodeWebhook(echo_agent), secret=SECRET)
    start = await read_events(app, event_body("session.start"))
    assert start[0]["content"].startswith("Hello! I'm the echo agent")
    said = await read_events(app, event_body(text="ping"))
    assert said[0]["content"] == "You said: ping"
    silent = await read_events(app, event_body(text=None))
    assert silent[0]["content"] == "I didn't catch that."


def test_openai_agent_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        get_agent("openai", Settings(env_file=None, environ={}))
    with pytest.raises(ConfigurationError, match="openai:<model>"):
        get_agent(
            "openai",
            Settings(env_file=None, environ={}, openai_api_key="k", default_model="google:gemini"),
        )
    agent = get_agent(
        "openai", Settings(env_file=None, environ={}, openai_api_key="k", default_model="gpt-x")
    )
    assert callable(agent)


class FakeOpenAI:
    """The chat-completions streaming endpoint of an OpenAI-compatible API, on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = msgspec.json.decode(await request.body())
        self.requests.append({"body": body, "auth": request.headers.get("authorization")})

        async def chunks() -> AsyncIterator[bytes]:
            for piece, finish in (("Hel", None), ("lo ", None), ("there.", None), ("", "stop")):
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}],
                }
                yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture
def fake_openai() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    with serve(fake.app) as url:
        yield fake, url + "/v1"


def test_openai_agent_streams_deltas_with_history(fake_openai: tuple[FakeOpenAI, str]) -> None:
    fake, base_url = fake_openai
    agent = openai_agent(api_key="sk-test", model="gpt-test", base_url=base_url)

    class History:
        async def get_history(self, conversation_id: str) -> list[HistoryMessage]:
            return [
                HistoryMessage(role="user", text="earlier question"),
                HistoryMessage(role="assistant", text="earlier answer"),
            ]

        def lock(self, conversation_id: str, *, timeout: float | None = None) -> Any:
            import anyio

            return anyio.Lock()

        async def add_turn(self, *args: Any, **kwargs: Any) -> None:
            return None

        async def clear(self, conversation_id: str) -> None:
            return None

    app = LayercodeSignature(LayercodeWebhook(agent, conversations=History()), secret=SECRET)
    with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        body = event_body(text="new question")
        response = client.post("/api/agent", content=body, headers=signed_headers(body))
    events = [
        msgspec.json.decode(line[6:])
        for line in response.text.split("\n")
        if line.startswith("data: ")
    ]
    assert [e.get("content") for e in events] == ["Hel", "lo ", "there.", None]
    assert events[-1] == {"type": "response.end", "turn_id": "turn-1"}
    sent = fake.requests[0]
    assert sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "gpt-test"
    assert sent["body"]["stream"] is True
    assert [(m["role"], m["content"]) for m in sent["body"]["messages"][1:]] == [
        ("user", "earlier question"),
        ("assistant", "earlier answer"),
        ("user", "new question"),
    ]


def test_bind_agent_reads_a_function_signature_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from layercode_asgi import agents

    reads: list[object] = []
    real = inspect.signature

    def counting(obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
        reads.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(agents.inspect, "signature", counting)

    async def by_keyword(event: Any, *, ctx: Any) -> AsyncIterator[str]:
        yield ctx.event.text

    async def positional(event: Any, context: Any) -> AsyncIterator[str]:
        yield context.event.text

    async def event_only(event: Any) -> AsyncIterator[str]:
        yield event.text

    event = parse_webhook_payload(event_body("message", text="hi"))
    context = TurnContext(event, (), {})  # type: ignore[arg-type]
    for agent in (by_keyword, positional, event_only):
        for _ in range(3):
            bound = agents.bind_agent(agent)
            assert bound.agent is agent
            assert hasattr(bound(event, context), "__aiter__")  # type: ignore[arg-type]
    assert reads == [by_keyword, positional, event_only]

    class Callable:
        async def __call__(self, event: Any) -> str:
            return "x"

    instance = Callable()
    agents.bind_agent(instance)
    agents.bind_agent(instance)
    assert reads[3:] == [instance, instance]  # only plain functions are remembered


def test_bind_agent_keeps_no_agent_alive() -> None:
    import gc
    import weakref

    from layercode_asgi.agents import bind_agent

    def make() -> Any:
        async def agent(event: Any, context: Any) -> str:
            return "x"

        return agent

    agent = make()
    bind_agent(agent)
    ref = weakref.ref(agent)
    del agent
    gc.collect()
    assert ref() is None


def test_keyword_only_extras_with_defaults_do_not_change_the_calling_convention() -> None:
    # (event, context, *, ctx=None) was refused ("missing a required argument: 'context'"):
    # the optional keyword-only ``ctx`` was taken for the context parameter.
    from layercode_asgi.agents import InvalidAgentError, bind_agent

    async def two_and_ctx(event: Any, context: Any, *, ctx: Any = None) -> str:
        return f"{context.text}:{ctx}"

    async def ctx_and_context(event: Any, ctx: Any, *, context: Any = None) -> str:
        return f"{ctx.text}:{context}"

    async def two_and_flag(event: Any, context: Any, *, verbose: bool = False) -> str:
        return f"{context.text}:{verbose}"

    async def by_name(event: Any, *, ctx: Any = None) -> str:  # still the keyword form
        return f"{ctx.text}:kw"

    event = parse_webhook_payload(event_body("message", text="hi"))
    context = TurnContext(event, (), {})  # type: ignore[arg-type]
    import anyio

    for agent, said in (
        (two_and_ctx, "hi:None"),
        (ctx_and_context, "hi:None"),
        (two_and_flag, "hi:False"),
        (by_name, "hi:kw"),
    ):
        assert anyio.run(bind_agent(agent), event, context) == said

    async def required_flag(event: Any, context: Any, *, flag: bool) -> str:
        return "x"

    async def required_ctx_too(event: Any, context: Any, *, ctx: Any) -> str:
        return "x"

    for agent, missing in ((required_flag, "'flag'"), (required_ctx_too, "")):
        with pytest.raises(InvalidAgentError, match="cannot be an agent") as info:
            bind_agent(agent)
        assert isinstance(info.value, TypeError)
        # Python 3.12 says "missing a required keyword-only argument: 'flag'", 3.11 less.
        assert "missing a required" in str(info.value)
        assert f"argument: {missing}" in str(info.value)


def test_the_registry_is_private_and_read_through_functions() -> None:
    # Before: AGENTS was a mutable public module name, and cli.py read it directly.
    from layercode_asgi import agents
    from layercode_asgi.agents import agent_factory

    assert not hasattr(agents, "AGENTS")
    assert agent_factory("echo")(None) is echo_agent
    assert "needs no key" in (agent_factory("echo")(None).__doc__ or "")
    with pytest.raises(AgentNotFoundError, match="no agent named 'nope'; available: echo"):
        agent_factory("nope")
