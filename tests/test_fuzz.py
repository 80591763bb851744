"""Fuzzing the HTTP surface of ``create_app``: random methods, paths, headers, bodies, signatures.

Requests are driven straight through the ASGI interface, so header names and values can be
any bytes (beyond what an HTTP client would let us send). For every request: no 500, no
exception escaping the app, no stack trace in any response, and the agent runs only for
requests that carry a valid signature.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layercode_asgi import Settings, create_app, sign

from .asgi_stub import ASGIStub
from .conftest import SECRET

calls = {"agent": 0}


async def counting_agent(event: Any) -> AsyncIterator[str]:
    calls["agent"] += 1
    yield "ok"


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


APP = create_app(
    Settings(
        env_file=None,
        environ={},
        layercode_webhook_secret=SECRET,
        layercode_api_key="k",
        layercode_api_url=_dead_url(),  # authorize → 502 quickly, never the internet
        max_body_size=4096,
    ),
    counting_agent,
    authorize_timeout=0.5,
)

KNOWN_PATHS = ["/api/agent", "/api/authorize", "/health", "/ready", "/", "/api/agent/", "/api"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)
event_types = st.sampled_from(
    ["message", "session.start", "data", "session.update", "session.end", "x.future", ""]
)
events = st.fixed_dictionaries(
    {"type": event_types},
    optional={
        "session_id": st.text(max_size=20) | json_values,
        "conversation_id": st.text(max_size=20) | json_values,
        "turn_id": st.text(max_size=20) | json_values,
        "text": st.text(max_size=50) | json_values,
        "data": json_values,
        "transcript": st.lists(
            st.fixed_dictionaries(
                {"role": st.text(max_size=10), "text": st.text(max_size=20)},
                optional={"timestamp": st.integers() | st.text(max_size=10) | st.none()},
            ),
            max_size=3,
        )
        | json_values,
    },
).map(msgspec.json.encode)
bodies = st.one_of(st.binary(max_size=600), events, events.map(lambda b: b[: len(b) // 2]))
header_bytes = st.binary(max_size=80)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(bodies)
    signature_kind = draw(st.sampled_from(["none", "valid", "other-body", "garbage", "stale"]))
    headers: list[tuple[bytes, bytes]] = [
        (draw(st.binary(min_size=1, max_size=20)).lower(), draw(header_bytes))
        for _ in range(draw(st.integers(0, 4)))
    ]
    if signature_kind == "valid":
        headers.append((b"layercode-signature", sign(body, SECRET).encode()))
    elif signature_kind == "other-body":
        headers.append((b"layercode-signature", sign(body + b"x", SECRET).encode()))
    elif signature_kind == "garbage":
        headers.append((b"layercode-signature", draw(header_bytes)))
    elif signature_kind == "stale":
        headers.append((b"layercode-signature", sign(body, SECRET, timestamp=1).encode()))
    if draw(st.booleans()):
        headers.append(
            (
                b"content-length",
                draw(st.sampled_from([str(len(body)).encode(), b"0", b"x", b"99999999"])),
            )
        )
    return {
        "method": draw(st.sampled_from(METHODS) | st.text(min_size=1, max_size=8)),
        "path": draw(st.sampled_from(KNOWN_PATHS) | st.text(max_size=30).map(lambda p: "/" + p)),
        "headers": headers,
        "body": body,
        "chunks": draw(st.integers(1, 3)),
        "valid": signature_kind == "valid",
    }


async def drive(request: dict[str, Any]) -> tuple[int | None, bytes]:
    body: bytes = request["body"]
    n = request["chunks"]
    size = max(1, -(-len(body) // n))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    stub = ASGIStub(
        chunks=pieces, method=request["method"], path=request["path"], headers=request["headers"]
    )
    stub.scope["state"] = {}  # as a server that ran the app's lifespan passes it
    await stub.run(APP, limit=10)  # the client stays until the response is complete
    return stub.status, stub.body


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=requests())
def test_http_surface_never_500_never_leaks_never_lets_unsigned_in(request: dict[str, Any]) -> None:
    before = calls["agent"]
    status, content = asyncio.run(drive(request))
    assert status != 500, content
    assert 200 <= status < 600
    assert b"Traceback" not in content and b'File "' not in content
    if calls["agent"] != before:
        assert request["valid"], "an unsigned or mis-signed request reached the agent"
        assert request["path"] == "/api/agent" and request["method"] == "POST"
    if status >= 400:
        assert msgspec.json.decode(content)["error"]


def test_the_driver_reaches_the_agent_with_a_valid_signature() -> None:
    """The control: the same driver, a valid signed turn, and the agent does run."""
    body = msgspec.json.encode(
        {"type": "message", "session_id": "s", "conversation_id": "c", "turn_id": "t", "text": "hi"}
    )
    before = calls["agent"]
    status, content = asyncio.run(
        drive(
            {
                "method": "POST",
                "path": "/api/agent",
                "headers": [(b"layercode-signature", sign(body, SECRET).encode())],
                "body": body,
                "chunks": 2,
                "valid": True,
            }
        )
    )
    assert status == 200
    assert calls["agent"] == before + 1
    assert content.endswith(b'data: {"type":"response.end","turn_id":"t"}\n\n')


@pytest.mark.parametrize("examples", ["0", "-5"])
def test_the_fuzz_script_refuses_a_count_it_cannot_run(
    examples: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: hypothesis' InvalidArgument traceback (exit 1) instead of a usage error.
    path = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("fuzz_script", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["fuzz.py", "--examples", examples])
    with pytest.raises(SystemExit) as exited:
        script.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: --examples must be 1 or more" in err and "Traceback" not in err
