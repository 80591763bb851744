"""Secrets stay out of messages: URL masking, settings errors and reprs, .env parse errors."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layercode_asgi import Settings
from layercode_asgi.conversation import RedisConversationStore
from layercode_asgi.errors import ConfigurationError, LayercodeError
from layercode_asgi.redaction import escape_terminal, mask_url, mask_urls

from .conftest import free_port

HOSTILE_PASSWORDS = [
    "Zq8/Hk2+pW9",
    "a#b",
    "a?b",
    "p@ss@word",
    "x/y#z?w@v",
    "://",
    "a:b:c",
    "%2F/%40",
    "[::1]",
    "pw with spaces",
    "😀/é",
]


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_mask_url_hides_hostile_passwords(password: str) -> None:
    url = f"redis://default:{password}@cache.example.com:6379/0"
    assert mask_url(url) == "redis://default:***@cache.example.com:6379/0"


def test_mask_url_forms() -> None:
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_url("rediss://:s3cret/x@h:1") == "rediss://:***@h:1"
    # credentials without ':' may be a password (some clients read them so): hidden whole
    assert mask_url("redis://s3cr/et@h") == "redis://***@h"
    # no scheme at all, or a garbled one: still everything before the last '@'
    assert mask_url("default:pw/x@host") == "default:***@host"
    assert "pw" not in mask_url("u:a://pw@host")
    # an '@' in the query hides too much, never too little
    assert "pw" not in mask_url("redis://u:pw@h/0?x=a@b")
    assert mask_url("") == ""


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_mask_urls_hides_the_passwords_of_the_urls_a_text_quotes(password: str) -> None:
    # For an error quoting the URL it could not reach (a replay cache's, a store's).
    url = f"redis://default:{password}@cache:6379/0"
    text = f"Error: cannot reach {url}, nor ({url}).\nrediss://u:{password}@b:1 down"
    assert mask_urls(text) == (
        "Error: cannot reach redis://default:***@cache:6379/0, nor (redis://default:***@cache:6379/0)."
        "\nrediss://u:***@b:1 down"
    )


def test_mask_urls_leaves_other_text_and_stays_linear() -> None:
    plain = "Error 111 connecting to cache:6379. Connection refused. http://cache:6379/0 ok"
    assert mask_urls(plain) == plain
    hostile = "a" * 100_000 + "://" + " x://" * 100_000  # finishes: bounded repeats only
    assert mask_urls(hostile) == hostile


_USER = st.text(st.characters(blacklist_characters=":@", blacklist_categories=("Cs",)), max_size=8)
_SECRET = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
_HOST = st.from_regex(r"[a-z][a-z0-9.\-]{0,20}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(user=_USER, password=_SECRET, host=_HOST, port=st.integers(1, 65535))
def test_mask_url_property(user: str, password: str, host: str, port: int) -> None:
    url = f"redis://{user}:{password}@{host}:{port}/0"
    assert mask_url(url) == f"redis://{user}:***@{host}:{port}/0"


def test_settings_repr_and_errors_hide_a_password_with_a_slash() -> None:
    for password in ("Zq8%2FHk2+pW9", "Zq8@Hk2+pW9", "Zq8Hk2"):  # valid URLs: shown masked
        s = Settings(env_file=None, environ={"REDIS_URL": f"redis://default:{password}@h:1/0"})
        assert "Zq8" not in repr(s) and "Hk2" not in repr(s)
        assert "Zq8" not in str(s.as_dict())
        assert "redis://default:***@h:1/0" in repr(s)
    for password in ("Zq8/Hk2+pW9", "Zq8#Hk2", "Zq8?Hk2"):  # unparseable: the error quotes it
        with pytest.raises(ConfigurationError) as info:
            Settings(env_file=None, environ={"REDIS_URL": f"redis://default:{password}@h:1/0"})
        assert "Zq8" not in str(info.value) and "Hk2" not in str(info.value)
        assert "redis://default:***@h:1/0" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        Settings(env_file=None, environ={"LAYERCODE_API_URL": "ftp://u:Zq8/Hk2@host"})
    assert "Zq8" not in str(info.value)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("REDIS_URL", "redis://default:Zq8Hk2\udce9@h:1/0"),  # a Latin-1 byte in the password
        ("REDIS_URL", "redis://default:Zq8Hk2@h\udce9:1/0"),
        ("LAYERCODE_API_URL", "https://u:Zq8Hk2@host/\udce9"),
        ("OPENAI_BASE_URL", "https://u:Zq8Hk2\udce9@host/v1"),
    ],
)
def test_a_url_holding_bytes_that_are_not_utf8_is_quoted_masked(variable: str, url: str) -> None:
    """os.environ holds such a byte as a lone surrogate: the error quotes the URL masked."""
    for source in ({"environ": {variable: url}}, {variable.lower(): url}):
        with pytest.raises(ConfigurationError) as info:
            Settings(env_file=None, **{"environ": {}, **source})
        assert "Zq8" not in str(info.value) and "not UTF-8" in str(info.value)
        assert ":***@" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("password", ["Zq8/Hk2+pW9", "Zq8#Hk2", "Zq8?Hk2", "Zq8Hk2"])
async def test_redis_store_errors_hide_the_password(password: str) -> None:
    pytest.importorskip("redis")
    url = f"redis://default:{password}@127.0.0.1:{free_port()}/0"
    with pytest.raises(LayercodeError) as info:
        store = RedisConversationStore(url, operation_timeout=2, socket_connect_timeout=1)
        try:
            await store.ping()  # nothing listens there: unavailable
        finally:
            await store.aclose()
    shown = "".join(traceback.format_exception(info.value))
    assert "Zq8" not in shown and "Hk2" not in shown
    assert "redis://default:***@127.0.0.1" in str(info.value)


def test_env_file_errors_never_quote_the_line(tmp_path: Path) -> None:
    secret = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"
    path = tmp_path / ".env"
    path.write_text(
        "\n".join(
            [
                'PRIVATE_KEY="-----BEGIN PRIVATE KEY-----',
                f"{secret}+/abc=",  # a PEM line: looks like KEY=VALUE with a bad name
                f"{secret}",  # no '='
                f"TOKEN='{secret}' {secret}",  # text after the closing quote
                '-----END PRIVATE KEY-----"',
            ]
        )
        + "\n"
    )
    with pytest.raises(ConfigurationError) as info:
        Settings(env_file=path, environ={})
    text = str(info.value)
    for number in (1, 2, 3, 4, 5):
        assert f"line {number}:" in text
    assert secret not in text and "MIIE" not in text and "BEGIN" not in text
    assert "PRIVATE_KEY" in text and "TOKEN" in text  # the variable is named


def test_a_setting_of_5000_digits_is_a_settings_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(env_file=None, environ={"LAYERCODE_MAX_BODY_SIZE": "9" * 5000})
    message = str(info.value)
    assert message.startswith("LAYERCODE_MAX_BODY_SIZE: expected an integer")
    assert len(message) < 200


def test_long_invalid_values_are_quoted_short() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(env_file=None, environ={"LAYERCODE_TURN_TIMEOUT": "x" * 10_000})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),
        ("a\nOK: fake", "a\\nOK: fake"),
        ("\r\t\x00\x7f\x9b\u2028\u2029", "\\r\\t\\x00\\x7f\\x9b\\u2028\\u2029"),
        ("gnp.\u202eexe", "gnp.\\u202eexe"),
        ("\u202a\u202d\u2066\u2069", "\\u202a\\u202d\\u2066\\u2069"),
        ("plain é 😀", "plain é 😀"),
    ],
)
def test_escape_terminal(text: str, shown: str) -> None:
    assert escape_terminal(text) == shown
