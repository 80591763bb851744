"""The `layercode-asgi` command line: help, serve, simulate, demo, list-agents, sign."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi import verify_signature
from layercode_asgi.cli import main, run_simulation
from layercode_asgi.server import app_from_env
from layercode_asgi.testing import VIOLATIONS, LayercodeTestClient

from .asgi_stub import read_body
from .conftest import PYTHON, SECRET, ServerProcess, serve, start_server_process

SCRIPT = Path(sys.executable).parent / "layercode-asgi"


def run(*argv: str, environ: dict[str, str] | None = None) -> int:
    return main(list(argv), environ={} if environ is None else environ)


# -- help and usage -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ([], ["serve", "simulate", "demo", "list-agents", "sign"]),
        (["serve"], ["--agent", "--host", "--port", "--agent-route", "--authorize-route",
                     "--env-file", "--workers", "--dev", "--verbose", "LAYERCODE_WEBHOOK_SECRET"]),
        (["simulate"], ["--url", "--secret", "--file", "--data", "--conversation-id",
                        "--session-id", "--timeout", "--header", "--json", "--quiet", "--strict",
                        *VIOLATIONS]),
        (["demo"], ["--verbose", "MESSAGE"]),
        (["list-agents"], ["agents"]),
        (["sign"], ["--secret", "--body", "--file", "--timestamp", "--curl"]),
    ],
)  # fmt: skip
def test_help_of_every_command(
    command: list[str], mentions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(*command, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: layercode-asgi")
    for word in mentions:
        assert word in out, word


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run() == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert run("nonsense") == 2
    assert run("serve", "--port", "eighty") == 2
    assert run("simulate", "hi") == 2
    assert "needs the webhook secret" in capsys.readouterr().err
    assert run("simulate", "--secret", "s", "--data", "{oops", "hi") == 2
    assert "--data is not valid JSON" in capsys.readouterr().err
    assert run("simulate", "--secret", "s", "--data", "[" * 100_000 + "]" * 100_000, "hi") == 2
    assert "--data is not valid JSON" in capsys.readouterr().err
    assert run("simulate", "--secret", "s", "--header", "no-colon", "hi") == 2
    assert "expected NAME:VALUE" in capsys.readouterr().err
    # Before: "Invalid port: ':1'" (httpx's word for the bracket left open).
    assert run("simulate", "--secret", "s", "--url", "http://[::1", "hi") == 2
    assert "error: --url is not a valid URL: its IPv6 address has no closing ']'" in (
        capsys.readouterr().err
    )
    assert run("simulate", "--secret", "s", "--timeout", "0", "hi") == 2
    for endless in ("inf", "-inf", "Infinity", "1e309", "nan"):  # a turn could hang forever
        assert run("simulate", "--secret", "s", f"--timeout={endless}", "hi") == 2
        assert "error: --timeout must be between 0.001 and 86400" in capsys.readouterr().err


def test_simulate_never_prints_the_password_of_its_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("simulate", "--url", "ftp://user:hunter2@h/api/agent", "--secret", "s", "hi") == 2
    assert "user:***@h" in capsys.readouterr().err
    url = "http://user:hunter2@127.0.0.1:1/api/agent?token=hunter2"  # nobody listens on port 1
    assert run("simulate", "--url", url, "--secret", "s", "hi") == 1
    assert run("simulate", "--url", url, "--secret", "s", "--json", "hi") == 1
    printed = capsys.readouterr()
    assert "hunter2" not in printed.out + printed.err
    assert "connection-error" in printed.err and "user:***@127.0.0.1:1" in printed.out
    # nor does the report's repr (what pytest shows when `assert report.ok` fails)
    report = anyio.run(functools.partial(run_simulation, url, "s", ["hi"], quiet=True))
    assert not report.ok and "hunter2" not in repr(report) + str(report)
    assert "user:***@127.0.0.1:1" in repr(report) and report.url == url


# Content-Length and Transfer-Encoding (the body's framing) were an h11 traceback once sent.
@pytest.mark.parametrize(
    "header",
    [
        "X-Tenant: é",
        "X-Tenant: a\nb",
        "X-Tenant: a\rb",
        "Bad Name: v",
        "X\x00: v",
        "Content-Length: 1",
        "transfer-encoding: chunked",
    ],
)
def test_a_header_that_cannot_be_sent_is_a_usage_error(
    header: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before anything is sent (no server at port 1): one line, exit 2, no traceback.
    url = "http://127.0.0.1:1/api/agent"
    assert run("simulate", "--url", url, "--secret", "s", "--header", header, "hi") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --header ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "header", ["Authorization Bearer s3cret", "Authorization=Bearer s3cret", ": s3cret", " :s3cret"]
)
def test_a_header_without_name_and_colon_is_not_printed_back(
    header: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "--header 'Authorization=Bearer s3cret': expected NAME:VALUE", the credential
    # quoted (a value is never quoted elsewhere: it may be one).
    url = "http://127.0.0.1:1/api/agent"
    assert run("simulate", "--url", url, "--secret", "s", "--header", header, "hi") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --header") and "expected NAME:VALUE" in err
    assert err.count("\n") == 1 and "s3cret" not in err


def test_console_script_is_installed() -> None:
    done = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert re.fullmatch(r"layercode-asgi \d+\.\d+\.\d+\S*\n", done.stdout)


# -- serve: refusals -------------------------------------------------------------------------------


def test_serve_refuses_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    assert run("serve") == 2
    err = capsys.readouterr().err
    assert "LAYERCODE_WEBHOOK_SECRET" in err and "--dev" in err
    # Blank counts as unset.
    assert run("serve", environ={"LAYERCODE_WEBHOOK_SECRET": "  "}) == 2


def test_serve_refuses_an_env_file_given_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a mistyped --env-file was skipped in silence, and the server started without
    # the settings it names (a guard key, a Redis URL) or failed on a misleading message.
    monkeypatch.chdir(tmp_path)
    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET}
    serve = ("serve", "--agent", "no_such_agent")  # the old code stopped there, not serving
    assert run(*serve, "--env-file", "prod.env", environ=environ) == 2
    assert capsys.readouterr().err == "error: --env-file prod.env: no such file\n"
    shown = "pr\\x1bod.env"  # escaped on the terminal
    assert run(*serve, "--env-file", "pr\x1bod.env", environ=environ) == 2
    assert capsys.readouterr().err == f"error: --env-file {shown}: no such file\n"
    # Before: a file LAYERCODE_ENV_FILE names was skipped in silence by serve, simulate and
    # app_from_env (then no secret: every turn 401, with no hint). ./.env stays optional.
    environ["LAYERCODE_ENV_FILE"] = "pr\x1bod.env"
    assert run(*serve, environ=environ) == 2
    assert capsys.readouterr().err == f"error: LAYERCODE_ENV_FILE={shown}: no such file\n"
    simulate = ("simulate", "--url", "http://127.0.0.1:9/api/agent", "hi")
    assert run(*simulate, environ={"LAYERCODE_ENV_FILE": "prod.env"}) == 2
    assert capsys.readouterr().err == "error: LAYERCODE_ENV_FILE=prod.env: no such file\n"
    monkeypatch.setenv("LAYERCODE_ENV_FILE", "prod.env")
    with pytest.raises(SystemExit) as exited:
        app_from_env()
    assert exited.value.code == 3
    assert capsys.readouterr().err == "error: LAYERCODE_ENV_FILE=prod.env: no such file\n"


def test_serve_configuration_errors_exit_2_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("LAYERCODE_TURN_TIMEOUT=soon\nnot a line\n")
    assert run("serve", "--dev") == 2
    err = capsys.readouterr().err
    assert err == "error: .env, line 2: expected KEY=VALUE\n"
    (tmp_path / "other.env").write_text("LAYERCODE_TURN_TIMEOUT=soon\n")
    assert run("serve", "--dev", "--env-file", "other.env") == 2
    assert "LAYERCODE_TURN_TIMEOUT: expected a number > 0" in capsys.readouterr().err
    (tmp_path / "two.env").write_text("LAYERCODE_TURN_TIMEOUT=soon\nLAYERCODE_MAX_BODY_SIZE=-1\n")
    assert run("serve", "--dev", "--env-file", "two.env") == 2
    err = capsys.readouterr().err  # one line, naming both
    assert err.startswith("error: 2 invalid settings: ") and err.count("\n") == 1, err
    assert "LAYERCODE_TURN_TIMEOUT: " in err and "; LAYERCODE_MAX_BODY_SIZE: " in err

    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET}
    assert run("serve", "--env-file", "", "--agent", "no_such_agent", environ=environ) == 2
    err = capsys.readouterr().err
    assert "no agent named 'no_such_agent'" in err and "echo" in err
    assert "Traceback" not in err

    assert run("serve", "--workers", "2", "--agent-route", "/hook", environ=environ) == 2
    assert "--workers > 1" in capsys.readouterr().err
    assert run("serve", "--workers", "0", environ=environ) == 2


def test_serve_and_app_from_env_log_their_start_up_as_the_settings_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The settings were read before setup_logging: their warning of a misspelt variable
    # came out as plain text with LOG_FORMAT=json, and whatever LOG_LEVEL said.
    monkeypatch.chdir(tmp_path)
    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET, "LAYERCODE_TURN_TIMOUT": "3"}
    serve = ("serve", "--env-file", "", "--agent", "no_such_agent")  # stops after the settings
    command = [PYTHON, "-m", "layercode_asgi", *serve]
    env = {**os.environ, **environ, "LOG_LEVEL": "ERROR"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: no agent named"), done.stderr
    # With LOG_FORMAT=json, the error line that ends a start-up is a JSON record too.
    assert run(*serve, "-v", environ={**environ, "LOG_FORMAT": "json"}) == 2
    warning, error = map(json.loads, capsys.readouterr().err.splitlines())
    assert warning["message"].startswith("LAYERCODE_TURN_TIMOUT (the environment)")
    assert error["message"].startswith("error: no agent named") and error["level"] == "ERROR"
    assert "AgentNotFoundError" in error["exception"]  # -v: the traceback, in the record
    assert run("serve", "--env-file", "", environ={"LOG_FORMAT": "json"}) == 2
    (error,) = map(json.loads, capsys.readouterr().err.splitlines())
    assert error["message"].startswith("error: no webhook secret")
    for name, value in {**environ, "LOG_FORMAT": "json", "LAYERCODE_ENV_FILE": ""}.items():
        monkeypatch.setenv(name, value)
    app_from_env()
    loggers = [json.loads(line)["logger"] for line in capsys.readouterr().err.splitlines()]
    assert loggers == ["layercode_asgi.config"]
    monkeypatch.setenv("LAYERCODE_AGENT", "no_such_agent")
    with pytest.raises(SystemExit):
        app_from_env()
    *_, error = map(json.loads, capsys.readouterr().err.splitlines())
    assert error["message"].startswith("error: no agent named")


def test_start_up_warnings_reach_a_handler_of_the_users_on_their_logger_once() -> None:
    """A handler the user set on the logger that warns (``layercode_asgi.config``) before
    ``app_from_env``. Review: it got the misspelt variable's warning twice, when it was
    logged (held back only at ``layercode_asgi``) and when it was let out."""
    import logging.handlers

    from layercode_asgi.lifecycle import logged_settings

    users = logging.handlers.BufferingHandler(capacity=100)
    source = logging.getLogger("layercode_asgi.config")
    source.addHandler(users)
    try:
        logged_settings(None, {"LAYERCODE_WEBHOOK_SECRET": SECRET, "LAYERCODE_TURN_TIMOUT": "3"})
    finally:
        source.removeHandler(users)
    assert [r.getMessage()[:21] for r in users.buffer] == ["LAYERCODE_TURN_TIMOUT"]


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["--agent-route", "/api/{x}"], "error: --agent-route '/api/{x}' cannot contain '{'"),
        (["--authorize-route", "/auth\x1b[2J"], r"error: --authorize-route '/auth\x1b[2J'"),
        (["--agent-route", "/health"], "error: --agent-route '/health' is the path of"),
        (
            ["--authorize-route", "/api/agent/"],
            "error: --authorize-route '/api/agent/' is the same",
        ),
    ],
)
def test_serve_refuses_a_bad_route_in_one_line_naming_the_option(
    argv: list[str],
    shown: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: served ('/api/{x}' answered every /api/<anything>), or an error naming
    # create_app's argument; a control character reached the terminal in the banner.
    from layercode_asgi import server

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server was started")

    monkeypatch.setattr(server, "run_server", never)
    monkeypatch.chdir(tmp_path)
    assert run("serve", "--dev", *argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(shown), captured.err
    assert captured.err.count("\n") == 1 and "\x1b" not in captured.err + captured.out
    assert captured.out == ""


def test_serve_port_0_prints_the_port_it_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The banner said http://127.0.0.1:0/api/agent, and so did the simulate line to paste.
    import anyio

    from layercode_asgi import server

    served: list[int] = []

    def fake_run_server(app: Any, *, port: int, callback_notify: Any, **options: Any) -> None:
        served.append(port)
        anyio.run(callback_notify)  # what uvicorn does once it listens

    monkeypatch.setattr(server, "run_server", fake_run_server)
    monkeypatch.chdir(tmp_path)
    assert run("serve", "--dev", "--port", "0") == 0
    out = capsys.readouterr().out
    assert served and served[0] != 0
    assert f"(webhook http://127.0.0.1:{served[0]}/api/agent," in out
    assert f"simulate --url http://127.0.0.1:{served[0]}/api/agent " in out
    assert "/metrics" not in out  # not served without LAYERCODE_METRICS
    # Before: with metrics on, the banner listed the routes but not /metrics.
    pytest.importorskip("prometheus_client")
    environ = {"LAYERCODE_METRICS": "true", "LAYERCODE_METRICS_API_KEYS": "scrape-key"}
    assert run("serve", "--dev", "--port", "0", environ=environ) == 0
    out = capsys.readouterr().out
    assert f"health http://127.0.0.1:{served[1]}/health, metrics " in out
    assert f"metrics http://127.0.0.1:{served[1]}/metrics)" in out


@pytest.mark.parametrize("route", ["/a;v=1/hook", "/hook$(id)&x='1'", "/voix/\u00e9t\u00e9"])
def test_serve_dev_simulate_line_pastes_as_is_for_any_accepted_route(
    route: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the URL was pasted unquoted: a shell ran ';' and '$(...)' in a route as
    # commands and cut the URL there.
    import anyio

    from layercode_asgi import server

    def fake_run_server(app: Any, *, port: int, callback_notify: Any, **options: Any) -> None:
        anyio.run(callback_notify)  # what uvicorn does once it listens

    monkeypatch.setattr(server, "run_server", fake_run_server)
    monkeypatch.chdir(tmp_path)
    assert run("serve", "--dev", "--port", "8123", "--agent-route", route) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "simulate --url" in x)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # ';', '&', '(' split
    lexer.whitespace_split = True
    words = list(lexer)
    assert words[:4] == ["layercode-asgi", "simulate", "--url", "http://127.0.0.1:8123" + route]
    assert len(words) == 7 and words[4] == "--secret"


def test_serve_dev_simulate_line_keeps_a_configured_secret_off_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: `--secret "$LAYERCODE_WEBHOOK_SECRET"`, which put the real secret in the
    # simulate process's arguments, readable by every user of the machine (`ps`).
    # simulate reads the variable (else ./.env) itself.
    import anyio

    from layercode_asgi import server

    def fake_run_server(app: Any, *, port: int, callback_notify: Any, **options: Any) -> None:
        anyio.run(callback_notify)  # what uvicorn does once it listens

    monkeypatch.setattr(server, "run_server", fake_run_server)
    monkeypatch.chdir(tmp_path)
    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET}
    assert run("serve", "--dev", "--port", "8123", environ=environ) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "simulate --url" in x)
    assert shlex.split(line) == [
        "layercode-asgi", "simulate", "--url", "http://127.0.0.1:8123/api/agent", "Hello"
    ]  # fmt: skip


@pytest.mark.parametrize("env_file", ["other.env", "conf/dev settings.env"])
def test_serve_dev_simulate_line_works_with_the_secret_in_another_env_file(
    env_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: the line left --secret out and simulate read only the environment and ./.env,
    # so with `serve --dev --env-file other.env` the pasted line exited 2 (no secret).
    import anyio

    from layercode_asgi import Settings, create_app, server

    def fake_run_server(app: Any, *, port: int, callback_notify: Any, **options: Any) -> None:
        anyio.run(callback_notify)  # what uvicorn does once it listens

    monkeypatch.setattr(server, "run_server", fake_run_server)
    monkeypatch.chdir(tmp_path)
    (tmp_path / env_file).parent.mkdir(exist_ok=True)
    (tmp_path / env_file).write_text(f"LAYERCODE_WEBHOOK_SECRET={SECRET}\n")
    assert run("serve", "--dev", "--port", "8123", "--env-file", env_file) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "simulate --url" in x)
    assert SECRET not in line
    words = shlex.split(line)
    environ = dict(word.split("=", 1) for word in words[: words.index("layercode-asgi")])
    argv = words[words.index("layercode-asgi") + 1 :]
    with serve(create_app(Settings(env_file=None, layercode_webhook_secret=SECRET), "echo")) as url:
        argv[argv.index("--url") + 1] = url + "/api/agent"
        assert run(*argv, environ=environ) == 0, capsys.readouterr()
        assert run("sign", "--body", "{}", environ=environ) == 0


def test_serve_without_env_file_reads_the_file_layercode_env_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: serve read ./.env though LAYERCODE_ENV_FILE named another file, which simulate
    # (and app_from_env) read: two webhook secrets, and every simulated turn a 401 (exit 1).
    from layercode_asgi import server

    codes: list[int] = []
    environ = {"LAYERCODE_ENV_FILE": "prod.env"}

    def run_server(app: Any, **options: Any) -> None:  # serves on a free port instead
        with serve(app) as url:
            codes.append(run("simulate", "--url", url + "/api/agent", "-q", "hi", environ=environ))

    monkeypatch.setattr(server, "run_server", run_server)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("LAYERCODE_WEBHOOK_SECRET=whsec_from_dot_env\n")
    (tmp_path / "prod.env").write_text(f"LAYERCODE_WEBHOOK_SECRET={SECRET}\n")
    assert run("serve", "--port", "0", environ=environ) == 0
    assert codes == [0], capsys.readouterr()
    # Empty: no file (not even ./.env); --env-file given still wins over the variable.
    assert run("serve", "--port", "0", environ={"LAYERCODE_ENV_FILE": ""}) == 2
    assert "error: no webhook secret" in capsys.readouterr().err
    assert run("serve", "--port", "0", "--env-file", ".env", environ=environ) == 0
    assert codes == [0, 1]


# -- serve: running ---------------------------------------------------------------------------------


@contextmanager
def cli_server(command: list[str], cwd: Path) -> Iterator[tuple[ServerProcess, str]]:
    """Run a `serve --dev` command until it printed its banner and answers; yield the
    server and the secret it printed. Its output is in ``cwd / "server.log"``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_LEVEL"))}
    with start_server_process(
        command, env=env, cwd=cwd, log=cwd / "server.log", ready_text="simulate --url"
    ) as server:
        match = re.search(r"LAYERCODE_WEBHOOK_SECRET=(\S+)", server.output())
        assert match, server.output()
        yield server, match.group(1)


