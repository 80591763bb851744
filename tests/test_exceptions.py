"""Every exception class the package exports is built the way its signature says, refuses
other arguments naming them (not a format error from inside its message), and survives a
pickle round trip (a process pool, a test runner's worker) with its attributes."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

import layercode_asgi
from layercode_asgi import (
    AgentNotFoundError,
    ConfigurationError,
    ConversationLockTimeout,
    InvalidPayloadError,
    ResponseError,
    SettingsError,
    SignatureErrorReason,
    SignatureVerificationError,
    UnknownEventError,
)
from layercode_asgi.testing import ProtocolViolation

#: One instance of each exported exception class, built as documented.
EXAMPLES: list[BaseException] = [
    AgentNotFoundError("nope", ["echo", "openai"]),
    ConfigurationError("bad"),
    ConversationLockTimeout("c-1", 2.5),
    InvalidPayloadError("Expected `str`", "$.turn_id"),
    layercode_asgi.LayercodeError("x"),
    ResponseError(503, "busy", retry_after=5),
    SettingsError(["A: bad", "B: worse"]),
    SignatureVerificationError(SignatureErrorReason.MALFORMED_HEADER, "no 't=' entry"),
    layercode_asgi.StoreError("down"),
    layercode_asgi.StoreUnavailableError("unreachable"),
    UnknownEventError("future.event"),
]


def test_every_exported_exception_class_has_an_example() -> None:
    exported = {
        name
        for name in layercode_asgi.__all__
        if isinstance(getattr(layercode_asgi, name), type)
        and issubclass(getattr(layercode_asgi, name), BaseException)
    }
    assert exported == {type(error).__name__ for error in EXAMPLES}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_an_exported_exception_survives_pickle_and_copy(error: BaseException) -> None:
    # ConversationLockTimeout, AgentNotFoundError, ResponseError and SignatureVerificationError
    # failed to unpickle ("missing 1 required positional argument" / "'str' object has no
    # attribute 'value'"); a SettingsError came back with one "problem" per character.
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: ConversationLockTimeout("c", "x"), "timeout"),  # was: unknown format code 'g'
        (lambda: ConversationLockTimeout("c", None), "timeout"),
        (lambda: ConversationLockTimeout("c", True), "timeout"),
        (lambda: ConversationLockTimeout(5, 1.0), "conversation_id"),
        (lambda: AgentNotFoundError(5, []), "name"),
        (lambda: AgentNotFoundError("x", None), "available"),  # was: 'NoneType' not iterable
        (lambda: AgentNotFoundError("x", "ab"), "available"),  # was: "available: a, b"
        (lambda: AgentNotFoundError("x", [1, 2]), "available"),
        (lambda: SignatureVerificationError("bogus"), "reason"),  # was: AttributeError
        (lambda: SignatureVerificationError(5), "reason"),
        (lambda: SignatureVerificationError(SignatureErrorReason.MISSING_HEADER, 5), "detail"),
        (lambda: SettingsError(None), "problems"),  # was: 'NoneType' not iterable
        (lambda: SettingsError("A: bad"), "problems"),  # was: one problem per character
        (lambda: SettingsError(["A: bad", 5]), "problems"),
        (lambda: InvalidPayloadError(5), "detail"),
        (lambda: InvalidPayloadError("x", 5), "path"),
        (lambda: UnknownEventError(5), "event_type"),  # was: object of type 'int' has no len()
        (lambda: UnknownEventError(None), "event_type"),
        (lambda: ResponseError(400, None), "message"),
        (lambda: ResponseError(400, 5), "message"),
    ],
)
def test_an_exception_built_with_the_wrong_type_names_the_argument(
    make: Any, argument: str
) -> None:
    with pytest.raises(TypeError, match=rf"^{argument} must be"):
        make()


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: ConversationLockTimeout("c", -1), "timeout"),
        (lambda: ConversationLockTimeout("c", float("nan")), "timeout"),
        (lambda: SettingsError([]), "problems"),  # was: "0 invalid settings:"
    ],
)
def test_an_exception_built_with_a_wrong_value_names_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        make()


def test_exceptions_built_as_documented_read_as_before() -> None:
    assert str(ConversationLockTimeout("c", 0)) == (
        "could not lock conversation 'c' within 0 s "
        "(another turn of this conversation is still running)"
    )
    assert AgentNotFoundError("x", ("a", "b")).available == ("a", "b")
    assert SettingsError(iter(["A: bad"])).problems == ("A: bad",)
    assert str(SettingsError(["A: bad"])) == "A: bad"
    reason = SignatureErrorReason.NO_MATCHING_SIGNATURE
    assert str(SignatureVerificationError(reason)) == "no matching signature"


@pytest.mark.parametrize(
    ("args", "argument"), [(([], "x"), "name"), ((5, "x"), "name"), (("missing-end", 5), "detail")]
)
def test_a_protocol_violation_built_with_the_wrong_type_names_the_argument(
    args: tuple[Any, ...], argument: str
) -> None:
    # ProtocolViolation([], "x") said "unhashable type: 'list'"; a detail of 5 was taken.
    with pytest.raises(TypeError, match=rf"^{argument} must be a str"):
        ProtocolViolation(*args)
    assert str(ProtocolViolation("missing-end", "x")) == "missing-end: x"
