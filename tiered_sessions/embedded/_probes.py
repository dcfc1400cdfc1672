"""Readiness probes, through the drivers the project already uses: redis-py and asyncpg.

Rules: a probe returns once the server serves requests, and raises ``ProbeError`` while it does not (yet),
whatever the driver raised; the caller polls until its deadline, so a probe has short timeouts and never
retries on its own. A probe's error names the problem, never a credential: the password is masked out of the
text, and the driver's exception is not chained (its arguments may hold the connection's settings). The
asyncpg probe runs its own event loop in a short-lived thread, so it works the same from plain code and from
inside a running event loop (``tiered-sessions demo`` starts the servers from a coroutine).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_REDIS_TIMEOUT = 0.5
_POSTGRES_TIMEOUT = 1.0


class ProbeError(Exception):
    """The server does not serve requests yet, or another process answers on its port."""


def _problem(exc: BaseException, secret: str | None) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.replace(secret, "***") if secret else text


def redis_ready(host: str, port: int, *, password: str | None, pid: int) -> None:
    """PING answered by the redis-server with process id ``pid`` (not someone who grabbed the port first)."""
    try:
        with redis.Redis(host=host, port=port, password=password, socket_timeout=_REDIS_TIMEOUT,
                         socket_connect_timeout=_REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0),
                         single_connection_client=True) as client:
            client.ping()
            info = client.info("server")
    except redis.RedisError as exc:  # refused, timed out, LOADING, NOAUTH/WRONGPASS, ...
        raise ProbeError(_problem(exc, password)) from None
    if info.get("process_id") != pid:
        raise ProbeError(f"port {port} is answered by another Redis process")


def postgres_ready(host: str, port: int) -> None:
    """SELECT 1 as user postgres (trust authentication) answers 1."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiered-sessions-pg-probe") as thread:
        thread.submit(asyncio.run, _select_one(host, port)).result()


async def _select_one(host: str, port: int) -> None:
    try:
        connection = await asyncpg.connect(host=host, port=port, user="postgres", database="postgres",
                                           ssl=False, timeout=_POSTGRES_TIMEOUT)
        try:
            value = await connection.fetchval("SELECT 1", timeout=_POSTGRES_TIMEOUT)
        finally:
            await connection.close(timeout=_POSTGRES_TIMEOUT)
    # OSError: refused or timed out; PostgresError: e.g. 57P03 "the database system is starting up"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        raise ProbeError(_problem(exc, None)) from None
    if value != 1:
        raise ProbeError(f"SELECT 1 returned {value!r}")