async def talk(port: int, secret: str, text: str) -> str:
    """Hold one turn; return what the server said."""
    client = LayercodeTestClient(base_url=f"http://127.0.0.1:{port}", secret=secret, timeout=10)
    return (await client.message(text)).text


@pytest.mark.anyio
async def test_serve_dev_generates_and_prints_a_secret(tmp_path: Path) -> None:
    command = [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--port", "{port}", "-v"]
    with cli_server(command, tmp_path) as (server, secret):
        port, banner = server.port, server.output()
        assert len(secret) >= 24
        assert f"simulate --url http://127.0.0.1:{port}/api/agent --secret {secret}" in banner
        assert await talk(port, secret, "hi there") == "You said: hi there"
        # The printed secret really is the only one accepted.
        wrong = LayercodeTestClient(base_url=f"http://127.0.0.1:{port}", secret="guess")
        assert (await wrong.post({"type": "message"})).status_code == 401
    log = (tmp_path / "server.log").read_text()
    assert "webhook type=message" in log  # -v: the per-webhook log line


@pytest.mark.anyio
async def test_serve_workers_with_an_agent_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "my_agent.py").write_text(
        "async def agent(event):\n    yield f'mine: {event.text}'\n"
    )
    command = [str(SCRIPT), "serve", "--dev", "--workers", "2", "--port", "{port}",
               "--agent", "my_agent:agent"]  # fmt: skip
    with cli_server(command, tmp_path) as (server, secret):
        assert "serving agent 'my_agent:agent'" in server.output()
        assert await talk(server.port, secret, "hello") == "mine: hello"


