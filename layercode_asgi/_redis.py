"""The one way this package connects to Redis: a client with a bounded connection pool.

Used by the Redis conversation store and the Redis replay cache. ``cluster=True`` makes the
URL name one node of a Redis Cluster (``redis.asyncio.cluster.RedisCluster``, which finds the
others); otherwise the client talks to one server through a *blocking* pool: a burst waits
(up to ``pool_timeout``) for a free connection instead of failing with "too many
connections".
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio

from . import loops
from .errors import ConfigurationError, check_type, require_asyncio
from .redaction import mask_url, port_problem

__all__ = [
    "MAX_EXPIRE_SECONDS",
    "REDIS_CLIENT",
    "Tasks",
    "clients",
    "connect",
    "describe_client",
    "import_redis",
    "not_a_database",
    "ping_primaries",
    "pubsub_of",
    "redis_error_text",
    "write_check_keys",
]

#: The longest expiry this package asks Redis for (about 31 million years): Redis refuses
#: one beyond about 9.2e15 s (its milliseconds must fit in 64 bits), so longer is "forever"
#: said in a way Redis accepts.
MAX_EXPIRE_SECONDS = 10**15

T = TypeVar("T")

#: What cannot run on trio, for :func:`~layercode_asgi.errors.require_asyncio`.
REDIS_CLIENT = "Redis (REDIS_URL; redis-py's asyncio client)"


class Tasks:
    """A Redis client owner's background tasks; :meth:`cancel` ends the running loop's."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self) -> None:
        """Cancel the tasks of this event loop, waiting up to 2 s for each to end."""
        if not self._tasks:
            return  # none started: nor is there an asyncio loop to ask for (trio)
        loop = asyncio.get_running_loop()
        for task in list(self._tasks):
            if not task.done() and task.get_loop() is loop:
                task.cancel()
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(2.0),
                    suppress(asyncio.CancelledError),
                ):
                    await task


def import_redis(what: str) -> Any:
    """``redis.asyncio``, or a :class:`ConfigurationError` naming the extra to install."""
    try:
        import redis.asyncio as redis_asyncio
    except ImportError:
        raise ConfigurationError(
            f"{what} needs the redis package: pip install './layercode-asgi[redis]'"
        ) from None
    return redis_asyncio


def clients(
    url_or_client: Any, wrap: Callable[[Any], T], what: str, **options: Any
) -> loops.PerLoop[T]:
    """``wrap`` of a client per event loop: from a URL, a new one per loop (:func:`connect`
    with ``what`` and ``options``); a client given, only it (anything else, a synchronous
    ``redis.Redis`` included, is a ``TypeError``). On trio, a :class:`ConfigurationError`."""
    check = functools.partial(require_asyncio, REDIS_CLIENT)
    if not isinstance(url_or_client, str):
        import_redis(what)
        if not inspect.iscoroutinefunction(getattr(url_or_client, "execute_command", None)):
            raise TypeError(
                "url_or_client must be a Redis URL (str) or a redis.asyncio client, "
                f"got {type(url_or_client).__module__}.{type(url_or_client).__qualname__}"
            )
        return loops.PerLoop(wrap(url_or_client), None, check)

    def make() -> T:
        return wrap(connect(url_or_client, what=what, **options))

    return loops.PerLoop(make(), make, check)


async def ping_primaries(client: Any) -> None:
    """``PING`` one Redis, or every primary of a cluster."""
    primaries = getattr(client, "PRIMARIES", None)
    await (client.ping() if primaries is None else client.ping(target_nodes=primaries))


def pubsub_of(client: Any, attempt: int) -> Any:
    """A pub/sub of ``client``; on a cluster, on its nodes in turn by ``attempt`` (a
    ``PUBLISH`` reaches every node), so that retries pass by a node that is down, even one
    whose replica has taken over (the client's map of the nodes may still name it)."""
    if getattr(client, "PRIMARIES", None) is None:
        return client.pubsub()
    nodes = client.get_nodes()
    return client.pubsub(node=nodes[attempt % len(nodes)])


