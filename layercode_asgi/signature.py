"""LayerCode webhook signatures: ``layercode-signature: t=<unix seconds>,v1=<hex>``.

The scheme is Stripe's: ``v1`` is the lowercase hex HMAC-SHA256 of ``f"{t}." + raw_body``
keyed with the agent's webhook secret (UTF-8). :func:`sign` builds a header value;
:func:`verify_signature` returns ``True`` or raises :class:`SignatureVerificationError`.

Rules, all deliberate:

* Several ``v1=`` entries, and several secrets (rotation), are accepted; any match wins.
* Unknown keys (``v0=``, a future ``v2=``) and empty items (``t=1,,v1=…``) are ignored; an
  item without ``=`` is malformed.
* Exactly one ``t=`` entry, ASCII digits only (at most 15), is required.
* Comparison is constant-time (:func:`hmac.compare_digest`) and exact: ``v1`` must be the
  lowercase hex digest, byte for byte.
* ``tolerance`` is the largest accepted ``|now - t|`` in whole seconds: ``0`` accepts only
  the current second, a negative one nothing. Nothing turns the timestamp check off.
* Any input (any string or bytes, huge or non-ASCII headers, lone surrogates, empty)
  yields ``True`` or :class:`SignatureVerificationError`, never another exception.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from .errors import LayercodeError, check_type, kind_of

__all__ = [
    "DEFAULT_TOLERANCE",
    "SIGNATURE_HEADER",
    "SignatureErrorReason",
    "SignatureVerificationError",
    "check_signature_header",
    "sign",
    "verify_signature",
]

#: Name of the HTTP request header that carries the signature (lower case, as in ASGI).
SIGNATURE_HEADER = "layercode-signature"
#: Default largest accepted distance, in seconds, between the signed timestamp and now.
DEFAULT_TOLERANCE = 300

# A unix timestamp in seconds has 10 digits until the year 2286; 15 leaves room and keeps
# ``int()`` far from Python's 4300-digit conversion limit.
_MAX_TIMESTAMP_DIGITS = 15
_SHA256_HEX_LEN = 64
_ENCODING = "utf-8"
# Lone surrogates cannot be encoded as strict UTF-8; "surrogatepass" makes every ``str``
# encodable, and ``sign`` and ``verify_signature`` encode the same way.
_ERRORS = "surrogatepass"
_WHITESPACE = " \t"
# What LayerCode sends, and the only shape the fast path of ``verify_signature`` takes.
_LAYERCODE_SHAPE = re.compile(r"t=([0-9]{1,15}),v1=([0-9a-f]{64})").fullmatch


class SignatureErrorReason(enum.StrEnum):
    """Why a signature was rejected; the value is the text of the 401 JSON ``error``."""

    MISSING_HEADER = "missing signature header"
    MALFORMED_HEADER = "malformed signature header"
    TIMESTAMP_OUT_OF_TOLERANCE = "timestamp outside tolerance"
    NO_MATCHING_SIGNATURE = "no matching signature"


class SignatureVerificationError(LayercodeError, ValueError):
    """A webhook signature was missing, malformed, stale or wrong.

    :attr:`reason` tells the cases apart (a :class:`SignatureErrorReason`, which is a
    ``str``); ``str(error)`` adds a detail meant for logs. The detail never contains the
    secret or the expected signature.
    """

    def __init__(self, reason: SignatureErrorReason, detail: str | None = None) -> None:
        check_type("reason", reason, SignatureErrorReason, "a SignatureErrorReason")
        check_type("detail", detail, str | None, "a str or None")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.detail))


_BYTES_LIKE: TypeAlias = str | bytes | bytearray | memoryview


def _to_bytes(value: _BYTES_LIKE, name: str = "payload") -> bytes:
    if isinstance(value, str):
        return value.encode(_ENCODING, _ERRORS)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)  # ``bytes`` itself: the same object, no copy
    raise TypeError(f"{name} must be a str or bytes, got {kind_of(value)}")


def _blank(secret: _BYTES_LIKE) -> bool:
    """An empty or all-whitespace secret: anybody can compute an HMAC with it (or guess
    it), so it verifies nothing (a handler reading an unset variable as ``""``)."""
    return not (secret.strip() if isinstance(secret, str) else bytes(secret).strip())


def check_secret(secret: object) -> None:
    """Raise ValueError for an empty or blank ``secret``: anybody could sign with it, no
    verifier takes it (``verify_signature`` refuses it too)."""
    if not secret or (isinstance(secret, _BYTES_LIKE) and _blank(secret)):
        raise ValueError("secret is required (the webhook secret to sign with)")


def _checked_arguments(secret: object, tolerance: object, now: object) -> Sequence[_BYTES_LIKE]:
    """``secret`` as a sequence; an argument of another type is a ``TypeError`` naming it
    (configuration, not a request: no 401 may hide it)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int):
        raise TypeError(f"tolerance must be an int (seconds), got {kind_of(tolerance)}")
    if now is not None and (isinstance(now, bool) or not isinstance(now, int | float)):
        raise TypeError(f"now must be a number (unix seconds) or None, got {kind_of(now)}")
    if isinstance(secret, _BYTES_LIKE):
        return (secret,)
    if isinstance(secret, Iterable) and not isinstance(secret, Mapping):
        secrets = tuple(secret)
        wrong = [s for s in secrets if not isinstance(s, _BYTES_LIKE)]
        if not wrong:
            return secrets
        secret = wrong[0]
    raise TypeError(f"secret must be a str or bytes, or a list of them; got {kind_of(secret)}")


