"""The command line under hostile or broken input: agents that cannot load, ports in use,
backends that error, lie or send terminal escapes, secrets in rotation, bodies that start
with '@'. The CLI runs as users run it (a subprocess) or through its ``main()``."""

from __future__ import annotations

import io
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from layercode_asgi import Settings, create_app, verify_signature
from layercode_asgi.agents import (
    AgentImportError,
    InvalidAgentError,
    agent_factory,
    get_agent,
    register_agent,
)
from layercode_asgi.cli import main, run_simulation
from layercode_asgi.errors import ConfigurationError
from layercode_asgi.testing import LayercodeTestClient

from .asgi_stub import read_body
from .conftest import ROOT, SECRET, ServerProcess, free_port, serve

PYTHON = sys.executable


def cli(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m layercode_asgi ARGV`` in ``cwd``, with a clean LayerCode environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}
    environ.update(env or {})
    return subprocess.run(
        [PYTHON, "-m", "layercode_asgi", *argv],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 2 with exactly one 'error: ' line on stderr and nothing on stdout."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


AGENT_MODULES = {
    "needs_dep": "import no_such_dependency_xyz\n\nasync def agent(event):\n    yield 'x'\n",
    "broken": "async def agent(event):\n    yield 'x'\n\ndef oops(:\n",
    "typo": "async def agnet(event):\n    yield 'x'\n",
    "raises": "raise RuntimeError('config file missing')\n",
    "three": "async def agent(event, a, b):\n    yield 'x'\n",
    "none": "async def agent():\n    yield 'x'\n",
    "sync_gen": "def agent(event):\n    yield 'x'\n",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name, source in AGENT_MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    ("agent", "shown"),
    [
        ("needs_dep:agent", "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
        ("broken:agent", "SyntaxError"),
        ("typo:agent", "typo has no attribute 'agent'"),
        ("raises:agent", "RuntimeError: config file missing"),
        ("three:agent", "agent(event) or agent(event, context)"),
        ("none:agent", "agent(event) or agent(event, context)"),
        ("sync_gen:agent", "a generator function, not an async one"),
        (":x", "invalid agent import path ':x'"),
        ("..pkg:x", "invalid agent import path '..pkg:x'"),
        ("pkg:", "invalid agent import path 'pkg:'"),
    ],
)
def test_serve_reports_why_an_agent_cannot_load(project: Path, agent: str, shown: str) -> None:
    done = cli("serve", "--dev", "--env-file", "", "--agent", agent, cwd=project)
    line = one_error_line(done)
    assert shown in line
    assert "no agent named" not in line


def test_serve_verbose_shows_the_traceback(project: Path) -> None:
    done = cli("serve", "--dev", "--env-file", "", "--agent", "needs_dep:agent", "-v", cwd=project)
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "import no_such_dependency_xyz" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: cannot import the agent")


def test_a_setting_of_5000_digits_exits_2(tmp_path: Path) -> None:
    env = {"LAYERCODE_MAX_BODY_SIZE": "9" * 5000}
    line = one_error_line(cli("serve", "--dev", "--env-file", "", cwd=tmp_path, env=env))
    assert line.startswith("error: LAYERCODE_MAX_BODY_SIZE: expected an integer")
    assert len(line) < 200


def _limit_memory() -> None:
    """In the child: at most 2 GiB of address space (an endless read fails, not the box)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _cli_in_2_gib(argv: list[str], cwd: Path, stdin: str | None = None) -> str:
    """The one error line of the CLI run with ``argv`` in at most 2 GiB, without our
    settings from the environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}
    with open(stdin or os.devnull, "rb") as source:
        done = subprocess.run(
            [PYTHON, "-m", "layercode_asgi", *argv],
            cwd=cwd,
            env=environ,
            stdin=source,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_limit_memory,
        )
    return one_error_line(done)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs /dev/zero and FIFOs")
@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_an_env_file_that_never_ends_exits_2(tmp_path: Path, kind: str) -> None:
    path = "/dev/zero"
    if kind == "fifo":  # nobody writes it: opening it to read would wait forever
        path = str(tmp_path / "fifo.env")
        os.mkfifo(path)
    line = _cli_in_2_gib(["serve", "--dev", "--env-file", path], tmp_path)
    assert line == f"error: {path}: cannot read the file: not a regular file"


@pytest.mark.parametrize("password", ["Zq8/Hk2+pW9", "Zq8#Hk2", "Zq8?Hk2"])
def test_serve_never_prints_a_redis_password(tmp_path: Path, password: str) -> None:
    env = {"REDIS_URL": f"redis://default:{password}@cache.example.com:6379/0"}
    for verbose in ((), ("-v",)):
        done = cli("serve", "--dev", "--env-file", "", *verbose, cwd=tmp_path, env=env)
        assert done.returncode == 2
        assert "Zq8" not in done.stderr + done.stdout and "Hk2" not in done.stderr
        assert "redis://default:***@cache.example.com:6379/0" in done.stderr.splitlines()[-1]


def test_port_in_use_fails_before_the_banner(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", "--dev", "--env-file", "", "--port", str(port), cwd=tmp_path)
    line = one_error_line(done)
    assert f"cannot listen on 127.0.0.1:{port}" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["list-agents"],
        ["sign", "--secret", "s", "--body", "{}"],
        ["simulate", "--url", "http://127.0.0.1:1/api/agent", "--secret", "s", "hi"],
        ["demo"],
    ],
)
def test_a_reader_that_left_is_no_traceback(tmp_path: Path, argv: list[str]) -> None:
    # `layercode-asgi list-agents | head -0`: stdout's reader is gone before the first write.
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}
    environ["PYTHONPATH"] = str(ROOT)  # this tree's package, whatever is installed
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [PYTHON, "-m", "layercode_asgi", *argv],
            cwd=tmp_path,
            env=environ,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 141  # 128 + SIGPIPE, as shells report


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize(
    ("argv", "stdin"),
    [
        (["sign", "--file", "/dev/zero"], None),
        (["sign"], "/dev/zero"),
        (["simulate", "--url", "http://127.0.0.1:1/api/agent", "--file", "/dev/zero"], None),
        (["simulate", "--url", "http://127.0.0.1:1/api/agent"], "/dev/zero"),
    ],
)
def test_an_input_that_never_ends_exits_2(
    tmp_path: Path, argv: list[str], stdin: str | None
) -> None:
    # It was read whole: a MemoryError traceback (here, in 2 GiB), or all of the machine's memory.
    line = _cli_in_2_gib([*argv, "--secret", "s"], tmp_path, stdin)
    what = "the body" if argv[0] == "sign" else "the list of messages"  # was "the messages is"
    assert line == f"error: {what} is longer than 64 MiB"


