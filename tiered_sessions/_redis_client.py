"""The Redis client: one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
(``redis+cluster://host:port``, ``rediss+cluster://``, or ``cluster=True``) through redis-py's ``RedisCluster``,
which follows MOVED/ASK and refreshes its slot map after a failover."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Settings, redact_message, redact_url
from .errors import ConfigurationError, RedisFull, RedisUnavailable

RedisClient: TypeAlias = Redis | RedisCluster


def is_unreachable(exc: BaseException) -> bool:
    """Redis cannot serve the call now: a lost connection or timeout, or a cluster in its failover window
    (CLUSTERDOWN, TRYAGAIN, a slot without a master, no node reachable to map the slots). Programming errors
    the cluster client reports (a cross-slot script, say) are not."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ClusterError | TryAgainError
                  | SlotNotCoveredError):
        return True
    return type(exc) is RedisClusterException and isinstance(exc.__cause__, RedisConnectionError | RedisTimeoutError)

def is_full(exc: BaseException) -> bool:
    """Redis refused a write for memory: at ``maxmemory`` with ``noeviction`` (as a plain command's OOM reply,
    or inside a script's error)."""
    return isinstance(exc, ResponseError) and "command not allowed when used memory > 'maxmemory'" in str(exc)


def full(url: str | None, operation: str) -> RedisFull:
    """The named error for a write Redis refused for memory."""
    return RedisFull(f"Redis at {redact_url(url)} refused {operation}: it is at its maxmemory and evicts nothing "
                     "(noeviction); nothing of the call was written. Flushing gives sessions their TTL back; "
                     "see the TieredSessionsRedisMemoryHigh runbook")


def closed_under_the_call(exc: BaseException) -> bool:
    """redis-py's cluster client re-maps the cluster (a pipeline's retry, CLUSTERDOWN, every few MOVED) by closing
    every node connection, in use or not; a concurrent call then fails on the dead transport with one of these
    instead of a ConnectionError (redis-py#4287, seen under load in a failover). The call may or may not have
    been applied, as with any lost connection."""
    return isinstance(exc, AttributeError | TypeError) and "'NoneType' object" in str(exc)


async def executed(pipeline: Awaitable[list[Any]]) -> list[Any]:
    """Await a redis-py pipeline's ``execute()``: a connection the cluster client closed under it (see
    ``closed_under_the_call``) raises the ConnectionError it is, so every caller's error handling sees one."""
    try:
        return list(await pipeline)
    except (AttributeError, TypeError) as exc:
        if not closed_under_the_call(exc):
            raise
        raise RedisConnectionError(f"the Redis Cluster client closed this call's connection: {exc}") from exc


def unavailable(url: str | None, operation: str, exc: BaseException) -> RedisUnavailable:
    """The named error for a Redis call that failed on the connection: no password in it."""
    return RedisUnavailable(f"Redis at {redact_url(url)} failed during {operation}: {redact_message(str(exc), url)}")


_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster(settings: Settings) -> bool:
    url = settings.redis_url or ""
    return settings.cluster or url.split("://", 1)[0].lower() in _CLUSTER_SCHEMES


def plain_url(url: str) -> str:
    """The URL redis-py understands: ``redis+cluster://`` becomes ``redis://``."""
    scheme, sep, rest = url.partition("://")
    return _CLUSTER_SCHEMES.get(scheme.lower(), scheme) + sep + rest


def make_client(settings: Settings) -> RedisClient:
    assert settings.redis_url
    timeout = settings.socket_timeout_secs
    if not is_cluster(settings):
        pool = BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections, timeout=timeout,
            socket_timeout=timeout, socket_connect_timeout=timeout,
        )
        return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections too
    url = plain_url(settings.redis_url)
    if url.startswith("unix://"):
        raise ConfigurationError("a Redis Cluster is reached over TCP: use redis+cluster://host:port")
    # No per-node connection cap here: the cluster client raises MaxConnectionsError (a ConnectionError, which
    # would trip degraded mode) instead of waiting for a free connection as the single-server pool does.
    return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
