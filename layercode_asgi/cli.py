"""The ``layercode-asgi`` command line (also ``python -m layercode_asgi``).

Commands:

* ``serve``: run the ready-made backend (:func:`~layercode_asgi.server.create_app`) under
  uvicorn. Refuses to start without a webhook secret unless ``--dev`` (which generates one
  and prints it): it never serves an unauthenticated webhook.
* ``simulate``: play a signed conversation against any LayerCode-style backend, print the
  spoken reply as it streams, time each turn, and exit 1 naming the first protocol
  violation (:data:`~layercode_asgi.testing.VIOLATIONS`).
* ``demo``: serve the echo agent on a free local port and simulate a conversation with it.
* ``list-agents``: the registered agents. ``sign``: a ``layercode-signature`` header value.

Exit codes: 0 success; 1 a protocol violation, or a turn that ended in ``response.error``
(``simulate``, ``demo``; ``--allow-errors`` accepts those); 2 a usage or configuration error
or any failure to start (one ``error:`` line; the traceback only with ``-v``); 130
interrupted. :func:`main` returns the code instead of exiting, for tests.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import anyio
import httpx
import msgspec

from ._version import __version__
from .agents import AGENTS, list_agents
from .config import SETTINGS_FIELDS, Settings, parse_env_file
from .errors import ConfigurationError
from .redaction import escape_terminal
from .testing import (
    VIOLATIONS,
    JSONResult,
    ProtocolViolation,
    TurnResult,
    data_event,
    message_event,
    send_json_event,
    send_turn,
    session_end_event,
    session_start_event,
    session_update_event,
)

__all__ = ["SimulationReport", "main", "run_simulation"]

EXIT_OK: Final = 0
EXIT_VIOLATION: Final = 1
EXIT_USAGE: Final = 2

DEFAULT_URL: Final = "http://127.0.0.1:8000/api/agent"
DEMO_MESSAGES: Final = ("Hello there!", "What can you do?", "Goodbye.")
DEMO_DATA: Final = {"demo": True, "clicked": "button-1"}
#: How long ``demo`` waits for its server to start.
DEMO_START_TIMEOUT: Final = 10.0

_SECRET_ENV: Final = "LAYERCODE_WEBHOOK_SECRET"
_AGENT_DESCRIPTIONS: Final = {
    "echo": "greets, then repeats what it hears (deterministic, needs no key)",
    "openai": "streams OpenAI chat completions (extra [openai]; needs OPENAI_API_KEY)",
}
_encode = msgspec.json.encode
_NO_DATA: Any = object()


class _UsageError(Exception):
    """A bad command line detected after parsing; printed, exit code 2."""


class _StartError(Exception):
    """The server could not start (a port in use, …); printed, exit code 2."""


# -- simulate ------------------------------------------------------------------------------------


@dataclass
class SimulationReport:
    """What ``simulate`` saw: every turn and JSON reply, and the violation that stopped it."""

    url: str
    conversation_id: str
    session_id: str
    turns: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)
    violation: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    allow_errors: bool = False

    @property
    def errored_turns(self) -> int:
        """How many turns contained a ``response.error``."""
        return sum(1 for turn in self.turns if turn["errors"])

    @property
    def ok(self) -> bool:
        """No violation, and no errored turn unless errors were allowed."""
        return self.violation is None and (self.allow_errors or not self.errored_turns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errored_turns": self.errored_turns,
            "url": self.url,
            "conversation_id": self.conversation_id,
            "session_id": self.session_id,
            "turns": self.turns,
            "replies": self.replies,
            "violation": self.violation,
            "warnings": self.warnings,
        }


#: How much of a backend's event or reply ``simulate`` prints on one line.
_SHOWN = 300


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + f"… ({len(text)} characters)"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class _Printer:
    """Human output of ``simulate``: the reply as it streams, one line per turn."""

    def __init__(self, out: TextIO, err: TextIO, quiet: bool) -> None:
        self.out = out
        self.err = err
        self.quiet = quiet
        self.mid_line = False

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self.end_line()
        print(escape_terminal(text), file=self.out, flush=True)

    def end_line(self) -> None:
        if self.mid_line:
            self.out.write("\n")
            self.out.flush()
            self.mid_line = False

    def problem(self, text: str) -> None:
        self.end_line()
        print(escape_terminal(text), file=self.err, flush=True)

    def on_event(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        kind = event["type"]
        if kind == "response.tts":
            if not self.mid_line:
                self.out.write("agent: ")
                self.mid_line = True
            self.out.write(escape_terminal(event["content"]))
            self.out.flush()
        elif kind != "response.end":
            rest = {k: v for k, v in event.items() if k not in ("type", "turn_id")}
            self.line(
                f"  [{_shorten(kind)}] {_shorten(_encode(rest).decode())}"
                if rest
                else f"  [{_shorten(kind)}]"
            )


async def run_simulation(
    url: str,
    secret: str,
    messages: Sequence[str] = (),
    *,
    data: Any = _NO_DATA,
    conversation_id: str | None = None,
    session_id: str | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - per request, reported as the `timeout` violation
    headers: Mapping[str, str] | None = None,
    strict: bool = False,
    allow_errors: bool = False,
    quiet: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SimulationReport:
    """Play a signed conversation against the webhook at ``url``; never raises a violation.

    ``session.start``, one ``message`` per item of ``messages``, a ``data`` event when
    ``data`` is given, then ``session.update`` and ``session.end`` (with the transcript).
    The spoken reply is written to ``out`` as it streams; problems go to ``err``. The
    first :class:`~layercode_asgi.testing.ProtocolViolation` stops the conversation and
    is recorded in the report (``report.ok`` is then false). A turn with a
    ``response.error`` is counted in ``report.errored_turns`` and makes ``report.ok`` false
    unless ``allow_errors`` (with ``strict``, it is a violation that stops the run).
    Everything printed that came from the backend has its control characters escaped.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    printer = _Printer(out, err, quiet)
    started_at = datetime.now(UTC)
    report = SimulationReport(
        url=url,
        conversation_id=conversation_id or f"conv_sim_{secrets.token_hex(6)}",
        session_id=session_id or f"sess_sim_{secrets.token_hex(6)}",
        allow_errors=allow_errors,
    )
    ids = {"conversation_id": report.conversation_id, "session_id": report.session_id}
    transcript: list[dict[str, Any]] = []
    extra_headers = dict(headers or {})

    def now_ms() -> int:
        return int(time.time() * 1000)

    async def turn(client: httpx.AsyncClient, event: dict[str, Any]) -> TurnResult:
        result = await send_turn(
            client,
            url,
            event,
            secret,
            headers=extra_headers,
            timeout=timeout,
            strict=strict,
            on_event=printer.on_event,
        )
        printer.end_line()
        first = _ms(result.time_to_first_tts)
        total = _ms(result.duration)
        spoken = f"first tts after {first} ms" if first is not None else "nothing spoken"
        printer.line(
            f"turn {result.turn_id}: {spoken}, total {total} ms, {len(result.events)} events"
        )
        for error in result.errors:
            shown = _shorten(repr(error.get("error")))
            warning = f"turn {result.turn_id}: response.error: {shown}"
            report.warnings.append(warning)
            printer.problem(f"warning: {warning}")
        report.turns.append(
            {
                "type": event["type"],
                "turn_id": result.turn_id,
                "text": result.text,
                "errors": len(result.errors),
                "time_to_first_tts_ms": first,
                "total_ms": total,
                "events": result.events,
            }
        )
        if result.text:
            transcript.append({"role": "assistant", "text": result.text, "timestamp": now_ms()})
        return result

    async def reply(client: httpx.AsyncClient, event: dict[str, Any]) -> JSONResult:
        result = await send_json_event(
            client, url, event, secret, headers=extra_headers, timeout=timeout
        )
        printer.line(f"  reply {result.status_code}: {_shorten(_encode(result.body).decode())}")
        report.replies.append(
            {
                "type": event["type"],
                "status": result.status_code,
                "body": result.body,
                "total_ms": _ms(result.duration),
            }
        )
        return result

    printer.line(f"simulating a LayerCode conversation with {url}")
    printer.line(f"conversation {report.conversation_id}, session {report.session_id}")
    try:
        async with httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False
        ) as client:
            printer.line("> session.start")
            await turn(client, session_start_event(**ids))
            for text in messages:
                printer.line(f"user: {text}")
                transcript.append({"role": "user", "text": text, "timestamp": now_ms()})
                await turn(client, message_event(text, **ids))
            if data is not _NO_DATA:
                printer.line(f"> data {_encode(data).decode()}")
                await reply(client, data_event(data, **ids))
            printer.line("> session.update")
            await reply(client, session_update_event(**ids))
            ended_at = datetime.now(UTC)
            printer.line("> session.end")
            await reply(
                client,
                session_end_event(
                    transcript=transcript,
                    agent_id="layercode-asgi-simulate",
                    started_at=started_at.isoformat(timespec="milliseconds"),
                    ended_at=ended_at.isoformat(timespec="milliseconds"),
                    duration=int((ended_at - started_at).total_seconds() * 1000),
                    **ids,
                ),
            )
    except ProtocolViolation as violation:
        report.violation = {
            "name": violation.name,
            "detail": violation.detail,
            "event_type": violation.event_type,
            "turn_id": violation.turn_id,
            "status_code": violation.status_code,
        }
        printer.problem(f"PROTOCOL VIOLATION: {violation.name}: {violation.detail}")
        return report
    counts = f"{len(report.turns)} turns and {len(report.replies)} other events"
    errored = report.errored_turns
    if not errored:
        printer.line(f"OK: {counts}, no protocol violation")
    elif allow_errors:
        printer.line(
            f"OK: {counts}, no protocol violation; {errored} of {len(report.turns)} turns "
            "ended in response.error (allowed by --allow-errors)"
        )
    else:
        printer.problem(
            f"FAILED: {errored} of {len(report.turns)} turns ended in response.error "
            f"({counts}, no protocol violation; --allow-errors accepts them)"
        )
    return report


