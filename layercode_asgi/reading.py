"""Reading an HTTP reply from a party we do not trust, within bounds (for the test kit).

httpx decodes a compressed body whole, or one network chunk at a time without a limit on
what a chunk inflates to: a 1 MB gzip bomb becomes 1 GiB. :class:`BodyDecoder` inflates the
raw stream (``response.aiter_raw()``) in pieces of at most :data:`PIECE` bytes, so the
reader can stop at any byte limit having held at most one piece more. :func:`read_prefix`
reads a bounded prefix of a body (to quote it in an error) and nothing else.

Only the encodings the client asks for are decoded (:data:`ACCEPT_ENCODING`: gzip and
deflate); any other raises :class:`UnsupportedEncoding`.
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
        # gzip: a gzip header (wbits 16+); deflate: zlib-wrapped, or raw (fixed on error)
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | (16 if self._gzip else 0))
        # deflate, until its first 2 bytes (held in _head) told zlib-wrapped from raw
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
            # At a member's end what follows is in unused_data (with a limit, in the
            # unconsumed tail as well): taken from there, once.
            data = b"" if self._inflate.eof else self._inflate.unconsumed_tail
            if piece:
                yield piece
            if not data and len(piece) < PIECE and not self._inflate.eof:
                break

    def _next_member(self, data: bytes) -> bytes:
        """After a gzip member, the next one's bytes (RFC 1952: members may follow each other),
        with a decompressor for it; else ``b""``: what follows is ignored, or too short yet."""
        pending: bytes = self._inflate.unused_data + data
        if not self._gzip or pending[:2] != b"\x1f\x8b":
            if self._gzip and len(pending) < 2:  # a finished decompressor keeps it (unused_data)
                self._inflate.decompress(data)
            return b""
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)
        return pending


async def read_prefix(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` decoded bytes of a streamed ``response`` (then closed); and whether there
    was more.

    Reads no further than it needs: a large or endless body, or a gzip bomb, costs at most
    ``limit`` plus one raw chunk and one :data:`PIECE`. An undecodable body gives what was
    decoded so far.
    """
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
