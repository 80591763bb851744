"""Soak: many concurrent conversations on two worker processes sharing Redis, then an audit.

    .venv/bin/python scripts/soak.py                      # 60 s, 200 conversations, 2 workers
    .venv/bin/python scripts/soak.py --smoke              # a few seconds (CI)

Starts its own ``redis-server`` on a free 127.0.0.1 port (or uses ``--redis-url``) and two
``uvicorn --factory layercode_asgi.server:app_from_env`` processes with the echo agent.
Every conversation opens with ``session.start``, then sends turns one after another for
the whole duration, alternating between the workers, checking each reply (the echoed
text, ``turn_id`` on every event, exactly one ``response.end``, last). At the end the
history of every conversation is read from Redis and compared with what was answered:
entries lost or out of order are counted. Prints a summary (and ``--json`` writes it);
exits 1 unless every turn was answered and nothing was lost, reordered or failed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import msgspec  # noqa: E402

from layercode_asgi import ConversationManager, RedisConversationStore, sign  # noqa: E402
from layercode_asgi.agents import ECHO_GREETING  # noqa: E402

SECRET = "whsec_soak"


@dataclass
class Summary:
    duration_s: float
    conversations: int
    workers: int
    turns_sent: int = 0
    turns_answered: int = 0
    history_entries_expected: int = 0
    history_entries_lost: int = 0
    history_entries_out_of_order: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    rss_start_kib: list[int] = field(default_factory=list)
    rss_end_kib: list[int] = field(default_factory=list)
    turns_per_second: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.errors == 0
            and self.turns_sent == self.turns_answered
            and self.history_entries_lost == 0
            and self.history_entries_out_of_order == 0
            and self.turns_answered > 0
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def start_redis() -> tuple[subprocess.Popen[bytes], str, tempfile.TemporaryDirectory[str]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (bash scripts/test installs it)")
    port = free_port()
    workdir = tempfile.TemporaryDirectory(prefix="soak-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir.name, "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return process, url, workdir
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


#: The workers' (and the audit's) LAYERCODE_HISTORY_MAX_MESSAGES: every turn is kept.
MAX_MESSAGES = 1_000_000


def start_worker(redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "LAYERCODE_WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_url,
        "LAYERCODE_AGENT": "echo",
        "LAYERCODE_HISTORY_MAX_MESSAGES": str(MAX_MESSAGES),
        "LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "layercode_asgi.server:app_from_env",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def body(kind: str, conversation: str, **fields: Any) -> bytes:
    return msgspec.json.encode(
        {"type": kind, "session_id": f"s-{conversation}", "conversation_id": conversation, **fields}
    )


async def one_turn(
    client: httpx.AsyncClient, url: str, payload: bytes, turn_id: str, expected: str
) -> str | None:
    """Send one turn; return None when the reply is right, else what was wrong."""
    headers = {"layercode-signature": sign(payload, SECRET), "content-type": "application/json"}
    async with client.stream("POST", url + "/api/agent", content=payload, headers=headers) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            return f"content-type {r.headers.get('content-type')}"
        raw = await r.aread()
    events = [
        msgspec.json.decode(line[6:])
        for line in raw.decode().split("\n")
        if line.startswith("data: ")
    ]
    types = [e.get("type") for e in events]
    if types.count("response.end") != 1 or types[-1] != "response.end":
        return f"events {types}"
    if any(e.get("turn_id") != turn_id for e in events):
        return "wrong turn_id"
    spoken = "".join(e["content"] for e in events if e.get("type") == "response.tts")
    if spoken != expected:
        return f"spoke {spoken!r}, expected {expected!r}"
    return None


async def conversation(
    index: int, urls: list[str], client: httpx.AsyncClient, deadline: float, summary: Summary
) -> tuple[str, list[tuple[str, str]]]:
    """Run one conversation until the deadline; return its id and what its history holds."""
    cid = f"soak-{index}-{random.getrandbits(32):08x}"
    expected: list[tuple[str, str]] = []
    turn = 0
    worker = index % len(urls)
    while True:
        if turn == 0:
            payload, text, reply = (
                body("session.start", cid, turn_id=f"{cid}-t0"),
                None,
                ECHO_GREETING,
            )
        else:
            text = f"message {turn} of {cid} ✓"
            payload = body("message", cid, turn_id=f"{cid}-t{turn}", text=text)
            reply = f"You said: {text}"
        summary.turns_sent += 1
        try:
            problem = await one_turn(client, urls[worker], payload, f"{cid}-t{turn}", reply)
        except (httpx.HTTPError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            summary.turns_answered += 1
            if text is not None:
                expected.append(("user", text))
            expected.append(("assistant", reply))
        else:
            summary.errors += 1
            if len(summary.error_samples) < 10:
                summary.error_samples.append(f"{cid} turn {turn}: {problem}")
        turn += 1
        worker = (worker + 1) % len(urls)  # turns alternate between the workers
        if time.monotonic() >= deadline:
            return cid, expected


async def audit(
    redis_url: str, expected: dict[str, list[tuple[str, str]]], summary: Summary
) -> None:
    # Read under the workers' bound: a store reads a history within its own bounds.
    store = RedisConversationStore(redis_url, max_messages=MAX_MESSAGES)
    async with ConversationManager(store) as history:
        for cid, wanted in expected.items():
            got = [(m.role, m.text) for m in await history.get_history(cid)]
            summary.history_entries_expected += len(wanted)
            missing = len(wanted) - sum(1 for item in wanted if item in got)
            summary.history_entries_lost += missing
            # out of order: entries present in both, at a different relative position
            stored_order = [item for item in got if item in wanted]
            wanted_order = [item for item in wanted if item in got]
            summary.history_entries_out_of_order += sum(
                1 for a, b in zip(stored_order, wanted_order, strict=True) if a != b
            )


async def load(
    urls: list[str], conversations: int, duration: float, summary: Summary
) -> dict[str, list[tuple[str, str]]]:
    limits = httpx.Limits(
        max_connections=conversations * 2, max_keepalive_connections=conversations * 2
    )
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        deadline = time.monotonic() + duration
        results = await asyncio.gather(
            *(conversation(i, urls, client, deadline, summary) for i in range(conversations))
        )
    return dict(results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument(
        "--conversations", type=int, default=200, help="concurrent conversations (default 200)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--smoke", action="store_true", help="4 s, 20 conversations (for CI)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.conversations = 4.0, 20
    for name in ("workers", "conversations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if not 0 < args.duration < math.inf:  # NaN too: the load would never end
        parser.error(f"--duration must be a finite number of seconds > 0, got {args.duration}")

    redis_process = workdir = None
    if args.redis_url:
        redis_url = args.redis_url
    else:
        redis_process, redis_url, workdir = start_redis()
    workers = [start_worker(redis_url) for _ in range(args.workers)]
    summary = Summary(
        duration_s=args.duration, conversations=args.conversations, workers=args.workers
    )
    try:
        for _, url in workers:
            wait_http(url + "/ready")
        urls = [url for _, url in workers]
        # warm-up so the start RSS is that of a serving process, not a fresh one
        asyncio.run(load(urls, 2, 0.5, Summary(0, 2, args.workers)))
        summary.rss_start_kib = [rss_kib(p.pid) for p, _ in workers]
        started = time.monotonic()
        raw_expected = asyncio.run(load(urls, args.conversations, args.duration, summary))
        elapsed = time.monotonic() - started
        summary.rss_end_kib = [rss_kib(p.pid) for p, _ in workers]
        summary.turns_per_second = round(summary.turns_answered / elapsed, 1)
        asyncio.run(audit(redis_url, raw_expected, summary))
    finally:
        for process, _ in workers:
            process.send_signal(signal.SIGTERM)
        for process, _ in workers:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        if redis_process is not None:
            redis_process.kill()
            redis_process.wait()
        if workdir is not None:
            workdir.cleanup()

    report = asdict(summary) | {"ok": summary.ok}
    for key, value in report.items():
        print(f"{key:<32} {value}")
    if args.json:
        args.json.write_text(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