def describe_client(client: Any) -> str:
    """Where a client given by the application connects (``host:port`` or ``unix://``)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def not_a_database(url: str) -> bool:
    """Whether the path of a ``redis://`` or ``rediss://`` URL is not a database number:
    redis-py takes it for database 0, and a password with an unencoded ``/`` puts part of
    itself there. Raises ``ValueError`` on a URL ``urlsplit`` refuses."""
    parts = urlsplit(url)
    database = parts.path.strip("/")
    return bool(database) and parts.scheme.lower() != "unix" and not database.isdecimal()


def connect(
    url: str,
    *,
    what: str,
    cluster: bool = False,
    max_connections: int = 100,
    socket_timeout: float = 2.0,
    socket_connect_timeout: float = 1.0,
    pool_timeout: float = 5.0,
) -> Any:
    """A ``redis.asyncio`` client for ``url`` (a cluster client when ``cluster``).

    One quick retry on connection errors recovers a pooled connection broken by a Redis
    restart; retrying timeouts (or more often) would only delay the failure report.
    """
    check_type("cluster", cluster, bool, "a bool")
    redis_asyncio = import_redis(what)
    from redis import exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"invalid Redis URL {mask_url(url)!r}: the scheme must be redis://, rediss:// or "
            "unix://"
        )
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            1,
            supported_errors=(exceptions.ConnectionError,),
        ),
    }
    try:
        if not_a_database(url):
            raise ConfigurationError(
                f"invalid Redis URL {mask_url(url)!r}: the database (its path) is not a "
                "number (percent-encode special characters in the password: / as %2F)"
            )
        if cluster:
            from redis.asyncio.cluster import RedisCluster
            from redis.connection import parse_url

            # What redis-py would refuse with a RedisClusterException (``parse_url`` has no
            # annotations: typed here rather than with an ignore that a typed release breaks).
            parse: Callable[[str], dict[str, Any]] = parse_url
            parsed = parse(url)
            problem = (
                f"selects database {parsed['db']}, but Redis Cluster has only database 0"
                if parsed.get("db")
                else "is a unix socket, which Redis Cluster does not support"
                if parsed.get("path")
                else "names no host (a node of the cluster)"
                if not parsed.get("host")
                else None
            )
            if problem:
                raise ConfigurationError(f"Redis URL {mask_url(url)!r} {problem}")
            return RedisCluster.from_url(url, **options)
        pool = redis_asyncio.BlockingConnectionPool.from_url(url, timeout=pool_timeout, **options)
        return redis_asyncio.Redis.from_pool(pool)  # aclose() closes the pool too
    except ConfigurationError:
        raise
    except ValueError:  # its message may quote part of the password: not shown
        hint = "percent-encode special characters in the password: / as %2F, # as %23, ? as %3F"
        raise ConfigurationError(
            f"invalid Redis URL {mask_url(url)!r} ({port_problem(url) or hint})"
        ) from None


#: Said of a Redis that answers MOVED: a client made without ``cluster`` reaches it.
CLUSTER_HINT = "a node of a Redis Cluster: set LAYERCODE_REDIS_CLUSTER=true"


async def write_check_keys(client: Any, key: str) -> list[str]:
    """The keys a write check writes: ``key`` on one Redis; on a cluster, one key per
    primary (``key{<n>}``, found by a bounded search), so that a primary refusing writes is
    found (a ``key`` with a hash tag of its own maps to one node: that one). A client made
    without ``cluster`` that reaches a cluster of several primaries gets a
    ``RedisClusterException`` saying so."""
    if getattr(client, "PRIMARIES", None) is None:
        from redis.exceptions import RedisClusterException, ResponseError

        try:  # CLUSTER INFO is not in @dangerous: an ACL user for the store may run it
            info = await client.execute_command("CLUSTER INFO")
        except ResponseError:  # "cluster support disabled": one Redis, as expected
            return [key]
        if isinstance(info, dict) and str(info.get("cluster_size", "1")) not in ("0", "1"):
            raise RedisClusterException(f"this Redis is {CLUSTER_HINT}")
        return [key]
    wanted = {node.name for node in client.get_primaries()}
    found: dict[str, str] = {}
    for n in range(64 * len(wanted)):
        candidate = f"{key}{{{n}}}"
        name = client.get_node_from_key(candidate).name
        if name in wanted:
            found.setdefault(name, candidate)
            if len(found) == len(wanted):
                break
    return list(found.values())


def redis_error_text(exc: BaseException) -> str:
    """An error of redis-py for a log line: a MOVED or ASK reply (only a client made without
    ``cluster`` sees one) says which setting is missing, not just a slot and an address;
    redis-py's "TTL exhausted" (redirected or told TRYAGAIN 16 times: 0.1 to 0.3 s measured)
    says what Redis meant. A script's error names where it failed, ``@user_script:24``: without
    its ``@``, which after the store's URL in a line would hide all before it as the URL's
    password."""
    from redis.exceptions import AskError, ClusterError, TryAgainError  # MovedError is an Ask

    if isinstance(exc, AskError):
        return f"{exc} (a MOVED reply: the Redis is {CLUSTER_HINT})"
    if type(exc) is ClusterError or isinstance(exc, TryAgainError):
        return (
            f"{exc} (the Redis Cluster is moving a slot of these keys to another node, "
            "or its slots keep changing: this passes once the move ends)"
        )
    return str(exc).replace("@user_script:", "user_script:")
