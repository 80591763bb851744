"""The ``layercode-asgi`` command line (also ``python -m layercode_asgi``): ``serve``,
``simulate``, ``demo``, ``list-agents`` and ``sign``. ``serve`` never runs with an
unauthenticated webhook: without a secret it refuses to start, unless ``--dev`` generates one.

Exit codes: 0 success; 1 a protocol violation, or a turn that ended in ``response.error``
(``simulate``, ``demo``; ``--allow-errors`` accepts those); 2 a usage or configuration error
or any failure to start (one ``error:`` line; the traceback only with ``-v``); 130
interrupted; 141 stdout's reader left (``… | head``).
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import secrets
import shlex
import socket
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final

import anyio

from ._version import __version__
from .agents import agent_factory, list_agents
from .config import SETTINGS_FIELDS
from .demo import StartError, run_demo
from .envfile import chosen_env_file, parse_env_file
from .errors import ConfigurationError
from .redaction import escape_terminal
from .simulate import (
    ALLOW_ERRORS_HELP,
    EXIT_OK,
    SECRET_ENV,
    SECRET_HELP,
    SimulationReport,
    UsageError,
    add_simulate_command,
    ascii_int,
    check_url_option,
    read_input,
    read_secret,
    run_simulation,
    stdin_is_piped,
)

__all__ = ["SimulationReport", "main", "run_simulation"]

EXIT_USAGE: Final = 2
#: Most processes ``serve --workers`` starts.
MAX_WORKERS: Final = 64
#: ``sign --timestamp``: what a verifier accepts (unix seconds, at most 15 digits).
MAX_TIMESTAMP: Final = 10**15 - 1
#: The reader of stdout left (``… | head``): 128 + SIGPIPE, what a shell reports then.
EXIT_BROKEN_PIPE: Final = 141

_AGENT_DESCRIPTIONS: Final = {
    "echo": "greets, then repeats what it hears (deterministic, needs no key)",
    "openai": "streams OpenAI chat completions (extra [openai]; needs OPENAI_API_KEY)",
}
_NO_SECRET: Final = (
    f"no webhook secret. Set {SECRET_ENV} (in the environment or the .env file) "
    "to your agent's webhook secret from the LayerCode dashboard, or run "
    "`layercode-asgi serve --dev` to generate a temporary secret for local testing. "
    "The server never runs with an unauthenticated webhook."
)


# -- serve and demo ------------------------------------------------------------------------------


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serving needs uvicorn: pip install './layercode-asgi[server]'") from None
    return uvicorn


def _worker_environment(
    args: argparse.Namespace, env: Mapping[str, str], agent: str, generated: str | None
) -> dict[str, str]:
    """The variables a ``--workers`` process needs to build the same app from ``Settings()``."""
    dotenv = parse_env_file(args.env_file) if args.env_file else {}
    raws = {spec.env: env.get(spec.env, dotenv.get(spec.env)) for spec in SETTINGS_FIELDS}
    values = {name: raw for name, raw in raws.items() if raw is not None}
    values["LAYERCODE_AGENT"] = agent
    # The workers read the env file chosen here, and no other (not ./.env behind its back).
    values["LAYERCODE_ENV_FILE"] = args.env_file or ""
    if generated is not None:
        values[SECRET_ENV] = generated
    if args.verbose:
        values["LOG_LEVEL"] = "DEBUG"
    return values


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .lifecycle import logged_settings, start_up_log_format
    from .server import check_routes, create_app, run_server

    _uvicorn()  # a clear message now if uvicorn is missing
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}, got {args.workers}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.host.strip():  # '' would listen on every interface (0.0.0.0 and ::)
        raise UsageError("--host is empty: give an address (0.0.0.0 for every interface)")
    if args.agent is not None and not args.agent.strip():
        raise UsageError("--agent is empty: give a registered name or a module:attribute path")
    check_routes(args.agent_route, args.authorize_route, ("--agent-route", "--authorize-route"))
    routes_changed = (args.agent_route, args.authorize_route) != ("/api/agent", "/api/authorize")
    if args.workers > 1 and routes_changed:
        raise UsageError(
            "--workers > 1 serves the app built by layercode_asgi.server:app_from_env, which "
            "uses the default routes (/api/agent, /api/authorize); drop --agent-route / "
            "--authorize-route or use --workers 1"
        )
    # LOG_FORMAT of a start-up error line: the environment's, then the env file's too
    args.log_format = start_up_log_format(None, env)  # a missing env file's error too
    args.env_file = chosen_env_file(args.env_file, env)
    args.log_format = start_up_log_format(args.env_file or None, env)
    settings = logged_settings(args.env_file or None, env, verbose=args.verbose)
    generated: str | None = None
    if not settings.webhook_secrets:
        if not args.dev:
            _print_error(args, None, _NO_SECRET)
            return EXIT_USAGE
        generated = secrets.token_urlsafe(24)
        settings = settings.replace(layercode_webhook_secret=generated)
    agent = args.agent or settings.agent
    # "my_agent:agent" should import from the working directory, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Built here even for --workers, so a bad agent or setting fails before any worker starts.
    app = create_app(
        settings, agent=agent, agent_route=args.agent_route, authorize_route=args.authorize_route
    )
    # A port in use fails before the banner (uvicorn would exit after it); port 0: the banner
    # shows the free port chosen here.
    port = _check_can_listen(args.host, args.port)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)  # all: shown as loopback
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    webhook_url = base + args.agent_route
    # /metrics where create_app serves it (LAYERCODE_METRICS, prometheus-client installed)
    metrics = any(getattr(route, "path", None) == "/metrics" for route in app.routes)

    @functools.cache  # once: uvicorn calls when_started again every 30 s
    def banner() -> None:
        try:
            print(
                f"layercode-asgi {__version__}: serving agent {agent!r} (webhook {webhook_url}, "
                f"authorize {base}{args.authorize_route}, health {base}/health"
                f"{f', metrics {base}/metrics' if metrics else ''})",
                flush=True,
            )
            if args.dev:
                _print_dev_banner(webhook_url, generated, args.env_file)
        except BrokenPipeError:  # stdout's reader left (`serve | head -1`): keep serving
            _silence_stdout()

    async def when_started() -> None:  # uvicorn's first tick once it listens
        banner()

    log_level = "debug" if args.verbose else "info"
    if args.workers == 1:
        with _start_failure_exits_2():
            run_server(
                app, host=args.host, port=port, log_level=log_level, callback_notify=when_started
            )
        return EXIT_OK
    from .workers import STARTUP_FAILURE, serve_workers

    if not settings.redis_url:
        warning = (
            f"{args.workers} workers without REDIS_URL: conversation history, the "
            "conversation locks and the replay cache are per process (a conversation's "
            "turns may go to different workers); set REDIS_URL to share them"
        )
        if settings.log_format == "json":  # every line on stderr a JSON record
            logging.getLogger("layercode_asgi.cli").warning(warning)
        else:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    banner()
    environ = _worker_environment(args, env, agent, generated)
    with _start_failure_exits_2():
        status = serve_workers(
            workers=args.workers,
            host=args.host,
            port=port,
            log_level=log_level,
            environ=environ,
            metrics=settings.metrics,
            log_format=settings.log_format,
        )
        if status == STARTUP_FAILURE:
            raise SystemExit(status)
    return status  # 0 once drained; 128 + the signal when a second one stopped them at once


def _check_can_listen(host: str, port: int) -> int:
    """The port ``host:port`` binds now (port 0: the free one got), else a StartError."""
    shown = escape_terminal(host)  # --host as typed: control characters escaped
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:
        raise StartError(f"cannot listen on {shown}:{port}: {exc}") from None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StartError(f"cannot listen on {shown}:{port}: {reason}") from None
    return port


@contextmanager
def _start_failure_exits_2() -> Iterator[None]:
    """uvicorn exits with its own status when it cannot start; ours for that is 2."""
    try:
        yield
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise StartError(
                f"the server could not start (uvicorn exit status {exc.code}; see the log)"
            ) from None
        raise


def _print_dev_banner(webhook_url: str, generated: str | None, env_file: str) -> None:
    """A simulate line to paste; the secret only if generated (a configured one may be real)."""
    rule = "=" * 78
    command = "layercode-asgi simulate"
    if generated is None:
        head = f"DEV MODE: using the configured {SECRET_ENV} (not shown)."
        secret_arg = ""
        if env_file not in ("", ".env"):  # simulate reads ./.env, else the file named so
            command = f"LAYERCODE_ENV_FILE={shlex.quote(os.path.abspath(env_file))} {command}"
    else:
        head = (
            "DEV MODE: generated a temporary webhook secret (not saved; a new one each start):"
            f"\n\n    {SECRET_ENV}={generated}"
        )
        secret_arg = f"--secret {shlex.quote(generated)} "
    print(
        f"{rule}\n{head}\n\nTalk to the server from another terminal:\n\n"
        f"    {command} --url {shlex.quote(webhook_url)} {secret_arg}"
        f'"Hello"\n{rule}',
        flush=True,
    )


# -- list-agents and sign ------------------------------------------------------------------------


def _list_agents(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    names = list_agents()
    width = max((len(name) for name in names), default=0)
    for name in names:
        text = _AGENT_DESCRIPTIONS.get(name) or agent_factory(name).__doc__ or ""
        description = (text.strip().splitlines() or [""])[0]
        print(f"{name:<{width}}  {description}".rstrip() if description else name)
    return EXIT_OK


def _sign_body(args: argparse.Namespace) -> bytes:
    if args.body is not None:
        return str(args.body).encode("utf-8", "surrogateescape")
    try:
        if args.file is not None and args.file != "-":
            with open(args.file, "rb") as file:
                return read_input(file, "the body")
        if args.file is None and not stdin_is_piped():
            raise UsageError("give the body with --body TEXT, --file PATH, or on stdin")
        body: bytes = read_input(sys.stdin.buffer, "the body")
        return body
    except OSError as exc:
        raise UsageError(f"cannot read the body: {exc}") from None


def _sign(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .signature import SIGNATURE_HEADER, sign

    if args.timestamp is not None and not 0 <= args.timestamp <= MAX_TIMESTAMP:
        raise UsageError(f"--timestamp must be unix seconds between 0 and {MAX_TIMESTAMP}")
    if args.curl is not None:  # '' or '-o…' would print a command that fails or misleads curl
        check_url_option("--curl", args.curl)
    secret = read_secret(args, env, "sign")
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
            raise UsageError(
                "the body contains a NUL byte, which a shell argument cannot hold: "
                "save it to a file and use --file PATH --curl URL"
            )
        # --data-raw sends its argument as is: a body starting with '@' is not a file name.
        data_option, data = "--data-raw", body.decode("utf-8", "surrogateescape")
    command = ["curl", "-sSN", "-X", "POST", args.curl, "-H", "content-type: application/json"]
    command += ["-H", f"{SIGNATURE_HEADER}: {header}", data_option, data]
    # Bytes out: a body that is not UTF-8 is printed (shell-quoted) exactly as it was read.
    sys.stdout.flush()
    sys.stdout.buffer.write(shlex.join(command).encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------------


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
            f"from the environment and the --env-file. Without a webhook secret ({SECRET_ENV}) "
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
    serve.add_argument("--port", type=ascii_int, default=8000, help="port (default %(default)s)")
    serve.add_argument(
        "--agent-route", default="/api/agent", help="webhook path (default %(default)s)"
    )
    serve.add_argument(
        "--authorize-route", default="/api/authorize", help="authorize path (default %(default)s)"
    )
    serve.add_argument(
        "--env-file",
        metavar="PATH",
        help="settings file read after the environment (default: the one LAYERCODE_ENV_FILE "
        "names, else .env; '' for none)",
    )
    serve.add_argument(
        "--workers",
        type=ascii_int,
        default=1,
        metavar="N",
        help=f"worker processes (default 1, at most {MAX_WORKERS}; several need the default "
        "routes, and Redis (REDIS_URL) to share conversation history)",
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        help="local development: without a configured secret, generate one and print it",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    serve.set_defaults(handler=_serve)

    add_simulate_command(commands, formatter)

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
    demo.add_argument("--allow-errors", action="store_true", help=ALLOW_ERRORS_HELP)
    demo.add_argument(
        "--metrics", action="store_true", help="print each turn's figures (first tts, duration)"
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="server debug logs")
    demo.set_defaults(handler=lambda args, env: anyio.run(run_demo, args, _uvicorn()))

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
            f"example (the secret from ${SECRET_ENV} or ./.env):\n"
            '  body=\'{"type":"message","session_id":"s","conversation_id":"c",'
            '"turn_id":"t","text":"hi"}\'\n'
            "  curl -N http://127.0.0.1:8000/api/agent -H 'content-type: application/json' \\\n"
            '    -H "layercode-signature: $(layercode-asgi sign --body "$body")" '
            '\\\n    --data-binary "$body"'
        ),
        formatter_class=formatter,
    )
    sign.add_argument("--secret", help=SECRET_HELP)
    source = sign.add_mutually_exclusive_group()
    source.add_argument("--body", metavar="TEXT", help="the exact request body")
    source.add_argument("--file", metavar="PATH", help="read the body from PATH ('-' = stdin)")
    sign.add_argument(
        "--timestamp", type=ascii_int, metavar="T", help="unix seconds to sign with (default: now)"
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
    _stand_in_for_closed_streams()  # before argparse, which writes to the other one instead
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    env = os.environ if environ is None else environ
    # What stdout cannot encode (a backend's text, on Windows' cp1252) is shown escaped.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        code = handler(args, env)
        sys.stdout.flush()  # a reader that left shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (UsageError, StartError, ConfigurationError) as exc:
        _print_error(args, exc)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse-like exits of a handler
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.command not in ("serve", "demo"):
            raise
        # whatever else stops serve or demo from starting (an agent factory that raises, …)
        _print_error(args, exc, f"cannot start: {type(exc).__name__}: {exc}")
        return EXIT_USAGE


def _null_device_on(fd: int) -> None:
    """Make the descriptor ``fd`` (open or closed) the null device."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def _silence_stdout() -> None:
    """Point stdout at the null device: its reader left, and the flush at exit must not fail."""
    with suppress(OSError, ValueError):  # no file descriptor (tests), or already closed
        _null_device_on(sys.stdout.fileno())


def _stand_in_for_closed_streams() -> None:
    """A stdout or stderr started closed (``>&-``) is ``None`` to Python: the null device
    stands in on its descriptor, as with ``>/dev/null`` (and no socket takes it)."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            _null_device_on(fd)
            stream = open(fd, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - never closed
            setattr(sys, name, stream)


def _print_error(
    args: argparse.Namespace, exc: BaseException | None, text: str | None = None
) -> None:
    """``error: …`` on one line; with ``-v``, the traceback (and its causes) first. Once
    ``serve`` read ``LOG_FORMAT=json``: one JSON record (the traceback in it)."""
    line = f"error: {exc if text is None else text}"
    shown = exc if getattr(args, "verbose", False) else None
    if getattr(args, "log_format", "text") == "json":
        from .lifecycle import json_error_line

        line = json_error_line(line, shown)
    elif shown is not None:
        traceback.print_exception(shown, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)