# Each secret's keyed HMAC-SHA256 state, copied per message: OpenSSL 3 spends most of a
# one-shot ``hmac.digest`` on looking "sha256" up and hashing the key block (this is about
# twice as fast for a webhook body). A few secrets are normal: emptied past ``_KEYED_MAX``.
_KEYED: dict[str | bytes, hmac.HMAC] = {}
_KEYED_MAX = 64


def _keyed(secret: str | bytes) -> hmac.HMAC:
    state = _KEYED.get(secret)
    if state is None:
        key = secret.encode(_ENCODING, _ERRORS) if isinstance(secret, str) else secret
        state = hmac.new(key, b"", hashlib.sha256)
        if len(_KEYED) >= _KEYED_MAX:
            _KEYED.clear()
        _KEYED[secret] = state
    return state


def _digest(key: str | bytes, timestamp: bytes, payload: bytes) -> str:
    state = _keyed(key).copy()
    state.update(timestamp + b"." + payload)
    return state.hexdigest()


def sign(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """Return a ``layercode-signature`` header value ``t=<timestamp>,v1=<hex>``.

    ``payload`` is the exact request body (a ``str`` is encoded as UTF-8); ``timestamp``
    defaults to the current unix time in seconds. An empty or blank ``secret`` raises
    ``ValueError``, as ``verify_signature`` refuses one.
    """
    if timestamp is None:
        timestamp = int(time.time())
    elif isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be an int (unix seconds)")
    elif not 0 <= timestamp < 10**_MAX_TIMESTAMP_DIGITS:  # else no verifier takes its "t="
        raise ValueError(f"timestamp must be a unix time in seconds, 0 or more, got {timestamp}")
    t = str(timestamp)
    key = _to_bytes(secret, "secret")
    check_secret(secret)  # a blank one: no verifier takes it (ValueError)
    return f"t={t},v1={_digest(key, t.encode(), _to_bytes(payload))}"


def _malformed(detail: str) -> SignatureVerificationError:
    return SignatureVerificationError(SignatureErrorReason.MALFORMED_HEADER, detail)


def _parse_header(signature: str) -> tuple[str, list[str]]:
    """Split a header into its timestamp text and ``v1`` candidates, or raise."""
    timestamp: str | None = None
    candidates: list[str] = []
    for item in signature.split(","):
        key, sep, value = item.partition("=")
        key = key.strip(_WHITESPACE)
        if not sep:
            if key:
                raise _malformed("item without '=' in header")
            continue  # empty item, e.g. a trailing comma
        value = value.strip(_WHITESPACE)
        if key == "t":
            if timestamp is not None:
                raise _malformed("more than one 't=' entry")
            timestamp = value
        elif key == "v1":
            candidates.append(value)
        # Unknown keys are ignored (forward compatibility).
    if timestamp is None:
        raise _malformed("no 't=' entry")
    if not (
        0 < len(timestamp) <= _MAX_TIMESTAMP_DIGITS and timestamp.isascii() and timestamp.isdigit()
    ):
        raise _malformed("'t=' is not a unix timestamp in seconds")
    if not candidates:
        raise _malformed("no 'v1=' entry")
    return timestamp, candidates


def _checked_header(
    signature: str | bytes | None, tolerance: int, now: float | None
) -> tuple[str, list[str]]:
    """The header's timestamp text and ``v1`` candidates, once it is present, well formed
    and within the tolerance; else raise."""
    if signature is None or signature == "":
        raise SignatureVerificationError(SignatureErrorReason.MISSING_HEADER)
    if isinstance(signature, bytes | bytearray | memoryview):
        # bytes straight from an ASGI header list: decode like HTTP does (latin-1).
        signature = bytes(signature).decode("latin-1")
    elif not isinstance(signature, str):
        raise _malformed("signature is not a string")
    timestamp, candidates = _parse_header(signature)

    current = time.time() if now is None else now
    # ``now`` may be any float a caller passes (nan, inf); floor only finite values.
    age = math.floor(current) - int(timestamp) if math.isfinite(current) else math.inf
    if not abs(age) <= tolerance:
        raise SignatureVerificationError(
            SignatureErrorReason.TIMESTAMP_OUT_OF_TOLERANCE,
            f"timestamp is {age} s from now, tolerance is {tolerance} s",
        )
    return timestamp, candidates


def check_signature_header(
    signature: str | None, tolerance: int = DEFAULT_TOLERANCE, *, now: float | None = None
) -> str:
    """Check what the header alone decides, before the (possibly slow) body is read.

    Raises :class:`SignatureVerificationError` exactly when :func:`verify_signature` would
    for any body: the header is missing, malformed, or its timestamp outside ``tolerance``.
    Returns its ``t=`` digits as sent; the body still needs :func:`verify_signature`.
    """
    # Fast path: the one shape LayerCode sends, the real clock (as in verify_signature).
    shape = _LAYERCODE_SHAPE(signature) if type(signature) is str and now is None else None
    if shape is not None and abs(int(time.time()) - int(shape[1])) <= tolerance:
        return shape[1]
    return _checked_header(signature, tolerance, now)[0]


def verify_signature(
    payload: bytes | str,
    signature: str | None,
    secret: str | Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE,
    *,
    now: float | None = None,
) -> bool:
    """Verify a ``layercode-signature`` header against the raw request body.

    Args:
        payload: the exact raw request body (``str`` is encoded as UTF-8).
        signature: the header value, or ``None`` when the request had none.
        secret: the webhook secret, or several (rotation): any one may match.
        tolerance: largest accepted ``|now - t|`` in seconds. ``0`` accepts only the
            current second; a negative value accepts no timestamp at all.
        now: the current unix time; defaults to :func:`time.time` (tests pin it).

    Returns:
        ``True`` when a ``v1`` entry matches a secret within the tolerance.

    Raises:
        SignatureVerificationError: with a :class:`SignatureErrorReason` as ``reason``.
        TypeError: ``secret``, ``tolerance`` or ``now`` is of another type (naming it).
    """
    # Fast path: LayerCode's shape, a ``bytes`` body, one ``str`` secret, an ``int``
    # tolerance, the real clock. It decides as the general path would, hashing the body once
    # (a forged request's too); the rest takes the general path, which checks the arguments
    # (checking them up front cost 7% of the rate: 0.79 -> 0.74 of the bare hmac loop,
    # benchmarks/micro.py).
    if (
        type(signature) is str
        and type(payload) is bytes
        and type(secret) is str
        and type(tolerance) is int
        and now is None
    ):
        shape = _LAYERCODE_SHAPE(signature)
        if shape is not None:
            ts, given = shape.groups()
            # a unix time is positive, so int() floors it like the general path does
            if abs(int(time.time()) - int(ts)) <= tolerance:
                state = _KEYED.get(secret)
                if state is None and not _blank(secret):  # a blank one: refused below
                    state = _keyed(secret)
                if state is not None:  # _digest, inline on the fast path
                    state = state.copy()
                    state.update(ts.encode() + b"." + payload)
                    if hmac.compare_digest(state.hexdigest(), given):
                        return True
                    raise SignatureVerificationError(SignatureErrorReason.NO_MATCHING_SIGNATURE)

    secrets = [s for s in _checked_arguments(secret, tolerance, now) if not _blank(s)]
    if not secrets:  # the caller's own argument: said whatever the request holds
        raise SignatureVerificationError(
            SignatureErrorReason.NO_MATCHING_SIGNATURE, "no webhook secret configured"
        )
    timestamp, candidates = _checked_header(signature, tolerance, now)

    keys = [_to_bytes(s, "secret") for s in secrets]
    try:
        body = _to_bytes(payload)
    except (TypeError, ValueError) as exc:  # a payload that is no str or bytes (or released)
        raise SignatureVerificationError(
            SignatureErrorReason.NO_MATCHING_SIGNATURE, f"cannot use payload: {exc}"
        ) from None

    # Only well-formed candidates can match; comparing the others would need a non-ASCII
    # ``compare_digest`` (a TypeError) and could never succeed anyway.
    wanted = [c.encode("ascii") for c in candidates if len(c) == _SHA256_HEX_LEN and c.isascii()]
    t = timestamp.encode("ascii")
    matched = False
    for key in keys:
        expected = _digest(key, t, body).encode("ascii")
        for candidate in wanted:
            # No early exit: the work done does not depend on which entry matched.
            matched |= hmac.compare_digest(expected, candidate)
    if matched:
        return True
    raise SignatureVerificationError(SignatureErrorReason.NO_MATCHING_SIGNATURE)
