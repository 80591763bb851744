"""Reading an untrusted HTTP reply within bounds (for the test kit).

httpx inflates a network chunk without a limit (a 1 MB gzip bomb becomes 1 GiB), so
:class:`BodyDecoder` inflates the raw stream in pieces of at most :data:`PIECE` bytes: a
reader can stop at any byte limit having held at most one piece more.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Final

import httpx

from .kitclient import drained

__all__ = ["ACCEPT_ENCODING", "PIECE", "BodyDecoder", "UnsupportedEncoding", "read_prefix"]

#: The ``Accept-Encoding`` the test kit sends: what :class:`BodyDecoder` decodes.
ACCEPT_ENCODING: Final = "gzip, deflate"
#: The most a :class:`BodyDecoder` inflates at once.
PIECE: Final = 64 * 1024


class UnsupportedEncoding(ValueError):
    """The reply's ``Content-Encoding`` is none the client asked for."""


class BodyDecoder:
    """Decode ``Content-Encoding`` (identity, gzip, deflate) in bounded pieces."""

    def __init__(self, content_encoding: str | None) -> None:
        names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
        names = [n for n in names if n != "identity"]
        self._inflate: Any = None  # a zlib decompress object
        if not names:
            return
        if len(names) > 1 or names[0] not in ("gzip", "x-gzip", "deflate"):
            raise UnsupportedEncoding(
                f"Content-Encoding {content_encoding!r} (the client accepts {ACCEPT_ENCODING})"
            )
        self._gzip = names[0] != "deflate"
        # deflate: zlib-wrapped, or raw (told by its first 2 bytes, held in _head)
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | (16 if self._gzip else 0))
        self._undecided = not self._gzip
        self._head = b""

    def feed(self, raw: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``raw``, in pieces of at most :data:`PIECE` bytes."""
        if self._inflate is None:
            for start in range(0, len(raw), PIECE):
                yield raw[start : start + PIECE]
            return
        data = raw
        if self._undecided:
            data = self._head + raw
            if len(data) < 2:
                self._head = data
                return
        while not self._inflate.eof or (data := self._next_member(data)):
            try:
                piece = self._inflate.decompress(data, PIECE)
            except zlib.error:
                if not self._undecided:
                    raise
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate
                self._undecided = False
                continue
            self._undecided = False
            # after a member's end, what follows is in unused_data (taken from there, once)
            data = b"" if self._inflate.eof else self._inflate.unconsumed_tail
            if piece:
                yield piece
            if not data and len(piece) < PIECE and not self._inflate.eof:
                break

    def _next_member(self, data: bytes) -> bytes:
        """The next gzip member's bytes (RFC 1952), with a decompressor for it; else ``b""``."""
        pending: bytes = self._inflate.unused_data + data
        if not self._gzip or pending[:2] != b"\x1f\x8b":
            if self._gzip and len(pending) < 2:  # a finished decompressor keeps it (unused_data)
                self._inflate.decompress(data)
            return b""
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)
        return pending


async def read_prefix(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` decoded bytes of a streamed ``response`` (then closed), and whether
    there was more; reads no further than it needs. An undecodable body: what was decoded."""
    kept = bytearray()
    try:
        decoder = BodyDecoder(response.headers.get("content-encoding"))
        async with drained(response) as raw:
            async for chunk in raw:
                for piece in decoder.feed(chunk):
                    kept += piece
                    if len(kept) > limit:
                        return bytes(kept[:limit]), True
    except (UnsupportedEncoding, zlib.error):
        return bytes(kept[:limit]), False
    return bytes(kept), False
