"""``LayercodeSignature``: a pure ASGI middleware that verifies LayerCode webhook signatures.

It works wherever ASGI middleware does::

    app.add_middleware(LayercodeSignature, secret="whsec_…")          # Starlette, FastAPI
    Litestar(..., middleware=[DefineMiddleware(LayercodeSignature, secret="whsec_…")])
    app = LayercodeSignature(app, secret="whsec_…")                   # any ASGI app

For each protected HTTP request it checks the ``layercode-signature`` header (a missing,
malformed or stale one before any byte of the body is read), reads the body once (413 as
soon as it passes ``max_body_size``), verifies the signature against those exact bytes, and
calls the wrapped app with a ``receive`` that replays them (``await request.body()`` works
as usual). A bad signature gets ``401 {"error": "<reason>"}``; the wrapped app is not called.

The response path is untouched: the wrapped app gets the server's own ``send``, so a
Server-Sent Events stream reaches the client event by event (Starlette's
``BaseHTTPMiddleware``, which the reference implementation uses, cannot promise that).
``lifespan`` and ``websocket`` scopes, and HTTP paths outside ``paths``, pass through.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from urllib.parse import unquote

from anyio import CancelScope
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._asgi import (
    CLIENT_LEFT,
    HEADER_NAME,
    BodyTimeout,
    BodyTooLarge,
    ReplayBody,
    check_route,
    declared_length,
    json_error,
    read_body,
    route_path,
    send_json_error,
)
from .errors import (
    RETRY_AFTER,
    ConfigurationError,
    LayercodeError,
    check_callable,
    check_positive_int,
    check_seconds,
    kind_of,
)
from .logs import escape_error, log_refused, log_slow_body
from .replay import MemoryReplayCache, ReplayCache, replay_key
from .signature import (
    DEFAULT_TOLERANCE,
    SIGNATURE_HEADER,
    SignatureErrorReason,
    SignatureVerificationError,
    check_signature_header,
    verify_signature,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "BodyTooLarge",
    "LayercodeSignature",
    "read_body",
    "route_path",
]

logger = logging.getLogger("layercode_asgi.middleware")

#: Default limit on a webhook body: 1 MiB (a long ``session.end`` transcript is ~100 KiB).
DEFAULT_MAX_BODY_SIZE = 1024 * 1024

# Every error body is known in advance; rendering them once keeps the reject path cheap.
_REJECTIONS = {reason: json_error(401, reason.value) for reason in SignatureErrorReason}
# Refused on the header alone, before the body was read: the body may still be arriving.
_EARLY_REJECTIONS = {
    reason: json_error(401, reason.value, close=True) for reason in SignatureErrorReason
}
_BAD_CONTENT_LENGTH = json_error(400, "invalid content-length header", close=True)
_REPLAYED = json_error(409, "webhook already received: replayed signature")
_REPLAY_UNAVAILABLE = json_error(503, "replay protection unavailable", headers=[RETRY_AFTER])

#: Default limit on how long a request body may take to arrive, in seconds.
DEFAULT_BODY_TIMEOUT = 10.0


class _PathMatcher:
    """Exact paths, plus prefixes written with a trailing ``*`` (``"/hooks/*"``)."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, paths: Iterable[str]) -> None:
        if isinstance(paths, str | bytes):
            raise ConfigurationError(
                "LayercodeSignature paths must be a list of paths such as ['/api/agent'], "
                f"got {paths!r}"
            )
        exact: set[str] = set()
        prefixes: list[str] = []
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(
                    f"LayercodeSignature paths must be strings starting with '/', got {path!r}"
                )
            check_route("LayercodeSignature paths", path.removesuffix("*"))
            if path.endswith("*"):
                prefixes.append(path[:-1])
                # ``/hooks/*`` covers ``/hooks`` too: some apps route it to ``/hooks/``.
                exact.add(_squeezed(path[:-1]))
            else:
                exact.update((path, _squeezed(path)))
        if not exact:
            raise ConfigurationError(
                "LayercodeSignature paths is empty, so nothing would be protected: to "
                "protect every path, leave paths unset (None)"
            )
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def __call__(self, path: str) -> bool:
        if path in self.exact or path.startswith(self.prefixes):
            return True
        # Some apps (Litestar) route ``/api/agent/`` and ``//api//agent`` to ``/api/agent``:
        # every spelling of a protected exact path is protected.
        if "//" in path or path.endswith("/"):
            path = _squeezed(path)
            return path in self.exact or path.startswith(self.prefixes)
        return False