def _read_lines(stream: TextIO) -> list[str]:
    return [line.strip() for line in stream.read().splitlines() if line.strip()]


def _stdin_is_piped() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _simulation_messages(args: argparse.Namespace) -> list[str]:
    messages = list(args.messages)
    try:
        if args.file == "-":
            messages.extend(_read_lines(sys.stdin))
        elif args.file is not None:
            with open(args.file, encoding="utf-8") as file:
                messages.extend(_read_lines(file))
        elif not messages and _stdin_is_piped():
            messages.extend(_read_lines(sys.stdin))
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read messages: {exc}") from None
    return messages


def _parse_headers(values: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, colon, content = value.partition(":")
        if not colon or not name.strip():
            raise _UsageError(f"--header {value!r}: expected NAME:VALUE")
        headers[name.strip()] = content.strip()
    return headers


def _secret(args: argparse.Namespace, env: Mapping[str, str], command: str) -> str:
    # As serve reads it: the environment, else ./.env (where the README puts it, and what
    # the `serve --dev` banner's "$LAYERCODE_WEBHOOK_SECRET" then falls back to).
    configured: str = (
        args.secret or env.get(_SECRET_ENV) or parse_env_file(".env").get(_SECRET_ENV) or ""
    )
    # The rotation form 'whsec_new,whsec_old' (what serve accepts): sign with the newest.
    secret = next((part.strip() for part in configured.split(",") if part.strip()), "")
    if not secret:
        raise _UsageError(
            f"{command} needs the webhook secret: --secret S (or {_SECRET_ENV}, in the "
            "environment or ./.env)"
        )
    return secret


def _check_url(url: str) -> None:
    """A ``--url`` httpx cannot send to is a usage error (one line, exit 2)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise _UsageError(f"--url is not a valid URL: {escape_terminal(str(exc))}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _UsageError(f"--url must be an http(s) URL, got {escape_terminal(repr(url))}")


def _simulate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _check_url(args.url)
    secret = _secret(args, env, "simulate")
    headers = _parse_headers(args.header)
    data: Any = _NO_DATA
    if args.data is not None:
        try:
            data = msgspec.json.decode(args.data)
        except msgspec.DecodeError as exc:
            raise _UsageError(f"--data is not valid JSON: {exc}") from None
    messages = _simulation_messages(args)
    # With --json, stdout carries only the JSON summary; the human output goes to stderr.
    human = sys.stderr if args.json else sys.stdout
    report = anyio.run(
        lambda: run_simulation(
            args.url,
            secret,
            messages,
            data=data,
            conversation_id=args.conversation_id,
            session_id=args.session_id,
            timeout=args.timeout,
            headers=headers,
            strict=args.strict,
            allow_errors=args.allow_errors,
            quiet=args.quiet,
            out=human,
            err=sys.stderr,
        )
    )
    if args.json:
        print(_json_for_terminal(report.as_dict()), flush=True)
    return EXIT_OK if report.ok else EXIT_VIOLATION


#: Characters JSON leaves raw that a terminal may act on (C0 controls are always escaped).
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")


def _json_for_terminal(value: Any) -> str:
    """Compact JSON with DEL, C1 controls and U+2028/2029 escaped too (still valid JSON)."""
    text = _encode(value).decode()
    return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


# -- serve and demo ------------------------------------------------------------------------------


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise _UsageError("serving needs uvicorn: pip install 'layercode-asgi[server]'") from None
    return uvicorn


def _display_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _no_secret_message() -> str:
    return (
        f"error: no webhook secret. Set {_SECRET_ENV} (in the environment or the .env file) "
        "to your agent's webhook secret from the LayerCode dashboard, or run "
        "`layercode-asgi serve --dev` to generate a temporary secret for local testing. "
        "The server never runs with an unauthenticated webhook."
    )


def _worker_environment(
    args: argparse.Namespace, env: Mapping[str, str], agent: str, generated: str | None
) -> dict[str, str]:
    """The variables a ``--workers`` process needs to build the same app from ``Settings()``."""
    dotenv = parse_env_file(args.env_file) if args.env_file else {}
    values: dict[str, str] = {}
    for spec in SETTINGS_FIELDS:
        raw = env.get(spec.env, dotenv.get(spec.env))
        if raw is not None:
            values[spec.env] = raw
    values["LAYERCODE_AGENT"] = agent
    if generated is not None:
        values[_SECRET_ENV] = generated
    if args.verbose:
        values["LOG_LEVEL"] = "DEBUG"
    return values


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .logs import setup_logging
    from .server import create_app, run_server

    uvicorn = _uvicorn()
    if args.workers < 1:
        raise _UsageError("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        raise _UsageError(f"--port must be between 0 and 65535, got {args.port}")
    routes_changed = (args.agent_route, args.authorize_route) != ("/api/agent", "/api/authorize")
    if args.workers > 1 and routes_changed:
        raise _UsageError(
            "--workers > 1 serves the app built by layercode_asgi.server:app_from_env, which "
            "uses the default routes (/api/agent, /api/authorize); drop --agent-route / "
            "--authorize-route or use --workers 1"
        )
    settings = Settings(env_file=args.env_file or None, environ=env)
    generated: str | None = None
    if not settings.webhook_secrets:
        if not args.dev:
            print(_no_secret_message(), file=sys.stderr, flush=True)
            return EXIT_USAGE
        generated = secrets.token_urlsafe(24)
        settings = settings.replace(layercode_webhook_secret=generated)
    agent = args.agent or settings.agent
    # "my_agent:agent" should import from the working directory, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Built here even for --workers, so a bad agent or setting fails before any worker starts.
    app = create_app(
        settings,
        agent=agent,
        agent_route=args.agent_route,
        authorize_route=args.authorize_route,
    )
    setup_logging(
        verbose=args.verbose,
        level="DEBUG" if args.verbose else settings.log_level,
        logfire_token=settings.logfire_token,
    )
    # Fail on a port in use before printing that we serve (uvicorn would exit after the
    # banner); the remaining race (someone binds it in between) still fails, exit 2.
    _check_can_listen(args.host, args.port)
    base = f"http://{_display_host(args.host)}:{args.port}"
    webhook_url = base + args.agent_route
    printed = False

    def banner() -> None:
        nonlocal printed
        if printed:
            return
        printed = True
        print(
            f"layercode-asgi {__version__}: serving agent {agent!r} (webhook {webhook_url}, "
            f"authorize {base}{args.authorize_route}, health {base}/health)",
            flush=True,
        )
        if args.dev:
            _print_dev_banner(webhook_url, generated)

    async def when_started() -> None:  # uvicorn's first tick once it listens
        banner()

    log_level = "debug" if args.verbose else "info"
    if args.workers == 1:
        # Drains on SIGTERM: open turns finish (LAYERCODE_SHUTDOWN_GRACE_PERIOD), new
        # webhooks get 503 meanwhile, then a clean exit. The banner comes once it listens.
        with _start_failure_exits_2():
            run_server(
                app,
                host=args.host,
                port=args.port,
                log_level=log_level,
                callback_notify=when_started,
            )
        return EXIT_OK
    banner()
    os.environ.update(_worker_environment(args, env, agent, generated))
    with _start_failure_exits_2():
        uvicorn.run(
            "layercode_asgi.server:app_from_env",
            factory=True,
            workers=args.workers,
            host=args.host,
            port=args.port,
            log_level=log_level,
        )
    return EXIT_OK


def _check_can_listen(host: str, port: int) -> None:
    """Raise :class:`_StartError` unless ``host:port`` can be bound now (then release it)."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:
        raise _StartError(f"cannot listen on {host}:{port}: {exc}") from None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise _StartError(f"cannot listen on {host}:{port}: {reason}") from None


@contextmanager
def _start_failure_exits_2() -> Iterator[None]:
    """uvicorn exits with its own status when it cannot start; ours for that is 2."""
    try:
        yield
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise _StartError(
                f"the server could not start (uvicorn exit status {exc.code}; see the log)"
            ) from None
        raise


def _print_dev_banner(webhook_url: str, generated: str | None) -> None:
    """Print the generated secret and a ready-to-paste simulate line (a configured secret is
    never printed: it may be a production one)."""
    rule = "=" * 78
    if generated is None:
        head = f"DEV MODE: using the configured {_SECRET_ENV} (not shown)."
        secret_arg = f'"${_SECRET_ENV}"'
    else:
        head = (
            "DEV MODE: generated a temporary webhook secret (not saved; a new one each start):"
            f"\n\n    {_SECRET_ENV}={generated}"
        )
        secret_arg = shlex.quote(generated)
    print(
        f"{rule}\n{head}\n\nTalk to the server from another terminal:\n\n"
        f'    layercode-asgi simulate --url {webhook_url} --secret {secret_arg} "Hello"\n{rule}',
        flush=True,
    )


def _bind_free_port() -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on accepted sockets whose
    # listening socket says TCP; with proto 0 every keep-alive request waits ~40 ms (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _run_demo(args: argparse.Namespace, uvicorn: Any) -> int:
    from .logs import setup_logging
    from .server import create_app

    if args.verbose:
        setup_logging(verbose=True)
    secret = secrets.token_urlsafe(24)
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=secret,
        # The demo never mints LayerCode sessions: guard the route with a key nobody has.
        authorize_api_keys=secrets.token_urlsafe(24),
    )
    app = create_app(settings, agent="echo")
    sock = _bind_free_port()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="debug" if args.verbose else "warning", lifespan="on")
    )
    url = f"http://127.0.0.1:{port}/api/agent"
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            stopped.set()

    report: SimulationReport | None = None
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            try:
                with anyio.fail_after(DEMO_START_TIMEOUT):
                    while not server.started and not stopped.is_set():  # noqa: ASYNC110 - uvicorn exposes a bool
                        await anyio.sleep(0.01)
                if server.started:
                    print(
                        f"demo: the echo agent is served on {url} (temporary secret {secret})",
                        flush=True,
                    )
                    report = await run_simulation(
                        url,
                        secret,
                        args.messages or DEMO_MESSAGES,
                        data=DEMO_DATA,
                        allow_errors=args.allow_errors,
                    )
            finally:
                server.should_exit = True
    finally:
        sock.close()
    if report is None:
        raise _StartError("demo: the server did not start")
    if report.ok:
        print("demo: done. Serve your own agent with: layercode-asgi serve --help", flush=True)
        return EXIT_OK
    return EXIT_VIOLATION


