"""The API-key check of the guarded routes (``/api/authorize``, ``/metrics``).

A caller presents a key as ``X-Api-Key: <key>`` or ``Authorization: Bearer <key>``; it is
compared with every configured key in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from .errors import ConfigurationError

__all__ = ["api_key_allowed", "encode_keys"]


def encode_keys(keys: Iterable[str], name: str = "api_keys") -> tuple[bytes, ...]:
    """The configured keys as the bytes :func:`api_key_allowed` compares. A key no client
    can send (not a ``str``, empty, a blank at either end, a control character, a lone
    surrogate) is a :class:`ConfigurationError` naming ``name`` and its index, not the key."""
    if isinstance(keys, str | bytes):  # one key per character would let ``s`` pass
        raise ConfigurationError(f"{name} must be a list of keys such as ['key'], not a string")
    encoded = []
    for index, key in enumerate(keys):
        if not isinstance(key, str):
            raise ConfigurationError(f"{name}[{index}] must be a str, not {type(key).__name__}")
        try:
            raw = key.encode()
        except UnicodeEncodeError:  # a lone surrogate
            raw = b""
        controls = any(b < 32 or b == 127 for b in raw.replace(b"\t", b" "))
        if not raw or key.strip(" \t") != key or controls:
            raise ConfigurationError(
                f"{name}[{index}] cannot be sent in a header: empty, a blank at either end, "
                "a control character or a lone surrogate"
            )
        encoded.append(raw)
    return tuple(encoded)


def api_key_allowed(headers: Mapping[str, str], keys: tuple[bytes, ...]) -> bool:
    """Whether ``headers`` (lower-case names) present one of ``keys``; True when there are
    no keys (the route is not guarded)."""
    if not keys:
        return True
    presented = headers.get("x-api-key")
    if presented is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else None
    if not presented:
        return False
    try:  # the bytes the client sent (the server read them as latin-1), UTF-8 for a key "clé"
        candidate = presented.encode("latin-1")
    except UnicodeEncodeError:  # headers not read from the wire
        candidate = presented.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched
