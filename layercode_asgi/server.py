"""``create_app``: a ready LayerCode backend as a Starlette app (mountable anywhere).

Routes (paths of the first two are arguments):

===================  ======  ==========================================================
``/api/agent``       POST    the signed webhook: SSE for turns, JSON for other events
``/api/authorize``   POST    mints a browser session key at LayerCode (guardable)
``/health``          GET     ``{"status": "healthy", "timestamp": …, "version": …}``
``/ready``           GET     ``{"ready", "agent"}`` (+ ``"model"``); 503 if a store is down
``/metrics``         GET     Prometheus text format, only with ``LAYERCODE_METRICS=true``
                             and prometheus-client installed (``LAYERCODE_METRICS_API_KEYS``)
===================  ======  ==========================================================

Every error is JSON ``{"error": "…"}`` with a fitting status (400, 401, 404, 405, 408, 409,
413, 415, 502, 503); a caller never sees a stack trace.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ._asgi import (
    JSONResponse,
    check_route,
    json_error_response,
    must_propagate,
    not_allowed,
)
from ._redis import REDIS_CLIENT
from ._version import __version__
from .agents import Agent, agent_name, close_agent, get_agent
from .apikeys import check_keys_apart
from .authorize import AuthorizeGuard, AuthorizeRoute
from .config import Settings
from .conversation import ConversationManager, RedisConversationStore
from .errors import (
    ConfigurationError,
    check_callable,
    check_positive_int,
    check_seconds,
    check_type,
    require_asyncio,
)
from .gctuning import tune_gc, untune_gc
from .lifecycle import (
    AuthorizeEndpoint,
    Lifecycle,
    WebhookEndpoint,
    json_error_line,
    logged_settings,
    start_up_log_format,
)
from .logs import escape_error, escape_log_value, hide_in_logs, settings_secrets, uvicorn_log_config
from .metrics import installed, metrics_from_settings
from .middleware import LayercodeSignature
from .replay import MemoryReplayCache, RedisReplayCache, ReplayCache
from .webhook import EventHook, LayercodeWebhook

__all__ = [
    "AuthorizeGuard",
    "Lifecycle",
    "app_from_env",
    "check_routes",
    "create_app",
    "run_server",
]

logger = logging.getLogger("layercode_asgi.server")

#: How long /ready waits for the conversation store.
READY_TIMEOUT = 2.0
#: After the shutdown grace period, how long ended turns get to send their last events.
ABORT_WAIT = 2.0


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    allow = headers.get("Allow") if exc.status_code == 405 else None
    if not allow:
        return json_error_response(exc.status_code, str(exc.detail).lower(), exc.headers)
    # Starlette's Allow is in set order ("HEAD, GET" or "GET, HEAD"): sorted, as the message.
    message, headers["Allow"] = not_allowed(allow)
    return json_error_response(405, message, headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    request.scope[_ANSWERED] = exc
    logger.error(
        "unhandled error on %s %s",
        escape_log_value(request.method),
        escape_log_value(request.scope.get("path")),  # request.url can raise (a non-UTF-8 query)
        exc_info=exc,
    )
    return json_error_response(500, "internal error", CLOSE)


class _CORSMiddleware(CORSMiddleware):
    """Starlette's CORS, answering a refused preflight in JSON like every other error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return json_error_response(400, bytes(response.body).decode().lower(), headers)


_Handler = TypeVar("_Handler", bound=Callable[..., Any])

#: On a 500: Starlette re-raises the error after it and the server closes the connection; a
#: keep-alive client not told so would send its next request down it ("connection reset").
CLOSE = {"connection": "close"}


def _closing(handler: Callable[..., Any]) -> Callable[[Request, Exception], Awaitable[Response]]:
    """``handler`` (sync ones in a thread, as Starlette runs them), its response with CLOSE."""

    async def closing(request: Request, exc: Exception) -> Response:
        if inspect.iscoroutinefunction(handler):
            response = await handler(request, exc)
        else:
            response = await anyio.to_thread.run_sync(handler, request, exc)
            if inspect.isawaitable(response):  # an object with an async __call__
                response = await response
        response.headers.update(CLOSE)
        return response  # type: ignore[no-any-return]

    return closing


# Set on a request's scope by _server_error: the error it logged and answered.
_ANSWERED = "layercode_asgi.answered_error"


