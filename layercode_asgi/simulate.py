"""``simulate``: play a signed LayerCode conversation against a backend and check the protocol
(:func:`run_simulation`, also used by ``demo``; :func:`add_simulate_command` for the CLI)."""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, AnyStr, Final, TextIO

import anyio
import httpx
import msgspec

from ._asgi import check_headers
from .envfile import chosen_env_file, parse_env_file
from .errors import ConfigurationError, check_text
from .jsonwire import check_json_value
from .kitclient import check_url, new_client
from .protocol import json_kind
from .redaction import escape_terminal, mask_url
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

__all__ = ["SimulationReport", "add_simulate_command", "run_simulation"]

EXIT_OK: Final = 0
EXIT_VIOLATION: Final = 1
#: ``--timeout`` bounds (seconds): below, no reply can come in time; above, a day.
MIN_TIMEOUT: Final = 0.001
MAX_TIMEOUT: Final = 86400.0
DEFAULT_URL: Final = "http://127.0.0.1:8000/api/agent"
SECRET_ENV: Final = "LAYERCODE_WEBHOOK_SECRET"
#: ``--secret``'s help, for ``simulate`` and ``sign``.
SECRET_HELP: Final = (
    f"the webhook secret (default: ${SECRET_ENV}, else from $LAYERCODE_ENV_FILE or ./.env; "
    "prefer those: arguments are visible to other users in the process list)"
)
ALLOW_ERRORS_HELP: Final = (
    "exit 0 even when turns ended in response.error (for backends that use it on purpose); "
    "they are still counted"
)
_encode = msgspec.json.encode
_NO_DATA: Any = object()


class UsageError(Exception):
    """A bad command line detected after parsing; printed, exit code 2."""


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

    def __repr__(self) -> str:  # as_dict's fields: the URL's credentials masked
        return f"SimulationReport({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errored_turns": self.errored_turns,
            "url": mask_url(self.url),  # its credentials, if any, are not printed
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
        if not self.quiet:
            self.problem(text, self.out)

    def end_line(self) -> None:
        if self.mid_line:
            self.out.write("\n")
            self.out.flush()
            self.mid_line = False

    def problem(self, text: str, stream: TextIO | None = None) -> None:
        self.end_line()
        print(escape_terminal(text), file=self.err if stream is None else stream, flush=True)

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
            shown = f"  [{_shorten(kind)}]"
            if rest:
                shown += " " + _shorten(_encode(rest).decode())
            self.line(shown)


def check_sendable(secret: str, messages: Sequence[str], data: Any, *ids: str | None) -> None:
    """A ConfigurationError naming what cannot be sent: text not UTF-8 (a lone surrogate),
    an empty or blank id or message, ``data`` that is no JSON object."""
    check_text("the webhook secret", secret)
    for number, text in enumerate(messages, start=1):
        _check_given(f"message {number}", text)
    for name, value in zip(("conversation_id", "session_id"), ids, strict=True):
        _check_given(name, value)
    if data is not _NO_DATA:
        _check_data("data", data)
        try:
            check_json_value("data", data)  # not sent changed (NaN as null, a set as an array)
            _encode(data)
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise ConfigurationError(f"data cannot be sent as JSON: {exc}") from None


def _check_given(name: str, value: str | None) -> None:
    """An id or message given is sent as it is: empty or blank is a ConfigurationError."""
    check_text(name, value)
    if value is not None and not value.strip():
        raise ConfigurationError(f"{name} must not be empty or blank, got {value!r}")


