"""Every app in examples/ runs and holds a LayerCode conversation (checked by `simulate`)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from layercode_asgi import sign
from layercode_asgi.cli import main
from layercode_asgi.simulate import DEFAULT_URL
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


def simulate_json(
    url: str, capsys: pytest.CaptureFixture[str], secret: str = SECRET
) -> dict[str, Any]:
    code = main(
        ["simulate", "--url", url, "--secret", secret, *MESSAGES, "--data", '{"n":1}', "--json"],
        environ={},
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report: dict[str, Any] = msgspec.json.decode(captured.out)
    return report


def documented_commands(name: str) -> tuple[list[str], list[str], list[str]]:
    """The three commands of an example's docstring (its indented lines), split as a shell
    would: the install, the run, the ``simulate`` to talk to it from another terminal."""
    doc = ast.get_docstring(ast.parse((EXAMPLES_DIR / f"{name}.py").read_text())) or ""
    lines = "\n".join(line for line in doc.splitlines() if line.startswith("    "))
    commands = [shlex.split(line) for line in lines.replace("\\\n", " ").splitlines()]
    assert [words[:2] for words in commands[::2]] == [
        ["pip", "install"],
        ["layercode-asgi", "simulate"],
    ], (name, commands)
    assert len(commands) == 3, (name, commands)
    return commands[0], commands[1], commands[2]


def run_env(run: list[str]) -> dict[str, str]:
    """The variables a run line sets before its command."""
    return dict(word.split("=", 1) for word in run if re.fullmatch(r"[A-Z_]+=.*", word))


@functools.cache
def installed_by(extras: frozenset[str]) -> frozenset[str]:
    """The distributions ``pip install './layercode-asgi[extras]'`` names (not theirs)."""
    project = tomllib.loads((EXAMPLES_DIR.parent / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    assert extras <= optional.keys(), extras - optional.keys()
    requirements = [*project["dependencies"], *(r for extra in extras for r in optional[extra])]
    return frozenset(_dist(re.split(r"[\[<>=~!; ]", r)[0]) for r in requirements)


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(name: str) -> set[str]:
    """The distributions an example imports (besides this package and the standard library)."""
    tree = ast.parse((EXAMPLES_DIR / f"{name}.py").read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    tops = (
        {module.split(".")[0] for module in modules}
        - set(sys.stdlib_module_names)
        - {"layercode_asgi", "__future__"}
    )
    owners = importlib.metadata.packages_distributions()
    absent = tops - owners.keys()
    if absent:  # which distribution holds a module is known only once it is installed
        pytest.skip(f"examples/{name}.py imports {sorted(absent)}, not installed here")
    return {_dist(owners[top][0]) for top in tops}


@pytest.mark.parametrize("name", [*EXAMPLES, *ADAPTER_EXAMPLES])
def test_the_docstring_commands_of_the_example_run_as_written(name: str) -> None:
    """Run from the directory holding the clone (``./layercode-asgi``, where the README's
    ``pip install`` runs), the docstring's install brings every module the example imports,
    its run line names the file there, and ``simulate`` without ``--url`` reaches the port
    the example serves on by default, with the secret it was started with."""
    install, run, simulate = documented_commands(name)
    extras: set[str] = set()
    named = set()
    for target in install[2:]:
        clone = re.fullmatch(r"\./layercode-asgi(?:\[(?P<extras>[\w,-]+)\])?", target)
        if clone:
            extras |= set((clone["extras"] or "").split(",")) - {""}
        else:
            named.add(_dist(target))
    missing = third_party_imports(name) - installed_by(frozenset(extras)) - named
    assert not missing, f"examples/{name}.py imports {missing}, not installed by {install}"
    env = run_env(run)
    assert run[len(env) :] == ["python", f"layercode-asgi/examples/{name}.py"], run
    assert simulate[2:4] == ["--secret", env["LAYERCODE_WEBHOOK_SECRET"]], simulate
    assert "--url" not in simulate and DEFAULT_URL == "http://127.0.0.1:8000/api/agent"
    assert 'os.environ.get("PORT", "8000")' in (EXAMPLES_DIR / f"{name}.py").read_text()


def test_every_example_is_tested() -> None:
    assert sorted(p.stem for p in EXAMPLES_DIR.glob("*.py")) == sorted(
        EXAMPLES + list(ADAPTER_EXAMPLES)
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_holds_a_conversation(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, simulate = documented_commands(name)
    secret = run_env(run)["LAYERCODE_WEBHOOK_SECRET"]  # as its docstring starts it
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", secret)
    app = load_example(name, monkeypatch).app
    with serve(app) as base:
        report = simulate_json(f"{base}/api/agent", capsys, secret)
        # the docstring's simulate, as written (its URL is the default: the example's port)
        documented = main([*simulate[1:], "--url", f"{base}/api/agent"], environ={})
        assert documented == 0, capsys.readouterr().err
        unsigned = main(
            ["simulate", "--url", f"{base}/api/agent", "--secret", "wrong", "hi"], environ={}
        )
    assert [turn["text"] for turn in report["turns"]] == EXPECTED
    assert [reply["body"] for reply in report["replies"]] == [{"status": "ok"}] * 3
    assert unsigned == 1
    err = capsys.readouterr().err  # the turn id says which turn (before: "session.start answered")
    assert re.search(
        r"PROTOCOL VIOLATION: http-error: session.start \(turn_id '[^']+'\) answered 401", err
    )


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


@pytest.mark.parametrize("value", [None, " \n"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_refuses_to_start_without_a_secret(
    name: str, value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("LAYERCODE_WEBHOOK_SECRET", raising=False)
    else:  # blank: before, the Starlette and FastAPI apps started and answered every call 500
        monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", value)
    with pytest.raises(SystemExit, match="Set LAYERCODE_WEBHOOK_SECRET"):
        load_example(name, monkeypatch)


@pytest.mark.anyio
@pytest.mark.parametrize("noise", [False, True], ids=["alone", "other-settings-invalid"])
@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_reads_the_secret_as_settings_does(
    name: str, noise: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Stripped, and split on commas for a rotation, as docs/settings.md says of the variable
    (before: a newline from a secrets file, or two secrets, raised ConfigurationError).
    Settings the example does not use (an invalid LAYERCODE_TURN_TIMEOUT or REDIS_URL in the
    environment, a garbled .env in the working directory) do not stop it: Settings() read and
    checked them all, and the import failed with a SettingsError traceback."""
    if noise:
        monkeypatch.chdir(tmp_path)
        (tmp_path / ".env").write_text("not a setting line\n")
        monkeypatch.setenv("LAYERCODE_TURN_TIMEOUT", "abc")
        monkeypatch.setenv("REDIS_URL", "http://not-redis")
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", " whsec_new , whsec_old\n")
    app = load_example(name, monkeypatch).app
    body = event_body("session.update")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for secret in ("whsec_new", "whsec_old"):
            reply = await client.post(
                "/api/agent", content=body, headers=signed_headers(body, secret)
            )
            assert (reply.status_code, reply.json()) == (200, {"status": "ok"}), (name, secret)


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
    secret = run_env(documented_commands(name)[1])["LAYERCODE_WEBHOOK_SECRET"]
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", secret)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    shop = name == "pydantic_ai_shop"
    with fake_openai() as (fake, base_url):
        monkeypatch.setenv("OPENAI_BASE_URL", base_url)
        app = load_example(name, monkeypatch).app
        with serve(app) as base:
            async with LayercodeTestClient(base_url=base, secret=secret) as client:
                start = await client.session_start()
                if shop:
                    fake.push(
                        Script(text=[], tool_call=("check_stock", '{"item": "tent"}')),
                        Script(text=["We have", " four tents."]),
                    )
                turn = await client.message("Do you have tents?")
            asked = fake.conversation(-1)[-1]
            # the docstring's simulate, as written, but for the URL (the fake's default answer)
            simulate = [*documented_commands(name)[2][1:], "--url", f"{base}/api/agent"]
            documented = await anyio.to_thread.run_sync(lambda: main(simulate, environ={}))
    assert documented == 0
    assert len(start.tts) == 1 and start.tts[0].startswith(("Welcome", "Hi!"))
    if shop:
        assert turn.tts == ["Let me check.", "We have four tents."]
        assert turn.data == [{"item": "tent", "in_stock": 4}]
    else:
        assert turn.tts == ["Hello there. ", "How can I help you today?"]
    assert asked == ("user", "Do you have tents?")


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


def test_the_docs_run_the_examples_from_where_they_install() -> None:
    """The docs install from the directory holding the clone (``./layercode-asgi``): a
    command there that runs an example names it under the clone (``python examples/x.py``
    there: "can't open file")."""
    pages = [
        EXAMPLES_DIR.parent / "README.md",
        *sorted((EXAMPLES_DIR.parent / "docs").rglob("*.md")),
    ]
    wrong = [
        f"{page.name}: {command}"
        for page in pages
        for command in re.findall(r"python3? \S*examples/\S+\.py", page.read_text())
        if not command.split()[-1].startswith("layercode-asgi/examples/")
    ]
    assert not wrong, "\n".join(wrong)
