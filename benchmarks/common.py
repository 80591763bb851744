"""What every part of the harness shares: the secret, the bodies, signing, expected bytes.

Deliberately free of ``layercode_asgi`` imports: the reference server (another venv, another
Python) and the floor app import this module too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import time
from typing import Any

#: The webhook secret every server under test is configured with.
SECRET = "whsec_bench_7d3f0c2a9e8b4f16a5c1"
#: The webhook route of every server under test.
PATH = "/api/agent"
#: What the user "said": the echo agents answer "You said: " + TEXT.
TEXT = "Hi, I'd like to check the status of my order from last Tuesday, please."
REPLY = "You said: " + TEXT
#: Length of generated ids: equal lengths keep every request and reply the same size.
_ID_DIGITS = 7


def message_body(prefix: str, index: int, turn: int | None = None) -> bytes:
    """A realistic, compact ``message`` webhook body with its own conversation and turn
    (``turn``: the turn's number in conversation ``index``; default: a new conversation).

    ``prefix`` has five characters so that every body (and every reply) has the same size.
    """
    assert len(prefix) == 5, prefix
    turn = index if turn is None else turn
    body: dict[str, Any] = {
        "type": "message",
        "session_id": f"sess_{prefix}_{index:0{_ID_DIGITS}d}",
        "conversation_id": f"conv_{prefix}_{index:0{_ID_DIGITS}d}",
        "turn_id": f"turn_{prefix}_{turn:0{_ID_DIGITS}d}",
        "text": TEXT,
        "metadata": {"user_id": "u_48213", "plan": "pro", "locale": "en-GB"},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def signature(body: bytes, timestamp: int | None = None, secret: str = SECRET) -> str:
    """``t=<ts>,v1=<hex>`` computed independently of the library under test."""
    t = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def http_request(body: bytes, *, timestamp: int | None = None, host: str = "127.0.0.1") -> bytes:
    """The raw HTTP/1.1 keep-alive request of one signed webhook."""
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"host: {host}\r\n"
        "content-type: application/json\r\n"
        f"layercode-signature: {signature(body, timestamp)}\r\n"
        f"content-length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def echo_events(turn_id: str, reply: str = REPLY) -> list[bytes]:
    """The SSE events our echo agent sends for one turn (what the floor app writes)."""
    return [
        sse_event({"type": "response.tts", "content": reply, "turn_id": turn_id}),
        sse_event({"type": "response.end", "turn_id": turn_id}),
    ]


#: A turn id of the generated length, for the floor app's constant reply.
FLOOR_TURN_ID = f"turn_floor_{0:0{_ID_DIGITS}d}"  # same length as generated ids


def raise_nofile(limit: int = 65536) -> int:
    """Raise the open-files soft limit as far as the hard limit allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if not value else float(value)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if not value else int(value)


def gc_probe() -> None:
    """With ``BENCH_GC_LOG`` set, note every garbage collection of this (server) process:
    ``[start, generation, pause ms]``, start on the system-wide monotonic clock, written
    to that file as JSON when the process exits. The harness reads the pauses of each
    measured window: a collection stops every stream of the process at once."""
    path = os.environ.get("BENCH_GC_LOG")
    if not path:
        return
    import atexit
    import gc

    events: list[tuple[float, int, float]] = []
    began = [0.0]

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.monotonic()
        else:
            pause = (time.monotonic() - began[0]) * 1000.0
            events.append((round(began[0], 4), info["generation"], round(pause, 3)))

    def write() -> None:
        with open(path, "w") as out:
            json.dump(events, out)

    gc.callbacks.append(note)
    atexit.register(write)