def _squeezed(path: str) -> str:
    """``path`` without repeated and trailing slashes (``//a//b/`` -> ``/a/b``)."""
    return "/" + "/".join(part for part in path.split("/") if part)


class LayercodeSignature:
    """Verify ``layercode-signature`` on HTTP requests before the wrapped app sees them.

    Args:
        app: the ASGI app to protect.
        secret: the webhook secret, or several during a rotation (any may match).
            Required; an empty, blank or missing secret raises :class:`ConfigurationError`
            when the middleware is built (at start-up), never per request.
        tolerance: largest accepted ``|now - t|`` in seconds (default 300, ``>= 0``).
        paths: request paths to protect; ``None`` (default) protects every HTTP request. A
            path matches below the app's mount point (see :func:`route_path`) and, to fail
            closed, as the full path (``root_path`` + ``path``) and as the client sent it
            (``raw_path``); repeated and trailing slashes do not count (``//api/agent/`` is
            ``/api/agent``); a trailing ``*`` makes a prefix (``/hooks/*`` covers ``/hooks``
            too). An empty ``paths``, or one no request path can match as written
            (``{param}``, ``%``, a ``*`` before the end, …), raises
            :class:`ConfigurationError`.
        max_body_size: largest accepted body in bytes (default 1 MiB). A larger declared
            ``Content-Length`` is refused with 413 before any byte is read; a chunked body
            is refused as soon as it passes the limit. The 413 closes the connection.
        header_name: the header carrying the signature (default ``layercode-signature``).
        body_timeout: seconds the whole body may take to arrive (default 10); a slower
            sender gets 408, so a trickling client cannot pin a worker. ``None``: no limit.
        replay_protection: refuse a verified signature seen before with 409. ``True``
            remembers signatures in this process (``MemoryReplayCache``); a
            :class:`~layercode_asgi.replay.ReplayCache` (e.g. ``RedisReplayCache``) shares
            them between workers. A cache that cannot answer gets 503 (fail closed). A
            delivery the wrapped app answers 503, 307 or 308 (resent) is forgotten (by a
            cache with ``forget``), so its retry is taken.
        on_rejected: called with the reason of each refused signature
            (``SignatureErrorReason`` name in lower case, e.g. ``no_matching_signature``,
            or ``replayed``): the metrics' ``TurnMetrics.signature_rejected``. If it raises,
            the error is logged and the refusal sent all the same.
    """

    __slots__ = (
        "_body_timeout",
        "_forget",
        "_header",
        "_matches",
        "_replay",
        "_secrets",
        "_timed_out",
        "_too_large",
        "app",
        "max_body_size",
        "on_rejected",
        "tolerance",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        secret: str | Sequence[str] | None = None,
        tolerance: int = DEFAULT_TOLERANCE,
        paths: Iterable[str] | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        header_name: str = SIGNATURE_HEADER,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        replay_protection: bool | ReplayCache = False,
        on_rejected: Callable[[str], None] | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"LayercodeSignature app must be an ASGI application, got {kind_of(app)}"
            )
        check_callable("on_rejected", on_rejected, sync=True)
        self.app = app
        self.on_rejected = on_rejected
        if not isinstance(secret, str | Iterable):  # None too
            secret = ()
        secrets = (secret,) if isinstance(secret, str) else tuple(secret)
        if not secrets or not all(isinstance(s, str) and s.strip() for s in secrets):
            raise ConfigurationError(
                "LayercodeSignature needs the webhook secret: pass secret='…' (for example "
                "from the LAYERCODE_WEBHOOK_SECRET environment variable); every secret must "
                "be a non-blank string"
            )
        if any(s != s.strip() for s in secrets):
            # Settings strips LAYERCODE_WEBHOOK_SECRET; a value passed here is taken exactly,
            # and LayerCode never signs with the whitespace: every webhook would get 401.
            raise ConfigurationError(
                "LayercodeSignature secret has whitespace around it (a copy-paste error or a "
                "file's newline?), which LayerCode's secret does not have: pass secret.strip()"
            )
        if any("," in s for s in secrets):  # never in LayerCode's (whsec_ + base64 / hex)
            raise ConfigurationError(
                "LayercodeSignature secret holds a comma: several secrets (a rotation) are a "
                "list, secret=['whsec_new', 'whsec_old'] (Settings().webhook_secrets splits "
                "LAYERCODE_WEBHOOK_SECRET on commas)"
            )
        # One secret is passed as a ``str``: verify_signature's fast path takes exactly that.
        self._secrets: str | tuple[str, ...] = secrets[0] if len(secrets) == 1 else secrets
        check_positive_int(tolerance, "LayercodeSignature tolerance", zero=True)
        self.tolerance = tolerance
        check_positive_int(max_body_size, "LayercodeSignature max_body_size")
        self.max_body_size = max_body_size
        self._too_large = json_error(413, f"request body exceeds {max_body_size} bytes", close=True)
        self._matches = None if paths is None else _PathMatcher(paths)
        if not isinstance(header_name, str) or not HEADER_NAME.fullmatch(header_name):
            raise ConfigurationError(
                f"LayercodeSignature header_name must be an HTTP header name, got {header_name!r}"
            )
        self._header = header_name.lower().encode("latin-1")
        check_seconds("body_timeout", body_timeout, zero=False, none=True)
        self._body_timeout = math.inf if body_timeout is None else float(body_timeout)
        self._timed_out = json_error(
            408, f"request body not received within {body_timeout} s", close=True
        )
        self._replay: ReplayCache | None
        if replay_protection is True:
            self._replay = MemoryReplayCache()
        elif replay_protection is False or replay_protection is None:
            self._replay = None
        elif isinstance(replay_protection, type):
            raise TypeError(
                f"LayercodeSignature replay_protection must be a bool or a ReplayCache, got "
                f"{kind_of(replay_protection)}"
            )
        elif hasattr(replay_protection, "seen"):
            self._replay = replay_protection
        else:
            raise ConfigurationError(
                "LayercodeSignature replay_protection must be a bool or a ReplayCache, "
                f"got {type(replay_protection).__name__}"
            )
        self._forget: Callable[[str], Awaitable[None]] | None = getattr(
            self._replay, "forget", None
        )

    def _protects(self, scope: Scope) -> bool:
        """Whether an HTTP request needs a signature: when in doubt (any spelling matches)."""
        matches = self._matches
        if matches is None:
            return True
        path: str = scope["path"]
        if matches(path):
            return True
        route = route_path(scope)
        if route is not path and matches(route):
            return True
        # A server (or FastAPI's ``root_path=``) may leave ``root_path`` out of ``path``: the
        # full path, as written with the mount point, is ``root_path`` + ``path`` then.
        root: str = scope.get("root_path", "")
        if route is path and root and matches(root + path):
            return True
        # Some apps hand middleware a rewritten path (Litestar: the path below a mounted
        # app, without ``root_path``); the path the client asked for counts as well.
        raw = scope.get("raw_path")
        return isinstance(raw, bytes) and matches(unquote(raw.partition(b"?")[0].decode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protects(scope):
            await self.app(scope, receive, send)
            return
        verified = await self.verified_body(scope, receive, send)
        if verified is not None:
            body, send = verified
            await self.app(scope, ReplayBody(body, receive), send)

    async def verified_body(
        self, scope: Scope, receive: Receive, send: Send, reads: set[CancelScope] | None = None
    ) -> tuple[bytes, Send] | None:
        """Run every check of the middleware on an HTTP request: the body and the ``send``
        to answer it with, or ``None`` once it has been answered.

        The signature header (refused before the body is read, the connection closed), the
        body's size and deadline, the signature, then replay protection. A request failing
        one is answered (400, 401, 408, 409, 413, 503), as is a client that left mid-body
        (400, for middleware outside). Otherwise nothing was sent: the caller answers
        through the ``send`` returned (with replay protection, one that forgets the delivery
        answered 503, 307 or 308); ``receive`` is unused here, to be handed on as it is.
        ``reads``: see :func:`read_body` (its :class:`BodyAborted` goes on, nothing sent).
        """
        parts: list[str] = []
        declared: bytes | None = None
        for name, value in scope["headers"]:
            if name == self._header:
                parts.append(value.decode("latin-1"))
            elif name == b"content-length":
                declared = value
        # Repeated headers combine as HTTP says (comma-joined, once: linear in their size);
        # two ``t=`` entries then make the header malformed rather than one silently winning.
        signature = ",".join(parts) if parts else None

        if declared is not None:
            length = declared_length(declared)
            if length is None:
                await self._refuse(
                    scope, send, _BAD_CONTENT_LENGTH, "invalid content-length header"
                )
                return None
            if length > self.max_body_size:
                await self._refuse_too_large(scope, send)
                return None

        # What the header alone decides is decided before any byte of the body is read.
        try:
            timestamp = check_signature_header(signature, self.tolerance)
        except SignatureVerificationError as exc:
            await self._refuse(scope, send, _EARLY_REJECTIONS[exc.reason], exc)
            return None

        try:
            body = await read_body(receive, self.max_body_size, self._body_timeout, reads)
        except BodyTooLarge:
            await self._refuse_too_large(scope, send)
            return None
        except BodyTimeout:
            log_slow_body(logger, scope, self._body_timeout)
            await send_json_error(send, self._timed_out)
            return None
        if body is None:  # the client left: answered for middleware outside (see CLIENT_LEFT)
            await send_json_error(send, CLIENT_LEFT)
            return None

        try:
            verify_signature(body, signature, self._secrets, self.tolerance)
        except SignatureVerificationError as exc:
            await self._refuse(scope, send, _REJECTIONS[exc.reason], exc)
            return None

        if self._replay is not None:
            key = replay_key(timestamp, body)
            if await self._is_replay(self._replay, key, timestamp, send):
                return None
            if self._forget is not None:
                return body, _forgetting(send, self._forget, key)
        return body, send

    async def _refuse(
        self, scope: Scope, send: Send, answer: tuple[Message, Message], why: object
    ) -> None:
        """Log why, tell ``on_rejected`` of a bad signature, answer."""
        log_refused(logger, scope, why)
        if isinstance(why, SignatureVerificationError):
            self._rejected(why.reason.name.lower())
        await send_json_error(send, answer)

    async def _refuse_too_large(self, scope: Scope, send: Send) -> None:
        why = f"request body exceeds {self.max_body_size} bytes"
        await self._refuse(scope, send, self._too_large, why)

    def _rejected(self, reason: str) -> None:
        """Tell ``on_rejected``; an error of its own is logged, the answer is still sent."""
        if self.on_rejected is not None:
            try:
                self.on_rejected(reason)
            except Exception:
                logger.exception("on_rejected failed (reason %s)", reason)

    async def _is_replay(self, cache: ReplayCache, key: str, timestamp: str, send: Send) -> bool:
        """Remember this delivery; answer 409 (or 503) and return True if it must stop."""
        # verify_signature accepts while floor(now) - t <= tolerance, i.e. until
        # t + tolerance + 1 (exclusive): remember the delivery that long (at least 1 s).
        ttl = max(1.0, int(timestamp) + self.tolerance + 1 - time.time())
        try:
            seen = await cache.seen(key, ttl)
        except Exception as exc:  # fail closed: a replay check that cannot run does not pass
            why = f"{type(exc).__name__}: {escape_error(exc)}"
            # RedisReplayCache's error says "replay cache unavailable" already, then its cause.
            why = why.removeprefix("StoreUnavailableError: replay cache unavailable: ")
            logger.error(
                "replay cache unavailable: %s", why, exc_info=not isinstance(exc, LayercodeError)
            )
            await send_json_error(send, _REPLAY_UNAVAILABLE)
            return True
        if seen:
            logger.warning("rejected replayed webhook (t=%s)", timestamp)
            self._rejected("replayed")
            await send_json_error(send, _REPLAYED)
            return True
        return False


#: 503 (LayerCode retries) and the redirects that keep the body (Starlette's 307 from
#: ``/api/agent/`` to ``/api/agent``): the same signed bytes come again, to be taken.
_NOT_PROCESSED = frozenset({307, 308, 503})


def _forgetting(send: Send, forget: Callable[[str], Awaitable[None]], key: str) -> Send:
    """``send`` that first forgets the delivery ``key`` if it is answered as not processed."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] in _NOT_PROCESSED:
            try:
                await forget(key)
            except Exception as exc:
                logger.error(
                    "replay cache could not forget a delivery answered %s (its retry will "
                    "get 409): %s: %s",
                    message["status"],
                    type(exc).__name__,
                    escape_error(exc),
                )
        await send(message)

    return sending
