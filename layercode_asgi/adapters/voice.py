"""What every adapter shares: phrase chunking, the tool filler, tool actions, lazy imports.

An adapter turns a framework's run into :data:`Piece` values (text deltas and
:class:`ToolCall` markers); :func:`speak` makes the spoken replies from them:

* **Chunking.** ``chunking="phrase"`` (the default) speaks text at phrase boundaries: a
  sentence end (``.``, ``!``, ``?``, ``…`` or a line break) followed by a space, or a
  comma, semicolon or colon once the phrase has :data:`MIN_CLAUSE` characters. A CJK
  sentence end (an ideographic full stop, a fullwidth ``!`` or ``?``) needs no space.
  Each ``response.tts`` is a phrase a text-to-speech engine says with natural prosody,
  and the first goes out as soon as the model finishes its first phrase. A decimal point
  (``3.5``) is no boundary. A phrase past :data:`MAX_PHRASE` characters without a
  boundary ends at its last space; CJK text at a full-width mark, else between two wide
  characters (never before a combining mark or inside an emoji sequence).
  ``chunking="delta"`` passes the deltas through (whitespace alone, or half an emoji,
  goes out with the next delta).
* **Filler.** When the framework calls a tool, the text so far is spoken, then ``filler``
  (default ``"One moment."``) once per turn. ``filler`` may be a callable
  ``filler(tool_name) -> str | None`` (``None`` for tools that answer at once), or ``None``.
* **Tool actions.** A tool in an adapter's turn may call :func:`send_data` (a
  ``response.data``, sent once the tool has finished) or :func:`hang_up` (a
  ``response.hangup``, sent after the rest of the answer, so the model can say goodbye).
  :func:`current_turn` gives the turn's :class:`~layercode_asgi.agents.TurnContext`.
* **Provider errors.** A provider's failure (:func:`model_api_error`) or an answer without
  text (:func:`answer_error`) is a :class:`ModelAPIError`: the turn logs it, the caller
  hears ``agent error``. An answer the model ended early (max tokens, its content filter)
  is spoken as it came, with a warning (:func:`warn_cut_short`).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, NoReturn, TypeAlias
from unicodedata import category, east_asian_width

from ..agents import Agent, Data, Hangup, Reply, TurnContext, TurnEvent
from ..errors import ConfigurationError, check_callable, check_type, kind_of
from ..logs import escape_log_value
from ..redaction import MASK

__all__ = [
    "DEFAULT_FILLER",
    "GREETING_PROMPT",
    "Chunking",
    "Filler",
    "MissingExtraError",
    "ModelAPIError",
    "PhraseChunker",
    "ToolCall",
    "answer_error",
    "current_turn",
    "hang_up",
    "log_stopped_retry",
    "mask_key",
    "model_api_error",
    "note_model",
    "require_extra",
    "require_object",
    "reraise",
    "send_data",
    "speak",
    "voice_agent",
    "warn_cut_short",
]

logger = logging.getLogger("layercode_asgi.adapters")

#: The filler spoken before a tool runs, unless the adapter is given another.
DEFAULT_FILLER = "One moment."
#: What the model is told on a silent ``session.start`` when the adapter has no ``welcome``.
GREETING_PROMPT = "(The caller just joined. Greet them in one short sentence.)"
#: A comma ends a phrase only once the phrase is at least this long.
MIN_CLAUSE = 40
#: A phrase longer than this without a boundary ends at its last space (CJK: see above).
MAX_PHRASE = 500

#: How replies are cut for speech: whole phrases, or each model delta as it comes.
Chunking: TypeAlias = Literal["phrase", "delta"]
#: The filler spoken before a tool runs: text, ``None``, or ``filler(tool_name)``.
Filler: TypeAlias = str | Callable[[str], str | None] | None


class MissingExtraError(ConfigurationError, ImportError):
    """A framework adapter was asked for without its framework installed."""


def require_object(adapter: str, value: Any, what: str, ok: bool) -> None:
    """Refuse (``TypeError``) what the adapter cannot run: ``ok`` says whether it can."""
    if not ok or isinstance(value, type):
        raise TypeError(f"{adapter} needs {what}, got {kind_of(value)}")


def require_extra(module: str, extra: str, adapter: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{adapter} needs the {module.partition('.')[0]!r} package: "
            f"pip install './layercode-asgi[{extra}]'"
        ) from exc


class ModelAPIError(Exception):
    """A model provider's answer failed: an HTTP error (:func:`model_api_error`), or an
    answer cut short or without text (:func:`answer_error`).

    ``error_type``: the SDK's exception type (a span's ``error.type``), else this class.
    """

    def __init__(self, message: str, error_type: type[BaseException] | None = None) -> None:
        super().__init__(message)
        self.error_type = type(self) if error_type is None else error_type


#: Request headers that carry a provider's key (``Authorization: Bearer …`` and others).
_KEY_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")


def _credentials(chain: list[BaseException]) -> set[str]:
    """The keys and URL passwords of the HTTP requests the exceptions of ``chain`` hold."""
    found = set()
    for exc in chain:
        for holder in (exc, getattr(exc, "response", None)):
            try:
                request = getattr(holder, "request", None)
            except RuntimeError:  # httpx: an error raised without its request
                continue
            headers: Any = getattr(request, "headers", None) or {}
            for name in _KEY_HEADERS:
                value = headers.get(name)
                if isinstance(value, str) and value.strip():
                    found.add(value.strip().rpartition(" ")[2])  # without "Bearer "
            password = getattr(getattr(request, "url", None), "password", None)
            if isinstance(password, str) and password:
                found.add(password)
    return {secret for secret in found if len(secret) >= 4}


#: The exception classes (``module``, ``name``) a model SDK raises for a provider's failure
#: without an HTTP status; looked up only in modules already imported, so no extra is needed.
_PROVIDER_FAILURES = (
    ("openai", "APIError"),
    ("pydantic_ai.exceptions", "ModelAPIError"),
    ("pydantic_ai.exceptions", "UnexpectedModelBehavior"),
    ("agents.exceptions", "ModelBehaviorError"),
    ("langchain_core.exceptions", "ModelError"),
    ("anthropic", "APIError"),
    ("google.genai.errors", "APIError"),
)
#: Keys given to the built-in agents (they may come from ``.env``, not the environment).
_GIVEN_KEYS: set[str] = set()


def mask_key(key: str | None) -> None:
    """Mask ``key`` in every :class:`ModelAPIError` from now on (a built-in agent's key)."""
    if key and len(key.strip()) >= 4:
        _GIVEN_KEYS.add(key.strip())


def model_api_error(exc: BaseException, model: str | None = None) -> ModelAPIError | None:
    """``exc`` as a :class:`ModelAPIError` when it, or an exception it was raised from, is a
    provider's HTTP error (an ``int`` ``status_code``) or another provider failure; else
    ``None`` (for a :class:`ModelAPIError` too). The message, one bounded escaped line,
    names the status, ``model`` and what the provider said, with every key it may echo
    masked (the request's, the URL's password, the environment's ``*API_KEY``, the built-in
    agents')."""
    if isinstance(exc, ModelAPIError):
        return None
    chain = _chain(exc)
    answered = next((e for e in chain if isinstance(getattr(e, "status_code", None), int)), None)
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in _PROVIDER_FAILURES)
    failures = tuple(kind for kind in loaded if isinstance(kind, type))
    failed = answered or next((e for e in chain if isinstance(e, failures)), None)
    if failed is None:
        return None
    message = " ".join(f"{type(failed).__name__}: {failed}".split())  # indented JSON: one line
    environment = (v for k, v in os.environ.items() if k.upper().endswith("API_KEY"))
    keys = {key.strip() for key in environment if len(key.strip()) >= 4}
    for secret in sorted(_credentials(chain) | keys | _GIVEN_KEYS, key=len, reverse=True):
        message = message.replace(secret, MASK)
    status = getattr(answered, "status_code", 0)
    what = "failed" if answered is None else f"answered HTTP {status}"
    message = f"the model API {what}{_asked(model)}: {escape_log_value(message)}"
    return ModelAPIError(message, type(failed))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (at most 8)."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def log_stopped_retry(
    exc: BaseException, model: str | None = None, context: TurnContext | None = None
) -> None:
    """Log the WARNING ``the model API answered HTTP STATUS …: the turn stopped while the SDK
    waited to retry`` when ``exc`` (the turn's cancellation) came while the SDK waited to
    retry a provider's HTTP error (a 429, a 5xx). ``model`` and ``context`` default to the
    adapter turn's."""
    if isinstance(exc, Exception):  # a failure, not the turn stopping
        return
    actions = _ACTIONS.get()
    if actions is not None:
        model, context = model or actions.model, context or actions.context
    for link in _chain(exc)[1:]:
        response = getattr(link, "response", None)
        status = getattr(response, "status_code", None)
        if status in (408, 409, 429) or (isinstance(status, int) and status >= 500):  # retried
            headers = getattr(response, "headers", None)
            after = headers.get("retry-after") if isinstance(headers, Mapping) else None
            waited = "" if after is None else f", Retry-After: {escape_log_value(after)}"
            logger.warning(
                "the model API answered HTTP %s%s%s: the turn stopped while the SDK waited "
                "to retry",
                status,
                _asked(model),
                waited,
                extra=_ids(context),
            )
            return


