"""A misconfiguration is refused when the app is built, naming the argument and what it got,
never taken and then failing on every request (a 500, a ``response.error``, a crash)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import httpx
import pytest

from layercode_asgi import (
    ConfigurationError,
    ConversationManager,
    LayercodeSignature,
    LayercodeWebhook,
    MemoryConversationStore,
    MemoryMetrics,
    MemoryReplayCache,
    RedisConversationStore,
    RedisReplayCache,
    Settings,
    TurnContext,
    TurnEvent,
    TurnMetrics,
    create_app,
    get_agent,
    list_agents,
    openai_agent,
    register_agent,
    setup_logging,
    sign,
    verify_signature,
)
from layercode_asgi.adapters import from_langchain, from_openai_agents, from_pydantic_ai
from layercode_asgi.agents import AgentNotFoundError, starter_agent
from layercode_asgi.testing import LayercodeTestClient

from .conftest import SECRET, event_body, serve, signed_headers
from .test_agents import FakeOpenAI


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


# -- the built-in agents and the adapters -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"api_key": 5}, TypeError, "api_key must be a str"),
        ({"api_key": b"sk"}, TypeError, "api_key must be a str"),
        ({"api_key": "  "}, ConfigurationError, "needs OPENAI_API_KEY"),
        ({"api_key": "sk-x\n"}, ConfigurationError, "api_key must be printable ASCII"),
        ({"model": 5}, TypeError, "model must be a str"),
        ({"model": " "}, ConfigurationError, "model must not be blank"),
        ({"system_prompt": 5}, TypeError, "system_prompt must be a str or None"),
        ({"system_prompt": "\ud800"}, ConfigurationError, "system_prompt is not valid text"),
        ({"base_url": 5}, TypeError, "base_url must be a str or None"),
    ],
)
def test_openai_agent_refuses_bad_options(options: dict[str, Any], error: type, match: str) -> None:
    # Each was taken (every turn then `agent error`), or refused by the SDK in its own words.
    pytest.importorskip("openai")
    with pytest.raises(error, match=match):
        openai_agent(**{"api_key": "sk-test", **options})


@pytest.mark.parametrize("prompt", ["", "  \n", None])
def test_openai_agent_with_a_blank_prompt_sends_no_system_message(prompt: str | None) -> None:
    pytest.importorskip("openai")
    fake = FakeOpenAI()
    with serve(fake.app) as api:
        agent = openai_agent(api_key="sk-test", base_url=api + "/v1", system_prompt=prompt)  # type: ignore[arg-type]
        app = LayercodeSignature(LayercodeWebhook(agent), secret=SECRET)
        with serve(app) as url, httpx.Client(base_url=url, timeout=20) as client:
            body = event_body(text="hello")
            assert client.post("/api/agent", content=body, headers=signed_headers(body)).is_success
    assert [m["role"] for m in fake.requests[0]["body"]["messages"]] == ["user"]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"model": 5}, TypeError, "model must be a str"),
        ({"system_prompt": 5}, TypeError, "system_prompt must be a str or None"),
        ({"welcome": 5}, TypeError, "welcome must be a str or None"),
        ({"openai_api_key": 5}, TypeError, "openai_api_key must be a str or None"),
        ({"google_api_key": ["k"]}, TypeError, "google_api_key must be a str or None"),
        ({"openai_api_key": "sk\x00"}, ConfigurationError, "openai_api_key must be printable"),
        ({"base_url": 5}, TypeError, "base_url must be a str or None"),
    ],
)
def test_starter_agent_refuses_bad_options(
    options: dict[str, Any], error: type, match: str
) -> None:
    pytest.importorskip("pydantic_ai")
    with pytest.raises(error, match=match):
        starter_agent(**{"openai_api_key": "sk-test", **options})


def langchain_model() -> Any:
    fakes = pytest.importorskip("langchain_core.language_models.fake_chat_models")
    return fakes.FakeListChatModel(responses=["Hello there."])


def pydantic_ai_agent() -> Any:
    pydantic_ai = pytest.importorskip("pydantic_ai")
    test_model = pytest.importorskip("pydantic_ai.models.test")
    return pydantic_ai.Agent(test_model.TestModel())


def openai_agents_agent() -> Any:
    return pytest.importorskip("agents").Agent(name="shop")


ADAPTERS = {
    "from_langchain": (from_langchain, langchain_model),
    "from_pydantic_ai": (from_pydantic_ai, pydantic_ai_agent),
    "from_openai_agents": (from_openai_agents, openai_agents_agent),
}


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"welcome": 5}, "welcome must be a str or None"),
        ({"filler": 5}, "filler must be a str, a callable or None"),
        ({"filler": a_coroutine}, "filler must be a plain function"),
    ],
)
def test_adapters_refuse_a_welcome_or_filler_of_another_type(
    adapter: str, options: dict[str, Any], match: str
) -> None:
    # A welcome of 5 failed every session.start (`agent error`), a filler every tool call.
    make, framework = ADAPTERS[adapter]
    with pytest.raises(TypeError, match=match):
        make(framework(), **options)


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("value", [None, 5, "agent"])
def test_adapters_refuse_what_is_not_their_framework_s_agent(adapter: str, value: Any) -> None:
    make, framework = ADAPTERS[adapter]
    framework()  # skips without the framework
    with pytest.raises(TypeError, match=f"{adapter} needs"):
        make(value)


@pytest.mark.parametrize(
    ("adapter", "option"),
    [
        ("from_langchain", "make_input"),
        ("from_langchain", "config"),
        ("from_pydantic_ai", "deps"),
        ("from_openai_agents", "context"),
    ],
)
@pytest.mark.parametrize("value", [5, a_coroutine])
def test_adapters_refuse_a_per_turn_builder_that_cannot_build(
    adapter: str, option: str, value: Any
) -> None:
    # from_langchain's config=5 (neither a function nor a RunnableConfig) failed every turn.
    make, framework = ADAPTERS[adapter]
    with pytest.raises(TypeError, match=option):
        make(framework(), **{option: value})


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_turns": "10"}, ConfigurationError, "max_turns must be an integer > 0"),
        ({"max_turns": 0}, ConfigurationError, "max_turns must be an integer > 0"),
        ({"max_turns": True}, ConfigurationError, "max_turns must be an integer > 0"),
        ({"run_config": {"tracing_disabled": True}}, TypeError, "run_config must be"),
        # "false" and "no" are true: the traces (the conversation) went to OpenAI
        ({"tracing": "false"}, TypeError, "tracing must be True or False"),
        ({"tracing": None}, TypeError, "tracing must be True or False"),
    ],
)
def test_from_openai_agents_refuses_bad_options(
    options: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        from_openai_agents(openai_agents_agent(), **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"model_setting": {}}, "model_setting"),  # a typo of model_settings
        ({"message_history": []}, "message_history"),  # the adapter passes the history
        ({"user_prompt": "hi"}, "user_prompt"),
        # taken, each failed every turn (`agent error`) inside the adapter or pydantic-ai
        ({"capabilities": 5}, "capabilities must be a sequence"),
        ({"toolsets": "tools"}, "toolsets must be a sequence"),
        ({"model_settings": 5}, "model_settings must be"),
        ({"usage_limits": 5}, "usage_limits must be"),
    ],
)
def test_from_pydantic_ai_refuses_a_run_option_agent_iter_cannot_take(
    options: dict[str, Any], match: str
) -> None:
    # Taken, then every turn failed: "Agent.iter() got an unexpected keyword argument".
    with pytest.raises(TypeError, match=f"from_pydantic_ai: {match}"):
        from_pydantic_ai(pydantic_ai_agent(), **options)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"tags": 5}, "config's tags must be a list of str"),
        ({"tags": "voice"}, "config's tags must be a list of str"),
        ({"tags": ("voice",)}, "config's tags must be a list of str"),
        ({"metadata": ["k"]}, "config's metadata must be a mapping"),
        ({"configurable": 5}, "config's configurable must be a mapping"),
        ({"callbacks": 5}, "config's callbacks must be"),
    ],
)
def test_from_langchain_refuses_a_config_value_of_another_type(
    config: dict[str, Any], match: str
) -> None:
    # Taken, each failed every turn (`agent error`: "'int' object has no attribute 'copy'").
    with pytest.raises(TypeError, match=match):
        from_langchain(langchain_model(), config=config)
    from_langchain(langchain_model(), config={"tags": ["voice"], "metadata": {"k": 1}})


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        (5, TypeError, "system_prompt must be a str or None"),
        ("\ud800", ConfigurationError, "valid"),
    ],
)
def test_from_langchain_refuses_a_system_prompt_that_is_no_text(
    prompt: Any, error: type, match: str
) -> None:
    # 5 failed every turn (`agent error`) inside LangChain's SystemMessage.
    with pytest.raises(error, match=match):
        from_langchain(langchain_model(), system_prompt=prompt)


@pytest.mark.anyio
@pytest.mark.parametrize("prompt", ["", " \n"])
async def test_from_langchain_with_a_blank_system_prompt_sends_none(prompt: str) -> None:
    seen: list[Any] = []

    def make_input(messages: list[Any]) -> list[Any]:
        seen.append([type(m).__name__ for m in messages])
        return messages

    agent = from_langchain(langchain_model(), system_prompt=prompt, make_input=make_input)
    async with LayercodeTestClient(create_app(settings(), agent), secret=SECRET) as client:
        assert (await client.message("hello")).text == "Hello there."
    assert seen == [["HumanMessage"]]


# -- the test kit and logging -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"secret": 5}, "secret must be a str"),
        ({"secret": [SECRET]}, "secret must be a str"),
        ({"path": 5}, "path must be a str"),
        ({"app": 5}, "app must be an ASGI app"),
        ({"conversation_id": 5}, "conversation_id must be a str or None"),
        ({"session_id": b"s"}, "session_id must be a str or None"),
    ],
)
def test_the_test_client_refuses_options_of_another_type(
    options: dict[str, Any], match: str
) -> None:
    # secret=5 failed every request ("expected bytes or str, got int"), path=5 with an
    # AttributeError, conversation_id=5 as a 400 from the app under test.
    with pytest.raises(TypeError, match=match):
        LayercodeTestClient(**{"app": create_app(settings(), agent), "secret": SECRET, **options})


@pytest.mark.parametrize("token", [5, b"token", ["token"]])
def test_setup_logging_refuses_a_logfire_token_of_another_type(token: Any) -> None:
    with pytest.raises(TypeError, match="logfire_token must be a str or None"):
        setup_logging(logfire_token=token)


@pytest.mark.parametrize("value", [5, "registry", {}])
def test_prometheus_needs_a_registry(value: Any) -> None:
    # PrometheusMetrics said "cannot create weak reference to 'int' object"; MetricsEndpoint
    # took it and answered every scrape 500.
    pytest.importorskip("prometheus_client")
    prometheus = pytest.importorskip("layercode_asgi.prometheus")
    with pytest.raises(TypeError, match=r"registry must be a prometheus_client\.CollectorRegistry"):
        prometheus.PrometheusMetrics(value)
    with pytest.raises(TypeError, match=r"registry must be a prometheus_client\.CollectorRegistry"):
        prometheus.MetricsEndpoint(registry=value)


@pytest.mark.parametrize("option", ["tracer_provider", "meter_provider"])
def test_opentelemetry_needs_providers(option: str) -> None:
    # It was an AttributeError ('int' object has no attribute 'get_tracer').
    pytest.importorskip("opentelemetry")
    otel = pytest.importorskip("layercode_asgi.otel")
    with pytest.raises(TypeError, match=f"{option} must be"):
        otel.OtelMetrics(**{option: 5})


def test_get_agent_names_a_name_of_another_type() -> None:
    # It was "argument of type 'int' is not iterable".
    with pytest.raises(TypeError, match="agent name must be a str, got int"):
        get_agent(5)  # type: ignore[arg-type]


def test_register_agent_refuses_an_async_factory() -> None:
    # get_agent returned its coroutine (never awaited); create_app then said "agent must be
    # an async callable, got coroutine", naming neither the factory nor its name.
    async def factory(settings: Any) -> Any:
        return agent

    with pytest.raises(TypeError, match="the factory for 'mine' must be a plain function"):
        register_agent("mine", factory)


@pytest.mark.parametrize("name", ["", "  ", " mine", "mine\n", "mi\x00ne", "mi\x1b[2Jne", "\ud800"])
def test_register_agent_refuses_a_name_no_lookup_can_find(name: str) -> None:
    # Each was registered: LAYERCODE_AGENT / --agent strip it or refuse it (blank, not
    # UTF-8), so no server could serve it; control characters reached list-agents raw.
    with pytest.raises(ConfigurationError, match="agent name"):
        register_agent(name, lambda settings: agent)
    with pytest.raises(AgentNotFoundError, match="no agent named"):
        get_agent(name)
    assert name not in list_agents()


def test_get_agent_refuses_settings_of_another_type() -> None:
    # get_agent("echo", settings=5) was accepted (the echo factory ignores its settings).
    with pytest.raises(TypeError, match="settings must be a Settings or None, got int"):
        get_agent("echo", settings=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", [-5, -1, 10**400], ids=["-5", "-1", "10**400"])
def test_setup_logging_refuses_a_level_logging_cannot_use(level: int) -> None:
    # -5 was taken (every record logged, below DEBUG); 10**400 too (nothing ever logged).
    with pytest.raises(ValueError, match="level must be an integer >= 0"):
        setup_logging(level=level)


@pytest.mark.parametrize("level", [0, 5, 10, 50, 100, "warning", " Error "])
def test_setup_logging_takes_levels_logging_knows(level: int | str) -> None:
    logger = logging.getLogger("layercode_asgi")
    before = logger.level
    try:
        setup_logging(level=level)
        expected = level if isinstance(level, int) else logging.getLevelName(level.strip().upper())
        assert logger.level == expected
    finally:
        logger.setLevel(before)


# -- signatures as functions ---------------------------------------------------------------------


@pytest.mark.parametrize("tolerance", ["5", None, 1.5, float("inf"), float("nan"), True])
def test_verify_signature_refuses_a_tolerance_that_is_no_int(tolerance: Any) -> None:
    # "5" and None were "'<=' not supported between instances of 'int' and 'str'"; inf
    # accepted any timestamp (the check the docs say nothing turns off), nan none at all.
    header = sign(b"x", SECRET)
    with pytest.raises(TypeError, match="tolerance must be an int"):
        verify_signature(b"x", header, SECRET, tolerance)


@pytest.mark.parametrize("now", ["1700000000", True, b"1"])
def test_verify_signature_refuses_a_clock_that_is_no_number(now: Any) -> None:
    # "1700000000" was "must be real number, not str"; True was taken as 1 s after 1970.
    with pytest.raises(TypeError, match="now must be a number"):
        verify_signature(b"x", sign(b"x", SECRET, 1), SECRET, now=now)


@pytest.mark.parametrize("secret", [None, 5, [None], [SECRET, 5], {"k": SECRET}])
def test_verify_signature_refuses_a_secret_of_another_type(secret: Any) -> None:
    # It answered "no matching signature: cannot use payload or secret: 'NoneType' object is
    # not iterable" for every request: a configuration error shown as a forged request.
    header = sign(b"x", SECRET)
    with pytest.raises(TypeError, match="secret must be a str or bytes, or a list of them"):
        verify_signature(b"x", header, secret)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_verify_signature_takes_a_bytes_like_secret_as_one_secret(kind: Any) -> None:
    # bytes worked, but a bytearray or memoryview was read as a list of secrets: "expected
    # bytes or str, got int".
    header = sign(b"x", SECRET)
    assert verify_signature(b"x", header, kind(SECRET.encode())) is True


@pytest.mark.parametrize("secret", [" whsec_x", "whsec_x\n", ["whsec_new", "whsec_old "]])
def test_a_secret_with_surrounding_whitespace_is_refused(secret: Any) -> None:
    # Taken as is, while LayerCode signs with the secret without it: every webhook got 401
    # "no matching signature". Settings strips LAYERCODE_WEBHOOK_SECRET; this says so.
    with pytest.raises(ConfigurationError, match="whitespace around it"):
        LayercodeSignature(LayercodeWebhook(agent), secret=secret)


@pytest.mark.parametrize("secret", ["whsec_new,whsec_old", "whsec_new, whsec_old", ["whsec_a,b"]])
def test_a_secret_holding_a_comma_is_refused_pointing_to_the_list_form(secret: Any) -> None:
    # secret=os.environ["LAYERCODE_WEBHOOK_SECRET"] during a rotation ("new,old", which
    # Settings splits) was taken as one key LayerCode never signs with: every webhook got
    # 401. LayerCode's secrets (whsec_ and base64 / hex characters) hold no comma.
    with pytest.raises(
        ConfigurationError, match=r"comma.*secret=\['whsec_new', 'whsec_old'\]"
    ) as e:
        LayercodeSignature(LayercodeWebhook(agent), secret=secret)
    assert "whsec_a" not in str(e.value) and "whsec_new," not in str(e.value)


def test_a_replay_cache_class_instead_of_a_cache_is_refused() -> None:
    # The class passed the check; every signed request was then answered 503 "replay
    # protection unavailable", a TypeError logged (seen() missing an argument).
    with pytest.raises(TypeError, match="MemoryReplayCache\\(\\)"):
        LayercodeSignature(
            LayercodeWebhook(agent), secret=SECRET, replay_protection=MemoryReplayCache
        )


def _turn_checker(strict: Any) -> Any:
    from layercode_asgi.testing import TurnChecker

    return TurnChecker("turn_1", strict=strict)


FLAGS: dict[str, Any] = {
    "LayercodeWebhook keep_history": lambda v: LayercodeWebhook(agent, keep_history=v),
    "RedisConversationStore cluster": lambda v: RedisConversationStore(
        "redis://127.0.0.1:1", cluster=v
    ),
    "RedisReplayCache cluster": lambda v: RedisReplayCache("redis://127.0.0.1:1", cluster=v),
    "LayercodeTestClient strict": lambda v: LayercodeTestClient(
        create_app(settings(), agent), secret=SECRET, strict=v
    ),
    "TurnChecker strict": _turn_checker,
    "setup_logging verbose": lambda v: setup_logging(verbose=v),
}


@pytest.mark.parametrize("where", sorted(FLAGS))
@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_a_flag_must_be_a_bool(where: str, value: Any) -> None:
    # Each was taken for its truth: keep_history="false" kept every history, cluster="no"
    # made a cluster client, strict="false" failed turns that carried a response.error.
    pytest.importorskip("redis")
    name = where.split()[-1]
    with pytest.raises(TypeError, match=f"{name} must be a bool, got {type(value).__name__}"):
        FLAGS[where](value)


@pytest.mark.parametrize("timestamp", [-1, 10**15, 10**20])
def test_sign_refuses_a_timestamp_no_signature_can_carry(timestamp: int) -> None:
    # It signed "t=-1" or a 16-digit t: a header verify_signature (and every server) refuses
    # as malformed, handed to a test that meant to send a valid one.
    from layercode_asgi.testing import signed_headers

    with pytest.raises(ValueError, match="timestamp must be a unix time"):
        sign(b"x", SECRET, timestamp)
    with pytest.raises(ValueError, match="timestamp must be a unix time"):
        signed_headers(b"x", SECRET, timestamp)


@pytest.mark.parametrize(("args", "name"), [((b"x", None), "secret"), (({}, SECRET), "payload")])
def test_sign_names_the_argument_of_another_type(args: tuple[Any, Any], name: str) -> None:
    # It was "expected bytes or str, got NoneType", naming neither.
    with pytest.raises(TypeError, match=f"{name} must be a str or bytes, got"):
        sign(*args)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"event": None}, TypeError, "event must be a mapping"),
        ({"event": ["message"]}, TypeError, "event must be a mapping"),
        ({"on_event": 5}, TypeError, "on_event must be a callable"),
        ({"headers": [("x-a", "b")]}, TypeError, "headers must be a mapping"),
    ],
)
async def test_send_turn_refuses_arguments_of_another_type(
    options: dict[str, Any], error: type, match: str
) -> None:
    # event=None was "'NoneType' object has no attribute 'get'"; on_event=5 was "'int' object
    # is not callable" once the turn had been sent; headers=[...] "'list' object has no
    # attribute 'items'".
    from layercode_asgi.testing import message_event, send_turn

    app = create_app(settings(), agent)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        arguments = {"event": message_event("hi"), "secret": SECRET, **options}
        with pytest.raises(error, match=match):
            await send_turn(client, "/api/agent", **arguments)


def test_the_test_client_refuses_headers_that_are_no_mapping() -> None:
    with pytest.raises(TypeError, match="headers must be a mapping"):
        LayercodeTestClient(create_app(settings(), agent), secret=SECRET, headers=[("x-a", "b")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"history": "hello"}, "history must be a list of HistoryMessage"),
        ({"history": [{"role": "user", "text": "hi"}]}, "history must be a list of HistoryMessage"),
        ({"history": None}, "history must be a list of HistoryMessage"),
        ({"extras": ["db"]}, "extras must be a mapping or None"),
    ],
)
def test_stream_turn_refuses_history_and_extras_of_another_type(
    options: dict[str, Any], match: str
) -> None:
    # Taken: the agent then saw context.history as the letters of "hello", or dicts without
    # .role, and context.extras as a list; its turn failed as "agent error".
    from layercode_asgi import stream_response, stream_turn
    from layercode_asgi.testing import message_event

    body = encode(message_event("hi"))
    with pytest.raises(TypeError, match=match):
        stream_turn(body, agent, **options)
    with pytest.raises(TypeError, match=match):
        stream_response(body, a_handler, **options)


async def a_handler(stream: Any) -> None:
    stream.tts("hi")


@pytest.mark.parametrize("handler", [5, "handler", a_generator])
def test_stream_response_refuses_a_handler_that_cannot_answer(handler: Any) -> None:
    # Taken; each turn then failed when it ran ("'int' object is not callable").
    from layercode_asgi import stream_response
    from layercode_asgi.testing import message_event

    with pytest.raises(TypeError, match="handler must be"):
        stream_response(encode(message_event("hi")), handler)


def encode(event: dict[str, Any]) -> bytes:
    from layercode_asgi.testing import encode_event

    return encode_event(event)


@pytest.mark.parametrize("status", ["200", 99, 1000, True, 200.0])
def test_create_sse_response_refuses_a_status_that_is_no_http_status(status: Any) -> None:
    # Taken; uvicorn then failed each response (KeyError: '200') and dropped the connection
    # without an answer.
    from layercode_asgi import create_sse_response

    async def events() -> AsyncIterator[str]:
        yield "x"

    with pytest.raises((TypeError, ValueError), match="status_code must be an int from 100 to 599"):
        create_sse_response(events(), status_code=status)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("404", TypeError),
        (None, TypeError),
        (True, TypeError),
        (200, ValueError),
        (99, ValueError),
        (600, ValueError),
    ],
)
def test_a_response_error_needs_an_error_status(status: Any, error: type) -> None:
    from layercode_asgi import ResponseError

    with pytest.raises(error, match="status_code must be an int from 400 to 599"):
        ResponseError(status, "not found")


@pytest.mark.anyio
async def test_a_hook_raising_a_response_error_with_a_str_status_gets_a_json_500() -> None:
    # The answer crashed ("'<' not supported between instances of 'str' and 'int'"): the
    # exception left the app, whose server answered a bare 500 without the JSON error.
    from layercode_asgi import ResponseError
    from layercode_asgi.testing import ProtocolViolation, data_event

    def on_data(payload: Any) -> None:
        raise ResponseError("404", "no such order")  # type: ignore[arg-type]

    async with LayercodeTestClient(
        create_app(settings(), agent, on_data=on_data), secret=SECRET
    ) as client:
        with pytest.raises(ProtocolViolation) as caught:
            await client.send(data_event({"order": 1}))
    assert caught.value.status_code == 500
    assert '{"error":"data handler failed"}' in str(caught.value)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_the_sse_parser_reads_any_bytes(kind: Any) -> None:
    # It failed with "cannot use a string pattern on a bytes-like object".
    from layercode_asgi.testing import SSEParser

    assert [e.data for e in SSEParser().feed(kind(b"data: hi\n\n"))] == ["hi"]


@pytest.mark.parametrize("chunk", [None, 5, ["data: hi\n\n"]])
def test_the_sse_parser_refuses_what_is_no_text(chunk: Any) -> None:
    # None was read as an empty chunk, 5 failed inside the regex ("expected string").
    from layercode_asgi.testing import SSEParser

    with pytest.raises(TypeError, match="chunk must be bytes or str, got"):
        SSEParser().feed(chunk)


def test_add_middleware_without_a_secret_stops_uvicorn_with_lifespan_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Starlette builds add_middleware's entries on the app's first call: the lifespan's
    # start-up. uvicorn's default --lifespan auto takes that error for "no lifespan support"
    # and serves a 500 per request; docs/middleware.md says so, and that "on" refuses to start.
    import socket

    import uvicorn
    from starlette.applications import Starlette

    app = Starlette()
    app.add_middleware(LayercodeSignature, secret=None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None))
        with caplog.at_level(logging.ERROR, logger="uvicorn.error"), suppress(SystemExit):
            server.run(sockets=[sock])  # start-up failed: returns, or exits 3 (uvicorn >= 0.5x)
    assert not server.started
    assert "LayercodeSignature needs the webhook secret" in caplog.text
