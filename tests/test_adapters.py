"""Framework agents end to end: create_app on a real uvicorn, the model a fake OpenAI API.

Every kind of agent below (each adapter, the built-in ``starter`` and ``openai`` agents)
talks to :mod:`tests.fake_openai` through ``OPENAI_BASE_URL`` and holds the same
conversations: phrases spoken while the model still streams, history on the next turn, a
tool call with its filler, ``Data`` and ``Hangup`` from tools, a model failing mid-stream,
a client disconnecting.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import nullcontext
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from layercode_asgi import Settings, TurnContext, create_app, get_agent, parse_webhook_payload
from layercode_asgi.adapters import (
    MissingExtraError,
    PhraseChunker,
    current_turn,
    from_langchain,
    from_openai_agents,
    from_pydantic_ai,
    hang_up,
    send_data,
)
from layercode_asgi.builtin_agents import STARTER_WELCOME
from layercode_asgi.conversation import ConversationManager, HistoryMessage, MemoryConversationStore
from layercode_asgi.testing import LayercodeTestClient, TurnResult, message_event

from .conftest import ROOT, SECRET, event_body, serve, signed_headers
from .fake_openai import FakeOpenAI, Script, fake_openai_env

MODEL = "gpt-5-nano"
WELCOME = "Welcome to the shop!"
DEFAULT_PHRASES = ["Hello there. ", "How can I help you today?"]


# -- the tools every tool-capable framework gets ------------------------------------------


def check_stock(item: str) -> str:
    """Check whether an item is in stock."""
    send_data({"stock": item, "conversation": current_turn().conversation_id})
    return f"{item}: 3 in stock"


def end_call() -> str:
    """End the call when the caller says goodbye."""
    hang_up({"reason": "goodbye"})
    return "the call will end after your reply"


# -- agent builders: name -> build(tools) ----------------------------------------------------


def build_pydantic_ai(model: str) -> Callable[[bool], Any]:
    def build(tools: bool) -> Any:
        pydantic_ai = pytest.importorskip("pydantic_ai")
        agent = pydantic_ai.Agent(
            model, instructions="Answer briefly.", tools=[check_stock, end_call] if tools else []
        )
        return from_pydantic_ai(agent, welcome=WELCOME)

    return build


def build_langchain_model(tools: bool) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    return from_langchain(
        langchain_openai.ChatOpenAI(model=MODEL), welcome=WELCOME, system_prompt="Be brief."
    )


def build_langchain_chain(tools: bool) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    prompts = pytest.importorskip("langchain_core.prompts")
    parsers = pytest.importorskip("langchain_core.output_parsers")
    prompt = prompts.ChatPromptTemplate.from_messages(
        [("system", "Be brief."), prompts.MessagesPlaceholder("conversation")]
    )
    chain = prompt | langchain_openai.ChatOpenAI(model=MODEL) | parsers.StrOutputParser()
    return from_langchain(
        chain, welcome=WELCOME, make_input=lambda messages: {"conversation": messages}
    )


def build_langgraph(tools: bool) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    agents = pytest.importorskip("langchain.agents")
    graph = agents.create_agent(
        langchain_openai.ChatOpenAI(model=MODEL),
        [check_stock, end_call] if tools else [],
        system_prompt="Answer briefly.",
    )
    return from_langchain(graph, welcome=WELCOME)


def build_openai_agents(tools: bool) -> Any:
    sdk = pytest.importorskip("agents")
    agent = sdk.Agent(
        name="shop",
        instructions="Answer briefly.",
        model=MODEL,
        tools=[sdk.function_tool(check_stock), sdk.function_tool(end_call)] if tools else [],
    )
    return from_openai_agents(agent, welcome=WELCOME)


def build_named(name: str, model: str | None = None) -> Callable[[bool], Any]:
    def build(tools: bool) -> Any:
        if name == "starter":
            pytest.importorskip("pydantic_ai")
        else:
            pytest.importorskip("openai")
        fields = {"openai_api_key": "sk-test"}
        if model is not None:
            fields["default_model"] = model
        return get_agent(name, Settings(env_file=None, environ={}, **fields))

    return build


BUILDERS: dict[str, Callable[[bool], Any]] = {
    "pydantic-ai-responses": build_pydantic_ai(f"openai:{MODEL}"),
    "pydantic-ai-chat": build_pydantic_ai(f"openai-chat:{MODEL}"),
    "langchain-chat-model": build_langchain_model,
    "langchain-chain": build_langchain_chain,
    "langgraph-agent": build_langgraph,
    "openai-agents": build_openai_agents,
    "starter": build_named("starter"),
    "starter-chat": build_named("starter", f"openai-chat:{MODEL}"),
    "openai": build_named("openai", MODEL),
}
WITH_TOOLS = ["pydantic-ai-responses", "pydantic-ai-chat", "langgraph-agent", "openai-agents"]
#: What each agent says on session.start without calling the model (``openai`` asks it).
WELCOMES = {name: WELCOME for name in BUILDERS if name != "openai"}
WELCOMES["starter"] = WELCOMES["starter-chat"] = STARTER_WELCOME


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with fake_openai_env(monkeypatch) as server:
        yield server


def app_for(name: str, tools: bool = False) -> Any:
    agent = BUILDERS[name](tools)
    return create_app(Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET), agent)


async def langchain_turn(runnable: Any) -> TurnResult:
    """One "hi" turn of ``create_app`` with ``from_langchain(runnable)``: a turn timeout of
    20 s, and the test fails after 10 (a turn that never ends shows as a failure)."""
    settings = Settings(
        env_file=None, environ={}, layercode_webhook_secret=SECRET, turn_timeout=20.0
    )
    app = create_app(settings, from_langchain(runnable))
    with anyio.fail_after(10):
        async with LayercodeTestClient(app, secret=SECRET) as client:
            return await client.message("hi")


def spoken(turn: TurnResult) -> list[str]:
    return list(turn.tts)


# -- conversations ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_conversation_with_history(name: str, fake: FakeOpenAI) -> None:
    with serve(app_for(name)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            start = await client.session_start()
            first = await client.message("Do you sell tents?")
            fake.push(Script(text=["Yes, we do.", " Anything else?"]))
            second = await client.message("Great, thanks.")
    if name in WELCOMES:
        assert spoken(start) == [WELCOMES[name]]
    assert "".join(spoken(first)) == "Hello there. How can I help you today?"
    assert "".join(spoken(second)) == "Yes, we do. Anything else?"
    if name != "openai":  # the openai agent speaks the deltas as they come
        assert spoken(first) == DEFAULT_PHRASES
        assert spoken(second) == ["Yes, we do. ", "Anything else?"]
    assert first.errors == second.errors == []
    # The second request carried the first turn (and the welcome) as history.
    assert fake.conversation(-1)[-3:] == [
        ("user", "Do you sell tents?"),
        ("assistant", "Hello there. How can I help you today?"),
        ("user", "Great, thanks."),
    ]
    if name in WELCOMES:
        assert ("assistant", WELCOMES[name]) in fake.conversation(-1)
        assert len(fake.requests) == 2  # the welcome cost no model call


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_first_phrase_spoken_before_the_model_finishes(name: str, fake: FakeOpenAI) -> None:
    fake.push(Script(hold=True))
    seen_unfinished: list[bool] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "response.tts" and not seen_unfinished:
            seen_unfinished.append(not fake.last_delta_sent.is_set())
            fake.release()

    with serve(app_for(name)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.send(message_event("hi"), on_event=on_event)
    assert seen_unfinished == [True]  # the first phrase came while the model was held
    assert fake.last_delta_sent.is_set()
    assert isinstance(turn, TurnResult)
    assert "".join(spoken(turn)) == "Hello there. How can I help you today?"


@pytest.mark.anyio
@pytest.mark.parametrize("name", WITH_TOOLS)
async def test_tool_call_speaks_the_filler_and_sends_data(name: str, fake: FakeOpenAI) -> None:
    fake.push(
        Script(text=[], tool_call=("check_stock", '{"item": "tent"}')),
        Script(text=["We have", " three tents."]),
    )
    with serve(app_for(name, tools=True)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("Any tents?")
    assert spoken(turn) == ["One moment.", "We have three tents."]
    assert turn.data == [{"stock": "tent", "conversation": client.conversation_id}]
    assert [event["type"] for event in turn.events] == [
        "response.tts",
        "response.data",
        "response.tts",
        "response.end",
    ]
    assert len(fake.requests) == 2
    assert any("tent: 3 in stock" in output for output in fake.tool_outputs(-1))


@pytest.mark.anyio
@pytest.mark.parametrize("name", WITH_TOOLS)
async def test_a_tool_ends_the_call_after_the_goodbye(name: str, fake: FakeOpenAI) -> None:
    fake.push(
        Script(text=["Sure."], tool_call=("end_call", "{}")),
        Script(text=["Goodbye!"]),
    )
    with serve(app_for(name, tools=True)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("That's all, bye.")
    assert spoken(turn) == ["Sure.", "One moment.", "Goodbye!"]
    assert turn.hung_up
    assert [event["type"] for event in turn.events][-2:] == ["response.hangup", "response.end"]
    assert turn.events[-2]["content"] == {"reason": "goodbye"}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_model_failing_mid_stream(name: str, fake: FakeOpenAI) -> None:
    fake.push(Script(text=["One.", " Two.", " Three."], fail_after=2))
    with serve(app_for(name)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("count")
    assert [event["type"] for event in turn.events][-2:] == ["response.error", "response.end"]
    assert turn.errors == [
        {"type": "response.error", "error": "agent error", "turn_id": turn.events[-1]["turn_id"]}
    ]
    assert "Three." not in turn.text


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_disconnect_cancels_the_model_request(name: str, fake: FakeOpenAI) -> None:
    fake.push(Script(hold=True))
    body = event_body(text="hi", turn_id="turn-disconnect")
    with serve(app_for(name)) as base:
        async with httpx.AsyncClient(timeout=10) as client:
            request = client.build_request(
                "POST", f"{base}/api/agent", content=body, headers=signed_headers(body)
            )
            response = await client.send(request, stream=True)
            first = None
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    first = msgspec.json.decode(line[6:])
                    break
            assert fake.held.wait(10)  # the model waits before its last delta
            await response.aclose()  # the caller hangs up while the model still streams
        assert first is not None and first["type"] == "response.tts"
        assert fake.closed_early.wait(10), "the model request was not cancelled"
    assert not fake.last_delta_sent.is_set()


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_an_agent_stopped_while_a_reply_goes_out_closes_the_model_stream(
    name: str, fake: FakeOpenAI
) -> None:
    """The turn stops an agent at the reply it yielded (a timeout or a hang-up while the
    reply was being sent) by closing it. Before: the ``openai`` agent left the model's
    stream open then, its connection taken from the pool for good (one more per turn);
    LangChain's stream ran on in its task until garbage collection closed it; the
    openai-agents one only cancelled the SDK's run, whose task closed the stream later."""
    fake.push(Script(hold=True))
    event = parse_webhook_payload(event_body(text="hi"))
    replies = BUILDERS[name](False)(event, TurnContext(event, (), {}))
    try:
        with anyio.fail_after(10):
            assert isinstance(await replies.__anext__(), str)
            await replies.aclose()
        if name == "langchain-chain":  # closed by the framework, on this loop, just after:
            # a chain's inner model stream, closed by asyncio when garbage collected
            closed = await anyio.to_thread.run_sync(fake.closed_early.wait, 5)
        else:  # closed with the agent: waited for with this loop blocked, nothing runs on
            closed = fake.closed_early.wait(5)
    finally:
        fake.release()
    assert closed, "the model's stream outlived the agent"
    assert not fake.last_delta_sent.is_set()


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_whitespace_only_deltas_are_not_spoken_alone(name: str, fake: FakeOpenAI) -> None:
    """Before: the openai agent (and every adapter with ``chunking="delta"``) sent a
    whitespace-only delta as a ``response.tts`` of its own (``" "``, ``"\\n\\n"``). Now it
    goes out with the next delta (the space between two words is kept) or, at the end,
    not at all."""
    fake.push(Script(text=["\n\n", "Hello", " ", "there.", "\n", " ", "How", " are you?", " \n"]))
    with serve(app_for(name)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hello")
    assert turn.errors == []
    assert [text for text in turn.tts if not text.strip()] == []
    assert "".join(turn.tts).strip() == "Hello there.\n How are you?"


# -- the parts, directly -----------------------------------------------------------------------


def test_phrase_chunker() -> None:
    chunker = PhraseChunker()
    pieces = ["It costs 3", ".5 dollars", ". Want", " one? Sure", "!\nNote: ok"]
    out = [phrase for piece in pieces for phrase in chunker.feed(piece)]
    assert out == ["It costs 3.5 dollars. ", "Want one? ", "Sure!\n"]
    assert chunker.flush() == "Note: ok"  # a colon ends only a long phrase
    assert chunker.flush() is None
    long = "This sentence is long enough to be cut at a comma, and it goes on"
    assert list(PhraseChunker().feed(long)) == [long[: long.index(",") + 2]]
    assert list(PhraseChunker("delta").feed("a")) == ["a"]
    deltas = PhraseChunker("delta")  # whitespace goes out with the next delta, if any
    out = [d for piece in ["\n", "Hi", " ", "\t", "there", " "] for d in deltas.feed(piece)]
    assert out == ["\nHi", " \tthere"]
    assert deltas.flush() is None
    # half an emoji (a UTF-16 surrogate: a JSON "\\ud83d" escape) waits for its other half
    out = [d for piece in ["Hi \ud83d", "\ude00 there", "\ud83d"] for d in deltas.feed(piece)]
    assert out == ["Hi ", "\ud83d\ude00 there"]
    assert deltas.flush() == "\ud83d"
    with pytest.raises(ValueError, match="chunking"):
        PhraseChunker("words")  # type: ignore[arg-type]


def test_cjk_sentence_ends_cut_without_a_space() -> None:
    """Before: a sentence end was a boundary only when a space followed it, and Chinese and
    Japanese put none after ``。``, ``！`` or ``？``: a CJK answer went out as one
    ``response.tts`` once the model had finished it, seconds after its first sentence."""
    chunker = PhraseChunker()
    pieces = ["你好", "！我是助手。", "「请问？」", "」有什么", "可以帮您？", "！"]
    out = [phrase for piece in pieces for phrase in chunker.feed(piece)]
    assert out == ["你好！", "我是助手。", "「请问？」」"]
    assert chunker.flush() == "有什么可以帮您？！"
    assert list(PhraseChunker().feed("一。二！！三")) == ["一。", "二！！"]


def test_curly_closing_quotes_close_a_sentence() -> None:
    """Before: only straight quotes were closers, so a sentence ending in a curly quote (as
    models often write them) was held until the next sentence end."""
    chunker = PhraseChunker()
    out = [
        p
        for piece in ["She said \u201cyes.\u201d Then", " \u2018no.\u2019 Ok"]
        for p in chunker.feed(piece)
    ]
    assert out == ["She said \u201cyes.\u201d ", "Then \u2018no.\u2019 "]
    assert list(PhraseChunker().feed("\u201c\u4f60\u597d\u3002\u201d\u55ef")) == [
        "\u201c\u4f60\u597d\u3002\u201d"
    ]


def simple_phrases(pieces: list[str]) -> list[str]:
    """The chunking rules of the module docstring, searched from the start every time."""
    import re

    closer = "[\"')\\]\u201d\u2019」』）]"
    cjk_next = "[^\\s\"')\\]\u201d\u2019」』）。！？]"
    sentence = re.compile(rf"[.!?…]+{closer}*\s+|\n+|[。！？]+{closer}*(?:\s+|(?={cjk_next}))")
    clause = re.compile(r"[,;:]\s+")
    out, buffer = [], ""
    for piece in pieces:
        buffer += piece
        while True:
            match = sentence.search(buffer)
            if match is None and len(buffer) >= 40:
                match = clause.search(buffer, 39)
            if match is None:
                break
            phrase, buffer = buffer[: match.end()], buffer[match.end() :]
            if phrase.strip():
                out.append(phrase)
    return [*out, buffer] if buffer.strip() else out


def test_phrase_chunker_cuts_where_the_rules_say_however_the_text_is_split() -> None:
    texts = [
        'He said "Stop!" Then... "Why?!" ) she asked.\n\nOk, fine; next: go.',
        "A long clause that goes on and on and on, then a colon: and more, text; end",
        "Dots.......... then spaces   and \u2028lines\u2029 . . ! ? …  done.)] x",
        "中文。没有空格\uff0c也要切。Yes. 😀 emoji! 😀😀, ok, then a very long clause here, x",
        '「你好！！」」她说。 」好？」 ……是的？x。\n。「」。"',
        '!!!!!) ?!.)."\']!!!  .).) x!"\n)). ,' + "a" * 40 + ",, ;\t: . ) .!",
        'A clause long enough to be cut at a comma,) then"; one, (more) two," x. Yes',
        "\u201cYes.\u201d \u2018No!\u2019\u201d x \u201c好。\u201d嗯\u2019s end.\u2019",
    ]
    for text in texts:
        for size in (1, 2, 3, 5, 7, 13):
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            chunker = PhraseChunker()
            out = [phrase for piece in pieces for phrase in chunker.feed(piece)]
            rest = chunker.flush()
            assert out + ([rest] if rest is not None else []) == simple_phrases(pieces), (
                text,
                size,
            )


@pytest.mark.parametrize("size", [1, 3, 7, 40, 5000])
def test_a_long_answer_without_a_boundary_is_cut_at_a_blank(size: int) -> None:
    """Before: an answer without a sentence end or a clause end (a run-on answer, a list of
    words) was one ``response.tts`` of any length, spoken only once the model had finished
    it. Past ``MAX_PHRASE`` characters the phrase now ends at its last blank."""
    from layercode_asgi.adapters.voice import MAX_PHRASE

    text = " ".join(f"word{i}" for i in range(2000))  # 17,889 characters, no boundary
    chunker = PhraseChunker()
    out = [p for i in range(0, len(text), size) for p in chunker.feed(text[i : i + size])]
    rest = chunker.flush()
    assert rest is not None and len(out) >= 3
    assert "".join([*out, rest]) == text
    for phrase in out:  # a delta may hold a whole phrase; a word has at most 8 characters
        assert phrase.endswith(" ") and not phrase.startswith(" ")
        assert len(phrase) <= MAX_PHRASE + size + 8
    # a word longer than the bound is not cut inside
    assert list(PhraseChunker().feed("x" * (3 * MAX_PHRASE))) == []


def chunked(text: str, size: int) -> tuple[list[str], str | None]:
    """The phrases of ``text`` fed in deltas of ``size`` characters, and what flush leaves."""
    chunker = PhraseChunker()
    out = [p for i in range(0, len(text), size) for p in chunker.feed(text[i : i + size])]
    return out, chunker.flush()


@pytest.mark.parametrize("size", [1, 3, 7, 40, 600])
def test_a_long_cjk_answer_without_a_sentence_end_is_cut_at_a_clause_mark(size: int) -> None:
    """Before: a run-on answer was cut past ``MAX_PHRASE`` at a blank only, and Chinese and
    Japanese put none: a long CJK sentence of clauses was one ``response.tts`` of any
    length, spoken once the model had finished it. It now ends at a full-width mark."""
    from layercode_asgi.adapters.voice import MAX_PHRASE

    clauses = "我们今天下午去公园散步，天气非常好，阳光明媚，小朋友们在草地上玩耍、奔跑、唱歌，"
    text = clauses * 60 + "我们今天"  # 2,404 characters, no sentence end, no blank
    out, rest = chunked(text, size)
    assert rest is not None and len(out) >= 3
    assert "".join([*out, rest]) == text
    for phrase in out:
        assert phrase[-1] in "，、" and len(phrase) <= MAX_PHRASE + size + len(clauses)


@pytest.mark.parametrize("size", [1, 2, 5, 40, 600])
def test_a_long_cjk_answer_without_any_mark_is_cut_on_a_character_boundary(size: int) -> None:
    """Before: CJK text without punctuation (a model's run-on answer) was never cut. Past
    ``MAX_PHRASE`` it is now cut between two wide characters, never before a combining
    mark (a decomposed ``が``), inside an emoji sequence or inside a Latin word."""
    import unicodedata

    from layercode_asgi.adapters.voice import MAX_PHRASE

    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one emoji of five code points
    thumbs = "\U0001f44d\U0001f3fd"  # a thumb and its skin tone
    japanese = unicodedata.normalize("NFD", "今日はとてもいい天気ですがぎぐげご散歩に行きましょう")
    text = (japanese + family + thumbs + "ＡＢＣ" + "abc") * 60  # 2,640 code points
    out, rest = chunked(text, size)
    assert rest is not None and len(out) >= 3
    assert "".join([*out, rest]) == text
    for phrase, after in zip(out, [*out[1:], rest], strict=True):
        assert len(phrase) <= MAX_PHRASE + 100 + size
        pair = phrase[-1] + after[0]
        assert unicodedata.category(after[0]) not in ("Mn", "Mc", "Me", "Sk", "Cf"), pair
        assert "\u200d" not in pair and not (phrase[-1].isascii() and after[0].isascii())


def test_phrase_chunker_work_is_linear_in_the_text() -> None:
    """Before: every delta searched the whole phrase so far for a boundary again, so a
    long answer without one (CJK text has no space after its full stops; a model listing
    numbers with commas) took quadratic time on the event loop: 20,000 CJK characters in
    2-character deltas held it for 2.4 s, 100,000 in 1-character deltas for minutes.
    And a run of sentence ends without a space (``"!!!…"``, a model stuck repeating one)
    was searched again from each of its characters on every delta: 3,000 ``"!"`` took
    105 s."""
    import subprocess

    code = (
        "from layercode_asgi.adapters import PhraseChunker\n"
        "chunker = PhraseChunker()\n"
        "for text in ('中文，' * 20_000, '1,0' * 20_000, 'x..' * 20_000, '!' * 20_000,\n"
        "             '.' + ')' * 20_000, '?)' * 20_000, '好' + '！' * 20_000,\n"
        "             '。' + '」' * 20_000):\n"
        "    phrases = [p for char in text for p in chunker.feed(char)]\n"
        "    assert ''.join(phrases) + chunker.flush() == text\n"
        "print('done')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # A bound for a hang, not a timing: linear work takes well under a second.
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.stdout == "done\n", result.stderr


class _Counted(str):
    """A delta that counts the characters of every string built from it by ``+``."""

    copied = 0

    def __add__(self, other: str) -> str:
        _Counted.copied += len(self) + len(other)
        return str(self) + other

    def __radd__(self, other: str) -> str:
        _Counted.copied += len(self) + len(other)
        return other + str(self)


@pytest.mark.parametrize("mode", ["phrase", "delta"])
def test_phrase_chunker_copies_each_character_a_bounded_number_of_times(mode: str) -> None:
    """Before: the phrase so far was a string the chunker added each delta to, so a long
    answer without a boundary (100,000 CJK characters in 1-character deltas; or, with
    ``chunking="delta"``, as many blank deltas) was copied again on every delta."""
    text = "中" if mode == "phrase" else " "
    _Counted.copied = 0
    chunker = PhraseChunker(mode)  # type: ignore[arg-type]
    phrases = [p for _ in range(20_000) for p in chunker.feed(_Counted(text))]
    said = "".join(phrases) + (chunker.flush() or "")
    assert said == (text * 20_000 if mode == "phrase" else "")
    assert _Counted.copied <= 4 * 20_000


def test_tool_actions_outside_a_turn_raise() -> None:
    for call in (lambda: send_data({}), hang_up, current_turn):
        with pytest.raises(RuntimeError, match="only in a tool called during an adapter's turn"):
            call()


def test_importing_the_package_needs_no_framework() -> None:
    import subprocess

    code = (
        "import sys\n"
        "for name in ('pydantic_ai', 'langchain_core', 'langgraph', 'agents'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import layercode_asgi, layercode_asgi.adapters as a\n"
        "try:\n"
        "    a.from_pydantic_ai(object())\n"
        "except a.MissingExtraError as exc:\n"
        "    print(exc)\n"
        "try:\n"
        "    a.from_langchain(object())\n"
        "except a.MissingExtraError as exc:\n"
        "    print(exc)\n"
        "try:\n"
        "    a.from_openai_agents(object())\n"
        "except a.MissingExtraError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [
        "from_pydantic_ai needs the 'pydantic_ai' package: pip install './layercode-asgi[pydantic-ai]'",
        "from_langchain needs the 'langchain_core' package: pip install './layercode-asgi[langchain]'",
        "from_openai_agents needs the 'agents' package: pip install './layercode-asgi[openai-agents]'",
    ]
    assert issubclass(MissingExtraError, ImportError)


# -- the docs' example (docs/adapters.md; not run there: it needs OPENAI_API_KEY) ---------------


def docs_adapter_block() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "adapters.md").read_text()
    return text.split("```python\n")[1].split("```")[0]


@pytest.mark.anyio
async def test_docs_adapter_example(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import types

    pytest.importorskip("pydantic_ai")
    monkeypatch.chdir(tmp_path)  # Settings() reads ./.env
    module = types.ModuleType("docs_adapter_example")
    code = docs_adapter_block().replace("whsec_…", SECRET)
    assert "from_pydantic_ai(shop" in code  # the page's first block is the example
    exec(compile(code, "docs/adapters.md example", "exec"), module.__dict__)
    fake.push(
        Script(text=[], tool_call=("check_stock", '{"item": "tent"}')),
        Script(text=["We have", " four tents."]),
    )
    with serve(module.app) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            start = await client.session_start()
            turn = await client.message("Any tents?")
    assert start.tts == ["Welcome! What are you looking for?"]
    assert turn.tts == ["Let me check.", "We have four tents."]
    assert turn.data == [{"item": "tent", "in_stock": 4}]


class _Stream:
    """An async iterator whose ``aclose`` may fail (a library's stream, cleaned up badly)."""

    def __init__(self, items: list[str], fail_close: bool) -> None:
        self.items, self.fail_close, self.closed = list(items), fail_close, False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> str:
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    async def aclose(self) -> None:
        self.closed = True
        if self.fail_close:
            raise RuntimeError("close failed")


@pytest.mark.anyio
@pytest.mark.parametrize("fail_close", [False, True])
async def test_langchains_stream_in_its_own_task_ends_even_if_closing_fails(
    fail_close: bool,
) -> None:
    pytest.importorskip("langchain_core")
    stream = _Stream(["a", "b"], fail_close)

    class Runnable:  # what from_langchain needs of a chain: astream(input, config)
        def astream(self, value: Any, config: Any) -> _Stream:
            return stream

    agent = from_langchain(Runnable(), chunking="delta")
    event = parse_webhook_payload(event_body("message", text="hi"))
    seen: list[Any] = []
    with anyio.fail_after(5), pytest.raises(RuntimeError) if fail_close else nullcontext():
        async for item in agent(event, TurnContext(event, (), {})):  # type: ignore[arg-type]
            seen.append(item)  # noqa: PERF401 (items seen before the error count too)
    assert seen == ["a", "b"]
    assert stream.closed


@pytest.mark.anyio
async def test_a_langchain_stream_raising_its_own_cancelled_error_fails_the_turn() -> None:
    """Before: the stream's own CancelledError (it awaited a task something else cancelled)
    ended the task iterating it without telling the turn, which waited for the next item
    until the turn's deadline: 'turn timed out' after LAYERCODE_TURN_TIMEOUT, forever
    with no deadline, and the failure never logged. It is now an agent failure like any
    other exception: response.error 'agent error', then response.end."""
    pytest.importorskip("langchain_core")

    class Runnable:
        name = "cancelled_inside"

        async def astream(self, value: Any, config: Any) -> AsyncIterator[str]:
            yield "Hello. "
            other = asyncio.get_running_loop().create_task(asyncio.sleep(60))
            other.cancel()
            await other  # raises CancelledError: the stream's failure, not the turn's

    turn = await langchain_turn(Runnable())
    assert [event["type"] for event in turn.events] == [
        "response.tts",
        "response.error",
        "response.end",
    ]
    assert turn.errors[0]["error"] == "agent error"


class _Stop(BaseException):
    """A stream's own BaseException (neither an Exception nor a cancellation)."""


@pytest.mark.anyio
async def test_a_langchain_stream_raising_another_base_exception_fails_the_turn() -> None:
    """Before: the task iterating the stream ended with it without telling the turn, which
    waited for the next item until its deadline ('turn timed out'; forever without one)."""
    pytest.importorskip("langchain_core")

    class Runnable:
        name = "stops"

        async def astream(self, value: Any, config: Any) -> AsyncIterator[str]:
            yield "Hello. "
            raise _Stop("stopped")

    turn = await langchain_turn(Runnable())
    assert turn.tts == ["Hello. "]
    assert turn.errors == [
        {"type": "response.error", "error": "agent error", "turn_id": turn.turn_id}
    ]
    assert turn.events[-1]["type"] == "response.end"


@pytest.mark.anyio
@pytest.mark.parametrize("name", [name for name in BUILDERS if "chat" in name or name == "openai"])
async def test_a_chunk_without_a_delta_is_skipped(name: str, fake: FakeOpenAI) -> None:
    """Azure OpenAI's asynchronous content filter sends chunks whose choice has no
    ``delta`` (openai-python gives ``choice.delta is None``). Before: the openai agent
    read ``choice.delta.content`` and failed the turn with 'agent error' after the whole
    answer had been spoken."""
    fake.push(Script(filter_annotations=True))
    with serve(app_for(name)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("hello")
    assert turn.errors == []
    assert turn.text == "Hello there. How can I help you today?"


@pytest.mark.anyio
async def test_a_blank_welcome_or_filler_is_not_spoken() -> None:
    """Before: ``welcome=" "`` and a filler of ``"\\n"`` went out as response.tts events of
    whitespace alone; now they are not sent (as an empty one was not)."""
    from layercode_asgi.adapters.voice import ToolCall, voice_agent

    from .test_turns import END, read_events, tts, webhook_app

    async def run(prompt: str, context: TurnContext) -> AsyncIterator[Any]:
        yield "Let me look."
        yield ToolCall("lookup")
        yield "Found it."

    agent = voice_agent(run, name="t", welcome=" \n", chunking="phrase", filler=lambda name: "\n")
    app = webhook_app(agent)
    assert await read_events(app, event_body("session.start")) == [END]
    said = await read_events(app, event_body(text="hi"))
    assert said == [tts("Let me look."), tts("Found it."), END]


@pytest.mark.anyio
async def test_half_an_emoji_in_a_welcome_filler_or_phrase_is_spoken_as_u_fffd() -> None:
    """Before: a lone surrogate (half an emoji) in the welcome, the filler or the model's
    text could not be encoded, and the turn ended as 'agent error'."""
    from layercode_asgi.adapters.voice import ToolCall, voice_agent

    from .test_turns import END, read_events, tts, webhook_app

    async def run(prompt: str, context: TurnContext) -> AsyncIterator[Any]:
        yield "Let me look \ud83d."
        yield ToolCall("lookup")
        yield "Found it."

    agent = voice_agent(
        run, name="t", welcome="Hi \ud83d", chunking="phrase", filler=lambda name: "Hm \udc00"
    )
    app = webhook_app(agent)
    assert await read_events(app, event_body("session.start")) == [tts("Hi \ufffd"), END]
    said = await read_events(app, event_body(text="hi"))
    assert said == [tts("Let me look \ufffd."), tts("Hm \ufffd"), tts("Found it."), END]


@pytest.mark.anyio
async def test_a_langchain_stream_whose_aclose_raises_a_base_exception_fails_the_turn() -> None:
    """Before: the stream's ``aclose()`` raising a BaseException of its own (neither an
    Exception nor an interrupt) ended the task iterating the stream without telling the
    turn, which waited for the next item until its deadline ('turn timed out'; forever
    without one). It is now the agent's failure: response.error, then response.end."""
    pytest.importorskip("langchain_core")
    streams: list[_Stream] = []

    class StopsOnClose(_Stream):
        async def aclose(self) -> None:
            self.closed = True
            raise _Stop("close stopped")

    class Runnable:
        name = "stops_on_close"

        def astream(self, value: Any, config: Any) -> _Stream:
            streams.append(StopsOnClose(["Hello. "], fail_close=False))
            return streams[-1]

    turn = await langchain_turn(Runnable())
    assert streams[0].closed
    assert turn.tts == ["Hello. "]
    assert turn.errors == [
        {"type": "response.error", "error": "agent error", "turn_id": turn.turn_id}
    ]
    assert turn.events[-1]["type"] == "response.end"


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_a_message_without_text_costs_no_model_call(name: str, fake: FakeOpenAI) -> None:
    """Before: the ``openai`` agent sent a message without text to the model all the same,
    with no user message at all (the model answered its own last reply), and every agent
    sent a blank one (``"  \\n"``) as the user's turn, which the history then left out: the
    next request held that answer after the assistant's previous one, with nothing between.
    Now neither calls the model: the turn is a bare response.end, as documented."""
    with serve(app_for(name)) as base:
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            first = await client.message("Hello")
            asked = len(fake.requests)
            silent = [await client.message(text) for text in ("", "  \n")]
            fake.push(Script(text=["Yes."]))
            after = await client.message("Still there?")
    assert first.text and after.text == "Yes."
    assert [[event["type"] for event in turn.events] for turn in silent] == [["response.end"]] * 2
    assert len(fake.requests) == asked + 1
    assert fake.conversation(-1)[-3:] == [
        ("user", "Hello"),
        ("assistant", "Hello there. How can I help you today?"),
        ("user", "Still there?"),
    ]


@pytest.mark.parametrize("backends", [["asyncio", "asyncio"], ["asyncio", "trio"]])
def test_the_openai_agent_serves_turns_on_a_later_event_loop(
    backends: list[str], fake: FakeOpenAI
) -> None:
    """Before: the ``openai`` agent made one OpenAI client when it was built and kept it, so
    its pooled connection belonged to the first event loop: an app used again on another
    loop (a test module's app, each test on a loop of its own; trio after asyncio) failed
    its next turn with 'agent error' (``RuntimeError: Event loop is closed``)."""
    if "trio" in backends:
        pytest.importorskip("trio")
    app = app_for("openai")

    async def turn() -> list[str]:
        with anyio.fail_after(10):
            async with LayercodeTestClient(app, secret=SECRET) as client:
                return list((await client.message("Hello")).tts)

    said = [anyio.run(turn, backend=backend) for backend in backends]
    assert ["".join(tts) for tts in said] == ["Hello there. How can I help you today?"] * 2


def test_the_openai_agent_on_two_event_loops_at_once_keeps_a_client_for_each() -> None:
    """One app served by two servers at once (two threads, two event loops): each loop keeps
    its own OpenAI client and its pooled connection. Before, each turn on the other loop
    replaced the agent's one client, leaving the old one's connection open and unclosed: a
    new connection to the provider per turn (12 here)."""
    pytest.importorskip("openai")
    fake = FakeOpenAI()
    connections: set[tuple[str, int]] = set()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            connections.add(tuple(scope["client"]))
        await fake(scope, receive, send)

    with serve(upstream, timeout_keep_alive=60) as api:
        agent = get_agent(
            "openai",
            Settings(
                env_file=None, environ={}, openai_api_key="sk-test", openai_base_url=api + "/v1"
            ),
        )
        app = create_app(
            Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET), agent
        )
        with serve(app) as first, serve(app) as second, httpx.Client(timeout=20) as client:
            for n in range(12):
                body = event_body("message", conversation_id=f"two-{n}", turn_id=f"{n}")
                url = (first, first, second)[min(n, 1 + n % 2)] + "/api/agent"
                response = client.post(url, content=body, headers=signed_headers(body))
                assert response.status_code == 200
                assert '"content":" you today?"' in response.text, response.text
                if n == 1 and len(connections) == 2:  # two turns on one loop, one client
                    pytest.skip("this openai SDK closes its connection after each stream")
    assert len(fake.requests) == 12
    # one per loop; a third or fourth only if a pooled connection idled out (httpx: 5 s)
    assert len(connections) <= 4, len(connections)


# -- what the model is sent ------------------------------------------------------------------


def sent_messages(fake: FakeOpenAI, index: int = -1) -> list[tuple[str, str]]:
    """Request ``index``'s user/assistant messages as ``(role, text)``, empty ones too."""
    body = fake.requests[index]["body"]
    pairs = []
    for item in body.get("messages") or body.get("input") or []:
        if isinstance(item, dict) and item.get("role") in ("user", "assistant"):
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(str(part.get("text", "")) for part in content)
            pairs.append((item["role"], str(content or "")))
    return pairs


async def turn_with_history(name: str, history: list[tuple[str, str]], text: str) -> TurnResult:
    """One ``message`` turn of agent ``name`` in a conversation holding ``history``."""
    conversations = ConversationManager()
    for role, said in history:
        await conversations.add_message("conv_model_input", {"role": role, "text": said})
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, BUILDERS[name](False), conversations=conversations)
    with serve(app) as base, anyio.fail_after(20):
        async with LayercodeTestClient(
            base_url=base, secret=SECRET, conversation_id="conv_model_input"
        ) as client:
            return await client.message(text)


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_empty_or_blank_history_messages_are_not_sent(name: str, fake: FakeOpenAI) -> None:
    """Before: a message of the history without text (``add_message`` takes one) was sent
    to the model as it was, an empty or blank message, which some providers refuse (Gemini:
    no empty parts), failing every later turn of the conversation. They are left out."""
    history = [
        ("user", ""),
        ("assistant", "Welcome!"),
        ("user", " \n"),
        ("assistant", ""),
        ("user", "Any tents?"),
        ("assistant", "\t"),
        ("assistant", "Yes, four."),
    ]
    turn = await turn_with_history(name, history, "Great.")
    assert turn.errors == []
    assert sent_messages(fake) == [
        ("assistant", "Welcome!"),
        ("user", "Any tents?"),
        ("assistant", "Yes, four."),
        ("user", "Great."),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("model", [f"openai:{MODEL}", f"openai-chat:{MODEL}"])
async def test_a_pydantic_ai_system_prompt_is_sent_on_every_turn(
    model: str, fake: FakeOpenAI
) -> None:
    """Before: pydantic-ai sends an agent's ``system_prompt`` only when the run has no
    message history (it expects a history it wrote itself, holding the prompt), and ours
    holds none: with a welcome (recorded in the history) the model never saw the prompt,
    without one only on the first turn. Every request carries it now (and the history)."""
    pydantic_ai = pytest.importorskip("pydantic_ai")
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    for welcome in (WELCOME, None):
        agent = pydantic_ai.Agent(model, system_prompt="Speak like a pirate.")
        app = create_app(settings, from_pydantic_ai(agent, welcome=welcome))
        fake.requests.clear()
        with serve(app) as base, anyio.fail_after(20):
            async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
                await client.session_start()
                await client.message("Any tents?")
                await client.message("Great.")
        assert [fake.instructions(i) for i in range(len(fake.requests))] == [
            "Speak like a pirate."
        ] * (2 if welcome else 3)
        assert sent_messages(fake)[-2:] == [
            ("assistant", "Hello there. How can I help you today?"),
            ("user", "Great."),
        ]


class StoreOfYourOwn(MemoryConversationStore):
    """A store that hands a turn its history as it was given (no U+FFFD for a lone
    surrogate), as an application's own store may."""

    def __init__(self, history: list[HistoryMessage]) -> None:
        super().__init__()
        self.history = history

    async def read_turn(self, conversation_id: str) -> tuple[list[HistoryMessage], int]:
        return list(self.history), 0


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(BUILDERS))
async def test_half_an_emoji_in_the_history_reaches_the_model_as_u_fffd(
    name: str, fake: FakeOpenAI
) -> None:
    """Before: a history text holding a lone surrogate (half an emoji; from a store of your
    own) failed every turn of the conversation with 'agent error' (the model's client could
    not encode the request: ``UnicodeEncodeError``). The model gets U+FFFD in its place."""
    store = StoreOfYourOwn(
        [
            HistoryMessage(role="user", text="Half \ud83d an emoji?"),
            HistoryMessage(role="assistant", text="Yes \udc00\ud83d\ude00."),
        ]
    )
    settings = Settings(env_file=None, environ={}, layercode_webhook_secret=SECRET)
    app = create_app(settings, BUILDERS[name](False), conversations=ConversationManager(store))
    with serve(app) as base, anyio.fail_after(20):
        async with LayercodeTestClient(base_url=base, secret=SECRET) as client:
            turn = await client.message("Fine \U0001f600.")
    assert turn.errors == []
    assert sent_messages(fake) == [
        ("user", "Half \ufffd an emoji?"),
        ("assistant", "Yes \ufffd\U0001f600."),
        ("user", "Fine \U0001f600."),
    ]