def reraise(exc: Exception, model: str | None = None) -> NoReturn:
    """Raise ``exc`` (being handled) again, as its :class:`ModelAPIError` if it has one."""
    failure = model_api_error(exc, model)
    if failure is None:
        raise exc
    raise failure from None


def _asked(model: str | None) -> str:
    return f" (model={escape_log_value(model)})" if model else ""


def _ids(context: TurnContext | None) -> dict[str, str]:
    if context is None:
        return {}
    return {"conversation_id": context.conversation_id, "turn_id": context.turn_id}


def answer_error(problem: str, model: str | None = None) -> ModelAPIError:
    """A :class:`ModelAPIError` for an answer that cannot be spoken whole (``problem``:
    "held no text", "ended before its finish"), naming ``model``."""
    return ModelAPIError(f"the model's answer {problem}{_asked(model)}")


def warn_cut_short(reason: str, model: str | None, context: TurnContext | None = None) -> None:
    """Log the WARNING ``answer cut short: REASON (model=…)``: the model ended its answer
    early (``length``, ``max_output_tokens``, ``content_filter``); what came is spoken. In
    an adapter's turn, logged once at its end if it spoke (else the turn fails as one
    without text); elsewhere at once, for ``context``'s turn."""
    actions = _ACTIONS.get()
    if actions is None:
        _log_cut_short(reason, model, context)
    else:  # speak() logs it
        actions.cut_short = actions.cut_short or (reason, model)


