"""``Settings``: sources and precedence, every conversion and its error, ``.env`` parsing."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from layercode_asgi.config import (
    SETTINGS_FIELDS,
    Settings,
    SettingsError,
    settings_table_markdown,
)
from layercode_asgi.envfile import parse_env_file
from layercode_asgi.errors import ConfigurationError


def make(env: dict[str, str] | None = None, **kwargs: Any) -> Settings:
    return Settings(env_file=None, environ=env or {}, **kwargs)


def error_of(env: dict[str, str] | None = None, **kwargs: Any) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        make(env, **kwargs)
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value, ValueError)
    return info.value


# -- defaults, table --------------------------------------------------------------------------


def test_defaults() -> None:
    s = make()
    assert s.layercode_api_key is None
    assert s.layercode_webhook_secret is None
    assert s.webhook_secrets == ()
    assert s.layercode_api_url == "https://api.layercode.com/v1"
    assert s.redis_url is None
    assert s.default_model == "openai:gpt-5-nano"
    assert s.openai_api_key is None
    assert s.google_generativeai_api_key is None
    assert s.logfire_token is None
    assert s.cors_origins == ()
    assert s.authorize_api_keys == ()
    assert s.turn_timeout == 30.0
    assert s.turn_timeout_message is None
    assert s.max_body_size == 1048576
    assert s.signature_tolerance == 300
    assert s.replay_protection is False
    assert s.keep_history is False
    assert s.history_max_messages == 200
    assert s.history_max_conversations == 10000
    assert s.history_ttl == 86400
    assert s.agent == "echo"
    assert s.log_level == "INFO"


def test_table_matches_class_attributes() -> None:
    names = [spec.name for spec in SETTINGS_FIELDS]
    assert names == list(Settings.__annotations__)
    assert not hasattr(Settings, "fields")  # the table is internal (issue 16)
    assert len({spec.env for spec in SETTINGS_FIELDS}) == len(SETTINGS_FIELDS)
    table = settings_table_markdown()
    for spec in SETTINGS_FIELDS:
        assert f"`{spec.env}`" in table
    # one header, one separator, one row per field; "|" inside cells is escaped
    assert len(table.strip().splitlines()) == len(SETTINGS_FIELDS) + 2
    assert "str \\| None" in table


# -- precedence -------------------------------------------------------------------------------


def test_precedence_kwargs_over_env_over_dotenv_over_default(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "LAYERCODE_AGENT=from-dotenv\nDEFAULT_MODEL=dotenv-model\nLOG_LEVEL=warning\n"
    )
    environ = {"LAYERCODE_AGENT": "from-env", "DEFAULT_MODEL": "env-model"}
    s = Settings(env_file=env_file, environ=environ, agent="from-kwargs")
    assert s.agent == "from-kwargs"  # kwargs > env > .env
    assert s.default_model == "env-model"  # env > .env
    assert s.log_level == "WARNING"  # .env > default
    assert s.turn_timeout == 30.0  # default


def test_reads_os_environ_and_cwd_dotenv_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("LAYERCODE_API_KEY=dotenv-key\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERCODE_WEBHOOK_SECRET", "env-secret")
    monkeypatch.delenv("LAYERCODE_API_KEY", raising=False)
    s = Settings()
    assert s.layercode_api_key == "dotenv-key"
    assert s.layercode_webhook_secret == "env-secret"


def test_env_file_none_skips_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("LAYERCODE_AGENT=dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert Settings(env_file=None, environ={}).agent == "echo"


def test_empty_value_means_default() -> None:
    s = make({"LAYERCODE_TURN_TIMEOUT": "", "LAYERCODE_API_KEY": "  ", "LAYERCODE_AGENT": ""})
    assert s.turn_timeout == 30.0
    assert s.layercode_api_key is None
    assert s.agent == "echo"


def test_values_are_stripped() -> None:
    s = make({"LAYERCODE_API_KEY": "  key \n", "LAYERCODE_TURN_TIMEOUT": " 2.5 "})
    assert s.layercode_api_key == "key"
    assert s.turn_timeout == 2.5
    # Any white space around, as for every other setting (a duration refused it unless ASCII).
    s = make(
        {"LAYERCODE_TURN_TIMEOUT": "\u00a02.5\u2028", "LAYERCODE_MAX_BODY_SIZE": "\u00a07\u2028"}
    )
    assert (s.turn_timeout, s.max_body_size) == (2.5, 7)


# -- conversions ------------------------------------------------------------------------------


def test_numbers() -> None:
    s = make(
        {
            "LAYERCODE_TURN_TIMEOUT": "0.5",
            "LAYERCODE_MAX_BODY_SIZE": "2_048",
            "LAYERCODE_SIGNATURE_TOLERANCE": "0",
            "LAYERCODE_HISTORY_MAX_MESSAGES": "3",
            "LAYERCODE_HISTORY_MAX_CONVERSATIONS": "4",
            "LAYERCODE_HISTORY_TTL": "0",
        }
    )
    assert (s.turn_timeout, s.max_body_size, s.signature_tolerance) == (0.5, 2048, 0)
    assert (s.history_max_messages, s.history_max_conversations, s.history_ttl) == (3, 4, 0)
    assert isinstance(s.turn_timeout, float)
    # native kwargs
    assert make(turn_timeout=2, max_body_size=10).turn_timeout == 2.0


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("LAYERCODE_TURN_TIMEOUT", "abc", "expected a number > 0, got 'abc'"),
        ("LAYERCODE_TURN_TIMEOUT", "0", "expected a number > 0, got '0'"),
        ("LAYERCODE_TURN_TIMEOUT", "-1", "expected a number > 0"),
        ("LAYERCODE_TURN_TIMEOUT", "nan", "expected a number > 0"),
        ("LAYERCODE_TURN_TIMEOUT", "inf", "expected a number > 0"),
        ("LAYERCODE_MAX_BODY_SIZE", "1.5", "expected an integer > 0, got '1.5'"),
        ("LAYERCODE_MAX_BODY_SIZE", "0", "expected an integer > 0"),
        ("LAYERCODE_MAX_BODY_SIZE", "big", "expected an integer > 0"),
        ("LAYERCODE_MAX_BODY_SIZE", "1__0", "expected an integer > 0, got '1__0'"),
        ("LAYERCODE_MAX_BODY_SIZE", "10_", "expected an integer > 0, got '10_'"),
        ("LAYERCODE_SIGNATURE_TOLERANCE", "-1", "expected an integer >= 0, got '-1'"),
        ("LAYERCODE_HISTORY_MAX_MESSAGES", "0", "expected an integer > 0"),
        ("LAYERCODE_HISTORY_MAX_CONVERSATIONS", "x", "expected an integer > 0"),
        ("LAYERCODE_HISTORY_TTL", "-5", "expected an integer >= 0"),
        # Before: taken, then a store cut a message whose first character is longer to ""
        ("LAYERCODE_HISTORY_MAX_BYTES", "3", "expected an integer >= 4, got '3'"),
        ("LAYERCODE_REPLAY_PROTECTION", "maybe", "expected a boolean"),
        ("LAYERCODE_KEEP_HISTORY", "2", "expected a boolean"),
        ("LAYERCODE_API_URL", "ftp://x.com", "expected an http(s) URL, got 'ftp://x.com'"),
        ("LAYERCODE_API_URL", "https://", "expected an http(s) URL"),
        ("LAYERCODE_API_URL", "https://h:99999", "expected an http(s) URL"),
        # Before: taken, a host no request can reach (a space, '<', or one percent-encoded)
        ("LAYERCODE_API_URL", "https://api layercode.com/v1", "expected an http(s) URL, got 'https://api layercode.com/v1'"),
        ("OPENAI_BASE_URL", "http://a%20b:8000/v1", "expected an http(s) URL"),
        ("REDIS_URL", "redis://:pw@a<b:6379/0", "expected a redis://, rediss:// or unix:// URL"),
        ("LAYERCODE_CORS_ORIGINS", "https://a^b.com", "expected '*' or http(s) origins"),
        ("REDIS_URL", "http://localhost", "expected a redis://, rediss:// or unix:// URL"),
        ("REDIS_URL", "localhost:6379", "expected a redis://"),
        ("REDIS_URL", "unix://", "expected a unix:// URL with a socket path"),
        # the store refused these at create_app, not naming the variable: a database that
        # is not a number, a password with an unencoded / (part of it in the path)
        ("REDIS_URL", "redis://:pw@h:6379/abc", "expected a database number as its path (a / in a password: %2F), got 'redis://:***@h:6379/abc'"),
        ("REDIS_URL", "rediss://u:12/ab@h/0", "expected a database number as its path"),
        # Before: only "expected a redis://, ... URL, got 'redis://default:***@h:6379/0'", the
        # cause (an unencoded ? / # in the password) hidden by the mask.
        ("REDIS_URL", "redis://default:Zq8?Hk2@h:6379/0", "expected a redis://, rediss:// or unix:// URL (a password's / ? # percent-encoded: %2F %3F %23), got 'redis://default:***@h:6379/0'"),
        ("REDIS_URL", "rediss://default:Zq8#Hk2@h", "expected a redis://, rediss:// or unix:// URL (a password's / ? #"),
        # Before: a port out of range got the password hint too, when the port was the cause.
        ("REDIS_URL", "redis://h:99999/0", "expected a redis://, rediss:// or unix:// URL (its port a number from 0 to 65535), got 'redis://h:99999/0'"),
        ("REDIS_URL", "redis://:pw@[::1]:6379x", "expected a redis://, rediss:// or unix:// URL (its port a number from 0 to 65535), got 'redis://:***@[::1]:6379x'"),
        ("REDIS_URL", "redis://:123456/x@h/0", "expected a redis://, rediss:// or unix:// URL (a password's / ? #"),
        ("LAYERCODE_CORS_ORIGINS", "https://a.com/path", "expected '*' or http(s) origins"),
        ("LAYERCODE_CORS_ORIGINS", "a.com", "expected '*' or http(s) origins"),
        ("LAYERCODE_CORS_ORIGINS", "*,https://a.com", "'*' cannot be combined"),
        # Before: accepted, and never matched: CORS compares whole origins (docs: "no patterns")
        ("LAYERCODE_CORS_ORIGINS", "https://*.a.com", "expected '*' or http(s) origins like 'https://app.example.com' (no path, no pattern), got 'https://*.a.com'"),
        ("LAYERCODE_CORS_ORIGINS", "https://a.com,http://*", "expected '*' or http(s) origins like"),
        ("LOG_LEVEL", "loud", "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
    ],
)  # fmt: skip
def test_invalid_env_values_name_the_variable(var: str, value: str, message: str) -> None:
    err = error_of({var: value})
    assert str(err).startswith(f"{var}: {message}")
    assert err.problems == (str(err),)


def test_kwarg_errors_name_the_keyword() -> None:
    assert str(error_of(turn_timeout="abc")) == "turn_timeout: expected a number > 0, got 'abc'"
    assert "max_body_size: expected an integer > 0, got True" in str(error_of(max_body_size=True))
    assert "turn_timeout: expected a number > 0, got None" in str(error_of(turn_timeout=None))
    assert "replay_protection: expected a boolean" in str(error_of(replay_protection=3))
    assert "layercode_api_key: expected a string" in str(error_of(layercode_api_key=42))


@pytest.mark.parametrize(
    ("text", "expected"),
    [(t, True) for t in ("1", "true", "TRUE", "Yes", "on", " On ")]
    + [(f, False) for f in ("0", "false", "False", "NO", "off")],
)
def test_booleans(text: str, expected: bool) -> None:
    s = make({"LAYERCODE_REPLAY_PROTECTION": text, "LAYERCODE_KEEP_HISTORY": text})
    assert s.replay_protection is expected
    assert s.keep_history is expected


def test_urls() -> None:
    s = make({"LAYERCODE_API_URL": "http://localhost:8080/v1/", "REDIS_URL": "rediss://h:6380/2"})
    assert s.layercode_api_url == "http://localhost:8080/v1"
    assert s.redis_url == "rediss://h:6380/2"
    assert make({"REDIS_URL": "unix:///tmp/redis.sock"}).redis_url == "unix:///tmp/redis.sock"
    assert make({"REDIS_URL": "redis://localhost"}).redis_url == "redis://localhost"


def test_secrets_not_echoed_in_errors() -> None:
    err = error_of({"REDIS_URL": "http://user:hunter2@host"})
    assert "hunter2" not in str(err)
    assert "http://user:***@host" in str(err)
    err = error_of(layercode_webhook_secret=["whsec_hunter2"], authorize_api_keys=[b"hunter2"])
    assert "hunter2" not in str(err)
    assert "layercode_webhook_secret: expected a string, got <hidden>" in str(err)
    assert "authorize_api_keys: expected a list of strings, got <hidden>" in str(err)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("redis_url", b"redis://:hunter2@h", "redis_url: expected a string, got bytes"),
        ("redis_url", ["redis://:hunter2@h"], "redis_url: expected a string, got list"),
        ("layercode_api_url", b"https://u:hunter2@h", "expected an http(s) URL, got bytes"),
        ("cors_origins", ["https://u:hunter2@h", 5], "expected a list of strings, got a list"),
    ],
)
def test_a_url_setting_of_the_wrong_type_is_named_by_its_type(
    field: str, value: Any, message: str
) -> None:
    # Quoted whole before: a URL's password with it.
    err = error_of(**{field: value})
    assert message in str(err) and "hunter2" not in str(err)


@pytest.mark.parametrize(
    "origin",
    ["https://user:hunter2@app.com", "https://hunter2@app.com/", "https://u:hunter2@h:1/x"],
)
def test_a_cors_origin_with_credentials_is_refused_without_showing_them(origin: str) -> None:
    err = error_of({"LAYERCODE_CORS_ORIGINS": f"https://ok.com,{origin}"})
    assert str(err).startswith("LAYERCODE_CORS_ORIGINS: expected '*' or http(s) origins")
    assert "hunter2" not in str(err)


def test_lists() -> None:
    s = make(
        {
            "LAYERCODE_CORS_ORIGINS": " https://a.com, http://localhost:3000/ ,,",
            "LAYERCODE_AUTHORIZE_API_KEYS": "k1, k2 ,",
        }
    )
    assert s.cors_origins == ("https://a.com", "http://localhost:3000")
    assert s.authorize_api_keys == ("k1", "k2")
    assert make({"LAYERCODE_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    assert make(cors_origins=["https://b.com"]).cors_origins == ("https://b.com",)
    assert make(authorize_api_keys="x,y").authorize_api_keys == ("x", "y")
    assert "expected a list of strings" in str(error_of(authorize_api_keys=[1]))


def test_webhook_secrets_split() -> None:
    assert make({"LAYERCODE_WEBHOOK_SECRET": "only"}).webhook_secrets == ("only",)
    s = make({"LAYERCODE_WEBHOOK_SECRET": " new , old ,, "})
    assert s.webhook_secrets == ("new", "old")
    assert make(layercode_webhook_secret="a,b").webhook_secrets == ("a", "b")
    assert make(layercode_webhook_secret=",").webhook_secrets == ()


def test_log_level_normalised() -> None:
    assert make({"LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert make({"LOG_LEVEL": "warn"}).log_level == "WARNING"


# -- errors -----------------------------------------------------------------------------------


def test_all_problems_reported_together() -> None:
    err = error_of(
        {
            "LAYERCODE_TURN_TIMEOUT": "abc",
            "LAYERCODE_MAX_BODY_SIZE": "-1",
            "REDIS_URL": "http://x",
        }
    )
    text = str(err)
    assert text.startswith("3 invalid settings: ") and "\n" not in text  # one line
    assert len(err.problems) == 3
    for var in ("LAYERCODE_TURN_TIMEOUT", "LAYERCODE_MAX_BODY_SIZE", "REDIS_URL"):
        assert f"{var}: " in text


def test_unknown_kwargs_rejected() -> None:
    assert str(error_of(turn_timout=1)) == (
        "unknown setting: turn_timout (did you mean turn_timeout?)"
    )
    assert str(error_of(zzz=1, a=2)) == "unknown settings: a, zzz"
    # env_file / environ are parameters, not settings
    assert make({"ENV_FILE": "x"}).agent == "echo"


def test_require_webhook_secret() -> None:
    with pytest.raises(ConfigurationError, match=r"^LAYERCODE_WEBHOOK_SECRET is not set$"):
        make().require_webhook_secret()
    with pytest.raises(ConfigurationError, match="LAYERCODE_WEBHOOK_SECRET is not set"):
        make(layercode_webhook_secret=" , ").require_webhook_secret()
    assert make(layercode_webhook_secret="a,b").require_webhook_secret() == ("a", "b")
    with pytest.raises(ConfigurationError) as info:
        make().require("layercode_api_key", "openai_api_key")
    assert "LAYERCODE_API_KEY is not set" in str(info.value)
    assert "OPENAI_API_KEY is not set" in str(info.value)
    make(layercode_api_key="k").require("layercode_api_key")
    with pytest.raises(ConfigurationError, match="unknown setting: nope"):
        make().require("nope")


# -- immutability, repr -----------------------------------------------------------------------


def test_frozen_and_replace() -> None:
    s = make(agent="a")
    with pytest.raises(AttributeError):
        s.agent = "b"
    with pytest.raises(AttributeError):
        del s.agent
    with pytest.raises(AttributeError):
        s.new_attribute = 1
    t = s.replace(agent="b", turn_timeout="5")
    assert (s.agent, t.agent, t.turn_timeout) == ("a", "b", 5.0)
    assert t.replace(agent="a", turn_timeout=30.0) == s
    assert hash(t.replace(agent="a", turn_timeout=30.0)) == hash(s)
    with pytest.raises(SettingsError, match="turn_timeout"):
        s.replace(turn_timeout=-1)
    assert pickle.loads(pickle.dumps(s)) == s


def test_repr_masks_secrets() -> None:
    s = make(
        layercode_api_key="sk_live_SECRET1",
        layercode_webhook_secret="whsec_SECRET2,whsec_SECRET3",
        openai_api_key="sk-SECRET4",
        google_generativeai_api_key="SECRET5",
        logfire_token="SECRET6",
        authorize_api_keys=["SECRET7", "SECRET8"],
        redis_url="redis://user:SECRET9@redis.internal:6379/0",
        agent="visible-agent",
    )
    text = repr(s)
    assert "SECRET" not in text
    assert "visible-agent" in text
    assert "redis.internal:6379" in text
    assert "layercode_api_key='***'" in text
    assert "authorize_api_keys=('***', '***')" in text
    assert "SECRET" not in str(s.as_dict())
    assert s.as_dict(mask_secrets=False)["openai_api_key"] == "sk-SECRET4"
    # unset secrets show as None, not as a mask
    assert "logfire_token=None" in repr(make())


# -- .env parsing -----------------------------------------------------------------------------


def test_env_file_syntax(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "\ufeff# a comment\n"
        "\n"
        "PLAIN=value\n"
        "export EXPORTED=yes\n"
        "SPACED = spaced value  \n"
        "INLINE=abc # comment\n"
        "HASH=abc#not-a-comment\n"
        "SINGLE='literal \\n # kept' # comment\n"
        'DOUBLE="line1\\nline2\\t\\"q\\" \\\\ # kept" # comment\n'
        "EMPTY=\n"
        "EMPTY_QUOTED=''\n"
        "DUP=first\n"
        "DUP=second\n"
        "exporter=not-a-prefix\n"
        "URL=https://x.com/?a=b\n"
    )
    assert parse_env_file(path) == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "spaced value",
        "INLINE": "abc",
        "HASH": "abc#not-a-comment",
        "SINGLE": "literal \\n # kept",
        "DOUBLE": 'line1\nline2\t"q" \\ # kept',
        "EMPTY": "",
        "EMPTY_QUOTED": "",
        "DUP": "second",
        "exporter": "not-a-prefix",
        "URL": "https://x.com/?a=b",
    }


def test_env_file_lines_end_only_at_line_breaks(tmp_path: Path) -> None:
    # U+2028, U+0085, form feed or a file separator inside a value are not line ends
    # (str.splitlines cut there: a quoted value was "unterminated", 1\x1cB=2 set B).
    path = tmp_path / ".env"
    path.write_bytes(
        'PROMPT="one\u2028two\u0085three"\r\nPLAIN=a\u2029b\x0cc\nA=1\x1cB=2\rLAST=x'.encode()
    )
    assert parse_env_file(path) == {
        "PROMPT": "one\u2028two\u0085three",
        "PLAIN": "a\u2029b\x0cc",
        "A": "1\x1cB=2",
        "LAST": "x",
    }


def test_a_misspelt_layercode_variable_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: ignored without a word (the turn timeout stayed 30 s, the metrics off).
    path = tmp_path / "typo\x1b.env"  # a control character in its name: shown escaped
    path.write_text(
        "LAYERCODE_METRIC=true\nLAYERCODE_ENV_FILE=x\nOTHER_TOOL=1\nLayercode_Agent=x\n"
    )
    environ = {"LAYERCODE_TURN_TIMOUT": "hunter2", "LAYERCODE_ZZZ": "1", "HOME": "/"}
    environ["layercode_webhook_secret"] = "hunter2"  # in the wrong case: before, no word
    with caplog.at_level("WARNING", logger="layercode_asgi.config"):
        settings = Settings(env_file=path, environ=environ)
    assert (settings.turn_timeout, settings.metrics) == (30.0, False)
    assert caplog.messages == [
        "LAYERCODE_TURN_TIMOUT (the environment) is no setting: ignored "
        "(did you mean LAYERCODE_TURN_TIMEOUT?)",
        "LAYERCODE_ZZZ (the environment) is no setting: ignored",
        "layercode_webhook_secret (the environment) is no setting: ignored "
        "(did you mean LAYERCODE_WEBHOOK_SECRET?)",
        f"LAYERCODE_METRIC ({tmp_path}/typo\\x1b.env) is no setting: ignored "
        "(did you mean LAYERCODE_METRICS?)",
        f"Layercode_Agent ({tmp_path}/typo\\x1b.env) is no setting: ignored "
        "(did you mean LAYERCODE_AGENT?)",
    ]


def test_missing_env_file_is_fine(tmp_path: Path) -> None:
    assert parse_env_file(tmp_path / "absent.env") == {}
    assert Settings(env_file=tmp_path / "absent.env", environ={}).agent == "echo"


def test_bad_env_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.env"
    lines = [
        "GOOD=1",
        "this line has no equals sign",
        "# fine",
        'UNTERMINATED="abc',
        "1BAD=x",
        "TRAIL='a' junk",
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigurationError) as info:
        parse_env_file(path)
    text = str(info.value)
    assert f"{path}, line 2: expected KEY=VALUE" in text
    assert f'{path}, line 4: UNTERMINATED: unterminated " quote' in text
    assert f"{path}, line 5: invalid variable name" in text and "1BAD" not in text
    assert f"{path}, line 6: TRAIL: unexpected text after the closing quote" in text
    assert "line 1:" not in text and "line 3:" not in text
    with pytest.raises(ConfigurationError, match="line 2"):
        Settings(env_file=path, environ={})


def test_unreadable_env_file(tmp_path: Path) -> None:
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"KEY=\xff\xfe\n")
    with pytest.raises(ConfigurationError, match="not valid UTF-8"):
        parse_env_file(binary)
    # The line and variable of the first bad byte, never its value (a secret, in latin-1):
    # before, only the file was named.
    binary.write_bytes(b"\xef\xbb\xbfGOOD=1\r\n\r\nexport LAYERCODE_API_KEY = caf\xe9-hunter2\n")
    with pytest.raises(ConfigurationError) as info:
        parse_env_file(binary)
    assert str(info.value) == (
        f"{binary}, line 3: LAYERCODE_API_KEY: not valid UTF-8 (invalid continuation byte)"
    )
    binary.write_bytes(b"OK=1\n\xff=2\n")
    with pytest.raises(ConfigurationError, match=r"^.*, line 2: not valid UTF-8"):
        parse_env_file(binary)
    with pytest.raises(ConfigurationError, match="cannot read"):
        parse_env_file(tmp_path)  # a directory
    # A control character of the file's name is shown escaped (as for a missing file), not
    # sent to the terminal: before, every other error printed it raw.
    (tmp_path / "d\x1b[2Jir").mkdir()
    (tmp_path / "bad\n.env").write_bytes(b"garbled\nKEY=\xff\n")
    for name in ("d\x1b[2Jir", "bad\n.env"):
        with pytest.raises(ConfigurationError) as info:
            parse_env_file(tmp_path / name)
        assert "\x1b" not in str(info.value) and "\n" not in str(info.value)
        assert name.encode("unicode_escape").decode() in str(info.value)


def test_env_file_over_1_mib_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.env"
    big.write_bytes(b"# padding\n" * 110_000 + b"KEY=1\n")  # 1.05 MB of comments
    with pytest.raises(ConfigurationError) as info:
        parse_env_file(big)
    assert str(info.value) == f"{big}: cannot read the file: larger than 1 MiB"
    with pytest.raises(ConfigurationError, match="larger than 1 MiB"):
        Settings(env_file=big, environ={})
    big.write_bytes(b"KEY=1\n" + b"#" * ((1 << 20) - 7) + b"\n")  # exactly 1 MiB is fine
    assert parse_env_file(big) == {"KEY": "1"}


def test_env_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_env_file(tmp_path)  # a directory
    assert str(info.value) == f"{tmp_path}: cannot read the file: not a regular file"


@pytest.mark.parametrize("env_file", [123, b".env", ["a.env"]])
def test_an_env_file_that_is_not_a_path_is_refused_naming_it(env_file: Any) -> None:
    # Before: TypeError from os.open or pathlib ("expected str, bytes or os.PathLike object").
    with pytest.raises(SettingsError) as info:
        Settings(env_file=env_file, environ={})
    assert str(info.value).startswith("env_file: expected a path (str or os.PathLike) or None, got")


@pytest.mark.parametrize(
    "environ",
    [123, ["LOG_LEVEL"], "LOG_LEVEL=debug", {b"LOG_LEVEL": b"debug"}, {1: "x"}],
    ids=["int", "list", "str", "os.environb", "int key"],  # keys: before, re's TypeError
)
def test_an_environ_that_is_not_a_mapping_is_refused_naming_it(environ: Any) -> None:
    # Before: TypeError ("argument of type 'int' is not iterable", "string indices must be
    # integers"), a traceback from inside Settings.
    with pytest.raises(SettingsError) as info:
        Settings(env_file=None, environ=environ)
    assert str(info.value).startswith("environ: expected a mapping such as os.environ, got")


def test_many_garbled_lines_name_the_first_ten(tmp_path: Path) -> None:
    # Before: one problem per line: a file of 100,000 made a message of 5 MB.
    path = tmp_path / ".env"
    path.write_text("garbled\n" * 100_000)
    with pytest.raises(SettingsError) as info:
        parse_env_file(path)
    problems = info.value.problems
    assert len(problems) == 11
    assert problems[9] == f"{path}, line 10: expected KEY=VALUE"
    assert problems[10] == f"{path}: 99990 more garbled lines"


def test_invalid_value_in_env_file_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("LAYERCODE_TURN_TIMEOUT=soon\n")
    with pytest.raises(ConfigurationError, match="LAYERCODE_TURN_TIMEOUT: expected a number > 0"):
        Settings(env_file=path, environ={})


# -- hostile values: refused naming the variable, or read as what they say -------------------


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_a_duration_too_big_for_a_float_is_refused(value: int) -> None:
    # Before: OverflowError ("int too large to convert to float") from Settings(...).
    err = error_of(turn_timeout=value, body_timeout=value)
    assert err.problems[0].startswith("turn_timeout: expected a number > 0, got ")
    assert err.problems[1].startswith("body_timeout: expected a number > 0")


def test_a_value_whose_repr_fails_is_refused_naming_its_type() -> None:
    # Before: ValueError "Exceeds the limit (4300 digits) for integer string conversion"
    # from quoting the value in the message, a traceback instead of the setting's name.
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    huge = 10**5000
    err = error_of(turn_timeout=huge, max_body_size=-huge, log_level=huge, agent=Hostile())
    assert list(err.problems) == [
        "turn_timeout: expected a number > 0, got <int>",
        "max_body_size: expected an integer > 0, got <int>",
        "agent: expected a non-empty string, got <Hostile>",
        "log_level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got <int>",
    ]


@pytest.mark.parametrize("value", ["\u0661\u0662", "12\u0663", "\uff11\uff12", "\u0661.5"])
def test_a_duration_in_other_digits_is_refused_as_an_integer_is(value: str) -> None:
    # Before: LAYERCODE_TURN_TIMEOUT="\u0661\u0662" was 12.0 while LAYERCODE_MAX_BODY_SIZE was
    # refused: only ASCII digits are numbers in settings.
    for var in ("LAYERCODE_TURN_TIMEOUT", "LAYERCODE_MAX_BODY_SIZE"):
        assert str(error_of({var: value})).startswith(f"{var}: expected a")
    assert "turn_timeout: expected a number > 0" in str(error_of(turn_timeout=value))


@pytest.mark.parametrize(
    "var", ["LAYERCODE_API_KEY", "OPENAI_API_KEY", "GOOGLE_GENERATIVEAI_API_KEY", "LOGFIRE_TOKEN"]
)
@pytest.mark.parametrize("key", ["lc\nhunter2", "lc\x00hunter2", "lc\x7fhunter2", "clé-hunter2"])
def test_a_key_sent_in_a_header_must_be_printable_ascii(var: str, key: str) -> None:
    # Before: accepted; the authorize route then failed each request (a 500 for "clé", and
    # for a control character a warning quoting h11's "Illegal header value b'Bearer …'":
    # the key itself, in the log).
    err = error_of({var: key})
    assert str(err) == f"{var}: expected printable ASCII (an HTTP header value), got <hidden>"
    assert "hunter2" not in str(err)
    assert make({var: " lc key \n"}).as_dict(mask_secrets=False)[var.lower()] == "lc key"


@pytest.mark.parametrize("var", ["LAYERCODE_AUTHORIZE_API_KEYS", "LAYERCODE_METRICS_API_KEYS"])
@pytest.mark.parametrize("key", ["clé-hunter2", "lc\x01hunter2", "lc\thunter2"])
def test_a_guard_key_follows_the_rule_of_the_keys_we_send(var: str, key: str) -> None:
    # Before: Settings took them (create_app then refused the control character, and took
    # "clé": curl sends it as UTF-8, browsers and requests as latin-1, httpx not at all).
    err = error_of({var: f"ok,{key}"})
    assert str(err) == f"{var}: expected printable ASCII (an HTTP header value), got <hidden>"
    assert "hunter2" not in str(err)
    assert make({var: "a b, c"}).as_dict(mask_secrets=False)[var.lower()[10:]] == ("a b", "c")


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        ("https://a.com:443", "https://a.com"),
        ("http://a.com:80/", "http://a.com"),
        ("http://a.com:443", "http://a.com:443"),
        ("http://a.com:", "http://a.com"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_cors_origins_are_kept_as_browsers_send_them(given: str, origin: str) -> None:
    # Before: kept as written; a browser sends "https://app.example.com" (lower case, no
    # default port), which CORS compares exactly: the origin was never allowed.
    assert make({"LAYERCODE_CORS_ORIGINS": given}).cors_origins == (origin,)


@pytest.mark.parametrize("given", ["https://a.com?", "https://a.com#", "https://a.com?x=1"])
def test_a_cors_origin_with_a_query_or_fragment_mark_is_refused(given: str) -> None:
    # Before: "https://a.com?" was accepted as written, and never matched an Origin header.
    err = error_of({"LAYERCODE_CORS_ORIGINS": given})
    assert str(err).startswith("LAYERCODE_CORS_ORIGINS: expected '*' or http(s) origins")


@pytest.mark.parametrize("spec", SETTINGS_FIELDS, ids=lambda spec: spec.env)
def test_text_that_is_not_utf8_is_refused_naming_the_variable(spec: Any) -> None:
    # Environment bytes that are not UTF-8 reach os.environ as lone surrogates ("caf\udce9").
    # Before: several settings took them; create_app then failed with a UnicodeEncodeError
    # traceback (LAYERCODE_AUTHORIZE_API_KEYS, LAYERCODE_METRICS_API_KEYS) or a setting was
    # silently unusable (a webhook secret no signature matches).
    value = "caf\udce9"
    if spec.name == "system_prompt_file":  # a file name may be any bytes
        assert make({spec.env: value}).system_prompt_file == value
        return
    err = error_of({spec.env: value})
    assert str(err).startswith(f"{spec.env}: expected ")
    if spec.secret:
        assert str(err).endswith("got <hidden>")
    if spec.name in ("authorize_api_keys", "metrics_api_keys"):
        assert str(error_of(**{spec.name: ["ok", value]})).startswith(f"{spec.name}: expected ")


@pytest.mark.parametrize("kind", ["fifo", "directory", "big"])
def test_a_system_prompt_file_that_is_not_a_small_regular_file_is_refused(
    kind: str, tmp_path: Path
) -> None:
    # Read like the .env file (the same reader: /dev/zero is refused as in
    # test_cli_hostile's .env case): a FIFO nobody writes blocked start-up forever, a
    # device such as /dev/zero was read until memory ran out.
    import os

    from layercode_asgi.builtin_agents import configured_system_prompt

    path = tmp_path / "prompt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"x" * ((1 << 20) + 1))
    reason = "larger than 1 MiB" if kind == "big" else "not a regular file"
    with pytest.raises(ConfigurationError, match=f"cannot read it \\({reason}\\)"):
        configured_system_prompt(make(system_prompt_file=str(path)))


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("https://bücher.example", "https://xn--bcher-kva.example"),
        ("HTTPS://BÜCHER.example:443/", "https://xn--bcher-kva.example"),
        ("http://bücher.example:8080", "http://xn--bcher-kva.example:8080"),
        ("https://bücher\u3002example", "https://xn--bcher-kva.example"),  # ideographic full stop
    ],
)
def test_an_internationalised_cors_origin_is_kept_in_punycode(given: str, origin: str) -> None:
    # Before: kept as written ("https://bücher.example"); a browser sends the host in
    # punycode, which CORS compares exactly: the origin was never allowed.
    assert make({"LAYERCODE_CORS_ORIGINS": given}).cors_origins == (origin,)


@pytest.mark.parametrize(
    "given",
    [
        "https://" + "ü" * 64 + ".example",  # a label too long for DNS
        "https://bücher..example",  # an empty label
        "https://straße.example",  # ß: IDNA 2003 maps it to "ss", browsers keep it
        "https://u:hunter2@bücher.example",
    ],
)
def test_an_internationalised_cors_origin_that_cannot_be_encoded_is_refused(given: str) -> None:
    err = error_of({"LAYERCODE_CORS_ORIGINS": given})
    assert isinstance(err, ConfigurationError)
    assert str(err).startswith("LAYERCODE_CORS_ORIGINS: expected '*' or http(s) origins")
    assert "hunter2" not in str(err)
