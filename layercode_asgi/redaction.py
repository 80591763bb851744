"""Keeping secrets and hostile text out of what we print: URL masking, terminal escaping."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

__all__ = ["MASK", "escape_terminal", "mask_url", "mask_urls", "port_problem", "url_secrets"]

#: What replaces a secret.
MASK: Final = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
#: A URL in a text: a scheme, credentials up to an ``@`` on the same line (within 256
#: characters: a password may hold spaces), then up to the next white space. Bounded
#: repeats: linear time on any text.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}://(?:[^\n@]{0,256}@)?\S*")
#: C0 controls, DEL, C1 controls, U+2028 / U+2029 (line / paragraph separator), and the bidi
#: controls, which reorder what a terminal shows (Trojan Source).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def mask_url(url: str) -> str:
    """``url`` with its credentials hidden: ``redis://user:***@host:6379/0``.

    Not parsed as a URL: a password may hold unencoded ``/``, ``#``, ``?`` or ``@``, which a
    parser would read as the start of the path, fragment or query, and show. All between
    ``scheme://`` and the *last* ``@`` is credentials: a mistake hides too much, never a secret.
    The user name is kept when a ``:`` separates it from a password; credentials without a
    ``:`` are hidden whole (some clients read a lone ``secret@host`` as a password). Query
    parameters other than plain options (``db=``, timeouts, …) have their values hidden
    (redis-py reads ``?password=`` as the password), and so has a fragment. Never raises.
    """
    match = _SCHEME.match(url)
    prefix, rest = (url[: match.end()], url[match.end() :]) if match else ("", url)
    credentials, at, host = rest.rpartition("@")
    host = _mask_query(host)
    if not at:
        return prefix + host
    user, colon, _ = credentials.partition(":")
    return f"{prefix}{user}:{MASK}@{host}" if colon else f"{prefix}{MASK}@{host}"


def port_problem(url: str) -> str | None:
    """For a URL that ``urlsplit`` refuses: what to say when its port is the cause (not a
    number from 0 to 65535), or None when it is not, or when the credentials could be (an
    ``@`` after the host part: a password holding an unencoded ``/``, ``?`` or ``#``; a
    ``[`` or ``]`` in the credentials). Shows nothing of the URL."""
    match = _SCHEME.match(url)
    rest = url[match.end() :] if match else url
    netloc = re.split("[/?#]", rest, maxsplit=1)[0]
    credentials, _, host = netloc.rpartition("@")
    if "@" in rest[len(netloc) :] or "[" in credentials or "]" in credentials:
        return None
    head, colon, port = host.rpartition(":")
    if not colon or not port or host.endswith("]") or (head.startswith("[") and "]" not in head):
        return None  # no port; or within an IPv6 address
    if port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535:
        return None
    return "its port a number from 0 to 65535"


def mask_urls(text: str) -> str:
    """``text`` with :func:`mask_url` applied to every URL in it: an error quoting the URL
    it could not reach, for a log line. Text after a URL up to an ``@`` on its line may be
    taken as credentials too (hiding too much, never too little)."""
    return _URL_IN_TEXT.sub(lambda url: mask_url(url.group()), text) if "://" in text else text


#: Query parameters shown as they are; every other one (``password=``, which redis-py
#: reads as the password, and whatever a client may take as a credential) is masked.
_PLAIN_PARAMETERS = frozenset(
    {"db", "protocol", "decode_responses", "encoding", "socket_timeout",
     "socket_connect_timeout", "socket_keepalive", "retry_on_timeout", "health_check_interval",
     "max_connections", "ssl_cert_reqs", "ssl_check_hostname", "client_name", "timeout"}
)  # fmt: skip


def _mask_query(text: str) -> str:
    """``host:port/path?query#fragment`` with the values of the query's non-plain parameters
    and the fragment masked."""
    text, hash_, _ = text.partition("#")
    location, question, query = text.partition("?")
    if question:
        parameters = []
        for parameter in query.split("&"):
            name, equals, _ = parameter.partition("=")
            plain = name.lower() in _PLAIN_PARAMETERS
            parameters.append(parameter if plain else f"{name}={MASK}" if equals else MASK)
        location += "?" + "&".join(parameters)
    return location + (f"#{MASK}" if hash_ else "")


def url_secrets(url: str) -> set[str]:
    """What :func:`mask_url` hides in ``url`` (the password, the values of the query's
    non-plain parameters, the fragment), each as written and percent-decoded."""
    match = _SCHEME.match(url)
    credentials, _, rest = url[match.end() if match else 0 :].rpartition("@")
    _, colon, password = credentials.partition(":")
    location, _, fragment = rest.partition("#")
    found = [password if colon else credentials, fragment]
    for parameter in location.partition("?")[2].split("&"):
        name, _, value = parameter.partition("=")
        if name.lower() not in _PLAIN_PARAMETERS:
            found.append(value)
    return {form for value in found if value for form in (value, unquote(value))}


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return _NAMED.get(match.group()) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_terminal(text: str) -> str:
    """``text`` safe to print on a terminal: every control character shown as an escape
    (``\\x1b``, ``\\n``, ``\\u2028``, …), so it can neither move the cursor, set the
    clipboard nor start a line of its own."""
    return _CONTROL.sub(_escape, text)
