"""The README is short and points into the docs; what it shows runs as written.

The details it used to carry live on the docs pages (docs/*.md), where tests/test_docs.py runs
every code block and checks the generated parts (the settings table among them).
"""

from __future__ import annotations

import re
import socket
import sys
import types
import unicodedata
from pathlib import Path
from typing import Any

import anyio
import pytest

from layercode_asgi.testing import message_event

from .conftest import SECRET, event_body, free_port
from .markdown_blocks import BlockFailed, parse_blocks, run_markdown_file
from .test_turns import END, read_events, tts

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: The README stays short: what it is, the two commands, install, the quick start, one snippet
#: per stack and links; everything else is one click away in docs/.
MAX_README_LINES = 150


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move the details to docs/"
    )


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("bash scripts/demo")
    assert block[1].startswith("bash scripts/test")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci


def test_the_readme_names_what_the_two_commands_cannot_set_up_themselves() -> None:
    """Each way scripts/bootstrap.sh stops on a fresh machine (its messages to stderr) is
    named beside the two commands, which the README says set everything up."""
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    intro = README.read_text().split("## Install")[0]
    needs = {"needs Python >= 3.11": "Python ≥ 3.11", "redis-server is missing": "redis-server"}
    stops = re.findall(r'echo "([^"]+)" >&2', bootstrap)
    assert len(stops) == len(needs), stops  # a new way to stop: name it in the README too
    for stop in stops:
        words = next(words for text, words in needs.items() if text in stop)
        assert words in intro, f"README.md: the two commands need {words} ({stop!r})"


# -- links into the docs -------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"\A(#{1,6})\s+(?P<title>.+?)\s*#*\s*\Z")


def _mkdocs_slug(title: str) -> str:
    """The anchor Python-Markdown's toc extension (MkDocs) gives a heading."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _github_slug(title: str) -> str:
    """The anchor GitHub gives a heading (punctuation dropped, each space a hyphen)."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (outside code blocks), as MkDocs and GitHub agree."""
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        heading = None if fenced else HEADING.match(line)
        if heading:
            title = heading["title"].replace("`", "")
            if _mkdocs_slug(title) == _github_slug(title):
                anchors.add(_mkdocs_slug(title))
    return anchors


def _readme_links() -> list[str]:
    text = README.read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return [match["target"] for match in LINK.finditer(prose)]


def test_every_link_of_the_readme_points_at_an_existing_page_and_anchor() -> None:
    local = [link for link in _readme_links() if not re.match(r"\A[a-z]+:", link)]
    assert sum(link.startswith("docs/") for link in local) >= 10
    for link in local:
        path, _, anchor = link.partition("#")
        target = (ROOT / path).resolve()
        assert target.is_file(), f"README links to {link}: no such file"
        assert target.is_relative_to(ROOT)
        if anchor:
            assert target.suffix == ".md", link
            assert anchor in _anchors(target), (
                f"README links to {link}: no heading of {path} has that anchor "
                "(on GitHub and on the site alike)"
            )


def test_the_anchor_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## The `serve` command\n\n```bash\n# not a heading\n```\n")
    assert _anchors(page) == {"title", "the-serve-command"}


def test_every_docs_page_is_one_click_from_the_readme() -> None:
    linked = {link.partition("#")[0] for link in _readme_links()}
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link to docs/{page.name}"


def test_every_readme_section_ends_with_a_link_into_the_docs() -> None:
    sections = re.split(r"^## ", README.read_text(), flags=re.MULTILINE)
    for section in sections:
        last = [line for line in section.splitlines() if line.strip()][-1]
        assert "](docs/" in last, f"section {section.splitlines()[0]!r} ends with {last!r}"


# -- the stack snippets --------------------------------------------------------------------


def _quick_start_agent() -> str:
    blocks = parse_blocks(README)
    return next(block.code for block in blocks if block.code.startswith("# my_agent.py"))


def _stack_snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("## One snippet per stack") : text.index("## Documentation")]
    blocks = section.split("```python\n")[1:]
    return [block.split("```")[0] for block in blocks]


def test_there_is_one_snippet_per_stack() -> None:
    snippets = _stack_snippets()
    assert len(snippets) == 4
    for framework, snippet in zip(
        ("starlette", "fastapi", "litestar", None), snippets, strict=True
    ):
        if framework:
            assert f"from {framework}" in snippet
        assert "from my_agent import agent" in snippet  # the quick start's agent


@pytest.mark.anyio
@pytest.mark.parametrize("index", range(4))
async def test_readme_stack_snippets_answer_a_turn(index: int) -> None:
    """Each snippet, with the quick start's ``my_agent.py``, answers a signed turn."""
    code = _stack_snippets()[index].replace("whsec_…", SECRET)
    my_agent = types.ModuleType("my_agent")
    exec(compile(_quick_start_agent(), "README my_agent.py", "exec"), my_agent.__dict__)
    # A real module: Litestar resolves handler annotations through sys.modules.
    module = types.ModuleType(f"readme_snippet_{index}")
    saved = sys.modules.get("my_agent")
    sys.modules["my_agent"] = my_agent
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"README snippet {index}", "exec"), module.__dict__)
        reply = await read_events(module.app, event_body())
        assert reply == [tts("You said: hello there (message 1 from you)."), END]
    finally:
        del sys.modules[module.__name__]
        if saved is None:
            del sys.modules["my_agent"]
        else:
            sys.modules["my_agent"] = saved


