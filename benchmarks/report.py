# ruff: noqa: E501, RUF001  (report prose: long lines and typographic signs)
"""RESULTS.md and results.png from the harness's measurements (no number is typed by hand)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

SERVER_ORDER = (
    "floor",
    "ours_no_history",
    "ours_small_history",
    "ours",
    "ours_sse_starlette",
    "reference",
)
PLOT_ORDER = ("floor", "ours", "ours_sse_starlette", "reference")
PACED_ORDER = ("floor", "ours", "ours-metrics", "sse-starlette", "reference")
PACED_COLORS = {
    "floor": "#9e9e9e",
    "ours": "#2e7d32",
    "ours-metrics": "#1565c0",
    "sse-starlette": "#81c784",
    "reference": "#c62828",
}
#: The paced targets hold at every N up to this.
PACED_MAX_N = 1000


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as measured ratio and verdict (``n/a`` when not measured)."""
    out: list[dict[str, Any]] = []
    servers = _get(results, "e2e", "servers") or {}
    ours, floor, ref = servers.get("ours"), servers.get("floor"), servers.get("reference")

    def add(target: str, value: float | None, ok: bool | None, how: str) -> None:
        out.append(
            {
                "target": target,
                "measured": "not measured" if value is None else value,
                "verdict": _verdict(ok if value is not None else None),
                "how": how,
            }
        )

    def paired(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
        """Median over rounds of a[key][i] / b[key][i]: both measured in the same round,
        seconds apart, so the VM's slow drift in speed cancels out."""
        if not a or not b:
            return None
        pairs = [x / y for x, y in zip(a[key], b[key], strict=True) if x and y]
        return statistics.median(pairs) if pairs else None

    def of_medians(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
        return (
            ""
            if not a or not b or not a[key] or not b[key]
            else f"; ratio of medians {a[key] / b[key]:.2f}"
        )

    out.extend(paced_targets(results))
    ratio = paired(ours, ref, "rps_all")
    add(
        "echo throughput (wrk end to end) >= 10x the reference",
        None if ratio is None else round(ratio, 2),
        ratio is not None and ratio >= 10,
        "req/s ours / reference, median of per-round ratios" + of_medians(ours, ref, "rps_median"),
    )
    ratio = paired(ours, floor, "rps_all")
    out.append(
        {
            "target": "echo throughput, ours / floor (information; no target)",
            "measured": "not measured" if ratio is None else round(ratio, 3),
            "verdict": "info",
            "how": "req/s ours / floor, median of per-round ratios"
            + of_medians(ours, floor, "rps_median"),
        }
    )
    sig = _get(results, "micro", "signature", "rate_ratio")
    add(
        "verify_signature >= 80% of the bare hmac loop's rate",
        sig,
        sig is not None and sig >= 0.8,
        "calls/s verify_signature / calls/s bare loop (best of interleaved rounds)",
    )
    for check in _get(results, "micro", "decode", "checks") or []:
        add(
            f"decode {check['case']}: {check['check']}",
            check["value"],
            bool(check["pass"]),
            "bench_decode.py (events issue), same run",
        )
    crowd = [r for r in _get(results, "concurrency", "ours") or [] if r["streams"] >= 1000]
    if crowd:
        per = crowd[-1]["rss_per_stream_kib"]
        errors = crowd[-1]["errors"]
        add(
            "1,000 concurrent open streams: <= 30 KB RSS each",
            per,
            per * 1024 <= 30_000,
            "(peak - baseline server RSS) / 1000, KiB",
        )
        add(
            "1,000 concurrent open streams: no errors",
            errors,
            errors == 0,
            "streams that failed, timed out or lacked response.end",
        )
    else:
        add(
            "1,000 concurrent open streams: <= 30 KB RSS each, no errors",
            None,
            None,
            "not run (smoke mode runs 20 streams)",
        )
    return out


def paced_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The paced targets: at every N <= 1,000, p99 first-tts overhead <= 1.5x the floor's,
    0 errors; <= 30 KiB per open stream."""
    paced = _get(results, "paced", "results") or {}
    ours, floor = paced.get("ours") or {}, paced.get("floor") or {}
    levels = sorted(int(n) for n in ours if int(n) <= PACED_MAX_N and str(n) in floor)
    out: list[dict[str, Any]] = []
    if not levels:
        return [
            {
                "target": "paced: p99 first-tts overhead <= 1.5x the floor's at every N <= 1,000",
                "measured": "not measured",
                "verdict": "n/a",
                "how": "benchmarks/paced.py",
            }
        ]
    per_round = _p99_ratios(_get(results, "paced", "p99_rounds") or [])
    if per_round:
        ratios = {n: statistics.median(r) for n, r in per_round.items()}
        how = (
            "worst N of the median over interleaved rounds of ours p99 / floor p99 (first "
            "response.tts minus the 100 ms think); "
            + "; ".join(
                f"N={n}: {ratios[n]:.2f} (rounds: {', '.join(f'{r:.2f}' for r in per_round[n])})"
                for n in sorted(ratios)
            )
            + _calibration(results)
            + "; the table's one run: "
        )
    else:
        ratios, how = {}, "worst N of ours p99 / floor p99 in the table; "
    table = {
        n: ours[str(n)]["first_tts_p99_ms"] / floor[str(n)]["first_tts_p99_ms"]
        for n in levels
        if ours[str(n)]["first_tts_p99_ms"] and floor[str(n)]["first_tts_p99_ms"]
    }
    ratios = ratios or table
    worst = max(ratios.values()) if ratios else None
    out.append(
        {
            "target": "paced: p99 first-tts overhead <= 1.5x the floor's at every N <= 1,000",
            "measured": "not measured" if worst is None else round(worst, 2),
            "verdict": _verdict(None if worst is None else worst <= 1.5),
            "how": how + ", ".join(f"N={n}: {r:.2f}" for n, r in table.items()),
        }
    )
    errors = sum(ours[str(n)]["errors"] for n in levels)
    out.append(
        {
            "target": "paced: 0 errors at every N <= 1,000",
            "measured": errors,
            "verdict": _verdict(errors == 0),
            "how": "failed or incomplete turns of ours, all N <= 1,000",
        }
    )
    per_stream = max(ours[str(n)]["rss_kib_per_stream"] for n in ours)
    out.append(
        {
            "target": "paced: <= 30 KiB RSS per open stream",
            "measured": per_stream,
            "verdict": _verdict(per_stream <= 30),
            "how": "ours: (peak - baseline server RSS) / N, worst N, KiB",
        }
    )
    out.append(metrics_cost_target(_get(results, "paced") or {}))
    return out


def _p99_ratios(rounds: list[dict[str, Any]], server: str = "ours") -> dict[int, list[float]]:
    """By N <= 1,000: ``server``'s p99 / floor p99, one value per interleaved round."""
    out: dict[int, list[float]] = {}
    for one in rounds:
        ours, floor = one.get(server) or {}, one.get("floor") or {}
        for n, p99 in ours.items():
            if int(n) <= PACED_MAX_N and p99 and floor.get(n):
                out.setdefault(int(n), []).append(p99 / floor[n])
    return out


def _calibration(results: dict[str, Any]) -> str:
    """In the same rounds: the p99 ratio of the floor made as costly per turn as ours."""
    busy = _get(results, "paced", "busy_us")
    per_round = _p99_ratios(_get(results, "paced", "p99_rounds") or [], "floor+cpu")
    if not per_round or busy is None:
        return ""
    return (
        f"; in the same rounds the floor spending {busy:.0f} µs more CPU per turn (as much "
        "as ours, `floor+cpu`): "
        + "; ".join(f"N={n}: {statistics.median(r):.2f}" for n, r in sorted(per_round.items()))
    )


def _metrics_cost(paced: dict[str, Any]) -> dict[int, list[float]]:
    """By N: the metrics' extra server CPU per turn (``ours-metrics`` / ``ours`` - 1), one
    value per interleaved round (``metrics_rounds``); without rounds, the table's one pair."""
    rounds = paced.get("metrics_rounds") or [
        {
            name: {
                n: r["server_cpu_us_per_turn"]
                for n, r in (paced.get("results") or {}).get(name, {}).items()
            }
            for name in ("ours", "ours-metrics")
        }
    ]
    cost: dict[int, list[float]] = {}
    for cpu in rounds:
        off, on = cpu.get("ours") or {}, cpu.get("ours-metrics") or {}
        for n in off:
            if n in on and off[n] and on[n]:
                cost.setdefault(int(n), []).append(on[n] / off[n] - 1)
    return cost


def metrics_cost_target(paced: dict[str, Any]) -> dict[str, Any]:
    """Recording the per-turn metrics (LAYERCODE_METRICS=true) costs <= 5% more server CPU
    per paced turn, at every N <= 1,000 (the median of the interleaved rounds)."""
    cost = {n: statistics.median(c) for n, c in _metrics_cost(paced).items() if n <= PACED_MAX_N}
    worst = max(cost.values()) if cost else None
    return {
        "target": "paced: metrics on (LAYERCODE_METRICS=true) <= 5% more server CPU per turn",
        "measured": "not measured" if worst is None else f"{worst * 100:+.1f}%",
        "verdict": _verdict(None if worst is None else worst <= 0.05),
        "how": "worst N of the median over interleaved rounds of ours-metrics / ours server "
        "CPU µs per turn - 1; "
        + ", ".join(f"N={n}: {c * 100:+.1f}%" for n, c in sorted(cost.items())),
    }


def _over(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is 0 (a short smoke run on a busy machine may measure 0)."""
    return a / b if b else math.nan


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += [
        "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m, v, cfg = results["machine"], results.get("versions", {}), results["config"]
    parts: list[str] = []
    add = parts.append
    add("# Benchmark results\n")
    add(
        f"Written by `benchmarks/run.py` ({results['mode']} run, {results['date']}, "
        f"{results['elapsed_s']} s). Every number below comes from that one run on one machine; "
        "nothing is typed by hand.\n"
    )
    add(f"```\n{results['command']}\n```\n")
    if results["mode"] == "smoke":
        add(
            "> **Smoke run**: seconds-long loads, 20 concurrent streams. The numbers only show that "
            "the harness works; run it without `--smoke` for real ones.\n"
        )
    add("## Machine and versions\n")
    add(f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB; Linux {m['kernel']}")
    add("- " + ", ".join(f"{k} {val}" for k, val in v.items()))
    add(
        "- Servers: `uvicorn --loop uvloop --http httptools --workers 1 --log-level warning`, "
        "one at a time, pinned to CPU 0; wrk, the probe and the clients on the other CPU(s).\n"
    )
    for note in results.get("notes", []):
        add(f"> Note: {note}\n")
    for failure in results.get("failures", []):
        add(f"> **Failed part** — {failure}\n")

    add("## Headline: targets, as ratios measured in this run\n")
    add(
        _table(
            ["target", "measured", "verdict", "how"],
            [
                [
                    t["target"],
                    _fmt(t["measured"], 3)
                    if isinstance(t["measured"], float)
                    else str(t["measured"]),
                    f"**{t['verdict']}**",
                    t["how"],
                ]
                for t in results.get("targets", [])
            ],
        )
    )
    add("")

    add(_paced_section(results))
    servers = _get(results, "e2e", "servers") or {}
    if servers:
        add("## End to end: a signed `message` webhook → the whole SSE reply\n")
        add(
            f"wrk `-t{cfg['threads']} -c{cfg['connections']} -d{cfg['duration']:.0f}s`, HTTP/1.1 "
            f"keep-alive, {cfg['rounds']} round(s) per server, servers interleaved round by round; "
            "table values are medians over rounds; the headline ratios are medians of per-round "
            "ratios (the servers of one round run seconds apart, so the VM's slow drift in speed "
            "cancels out).\n"
        )
        rows = []
        for name in SERVER_ORDER:
            s = servers.get(name)
            if s:
                rows.append(
                    [
                        s["label"],
                        s["rps_median"],
                        s["lat_p50_ms"],
                        s["lat_p99_ms"],
                        s["ttfb_p50_ms"],
                        s["ttfb_p99_ms"],
                        s["cpu_us_per_request"],
                        s["errors"],
                        ", ".join(f"{x:,.0f}" for x in s["rps_all"]),
                    ]
                )
        add(
            _table(
                [
                    "server",
                    "req/s",
                    "latency p50 ms",
                    "latency p99 ms",
                    "TTFB p50 ms",
                    "TTFB p99 ms",
                    "server CPU µs/req",
                    "errors",
                    "req/s per round",
                ],
                rows,
            )
        )
        add("")
        ours, floor, ref, sse = (
            servers.get(k) for k in ("ours", "floor", "reference", "ours_sse_starlette")
        )
        lines = []
        if ours and floor:
            lines.append(
                f"- ours / floor: **{_over(ours['rps_median'], floor['rps_median']):.2f}×** throughput; "
                f"server CPU per request {ours['cpu_us_per_request']:.0f} µs vs "
                f"{floor['cpu_us_per_request']:.0f} µs."
            )
        if ours and ref:
            lines.append(
                f"- ours / reference: **{_over(ours['rps_median'], ref['rps_median']):.1f}×** throughput; "
                f"latency p50 {_over(ref['lat_p50_ms'], ours['lat_p50_ms']):.1f}× lower."
            )
        if ours and sse:
            lines.append(
                f"- our `EventStreamResponse` / sse-starlette for the same turns: "
                f"**{_over(ours['rps_median'], sse['rps_median']):.2f}×** throughput, "
                f"CPU per request {sse['cpu_us_per_request']:.0f} → {ours['cpu_us_per_request']:.0f} µs."
            )
        add("\n".join(lines) + "\n")
        add("How each number is measured:\n")
        add(
            "- **req/s, latency p50/p99**: wrk's own (`done()` hook of `wrk_signed.lua`): the time from "
            "writing a request to reading the end of its response, over all connections.\n"
            "- **Requests**: each one a different conversation and turn, each with its own valid "
            "`layercode-signature` (HMAC over the exact body, signed by the harness right before the "
            "run; wrk's LuaJIT has no HMAC, so `wrk_signed.lua` cycles through pre-signed bodies). "
            "Verification is real: a stale or wrong signature would be a 401 and count as an error. "
            "Distinct conversations keep requests from queueing on one conversation's lock (ours and "
            "the reference both lock per conversation), as real LayerCode traffic does.\n"
            "- **TTFB**: a separate asyncio client in the harness sends signed turns on its own "
            "keep-alive connection while wrk loads the server; TTFB is from writing the request to "
            "reading the first byte of the first SSE event (the first body chunk).\n"
            "- **Server CPU µs/req**: the server process's user+system CPU time over the wrk run "
            "divided by the requests wrk completed (the server runs at ~100% of its CPU).\n"
            "- **floor**: `floor_app.py`, a bare ASGI app that reads the body and writes the same SSE "
            "bytes (both events, one body message) with no verification, parsing or agent. "
            "**reference**: `layercode-create-app` 0.2.0's own `create_app` + echo agent, built as its "
            "CLI builds it (FastAPI, logfire instrumentation as shipped), with per-request console "
            "logging off (`LOG_LEVEL=WARNING`, `LOGFIRE_CONSOLE=false`), as ours logs nothing per "
            "request at warning level. **ours**: `create_app(Settings(...))` with the echo agent and "
            "the default in-memory conversation history. **ours, turns via sse-starlette**: the same "
            "pipeline, each turn's bytes streamed through `create_sse_response` instead. "
            "**ours without history** and **ours, history of at most 100 conversations**: what "
            "keeping state costs.\n"
        )

    mic = results.get("micro") or {}
    if mic:
        add("## Micro\n")
        sig = mic["signature"]
        r = sig["results"]
        add(
            f"### `verify_signature` vs a bare hmac loop ({sig['body_bytes']}-byte `message` body)\n"
        )
        add(
            _table(
                ["function", "best ns/call", "median ns/call", "rate vs bare (paired median)"],
                [
                    [
                        'bare: `hmac.new(key, f"{t}.".encode()+body, sha256).hexdigest()` + `compare_digest`',
                        r["bare_hmac"]["best_ns"],
                        r["bare_hmac"]["median_ns"],
                        1.0,
                    ],
                    [
                        "`verify_signature(body, header, secret)` (parse header, check tolerance, HMAC, compare)",
                        r["verify_signature"]["best_ns"],
                        r["verify_signature"]["median_ns"],
                        f"{r['verify_signature']['paired_vs_base']:.3f}",
                    ],
                ],
            )
        )
        add(
            f"\nRate ratio (best of rounds): **{sig['rate_ratio']:.2f}**. `verify_signature` keeps each "
            "secret's HMAC key state (OpenSSL's HMAC after the key block) and copies it per message, "
            "which skips OpenSSL 3's per-call digest lookup and key hashing; the header's usual shape "
            "takes a one-regex fast path. Any other input takes the general path, which decides "
            "exactly as before.\n"
        )
        enc = mic["turn_encoding"]
        r = enc["results"]
        add(
            f"### Encoding a turn's SSE events ({enc['events_per_turn']} events, {enc['bytes_per_turn']} bytes: "
            "`response.tts` + `response.end`)\n"
        )
        add(
            _table(
                ["encoder", "best ns/turn", "median ns/turn", "× ours (best)"],
                [
                    [
                        "ours: the whole `Turn` (echo agent, timeout, events), run to its end on an event loop (`run_until_complete`, included)",
                        r["ours_turn"]["best_ns"],
                        r["ours_turn"]["median_ns"],
                        1.0,
                    ],
                    [
                        "ours: encoding only (the `Turn`'s byte-building expressions: prefix + msgspec + suffix)",
                        r["ours_encoding"]["best_ns"],
                        r["ours_encoding"]["median_ns"],
                        f"{enc['ours_encoding_over_ours']:.2f}",
                    ],
                    [
                        "sse-starlette `ServerSentEvent(...).encode()` of the same JSON: encoding only",
                        r["sse_starlette_events"]["best_ns"],
                        r["sse_starlette_events"]["median_ns"],
                        f"{enc['sse_starlette_over_ours']:.2f}",
                    ],
                ],
            )
        )
        add(
            f"\nThe first row also runs the agent and the turn's bookkeeping; the other rows only "
            f"format the same two events. Encoding alone, ours is "
            f"{enc['sse_starlette_over_encoding']:.0f}× faster than a dict, `json.dumps` and "
            "sse-starlette's `ServerSentEvent`: the event prefixes and the `turn_id` suffix are "
            "bytes computed once, and msgspec encodes only the text. (The reference's own "
            "encoding is in its end-to-end and paced figures; it is not timed apart here.)\n"
        )
        dec = mic.get("decode")
        if dec:
            add("### Event decode (`bench_decode.py`, the events issue)\n")
            add(
                _table(
                    [
                        "case",
                        "bytes",
                        "ours ns",
                        "msgspec untyped ns",
                        "reference ns (its venv)",
                        "msgspec untyped ns (its venv)",
                        "reference / ours",
                        "raw ns quotient",
                        "pydantic-best ns",
                        "pydantic-best / ours",
                        "ours / untyped",
                    ],
                    [
                        [
                            row["case"],
                            row["bytes"],
                            row["ours_ns"],
                            row["floor_ns"],
                            row.get("ref_ns"),
                            row.get("ref_floor_ns"),
                            row.get("speedup"),
                            row.get("speedup_raw"),
                            row.get("best_ns", "–"),
                            row.get("speedup_vs_best", "–"),
                            row["floor_ratio"],
                        ]
                        for row in dec["results"]
                    ],
                )
            )
            add(
                "\n- `ours` = `parse_webhook_payload(raw)`: one typed msgspec pass.\n"
                "- `reference` = the reference implementation as its server parses a webhook: "
                "`json.loads(body)`, then layercode-create-app 0.2.0's own `parse_webhook_payload`, "
                "a pydantic v2 `TypeAdapter` over the plain union of its five models, imported "
                "from the installed package in its own venv (Python >= 3.12) by "
                "`reference/ref_decode.py`; rounds alternate between the two processes. The "
                "targets are measured against this.\n"
                "- `reference / ours` compares the two processes through a common baseline, "
                "`msgspec.json.decode(raw)` timed in both: (reference / untyped in its venv) / "
                "(ours / untyped in ours). `raw ns quotient` is reference ns / ours ns as "
                "measured, for information.\n"
                "- `pydantic-best` (for information) = `json.loads` + a pydantic v2 `TypeAdapter` "
                "over a *discriminated* union of models with the same fields and plain `str` "
                "tags: pydantic as fast as it goes. The reference's plain union makes pydantic "
                "try its models in turn; that modelling, not pydantic itself, is the gap between "
                "the two columns.\n"
                "- `msgspec untyped` = `msgspec.json.decode(raw)` to dicts and lists: the floor "
                "for any typed decode.\n\n"
                "Best of interleaved rounds, GC on.\n"
            )
            end50 = next((row for row in dec["results"] if row["case"] == "session.end-50"), None)
            if end50:
                add(
                    f"For `session.end` with 50 transcript items, ours runs at "
                    f"{end50['floor_ratio']:.2f}× msgspec's untyped decode of the same bytes: 50 "
                    "small structs cost less to build than 50 dicts, and the strings, most of the "
                    "time, are the same in both. Against pydantic at its best the ratio would be "
                    f"{end50.get('speedup_vs_best', 0):.1f}×: pydantic's own floor is `json.loads`, "
                    "which builds those dicts and strings too.\n"
                )

    crowd = results.get("concurrency") or {}
    if crowd:
        add("## Concurrency: N turns open at once, the agent pausing between chunks\n")
        add(
            f"Each turn speaks {cfg['sleep_chunks']} chunks {cfg['sleep_interval']} s apart. The client "
            "opens N connections and starts every turn at once, then reads each stream to its "
            "`response.end`. Server RSS (`VmRSS`) is read before the first connection (after two "
            "warm-up turns) and every 20 ms while the streams are open; per stream = (peak − "
            "baseline) / N, connection included. TTFB is from writing a request to its first SSE "
            "byte, with all N arriving together.\n"
        )
        rows = []
        for name in ("ours", "floor", "reference"):
            for r in crowd.get(name, []):
                rows.append(
                    [
                        name,
                        r["streams"],
                        r["baseline_rss_kib"] / 1024,
                        r["peak_rss_kib"] / 1024,
                        r["rss_per_stream_kib"],
                        r["ttfb"]["p50_ms"],
                        r["ttfb"]["p99_ms"],
                        r["stream_duration_p50_s"],
                        r["errors"],
                    ]
                )
        add(
            _table(
                [
                    "server",
                    "streams",
                    "baseline RSS MiB",
                    "peak RSS MiB",
                    "KiB per stream",
                    "TTFB p50 ms",
                    "TTFB p99 ms",
                    "stream p50 s",
                    "errors",
                ],
                rows,
            )
        )
        examples = [e for name in crowd for r in crowd[name] for e in r["error_examples"]]
        if examples:
            add("\nError examples: " + "; ".join(f"`{e}`" for e in examples[:5]))
        add("")

    prof = results.get("profile")
    if prof:
        add("## Profile of ours under load (py-spy)\n")
        add(
            f"py-spy, 250 Hz, {prof['samples']:,} samples while wrk loaded `ours` "
            f"({prof['rps_while_profiled']:,.0f} req/s under the profiler). Inclusive share of "
            "samples per frame (library, framework and asyncio frames only), then the frames "
            "sampled on top. Sampling skews towards system calls (socket writes, `getpid` inside "
            "`asyncio.get_running_loop`): read shares as a map, not a budget.\n"
        )
        add("```")
        for frame, share in prof["inclusive"]:
            add(f"{share:5.1f}%  {frame}")
        add("--- on top")
        for frame, share in prof["self"]:
            add(f"{share:5.1f}%  {frame}")
        add("```\n")

    native = results.get("native")
    if native:
        add("## Native profile: where the server's CPU goes (perf)\n")
        add(
            "`perf record -e cpu-clock` on the server process while wrk loads it (same load as "
            "above, one run per server). Each share of samples is turned into µs per request with "
            "the server CPU per request measured over that run: the kernel (mostly TCP over "
            "loopback, charged to the process that writes), the Python interpreter (all Python "
            "code: uvicorn's, ours and the agent), and each native extension.\n"
        )
        rows = []
        for name in ("floor", "ours"):
            n = native.get(name)
            if n:
                rows.append(
                    [
                        name,
                        f"{n['cpu_us_per_request']:.1f}",
                        "; ".join(f"{dso} {us:.1f}" for dso, _, us in n["by_dso"][:6]),
                        "; ".join(f"{sym[4:]} {us:.1f}" for sym, _, us in n["kernel_symbols"][:3]),
                    ]
                )
        add(
            _table(
                [
                    "server",
                    "CPU µs/req",
                    "µs/req by binary (top 6)",
                    "top kernel functions, µs/req",
                ],
                rows,
            )
        )
        add("")

    add(_missed(results))
    add(_redis_section())
    add(DESIGN_NOTES)
    return "\n".join(parts) + "\n"


def _redis_section() -> str:
    """``paced_redis.py``'s own report (RESULTS-redis.md, its run and date), when it exists."""
    path = Path(__file__).resolve().parent / "RESULTS-redis.md"
    if not path.exists():
        return ""
    text = path.read_text().strip()
    heading, _, rest = text.partition("\n")
    title = heading.lstrip("# ").strip() or "Paced streaming with history on Redis"
    return f"## {title} (from RESULTS-redis.md)\n\n{rest.strip()}\n"


def _paced_section(results: dict[str, Any]) -> str:
    """The headline measurement: paced streaming turns, N clients in a closed loop."""
    paced = results.get("paced") or {}
    measured = paced.get("results") or {}
    if not measured:
        return ""
    pacing = paced["pacing"]
    parts = [
        "## Paced streaming: the work real agents do (the headline)\n",
        f"`benchmarks/paced.py`: N clients in a closed loop (each sends its next signed turn on "
        f"its keep-alive connection as soon as its last one ended; each client is one "
        f"conversation, whose history grows turn by turn), {paced['duration_s']:.0f} s "
        f"measured per N after a warm-up, one uvicorn worker pinned to CPU 0, the load on the "
        f"other CPU(s). Every agent thinks {pacing['think'] * 1000:.0f} ms (an LLM's time to "
        f"first token), then speaks {pacing['chunks']} chunks {pacing['interval'] * 1000:.0f} ms "
        "apart; the floor is a bare ASGI app with the same pacing and bytes. Client i of N "
        "starts i/N of a turn after the first (independent callers; started in one instant "
        "the clients stay in lockstep and every turn arrives in one burst). **first-tts "
        "overhead** = time to the first `response.tts` minus the think time; **extra** = the "
        "turn's wall time minus the agent's own pauses; **RSS per stream** = (peak - baseline "
        "server RSS) / N, after an unmeasured first level at the smallest N (what a server "
        "allocates once is not counted per stream); **GC**: the server's garbage collections in the measured window "
        "(full ones, the longest pause of any, the share of the time spent collecting), "
        "noted by the server process itself (`common.gc_probe`).\n",
    ]
    rows = []
    for name in PACED_ORDER:
        for n, r in sorted((measured.get(name) or {}).items(), key=lambda item: int(item[0])):
            rows.append(
                [
                    name,
                    int(n),
                    r["turns"],
                    r["errors"],
                    r["first_tts_p50_ms"],
                    r["first_tts_p99_ms"],
                    r["extra_p50_ms"],
                    r["extra_p99_ms"],
                    r["server_cpu_us_per_turn"],
                    r["load_cpu_share"],
                    r["rss_kib_per_stream"],
                    r.get("gc_full_collections", "—"),
                    r.get("gc_max_pause_ms", "—"),
                    r.get("gc_time_share", "—"),
                ]
            )
    parts.append(
        _table(
            [
                "server",
                "N",
                "turns",
                "errors",
                "first-tts overhead p50 ms",
                "p99 ms",
                "extra p50 ms",
                "extra p99 ms",
                "server CPU µs/turn",
                "load generator CPU share",
                "RSS KiB/stream",
                "full GCs",
                "longest GC pause ms",
                "GC time share",
            ],
            rows,
        )
    )
    ours, floor, sse = (measured.get(k) or {} for k in ("ours", "floor", "sse-starlette"))
    lines = []
    for n in sorted(ours, key=int):
        o, f, e = ours[n], floor.get(n), sse.get(n)
        if f and o["first_tts_p99_ms"] and f["first_tts_p99_ms"]:
            line = (
                f"- N={n}: ours p99 first-tts overhead {o['first_tts_p99_ms']:.1f} ms = "
                f"**{o['first_tts_p99_ms'] / f['first_tts_p99_ms']:.2f}×** the floor's "
                f"({f['first_tts_p99_ms']:.1f} ms)"
            )
            if e and e["first_tts_p99_ms"]:
                line += (
                    f"; sse-starlette's `EventSourceResponse` for the same turns "
                    f"{e['first_tts_p99_ms']:.1f} ms = "
                    f"**{e['first_tts_p99_ms'] / f['first_tts_p99_ms']:.2f}×** the floor's"
                )
                if o["server_cpu_us_per_turn"] and e["server_cpu_us_per_turn"]:
                    line += (
                        f", {e['server_cpu_us_per_turn'] / o['server_cpu_us_per_turn']:.2f}× "
                        "our server CPU per turn"
                    )
            lines.append(line + ".")
    for n, costs in sorted(_metrics_cost(paced).items()):
        lines.append(
            f"- N={n}: metrics on (`LAYERCODE_METRICS=true`: Prometheus, OpenTelemetry API "
            f"without an SDK) cost **{statistics.median(costs) * 100:+.1f}%** server CPU per "
            f"turn, the median of {len(costs)} interleaved round(s) of `ours` and "
            f"`ours-metrics` (per round: {', '.join(f'{c * 100:+.1f}%' for c in costs)}; "
            "target <= 5%)."
        )
    if lines:
        parts.append(
            "\n"
            + "\n".join(lines)
            + "\n\nsse-starlette misses the 1.5× target where the lines above say so: that is "
            "why turns keep our own small response.\n"
        )
    return "\n".join(parts) + "\n"


def _paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(statistics.median(x / y for x, y in zip(a["rps_all"], b["rps_all"], strict=True)))


def _native_gap(results: dict[str, Any]) -> str:
    """The ours - floor CPU difference split by binary, from the perf profile."""
    native = results.get("native") or {}
    floor, ours = native.get("floor"), native.get("ours")
    if not floor or not ours:
        return ""

    def part(n: dict[str, Any], match: str) -> float:
        return float(sum(us for dso, _, us in n["by_dso"] if match in dso))

    python = part(ours, "libpython") - part(floor, "libpython")
    kernel = part(ours, "kernel") - part(floor, "kernel")
    return (
        f" The native profile splits ours's extra CPU over the floor "
        f"({ours['cpu_us_per_request'] - floor['cpu_us_per_request']:+.0f} µs per request in "
        f"its runs): the Python interpreter {python:+.0f} µs, the kernel {kernel:+.0f} µs, the "
        "rest in native extensions (HMAC, msgspec, uvloop). The kernel's part grows although ours "
        "makes the same system calls per request as the floor (one read, two writes): each "
        "reply write runs the loopback TCP receive path and wakes the load generator, and a "
        "slower server finds it asleep more often."
    )


def _paced_causes(results: dict[str, Any]) -> str:
    """This run's figures behind the paced p99: CPU per turn and GC, ours vs the floor."""
    measured = _get(results, "paced", "results") or {}
    ours, floor = measured.get("ours") or {}, measured.get("floor") or {}
    figures = []
    for n in sorted(ours, key=int):
        o, f = ours[n], floor.get(n)
        if not f or int(n) > 1000 or "gc_max_pause_ms" not in o:
            continue
        figures.append(
            f"N={n}: CPU per turn {o['server_cpu_us_per_turn']:.0f} µs vs the floor's "
            f"{f['server_cpu_us_per_turn']:.0f}; full collections {o['gc_full_collections']} vs "
            f"{f.get('gc_full_collections', 0)}, the longest pause {o['gc_max_pause_ms']:.1f} vs "
            f"{f.get('gc_max_pause_ms', 0):.1f} ms, time spent collecting "
            f"{o['gc_time_share'] * 100:.1f}% vs {f.get('gc_time_share', 0) * 100:.1f}%"
        )
    return f" ({'; '.join(figures)})" if figures else ""


def _cpu_alone(results: dict[str, Any]) -> str:
    """What ``floor+cpu`` (the floor as costly per turn as ours) says of ours' p99 ratio."""
    rounds = _get(results, "paced", "p99_rounds") or []
    ours = {n: statistics.median(r) for n, r in _p99_ratios(rounds).items()}
    alone = {n: statistics.median(r) for n, r in _p99_ratios(rounds, "floor+cpu").items()}
    both = sorted(set(ours) & set(alone))
    if not both:
        return ""
    n = max(both, key=lambda k: ours[k])
    text = (
        f"At N={n}, the floor spending as much CPU per turn as ours, all of it when the "
        f"request arrives (`floor+cpu`), has {alone[n]:.2f}× the floor's p99 against ours' "
        f"{ours[n]:.2f}×: "
    )
    if alone[n] > 1.5:
        text += "the CPU per turn alone misses the 1.5× line. "
    else:
        text += "the CPU per turn alone would keep within the 1.5× line. "
    if ours[n] > alone[n]:
        text += (
            "The rest comes from how ours' work is spread over a turn: several tasks, "
            "wake-ups and sends, each a place in the queue. "
        )
    return text


def _missed(results: dict[str, Any]) -> str:
    """Why each missed target is missed and what would close it, from this run's numbers."""
    failed = [t for t in results.get("targets", []) if t["verdict"] == "FAIL"]
    if not failed:
        return ""
    servers = _get(results, "e2e", "servers") or {}
    cpu = {name: s["cpu_us_per_request"] for name, s in servers.items()}
    out = ["## Missed targets: why, and what would close them\n"]
    for t in failed:
        name = t["target"]
        if name.startswith("paced: p99"):
            out.append(
                f"- **{name}** (measured {t['measured']}: {t['how']}). The p99 of the first "
                "word's overhead is the wait in the server's one event loop, and it grows faster "
                "than the CPU per turn: every turn's work queues behind the others'. Ours spends "
                "per turn the signature check, Starlette's routing, the conversation's lock and "
                "history, the turn's deadline and a task watching for a disconnect"
                + _paced_causes(results)
                + ". "
                + _cpu_alone(results)
                + "What would close it: less CPU per turn on the request path, which is work, "
                "not a setting.\n"
            )
        elif name.startswith("paced: metrics on"):
            cost = _metrics_cost(_get(results, "paced") or {})
            spread = "; ".join(
                f"N={n}: {min(c) * 100:+.1f}% to {max(c) * 100:+.1f}%"
                for n, c in sorted(cost.items())
                if n <= PACED_MAX_N
            )
            out.append(
                f"- **{name}** (measured {t['measured']}). The rounds disagree by more than the "
                f"target ({spread}): each compares two 8 s CPU readings of a server a few tenths "
                "busy. `python benchmarks/metrics_cost.py` times the recording itself, with "
                "nothing else running: a few µs per turn with both sinks, about 1% of ours' "
                "server CPU per paced turn. What would settle it: more rounds, or longer ones.\n"
            )
        elif "time to first byte" in name:
            ours, floor = servers.get("ours"), servers.get("floor")
            inverse = _over(floor["rps_median"], ours["rps_median"]) if ours and floor else None
            out.append(
                f"- **{name}** (measured {t['measured']}). Under wrk's saturating load every "
                "request, the probe's included, waits behind the others in the server's queue, so "
                "TTFB p50 is ≈ connections ÷ throughput: it follows the throughput ratio"
                + (f" (floor/ours throughput here: {inverse:.2f})" if inverse else "")
                + ". A turn's own first byte costs no more than its last: ours sends an echo "
                "turn's bytes in one write, as the floor does. It closes with the throughput gap.\n"
            )
        elif "10x the reference" in name:
            ours, ref = servers.get("ours"), servers.get("reference")
            rounds = ""
            if ours and ref:
                rounds = ", ".join(
                    f"{o / r:.1f}" for o, r in zip(ours["rps_all"], ref["rps_all"], strict=True)
                )
            out.append(
                f"- **{name}** (measured {t['measured']}; per round: {rounds}). Server CPU per "
                f"request: reference {cpu.get('reference', 0):.0f} µs, ours {cpu.get('ours', 0):.0f} µs "
                f"({cpu.get('reference', 0) / max(cpu.get('ours', 1), 1):.1f}×).\n"
            )
        elif "session.end-50: ref/ours" in name:
            dec = _get(results, "micro", "decode", "results") or []
            end50 = next((row for row in dec if row["case"] == "session.end-50"), None)
            detail = ""
            if end50 and end50.get("ref_ns") and end50.get("ref_floor_ns"):
                ref_over_floor = end50["ref_ns"] / end50["ref_floor_ns"]
                detail = (
                    f" The reference takes {end50['ref_ns']:,.0f} ns, only "
                    f"{ref_over_floor:.1f}× msgspec's *untyped* decode of the same bytes in its "
                    f"venv ({end50['ref_floor_ns']:,.0f} ns), so 8× needs a typed decode at "
                    f"{ref_over_floor / 8:.2f}× that floor; ours runs at "
                    f"{end50['floor_ratio']:.2f}× it."
                )
            out.append(
                f"- **{name}** (measured {t['measured']}; paired median "
                f"{end50['speedup_paired_median'] if end50 else '–'}): on the line.{detail} What "
                "is left is the result itself: 50 structs and 150 strings built from 6.9 KB. "
                "The one lever found, typing `TranscriptItem.role` as "
                '`Literal["user", "assistant"]` (interned strings, about 4% faster), would '
                "reject a whole `session.end` the day LayerCode sends another role, so it was "
                "not taken.\n"
            )
        else:
            out.append(f"- **{name}** (measured {t['measured']}).\n")
    return "\n".join(out)


DESIGN_NOTES = """## Design choices and trade-offs

- **One plain request path.** `create_app` is a Starlette app; its webhook route is
  drain check → `LayercodeSignature.verified_body` → `LayercodeWebhook.answer` → one
  `EventStreamResponse` running the turn in the request's own task. There is no second
  route beside Starlette's, no hand-stepped coroutines, and the conversation store is used
  only through its async interface.
- **No trip through the event loop before the agent starts.** The agent runs in the
  request's task and the response runs its producer there too (the disconnect watcher is
  the other task). Each trip (a new task's first step) waits under load for everything else
  the loop has to do: a task for the producer and one for the agent made ours' p99 first-tts
  overhead at N = 800 6.0 ms, without them 2.9 ms (single runs, the floor 1.6–1.9 ms). The
  agent's cancellation is therefore anyio's on both backends (cleanup that awaits shields
  itself); `from_langchain` gives LangChain's stream a task of its own, cancelled once.
- **A native asyncio watcher, measured.** On asyncio the disconnect watcher is a plain
  asyncio task (the producer still sits in an anyio cancel scope); on trio an anyio task
  group. The task group cost 33 µs more per paced turn in-process; on the paced benchmark at
  N = 800 the plain task took ours' server CPU per turn from 330 to 287 µs (-13%) and the p99
  first-tts overhead from 2.9 to 2.3 ms. The stream and turn tests run on asyncio and trio.
- **The garbage collector, tuned while `create_app` runs** (`LAYERCODE_GC_TUNING`, on by
  default). A turn's objects form no reference cycles, so reference counting frees them all
  and the collector only ever finds what lives on (history, open streams). Its young passes
  run every 20,000 net allocations instead of 700 and its full passes a tenth as often, and
  the objects of start-up are frozen out of its way: in interleaved paced rounds at N = 800,
  p99 first-tts overhead 52–79 → 33–44 ms and server CPU per turn 429–443 → 366–405 µs
  for the young threshold alone. The floor runs with CPython's defaults.
- **Turns use our own `EventStreamResponse`; `create_sse_response` stays on
  sse-starlette.** The paced table above measures both on the same turns: sse-starlette's
  `EventSourceResponse` runs a ping task, a disconnect listener and send timeouts per
  response and one ASGI message per event, which a general-purpose, long-lived event stream
  needs; a LayerCode turn is short and its events are pre-encoded bytes, so our response
  does only what a turn needs: one producer, back-pressure through `send`, cancellation on
  disconnect. `create_sse_response` is still there for arbitrary streams.
- **A turn owns its deadline**, from when it holds its conversation's lock to its last
  byte: a client that stops reading cannot hold the conversation (`LAYERCODE_TURN_GRACE`
  bounds the last events once the time is up).
- **`emit` yields to the event loop once per 8 chunks**, not per chunk: checkpoints per
  chunk made a 10-chunk turn cost about 50% more of the library's CPU (in-process), and a
  real agent awaits between chunks anyway.
"""


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = _get(results, "e2e", "servers") or {}
    names = [n for n in PLOT_ORDER if n in servers]
    fig, (paced_axis, left, right) = plt.subplots(1, 3, figsize=(19, 5.2))
    _plot_paced(results, paced_axis)
    title = "layercode-asgi: paced streaming turns; signed echo webhook end to end"
    if results["mode"] == "smoke":
        title += " (SMOKE RUN: not meaningful)"
    fig.suptitle(title, fontsize=12)
    if not names:
        left.text(0.5, 0.5, "end to end not measured", ha="center")
        right.axis("off")
    else:
        labels = [servers[n]["label"].replace(" (", "\n(") for n in names]
        colors = {
            "floor": "#9e9e9e",
            "ours": "#2e7d32",
            "ours_sse_starlette": "#81c784",
            "reference": "#c62828",
        }
        rps = [servers[n]["rps_median"] for n in names]
        bars = left.bar(range(len(names)), rps, color=[colors[n] for n in names])
        left.bar_label(bars, labels=[f"{x:,.0f}" for x in rps], fontsize=9)
        left.set_xticks(range(len(names)), labels, fontsize=8)
        left.set_ylabel("requests / s (higher is better)")
        left.set_title("Throughput (wrk, median over rounds)", fontsize=10)
        width = 0.27
        metrics = [
            ("lat_p50_ms", "latency p50"),
            ("lat_p99_ms", "latency p99"),
            ("ttfb_p50_ms", "TTFB p50 (probe)"),
        ]
        shades = ["#1565c0", "#90caf9", "#ef6c00"]
        for offset, ((key, label), shade) in enumerate(zip(metrics, shades, strict=True)):
            values = [servers[n][key] or 0 for n in names]
            xs = [i + (offset - 1) * width for i in range(len(names))]
            drawn = right.bar(xs, values, width, label=label, color=shade)
            right.bar_label(drawn, labels=[f"{x:.1f}" for x in values], fontsize=7)
        right.set_xticks(range(len(names)), labels, fontsize=8)
        right.set_yscale("log")
        right.set_ylabel("milliseconds, log scale (lower is better)")
        right.set_title(f"Latency under load (-c{results['config']['connections']})", fontsize=10)
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_paced(results: dict[str, Any], axis: Any) -> None:
    """p99 first-tts overhead against N, per server (the headline)."""
    measured = _get(results, "paced", "results") or {}
    drawn = False
    for name in PACED_ORDER:
        points = sorted(
            (int(n), r["first_tts_p99_ms"])
            for n, r in (measured.get(name) or {}).items()
            if r["first_tts_p99_ms"] is not None
        )
        if points:
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, marker="o", label=name, color=PACED_COLORS[name])
            drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "paced run not measured", ha="center")
        return
    axis.set_xlabel("N clients (closed loop)")
    axis.set_ylabel("p99 first response.tts minus think, ms (log)")
    axis.set_yscale("log")
    axis.set_title("Paced turns: p99 first-tts overhead vs N", fontsize=10)
    axis.legend(fontsize=8)


if __name__ == "__main__":
    # Re-render RESULTS.md (and the plot) from a run's results.json, e.g. after editing the
    # report's text: python benchmarks/report.py benchmarks/results.json
    import contextlib
    import json
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results.json")
    data = json.loads(source.read_text())
    data["targets"] = targets(data)
    (source.parent / "RESULTS.md").write_text(markdown(data))
    with contextlib.suppress(ImportError):  # no matplotlib: the table only
        plot(data, source.parent / "results.png")
