"""``serve --workers 2`` with ``LAYERCODE_METRICS=true``: a scrape of either worker sums both
(prometheus-client's multiprocess mode, set up by the supervisor)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import SECRET, event_body, signed_headers, start_server_process

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

TURNS = 12
SCRAPES = 8


def _counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "layercode_turns_total" and sample.labels["outcome"] == "completed":
                out["completed"] = sample.value
            elif sample.name == "layercode_webhook_requests_total":
                out["requests"] = out.get("requests", 0) + sample.value
            elif sample.name == "layercode_turn_first_tts_seconds_count":
                out["first_tts"] = sample.value
            elif sample.name == "layercode_open_streams":
                out["open"] = sample.value
    return out


@pytest.mark.parametrize("own_dir", [False, True])
def test_two_workers_scrape_sums_both(tmp_path: Path, own_dir: bool) -> None:
    env = {
        **os.environ,
        "LAYERCODE_WEBHOOK_SECRET": SECRET,
        "LAYERCODE_METRICS": "true",
        "LAYERCODE_METRICS_API_KEYS": "scrape-key",
    }
    if own_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    else:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # the server's own temporary directory: test runs side by side share the system one
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env["TMPDIR"] = str(temporary)
    server = start_server_process(
        [
            *(sys.executable, "-m", "layercode_asgi", "serve", "--env-file", ""),
            *("--workers", "2", "--port", "{port}"),
        ],
        env=env,
    )
    try:
        for index in range(TURNS):
            body = event_body("message", turn_id=f"t{index}", conversation_id=f"c{index}")
            # a new connection each: the kernel hands them to either worker
            response = httpx.post(
                server.url + "/api/agent", content=body, headers=signed_headers(body)
            )
            assert response.status_code == 200 and "response.end" in response.text
        assert httpx.get(server.url + "/metrics").status_code == 401
        for _ in range(SCRAPES):
            scrape = httpx.get(
                server.url + "/metrics", headers={"authorization": "Bearer scrape-key"}
            )
            assert scrape.status_code == 200
            assert _counts(scrape.text) == {
                "completed": TURNS,
                "requests": TURNS,
                "first_tts": TURNS,
                "open": 0,
            }
        made = list(temporary.glob("layercode-metrics-*"))
        # without a directory of the user's, the supervisor made one of its own
        assert len(made) == (0 if own_dir else 1), made
        if own_dir:
            # both workers wrote there (and the supervisor, which built the app once to check it)
            pids = {path.stem.rsplit("_", 1)[-1] for path in tmp_path.glob("*.db")}
            assert len(pids) >= 2, sorted(path.name for path in tmp_path.glob("*"))
    finally:
        status = server.stop(signal.SIGTERM, timeout=20)
    assert status == 0, server.output()
    if own_dir:
        assert list(tmp_path.glob("*.db"))  # the user's directory is left as it is
    # the supervisor's own directory is gone with it
    assert not list(temporary.glob("layercode-metrics-*"))
