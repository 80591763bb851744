"""No configured secret in the log (``setup_logging``'s two formats, uvicorn's lines under
``run_server``), whoever quoted it: an agent, a hook, an authorize guard, a record's
arguments, ``extra=`` fields or traceback. A real server process on 127.0.0.1 and a real
redis-server with a password."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import types
from pathlib import Path

import httpx
import pytest

from layercode_asgi import Settings, create_app, setup_logging
from layercode_asgi.logs import (
    LOG_VALUE_MAX_CHARS,
    JsonFormatter,
    MaskingFormatter,
    cut_log_value,
    escape_log_value,
    hide_in_logs,
    uvicorn_log_config,
)

from .conftest import (
    PYTHON,
    SECRET,
    event_body,
    logged,
    serve,
    signed_headers,
    start_server_process,
)
from .redis_fixtures import RedisServer, redis_server  # noqa: F401 - a fixture

ROTATED = "whsec_rotated_in_4f9a2c"
API_KEY = "lc_api_7d1e5b33aa90"
PASSWORD = "redis-pw-e81c07"
SECRETS = (ROTATED, API_KEY, PASSWORD)


def with_password(server: RedisServer) -> str:
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        client.config_set("requirepass", PASSWORD)
    finally:
        client.close()
    return f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_secret_quoted_by_an_agent_a_hook_or_a_guard_is_masked_in_the_log(
    log_format: str,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The generic answer kept the caller out of it, but the log line and the traceback
    # showed every secret.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TMPDIR": str(tmp_path),
        "LAYERCODE_WEBHOOK_SECRET": f"{SECRET},{ROTATED}",
        "LAYERCODE_API_KEY": API_KEY,
        "REDIS_URL": with_password(redis_server),
        "LOG_FORMAT": log_format,
    }
    command = [PYTHON, "-m", "tests.serve_secrets_for_tests", "{port}"]
    with start_server_process(command, env=env, log=tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            turn, data = (
                client.post("/api/agent", content=body, headers=signed_headers(body))
                for body in (event_body("message"), event_body("data"))
            )
            authorize = client.post("/api/authorize", json={"agent_id": "a"})
        assert turn.status_code == 200 and '"error":"agent error"' in turn.text
        assert (data.status_code, data.json()) == (500, {"error": "data handler failed"})
        assert (authorize.status_code, authorize.json()) == (500, {"error": "internal error"})
        assert server.stop() == 0
        logs = server.output()
    for what in ("agent: auth failed", "hook: auth failed", "guard: auth failed"):
        assert logs.count(what) >= 2, (what, logs)  # the message and the traceback's last line
    assert "Exception in ASGI application" not in logs  # logged once, by the library
    for secret in (*SECRETS, SECRET):
        assert secret not in logs, (secret, logs)
    assert "key ***, secrets ***,***, store redis://:***@127.0.0.1:" in logs
    if log_format == "json":
        lines = [line for line in logs.splitlines() if line.startswith("{")]
        assert len(lines) > 5 and all(json.loads(line) for line in lines)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_secret_in_arguments_extra_fields_or_a_traceback_is_masked(log_format: str) -> None:
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=f"{SECRET},{ROTATED}",
        layercode_api_key=API_KEY,
        authorize_api_keys=("short", "authorize-key-1"),
    )
    create_app(settings)
    log = logging.getLogger("layercode_asgi.test")
    with logged(log_format) as stream:
        log.warning("calling with %s", API_KEY, extra={"token": ROTATED, "n": 1})
        try:
            raise RuntimeError(f"refused: {SECRET} authorize-key-1\nshort")
        except RuntimeError:
            log.exception("failed")
    logs = stream.getvalue()
    assert "calling with ***" in logs and "refused: *** ***" in logs
    for secret in (SECRET, ROTATED, API_KEY, "authorize-key-1"):
        assert secret not in logs
    # A secret shorter than 8 characters is not masked: it would mask ordinary words.
    assert "short" in logs
    if log_format == "json":
        first = json.loads(logs.splitlines()[0])
        assert (first["token"], first["n"]) == ("***", 1)


def test_a_url_quoted_by_a_text_setting_masks_no_word_of_it() -> None:
    # Before: a system prompt quoting a URL had its query values and its "fragment" (the rest
    # of the prompt) masked in every line as if they were a password ("?topic=conversation"
    # made "not ready: conversation store unavailable" read "not ready: *** store ...").
    prompt = "Be brief. Help: https://example.com/?topic=zebracrossing#penguin-parade etc"
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    create_app(settings.replace(system_prompt=prompt, turn_timeout_message=prompt))
    with logged("text") as stream:
        logging.getLogger("layercode_asgi.test").warning("zebracrossing penguin-parade etc")
    assert "zebracrossing penguin-parade etc" in stream.getvalue()


MY_APP = """
from layercode_asgi import Settings, create_app, setup_logging
from layercode_asgi.logs import (
    LOG_VALUE_MAX_CHARS,
    JsonFormatter,
    MaskingFormatter,
    cut_log_value,
    escape_log_value,
    hide_in_logs,
    uvicorn_log_config,
)