def test_serve_keeps_serving_when_its_stdout_reader_left(tmp_path: Path) -> None:
    # `layercode-asgi serve | head -0`: the banner's print failed inside uvicorn's loop,
    # which stopped the server with a traceback.
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}
    environ["PYTHONPATH"] = str(ROOT)
    port, log = free_port(), tmp_path / "server.log"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with log.open("wb") as errors:
            process = subprocess.Popen(
                [PYTHON, "-m", "layercode_asgi", "serve", "--dev", "--port", str(port)],
                cwd=tmp_path,
                env=environ,
                stdout=write_end,
                stderr=errors,
            )
    finally:
        os.close(write_end)
    with ServerProcess(process, port, log) as server:
        server.wait_ready("/health")
    assert "Traceback" not in log.read_text()


def test_serve_started_with_stdout_closed_serves(tmp_path: Path) -> None:
    # `serve >&-` (or a supervisor that closes it): sys.stdout is None. Before: "cannot
    # start: ValueError: Unable to configure formatter 'default'" (uvicorn's log config), exit 2.
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERCODE_", "LOG_"))}
    environ["PYTHONPATH"] = str(ROOT)
    port, log = free_port(), tmp_path / "server.log"
    closing = (
        "import os, sys; os.close(1); "
        "os.execv(sys.executable, [sys.executable, '-m', 'layercode_asgi', *sys.argv[1:]])"
    )
    with log.open("wb") as errors:
        process = subprocess.Popen(
            [PYTHON, "-c", closing, "serve", "--dev", "--env-file", "", "--port", str(port)],
            cwd=tmp_path,
            env=environ,
            stderr=errors,
        )
    with ServerProcess(process, port, log) as server:
        server.wait_ready("/health")
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("closed", "argv"), [(2, ["serve", "--port", "abc"]), (1, ["--version"])], ids=["2", "1"]
)
def test_a_stream_closed_at_start_gets_nothing_even_from_the_argument_parser(
    tmp_path: Path, closed: int, argv: list[str]
) -> None:
    # The null device stood in for a closed stream only after the arguments were parsed:
    # `serve --port abc 2>&-` printed its usage on stdout (argparse falls back to it), and
    # `--version >&-` printed the version on stderr.
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    closing = (
        f"import os, sys; os.close({closed}); "
        "os.execv(sys.executable, [sys.executable, '-m', 'layercode_asgi', *sys.argv[1:]])"
    )
    done = subprocess.run(
        [PYTHON, "-c", closing, *argv], cwd=tmp_path, env=environ, capture_output=True, timeout=60
    )
    assert done.returncode == (2 if closed == 2 else 0)
    assert (done.stdout, done.stderr)[2 - closed] == b"", done


