"""The documentation site (mkdocs.yml, docs/) documents what the code does.

* Every code block of every docs/*.md page runs as written (tests/markdown_blocks.py, as
  for the README), except blocks marked with the visible ``*Not run by the tests: …*``
  line; the exemptions are counted per page, so a new one is a deliberate change here.
* The generated parts (docs/_hooks/generated.py, run by ``mkdocs build``) cover every
  webhook event and every field, and each example decodes to the event it documents.
* ``mkdocs build --strict`` itself runs in ``.ci/run``; ``test_the_site_builds_offline``
  runs it here too when the ``docs`` extra is installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import keyword
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest

from layercode_asgi import Settings, parse_webhook_payload
from layercode_asgi.testing import LayercodeTestClient

from .asgi_stub import ASGIStub
from .markdown_blocks import parse_blocks, run_markdown_file

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "layercode_asgi"

#: Blocks of each page that cannot run here; each carries its visible reason on the page.
EXEMPTIONS: dict[str, int] = {
    "index.md": 1,  # the two set-up commands: the test suite itself and the demo
    "getting-started.md": 2,  # cloudflared and ngrok tunnels
    "middleware.md": 1,  # three one-line alternatives, each run in full on stacks.md
    "history.md": 1,  # a Redis store: needs a Redis server
    "scaling.md": 2,  # several workers on Redis, a Redis Cluster
    "adapters.md": 1,  # a real model: needs OPENAI_API_KEY
    "cli.md": 1,  # a list of commands, two of them serving on the same port
    "security.md": 0,
    "deploying.md": 3,  # workers on Redis, an nginx configuration, a Kubernetes manifest
    "benchmarks.md": 1,  # the full benchmark run (~20 minutes)
    "development.md": 1,  # the test suite and its checks themselves
}

#: Pages whose blocks import an optional package (the nox ``lowest`` session has none of them).
NEEDS: dict[str, tuple[str, ...]] = {
    "adapters.md": ("pydantic_ai",),
    "deploying.md": ("hypercorn", "granian"),
    "metrics.md": ("prometheus_client", "opentelemetry.sdk"),
    "stacks.md": ("fastapi", "litestar"),
}

PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))

#: What a page's shell commands must print: (a text of the block, a text of its output).
OUTPUTS: dict[str, list[tuple[str, str]]] = {
    # the curl examples reach a served agent and get a whole turn back
    "getting-started.md": [
        ("curl -N", '"type":"response.end"'),
        ("layercode-asgi simulate", "no protocol violation"),
    ],
    "cli.md": [("curl -N", '"type":"response.end"')],
    # simulate holds a conversation with the FastAPI example
    "stacks.md": [("examples/fastapi_app.py", "no protocol violation")],
}


def _generated() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docs_generated", DOCS / "_hooks" / "generated.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_is_counted() -> None:
    """A page with exemptions is listed above; a listed page exists."""
    for page in EXEMPTIONS:
        assert page in PAGES, f"{page} is listed in EXEMPTIONS but does not exist"
    for page in PAGES:
        exempt = sum(1 for block in parse_blocks(DOCS / page) if block.exempt)
        assert exempt == EXEMPTIONS.get(page, 0), (
            f"{page} has {exempt} blocks marked as not run; EXEMPTIONS says "
            f"{EXEMPTIONS.get(page, 0)}: update it if that is deliberate"
        )


@pytest.mark.slow  # the pages name fixed ports: run once, not in CI's side-by-side sessions
@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_of_the_page_runs(page: str, tmp_path: Path) -> None:
    for module in NEEDS.get(page, ()):
        pytest.importorskip(module)
    report = run_markdown_file(DOCS / page, tmp_path / "work")
    print(report.summary())  # the exemptions, with their reasons (shown with -s or -rP)
    assert len(report.exempt) == EXEMPTIONS.get(page, 0), report.summary()
    assert all(block.exempt and len(block.exempt) > 20 for block in report.exempt)
    for code, printed in OUTPUTS.get(page, []):
        block = next(block for block in report.ran if code in block.code)
        assert printed in "".join(report.outputs[block.line]).lower(), (page, code)


# -- the generated parts --------------------------------------------------------------------


def test_the_events_reference_covers_every_event_and_field() -> None:
    generated = _generated()
    structs = generated.event_structs()
    from layercode_asgi import LayercodeEventType

    assert {struct.tag for struct in structs} == {member.value for member in LayercodeEventType}
    page = generated.events_reference()
    for struct in structs:
        assert f"## `{struct.tag}`" in page
        for field in struct.fields:
            assert f"| `{field.encode_name}` |" in page
            assert generated.FIELD_DOCS.get(field.name), f"describe {field.name} in FIELD_DOCS"


def test_the_transcript_items_are_described() -> None:
    generated = _generated()
    from layercode_asgi import TranscriptItem

    page = generated.events_reference()
    for field in msgspec.structs.fields(TranscriptItem):
        assert f"| `{field.encode_name}` |" in page.split("## Transcript items")[1]
        assert generated.ITEM_DOCS.get(field.name), f"describe {field.name} in ITEM_DOCS"


def test_each_events_example_decodes_to_its_event_with_every_field() -> None:
    generated = _generated()
    for struct in generated.event_structs():
        body = generated.example(struct)
        decoded = parse_webhook_payload(json.dumps(body).encode())
        assert type(decoded) is struct.cls
        assert set(body) == {"type"} | {field.encode_name for field in struct.fields}
        # what the example says is what the struct holds
        again = msgspec.json.decode(msgspec.json.encode(decoded))
        for name, value in body.items():
            if value is not None:
                assert again[name] == value, name


def test_the_required_column_matches_the_structs() -> None:
    generated = _generated()
    page = generated.events_reference()
    for struct in generated.event_structs():
        section = page.split(f"## `{struct.tag}`")[1].split("\n## ")[0]
        for field in struct.fields:
            row = next(
                line
                for line in section.splitlines()
                if line.startswith(f"| `{field.encode_name}` |")
            )
            assert ("| required |" in row) == field.required, row


def test_the_settings_page_is_generated_from_settings() -> None:
    from layercode_asgi.config import settings_table_markdown

    generated = _generated()
    assert generated.settings_table() == settings_table_markdown()
    page = (DOCS / "settings.md").read_text()
    assert "<!-- generated: settings-table -->" in page
    rendered = generated.on_page_markdown(page)
    assert "<!-- generated" not in rendered
    for line in settings_table_markdown().splitlines()[2:]:
        assert line in rendered


def test_the_settings_page_says_how_keywords_are_named() -> None:
    """settings.md's rule from a variable to its `Settings` keyword holds for every setting,
    and names every variable that keeps its `LAYERCODE_` prefix."""
    from layercode_asgi.config import SETTINGS_FIELDS

    page = " ".join((DOCS / "settings.md").read_text().split())
    rule = re.search(r"without its `LAYERCODE_` prefix \(.*?\), except (.*?), which keep it", page)
    assert rule, "settings.md no longer states how keywords are named"
    kept = set(re.findall(r"`(\w+)`", rule[1]))
    for field in SETTINGS_FIELDS:
        lower = field.env.lower()
        assert field.name == (lower if field.name in kept else lower.removeprefix("layercode_"))
    assert kept == {f.name for f in SETTINGS_FIELDS if f.name.startswith("layercode_")}
    assert Settings(env_file=None, environ={}, turn_timeout=5).turn_timeout == 5


@pytest.mark.parametrize(
    ("page", "name"), [("settings.md", "settings_table"), ("events.md", "events_reference")]
)
def test_the_generated_reference_is_in_the_page_as_read_from_the_repository(
    page: str, name: str
) -> None:
    """The README links docs/*.md, read on GitHub or in a clone, not only as a built site:
    the reference generated from the code is committed in the page, and is current
    (`python docs/_hooks/generated.py` rewrites it); the build generates it afresh."""
    generated = _generated()
    text = (DOCS / page).read_text()
    marker = next(m for m, n in generated.MARKERS.items() if n == name)
    committed = text.partition(marker + "\n")[2].partition(generated.END)[0]
    assert committed == getattr(generated, name)() + "\n", (
        f"docs/{page} does not hold the current {name}: run `python docs/_hooks/generated.py`"
    )
    rendered = generated.on_page_markdown(text)
    assert rendered.count(committed) == 1 and generated.END not in rendered


@pytest.mark.slow
def test_the_site_builds_offline(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # No network: an inventory, a font or a plugin that needs one fails here. As root, the
    # build runs in a network namespace of its own (no interface up); else through a proxy
    # that refuses every connection.
    command = [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")]
    isolated = (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode
        == 0
    )
    if isolated:
        command = ["unshare", "-n", *command]
    else:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = "http://127.0.0.1:9"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = (tmp_path / "site" / "events" / "index.html").read_text()
    assert "session.end" in events and "transcription_duration_seconds" in events
    settings = (tmp_path / "site" / "settings" / "index.html").read_text()
    assert "LAYERCODE_WEBHOOK_SECRET" in settings
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="layercode_asgi.create_app"' in api
    # Every exported name has its entry in the API reference (mkdocstrings leaves out names
    # starting with "_": the page's own text names those).
    import layercode_asgi
    from layercode_asgi import adapters, testing

    for module, page in ((layercode_asgi, "index"), (testing, "testing"), (adapters, "adapters")):
        html = api if page == "index" else (tmp_path / "site" / "api" / page / "index.html")
        built = html if isinstance(html, str) else html.read_text()
        source = (DOCS / "api" / f"{page}.md").read_text()
        for name in module.__all__:
            full = f"{module.__name__}.{name}"
            found = f"`{full}`" in source if name.startswith("_") else f'id="{full}"' in built
            assert found, f"the API reference has no entry for {full}"


def _table_rows(text: str) -> list[dict[str, str]]:
    """Every row of every Markdown table in ``text``, as {header: cell}."""
    rows: list[dict[str, str]] = []
    lines = text.splitlines()
    header: list[str] = []
    for index, line in enumerate(lines):
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if not header and following.startswith("|---"):
            header = cells
        elif header and not line.startswith("|---"):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def test_the_benchmark_summary_quotes_the_committed_results() -> None:
    """The figures of benchmarks.md's summary are RESULTS.md's, where RESULTS.md has them."""
    page = (DOCS / "benchmarks.md").read_text()
    summary = " ".join(page.split("## The latest full run, in short")[1].split("\n## ")[0].split())
    rows = _table_rows((ROOT / "benchmarks" / "RESULTS.md").read_text())
    paced = {(r["server"], r["N"]): r for r in rows if "first-tts overhead p50 ms" in r}
    echo = {r["server"]: float(r["req/s"].replace(",", "")) for r in rows if "req/s per round" in r}
    measured = {
        r["target"]: float(r["measured"].rstrip("%")) for r in rows if "verdict" in r
    }  # "+5.1%" (the metrics' overhead) reads as 5.1

    def p99(server: str, n: str) -> str:
        return paced[(server, n)]["p99 ms"]

    def cpu(server: str, n: str) -> int:
        return round(float(paced[(server, n)]["server CPU µs/turn"].replace(",", "")))

    results_text = (ROOT / "benchmarks" / "RESULTS.md").read_text()

    def paced_metrics(n: str) -> str:
        # "- N=200: metrics on (…) cost **+1.2%** server CPU per turn, the median of …"
        found = re.search(
            rf"^- N={n}: metrics on .*? cost \*\*([+-]\d+\.\d%)\*\*", results_text, re.M
        )
        assert found, f"RESULTS.md has no metrics cost line for N={n}"
        return found.group(1)

    def target(start: str) -> float:
        return next(value for name, value in measured.items() if name.startswith(start))

    verdicts = {r["target"]: r["verdict"].strip("*") for r in rows if "verdict" in r}
    p99_verdict = next(v for name, v in verdicts.items() if name.startswith("paced: p99"))
    met_or_missed = "met" if p99_verdict == "PASS" else "missed"

    # "… (as much as ours, `floor+cpu`): N=200: 1.64; N=800: 3.04; the table's …"
    alone = re.search(r"`floor\+cpu`\): N=200: [\d.]+; N=800: ([\d.]+);", results_text)
    assert alone, "RESULTS.md has no floor+cpu ratio"

    DASH, TIMES = "\u2013", "\u00d7"  # as the page writes them
    expected = [
        f"is {p99('ours', '200')} ms for `create_app` at N = 200",
        f"(floor {p99('floor', '200')} ms, reference {p99('reference', '200')} ms, "
        f"the same turns on sse-starlette {p99('sse-starlette', '200')} ms)",
        f"and {p99('ours', '800')} ms at N = 800 (floor {p99('floor', '800')}, "
        f"reference {p99('reference', '800')})",
        f"at {cpu('ours', '200')}{DASH}{cpu('ours', '800')} µs of server CPU per turn "
        f"(floor {cpu('floor', '200')}{DASH}{cpu('floor', '800')})",
        f"the 1.5{TIMES}-floor target is {met_or_missed} "
        f"({target('paced: p99 first-tts'):.2f}{TIMES} at "
        "worst, the median of interleaved rounds)",
        f"{echo['ours (create_app)']:,.0f} req/s against "
        f"{echo['reference (layercode-create-app 0.2.0)']:,.0f} for the reference "
        f"({target('echo throughput (wrk end to end) >= 10x'):.1f}{TIMES}; the target is 10{TIMES}) "
        f"and {echo['floor (bare ASGI)']:,.0f} for the bare floor",
        f"per turn as ours has {alone.group(1)}{TIMES} its own p99 at N = 800",
        f"{target('decode message'):.1f}{TIMES} the reference's for `message` and "
        f"{target('decode session.end-50: ref/ours'):.2f}{TIMES} for a 50-item `session.end`",
        f"1,000 open streams cost {target('1,000 concurrent open streams: <= 30'):.1f} KiB each",
        f"Metrics on change the server CPU per turn by {paced_metrics('200')} at N = 200 and "
        f"{paced_metrics('800')} at N = 800",
    ]
    for text in expected:
        assert text in summary, f"docs/benchmarks.md should say, from RESULTS.md: {text!r}"


def test_the_cli_page_lists_every_protocol_violation() -> None:
    from layercode_asgi.testing import VIOLATIONS

    page = (DOCS / "cli.md").read_text()
    table = [line for line in page.splitlines() if line.startswith("| `")]
    listed = [line.split("`")[1] for line in table]
    assert sorted(listed) == sorted(VIOLATIONS), "cli.md's violations table != testing.VIOLATIONS"


# -- what the stacks page's snippets say they do ---------------------------------------------


def _stacks_block(marker: str) -> ModuleType:
    """The python block of stacks.md containing ``marker``, run as a module."""
    (block,) = [
        b for b in parse_blocks(DOCS / "stacks.md") if b.lang == "python" and marker in b.code
    ]
    module = ModuleType(f"stacks_block_{block.line}")
    exec(compile(block.code, block.where, "exec"), module.__dict__)
    return module


def test_the_stacks_snippets_do_what_the_page_says() -> None:
    """The page's served blocks hold a conversation (the runner checks that much); here each
    one's own promise: the hooks' answers, the extras, the Node-SDK stream's events."""
    hooks = _stacks_block("on_session_end")
    own = _stacks_block("Tent World")
    node = _stacks_block("tts_stream")

    async def talk() -> None:
        async with LayercodeTestClient(hooks.app, secret="whsec_hooks") as client:
            assert (await client.data({"clicked": True})).body == {"received": {"clicked": True}}
            await client.session_end(transcript=[("user", "Hi"), ("assistant", "Hello")])
            assert hooks.transcripts == {
                client.conversation_id: [("user", "Hi"), ("assistant", "Hello")]
            }
        async with LayercodeTestClient(own.app, secret="whsec_own") as client:
            assert (await client.message("hi")).tts == ["Hello, Tent World here."]
            assert (await client.data({"x": 1})).body == {"status": "ok"}
        async with LayercodeTestClient(node.app, secret="whsec_…") as client:
            turn = await client.message("hi")
            assert turn.text == "Hi thereHow can I help?", turn.events
            assert turn.data == [{"step": 1}]

    anyio.run(talk)


# -- what the prose says of the code ---------------------------------------------------------

TEXT_PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
CODE_SPAN = re.compile(r"`([A-Za-z_][\w.]*)\(([^`]*)\)`")


def test_every_install_command_installs_from_the_clone() -> None:
    """The package is not on PyPI (README, Install): every `pip install` of it that a reader
    would run names the clone, not a PyPI name someone else may hold: in the docs, the
    examples, and the package's own messages (a missing extra's error) and docstrings."""
    wrong = []
    sources = [*sorted((ROOT / "examples").glob("*.py")), *sorted(PACKAGE.rglob("*.py"))]
    for page in [*TEXT_PAGES, *sources]:
        for line in page.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue  # "# pip install "layercode-asgi[server]"  # once it is published"
            wrong += [
                f"{page.name}: {command}"
                for command in re.findall(r"pip install [^`\n]*", line)
                if "layercode-asgi" in command and "./layercode-asgi" not in command
            ]
    assert not wrong, "\n".join(wrong)


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (those run: test_every_code_block_...)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _public_callables() -> dict[str, object]:
    import layercode_asgi
    from layercode_asgi import adapters, testing

    return {
        name: getattr(module, name)
        for module in (layercode_asgi, testing, adapters)
        for name in module.__all__
        if callable(getattr(module, name))
    }


def _call_shaped(args: str) -> tuple[list[str], list[str], bool] | None:
    """``a, b=…, *, c=None, ...`` as (positional names, keyword names, ``...`` seen); None
    for anything else (an example call with real values: ``Settings()``, ``"starter"``)."""
    positional: list[str] = []
    keywords: list[str] = []
    rest = False
    for arg in (a.strip() for a in args.split(",")) if args.strip() else ():
        if arg in ("...", "…"):
            rest = True
        elif arg == "*":
            continue
        elif re.fullmatch(r"[A-Za-z_]\w*", arg) and not keywords:
            positional.append(arg)
        elif re.fullmatch(r"[A-Za-z_]\w*=[^=()]+", arg):
            keywords.append(arg.split("=")[0])
        else:
            return None
    return positional, keywords, rest


def test_every_signature_the_prose_quotes_binds_to_the_code() -> None:
    """`name(a, b=…)` of a public function or class in README/docs prose: the code takes
    those arguments, the positional ones under those names (the API reference is generated
    from the code; the prose is not)."""
    import inspect

    public = _public_callables()
    wrong = []
    for page in TEXT_PAGES:
        for span in CODE_SPAN.finditer(_prose(page)):
            name = span[1].rsplit(".", 1)[-1]
            shaped = _call_shaped(span[2])
            if name not in public or shaped is None:
                continue
            positional, keywords, rest = shaped
            signature = inspect.signature(public[name])  # type: ignore[arg-type]
            names = list(signature.parameters)
            try:
                bind = signature.bind_partial if rest else signature.bind
                bind(*positional, **dict.fromkeys(keywords))
                assert names[: len(positional)] == positional
                if positional:  # a signature, not an example call: its defaults are the code's
                    for key, value in re.findall(r"(\w+)=([^,]+)", span[2]):
                        if not value.strip().startswith(("…", "...")):
                            default = signature.parameters[key].default
                            assert ast.literal_eval(value.strip()) == default
            except (TypeError, AssertionError, KeyError):
                wrong.append(
                    f"{page.name}: `{span[0].strip('`')}` but the code is {name}{signature}"
                )
    assert not wrong, "\n".join(wrong)


def test_the_signature_check_can_fail() -> None:
    assert _call_shaped("text") == (["text"], [], False)
    assert _call_shaped("Settings(), agent") is None
    import inspect

    from layercode_asgi import Tts

    with pytest.raises(TypeError):
        inspect.signature(Tts).bind(text=None)


def _cli_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    from layercode_asgi.cli import main

    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_the_cli_page_documents_every_command_and_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every command of `layercode-asgi --help` has a section of cli.md naming each of its
    options (one spelling of it, long or short)."""
    commands = re.findall(r"^ {4}([a-z][a-z-]+)", _cli_help(capsys), re.M)
    assert "serve" in commands and "sign" in commands, commands
    sections: dict[str, str] = {}
    for part in (DOCS / "cli.md").read_text().split("\n## ")[1:]:
        for name in re.findall(r"`([a-z-]+)`", part.splitlines()[0]):
            sections[name] = part
    missing = []
    for command in commands:
        section = sections.get(command)
        if section is None:
            missing.append(f"a section for `{command}`")
            continue
        for line in _cli_help(capsys, command).split("options:")[1].splitlines():
            spellings = re.findall(r"(?:^|, )(--?[a-z][\w-]*)", line.strip())
            documented = any(re.search(rf"`{s}\b", section) for s in spellings)
            if line.startswith("  -") and "--help" not in spellings and not documented:
                missing.append(f"{command} {'/'.join(spellings)}")
    assert not missing, "docs/cli.md does not document: " + ", ".join(missing)


def test_every_option_of_the_middleware_is_in_its_table() -> None:
    import inspect

    from layercode_asgi import LayercodeSignature

    page = (DOCS / "middleware.md").read_text().split("## Options")[1].split("\n## ")[0]
    rows = {row["option"].strip("`"): row["default"] for row in _table_rows(page)}
    parameters = inspect.signature(LayercodeSignature).parameters
    assert set(rows) == set(parameters) - {"app"}
    for name, cell in rows.items():
        default = parameters[name].default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert cell == "required" or cell.strip("`").startswith(shown), (name, cell, default)


async def _refusal(app: object, headers: list[tuple[bytes, bytes]], body: bytes | None) -> str:
    """What ``app`` answers a POST, as a table row's first cells: ``| 401 | `{...}` |``
    (numbers as N); ``body=None``: a body that never arrives."""
    stub = ASGIStub(headers=headers, chunks=[] if body is None else [body])
    await stub.run(app, limit=10)
    error = json.loads(stub.body)["error"]
    return f"| {stub.status} | `{json.dumps({'error': re.sub(r'[0-9.]+', 'N', error)})}` |"


def test_the_middleware_page_shows_each_refusal_as_sent() -> None:
    """Each row of middleware.md's Responses table is what the middleware sends, and the
    table has a row for each refusal."""
    from layercode_asgi import LayercodeSignature, RedisReplayCache, sign

    passed: list[object] = []

    async def app(scope: object, receive: object, send: Any) -> None:
        passed.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "passed"}'})

    body = b'{"type":"session.update","session_id":"s","conversation_id":"c"}'
    signed = [(b"layercode-signature", sign(body, "whsec_r").encode())]
    refused: list[tuple[dict[str, Any], list[tuple[bytes, bytes]], bytes | None]] = [
        ({}, [], body),
        ({}, [(b"layercode-signature", b"v1=ab")], body),
        ({}, [(b"layercode-signature", sign(body, "whsec_r", timestamp=1).encode())], body),
        ({}, [(b"layercode-signature", sign(body, "whsec_other").encode())], body),
        ({"max_body_size": 10}, [*signed, (b"content-length", b"99")], body),
        ({}, [*signed, (b"content-length", b"ten")], body),
        ({"body_timeout": 0.01}, signed, None),
        ({"replay_protection": (down := RedisReplayCache("redis://127.0.0.1:1/0"))}, signed, body),
    ]

    async def main() -> list[str]:
        rows = []
        for options, headers, sent_body in refused:
            middleware = LayercodeSignature(app, secret="whsec_r", **options)
            rows.append(await _refusal(middleware, headers, sent_body))
        replays = LayercodeSignature(app, secret="whsec_r", replay_protection=True)
        assert await _refusal(replays, signed, body) == '| 200 | `{"error": "passed"}` |'
        rows.append(await _refusal(replays, signed, body))
        await down.aclose()
        return rows

    rows = anyio.run(main)
    assert len(passed) == 1  # the first delivery of the replayed one, no refused request
    page = (DOCS / "middleware.md").read_text().split("## Responses")[1].split("\n## ")[0]
    missing = [row for row in rows if row not in page]
    assert not missing, "middleware.md's Responses table lacks:\n" + "\n".join(missing)
    assert len(re.findall(r"^\| [45]\d\d \|", page, re.M)) == len(rows)  # and nothing else


def test_the_metrics_page_names_what_a_scrape_and_an_exporter_show() -> None:
    """metrics.md names every metric, instrument, outcome and rejection reason, and the
    histogram buckets as the code has them; the README every Prometheus metric."""
    pytest.importorskip("prometheus_client")  # the extras' own: the lowest session lacks them
    pytest.importorskip("opentelemetry")
    from layercode_asgi import SignatureErrorReason, otel, prometheus
    from layercode_asgi.metrics import OUTCOMES

    page = " ".join((DOCS / "metrics.md").read_text().split())
    readme = (ROOT / "README.md").read_text()
    reasons = [reason.name.lower() for reason in SignatureErrorReason] + ["replayed"]
    names = [*prometheus.METRIC_NAMES, *otel.INSTRUMENT_NAMES, *OUTCOMES, *reasons]
    assert [name for name in names if f"`{name}`" not in page] == []
    assert [name for name in prometheus.METRIC_NAMES if f"`{name}" not in readme] == []

    def span(bounds: tuple[float, ...]) -> str:
        low, high = bounds[0], bounds[-1]
        return f"{low * 1000:g} ms to {high:g} s" if low < 0.1 else f"{low:g} s to {high:g} s"

    first_tts = prometheus.FIRST_TTS_BUCKETS
    ms = ", ".join(f"{b * 1000:g}" for b in first_tts if b < 1)
    seconds = ", ".join(f"{b:g}" for b in first_tts if b >= 1)
    buckets = (
        f"first tts {ms} ms, {seconds} s; turn duration {span(prometheus.TURN_DURATION_BUCKETS)};"
        f" lock wait {span(prometheus.LOCK_WAIT_BUCKETS)}."
    )
    assert buckets in page


@pytest.mark.parametrize(
    ("page", "name"), [("stacks.md", "LayercodeWebhook"), ("server.md", "create_app")]
)
def test_every_keyword_option_is_named_on_its_page(page: str, name: str) -> None:
    import inspect

    import layercode_asgi

    text = (DOCS / page).read_text()
    parameters = inspect.signature(getattr(layercode_asgi, name)).parameters.values()
    keyword_only = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    missing = [option for option in keyword_only if f"`{option}=" not in text]
    assert not missing, f"docs/{page} does not name {name}'s options {missing}"


# -- the development page's walk through one request -----------------------------------------

#: Code spans of the walk that name the wire, not the code.
WIRE = {
    *("message", "data", "session.start", "session.update", "session.end"),
    *(f"response.{kind}" for kind in ("tts", "data", "hangup", "error", "end")),
    *("http.request", "http.disconnect", "http.response.start", "http.response.body"),
}


def _walk() -> str:
    page = (DOCS / "development.md").read_text()
    return page.split("## One webhook request, top to bottom")[1].split("\n## ")[0]


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"layercode_asgi.{name}")
    except ImportError:
        return None


def _resolve_walk(section: str) -> tuple[list[object], list[str]]:
    """What each code span of the walk names (in the order of mention), and the spans
    naming nothing. ``module.name`` and ``module.Class.method`` are looked up in
    ``layercode_asgi``; ``Class.method`` and ``name`` in the modules and classes the walk
    names in full; ``LAYERCODE_*`` among the settings."""
    from layercode_asgi.config import SETTINGS_FIELDS

    spans = re.findall(r"`([A-Za-z_][\w.]*)`", section)
    spans = [s for s in spans if s not in WIRE and not keyword.iskeyword(s)]
    envs = {field.env for field in SETTINGS_FIELDS}
    scopes: list[object] = []  # the modules and classes named in full
    for span in spans:
        found: object = _module(span.split(".")[0])
        for name in span.split(".")[1:] if found else ():
            scopes.append(found)
            found = getattr(found, name, None)
        if isinstance(found, type):
            scopes.append(found)
    named: list[object] = []
    unknown: list[str] = []
    for span in spans:
        head, *rest = span.split(".")
        if span.isupper():
            found = span if span in envs else None
        else:
            found = _module(head) or next(
                (getattr(s, head) for s in scopes if hasattr(s, head)), None
            )
            for name in rest:
                found = getattr(found, name, None)
        if found is None:
            unknown.append(span)
        else:
            named.append(found)
    return named, unknown


def test_every_name_of_the_request_walk_exists() -> None:
    """docs/development.md, "One webhook request, top to bottom": each function, class,
    module and setting it names in a code span exists."""
    named, unknown = _resolve_walk(_walk())
    assert len(named) > 10, named
    assert not unknown, f"the walk names what the code does not have: {unknown}"


def test_the_request_walk_names_the_functions_in_the_order_they_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The functions the walk names are first called, for a signed ``message`` to
    ``create_app``, in the order the walk first names them (those not called: skipped)."""
    import inspect

    from layercode_asgi import Settings, create_app

    caplog.set_level(logging.INFO, logger="layercode_asgi.webhook")  # its log line too
    codes: dict[object, str] = {}
    for found in _resolve_walk(_walk())[0]:
        function = inspect.unwrap(found) if callable(found) else None  # type: ignore[arg-type]
        if inspect.isfunction(function) and function.__code__ not in codes:
            codes[function.__code__] = function.__qualname__
    called: list[str] = []

    def profile(frame: object, event: str, arg: object) -> None:
        code = getattr(frame, "f_code", None)
        if event == "call" and code in codes and codes[code] not in called:
            called.append(codes[code])

    app = create_app(Settings(layercode_webhook_secret="whsec_walk"))

    async def turn() -> None:
        async with LayercodeTestClient(app, secret="whsec_walk") as client:
            await client.session_start()
            previous = sys.getprofile()
            sys.setprofile(profile)
            try:
                assert (await client.message("hi")).tts
            finally:
                sys.setprofile(previous)

    anyio.run(turn)
    assert len(called) > 8 and called[-1] == "log_webhook", called
    mentioned = [name for name in dict.fromkeys(codes.values()) if name in called]
    assert mentioned == called, (
        "docs/development.md names these functions in another order than they run:\n"
        f"named: {mentioned}\nrun:   {called}"
    )


def test_the_request_walk_checks_can_fail() -> None:
    named, unknown = _resolve_walk(
        "`sse.EventStreamResponse` `EventStreamResponse.emit` `turns.Turn.no_such` "
        "`no_such_module.x` `LAYERCODE_NO_SUCH` `LAYERCODE_TURN_GRACE` `response.end`"
    )
    assert unknown == ["turns.Turn.no_such", "no_such_module.x", "LAYERCODE_NO_SUCH"]
    from layercode_asgi.sse import EventStreamResponse

    assert named == [EventStreamResponse, EventStreamResponse.emit, "LAYERCODE_TURN_GRACE"]