class LayercodeApp(Starlette):
    """The Starlette app :func:`create_app` returns; it takes exception handlers by decorator
    too (Starlette 1 dropped its own). An error its own 500 handler logged (escaped, secrets
    masked) stops here, not re-raised to the server (which would log a secret in clear); one
    a handler of yours answered goes on to the server, as in any Starlette app."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's three steps, not ``super().__call__``: a coroutine frame fewer per open
        # request, 248 of the 16,105 bytes an open turn held (tracemalloc, 800 open turns).
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        try:
            await self.middleware_stack(scope, receive, send)
        except Exception as exc:
            if scope.get(_ANSWERED) is not exc:
                raise

    def exception_handler(
        self, exc_class_or_status_code: int | type[Exception]
    ) -> Callable[[_Handler], _Handler]:
        """``@app.exception_handler(ValueError)``: :meth:`add_exception_handler` for the
        decorated function, which is returned unchanged. Add handlers before serving."""

        def register(handler: _Handler) -> _Handler:
            self.add_exception_handler(exc_class_or_status_code, handler)
            return handler

        return register

    def add_exception_handler(
        self, exc_class_or_status_code: int | type[Exception], handler: Callable[..., Any]
    ) -> None:
        """Starlette's; a handler of ``Exception`` or 500 also answers ``Connection: close``."""
        if exc_class_or_status_code in (500, Exception):
            handler = _closing(handler)
        super().add_exception_handler(exc_class_or_status_code, handler)


#: The routes every :func:`create_app` has besides its webhook and authorize routes.
FIXED_ROUTES = ("/health", "/ready", "/metrics")


def check_routes(
    agent_route: object,
    authorize_route: object,
    names: tuple[str, str] = ("agent_route", "authorize_route"),
) -> None:
    """Raise :class:`ConfigurationError` (naming ``names``) unless both are routes a request
    can match as written (:func:`~layercode_asgi._asgi.check_route`), apart from each other
    and from :data:`FIXED_ROUTES`, letter case and a trailing ``/`` aside."""
    taken = {path: f"the path of the {path} route" for path in FIXED_ROUTES}
    for name, path in zip(names, (agent_route, authorize_route), strict=True):
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(f"{name} must be a path starting with '/', got {path!r}")
        check_route(name, path)
        key = path.rstrip("/").lower()
        if key in taken:
            raise ConfigurationError(
                f"{name} {path!r} is {taken[key]} (letter case and a trailing '/' aside): "
                "choose another path"
            )
        taken[key] = f"the same path as {name}"


