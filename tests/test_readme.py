"""The README documents what the code does: its settings table is generated from Settings."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import anyio

from layercode_asgi.config import settings_table_markdown
from layercode_asgi.testing import message_event

README = Path(__file__).resolve().parent.parent / "README.md"


def test_settings_table_matches_the_code() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->\n") + len("<!-- settings-table:start -->\n")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end] == settings_table_markdown(), (
        "README settings table is stale: paste the output of "
        "python -c 'from layercode_asgi.config import settings_table_markdown as t; print(t(), end=\"\")'"
    )


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("bash scripts/demo")
    assert block[1].startswith("bash scripts/test")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci


def _stack_snippets() -> list[str]:
    text = README.read_text()
    section = text[
        text.index("### The smallest agent in each stack") : text.index("### Node-SDK style")
    ]
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


import pytest  # noqa: E402

from .conftest import SECRET, event_body, free_port  # noqa: E402
from .test_turns import END, read_events, tts  # noqa: E402


@pytest.mark.anyio
@pytest.mark.parametrize("index", range(4))
async def test_readme_stack_snippets_answer_a_turn(index: int) -> None:
    import sys
    import types

    code = _stack_snippets()[index].replace("whsec_…", SECRET)
    # A real module: Litestar resolves handler annotations through sys.modules.
    module = types.ModuleType(f"readme_snippet_{index}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"README snippet {index}", "exec"), module.__dict__)
        assert await read_events(module.app, event_body()) == [tts("Hello"), END]
    finally:
        del sys.modules[module.__name__]


# -- every code block runs as written (tests/markdown_blocks.py) -------------------------------

from .markdown_blocks import BlockFailed, parse_blocks, run_markdown_file  # noqa: E402

#: Blocks of README.md that cannot run here; each carries its visible reason in the README.
README_EXEMPTIONS = 6


def test_every_code_block_of_the_readme_runs(tmp_path: Path) -> None:
    report = run_markdown_file(README, tmp_path / "readme")
    print(report.summary())  # the exemptions, with their reasons (shown with -s or -rP)
    assert len(report.ran) >= 10
    assert len(report.exempt) == README_EXEMPTIONS, report.summary()
    assert all(block.exempt and len(block.exempt) > 20 for block in report.exempt)
    # the curl example reached the quick start's server and got a whole turn back
    curl = next(block for block in report.ran if "curl -N" in block.code)
    assert '"type":"response.end"' in "".join(report.outputs[curl.line])
    # and the simulate example held a conversation with the FastAPI example
    simulate = next(block for block in report.ran if "examples/fastapi_app.py" in block.code)
    assert "no protocol violation" in "".join(report.outputs[simulate.line]).lower()


def test_the_quick_start_agent_answers_every_event_sensibly() -> None:
    blocks = parse_blocks(README)
    agent = next(block for block in blocks if block.code.startswith("# my_agent.py"))
    namespace: dict[str, Any] = {}
    exec(compile(agent.code, agent.where, "exec"), namespace)
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
