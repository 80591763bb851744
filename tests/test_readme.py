"""The README documents what the code does: its settings table is generated from Settings."""

from __future__ import annotations

from pathlib import Path

from layercode_asgi.config import settings_table_markdown

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

from .conftest import SECRET, event_body  # noqa: E402
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
