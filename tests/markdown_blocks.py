"""Run every code block of a Markdown file as a reader would, top to bottom.

Used by tests/test_readme.py for README.md, and meant for any other Markdown file (the
docs): ``report = run_markdown_file(path, workdir)``.

What runs, and how
------------------
* Fenced blocks only (an indented code block is reported as an error: fence it).
* A block may be exempted by a visible line of text right before it (blank lines
  between are fine)::

      *Not run by the tests: needs a public tunnel.*

  The reason is required; the report counts and lists the exemptions.
* ``python`` blocks run in order, in-process, each as a fresh module, in ``workdir`` (the
  current directory and first entry of ``sys.path``), with the environment the earlier
  shell blocks exported. A block whose first line is a comment naming a file
  (``# my_agent.py``) is also written there under that name, so later blocks (and shell
  commands) can import or run it; a ``test_*.py`` file is run with pytest instead. A
  block that defines an ASGI ``app`` is served on a real uvicorn on 127.0.0.1 and holds a
  signed conversation (``session.start``, a ``message``, ``data``, ``session.update``,
  ``session.end``) through :class:`layercode_asgi.testing.LayercodeTestClient`, then is
  stopped. Its secret is the block's ``whsec_...`` literal, else ``$LAYERCODE_WEBHOOK_SECRET``.
* ``bash``/``sh``/``shell`` blocks run line by line (``\\`` continuations joined) with
  bash, in ``workdir``, which also links the repository's ``examples``, ``scripts`` and
  ``benchmarks`` and the checkout itself as ``layercode-asgi``. ``PATH`` starts with the
  test interpreter's directory (``python``, ``layercode-asgi``). Assignments and
  ``export`` lines carry over to the following lines and blocks. A server command
  (``layercode-asgi serve``, ``python layercode-asgi/examples/...``, ``uvicorn``...) is
  started in the background; the runner waits until its port (``--port N``,
  ``--bind HOST:N``, ``PORT=N``, else 8000; a port the command names is served on a free one, and
  every later command naming it is pointed there, since CI runs sessions side by side)
  accepts connections, holds the same signed
  conversation with it once the block is done, and stops it when the file is done (later
  blocks may talk to it, as a reader's terminal would). ``pip install`` lines run as
  ``pip install --dry-run --no-deps``: checked against the local checkout, nothing installed. Every command is bounded in time.
* ``json`` blocks must parse. Any other language needs an exemption.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .conftest import ServerProcess, free_port, serve, start_server_process

ROOT = Path(__file__).resolve().parent.parent
EXEMPT = re.compile(r"\A\*Not run by the tests: (?P<reason>.+?)\.?\*\Z")
FENCE = re.compile(r"\A(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
NAMED_FILE = re.compile(r"\A#\s*(?P<name>[\w./-]+\.py)\b")
SECRET_LITERAL = re.compile(r"whsec_[^\s\"']*")
SERVER = re.compile(
    r"\A(\w+=\S*\s+)*(layercode-asgi serve|python3? (layercode-asgi/)?examples/\S+\.py"
    r"|uvicorn |hypercorn |granian )"
)
ASSIGNMENT = re.compile(r"\A[A-Za-z_]\w*=", re.DOTALL)
#: Where a command names a server's port: each documented port is served on a free one.
PORT_WORDS = re.compile(r"(--port[ =]|--bind[ =]\S*:|\bPORT=|//(?:127\.0\.0\.1|localhost):)(\d+)\b")
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LINKED = ("examples", "scripts", "benchmarks")
COMMAND_TIMEOUT = 180.0
SERVER_START_TIMEOUT = 30.0


@dataclass
class Block:
    """One fenced code block."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    exempt: str | None = None  # the reason, when the block is marked as not run

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass
class Report:
    """What happened to the blocks of one file."""

    ran: list[Block] = field(default_factory=list)
    exempt: list[Block] = field(default_factory=list)
    #: standard output of each shell command, by the block's line
    outputs: dict[int, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{len(self.ran)} code blocks run, {len(self.exempt)} exempt"]
        lines += [f"  exempt {block.where} ({block.lang}): {block.exempt}" for block in self.exempt]
        return "\n".join(lines)


class BlockFailed(AssertionError):
    """A block did not run as written; the message says which and why."""


def parse_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, with their exemption markers.

    Raises :class:`BlockFailed` for an indented code block or an unclosed fence.
    """
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            _refuse_indented_code(path, lines, index)
            index += 1
            continue
        fence, start = match["fence"], index
        index += 1
        body: list[str] = []
        while index < len(lines) and not lines[index].startswith(fence):
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise BlockFailed(f"{path.name}:{start + 1}: unclosed code fence")
        index += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = EXEMPT.match(previous.strip())
        blocks.append(
            Block(
                path,
                start + 1,
                match["lang"].lower(),
                "\n".join(body) + "\n",
                marker["reason"] if marker else None,
            )
        )
    return blocks


def _refuse_indented_code(path: Path, lines: list[str], index: int) -> None:
    """An indented code block: four spaces after a blank line, not inside a list."""
    line = lines[index]
    if not line.startswith("    ") or not line.strip() or index < 2 or lines[index - 1].strip():
        return
    before = next((x for x in reversed(lines[: index - 1]) if x.strip()), "")
    if before.startswith((" ", "*", "-", "+", "|", ">")) or re.match(r"\d+\.", before):
        return
    raise BlockFailed(
        f"{path.name}:{index + 1}: an indented code block; fence it (```bash ...) "
        "so that it is run by the tests, or mark it as not run"
    )


# -- the runner ---------------------------------------------------------------------------------


def run_markdown_file(path: Path, workdir: Path) -> Report:
    """Run every block of ``path`` (see the module docstring); raise :class:`BlockFailed`."""
    runner = _Runner(path, workdir)
    try:
        return runner.run()
    finally:
        runner.close()


class _Runner:
    def __init__(self, path: Path, workdir: Path) -> None:
        self.path = path
        self.workdir = workdir
        self.report = Report()
        self.env: dict[str, str] = {}  # carried assignments / exports
        self.servers: list[ServerProcess] = []
        self.ports: dict[str, str] = {}  # a documented port: the free one that serves it
        self.named_modules: list[str] = []
        workdir.mkdir(parents=True, exist_ok=True)
        for name in LINKED:
            if (ROOT / name).exists() and not (workdir / name).exists():
                (workdir / name).symlink_to(ROOT / name)
        if not (workdir / "layercode-asgi").exists():
            (workdir / "layercode-asgi").symlink_to(ROOT)

    def run(self) -> Report:
        for block in parse_blocks(self.path):
            if block.exempt:
                self.report.exempt.append(block)
                continue
            if block.lang in PYTHON_LANGS:
                self._python(block)
            elif block.lang in SHELL_LANGS:
                self._shell(block)
            elif block.lang == "json":
                try:
                    json.loads(block.code)
                except ValueError as exc:
                    raise BlockFailed(f"{block.where}: invalid JSON ({exc})") from exc
            else:
                raise BlockFailed(
                    f"{block.where}: cannot run a {block.lang or 'plain'!r} block; mark it with "
                    "a line '*Not run by the tests: <reason>.*' right before it"
                )
            self.report.ran.append(block)
        return self.report

    def close(self) -> None:
        for server in self.servers:
            server.stop(timeout=15)
        for name in self.named_modules:
            sys.modules.pop(name, None)

    # -- environment ------------------------------------------------------------------------

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.env)
        env.update(extra or {})
        return env

    @contextlib.contextmanager
    def in_process(self) -> Iterator[None]:
        """``workdir`` as the current directory and on ``sys.path``, carried variables set."""
        saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        sys.path.insert(0, str(self.workdir))
        try:
            with contextlib.chdir(self.workdir):
                yield
        finally:
            sys.path.remove(str(self.workdir))
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def secret_for(self, text: str, extra: dict[str, str] | None = None) -> str:
        literal = SECRET_LITERAL.search(text)
        if literal:
            return literal.group()
        secret = {**self.env, **(extra or {})}.get("LAYERCODE_WEBHOOK_SECRET")
        if not secret:
            raise BlockFailed(f"{self.path.name}: no webhook secret to sign with for: {text!r}")
        return secret

    # -- python -------------------------------------------------------------------------------

    def _python(self, block: Block) -> None:
        named = NAMED_FILE.match(block.code)
        if named:
            target = self.workdir / named["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code)
            if target.name.startswith("test_"):
                self._pytest(block, target)
                return
            self.named_modules.append(target.stem)
            sys.modules.pop(target.stem, None)
        module = types.ModuleType(f"markdown_block_{block.line}")
        module.__file__ = str(self.workdir / f"block_{block.line}.py")
        sys.modules[module.__name__] = module  # e.g. Litestar resolves annotations through it
        try:
            with self.in_process():
                try:
                    exec(compile(block.code, block.where, "exec"), module.__dict__)
                except (Exception, SystemExit) as exc:
                    raise BlockFailed(f"{block.where}: {type(exc).__name__}: {exc}") from exc
                app = module.__dict__.get("app")
                if app is not None:
                    self._serve_in_process(block, app)
        finally:
            del sys.modules[module.__name__]

    def _serve_in_process(self, block: Block, app: Any) -> None:
        secret = self.secret_for(block.code)
        with serve(app) as url:
            _conversation(block, url, secret)

    def _pytest(self, block: Block, target: Path) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target.name],
            cwd=self.workdir,
            env=self.process_env(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if done.returncode != 0 or " passed" not in done.stdout:
            raise BlockFailed(f"{block.where}: pytest {target.name} failed:\n{done.stdout[-3000:]}")

    # -- shell --------------------------------------------------------------------------------

    def _shell(self, block: Block) -> None:
        started: list[tuple[int, str, dict[str, str]]] = []
        for command in _logical_lines(block.code):
            assignment = _assignment(command)
            if assignment is not None:
                self.env[assignment[0]] = assignment[1]
                continue
            if SERVER.match(command):
                for documented in PORT_WORDS.finditer(command):
                    self.ports.setdefault(documented[2], str(free_port()))
            command = PORT_WORDS.sub(lambda m: m[1] + self.ports.get(m[2], m[2]), command)
            if SERVER.match(command):
                port, inline = self._start_server(block, command)
                started.append((port, command, inline))
                continue
            if re.match(r"\A(python3? -m )?pip install ", command):
                command = command.replace("pip install ", "pip install --dry-run --no-deps ", 1)
                if command.startswith("pip "):
                    command = f"{shlex.quote(sys.executable)} -m {command}"
            self._command(block, command)
        for port, command, inline in started:
            _conversation(block, f"http://127.0.0.1:{port}", self.secret_for(command, inline))

    def _command(self, block: Block, command: str) -> None:
        try:
            done = subprocess.run(
                ["bash", "-c", f"set -euo pipefail\n{command}"],
                cwd=self.workdir,
                env=self.process_env(),
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise BlockFailed(f"{block.where}: `{command}` took over {exc.timeout} s") from exc
        if done.returncode != 0:
            raise BlockFailed(
                f"{block.where}: `{command}` exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        self.report.outputs.setdefault(block.line, []).append(done.stdout)

    def _start_server(self, block: Block, command: str) -> tuple[int, dict[str, str]]:
        inline: dict[str, str] = {}
        for word in shlex.split(command, comments=True):
            if not ASSIGNMENT.match(word):
                break
            name, _, value = word.partition("=")
            inline[name] = value
        port_flag = re.search(r"--port[ =](\d+)|--bind[ =]\S*:(\d+)", command)
        port = int(port_flag[1] or port_flag[2] if port_flag else inline.get("PORT", "8000"))
        if _answers(port):
            raise BlockFailed(f"{block.where}: port {port} is already in use: `{command}`")
        server = start_server_process(
            ["bash", "-c", command],
            env=self.process_env(),
            cwd=self.workdir,
            log=self.workdir / f"server-{block.line}-{port}.log",
            port=port,
            wait=False,
            group=True,  # its own process group: stopped as a whole
        )
        self.servers.append(server)
        try:
            server.wait_ready(ready_path=None, timeout=SERVER_START_TIMEOUT)
        except RuntimeError:
            raise BlockFailed(
                f"{block.where}: `{command}` did not start serving on port {port}:\n"
                + server.output()[-3000:]
            ) from None
        return port, inline


def _logical_lines(code: str) -> Iterator[str]:
    """Commands of a shell block: ``\\`` continuations joined; comments and blanks dropped."""
    pending = ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            yield command


def _assignment(command: str) -> tuple[str, str] | None:
    """``NAME=value`` or ``export NAME=value`` (quotes and a trailing comment allowed)."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["export"]:
        words = words[1:]
    if len(words) != 1 or not ASSIGNMENT.match(words[0]):
        return None
    name, _, value = words[0].partition("=")
    return name, value


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _conversation(block: Block, base_url: str, secret: str) -> None:
    """A signed conversation of every event type, checked like ``layercode-asgi simulate``."""
    import httpx

    from layercode_asgi.testing import (
        LayercodeTestClient,
        ProtocolViolation,
        encode_event,
        message_event,
        signed_headers,
    )

    async def talk() -> None:
        async with LayercodeTestClient(base_url=base_url, secret=secret, timeout=30) as client:
            turns = [await client.session_start(), await client.message("Hello")]
            for turn in turns:
                assert not turn.errors, turn.errors
            assert turns[1].text, "no reply to a message"
            await client.data({"clicked": True})
            await client.session_update()
            await client.session_end(transcript=[("user", "Hello"), ("assistant", turns[1].text)])
            # the webhook is behind the signature check, and no spelling of its path redirects
            # (Starlette's 307 to an http:// URL would re-send the signed body in clear text)
            unsigned = await client.post(message_event("Hello"), signed=False)
            assert unsigned.status_code == 401, unsigned
            assert unsigned.json() == {"error": "missing signature header"}, unsigned.text
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
                body = encode_event(message_event("Hello"))
                reply = await http.post(
                    "/api/agent/", content=body, headers=signed_headers(body, secret)
                )
            assert reply.status_code in (200, 404), f"signed POST /api/agent/: {reply}"
            malformed = await client.post(b'{"type":"message"')  # signed, but not an event
            assert malformed.status_code == 400 and "error" in malformed.json(), malformed.text

    try:
        anyio.run(talk)  # every request is bounded by the client's timeout
    except (ProtocolViolation, AssertionError) as exc:
        raise BlockFailed(f"{block.where}: the served app failed a conversation: {exc!r}") from exc
