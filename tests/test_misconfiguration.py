"""A misconfiguration is refused when the app is built, naming the argument and what it got,
never taken and then failing on every request (a 500, a ``response.error``, a crash)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from layercode_asgi import (
    ConversationManager,
    LayercodeSignature,
    LayercodeWebhook,
    MemoryConversationStore,
    MemoryMetrics,
    Settings,
    TurnContext,
    TurnEvent,
    TurnMetrics,
    create_app,
)
from layercode_asgi.agents import AgentNotFoundError
from layercode_asgi.testing import LayercodeTestClient

from .conftest import SECRET


async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[str]:
    yield "hi"


def settings() -> Settings:
    return Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)


async def an_async_generator(event: Any) -> AsyncIterator[str]:
    yield "x"


def a_generator(event: Any) -> Any:
    yield "x"


async def a_coroutine(reason: str) -> None:
    return None


@pytest.mark.parametrize("hook", ["on_data", "on_session_update", "on_session_end"])
@pytest.mark.parametrize("value", [5, "handler", an_async_generator, a_generator])
def test_a_hook_that_cannot_answer_is_refused(hook: str, value: Any) -> None:
    # Each was taken, then every such event was answered 500 "<kind> handler failed".
    with pytest.raises(TypeError, match=hook):
        LayercodeWebhook(agent, **{hook: value})
    with pytest.raises(TypeError, match=hook):
        create_app(settings(), agent, **{hook: value})


@pytest.mark.parametrize("value", [5, "guard", an_async_generator])
def test_an_authorize_guard_that_cannot_answer_is_refused(value: Any) -> None:
    with pytest.raises(TypeError, match="authorize_guard"):
        create_app(settings(), agent, authorize_guard=value)


@pytest.mark.parametrize("value", [5, "count", a_coroutine])
def test_an_on_rejected_that_cannot_be_called_is_refused(value: Any) -> None:
    # 5 raised TypeError on every refused request (a 500); a coroutine was never awaited.
    with pytest.raises(TypeError, match="on_rejected"):
        LayercodeSignature(LayercodeWebhook(agent), secret=SECRET, on_rejected=value)


@pytest.mark.parametrize("app", [None, 5, "app"])
def test_the_middleware_needs_an_asgi_app(app: Any) -> None:
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        LayercodeSignature(app, secret=SECRET)


def test_a_secret_that_is_neither_a_str_nor_a_list_is_refused_by_name() -> None:
    # It was Python's "'int' object is not iterable".
    with pytest.raises(ValueError, match="LayercodeSignature needs the webhook secret"):
        LayercodeSignature(LayercodeWebhook(agent), secret=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [5, "metrics", MemoryMetrics(), TurnMetrics])
def test_metrics_must_be_turn_metrics(value: Any) -> None:
    # Every request then crashed in the app ('int' object has no attribute 'arrived').
    with pytest.raises(TypeError, match="metrics must be a TurnMetrics or None"):
        LayercodeWebhook(agent, metrics=value)


@pytest.mark.parametrize("sink", [5, None, "prometheus", MemoryMetrics])
def test_a_metrics_sink_must_be_one(sink: Any) -> None:
    # Taken, then every request logged a traceback per sink and measured nothing.
    with pytest.raises(TypeError, match=r"TurnMetrics sinks\[0\]"):
        TurnMetrics(sink)


@pytest.mark.parametrize("value", [5, ["a"], "extras"])
def test_extras_must_be_a_mapping(value: Any) -> None:
    with pytest.raises(TypeError, match="extras must be a mapping or None"):
        LayercodeWebhook(agent, extras=value)
    with pytest.raises(TypeError, match="extras must be a mapping or None"):
        create_app(settings(), agent, extras=value)


@pytest.mark.parametrize("value", ["settings", {}, 5])
def test_create_app_settings_must_be_settings(value: Any) -> None:
    # It was an AttributeError ('str' object has no attribute 'webhook_secrets').
    with pytest.raises(TypeError, match="settings must be a Settings or None"):
        create_app(value, agent)


def test_create_app_with_an_empty_agent_name_is_refused() -> None:
    # It served the settings' agent (echo) in silence.
    with pytest.raises(AgentNotFoundError, match="no agent named ''"):
        create_app(settings(), "")


def test_a_store_class_instead_of_a_store_is_refused() -> None:
    # The class passed the protocol check; every turn then failed (a 500).
    with pytest.raises(TypeError, match="MemoryConversationStore\\(\\)"):
        ConversationManager(MemoryConversationStore)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ConversationManager\\(\\)"):
        LayercodeWebhook(agent, conversations=ConversationManager)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_plain_function_hook_and_guard_still_work() -> None:
    app = create_app(
        settings(),
        agent,
        on_data=lambda event: {"got": event.data},
        on_session_end=print,
        authorize_guard=lambda request: True,
        extras={"a": 1},
    )
    async with LayercodeTestClient(app, secret=SECRET) as client:
        assert (await client.data({"x": 1})).body == {"got": {"x": 1}}
        assert (await client.message("hello")).text == "hi"