def test_bad_port_number_exits_2(tmp_path: Path) -> None:
    done = cli("serve", "--dev", "--env-file", "", "--port", "70000", cwd=tmp_path)
    assert "--port must be between 0 and 65535" in one_error_line(done)


@pytest.mark.parametrize("host", ["\x1b[2J\x1b[31mred", "a\rb", "x" * 300, "127.0.0.1:80"])
def test_a_host_that_cannot_be_listened_on_exits_2_with_one_escaped_line(
    tmp_path: Path, host: str
) -> None:
    """The error names the host with its control characters escaped: an escape sequence in
    `--host` reached the terminal as is (here: clear the screen, turn it red)."""
    done = cli("serve", "--dev", "--env-file", "", "--host", host, "--port", "0", cwd=tmp_path)
    line = one_error_line(done)
    assert line.startswith("error: cannot listen on ")
    assert "\x1b" not in line and "\r" not in line


def test_get_agent_distinguishes_unknown_from_unimportable(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(project))
    with pytest.raises(AgentImportError, match="No module named 'no_such_dependency_xyz'"):
        get_agent("needs_dep:agent")
    with pytest.raises(AgentImportError, match="SyntaxError"):
        get_agent("broken:agent")
    with pytest.raises(InvalidAgentError, match=r"an agent is called as agent\(event\)"):
        get_agent("three:agent")
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    with pytest.raises(ConfigurationError, match="no_such_dependency_xyz"):
        create_app(settings, agent="needs_dep:agent")


async def async_gen_agent(event: Any) -> AsyncIterator[str]:
    yield "gen"


async def coroutine_agent(event: Any, context: Any) -> str:
    return "coro"


class CallableAgent:
    async def __call__(self, event: Any) -> str:
        return "object"


class _Replies:
    def __aiter__(self) -> Iterator[Any]:
        return self._gen().__aiter__()  # type: ignore[return-value]

    async def _gen(self) -> AsyncIterator[str]:
        yield "iterable"


def sync_returning_async_iterable(event: Any) -> _Replies:
    return _Replies()


class RepliesFor(_Replies):  # a class as agent: its instance is the async iterable
    def __init__(self, event: Any) -> None:
        self.event = event


class NotAnAgent:  # its instances are neither async iterables nor awaitables
    def __init__(self, event: Any) -> None:
        self.event = event


async def keyword_context_agent(event: Any, *, context: Any) -> AsyncIterator[str]:
    yield "kw"


async def star_args_agent(*args: Any) -> AsyncIterator[str]:
    yield "star"


def sync_generator_agent(event: Any) -> Iterator[str]:
    yield "never spoken"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("agent", "said"),
    [
        (async_gen_agent, "gen"),
        (coroutine_agent, "coro"),
        (CallableAgent(), "object"),
        (sync_returning_async_iterable, "iterable"),
        (RepliesFor, "iterable"),
        (keyword_context_agent, "kw"),
        (star_args_agent, "star"),
    ],
)
async def test_every_working_agent_form_is_still_accepted(agent: Any, said: str) -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent=agent)
    async with LayercodeTestClient(app=app, secret=SECRET) as client:
        assert (await client.message("hi")).text == said


@pytest.mark.parametrize(
    "agent",
    [
        lambda event, a, b: None,
        lambda: None,
        lambda event, *, required: None,
        sync_generator_agent,  # its generator is neither awaitable nor async-iterable
        NotAnAgent,  # was accepted: every turn failed ("the agent returned NotAnAgent …")
        CallableAgent,  # the class, not an instance
    ],
)
def test_signatures_that_cannot_be_agents_are_refused_at_start_up(agent: Any) -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    with pytest.raises(InvalidAgentError) as info:
        create_app(settings, agent=agent)
    assert "agent(event) or agent(event, context)" in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigurationError)


# -- simulate and demo: errored turns ------------------------------------------------------------


async def failing_agent(event: Any) -> AsyncIterator[str]:
    raise RuntimeError("the model is down")
    yield ""


def failing_backend() -> Any:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    return create_app(settings, agent=failing_agent)


def simulate(base: str, *extra: str, secret: str = SECRET) -> int:
    return main(["simulate", "--url", f"{base}/api/agent", "--secret", secret, *extra], environ={})


