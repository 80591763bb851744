"""Every app in examples/ runs and holds a LayerCode conversation (checked by `simulate`)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import msgspec
import pytest

from layercode_asgi import sign
from layercode_asgi.cli import main
from layercode_asgi.testing import LayercodeTestClient

from .conftest import SECRET, event_body, serve, signed_headers, start_server_process
from .fake_openai import Script, fake_openai

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = ["starlette_app", "fastapi_app", "litestar_app", "raw_asgi"]
MESSAGES = ["hello", "how are you?"]
EXPECTED = ["Hello! Say something.", "You said: hello", "You said: how are you?"]
#: The agents on LLM frameworks (one per adapter) -> the framework they need.
ADAPTER_EXAMPLES = {
    "pydantic_ai_shop": "pydantic_ai",
    "langchain_agent": "langchain.agents",
    "openai_agents_app": "agents",
}


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # frameworks resolve hints through it
    spec.loader.exec_module(module)
    return module


def simulate_json(url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(
        ["simulate", "--url", url, "--secret", SECRET, *MESSAGES, "--data", '{"n":1}', "--json"],
        environ={},
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report: dict[str, Any] = msgspec.json.decode(captured.out)
    return report


def test_every_example_is_tested() -> None:
    assert sorted(p.stem for p in EXAMPLES_DIR.glob("*.py")) == sorted(
        EXAMPLES + list(ADAPTER_EXAMPLES)
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_holds_a_conversation(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", SECRET)
    app = load_example(name, monkeypatch).app
    with serve(app) as base:
        report = simulate_json(f"{base}/api/agent", capsys)
        unsigned = main(
            ["simulate", "--url", f"{base}/api/agent", "--secret", "wrong", "hi"], environ={}
        )
    assert [turn["text"] for turn in report["turns"]] == EXPECTED
    assert [reply["body"] for reply in report["replies"]] == [{"status": "ok"}] * 3
    assert unsigned == 1
    assert "PROTOCOL VIOLATION: http-error: session.start answered 401" in capsys.readouterr().err


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_answers_bad_requests_as_the_middleware_documents(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real HTTP: every refusal is the documented JSON, and no spelling of the webhook's
    path is redirected (Starlette's 307 goes to an ``http://`` URL built from the Host
    header: a webhook client following it re-sends the signed body in clear text)."""
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", SECRET)
    app = load_example(name, monkeypatch).app
    body = event_body()
    refused = {
        "missing signature header": {},
        "timestamp outside tolerance": {"layercode-signature": sign(body, SECRET, 1_000_000)},
        "no matching signature": signed_headers(body, "whsec_wrong"),
    }
    too_large = {"error": "request body exceeds 1048576 bytes"}
    with serve(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        for reason, headers in refused.items():
            reply = client.post("/api/agent", content=body, headers=headers)
            assert (reply.status_code, reply.json()) == (401, {"error": reason}), name
        chunks = iter([b"x" * 65536] * 20)  # no Content-Length: refused at the limit
        for content in (b"x" * 1048577, chunks):
            reply = client.post("/api/agent", content=content, headers=signed_headers(body))
            assert (reply.status_code, reply.json()) == (413, too_large), name
        for path in ("/api/agent/", "/api/agent//", "//api/agent", "/api//agent"):
            reply = client.post(path, content=body, headers=signed_headers(body))
            assert reply.status_code in (200, 404), (name, path, reply.status_code)
        reply = client.post("/api/agent", content=body, headers=signed_headers(body))
        assert reply.text.endswith('"type":"response.end","turn_id":"turn-1"}\n\n'), name


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_refuses_to_start_without_a_secret(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(SystemExit, match="Set LAYERCODE_WEBHOOK_SECRET"):
        load_example(name, monkeypatch)


def example_command(name: str, server: str) -> list[str]:
    """``python examples/x.py`` (uvicorn, as the docstrings say), or hypercorn serving it."""
    path = str(EXAMPLES_DIR / f"{name}.py")
    if server == "script":
        return [sys.executable, path]
    return [sys.executable, "-m", "hypercorn", f"{path}:app", "--bind", "127.0.0.1:{port}"]


@pytest.fixture(params=["script", "hypercorn"])
def running_examples(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, int]]:
    """Each example started as a script (`python examples/x.py`), or under hypercorn, all at
    once."""
    if request.param == "hypercorn":
        pytest.importorskip("hypercorn")
    with ExitStack() as stack:
        started = [
            stack.enter_context(
                start_server_process(
                    example_command(name, request.param),
                    env={**os.environ, "LAYERCODE_WEBHOOK_SECRET": SECRET, "PORT": "{port}"},
                    cwd=tmp_path,
                    log=tmp_path / f"{name}.log",
                    wait=False,
                )
            )
            for name in EXAMPLES
        ]
        for server in started:
            server.wait_ready(ready_path=None)
        yield {name: server.port for name, server in zip(EXAMPLES, started, strict=True)}


def test_examples_run_as_scripts(
    running_examples: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    for name, port in running_examples.items():
        report = simulate_json(f"http://127.0.0.1:{port}/api/agent", capsys)
        assert [turn["text"] for turn in report["turns"]] == EXPECTED, name


# -- the agents on LLM frameworks, against the fake OpenAI API -------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", ADAPTER_EXAMPLES)
async def test_adapter_example_holds_a_conversation(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip(ADAPTER_EXAMPLES[name])
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    shop = name == "pydantic_ai_shop"
    with fake_openai() as (fake, base_url):
        monkeypatch.setenv("OPENAI_BASE_URL", base_url)
        app = load_example(name, monkeypatch).app
        with serve(app) as base:
            async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
                start = await client.session_start()
                if shop:
                    fake.push(
                        Script(text=[], tool_call=("check_stock", '{"item": "tent"}')),
                        Script(text=["We have", " four tents."]),
                    )
                turn = await client.message("Do you have tents?")
    assert len(start.tts) == 1 and start.tts[0].startswith(("Welcome", "Hi!"))
    if shop:
        assert turn.tts == ["Let me check.", "We have four tents."]
        assert turn.data == [{"item": "tent", "in_stock": 4}]
    else:
        assert turn.tts == ["Hello there. ", "How can I help you today?"]
    assert fake.conversation(-1)[-1] == ("user", "Do you have tents?")


@pytest.mark.parametrize("name", ADAPTER_EXAMPLES)
def test_adapter_example_refuses_to_start_without_its_settings(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip(ADAPTER_EXAMPLES[name])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="Set LAYERCODE_WEBHOOK_SECRET"):
        load_example(name, monkeypatch)
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", SECRET)
    with pytest.raises(SystemExit, match="Set OPENAI_API_KEY"):
        load_example(name, monkeypatch)
