"""One app's open requests and drain (:class:`Lifecycle`, the endpoints that count in it), and
the start-up's settings and logging (:func:`logged_settings`, :func:`json_error_line`)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from ._asgi import BodyAborted, json_error, send_json_error
from .authorize import AuthorizeRoute
from .config import Settings
from .envfile import settings_sources
from .errors import RETRY_AFTER, ConfigurationError
from .logs import LOGGER_NAME, JsonFormatter, setup_logging
from .middleware import LayercodeSignature
from .webhook import LayercodeWebhook

__all__ = [
    "SHUTTING_DOWN_ANSWER",
    "AuthorizeEndpoint",
    "Lifecycle",
    "WebhookEndpoint",
    "json_error_line",
    "logged_settings",
    "start_up_log_format",
]

logger = logging.getLogger("layercode_asgi.server")


class Lifecycle:
    """Open webhook and authorize requests and the draining flag of one app
    (``app.state.lifecycle``).

    :func:`~layercode_asgi.server.run_server` calls :meth:`begin_drain` on SIGTERM: from
    then on new webhooks and authorize calls get ``503 {"error": "server is shutting
    down"}`` (with ``Retry-After``), ``/ready`` answers 503, and the server waits until
    :attr:`active` is 0 or the grace period is over. Then it calls :meth:`abort`: open turn
    streams end with ``response.error`` ("server is shutting down") and ``response.end``,
    turns still waiting for their conversation (and webhooks whose body was still arriving),
    ``data`` / ``session.*`` hooks still running and authorize calls still waiting for
    LayerCode get 503 JSON, instead of the connection being cut. Any other server or
    process manager can do the same through this object.
    """

    __slots__ = ("aborted", "aborters", "active", "draining", "reads")

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        #: What :meth:`abort` cancels: the reads of webhook bodies still arriving, and the
        #: authorize calls still waiting for LayerCode.
        self.reads: set[anyio.CancelScope] = set()
        #: :meth:`abort` was called: a webhook whose body arrives later starts no turn (503).
        self.aborted = False
        #: Called by :meth:`abort` (``create_app`` adds its webhook's ``abort_turns``).
        self.aborters: list[Callable[[], None]] = []

    def begin_drain(self) -> None:
        """Refuse new webhooks from now on (idempotent; safe to call from a signal handler)."""
        self.draining = True

    def abort(self) -> None:
        """End the open webhooks now (from the event loop): see the class docstring."""
        self.draining = self.aborted = True
        for reading in list(self.reads):
            reading.cancel()
        for aborter in self.aborters:
            try:
                aborter()
            except Exception:
                logger.exception("aborting open webhooks failed")


SHUTTING_DOWN_ANSWER = json_error(503, "server is shutting down", close=True, headers=[RETRY_AFTER])


class WebhookEndpoint:
    """The webhook route, counted in :class:`Lifecycle`: 503 once draining, else
    ``signature_check.verified_body`` and the body (read once) to ``webhook.answer``."""

    __slots__ = ("lifecycle", "signature_check", "webhook")

    def __init__(
        self, signature_check: LayercodeSignature, webhook: LayercodeWebhook, lifecycle: Lifecycle
    ) -> None:
        self.signature_check = signature_check
        self.webhook = webhook
        self.lifecycle = lifecycle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        lifecycle = self.lifecycle
        if lifecycle.draining:
            await send_json_error(send, SHUTTING_DOWN_ANSWER)
            return
        lifecycle.active += 1
        try:
            verified = await self.signature_check.verified_body(
                scope, receive, send, lifecycle.reads
            )
            if verified is None:  # refused: answered
                return
            body, send = verified  # with replay protection: a 503 forgets the delivery
            if lifecycle.aborted:  # nothing would end its turn now
                await send_json_error(send, SHUTTING_DOWN_ANSWER)
            else:
                await self.webhook.answer(body, scope, receive, send)
        except BodyAborted:  # its body was still arriving when the drain ended
            await send_json_error(send, SHUTTING_DOWN_ANSWER)
        finally:
            lifecycle.active -= 1


class AuthorizeEndpoint:
    """The authorize route, counted in :class:`Lifecycle` (the drain waits for a call still
    waiting for LayerCode): 503 once draining; a call still open at :meth:`Lifecycle.abort`
    is cancelled and answered 503."""

    __slots__ = ("authorize", "lifecycle")

    def __init__(self, authorize: AuthorizeRoute, lifecycle: Lifecycle) -> None:
        self.authorize = authorize
        self.lifecycle = lifecycle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        lifecycle = self.lifecycle
        if lifecycle.draining:
            await send_json_error(send, SHUTTING_DOWN_ANSWER)
            return
        sent = False

        async def sending(message: Any) -> None:
            nonlocal sent
            sent = True
            await send(message)

        lifecycle.active += 1
        with anyio.CancelScope() as cancel:
            lifecycle.reads.add(cancel)
            try:
                await self.authorize(scope, receive, sending)
            finally:
                lifecycle.reads.discard(cancel)
                lifecycle.active -= 1
        if cancel.cancelled_caught and not sent:
            await send_json_error(send, SHUTTING_DOWN_ANSWER)


def logged_settings(
    env_file: str | None, environ: Mapping[str, str] | None = None, *, verbose: bool = False
) -> Settings:
    """``Settings(env_file=env_file, environ=environ)``, then :func:`setup_logging` as they
    say (``verbose``: at DEBUG). What reading them logged (a misspelt variable's warning)
    is held back until then: it comes out in their format, if their level lets it."""
    library = logging.getLogger(LOGGER_NAME)
    held = logging.handlers.BufferingHandler(capacity=sys.maxsize)
    configured = library.handlers, library.propagate
    library.handlers, library.propagate = [held], False
    try:
        try:
            settings = Settings(env_file=env_file, environ=environ)
        finally:
            library.handlers, library.propagate = configured
        setup_logging(
            level="DEBUG" if verbose else settings.log_level,
            logfire_token=settings.logfire_token,
            log_format=settings.log_format,
        )
    finally:  # settings that fail to read: their warnings still go out
        for record in held.buffer:
            source = logging.getLogger(record.name)
            if source.isEnabledFor(record.levelno):  # a handler on ``source`` had it already
                library.handle(record)
    return settings


def start_up_log_format(env_file: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The ``LOG_FORMAT`` these settings give, read alone (``"text"`` unless it reads as
    ``json``): the format of the line that ends a start-up, whose settings may not read."""
    try:
        env, dotenv = settings_sources(None, environ)
        if "LOG_FORMAT" not in env and env_file is not None:
            dotenv = settings_sources(env_file, environ)[1]
    except ConfigurationError:  # the sources themselves do not read
        return "text"
    raw = env.get("LOG_FORMAT", dotenv.get("LOG_FORMAT", ""))
    return "json" if raw.strip().lower() == "json" else "text"


def json_error_line(text: str, exc: BaseException | None = None) -> str:
    """``text`` (``error: …``, what a start-up that failed prints on stderr) as a record of
    ``LOG_FORMAT=json`` (logger ``layercode_asgi``, level ERROR), with ``exc``'s traceback."""
    record = logging.makeLogRecord({"name": LOGGER_NAME, "msg": text})
    record.levelno, record.levelname = logging.ERROR, "ERROR"
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    return JsonFormatter().format(record)