def test_simulate_counts_errored_turns_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(failing_backend()) as base:
        assert simulate(base, "hello", "again") == 1
        captured = capsys.readouterr()
        assert "3 of 3 turns ended in response.error" in captured.err
        assert "OK" not in captured.out
        assert simulate(base, "hello", "--allow-errors") == 0
        captured = capsys.readouterr()
        assert "2 of 2 turns ended in response.error" in captured.out
        assert simulate(base, "hello", "--strict") == 1
        assert "PROTOCOL VIOLATION: response-error" in capsys.readouterr().err
        assert simulate(base, "hello", "--json", "-q") == 1
        report = msgspec.json.decode(capsys.readouterr().out)
        assert report["ok"] is False and report["errored_turns"] == 2


def test_demo_exits_1_when_the_agent_fails(capsys: pytest.CaptureFixture[str]) -> None:
    echo = agent_factory("echo")
    register_agent("echo", lambda settings: failing_agent)
    try:
        assert main(["demo", "hi"], environ={}) == 1
        assert "2 of 2 turns ended in response.error" in capsys.readouterr().err
        assert main(["demo", "hi", "--allow-errors"], environ={}) == 0
    finally:
        register_agent("echo", echo)


def raw_backend(stream: list[bytes], *, status: int = 200, body: bytes = b"") -> Any:
    """A backend that answers every turn with ``stream`` (``{tid}`` replaced by its turn_id)
    and every other event with ``{}``; a non-200 ``status`` answers ``body``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = await read_body(receive)
        event = msgspec.json.decode(request)
        if status != 200:
            headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if event["type"] not in ("session.start", "message"):
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        tid = event["turn_id"].encode()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in stream:
            chunk = chunk.replace(b"{tid}", tid)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


#: What the official Node SDK sends when its handler throws: response.error, then close.
NODE_ERROR_STREAM = [
    b'data: {"type":"response.tts","content":"Hi","turn_id":"{tid}"}\n\n',
    b'data: {"type":"response.error","error":"Error: boom"}\n\n',
]


@pytest.mark.anyio
async def test_the_node_sdk_error_stream_is_an_errored_turn() -> None:
    with serve(raw_backend(NODE_ERROR_STREAM)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hi")
        assert turn.text == "Hi" and turn.errors == [
            {"type": "response.error", "error": "Error: boom"}
        ]
        strict = LayercodeTestClient(base_url=base, secret=SECRET, strict=True)
        with pytest.raises(Exception) as info:
            await strict.message("hi")
        assert getattr(info.value, "name", None) == "response-error"


def test_simulate_counts_the_node_sdk_error_stream(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(raw_backend(NODE_ERROR_STREAM)) as base:
        assert simulate(base, "hi") == 1
        err = capsys.readouterr().err
        assert "missing-end" not in err and "2 of 2 turns ended in response.error" in err
        assert simulate(base, "hi", "--allow-errors") == 0


# -- simulate: terminal escapes from the backend --------------------------------------------------

# The bidi controls reorder what a terminal shows (Trojan Source).
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
HOSTILE_TEXT = "\x1b[2J\x1b]52;c;cGF5bG9hZA==\x07\nOK: fake line\r\x9b31m\u2028\x7f" + BIDI


def _forbidden(text: str) -> list[str]:
    return [
        c
        for c in text
        if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" + BIDI
    ]


def sse(event: dict[str, Any]) -> bytes:
    """One SSE message carrying ``event`` with the turn's id (filled in by raw_backend)."""
    return b"data: " + msgspec.json.encode({**event, "turn_id": "{tid}"}) + b"\n\n"


def test_simulate_escapes_what_the_backend_says(capsys: pytest.CaptureFixture[str]) -> None:
    stream = [
        sse({"type": "response.tts", "content": HOSTILE_TEXT}),
        sse({"type": "response.data", "content": HOSTILE_TEXT}),
        sse({"type": HOSTILE_TEXT}),
        sse({"type": "response.error", "error": HOSTILE_TEXT}),
        sse({"type": "response.end"}),
    ]
    with serve(raw_backend(stream)) as base:
        simulate(base, "hi")
        captured = capsys.readouterr()
        assert _forbidden(captured.out) == [] and _forbidden(captured.err) == []
        assert "\\x1b]52;c;" in captured.out
        assert not any(line.startswith("OK: fake") for line in captured.out.splitlines())
        simulate(base, "hi", "--json", "-q")
        captured = capsys.readouterr()
        assert _forbidden(captured.out) == [] and _forbidden(captured.err) == []
        assert msgspec.json.decode(captured.out)["turns"][1]["text"] == HOSTILE_TEXT
    with serve(raw_backend([], status=500, body=HOSTILE_TEXT.encode() * 3)) as base:
        assert simulate(base, "hi") == 1
        captured = capsys.readouterr()
        assert "PROTOCOL VIOLATION: http-error" in captured.err
        assert _forbidden(captured.out) == [] and _forbidden(captured.err) == []