def worker_pids(parent: int) -> list[int]:
    """The ``serve --workers`` processes of ``parent`` (not multiprocessing's resource tracker)."""
    pids = []
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except FileNotFoundError:  # it has just exited
            pass
    return pids


@pytest.mark.anyio
async def test_serve_workers_replaces_a_worker_killed_soon_after_it_started(
    tmp_path: Path,
) -> None:
    """A worker killed (SIGKILL) a moment after it started serving is replaced, as one
    killed later would be: it did not fail to start. The whole `serve` stopped (exit 2,
    "could not start") when the worker had been alive under 10 s."""
    command = [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--env-file", "",
               "--workers", "2", "--port", "{port}"]  # fmt: skip
    with cli_server(command, tmp_path) as (server, secret):
        first = worker_pids(server.process.pid)
        assert len(first) == 2, first
        os.kill(first[0], signal.SIGKILL)
        for _ in range(600):  # bounded: until a new worker took its place (or serve stopped)
            now = worker_pids(server.process.pid)
            if server.process.poll() is not None or (len(now) == 2 and first[0] not in now):
                break
            await anyio.sleep(0.05)
        assert server.process.poll() is None, server.output()
        assert "starting another" in server.output()
        assert await talk(server.port, secret, "still here") == "You said: still here"
        assert server.stop() == 0, server.output()
    assert "could not start" not in server.output()