def _demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    uvicorn = _uvicorn()
    result: int = anyio.run(_run_demo, args, uvicorn)
    return result


# -- list-agents and sign ------------------------------------------------------------------------


def _describe_agent(name: str) -> str:
    if name in _AGENT_DESCRIPTIONS:
        return _AGENT_DESCRIPTIONS[name]
    doc = AGENTS[name].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _list_agents(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    names = list_agents()
    width = max((len(name) for name in names), default=0)
    for name in names:
        description = _describe_agent(name)
        print(f"{name:<{width}}  {description}".rstrip() if description else name)
    return EXIT_OK


def _sign_body(args: argparse.Namespace) -> bytes:
    if args.body is not None:
        return str(args.body).encode("utf-8", "surrogateescape")
    try:
        if args.file is not None and args.file != "-":
            with open(args.file, "rb") as file:
                return file.read()
        if args.file is None and not _stdin_is_piped():
            raise _UsageError("give the body with --body TEXT, --file PATH, or on stdin")
        return sys.stdin.buffer.read()
    except OSError as exc:
        raise _UsageError(f"cannot read the body: {exc}") from None


def _sign(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .signature import SIGNATURE_HEADER, sign

    secret = _secret(args, env, "sign")
    body = _sign_body(args)
    header = sign(body, secret, args.timestamp)
    if args.curl is None:
        print(header)
        return EXIT_OK
    if args.file is not None and args.file != "-":
        # curl reads the file itself, byte for byte (--data-binary does not strip newlines).
        data_option, data = "--data-binary", "@" + args.file
    else:
        if b"\0" in body:
            raise _UsageError(
                "the body contains a NUL byte, which a shell argument cannot hold: "
                "save it to a file and use --file PATH --curl URL"
            )
        # --data-raw sends its argument as is: a body starting with '@' is not a file name.
        data_option, data = "--data-raw", body.decode("utf-8", "surrogateescape")
    command = [
        "curl",
        "-sSN",
        "-X",
        "POST",
        args.curl,
        "-H",
        "content-type: application/json",
        "-H",
        f"{SIGNATURE_HEADER}: {header}",
        data_option,
        data,
    ]
    # Bytes out: a body that is not UTF-8 is printed (shell-quoted) exactly as it was read.
    sys.stdout.flush()
    sys.stdout.buffer.write(shlex.join(command).encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------------

_ALLOW_ERRORS_HELP = (
    "exit 0 even when turns ended in response.error (for backends that use it on purpose); "
    "they are still counted"
)
_VIOLATION_HELP = "\n".join(f"  {name:<18} {meaning}" for name, meaning in VIOLATIONS.items())


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``layercode-asgi`` (every command has ``--help``)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="layercode-asgi",
        description="Serve, test and sign LayerCode voice-agent webhooks.",
        epilog=(
            "examples:\n"
            "  layercode-asgi demo\n"
            "  layercode-asgi serve --dev\n"
            "  layercode-asgi serve --agent my_agent:agent --port 8000\n"
            "  layercode-asgi simulate --url http://127.0.0.1:8000/api/agent "
            "--secret S 'Hello'\n"
            '  layercode-asgi sign --secret S --body \'{"type":"message"}\''
        ),
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the LayerCode backend under uvicorn",
        description=(
            "Run the ready-made LayerCode backend (create_app) under uvicorn. Settings come "
            f"from the environment and the --env-file. Without a webhook secret ({_SECRET_ENV}) "
            "it refuses to start, unless --dev, which generates and prints a temporary one."
        ),
        formatter_class=formatter,
    )
    serve.add_argument(
        "--agent",
        metavar="NAME",
        help="a registered agent (see list-agents) or a module:attribute import path "
        "(default: LAYERCODE_AGENT, else echo)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default %(default)s)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    serve.add_argument(
        "--agent-route", default="/api/agent", help="webhook path (default %(default)s)"
    )
    serve.add_argument(
        "--authorize-route",
        default="/api/authorize",
        help="authorize path (default %(default)s)",
    )
    serve.add_argument(
        "--env-file",
        default=".env",
        metavar="PATH",
        help="settings file read after the environment (default %(default)s; '' for none)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes (default 1; several need the default routes, and Redis "
        "(REDIS_URL) to share conversation history)",
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        help="local development: without a configured secret, generate one and print it",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    serve.set_defaults(handler=_serve)

    simulate = commands.add_parser(
        "simulate",
        help="play a signed conversation against a backend and check the protocol",
        description=(
            "Play a signed LayerCode conversation against any LayerCode-style backend: "
            "session.start, one message per MESSAGE (or per line of --file, or of stdin when "
            "it is piped), an optional data event, then session.update and session.end. The "
            "spoken reply is printed as it streams, with the time to the first response.tts "
            "and the total per turn. Exit status: 0 when the backend followed the protocol, "
            "1 on the first violation (printed as 'PROTOCOL VIOLATION: <name>: <detail>') or "
            "when any turn ended in response.error (counted: 'N of M turns ended in "
            "response.error'; --allow-errors exits 0), 2 on a usage error."
        ),
        epilog="violations:\n" + _VIOLATION_HELP,
        formatter_class=formatter,
    )
    simulate.add_argument("messages", nargs="*", metavar="MESSAGE", help="what the user says")
    simulate.add_argument(
        "--url", default=DEFAULT_URL, help="the webhook URL (default %(default)s)"
    )
    simulate.add_argument(
        "--secret", help=f"the webhook secret (default: ${_SECRET_ENV}, else from ./.env)"
    )
    simulate.add_argument(
        "--file", metavar="PATH", help="read messages from PATH, one per line ('-' = stdin)"
    )
    simulate.add_argument(
        "--data", metavar="JSON", help="send a data event with this JSON after the messages"
    )
    simulate.add_argument("--conversation-id", help="conversation_id (default: random)")
    simulate.add_argument("--session-id", help="session_id (default: random)")
    simulate.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="limit per request (default %(default)s)",
    )
    simulate.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra request header, repeatable (LayerCode's custom headers)",
    )
    simulate.add_argument(
        "--strict",
        action="store_true",
        help="treat a response.error event as a protocol violation that stops the run",
    )
    simulate.add_argument("--allow-errors", action="store_true", help=_ALLOW_ERRORS_HELP)
    simulate.add_argument(
        "--json",
        action="store_true",
        help="print a JSON summary on stdout (the running commentary goes to stderr)",
    )
    simulate.add_argument(
        "-q", "--quiet", action="store_true", help="print only violations and warnings"
    )
    simulate.set_defaults(handler=_simulate)

    demo = commands.add_parser(
        "demo",
        help="serve the echo agent on a free local port and simulate a conversation",
        description=(
            "Start the echo agent in-process on 127.0.0.1 (a free port, a temporary secret), "
            "run simulate against it with a few messages and a data event, and stop. "
            "Exit status 0 when the conversation followed the protocol with no errored turn, "
            "1 otherwise, 2 when the server could not start."
        ),
    )
    demo.add_argument(
        "messages", nargs="*", metavar="MESSAGE", help="what the user says (default: 3 lines)"
    )
    demo.add_argument("--allow-errors", action="store_true", help=_ALLOW_ERRORS_HELP)
    demo.add_argument("-v", "--verbose", action="store_true", help="server debug logs")
    demo.set_defaults(handler=_demo)

    agents = commands.add_parser(
        "list-agents",
        help="list the registered agents",
        description="List the agents `serve --agent NAME` knows, one per line.",
    )
    agents.set_defaults(handler=_list_agents)

    sign = commands.add_parser(
        "sign",
        help="print a layercode-signature header for a body",
        description=(
            "Print the layercode-signature header value (t=...,v1=...) for a request body "
            "given with --body, --file or on stdin, e.g. for curl. --curl URL prints a whole "
            "curl command instead."
        ),
        epilog=(
            "example:\n"
            '  body=\'{"type":"message","session_id":"s","conversation_id":"c",'
            '"turn_id":"t","text":"hi"}\'\n'
            "  curl -N http://127.0.0.1:8000/api/agent -H 'content-type: application/json' \\\n"
            '    -H "layercode-signature: $(layercode-asgi sign --secret S --body "$body")" '
            '\\\n    --data-binary "$body"'
        ),
        formatter_class=formatter,
    )
    sign.add_argument(
        "--secret", help=f"the webhook secret (default: ${_SECRET_ENV}, else from ./.env)"
    )
    source = sign.add_mutually_exclusive_group()
    source.add_argument("--body", metavar="TEXT", help="the exact request body")
    source.add_argument("--file", metavar="PATH", help="read the body from PATH ('-' = stdin)")
    sign.add_argument(
        "--timestamp", type=int, metavar="T", help="unix seconds to sign with (default: now)"
    )
    sign.add_argument("--curl", metavar="URL", help="print a complete curl command for URL")
    sign.set_defaults(handler=_sign)
    return parser


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    ``environ`` replaces ``os.environ`` for reading settings and secrets (tests).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    env = os.environ if environ is None else environ
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        return handler(args, env)
    except (_UsageError, _StartError, ConfigurationError) as exc:
        _print_error(args, exc)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse-like exits of a handler
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.command not in ("serve", "demo"):
            raise
        # Whatever else stops serve or demo from starting (an agent factory that raises, …):
        # one line, or the traceback with -v.
        _print_error(args, exc, f"cannot start: {type(exc).__name__}: {exc}")
        return EXIT_USAGE


def _print_error(args: argparse.Namespace, exc: BaseException, text: str | None = None) -> None:
    """``error: …`` on one line; with ``-v``, the traceback (and its causes) first."""
    if getattr(args, "verbose", False):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {exc if text is None else text}", file=sys.stderr, flush=True)