async def agent(event):
    raise ValueError(f"bad {event.text}")
    yield ""

setup_logging()  # what docs/deploying.md says to add for `uvicorn my_app:app`
app = create_app(Settings(layercode_webhook_secret="whsec_served_plainly_71c2"), agent)
"""
FORGED = "2026-12-04 22:00:00 INFO    layercode_asgi.webhook: forged"


def test_uvicorn_my_app_with_setup_logging_writes_no_forged_line_and_no_secret(
    tmp_path: Path,
) -> None:
    # Served as `uvicorn my_app:app` without setup_logging, the library's records reach
    # Python's last-resort handler: a traceback quoting a request with a newline printed a
    # line of its own, and the secret in clear. The one line docs/deploying.md shows fixes it.
    (tmp_path / "my_app.py").write_text(MY_APP)
    path = os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path, "TMPDIR": str(tmp_path)}
    command = [PYTHON, "-m", "uvicorn", "my_app:app", "--host", "127.0.0.1", "--port", "{port}"]
    body = event_body("message", text=f"whsec_served_plainly_71c2\n{FORGED}")
    secret = "whsec_served_plainly_71c2"
    server = start_server_process(command, env=env, cwd=tmp_path, log=tmp_path / "out.log")
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        reply = client.post("/api/agent", content=body, headers=signed_headers(body, secret))
        assert '"error":"agent error"' in reply.text
        server.stop()
    logs = server.output()
    assert "ValueError: bad" in logs
    assert not any(line.startswith(FORGED) for line in logs.splitlines()), logs
    assert secret not in logs and "bad ***\\n" + FORGED in logs, logs


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_run_server_writes_no_line_an_error_quoting_a_request_can_forge(
    log_format: str, tmp_path: Path
) -> None:
    # Starlette re-raised the guard's error after our JSON 500 had answered, and uvicorn
    # logged it again ("Exception in ASGI application") through its own formatter, which
    # printed the exception text as it was: a newline in the request started a line that
    # read as a record of its own.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TMPDIR": str(tmp_path),
        "LAYERCODE_WEBHOOK_SECRET": SECRET,
        "LOG_FORMAT": log_format,
    }
    command = [PYTHON, "-m", "tests.serve_secrets_for_tests", "{port}"]
    with start_server_process(command, env=env, log=tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reply = client.post("/api/authorize", params={"who": f"x\n{FORGED}"}, json={})
        assert (reply.status_code, reply.json()) == (500, {"error": "internal error"})
        assert server.stop() == 0
        logs = server.output()
    assert "guard: auth failed" in logs
    assert not any(line.startswith(FORGED) for line in logs.splitlines()), logs
    # Logged once, by the library, not a second time by uvicorn.
    assert "Exception in ASGI application" not in logs, logs
    assert logs.count("Traceback (most recent call last)") == 1, logs


@pytest.mark.parametrize("colours", [True, False])
def test_uvicorn_lines_under_run_server_cannot_pass_for_another_record(colours: bool) -> None:
    # MaskingFormatter masked uvicorn's lines but printed them as they were: a message
    # argument or a traceback with a newline from a request started a line of its own.
    config = uvicorn_log_config("text")
    options = {**config["formatters"]["default"], "use_colors": colours}
    default = MaskingFormatter(**{k: v for k, v in options.items() if k != "()"})
    options = {**config["formatters"]["access"], "use_colors": colours}
    access = MaskingFormatter(**{k: v for k, v in options.items() if k != "()"})
    hide_in_logs("whsec_uvicorn_line_5b1e")
    forged = f"whsec_uvicorn_line_5b1e\n{FORGED}\r\x1b[2Kx"
    try:
        raise RuntimeError(f"bad {forged}")
    except RuntimeError:
        error = logging.LogRecord("uvicorn.error", 40, "f", 1, "Exception in %s", ("app",), None)
        error.exc_info = sys.exc_info()
    warning = logging.LogRecord("uvicorn.error", 30, "f", 1, "odd %s", (forged,), None)
    args = ("127.0.0.1:5000", "GET", f"/{forged}", "1.1", 200)
    line = logging.LogRecord("uvicorn.access", 20, "f", 1, '%s - "%s %s HTTP/%s" %d', args, None)
    logs = "\n".join([default.format(error), default.format(warning), access.format(line)])
    lines = logs.split("\n")
    assert not any(line.startswith(FORGED) for line in lines), logs
    assert "\r" not in logs and "\x1b[2K" not in logs and "whsec_uvicorn_line_5b1e" not in logs
    assert "    RuntimeError: bad ***" in logs and "\\u001b[2Kx" in logs
    assert "\n    " + FORGED in logs  # the request's text, on a line of the record's own
    # uvicorn's own colour codes kept as they are (on a terminal), none else.
    red, green = "\x1b[31mERROR\x1b[0m:", "\x1b[32mINFO\x1b[0m:"
    assert (red in logs and green in logs) is colours
    assert logs.count("\x1b") == (10 if colours else 0), logs  # level, request, status


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_long_request_target_is_cut_in_uvicorns_access_line(log_format: str) -> None:
    # uvicorn's access line under run_server quoted the whole request target: a signed-or-not
    # GET with a 60,000-character query string made a 60,000-character line (uvicorn reads
    # far longer ones), where every value of our own lines is cut at LOG_VALUE_MAX_CHARS.
    config = uvicorn_log_config(log_format)
    name = "access" if log_format == "text" else "json"
    options = {k: v for k, v in config["formatters"][name].items() if k != "()"}
    formatter = MaskingFormatter(**options) if log_format == "text" else JsonFormatter()
    target = "/health?x=" + "q" * 60_000
    args = ("127.0.0.1:5000", "GET", target, "1.1", 200)
    line = logging.LogRecord("uvicorn.access", 20, "f", 1, '%s - "%s %s HTTP/%s" %d', args, None)
    text = formatter.format(line)
    assert len(text) < 2 * LOG_VALUE_MAX_CHARS, len(text)
    message = text if log_format == "text" else json.loads(text)["message"]
    assert '"GET /health?x=qqq' in message and "q…(+59010 chars) HTTP/1.1" in message, message
    assert line.args == args  # the record as logged, for the other handlers


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stdout", "stderr", "no_color"),
    [(Terminal(), io.StringIO(), ""), (Terminal(), Terminal(), "1"), (Terminal(), Terminal(), "")],
    ids=["stdout-only-a-terminal", "NO_COLOR", "terminals"],
)
def test_uvicorn_lines_are_coloured_only_on_a_terminal_and_without_no_color(
    stdout: io.StringIO, stderr: io.StringIO, no_color: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn coloured its lines on stderr when stdout was a terminal (`serve 2>log`: escape
    # codes in the file), ignored NO_COLOR, and on a terminal its coloured copy of a message
    # came out escaped: "Started server process [\u001b[36m4242\u001b[0m]".
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("NO_COLOR", no_color)
    options = uvicorn_log_config("text")["formatters"]["default"]
    default = MaskingFormatter(**{k: v for k, v in options.items() if k != "()"})
    record = logging.LogRecord(
        "uvicorn.error", 20, "f", 1, "Started server process [%d]", (42,), None
    )
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    line = default.format(record)
    colours = stderr.isatty() and not no_color
    assert line == ("\x1b[32mINFO\x1b[0m:     " if colours else "INFO:     ") + (
        "Started server process [42]"
    ), line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_secret_across_the_cut_of_a_long_value_shows_no_prefix(log_format: str) -> None:
    # Values were cut at 1000 characters before the line was masked: a secret across the
    # cut had its first characters left, no longer a whole secret to mask.
    secret = "whsec_straddling_the_cut_3e9d"
    hide_in_logs(secret)
    value = "v" * 990 + secret
    log = logging.getLogger("layercode_asgi.test")
    with logged(log_format) as stream:
        log.warning("value %s", escape_log_value(value), extra={"field": value})
        try:
            raise RuntimeError(value[len("RuntimeError: ") :])  # its line: 1019 characters
        except RuntimeError:
            log.exception("failed")
    logs = stream.getvalue()
    # The message, the traceback's line (and the extra= field in JSON), masked, not cut.
    assert logs.count("v" * 976 + "***") == (3 if log_format == "json" else 2), logs
    assert "whsec_str" not in logs
    assert (escape_log_value(value), cut_log_value(value)) == ("v" * 990 + "***",) * 2


def test_records_sent_to_logfire_have_their_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Logfire's handler takes records, not setup_logging's masked lines: it got every
    # secret as logged, in the message, the extra= fields and the exception.
    got: list[logging.LogRecord] = []

    class Records(logging.Handler):  # what logfire.LogfireLoggingHandler takes: records
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    logfire = types.ModuleType("logfire")  # not installed here: a stand-in module
    logfire.configure = lambda **options: None  # type: ignore[attr-defined]
    logfire.LogfireLoggingHandler = Records  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "logfire", logfire)
    hide_in_logs(ROTATED)
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        setup_logging(logfire_token="lf-token-for-tests")
    finally:
        sys.stderr = saved
    log = logging.getLogger("layercode_asgi.test")
    with caplog.at_level(logging.INFO):
        log.warning("calling with %s", ROTATED, extra={"token": ROTATED, "n": 1})
        log.info("plain %s", "value")
        for text in (f"refused: {ROTATED}", "refused: no secret"):
            try:
                raise RuntimeError(text)
            except RuntimeError:
                log.exception("failed")
    calling, plain, secret_error, error = got
    assert (calling.getMessage(), calling.token, calling.n) == ("calling with ***", "***", 1)
    assert (plain.msg, plain.args) == ("plain %s", ("value",))  # nothing masked: as logged
    assert secret_error.exc_info is None and secret_error.exc_text is None
    message = secret_error.getMessage()
    assert message.startswith("failed\nTraceback") and "RuntimeError: refused: ***" in message
    assert error.exc_info is not None  # no secret in it: the exception as it was
    assert not any(ROTATED in str(record.__dict__) for record in got)
    # Handlers of your own (the root logger's) get the records as logged.
    assert caplog.records[0].getMessage() == f"calling with {ROTATED}"


def test_a_failing_redis_with_a_password_is_named_masked_in_records_and_answers(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The records themselves (no setup_logging here to mask them): Redis refusing writes
    # (a script's error, a SET's), then down; the store, the replay cache, /ready and a turn.
    import redis

    url = with_password(redis_server)
    client = redis.Redis.from_url(url)
    try:
        client.config_set("maxmemory", "1")
    finally:
        client.close()
    settings = Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        redis_url=url,
        replay_protection=True,
    )
    replies = []
    with (
        caplog.at_level(logging.DEBUG),
        serve(create_app(settings)) as base,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        for n in range(2):
            body = event_body("message", text=f"turn {n}")
            replies.append(http.get("/ready"))
            replies.append(http.post("/api/agent", content=body, headers=signed_headers(body)))
            redis_server.stop()
    assert [reply.status_code for reply in replies] == [503] * 4
    assert "replay cache unavailable: OutOfMemoryError" in caplog.text
    assert "ConnectionError: Error 111 connecting to 127.0.0.1" in caplog.text
    assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in caplog.text
    assert PASSWORD not in caplog.text
    for reply in replies:  # the words only: no URL, no address
        assert reply.json()["error"].endswith(" unavailable") and "127.0.0.1" not in reply.text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_secret_across_the_cut_of_what_an_agent_returned_shows_no_prefix(
    log_format: str,
) -> None:
    # An agent returning what is no reply is logged with the value's repr cut at 80
    # characters, cut before the line was masked: a secret across the cut (here from the
    # request's text) had its first characters left. And a repr that raises (an int beyond
    # 4300 digits) was the agent's error instead of what it returned.
    secret = "whsec_straddling_the_repr_cut_41c7"
    hide_in_logs(secret)
    from layercode_asgi import LayercodeWebhook

    async def agent(event: types.SimpleNamespace) -> object:
        return {"echo": event.text} if event.text != "huge" else 10**5000

    webhook = LayercodeWebhook(agent, conversations=None)
    text = "x\n\u2028\x1b" + "t" * 45 + secret  # the secret's first characters before the cut
    with logged(log_format) as stream, serve(webhook) as url:
        for said in (text, "huge"):
            reply = httpx.post(url, content=event_body("message", text=said), timeout=10)
            assert '"error":"agent error"' in reply.text
    logs = stream.getvalue()
    assert "whsec_str" not in logs, logs
    assert "the agent returned dict {'echo': 'x\\\\n\\\\u2028\\\\x1b" in logs, logs
    assert "\x1b" not in logs and "\u2028" not in logs
    assert "the agent returned int <unprintable int>; expected" in logs, logs
