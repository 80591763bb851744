"""``sign`` / ``verify_signature``: the worked example, properties and every failure reason."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from layercode_asgi import (
    SignatureErrorReason,
    SignatureVerificationError,
    sign,
    verify_signature,
)

R = SignatureErrorReason
NOW = 1_700_000_000


def reason_of(payload: bytes | str, header: str | None, secret: str | list[str], **kw: object) -> R:
    with pytest.raises(SignatureVerificationError) as info:
        verify_signature(payload, header, secret, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    return info.value.reason


def hexmac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


# -- the worked example of PROTOCOL.md, recomputed independently ------------------------------


def test_protocol_worked_example() -> None:
    body = b'{"type":"message"}'
    signed_string = b'1700000000.{"type":"message"}'
    expected = hmac.new(b"whsec_test", signed_string, hashlib.sha256).hexdigest()
    header = sign(body, "whsec_test", timestamp=1700000000)
    assert header == f"t=1700000000,v1={expected}"
    assert verify_signature(body, header, "whsec_test", now=1700000000) is True
    # str payloads are the same bytes as UTF-8
    assert verify_signature(body.decode(), header, "whsec_test", now=1700000000) is True


def test_sign_defaults_to_now() -> None:
    header = sign(b"x", "s")
    t = int(header.split(",")[0].removeprefix("t="))
    assert abs(t - time.time()) < 5
    assert verify_signature(b"x", header, "s") is True


def test_sign_rejects_non_int_timestamp() -> None:
    with pytest.raises(TypeError):
        sign(b"x", "s", timestamp=1.5)  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------

payloads = st.one_of(st.binary(max_size=2048), st.text(max_size=512))
secrets = st.text(min_size=1, max_size=64).filter(str.strip)  # a blank one verifies nothing
timestamps = st.integers(min_value=0, max_value=10**12)


@given(payload=payloads, secret=secrets, t=timestamps, skew=st.integers(-300, 300))
def test_sign_then_verify_holds(payload: bytes | str, secret: str, t: int, skew: int) -> None:
    header = sign(payload, secret, timestamp=t)
    assert verify_signature(payload, header, secret, now=t + skew) is True


@given(payload=st.binary(min_size=1, max_size=512), secret=secrets, data=st.data())
def test_any_changed_body_byte_is_rejected(
    payload: bytes, secret: str, data: st.DataObject
) -> None:
    header = sign(payload, secret, timestamp=NOW)
    i = data.draw(st.integers(0, len(payload) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != payload[i]))
    changed = payload[:i] + bytes([new]) + payload[i + 1 :]
    assert reason_of(changed, header, secret, now=NOW) is R.NO_MATCHING_SIGNATURE


@given(payload=st.binary(max_size=256), secret=secrets, data=st.data())
def test_any_changed_header_char_is_rejected(
    payload: bytes, secret: str, data: st.DataObject
) -> None:
    header = sign(payload, secret, timestamp=NOW)
    i = data.draw(st.integers(0, len(header) - 1))
    new = data.draw(st.characters(codec="latin-1").filter(lambda c: c != header[i]))
    changed = header[:i] + new + header[i + 1 :]
    with pytest.raises(SignatureVerificationError):
        verify_signature(payload, changed, secret, now=NOW)


@given(payload=st.binary(max_size=256), secret=secrets, delta=st.integers(1, 10**6))
def test_changed_timestamp_is_rejected(payload: bytes, secret: str, delta: int) -> None:
    header = sign(payload, secret, timestamp=NOW)
    digest = header.split(",v1=")[1]
    for t in (NOW + delta, NOW - delta):
        forged = f"t={t},v1={digest}"
        # even when the clock agrees with the forged timestamp, the HMAC does not
        assert reason_of(payload, forged, secret, now=t) is R.NO_MATCHING_SIGNATURE


@given(payload=st.binary(max_size=256), secret=secrets, other=secrets)
def test_other_secret_is_rejected(payload: bytes, secret: str, other: str) -> None:
    assume(other.encode("utf-8", "surrogatepass") != secret.encode("utf-8", "surrogatepass"))
    header = sign(payload, secret, timestamp=NOW)
    assert reason_of(payload, header, other, now=NOW) is R.NO_MATCHING_SIGNATURE


header_texts = st.one_of(
    st.text(),
    st.text(alphabet="tv1=,0123456789abcdef \t"),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda t, vs: f"t={t}," + ",".join(f"v1={v}" for v in vs),
        st.text(max_size=20),
        st.lists(st.text(max_size=80), max_size=5),
    ),
)


@settings(max_examples=500)
@given(header=header_texts, payload=payloads)
@example(header="t=" + "9" * 100_000 + ",v1=" + "a" * 64, payload=b"")
@example(header="t=\u0661\u0667" + "\u0660" * 8 + ",v1=" + "a" * 64, payload=b"")
@example(header="t=1700000000,v1=" + "é" * 64, payload=b"")
@example(header="t=1700000000,v1=\ud800" + "a" * 63, payload="\udfff")
@example(header="," * 100_000, payload=b"")
@example(header="t=1_700_000_000,v1=" + "a" * 64, payload=b"")
@example(header="t=-1700000000,v1=" + "a" * 64, payload=b"")
def test_arbitrary_headers_raise_only_signature_errors(header: str, payload: bytes | str) -> None:
    try:
        result = verify_signature(payload, header, "whsec_test", now=NOW)
    except SignatureVerificationError as exc:
        assert isinstance(exc.reason, SignatureErrorReason)
    else:  # only a genuinely valid header may pass
        assert result is True
        assert verify_signature(payload, header, "whsec_test", now=NOW)


@given(payload=st.binary(max_size=64), now=st.floats(allow_nan=True, allow_infinity=True))
def test_any_clock_value_raises_only_signature_errors(payload: bytes, now: float) -> None:
    header = sign(payload, "s", timestamp=NOW)
    try:
        verify_signature(payload, header, "s", now=now)
    except SignatureVerificationError as exc:
        assert exc.reason is R.TIMESTAMP_OUT_OF_TOLERANCE


def test_wrong_types_raise_only_signature_errors() -> None:
    # What a request gives (the body, the header); a secret of another type is the
    # programmer's, a TypeError naming it (tests/test_misconfiguration.py).
    header = sign(b"x", "s", timestamp=NOW)
    for payload, signature in [(123, header), (b"x", 123), (None, header)]:
        with pytest.raises(SignatureVerificationError):
            verify_signature(payload, signature, "s", now=NOW)  # type: ignore[arg-type]


# -- each reason, told apart -----------------------------------------------------------------


def test_missing_header() -> None:
    assert reason_of(b"x", None, "s") is R.MISSING_HEADER
    assert reason_of(b"x", "", "s") is R.MISSING_HEADER


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "v1=" + "a" * 64,  # no t
        "t=1700000000",  # no v1
        "t=1700000000,v2=" + "a" * 64,  # only unknown keys
        "t=,v1=" + "a" * 64,
        "t=abc,v1=" + "a" * 64,
        "t=1700000000,t=1700000000,v1=" + "a" * 64,  # two timestamps
        "t=1700000000,novalue,v1=" + "a" * 64,
        "t=" + "1" * 16 + ",v1=" + "a" * 64,  # beyond 15 digits
        "t=+1700000000,v1=" + "a" * 64,
    ],
)
def test_malformed_header(header: str) -> None:
    assert reason_of(b"x", header, "s", now=NOW) is R.MALFORMED_HEADER


def test_timestamp_outside_tolerance_both_directions() -> None:
    header = sign(b"x", "s", timestamp=NOW)
    assert verify_signature(b"x", header, "s", now=NOW + 300)
    assert verify_signature(b"x", header, "s", now=NOW - 300)
    assert reason_of(b"x", header, "s", now=NOW + 301) is R.TIMESTAMP_OUT_OF_TOLERANCE
    assert reason_of(b"x", header, "s", now=NOW - 301) is R.TIMESTAMP_OUT_OF_TOLERANCE
    assert verify_signature(b"x", header, "s", tolerance=3600, now=NOW + 3000)


def test_tolerance_zero_means_same_second_and_negative_means_nothing() -> None:
    header = sign(b"x", "s", timestamp=NOW)
    assert verify_signature(b"x", header, "s", tolerance=0, now=NOW + 0.999)
    assert reason_of(b"x", header, "s", tolerance=0, now=NOW + 1) is R.TIMESTAMP_OUT_OF_TOLERANCE
    # a negative tolerance never turns the check off: nothing is accepted
    assert reason_of(b"x", header, "s", tolerance=-1, now=NOW) is R.TIMESTAMP_OUT_OF_TOLERANCE


def test_no_matching_signature() -> None:
    assert reason_of(b"x", f"t={NOW},v1={'0' * 64}", "s", now=NOW) is R.NO_MATCHING_SIGNATURE


def test_uppercase_hex_is_not_the_signature() -> None:
    header = sign(b"x", "s", timestamp=NOW)
    t, v1 = header.split(",")
    assert reason_of(b"x", f"{t},{v1.upper().replace('V1=', 'v1=')}", "s", now=NOW) is (
        R.NO_MATCHING_SIGNATURE
    )


# -- rotation, several v1 entries, unknown keys ------------------------------------------------


def test_several_v1_entries_any_match_wins() -> None:
    good = hexmac("s", NOW, b"body")
    for header in (
        f"t={NOW},v1={'0' * 64},v1={good}",
        f"t={NOW},v1={good},v1={'0' * 64}",
        f"v1=zz,t={NOW},v1={good}",
    ):
        assert verify_signature(b"body", header, "s", now=NOW)


def test_unknown_keys_and_whitespace_are_ignored() -> None:
    good = hexmac("s", NOW, b"body")
    header = f"t={NOW}, v0=legacy, v2=future,v1={good},"
    assert verify_signature(b"body", header, "s", now=NOW)


def test_secret_rotation() -> None:
    header = sign(b"body", "new", timestamp=NOW)
    assert verify_signature(b"body", header, ["old", "new"], now=NOW)
    assert verify_signature(b"body", header, ("new",), now=NOW)
    assert reason_of(b"body", header, ["old", "older"], now=NOW) is R.NO_MATCHING_SIGNATURE
    assert reason_of(b"body", header, [], now=NOW) is R.NO_MATCHING_SIGNATURE


def test_non_ascii_secret_and_body() -> None:
    body = "¿Qué tal? 你好 🎙️".encode()
    header = sign(body, "sécret-密钥", timestamp=NOW)
    assert header.split("v1=")[1] == hexmac("sécret-密钥", NOW, body)
    assert verify_signature(body, header, "sécret-密钥", now=NOW)


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    good = hexmac("s", NOW, b"body")
    assert verify_signature(b"body", f"t={NOW},v1={good},v1={'0' * 64}", "s", now=NOW)
    # every candidate is compared with compare_digest, even after a match
    assert len(calls) == 2


def test_a_forged_signature_costs_one_hmac_of_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    # What an attacker without the secret sends most: LayerCode's header shape, a wrong v1.
    # The body (up to 1 MiB) is hashed once, as for a good signature, not a second time.
    digests: list[str] = []
    real = hmac.HMAC.hexdigest

    def spy(self: hmac.HMAC) -> str:
        digests.append(real(self))
        return digests[-1]

    monkeypatch.setattr(hmac.HMAC, "hexdigest", spy)
    body = b"x" * 1000
    forged = f"t={int(time.time())},v1={'0' * 64}"
    assert reason_of(body, forged, "whsec_forge") is R.NO_MATCHING_SIGNATURE
    assert len(digests) == 1
    assert verify_signature(body, sign(body, "whsec_forge"), "whsec_forge")
    assert len(digests) == 3  # sign's, and the check's


def test_error_message_names_reason_without_leaking_secret() -> None:
    with pytest.raises(SignatureVerificationError) as info:
        verify_signature(b"x", f"t={NOW},v1={'0' * 64}", "topsecret", now=NOW)
    assert "no matching signature" in str(info.value)
    assert "topsecret" not in str(info.value)
    assert hexmac("topsecret", NOW, b"x") not in str(info.value)


@pytest.mark.parametrize("secret", ["", " ", "\t\n", "\u3000", b"", b"  ", bytearray(b" ")])
def test_a_blank_secret_verifies_nothing(secret: str | bytes) -> None:
    """Anybody can compute an HMAC with an empty key (or guess a blank one): a handler
    written ``verify_signature(body, header, os.environ.get("SECRET", ""))`` accepted every
    forged webhook signed so while the variable was unset. It is refused as no secret."""
    body = b'{"type":"message"}'
    # Before: sign() signed with it, a header no verifier takes (signed_headers and the
    # test client refused it); now refused alike, so the forgery is computed by hand.
    with pytest.raises(ValueError, match=r"^secret is required \(the webhook secret"):
        sign(body, secret)
    t = int(time.time())
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    forged = f"t={t},v1={hmac.new(key, f'{t}.'.encode() + body, hashlib.sha256).hexdigest()}"
    for _ in range(2):  # the first call and a second one (anything cached)
        with pytest.raises(SignatureVerificationError, match="no webhook secret") as caught:
            verify_signature(body, forged, secret)
        assert caught.value.reason is R.NO_MATCHING_SIGNATURE
    assert reason_of(body, forged, [secret, "real"]) is R.NO_MATCHING_SIGNATURE
    # Before: a missing, malformed or stale header was reported instead (the secret being
    # the caller's own argument, checked first as the docs say), sending one to the clock.
    for header in (None, "", "junk", f"t={NOW - 10_000},v1={'0' * 64}"):
        with pytest.raises(SignatureVerificationError, match="no webhook secret") as caught:
            verify_signature(body, header, secret)
        assert caught.value.reason is R.NO_MATCHING_SIGNATURE
    real = sign(body, "real")
    assert verify_signature(body, real, [secret, "real"])  # a blank one beside is skipped