# -- secrets in rotation, and sign --curl ---------------------------------------------------------


def test_simulate_and_sign_use_the_newest_of_rotated_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret="whsec_new")
    with serve(create_app(settings)) as base:
        assert simulate(base, "hi", secret="whsec_new,whsec_old") == 0
        url = f"{base}/api/agent"
        environ = {"LAYERCODE_WEBHOOK_SECRET": " whsec_new , whsec_old"}
        assert main(["simulate", "--url", url, "-q", "hi"], environ=environ) == 0
    capsys.readouterr()
    assert main(["sign", "--body", "{}"], environ=environ) == 0
    header = capsys.readouterr().out.strip()
    assert verify_signature("{}", header, "whsec_new")


def recording_app(bodies: list[tuple[bytes, str]]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = dict(scope["headers"])
        bodies.append((body, headers.get(b"layercode-signature", b"").decode()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.mark.parametrize("kind", ["at-file", "quotes", "not-utf8"])
def test_sign_curl_sends_exactly_the_signed_body(tmp_path: Path, kind: str) -> None:
    local = tmp_path / "local.txt"
    local.write_text("A LOCAL FILE, NOT THE BODY")
    body = {
        "at-file": f"@{local}".encode(),
        "quotes": b'it\'s "$HOME" `id` \\ \n\t{}',
        "not-utf8": b"@\xff\xfe body",
    }[kind]
    bodies: list[tuple[bytes, str]] = []
    with serve(recording_app(bodies)) as base:
        printed = subprocess.run(
            [PYTHON, "-m", "layercode_asgi", "sign", "--secret", SECRET, "--curl", f"{base}/x"],
            input=body,
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        words = shlex.split(printed.decode("utf-8", "surrogateescape"))
        assert words[0] == "curl"
        sent = subprocess.run(printed, shell=True, capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
    assert len(bodies) == 1
    received, signature = bodies[0]
    assert received == body
    assert verify_signature(received, signature, SECRET)


def test_sign_curl_with_a_file_keeps_its_bytes(tmp_path: Path) -> None:
    source = tmp_path / "body.json"
    source.write_bytes(b'{"a": 1}\r\n{"b": 2}\n')
    bodies: list[tuple[bytes, str]] = []
    with serve(recording_app(bodies)) as base:
        printed = cli(
            "sign", "--secret", SECRET, "--file", str(source), "--curl", f"{base}/x", cwd=tmp_path
        )
        assert printed.returncode == 0
        sent = subprocess.run(printed.stdout, shell=True, capture_output=True, timeout=60)
        assert sent.returncode == 0
    assert bodies[0][0] == source.read_bytes()
    assert verify_signature(bodies[0][0], bodies[0][1], SECRET)


def test_sign_curl_refuses_a_nul_byte(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "layercode_asgi", "sign", "--secret", SECRET, "--curl", "http://x"],
        input=b"a\x00b",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2 and b"NUL" in done.stderr
    del tmp_path


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("agent", "shown"),
    [
        (lambda event: 42, "the agent returned int 42; expected"),
        (lambda event: "plain text", "the agent returned str 'plain text'; expected"),
    ],
)
async def test_an_agent_returning_no_reply_is_logged_once(
    agent: Any, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, agent=agent)
    with caplog.at_level("ERROR", logger="layercode_asgi"):
        async with LayercodeTestClient(app=app, secret=SECRET) as client:
            turn = await client.message("hi")
    assert turn.errors
    records = [r for r in caplog.records if shown in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert "async iterable" in records[0].getMessage()


@pytest.mark.anyio
async def test_simulate_counts_one_turn_in_the_singular() -> None:
    # Before: "OK: 1 turns and 2 other events", "1 of 1 turns ended in response.error".
    out = io.StringIO()
    for allow_errors in (True, False):
        await run_simulation(
            "http://testserver/api/agent",
            SECRET,
            out=out,
            err=out,
            allow_errors=allow_errors,
            transport=httpx.ASGITransport(app=failing_backend()),
        )
    assert (
        "OK: 1 turn and 2 other events, no protocol violation; 1 of 1 turn ended in "
        "response.error (allowed by --allow-errors)"
    ) in out.getvalue()
    assert "FAILED: 1 of 1 turn ended in response.error (1 turn and 2 other" in out.getvalue()