def create_app(
    settings: Settings | None = None,
    agent: Agent | str | None = None,
    agent_route: str = "/api/agent",
    authorize_route: str = "/api/authorize",
    *,
    conversations: ConversationManager | None = None,
    on_data: EventHook | None = None,
    on_session_update: EventHook | None = None,
    on_session_end: EventHook | None = None,
    authorize_guard: AuthorizeGuard | None = None,
    authorize_timeout: float = 10.0,
    extras: Mapping[str, Any] | None = None,
    metrics_registry: Any = None,
) -> LayercodeApp:
    """Build the LayerCode backend app (a :class:`LayercodeApp`, Starlette, with four routes).

    Args:
        settings: configuration; ``None`` reads the environment and ``.env``.
        agent: the agent callable, or a name for :func:`~layercode_asgi.agents.get_agent`;
            ``None`` uses ``settings.agent`` (default ``echo``).
        agent_route: path of the webhook route.
        authorize_route: path of the authorize route.
        conversations: history store; ``None`` builds one from settings (Redis when
            ``REDIS_URL`` is set, else bounded memory).
        on_data: optional hook called with each ``data`` event (its return value is the
            JSON reply).
        on_session_update: optional hook called with each ``session.update`` event.
        on_session_end: optional hook called with each ``session.end`` event.
        authorize_guard: a custom check for the authorize route (replaces the key check
            of ``LAYERCODE_AUTHORIZE_API_KEYS``; with both, a warning at start-up).
        authorize_timeout: seconds to wait for LayerCode's API (a finite number > 0).
        extras: objects handed to agents as ``context.extras``.
        metrics_registry: the ``prometheus_client.CollectorRegistry`` of the metrics and of
            ``/metrics`` (default: prometheus-client's, shared by every app of the process).

    Raises:
        ConfigurationError: no webhook secret, an unknown agent, an agent that cannot run
            with these settings, an invalid ``authorize_timeout``, a route no request can
            match as written or one on another route's path (:func:`check_routes`), a route
            key that is a secret (:func:`~layercode_asgi.apikeys.check_keys_apart`). Raised
            here, at start-up, never per request.
    """
    check_seconds("authorize_timeout", authorize_timeout, zero=False, none=False)
    check_routes(agent_route, authorize_route)
    check_type("settings", settings, Settings | None, "a Settings or None")
    settings = Settings() if settings is None else settings
    secrets = settings.webhook_secrets
    if not secrets:
        raise ConfigurationError(
            "LAYERCODE_WEBHOOK_SECRET is not set: the webhook route would accept anything. "
            "Set it to your agent's webhook secret (LayerCode dashboard)."
        )
    check_keys_apart(settings)
    hide_in_logs(*settings_secrets(settings))  # from the log lines of setup_logging's formats
    # Every check before the agent is built (a factory may open a client, a pool): a failing
    # create_app leaves nothing to close. The clients built until then connect on first use.
    check_callable("on_data", on_data)
    check_callable("on_session_update", on_session_update)
    check_callable("on_session_end", on_session_end)
    check_type("extras", extras, Mapping | None, "a mapping or None")
    metrics = metrics_from_settings(settings, registry=metrics_registry)
    serves_metrics = settings.metrics and installed("prometheus_client")
    authorize = AuthorizeRoute(settings, authorize_guard, authorize_timeout)
    conversations = (
        ConversationManager.from_settings(settings) if conversations is None else conversations
    )
    replay: ReplayCache | None = None
    if settings.replay_protection:
        # Shared by every worker when they share Redis; else this process's memory.
        replay = (
            RedisReplayCache(settings.redis_url, cluster=settings.redis_cluster)
            if settings.redis_url
            else MemoryReplayCache()
        )
    redis_replay = replay if isinstance(replay, RedisReplayCache) else None
    if isinstance(agent, str) or agent is None:
        agent = get_agent(settings.agent if agent is None else agent, settings)

    webhook = LayercodeWebhook(
        agent,
        conversations=conversations,
        on_data=on_data,
        on_session_update=on_session_update,
        on_session_end=on_session_end,
        turn_timeout=settings.turn_timeout,
        timeout_message=settings.turn_timeout_message,
        turn_grace=settings.turn_grace,
        keep_history=settings.keep_history,
        lock_wait_grace=settings.lock_wait_grace,
        max_queued_turns=settings.max_queued_turns,
        extras=extras,
        max_body_size=settings.max_body_size,
        metrics=metrics,
    )
    # Not middleware around the webhook: WebhookEndpoint runs its checks (verified_body).
    signature_check = LayercodeSignature(
        webhook,
        secret=secrets,
        tolerance=settings.signature_tolerance,
        max_body_size=settings.max_body_size,
        body_timeout=settings.body_timeout,
        # ``is None``, not truthiness: an empty MemoryReplayCache has len() 0.
        replay_protection=False if replay is None else replay,
        on_rejected=None if metrics is None else metrics.signature_rejected,
    )
    name = agent_name(agent)
    # Only an agent that uses a model says which (the built-in openai agent does).
    model = getattr(agent, "model", None)
    model = model if isinstance(model, str) else None
    lifecycle = Lifecycle()
    lifecycle.aborters.append(webhook.abort_turns)

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "healthy",
                "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "version": __version__,
            }
        )

    async def ready(request: Request) -> Response:
        body: dict[str, Any] = {"ready": True, "agent": name}
        if model is not None:
            body["model"] = model
        problem = "server is shutting down" if lifecycle.draining else await stores_problem()
        if problem is None:
            return JSONResponse(body)
        body.update(ready=False, error=problem)
        return JSONResponse(body, status_code=503)

    async def stores_problem() -> str | None:
        what = "conversation store"
        with anyio.move_on_after(READY_TIMEOUT):
            try:
                await conversations.ping()
                if redis_replay is not None:  # history may be elsewhere
                    what = "replay protection"
                    await redis_replay.ping()
                return None
            except BaseException as exc:  # a store's own BaseException too
                if must_propagate(exc):  # the timeout's cancellation too
                    raise
                # The details (host, port, driver text) are for the log, not for the caller.
                logger.warning(
                    "not ready: %s unavailable: %s: %s", what, type(exc).__name__, escape_error(exc)
                )
                return f"{what} unavailable"
        return f"{what} did not answer in time"

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if isinstance(conversations.store, RedisConversationStore) or redis_replay is not None:
            require_asyncio(REDIS_CLIENT)
        if getattr(agent, "asyncio_only", False):  # the adapters' (pydantic-ai, LangChain...)
            require_asyncio(f"the agent {name} (its framework)")
        if not settings.authorize_api_keys and authorize_guard is None:
            _warn_unguarded(
                "authorize",
                authorize_route,
                "mint LayerCode sessions",
                "LAYERCODE_AUTHORIZE_API_KEYS or authorize_guard",
            )
        elif settings.authorize_api_keys and authorize_guard is not None:
            logger.warning(
                "authorize_guard replaces LAYERCODE_AUTHORIZE_API_KEYS: the authorize route "
                "%s checks the guard only, not the keys",
                authorize_route,
            )
        if serves_metrics and not settings.metrics_api_keys:
            _warn_unguarded("metrics", "/metrics", "read the metrics", "LAYERCODE_METRICS_API_KEYS")
        if settings.gc_tuning:
            tune_gc()
        try:
            yield
        finally:  # every close runs whatever one before it did; run last to first
            async with AsyncExitStack() as closes:
                if replay is not None:
                    closes.push_async_callback(_close, "replay cache", replay.aclose)
                closes.push_async_callback(_close, "conversation store", conversations.aclose)
                closes.push_async_callback(_close, "authorize client", authorize.aclose)
                closes.push_async_callback(close_agent, agent, name)
                if settings.gc_tuning:
                    closes.callback(untune_gc)

    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                _CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["authorization", "content-type", "x-api-key"],
                max_age=600,
            )
        )
    routes = [
        Route(agent_route, WebhookEndpoint(signature_check, webhook, lifecycle), methods=["POST"]),
        Route(authorize_route, AuthorizeEndpoint(authorize, lifecycle), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
    if serves_metrics:
        from .prometheus import MetricsEndpoint

        endpoint = MetricsEndpoint(settings.metrics_api_keys, metrics_registry)
        routes.append(Route("/metrics", endpoint))
    app = LayercodeApp(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception, Exception: _server_error},
        lifespan=lifespan,
    )
    # /api/agent/ is a JSON 404, not Starlette's 307 to an http:// URL built from the Host
    # header (a webhook client following it would re-send the body in clear text).
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.agent = agent
    app.state.conversations = conversations
    app.state.webhook = webhook
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    return app


async def _close(what: str, close: Callable[[], Awaitable[object]]) -> None:
    """One close of the lifespan's end: a failure is logged, and the shutdown goes on."""
    try:
        await close()
    except BaseException as exc:  # a backend's own kind too
        if must_propagate(exc):
            raise
        logger.error("closing the %s failed", what, exc_info=exc)


def _warn_unguarded(kind: str, route: str, harm: str, guard: str) -> None:
    message = "the %s route %s is not guarded: anyone who can reach it can %s (set %s)"
    logger.warning(message, kind, route, harm, guard)


def app_from_env() -> Starlette:
    """An app configured from the environment and an env file: the one that
    ``LAYERCODE_ENV_FILE`` names (empty: none), else ``.env`` in the working directory.

    For servers that take a factory: ``uvicorn --factory layercode_asgi.server:app_from_env``.
    Settings it cannot start with (a :class:`ConfigurationError`) print one line ``error: …``
    on stderr and raise ``SystemExit(3)``: the servers would print their loader's traceback.
    """
    import os
    import sys

    from .envfile import chosen_env_file
    from .workers import STARTUP_FAILURE

    env_file = None  # until it is chosen (a file named but missing is an error too)
    try:
        env_file = chosen_env_file(None, os.environ) or None
        return create_app(logged_settings(env_file))
    except ConfigurationError as exc:
        line = f"error: {exc}"
        if start_up_log_format(env_file) == "json":  # the settings' own, even when they fail
            line = json_error_line(line)
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(STARTUP_FAILURE) from None


def run_server(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace_period: float | None = None,
    log_level: str = "info",
    sockets: list[Any] | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve ``app`` (from :func:`create_app`) with uvicorn, draining open turns on SIGTERM.

    ``sockets``: already listening sockets to serve on (as ``serve --workers`` does).
    ``grace_period``: a finite number of seconds >= 0 (else ``ConfigurationError``).

    The first SIGTERM or SIGINT starts the drain (new webhooks and authorize calls: 503
    JSON, ``/ready``: 503) while open turns and authorize calls finish; once none is left, or
    after ``grace_period`` seconds (default ``settings.shutdown_grace_period``), uvicorn
    shuts down and the process exits with status 0. Turns still open then are ended properly
    (:meth:`Lifecycle.abort`: ``response.error`` + ``response.end``, or 503 JSON for a turn
    not yet streaming), given up to ``ABORT_WAIT`` seconds. A second signal ends them so at
    once. uvicorn's ``limit_max_requests`` (in ``uvicorn_options``, plus up to
    ``limit_max_requests_jitter``) starts the drain as a first SIGTERM does. An app drained
    before serves as usual when served again.
    """
    import random
    import signal
    import time

    import uvicorn

    check_seconds("grace_period", grace_period, zero=True, none=True)
    found = getattr(getattr(app, "state", None), "lifecycle", None)
    if not isinstance(found, Lifecycle):
        raise ConfigurationError(
            "run_server serves an app from create_app (it drains that app's turns on "
            f"SIGTERM), got {type(app).__name__}; serve any other ASGI app with uvicorn"
        )
    lifecycle: Lifecycle = found
    lifecycle.draining = lifecycle.aborted = False  # served again after an earlier drain
    grace = app.state.settings.shutdown_grace_period if grace_period is None else grace_period
    shown = int(grace) if float(grace).is_integer() else grace  # 30 s, and 0.25 s, not 0 s

    class DrainingServer(uvicorn.Server):
        drain_deadline: float | None = None
        abort_deadline: float | None = None

        def drain(self, reason: str) -> None:
            lifecycle.begin_drain()
            self.drain_deadline = time.monotonic() + grace
            logger.info(
                "%s: draining %d open webhook(s) for up to %s s", reason, lifecycle.active, shown
            )

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_deadline is None and not self.should_exit:
                # First signal: drain (not recorded for re-raising: a drained exit is clean).
                self.drain(f"received {signal.Signals(sig).name}")
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            requests = self.server_state.total_requests
            if limit and requests >= limit and self.drain_deadline is None and not self.should_exit:
                self.drain(f"limit_max_requests ({limit}) reached")
            deadline = self.drain_deadline
            if self.should_exit and lifecycle.active and not lifecycle.aborted:
                lifecycle.abort()  # a second signal: end the turns now, not cut by uvicorn
            if deadline is not None and not self.should_exit:
                if lifecycle.active == 0:
                    logger.info("drained: no open webhooks left, shutting down")
                    self.should_exit = True
                elif self.abort_deadline is not None:
                    if time.monotonic() >= self.abort_deadline:
                        logger.warning(
                            "%d webhook(s) still open after being ended; shutting down",
                            lifecycle.active,
                        )
                        self.should_exit = True
                elif time.monotonic() >= deadline:
                    logger.warning(
                        "grace period over with %d open webhook(s); ending them",
                        lifecycle.active,
                    )
                    lifecycle.abort()
                    self.abort_deadline = time.monotonic() + ABORT_WAIT
            return await super().on_tick(counter)

    # Counted here, not by uvicorn, which would stop without draining the open turns.
    limit = uvicorn_options.pop("limit_max_requests", None)
    if limit is not None:
        check_positive_int(limit, "limit_max_requests")
        jitter = uvicorn_options.pop("limit_max_requests_jitter", 0)
        if jitter != 0:
            check_positive_int(jitter, "limit_max_requests_jitter")
            limit += random.randint(0, jitter)
    uvicorn_options.setdefault("timeout_graceful_shutdown", 5)
    uvicorn_options.setdefault("log_config", uvicorn_log_config(app.state.settings.log_format))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **uvicorn_options)
    DrainingServer(config).run(sockets=sockets)
