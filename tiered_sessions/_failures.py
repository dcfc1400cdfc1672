"""The driver failures the tier tells apart, each family named once: which mean a server is out of reach (a
named error, degraded mode, a retry), which mean a row Postgres refuses (a dead letter), which a background
loop survives. Every ``except`` of the package takes its tuple from here."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.exceptions import ClusterError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import PostgresUnavailable, RedisUnavailable

Failures = tuple[type[BaseException], ...]

# Every failure of a Redis call: the cluster client also raises RedisClusterException, which is no RedisError.
REDIS_ERRORS: Failures = (RedisError, RedisClusterException)
# What a cluster raises in its failover window, beyond connection errors (redis_client.is_unreachable decides).
CLUSTER_ERRORS: Failures = (RedisClusterException, ClusterError, TryAgainError)
# Redis failures that may mean "unreachable" (redis_client.is_unreachable decides).
REDIS_CONNECTION_ERRORS: Failures = (RedisConnectionError, RedisTimeoutError, *CLUSTER_ERRORS)

# Worth retrying: the server or the network, not the statement.
POSTGRES_TRANSIENT: Failures = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,  # statement_timeout on a busy server
    # A pooled connection whose server just said "terminating" can be handed out before its socket closes; its
    # next statement then fails with "cannot switch to state" (MagicStack/asyncpg#784). The pool replaces it.
    asyncpg.InternalClientError,
)
# The server does not answer (yet): a start during an outage waits for it. Anything else it said (TLS refused,
# authentication, no such database) is a configuration to fix.
POSTGRES_DOWN: Failures = (
    ConnectionRefusedError,
    ConnectionResetError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)
# Connecting can also fail on the server's word (bad database, auth): reported as unreachable too.
POSTGRES_CONNECT: Failures = (*POSTGRES_TRANSIENT, asyncpg.PostgresError)
# Postgres refused the row itself (SQLSTATE classes 22 and 23): isolate it, don't retry it.
ROW_ERRORS: Failures = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
# Any other Postgres failure (servers down, a dropped table, missing rights): retried with backoff until fixed.
POSTGRES_ERRORS: Failures = (PostgresUnavailable, asyncpg.PostgresError, *POSTGRES_TRANSIENT)

# What the flusher, the journal fold and close() retry or report, and never die of.
RETRYABLE: Failures = (*REDIS_ERRORS, *POSTGRES_ERRORS)
# What a background loop (cleanup, the Redis probe) survives until its next round.
BACKGROUND: Failures = (RedisUnavailable, OSError, *RETRYABLE)


def describe(exc: BaseException) -> str:
    """An error for a log line: its class and the first line of its message. Postgres appends DETAIL (for a
    refused row: "Failing row contains (...)", the whole row) and HINT lines that can carry session contents;
    they stay out of logs (the dead-letter store keeps them)."""
    message = str(exc.args[0]) if isinstance(exc, asyncpg.PostgresError) and exc.args else str(exc)
    first = message.splitlines()[0] if message else ""
    code = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return f"{type(exc).__name__}: {first}" + (f" (SQLSTATE {code})" if code else "")