@pytest.mark.parametrize(
    "failure",
    ["raise RuntimeError('not in a worker')", pytest.param("os._exit(1)", marks=pytest.mark.slow)],
)
def test_serve_workers_stops_when_a_worker_cannot_start(tmp_path: Path, failure: str) -> None:
    """A worker that cannot build the app (here: the agent fails to import in a worker
    only) stops `serve`: the other worker too, exit 2 with one line, no traceback. A worker
    that exits before serving without uvicorn's status 3 (os._exit, a crash) was replaced
    again and again, for ever."""
    (tmp_path / "picky.py").write_text(
        "import multiprocessing, os\n"
        "if multiprocessing.parent_process() is not None:\n"
        f"    {failure}\n"
        "async def agent(event):\n    yield 'hi'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_LEVEL"))}
    done = subprocess.run(
        [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--env-file", "", "--workers", "2",
         "--port", "0", "--agent", "picky:agent"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "could not start; stopping" in done.stderr
    assert "forwarding the signal" not in done.stderr  # no signal came from outside
    assert done.stderr.splitlines()[-1].startswith("error: the server could not start")


def in_group_catching_sigint(pid: int, group: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(re.search(r"SigCgt:\s*(\w+)", status).group(1), 16)  # type: ignore[union-attr]
        return os.getpgid(pid) == group and bool(caught & 1 << (signal.SIGINT - 1))
    except (FileNotFoundError, ProcessLookupError):  # it has just exited
        return False


@pytest.mark.slow
def test_serve_workers_ctrl_c_while_the_workers_start_is_no_traceback(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches its whole process group: a worker not yet out of it
    (still importing, before its own group) died of KeyboardInterrupt with a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_LEVEL"))}
    command = [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--env-file", "",
               "--workers", "2", "--port", "{port}"]  # fmt: skip
    log = tmp_path / "server.log"
    with start_server_process(
        command, env=env, cwd=tmp_path, log=log, wait=False, group=True
    ) as server:
        group = server.process.pid
        for _ in range(3000):  # bounded: until a worker's Python catches SIGINT, in the group
            starting = [p for p in worker_pids(group) if in_group_catching_sigint(p, group)]
            if starting or server.process.poll() is not None:
                break
            time.sleep(0.005)
        assert starting, server.output()
        os.killpg(group, signal.SIGINT)
        assert server.process.wait(30) == 0, server.output()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_workers_stopped_by_a_second_signal_exits_as_one_process_does(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """A second signal stops at once: one process exits 130 (Ctrl-C) or by the SIGTERM
    (143 in a shell). `serve --workers` exited 0, as after a complete drain."""
    import httpx

    from .conftest import event_body, signed_headers

    (tmp_path / "hang.py").write_text(
        "import anyio\nasync def agent(event):\n    yield 'hi'\n    await anyio.sleep(60)\n"
    )
    command = [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--env-file", "",
               "--workers", "2", "--port", "{port}", "--agent", "hang:agent"]  # fmt: skip
    with cli_server(command, tmp_path) as (server, secret):
        body = event_body(text="hang")
        headers = signed_headers(body, secret)
        with (
            httpx.Client(base_url=server.url, timeout=30) as client,
            client.stream("POST", "/api/agent", content=body, headers=headers) as turn,
        ):
            chunks = turn.iter_raw()
            assert b"hi" in next(chunks)  # a turn is open: the first signal drains
            server.process.send_signal(sig)
            for _ in range(200):  # bounded: until the workers drain
                try:
                    if httpx.get(server.url + "/ready").status_code == 503:
                        break
                except httpx.TransportError:
                    pass  # the idle worker stopping resets what it had accepted (CI saw it)
                time.sleep(0.05)
            server.process.send_signal(sig)
            rest = b"".join(chunks)
        assert b"server is shutting down" in rest and b"response.end" in rest
        assert server.process.wait(30) == 128 + sig, server.output()


# -- demo -------------------------------------------------------------------------------------------


def test_demo_runs_and_exits_0(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "layercode_asgi", "demo"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agent: Hello! I'm the echo agent." in done.stdout
    assert "agent: You said: Hello there!\n" in done.stdout
    assert "agent: You said: Goodbye.\n" in done.stdout
    assert '> data {"demo":true' in done.stdout
    assert "no protocol violation" in done.stdout
    assert "Traceback" not in done.stderr


def test_demo_in_process_with_own_messages(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("demo", "ping", "pong") == 0
    out = capsys.readouterr().out
    assert "agent: You said: ping\n" in out and "agent: You said: pong\n" in out
    assert out.count("first tts after") == 3


def test_demo_masks_secrets_in_uvicorns_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn's own lines under the demo go through the library's formatter, as under
    ``serve``: a request to the demo's port with a secret in its query string is logged
    with the secret masked (before, uvicorn's default formatter printed it in clear)."""
    import argparse
    from types import SimpleNamespace

    import httpx
    import uvicorn

    from layercode_asgi.demo import run_demo
    from layercode_asgi.logs import hide_in_logs

    secret = "whsec_demo_access_line_9c3d"
    hide_in_logs(secret)

    class ProbedServer(uvicorn.Server):  # one request from outside once the demo serves
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            port = sockets[0].getsockname()[1]
            async with httpx.AsyncClient(timeout=10) as client:
                await client.get(f"http://127.0.0.1:{port}/ready", params={"key": secret})

    args = argparse.Namespace(verbose=True, messages=["hi"], allow_errors=False, metrics=False)
    probed = SimpleNamespace(Server=ProbedServer, Config=uvicorn.Config)
    assert anyio.run(run_demo, args, probed) == 0
    out, err = capsys.readouterr()  # (uvicorn's access lines go to stdout)
    assert '"GET /ready?key=*** HTTP/1.1" 200' in out, out
    assert secret not in out + err


# -- list-agents and sign ---------------------------------------------------------------------------


def test_list_agents(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("list-agents") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["echo", "openai", "starter"]
    assert "repeats" in lines[0] and "OPENAI_API_KEY" in lines[1]
    assert "voice assistant on pydantic-ai" in lines[2]


def test_sign_matches_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    body = '{"type":"message"}'
    args = ("sign", "--secret", "whsec_test", "--body", body, "--timestamp", "1700000000")
    assert run(*args) == 0
    header = capsys.readouterr().out.strip()
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature(body, header, "whsec_test", now=1700000000)


def test_sign_reads_a_file_stdin_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = '{"type":"message","text":"héllo"}\n'.encode()
    path = tmp_path / "body.json"
    path.write_bytes(body)
    assert run("sign", "--secret", SECRET, "--file", str(path)) == 0
    assert verify_signature(body, capsys.readouterr().out.strip(), SECRET)

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    assert run("sign", environ={"LAYERCODE_WEBHOOK_SECRET": SECRET}) == 0
    assert verify_signature(body, capsys.readouterr().out.strip(), SECRET)

    assert run("sign", "--body", "x") == 2
    assert "needs the webhook secret" in capsys.readouterr().err


def test_sign_curl_prints_a_working_command(capsys: pytest.CaptureFixture[str]) -> None:
    body = '{"type":"session.update","session_id":"s","conversation_id":"c"}'
    url = "http://127.0.0.1:8000/api/agent"
    assert run("sign", "--secret", SECRET, "--body", body, "--curl", url) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[0] == "curl" and url in words
    assert words[words.index("--data-raw") + 1] == body
    headers = [words[i + 1] for i, word in enumerate(words) if word == "-H"]
    signature = next(h for h in headers if h.startswith("layercode-signature: "))
    assert verify_signature(body, signature.removeprefix("layercode-signature: "), SECRET)
    assert "content-type: application/json" in headers


# -- simulate: what it sends -----------------------------------------------------------------------


def recording_backend(requests: list[dict[str, Any]]) -> Any:
    """A correct backend that records each request and speaks back the custom header."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        event = msgspec.json.decode(body)
        requests.append({"headers": headers, "body": body, "event": event})
        if event["type"] in ("session.start", "message"):
            tid = event["turn_id"]
            said = f"{headers.get('x-tenant')}/{event.get('text')}"
            stream = [
                {"type": "response.tts", "content": said, "turn_id": tid},
                {"type": "response.end", "turn_id": tid},
            ]
            start = {"type": "http.response.start", "status": 200,
                     "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}  # fmt: skip
            await send(start)
            for item in stream:
                chunk = b"data: " + msgspec.json.encode(item) + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        reply = msgspec.json.encode({"seen": event["type"]})
        headers_out = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers_out})
        await send({"type": "http.response.body", "body": reply})

    return app


def test_simulate_sends_a_signed_conversation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests: list[dict[str, Any]] = []
    messages = tmp_path / "messages.txt"
    # Before: the BOM an editor may write went out as the first message's first character,
    # and U+2028 (or U+0085, a form feed) split a line into two messages.
    messages.write_text("\ufefffrom a file\r\n\n  second line\u2028\x85\x0cof it  \n")
    with serve(recording_backend(requests)) as base:
        code = run(
            "simulate", "--url", f"{base}/hook", "--secret", SECRET, "first",
            "--file", str(messages), "--data", '{"clicked":true}', "--header", "X-Tenant: acme",
            "--conversation-id", "conv-9", "--session-id", "sess-9",
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    events = [r["event"] for r in requests]
    assert [e["type"] for e in events] == [
        "session.start", "message", "message", "message", "data", "session.update", "session.end",
    ]  # fmt: skip
    said = "second line\u2028\x85\x0cof it"
    assert [e.get("text") for e in events[1:4]] == ["first", "from a file", said]
    assert events[4]["data"] == {"clicked": True}
    assert all(e["conversation_id"] == "conv-9" and e["session_id"] == "sess-9" for e in events)
    turn_ids = [e["turn_id"] for e in events[:5]]
    assert len(set(turn_ids)) == 5
    for request in requests:
        assert request["headers"]["x-tenant"] == "acme"
        assert request["headers"]["content-type"] == "application/json"
        assert verify_signature(request["body"], request["headers"]["layercode-signature"], SECRET)
    transcript = events[-1]["transcript"]
    assert [(t["role"], t["text"]) for t in transcript] == [
        ("assistant", "acme/None"),
        ("user", "first"),
        ("assistant", "acme/first"),
        ("user", "from a file"),
        ("assistant", "acme/from a file"),
        ("user", said),
        ("assistant", f"acme/{said}"),
    ]
    assert all(isinstance(t["timestamp"], int) for t in transcript)
    out = captured.out
    assert "user: first\nagent: acme/first\n" in out
    assert re.search(r"turn \S+: first tts after [\d.]+ ms, total [\d.]+ ms, 2 events", out)
    assert 'reply 200: {"seen":"session.end"}' in out


def test_simulate_reads_stdin_and_can_be_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    requests: list[dict[str, Any]] = []
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    with serve(recording_backend(requests)) as base:
        assert run("simulate", "--url", base, "--secret", SECRET, "-q") == 0
    assert [r["event"].get("text") for r in requests if r["event"]["type"] == "message"] == [
        "one",
        "two",
    ]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_simulate_json_summary(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(recording_backend([])) as base:
        assert run("simulate", "--url", base, "--secret", SECRET, "--json", "-q", "hey") == 0
    report = msgspec.json.decode(capsys.readouterr().out)
    assert report["ok"] is True and report["violation"] is None
    assert [t["text"] for t in report["turns"]] == ["None/None", "None/hey"]
    assert all(t["time_to_first_tts_ms"] <= t["total_ms"] for t in report["turns"])
    assert [r["type"] for r in report["replies"]] == ["session.update", "session.end"]


def test_integer_options_take_ascii_digits_within_bounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # int() and float() read U+0662 (ARABIC-INDIC DIGIT TWO) as 2: `--workers` took it for two.
    # Nothing capped --workers (or sign's --timestamp, whose signature no backend accepts).
    # No secret in the environment: a value that were wrongly taken still exits 2, unserved.
    for argv in (
        ["serve", "--env-file", "", "--workers", "\u0662"],
        ["serve", "--env-file", "", "--port", "\u0668\u0660\u0660\u0660"],
        ["serve", "--env-file", "", "--workers", "9" * 100_000],
        ["sign", "--secret", "s", "--body", "x", "--timestamp", "\u0661\u0667" + "\u0660" * 8],
        ["simulate", "--secret", "s", "--url", "http://127.0.0.1:1", "--timeout", "\u0663"],
        # A sign or a space int() skips: taken before, while the error says ASCII digits.
        *(["serve", "--env-file", "", "--port", port] for port in ("+80", " 80", "80\n")),
        *(
            ["simulate", "--secret", "s", "--url", "http://127.0.0.1:1", "--timeout", value, "hi"]
            for value in ("+3", " 3", "3\n", "3.", ".5", "1_0", "3e0")
        ),
    ):
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err
        assert "ASCII digits" in err and len(err) < 2000, argv
    for argv, message in (
        (["serve", "--env-file", "", "--workers", "65"], "--workers must be between 1 and 64"),
        (["serve", "--env-file", "", "--workers", "0"], "--workers must be between 1 and 64"),
        (["sign", "--secret", "s", "--body", "x", "--timestamp", "-1"], "--timestamp must be"),
        (["sign", "--secret", "s", "--body", "x", "--timestamp", "1" * 16], "--timestamp must be"),
    ):
        assert run(*argv) == 2, argv
        assert f"error: {message}" in capsys.readouterr().err, argv
    assert run("serve", "--help") == 0
    assert "at most 64" in " ".join(capsys.readouterr().out.split())


def test_app_from_env_refusing_an_invalid_setting_says_so_in_json_with_log_format_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/deploying.md: with settings it cannot start with, ``app_from_env`` prints one
    line ``error: …``, "a JSON record with LOG_FORMAT=json". Review: a setting that does
    not read (the commonest such start-up) left that line bare text."""
    monkeypatch.chdir(tmp_path)
    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET, "LAYERCODE_ENV_FILE": "", "LOG_FORMAT": "json"}
    for name, value in {**environ, "LAYERCODE_TURN_TIMEOUT": "abc"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        app_from_env()
    *_, line = capsys.readouterr().err.splitlines()
    error = json.loads(line)
    assert (
        error["message"].startswith("error: LAYERCODE_TURN_TIMEOUT") and error["level"] == "ERROR"
    )


@pytest.mark.parametrize(
    ("env_file", "says"),
    [("garbled.env", "garbled.env, line 1: expected KEY=VALUE"), ("missing.env", "no such file")],
)
def test_start_up_error_line_is_json_with_log_format_json_whatever_the_env_file(
    env_file: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/cli.md: with ``LOG_FORMAT=json`` in the environment, the ``error:`` line that
    ends a start-up is a JSON record "from the reading of the settings on, an invalid one
    included". Review: an env file that does not read (garbled, or named and missing) left
    it bare text, though the environment's ``LOG_FORMAT`` (which wins over the file's) was
    json; ``app_from_env`` and ``serve`` disagreed for a missing one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbled.env").write_text("LAYERCODE_TURN_TIMEOUT\n")
    environ = {"LAYERCODE_WEBHOOK_SECRET": SECRET, "LOG_FORMAT": "json"}
    assert run("serve", "--env-file", env_file, environ=environ) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert says in json.loads(line)["message"], line
    for name, value in {**environ, "LAYERCODE_ENV_FILE": env_file}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        app_from_env()
    *_, line = capsys.readouterr().err.splitlines()
    assert says in json.loads(line)["message"], line
