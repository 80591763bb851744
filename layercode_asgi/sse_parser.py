"""An incremental Server-Sent Events parser for clients (re-exported by the test kit)."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser"]

#: The SSE line terminators: CRLF, lone LF, lone CR (and nothing else, unlike splitlines).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: A line's unjoined pieces are merged at this count: a line sent in tiny chunks is held in
#: about its own size, not a str object per piece (28 times its size).
_MERGE_AT = 256


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched SSE message: ``data`` (lines joined with ``\\n``), ``event`` type
    (``"message"`` when the stream named none), the last event ``id`` and ``retry`` (ms)."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEParser:
    """An incremental Server-Sent Events parser (WHATWG HTML, "event stream interpretation").

    Feed it bytes (or text) in chunks of any size; :meth:`feed` returns the messages
    completed by that chunk. Lines end with CRLF, LF or CR (a CR at the end of one chunk
    followed by LF at the start of the next counts once); a leading BOM is skipped; invalid
    UTF-8 becomes U+FFFD; ``data:`` lines accumulate, joined with ``\\n``; one space after
    the colon is removed; lines starting with ``:`` are comments; a blank line dispatches,
    unless no data was given; ``id`` containing NUL and non-numeric ``retry`` are ignored.
    A message not terminated by a blank line when the stream ends is discarded, as the
    specification says (:attr:`pending` tells whether there is one).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # the unterminated line's pieces, joined once at its line break: linear, not quadratic
        self._partial: list[str] = []
        self._merged = 0  # how many of its first pieces are merged runs of _MERGE_AT pieces
        self._started = False
        self._after_cr = False
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None
        self._dirty = False

    @property
    def pending(self) -> bool:
        """Whether fields were read that no blank line has dispatched yet."""
        return self._dirty or bool(self._partial)

    @property
    def last_event_id(self) -> str:
        return self._last_id

    def feed(self, chunk: bytes | bytearray | memoryview | str) -> list[SSEEvent]:
        """Parse ``chunk``; return the messages it completed, in order."""
        if isinstance(chunk, str):
            text = chunk
        elif isinstance(chunk, bytes | bytearray | memoryview):
            text = self._decoder.decode(chunk)
        else:
            raise TypeError(f"chunk must be bytes or str, got {type(chunk).__name__}")
        if not text:
            return []
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        events: list[SSEEvent] = []
        start = 0
        for match in _LINE_BREAK.finditer(text):
            piece = text[start : match.start()]
            if self._partial:
                self._partial.append(piece)
                piece = "".join(self._partial)
                self._partial.clear()
                self._merged = 0
            if (event := self._line(piece)) is not None:
                events.append(event)
            start = match.end()
        # A CR ending the chunk ended its line; an LF opening the next chunk belongs to it.
        self._after_cr = text.endswith("\r")
        if start < len(text):
            partial = self._partial
            partial.append(text[start:])
            if len(partial) - self._merged >= _MERGE_AT:  # each piece is merged once: linear
                partial[self._merged :] = ["".join(partial[self._merged :])]
                self._merged += 1
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: flush the decoder. Returns nothing (unterminated data is dropped)."""
        if tail := self._decoder.decode(b"", final=True):
            self._partial.append(tail)
        return []

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._dirty = True
        elif name == "event":
            self._event = value
            self._dirty = True
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event_type, retry = self._data, self._event, self._retry
        self._data, self._event, self._retry, self._dirty = [], "", None, False
        if not data:
            return None
        return SSEEvent(
            data="\n".join(data), event=event_type or "message", id=self._last_id, retry=retry
        )
