"""The `starter` agent: its configuration, its system prompt, and `serve --agent starter`.

Its conversations (history, streaming, failures, disconnects) are in test_adapters.py,
with every other agent, against the fake OpenAI API.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layercode_asgi import ConfigurationError, Settings, create_app, get_agent
from layercode_asgi.builtin_agents import STARTER_PROMPT, STARTER_WELCOME
from layercode_asgi.cli import main
from layercode_asgi.testing import LayercodeTestClient

from .conftest import PYTHON, SECRET, serve
from .fake_openai import FakeOpenAI, fake_openai_env
from .test_cli import cli_server, talk

pytest.importorskip("pydantic_ai")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with fake_openai_env(monkeypatch) as server:
        yield server


def settings(**fields: Any) -> Settings:
    return Settings(env_file=None, environ={}, **fields)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_starter_refuses_to_start_without_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ConfigurationError) as info:
        get_agent("starter", settings())
    assert one_line(info) == "the starter agent needs OPENAI_API_KEY for 'openai:gpt-5-nano'"
    with pytest.raises(ConfigurationError) as info:
        create_app(
            settings(layercode_webhook_secret=SECRET, default_model="google-gla:gemini-x"),
            "starter",
        )
    assert one_line(info) == (
        "the starter agent needs GOOGLE_GENERATIVEAI_API_KEY for 'google-gla:gemini-x'"
    )


def test_starter_passes_the_google_key_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-ai reads GOOGLE_API_KEY; ours is GOOGLE_GENERATIVEAI_API_KEY, passed explicitly.
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    agent = get_agent(
        "starter",
        settings(default_model="google-gla:gemini-x", google_generativeai_api_key="g-key"),
    )
    assert agent.__name__ == "starter_agent"


def test_starter_refuses_without_pydantic_ai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydantic_ai", None)  # any import of it fails
    with pytest.raises(ConfigurationError) as info:
        get_agent("starter", settings(openai_api_key="sk-test"))
    assert one_line(info) == (
        "the starter agent needs pydantic-ai: pip install './layercode-asgi[pydantic-ai]'"
    )
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pydantic_ai.models.openai", None)  # no openai SDK
    with pytest.raises(ConfigurationError) as info:
        get_agent("starter", settings(openai_api_key="sk-test"))
    assert one_line(info) == (
        "the starter agent needs pydantic-ai's 'openai' models: "
        "pip install './layercode-asgi[pydantic-ai]'"
    )


def test_starter_refuses_an_unknown_provider() -> None:
    with pytest.raises(ConfigurationError) as info:
        get_agent("starter", settings(default_model="no-such-provider:model"))
    assert one_line(info).startswith("DEFAULT_MODEL 'no-such-provider:model': ")


def test_system_prompt_settings_are_checked(tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("From the file.")
    both = settings(
        openai_api_key="k", system_prompt="Inline.", system_prompt_file=str(prompt_file)
    )
    for name in ("starter", "openai"):
        with pytest.raises(ConfigurationError) as info:
            get_agent(name, both)
        assert one_line(info) == (
            "set LAYERCODE_SYSTEM_PROMPT or LAYERCODE_SYSTEM_PROMPT_FILE, not both"
        )
    missing = tmp_path / "missing.txt"
    with pytest.raises(ConfigurationError) as info:
        get_agent("starter", settings(openai_api_key="k", system_prompt_file=str(missing)))
    assert one_line(info) == (
        f"LAYERCODE_SYSTEM_PROMPT_FILE {str(missing)!r}: cannot read it (No such file or directory)"
    )
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigurationError, match="is empty"):
        get_agent(
            "starter", settings(openai_api_key="k", system_prompt_file=str(tmp_path / "empty.txt"))
        )
    env = Settings(
        env_file=None,
        environ={"LAYERCODE_SYSTEM_PROMPT_FILE": str(prompt_file), "LAYERCODE_SYSTEM_PROMPT": ""},
    )
    assert env.system_prompt_file == str(prompt_file) and env.system_prompt is None


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["starter", "openai"])
@pytest.mark.parametrize("source", ["inline", "file", "default"])
async def test_the_system_prompt_reaches_the_model(
    name: str, source: str, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fields: dict[str, Any] = {"openai_api_key": "sk-test", "layercode_webhook_secret": SECRET}
    if name == "openai":
        fields["default_model"] = "gpt-5-nano"
    if source == "inline":
        fields["system_prompt"] = "You sell tents. Inline."
    elif source == "file":
        (tmp_path / "prompt.txt").write_text("You sell tents.\nFrom a file.\n", encoding="utf-8")
        fields["system_prompt_file"] = str(tmp_path / "prompt.txt")
    app = create_app(settings(**fields), name)
    with serve(app) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            await client.message("hi")
    expected = {
        "inline": "You sell tents. Inline.",
        "file": "You sell tents.\nFrom a file.",
        "default": STARTER_PROMPT if name == "starter" else "You are a helpful voice assistant",
    }[source]
    assert expected in fake.instructions(-1)


def test_list_agents_lists_starter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-agents"], environ={}) == 0
    assert "starter  a concise voice assistant on pydantic-ai" in capsys.readouterr().out


def test_serve_starter_without_a_key_exits_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET}
    assert main(["serve", "--agent", "starter"], environ=environ) == 2
    err = capsys.readouterr().err
    assert err == "error: the starter agent needs OPENAI_API_KEY for 'openai:gpt-5-nano'\n"


@pytest.mark.anyio
async def test_serve_agent_starter(
    fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `fake` put OPENAI_BASE_URL and OPENAI_API_KEY in the environment the server inherits.
    command = [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--port", "{port}",
               "--agent", "starter"]  # fmt: skip
    with cli_server(command, tmp_path) as (server, secret):
        port = server.port
        assert "starter" in server.output()
        assert await talk(port, secret, "hi") == "Hello there. How can I help you today?"
        client = LayercodeTestClient(base_url=f"http://127.0.0.1:{port}", secret=secret)
        assert (await client.session_start()).text == STARTER_WELCOME
    assert fake.requests[-1]["body"]["model"] == "gpt-5-nano"
    assert fake.requests[-1]["path"] == "/responses"  # pydantic-ai's openai: models
