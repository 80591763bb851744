"""The API-key check of the guarded routes (``/api/authorize``, ``/metrics``)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.datastructures import Headers

    from .config import Settings

__all__ = ["api_key_allowed", "check_keys_apart", "encode_keys", "sendable_key"]


def sendable_key(key: str) -> bool:
    """Whether ``key`` can be an API key in an HTTP header: printable ASCII (spaces inside
    only), not empty. Every client sends it as the same bytes; beyond ASCII they do not
    (curl sends ``clé`` as UTF-8, browsers and requests as latin-1, httpx refuses it)."""
    return bool(key) and key.isascii() and key.isprintable() and key.strip(" ") == key


def encode_keys(keys: Iterable[str], name: str = "api_keys") -> tuple[bytes, ...]:
    """The configured keys as the bytes :func:`api_key_allowed` compares. A key that is not
    a ``str`` or not :func:`sendable_key` is a :class:`ConfigurationError` naming ``name``
    and its index, not the key."""
    # One string: one key per character would let ``s`` pass.
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        kind = type(keys).__name__
        raise ConfigurationError(f"{name} must be a list of keys such as ['key'], not {kind}")
    encoded = []
    for index, key in enumerate(keys):
        if not isinstance(key, str):
            raise ConfigurationError(f"{name}[{index}] must be a str, not {type(key).__name__}")
        if not sendable_key(key):
            raise ConfigurationError(
                f"{name}[{index}] must be printable ASCII (an HTTP header value), not empty "
                "and without a blank at either end"
            )
        encoded.append(key.encode())
    return tuple(encoded)


def check_keys_apart(settings: Settings) -> None:
    """Refuse a route key (``/metrics``, authorize) that is the webhook secret or LayerCode's
    API key: its callers (a scraper's config, a browser) would hold that secret."""
    secrets = dict.fromkeys(settings.webhook_secrets, "LAYERCODE_WEBHOOK_SECRET")
    if settings.layercode_api_key:
        secrets.setdefault(settings.layercode_api_key, "LAYERCODE_API_KEY")
    for name, keys in (
        ("LAYERCODE_METRICS_API_KEYS", settings.metrics_api_keys),
        ("LAYERCODE_AUTHORIZE_API_KEYS", settings.authorize_api_keys),
    ):
        for index, key in enumerate(keys):
            if key in secrets:
                raise ConfigurationError(
                    f"{name}[{index}] is the {secrets[key]}: a client holding it could do "
                    "what that secret does; give the route a key of its own"
                )


def api_key_allowed(headers: Headers, keys: tuple[bytes, ...]) -> bool:
    """Whether ``headers`` present one of ``keys`` (compared in constant time); True when there
    are no keys. The key is a non-empty ``X-Api-Key``, else ``Authorization: Bearer <key>``
    (which may carry a front end's own token); it must come once: of two, which is meant is
    anyone's guess (a proxy in front may have checked the other)."""
    if not keys:
        return True
    sent = headers.getlist("x-api-key")
    if not any(sent):  # an empty one (a front end without a key) hides no Bearer
        sent = headers.getlist("authorization")
        if len(sent) == 1:
            scheme, _, token = sent[0].partition(" ")
            sent = [token.strip() if scheme.lower() == "bearer" else ""]
    if len(sent) != 1 or not sent[0]:
        return False
    # The keys are ASCII: any other character (a byte the server read as latin-1, a lone
    # surrogate of headers not read from the wire) makes bytes that match none.
    candidate = sent[0].encode("utf-8", "surrogatepass")
    return any([hmac.compare_digest(candidate, key) for key in keys])  # every key compared
