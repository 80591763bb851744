"""The command line's edges: empty, blank and out-of-range options, and replies `simulate`
must accept (a 204 to an event that is not a turn)."""

from __future__ import annotations

import re
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi.cli import main
from layercode_asgi.errors import ConfigurationError
from layercode_asgi.simulate import run_simulation

from .asgi_stub import read_body
from .conftest import SECRET, serve

#: Nobody listens on port 1: an option wrongly taken would show as a connection-error (exit 1).
NOWHERE = "http://127.0.0.1:1/api/agent"


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], names: str) -> None:
    """``argv`` exits 2 with one ``error:`` line naming the option ``names``, nothing on stdout."""
    assert main(argv, environ={}) == 2, argv
    captured = capsys.readouterr()
    assert captured.out == "", argv
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"error: {names} "), captured.err


@pytest.mark.parametrize(
    "url",
    ["", " ", "\t", "http://127.0.0.1/a\nb", "-o/tmp/owned", "localhost:8000/api/agent",
     "http://a b/api/agent", "http://a%20b/", "https://a<b>:8000/", "http://a^b/", "http://a|b/",
     "http://u@a%25b/"],
)  # fmt: skip
def test_sign_curl_refuses_a_url_it_cannot_print_a_command_for(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: `sign --curl ''` printed `curl -sSN -X POST '' …` (and `-o/tmp/owned` became an
    # option of curl), exit 0; so did a host with a space or a character no host holds.
    argv = ["sign", "--secret", "s", "--body", "{}", f"--curl={url}"]
    one_line_error(capsys, argv, "--curl")


@pytest.mark.parametrize("option", ["--conversation-id", "--session-id"])
@pytest.mark.parametrize("value", ["", " ", "\t\n"])
def test_simulate_refuses_an_empty_or_blank_id(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: '' silently became a random id (and ' ' was sent), the run went on.
    argv = ["simulate", "--url", NOWHERE, "--secret", "s", option, value, "hi"]
    one_line_error(capsys, argv, option)


@pytest.mark.parametrize("name", ["conversation_id", "session_id"])
def test_run_simulation_refuses_an_empty_id(name: str) -> None:
    async def go() -> None:
        await run_simulation(NOWHERE, "s", ["hi"], **{name: ""})

    with pytest.raises(ConfigurationError, match=name):
        anyio.run(go)


@pytest.mark.parametrize("value", ["", " ", "\t"])
def test_simulate_refuses_an_empty_or_blank_message(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: `simulate ''` sent a message with empty text, while blank --file lines are skipped.
    argv = ["simulate", "--url", NOWHERE, "--secret", "s", "hi", value]
    one_line_error(capsys, argv, "message 2")


@pytest.mark.parametrize("value", ["42", "[1]", '"x"', "null", "true"])
def test_simulate_refuses_data_that_is_no_json_object(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A data event's content is an object (PROTOCOL.md). Before: `--data 42` was sent (200).
    argv = ["simulate", "--url", NOWHERE, "--secret", "s", "--data", value, "hi"]
    one_line_error(capsys, argv, "--data")


@pytest.mark.parametrize(
    ("options", "names"), [({"messages": ["hi", " "]}, "message 2"), ({"data": 42}, "data")]
)
def test_run_simulation_refuses_a_blank_message_or_data_no_object(
    options: dict[str, Any], names: str
) -> None:
    async def go() -> None:
        await run_simulation(NOWHERE, "s", **options)

    with pytest.raises(ConfigurationError, match=f"^{names} "):
        anyio.run(go)


@pytest.mark.parametrize(
    "value", ["0", "-1", "nan", "inf", "-inf", "1e309", "1e300", "1e-300", "86401", "0.0009"]
)
def test_simulate_timeout_out_of_range_is_one_line(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: 1e300 (a turn waits forever) and 1e-300 (no reply can come in time) were taken;
    # 0, nan and inf were refused with argparse's usage block, not one line.
    argv = ["simulate", "--url", NOWHERE, "--secret", "s", f"--timeout={value}", "hi"]
    one_line_error(capsys, argv, "--timeout")


def test_simulate_timeout_bounds_are_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0.001", "86400"):  # refused? exit 2; taken: the connection-error, exit 1
        argv = ["simulate", "--url", NOWHERE, "--secret", "s", "--timeout", value, "-q", "hi"]
        assert main(argv, environ={}) == 1, value
        assert "PROTOCOL VIOLATION: " in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--host", ""), ("--host", " "), ("--agent", "")])
def test_serve_refuses_an_empty_host_or_agent(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --host '' listened on every interface (0.0.0.0 and ::) while the banner said
    # 127.0.0.1; --agent '' served the default agent. No secret here: never serves either way.
    one_line_error(capsys, ["serve", "--env-file", "", option, value], option)


@pytest.mark.parametrize("command", ["sign", "simulate"])
def test_an_empty_secret_option_is_refused_not_replaced(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --secret '' (an unset shell variable) signed with the environment's secret.
    rest = ["--body", "{}"] if command == "sign" else ["--url", NOWHERE, "hi"]
    argv = [command, "--secret", "", *rest]
    assert main(argv, environ={"LAYERCODE_WEBHOOK_SECRET": "whsec_env"}) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: --secret ")
    assert captured.err.count("\n") == 1


def no_content_backend(status: int, body: bytes = b"") -> Any:
    """Answers turns with a one-event stream and every other event with ``status`` and
    ``body`` (none by default)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        event = msgspec.json.decode(await read_body(receive))
        if event["type"] in ("session.start", "message"):
            stream = msgspec.json.encode({"type": "response.end", "turn_id": event["turn_id"]})
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"data: " + stream + b"\n\n"})
            return
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(
    ("status", "body", "shown"),
    [
        (204, b"", "(no body)"),
        (200, b"", "(no body)"),
        (202, b"", "(no body)"),
        (200, b"null", "null"),
    ],
)
def test_simulate_accepts_a_reply_without_body(
    status: int, body: bytes, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a 204 to session.update was PROTOCOL VIOLATION: bad-json ("reply is not JSON: ''").
    # And a JSON `null` body printed as "(no body)", as if there were none.
    with serve(no_content_backend(status, body)) as base:
        argv = ["simulate", "--url", base, "--secret", SECRET, "--data", "{}", "--json", "hi"]
        assert main(argv, environ={}) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    report = msgspec.json.decode(captured.out)
    assert report["violation"] is None
    assert [(r["type"], r["status"], r["body"]) for r in report["replies"]] == [
        ("data", status, None),
        ("session.update", status, None),
        ("session.end", status, None),
    ]
    assert captured.err.count(f"reply {status}: {shown}\n") == 3, captured.err


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        # Before: "… data answered 503: " (a dangling colon, as if the body had been lost).
        (503, b"", "http-error: data (turn_id 'T') answered 503"),
        # Before: "reply is not JSON" (msgspec: "Number out of range"), which it is.
        (
            200,
            b'{"\xc2\x9b": 1e400}',
            "bad-json: data (turn_id 'T') reply holds a number out of range (1e400): "
            "'{\"\\x9b\": 1e400}'",
        ),
    ],
)
def test_a_refused_reply_is_one_line(
    status: int, body: bytes, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(no_content_backend(status, body)) as base:
        argv = ["simulate", "--url", base, "--secret", SECRET, "--data", "{}", "-q", "hi"]
        assert main(argv, environ={}) == 1
    err = re.sub(r"'turn_[0-9a-f]{16}'", "'T'", capsys.readouterr().err)  # a random turn id
    assert err == f"PROTOCOL VIOLATION: {said}\n"


def header_recording_backend(seen: list[list[tuple[bytes, bytes]]]) -> Any:
    """``no_content_backend(204)`` keeping each request's headers in ``seen``."""
    answer = no_content_backend(204)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(list(scope["headers"]))
        await answer(scope, receive, send)

    return app


@pytest.mark.parametrize("name", ["Layercode-Signature", "LAYERCODE-SIGNATURE", "Accept-Encoding"])
def test_a_header_option_replaces_a_header_of_simulate_whatever_its_case(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --header 'Layercode-Signature: x' sent two signature headers (simulate's own,
    # lowercase, and the given one), which the server refused as malformed.
    seen: list[list[tuple[bytes, bytes]]] = []
    with serve(header_recording_backend(seen)) as base:
        argv = ["simulate", "--url", base, "--secret", SECRET, "--header", f"{name}: x", "-q", "hi"]
        main(argv, environ={})
    capsys.readouterr()
    assert seen
    for headers in seen:
        values = [value for key, value in headers if key == name.lower().encode()]
        assert values == [b"x"], headers