def _check_data(name: str, data: Any) -> None:
    if not isinstance(data, dict):
        raise ConfigurationError(f"{name} must be a JSON object, got {json_kind(data)}")


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
    The spoken reply streams to ``out`` (control characters escaped), problems to ``err``.
    The first ProtocolViolation stops the run and is recorded (``report.ok`` false); a turn
    with a ``response.error`` counts in ``report.errored_turns`` and makes ``report.ok``
    false unless ``allow_errors`` (with ``strict`` it is a violation). What
    :func:`check_sendable` refuses is a ConfigurationError before anything is sent.
    """
    messages = tuple(messages)  # checked, then sent: an iterator is read once
    check_sendable(secret, messages, data, conversation_id, session_id)
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
        body = "(no body)" if result.empty else _shorten(_encode(result.body).decode())
        printer.line(f"  reply {result.status_code}: {body}")
        report.replies.append(
            {
                "type": event["type"],
                "status": result.status_code,
                "body": result.body,
                "total_ms": _ms(result.duration),
            }
        )
        return result

    client = new_client(transport, timeout)  # first: a ConfigurationError prints no banner
    printer.line(f"simulating a LayerCode conversation with {mask_url(url)}")
    printer.line(f"conversation {report.conversation_id}, session {report.session_id}")
    try:
        async with client:
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
        fields = ("name", "detail", "event_type", "turn_id", "status_code")
        report.violation = {name: getattr(violation, name) for name in fields}
        printer.problem(f"PROTOCOL VIOLATION: {violation.name}: {violation.detail}")
        return report
    turns = f"{len(report.turns)} turn{'s' * (len(report.turns) != 1)}"  # 1 turn, 2 turns
    counts = f"{turns} and {len(report.replies)} other events"  # (2 at least)
    errored = report.errored_turns
    if not errored:
        printer.line(f"OK: {counts}, no protocol violation")
    elif allow_errors:
        printer.line(
            f"OK: {counts}, no protocol violation; {errored} of {turns} "
            "ended in response.error (allowed by --allow-errors)"
        )
    else:
        printer.problem(
            f"FAILED: {errored} of {turns} ended in response.error "
            f"({counts}, no protocol violation; --allow-errors accepts them)"
        )
    return report


#: The most ``sign`` reads as a body and ``simulate`` as messages (bytes, or characters).
MAX_INPUT: Final = 64 * 1024 * 1024


def read_input(stream: IO[AnyStr], what: str) -> AnyStr:
    """All of ``stream`` (a file, a pipe, stdin); a UsageError past :data:`MAX_INPUT`."""
    content = stream.read(MAX_INPUT + 1)
    if len(content) > MAX_INPUT:
        raise UsageError(f"{what} is longer than {MAX_INPUT >> 20} MiB")
    return content


def _read_lines(stream: TextIO) -> list[str]:
    # Lines end at CR, LF or CRLF only (splitlines also splits at U+2028, which a message
    # may hold); a leading BOM is no text.
    text = read_input(stream, "the list of messages").removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line.strip() for line in lines if line.strip()]


def stdin_is_piped() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _simulation_messages(args: argparse.Namespace) -> list[str]:
    messages = list(args.messages)
    try:
        if args.file is not None and args.file != "-":
            with open(args.file, encoding="utf-8") as file:
                messages.extend(_read_lines(file))
        elif args.file == "-" or (not messages and stdin_is_piped()):
            messages.extend(_read_lines(sys.stdin))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read messages: {exc}") from None
    return messages


def _parse_headers(values: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, colon, content = value.partition(":")
        if not colon or not name.strip():  # the argument, maybe a credential, is not shown
            missing = "no ':' in it" if not colon else "no NAME before the ':'"
            raise UsageError(f"--header: expected NAME:VALUE, {missing}")
        name, content = name.strip(), content.strip()
        try:
            check_headers("--header", {name: content}, client=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        headers[name] = content
    return headers


def read_secret(args: argparse.Namespace, env: Mapping[str, str], command: str) -> str:
    # As serve reads it (the `serve --dev` banner's simulate line relies on it): the
    # environment, else the env file (LAYERCODE_ENV_FILE, '' for none; else ./.env).
    if args.secret is not None and not args.secret.replace(",", "").strip():
        # an unset shell variable (--secret "$S"): not replaced by another secret
        raise UsageError(f"--secret is empty (leave it out to read {SECRET_ENV})")
    configured: str = args.secret or env.get(SECRET_ENV) or ""
    if not configured and (env_file := chosen_env_file(None, env)):
        configured = parse_env_file(env_file).get(SECRET_ENV, "")
    # The rotation form 'whsec_new,whsec_old' (what serve accepts): sign with the newest.
    secret = next((part.strip() for part in configured.split(",") if part.strip()), "")
    if not secret:
        raise UsageError(
            f"{command} needs the webhook secret: --secret S (or {SECRET_ENV}, in the "
            "environment, $LAYERCODE_ENV_FILE or ./.env)"
        )
    check_text("the webhook secret", secret)  # as serve: signed bytes it would refuse
    return secret


def check_url_option(option: str, url: str) -> None:
    """A URL option (``--url``, ``sign --curl``) that is no http(s) URL is a usage error."""
    try:
        check_url(option, url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _simulate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    check_url_option("--url", args.url)
    timeout = _timeout(args.timeout)
    _check_given("--conversation-id", args.conversation_id)
    _check_given("--session-id", args.session_id)
    secret = read_secret(args, env, "simulate")
    headers = _parse_headers(args.header)
    data: Any = _NO_DATA
    if args.data is not None:
        check_text("--data", args.data)
        try:
            data = msgspec.json.decode(args.data)
        except (msgspec.DecodeError, RecursionError) as exc:  # invalid, or nested too deep
            raise UsageError(f"--data is not valid JSON: {exc}") from None
        _check_data("--data", data)
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
            timeout=timeout,
            headers=headers,
            strict=args.strict,
            allow_errors=args.allow_errors,
            quiet=args.quiet,
            out=human,
            err=sys.stderr,
        )
    )
    if args.json:
        print(_json_for_terminal(report.as_dict(), sys.stdout.encoding), flush=True)
    return EXIT_OK if report.ok else EXIT_VIOLATION


#: Characters JSON leaves raw that a terminal may act on (C0 controls are always escaped).
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NON_ASCII = re.compile("[^\x00-\x7f]")


def _json_for_terminal(value: Any, encoding: str | None = None) -> str:
    """Compact JSON with DEL, C1, U+2028/2029 and bidi controls escaped too; all non-ASCII
    escaped when ``encoding`` (stdout's) cannot hold it."""
    text = _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", _encode(value).decode())
    try:
        text.encode(encoding or "utf-8")
    except UnicodeEncodeError:
        return _NON_ASCII.sub(lambda match: json.dumps(match.group())[1:-1], text)
    return text


def ascii_int(text: str) -> int:
    """An ``argparse`` type: an integer in ASCII digits (``int()`` reads '٢' as 2, skips '+')."""
    if not re.fullmatch(r"-?[0-9]{1,20}", text):
        raise argparse.ArgumentTypeError(f"not an integer of 1-20 ASCII digits: {text[:40]!r}")
    return int(text)


def _timeout(text: str) -> float:
    """``--timeout``'s seconds in ASCII digits, in range ('nan', 'inf', 1e300 wait forever)."""
    seconds = float(text) if re.fullmatch(r"[0-9]{1,20}(\.[0-9]{1,20})?", text) else -1.0
    if not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
        raise UsageError(
            f"--timeout must be between {MIN_TIMEOUT:g} and {MAX_TIMEOUT:g} seconds in ASCII "
            f"digits (such as 30 or 0.5), got {text[:40]!r}"
        )
    return seconds


def add_simulate_command(commands: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``simulate`` to the sub-command parsers ``commands`` of the CLI."""
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
        epilog="violations:\n" + "\n".join(f"  {k:<18} {v}" for k, v in VIOLATIONS.items()),
        formatter_class=formatter,
    )
    simulate.add_argument("messages", nargs="*", metavar="MESSAGE", help="what the user says")
    simulate.add_argument(
        "--url", default=DEFAULT_URL, help="the webhook URL (default %(default)s)"
    )
    simulate.add_argument("--secret", help=SECRET_HELP)
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
        default="30",
        metavar="SECONDS",
        help=f"limit per request (default %(default)s, {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g})",
    )
    simulate.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra request header, repeatable (LayerCode's custom headers)",
    )
    for flags, text in (
        (["--strict"], "treat a response.error event as a protocol violation that stops the run"),
        (["--allow-errors"], ALLOW_ERRORS_HELP),
        (["--json"], "print a JSON summary on stdout (the running commentary goes to stderr)"),
        (["-q", "--quiet"], "print only violations and warnings"),
    ):
        simulate.add_argument(*flags, action="store_true", help=text)
    simulate.set_defaults(handler=_simulate)