# -- every code block runs as written (tests/markdown_blocks.py) -------------------------------

#: Blocks of README.md that cannot run here; each carries its visible reason in the README
#: (the two set-up commands: the test suite itself, and the demo that tests/test_scripts.py runs).
README_EXEMPTIONS = 1


@pytest.mark.slow  # it names fixed ports: run once, not in CI's side-by-side sessions
def test_every_code_block_of_the_readme_runs(tmp_path: Path) -> None:
    report = run_markdown_file(README, tmp_path / "readme")
    print(report.summary())  # the exemptions, with their reasons (shown with -s or -rP)
    assert len(report.ran) >= 7  # install, the quick start, the four stacks
    assert len(report.exempt) == README_EXEMPTIONS, report.summary()
    assert all(block.exempt and len(block.exempt) > 20 for block in report.exempt)
    # the quick start's simulate held a conversation with the quick start's server
    simulate = next(block for block in report.ran if "layercode-asgi simulate" in block.code)
    assert "no protocol violation" in "".join(report.outputs[simulate.line]).lower()


def test_the_quick_start_agent_answers_every_event_sensibly() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_quick_start_agent(), "README my_agent.py", "exec"), namespace)
    from layercode_asgi import Settings, create_app
    from layercode_asgi.testing import LayercodeTestClient

    async def talk() -> list[str]:
        settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
        app = create_app(settings, namespace["agent"])  # with in-memory history
        async with LayercodeTestClient(app, secret=SECRET) as client:
            replies = [(await client.session_start()).text]
            replies.append((await client.message("hello")).text)
            replies.append(
                (
                    await client.send_turn(
                        message_event(text=None, conversation_id=client.conversation_id)
                    )
                ).text
            )
            replies.append((await client.message("again")).text)
            return replies

    replies = anyio.run(talk)
    assert replies == [
        "Hi! Say something and I will say it back.",
        "You said: hello (message 1 from you).",
        "Sorry, I didn't catch that.",
        "You said: again (message 2 from you).",
    ]
    assert not any("None" in reply for reply in replies)


MARKDOWN = """# A page

*Not run by the tests: needs a public tunnel.*

```bash
cloudflared tunnel --url http://127.0.0.1:8000
```

```python
# helper_mod.py
VALUE = 41
```

```python
from helper_mod import VALUE
assert VALUE + 1 == 42
```

```json
{"ok": true}
```
"""


def test_the_runner_runs_blocks_and_counts_exemptions(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(MARKDOWN)
    report = run_markdown_file(page, tmp_path / "work")
    assert [block.lang for block in report.ran] == ["python", "python", "json"]
    assert [block.exempt for block in report.exempt] == ["needs a public tunnel"]
    assert "1 exempt" in report.summary() and "needs a public tunnel" in report.summary()


@pytest.mark.parametrize(
    ("page", "words"),
    [
        ("```python\nraise SystemExit(3)\n```\n", "SystemExit"),
        ("```python\nassert 1 == 2\n```\n", "AssertionError"),
        ("```bash\nfalse\n```\n", "exited 1"),
        ("```nginx\nlisten 80;\n```\n", "Not run by the tests"),
        ("Text.\n\n    indented code\n", "indented code block"),
        ("```python\nx = 1\n", "unclosed"),
        ("```json\n{nope}\n```\n", "invalid JSON"),
    ],
)
def test_the_runner_reports_what_does_not_run(tmp_path: Path, page: str, words: str) -> None:
    path = tmp_path / "page.md"
    path.write_text(page)
    with pytest.raises(BlockFailed) as info:
        run_markdown_file(path, tmp_path / "work")
    assert words in str(info.value)


def test_the_runner_serves_an_app_block_and_a_server_command(tmp_path: Path) -> None:
    """An ``app`` is served and talked to; a server command runs in the background and is
    stopped afterwards (its port is free again)."""
    port = free_port()
    page = tmp_path / "page.md"
    page.write_text(
        "```python\n"
        "from layercode_asgi import LayercodeSignature, LayercodeWebhook\n\n"
        "async def agent(event):\n    yield 'Hi'\n\n"
        "app = LayercodeSignature(LayercodeWebhook(agent), secret='whsec_page')\n"
        "```\n\n"
        "```bash\n"
        "export LAYERCODE_WEBHOOK_SECRET=whsec_page\n"
        f"layercode-asgi serve --port {port}\n"
        "```\n"
    )
    report = run_markdown_file(page, tmp_path / "work")
    assert len(report.ran) == 2
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # the server was stopped


def test_the_runner_serves_a_documented_port_on_a_free_one(tmp_path: Path) -> None:
    """A page's server ports are fixed (`--port 8000`), and CI runs three sessions side by
    side: one page's server found the port of another session's taken ("already in use").
    Each documented port is now served on a free one, in every command of the page."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        documented = busy.getsockname()[1]  # as if another session served the page now
        page = tmp_path / "page.md"
        page.write_text(
            "```bash\n"
            "export LAYERCODE_WEBHOOK_SECRET=whsec_page\n"
            f"layercode-asgi serve --port {documented}\n"
            f"curl -fsS http://127.0.0.1:{documented}/health\n"
            "```\n"
        )
        report = run_markdown_file(page, tmp_path / "work")
    assert len(report.ran) == 1
    assert '"status":"healthy"' in report.outputs[1][0]  # the curl reached the server