def _log_cut_short(reason: str, model: str | None, context: TurnContext | None) -> None:
    extra = _ids(context)
    logger.warning("answer cut short: %s%s", escape_log_value(reason), _asked(model), extra=extra)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A framework started calling the tool ``name`` (the adapter may speak a filler)."""

    name: str


#: What a framework's run becomes before :func:`speak`: text deltas and tool calls. An
#: adapter yields ``""`` when a tool has finished, so what it sent goes out at once.
Piece: TypeAlias = str | ToolCall

#: Closing quotes and brackets (curly ones too, and CJK ones) that a sentence end may carry.
_CLOSERS = "\"')]\u201d\u2019\u300d\u300f\uff09"
#: A CJK sentence end: the ideographic full stop, the fullwidth exclamation and question marks.
_CJK_ENDS = "\u3002\uff01\uff1f"
_CLOSER = f"[{re.escape(_CLOSERS)}]"
#: What completes a CJK sentence end (and its closers): a space, or any other character.
_CJK_AFTER = rf"{_CLOSER}*(?:\s+|(?=[^\s{re.escape(_CLOSERS)}{_CJK_ENDS}]))"
#: A sentence end (its last punctuation mark: a long run such as ``"!!!…"`` is not searched
#: again from each of its characters), or line breaks.
_SENTENCE_END = re.compile(rf"[.!?…]{_CLOSER}*\s+|\n+|[{_CJK_ENDS}]{_CJK_AFTER}")
_CLAUSE_END = re.compile(r"[,;:]\s+")
#: What completes a phrase that ends with a sentence end (``_open`` is ``"."`` or ``"。"``).
_COMPLETION = {".": re.compile(rf"{_CLOSER}*\s+"), "。": re.compile(_CJK_AFTER)}
_SPACES = re.compile(r"\s+")
#: Where a long phrase of text written without spaces may end: a full-width sentence or
#: clause mark (the ideographic full stop and comma; the fullwidth exclamation and question
#: marks, comma, semicolon, colon and full stop).
_WIDE_MARKS = "\u3002\u3001\uff01\uff1f\uff0c\uff1b\uff1a\uff0e"
#: How far back from a delta's end a cut between two wide characters is looked for.
_WIDE_SCAN = 16
#: How long a phrase without a blank or a full-width mark grows before that cut.
_HARD_LIMIT = MAX_PHRASE + 100


def _wide_pair(left: str, right: str) -> bool:
    """Whether a cut between two characters is one between two CJK characters (wide or
    fullwidth), ``right`` not a mark or modifier that belongs with ``left``."""
    return (
        east_asian_width(left) in "WF"
        and east_asian_width(right) in "WF"
        and category(right) not in ("Mn", "Mc", "Me", "Sk")
    )


#: The last character of a phrase (before closers) -> the sentence end it leaves open.
_OPENS = dict.fromkeys(".!?…", ".") | dict.fromkeys(_CJK_ENDS, "。")


class PhraseChunker:
    """Collects text deltas and hands out whole phrases (see the module docstring)."""

    __slots__ = ("_mode", "_open", "_parts", "_size")

    def __init__(self, mode: Chunking = "phrase") -> None:
        if mode not in ("phrase", "delta"):
            raise ValueError(f"chunking must be 'phrase' or 'delta', got {mode!r}")
        self._mode = mode
        # The phrase so far, searched (each delta once, never copied again), and its length;
        # ``_open``: it ends with a sentence end that a space would complete (``"."``), or a
        # CJK one that anything but a closer would (``"。"``), or a long clause's comma
        # (``","``) that a space would complete.
        self._parts: list[str] = []
        self._size = 0
        self._open = ""

    def feed(self, text: str) -> Iterator[str]:
        """Add ``text``; yield every phrase it completes."""
        if self._mode == "delta":  # whitespace alone waits for the next delta, and so does
            # half an emoji (a UTF-16 high surrogate: a JSON escape split across two deltas)
            whole = len(text) - ("\ud800" <= text[-1:] <= "\udbff")
            self._parts.append(text[:whole])
            if text[:whole].strip():
                yield self._take()
            self._parts.append(text[whole:])
            return
        start = 0
        while (cut := self._boundary(text, start)) is not None:
            self._parts.append(text[start:cut])
            phrase, start = self._take(), cut
            if phrase.strip():
                yield phrase
        rest = text[start:] if start else text
        if self._size + len(rest) > MAX_PHRASE and (cut := self._long_cut(rest)) is not None:
            self._parts.append(rest[:cut])  # too long without a boundary
            phrase, rest = self._take(), rest[cut:]
            if phrase.strip():
                yield phrase
        if rest:
            self._parts.append(rest)
            self._size += len(rest)
            end = rest[-1]
            if end in _CLOSERS:  # after a sentence end (maybe in an earlier delta)?
                self._open = _OPENS.get(rest.rstrip(_CLOSERS)[-1:] or self._open, "")
            elif end in _OPENS:
                self._open = _OPENS[end]
            else:
                self._open = "," if end in ",;:" and self._size >= MIN_CLAUSE else ""

    def flush(self) -> str | None:
        """What is left (the end of the answer, or before a tool call), if anything."""
        rest = self._take()
        return rest if rest.strip() else None

    def _take(self) -> str:
        phrase = "".join(self._parts)
        self._parts.clear()
        self._size, self._open = 0, ""
        return phrase

    def _long_cut(self, rest: str) -> int | None:
        """Where a phrase past :data:`MAX_PHRASE` ends in ``rest``: after its last blank,
        else (text written without spaces) its last full-width mark, else, past
        :data:`_HARD_LIMIT`, between two wide characters near its end; ``None``: none yet."""
        if cut := rest.rfind(" ") + 1:
            return cut
        if cut := max(map(rest.rfind, _WIDE_MARKS)) + 1:
            while cut < len(rest) and rest[cut] in _CLOSERS:
                cut += 1
            return cut
        if self._size + len(rest) <= _HARD_LIMIT:
            return None
        before = self._parts[-1][-1:] if self._parts else ""
        for cut in range(len(rest) - 1, max(len(rest) - _WIDE_SCAN, 0) - 1, -1):
            left = rest[cut - 1] if cut else before
            if left and _wide_pair(left, rest[cut]):
                return cut
        return None

    def _boundary(self, text: str, start: int) -> int | None:
        """Where the first phrase of the phrase so far and ``text[start:]`` ends, if it does."""
        opened = self._open
        completion = _COMPLETION.get(opened)
        if completion is not None and (match := completion.match(text, start)) is not None:
            return match.end()
        if (match := _SENTENCE_END.search(text, start)) is not None:
            return match.end()
        if opened == "," and (match := _SPACES.match(text, start)) is not None:
            return match.end()
        # a clause end counts once the phrase has MIN_CLAUSE characters
        match = _CLAUSE_END.search(text, max(start, start + MIN_CLAUSE - 1 - self._size))
        return None if match is None else match.end()


@dataclass(slots=True)
class _Actions:
    """What the tools of the running turn asked for."""

    context: TurnContext
    replies: deque[Reply] = field(default_factory=deque)
    hangup: Hangup | None = None
    cut_short: tuple[str, str | None] | None = None  # see warn_cut_short(): why, the model
    model: str | None = None  # see note_model()


_ACTIONS: ContextVar[_Actions | None] = ContextVar("layercode_asgi_tool_actions", default=None)


def _actions(name: str) -> _Actions:
    actions = _ACTIONS.get()
    if actions is None:
        raise RuntimeError(f"{name}() works only in a tool called during an adapter's turn")
    return actions


def current_turn() -> TurnContext:
    """The :class:`TurnContext` of the adapter turn this tool runs in."""
    return _actions("current_turn").context


def send_data(content: Any) -> None:
    """From a tool: send ``content`` (any JSON value) to the browser (``response.data``)."""
    _actions("send_data").replies.append(Data(content))


def hang_up(content: Any = None) -> None:
    """From a tool: end the call (``response.hangup``) once the answer has been spoken."""
    _actions("hang_up").hangup = Hangup(content)


def note_model(model: str | None) -> None:
    """From an adapter's run: the model its turn asks, named by :func:`speak`'s failures
    (outside an adapter's turn: nothing)."""
    actions = _ACTIONS.get()
    if actions is not None:
        actions.model = model


async def speak(
    pieces: AsyncGenerator[Piece, None],
    context: TurnContext,
    *,
    chunking: Chunking = "phrase",
    filler: Filler = DEFAULT_FILLER,
) -> AsyncGenerator[Reply, None]:
    """The spoken replies of a framework run: chunked text, filler, tool actions, hangup.
    ``pieces`` is closed when the replies stop early; a provider's failure is raised as a
    :class:`ModelAPIError`."""
    chunker = PhraseChunker(chunking)
    actions = _Actions(context)
    token = _ACTIONS.set(actions)
    try:
        filled = spoke = False
        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    if isinstance(piece, ToolCall):
                        rest = chunker.flush()
                        if rest is not None:
                            spoke = True
                            yield rest
                        if not filled:
                            text = filler(piece.name) if callable(filler) else filler
                            if text and not text.isspace():
                                filled = True
                                yield text
                    else:
                        for phrase in chunker.feed(piece):
                            spoke = True
                            yield phrase
                    while actions.replies:
                        yield actions.replies.popleft()
        except Exception as exc:
            reraise(exc, actions.model)
        except BaseException as exc:  # the turn stopped: waiting to retry a refusal?
            log_stopped_retry(exc)
            raise
        rest = chunker.flush()
        for reply in (rest, *actions.replies, actions.hangup):  # the hangup last
            if reply is not None:
                yield reply
        if not spoke and rest is None and actions.hangup is None:  # empty, blank, a tool call
            raise answer_error("held no text", actions.model)  # alone: silence
        if actions.cut_short is not None:
            _log_cut_short(*actions.cut_short, context)
    finally:
        with suppress(ValueError):  # closed from another context (garbage-collected)
            _ACTIONS.reset(token)


def voice_agent(
    run: Callable[[str, TurnContext], AsyncGenerator[Piece, None]],
    *,
    name: str,
    welcome: str | None,
    chunking: Chunking,
    filler: Filler,
) -> Agent:
    """Our agent around ``run(prompt, context)``, a framework run as :data:`Piece` values.

    On a silent ``session.start`` it speaks ``welcome`` (nothing if blank), or with
    ``welcome=None`` asks the model to greet (:data:`GREETING_PROMPT`); a ``message``
    without text (or only blanks) gets no answer.
    """
    PhraseChunker(chunking)  # a bad option fails here, at start-up
    check_type("welcome", welcome, str | None, "a str or None")
    check_type("filler", filler, str | Callable | None, "a str, a callable or None")
    if callable(filler):
        check_callable("filler", filler, sync=True)

    async def agent(event: TurnEvent, context: TurnContext) -> AsyncIterator[Reply]:
        text = context.text
        if not text or text.isspace():
            if not context.is_session_start:
                return
            if welcome is not None:
                if welcome.strip():  # blank: a silent start
                    yield welcome
                return
            text = GREETING_PROMPT
        replies = speak(run(text, context), context, chunking=chunking, filler=filler)
        async with aclosing(replies):
            async for reply in replies:
                yield reply

    agent.__name__ = agent.__qualname__ = name
    agent.asyncio_only = True  # type: ignore[attr-defined]  # create_app refuses trio
    return agent
