"""Driver failures become named errors at the manager's edge: a lost Redis connection ``RedisUnavailable``
(and degraded mode from then on), a write a full Redis refused ``RedisFull``, a lost Postgres connection
``PostgresUnavailable``, each logged once and counted with the URL's password removed; any other error passes
unchanged. Every call's latency is sampled, one call in ``metrics.OPERATION_SAMPLE_EVERY``."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar

from . import metrics
from ._degraded import DegradedMode
from ._failures import POSTGRES_TRANSIENT, REDIS_CONNECTION_ERRORS
from ._redis_client import closed_under_the_call, full, is_full, is_unreachable, unavailable
from .config import Settings, redact_message, redact_url
from .errors import BackendUnavailable, PostgresUnavailable

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class Edge(Protocol):
    """What names the errors: the settings (for the URLs) and the breaker a lost Redis trips."""

    settings: Settings
    degraded: DegradedMode | None


def named_errors(operation: str) -> Callable[[Callable[P, Coroutine[Any, Any, T]]],
                                              Callable[P, Coroutine[Any, Any, T]]]:
    """Decorate a manager method: its driver errors named (see ``raise_named``), its latency sampled."""

    def decorate(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        timer = metrics.OperationTimer(operation)

        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            timed = timer.due()
            started = time.perf_counter() if timed else 0.0
            try:
                return await method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - always raised again, named or as it was
                raise_named(args[0], operation, exc)  # type: ignore[arg-type]
            finally:
                if timed:
                    timer.observe(time.perf_counter() - started)

        return wrapper

    return decorate


def raise_named(edge: Edge, operation: str, exc: Exception) -> NoReturn:
    """Raise the named error for a driver's connection failure (logged and counted; a Redis one trips
    degraded mode), or ``exc`` itself for any other error."""
    if isinstance(exc, BackendUnavailable):
        raise exc  # already named and redacted (it is an OSError too: keep it out of the clauses below)
    if (isinstance(exc, REDIS_CONNECTION_ERRORS) and is_unreachable(exc)) or closed_under_the_call(exc):
        metrics.BACKEND_ERRORS.labels("redis", operation).inc()
        if edge.degraded is not None:
            edge.degraded.trip(exc)  # calls from now on write through to Postgres
        url = edge.settings.redis_url
        log.error("%s: Redis at %s failed: %s", operation, redact_url(url), redact_message(str(exc), url))
        raise unavailable(url, operation, exc) from exc
    if is_full(exc):  # Redis answers: no degraded mode, and the write was refused whole
        metrics.BACKEND_ERRORS.labels("redis", operation).inc()
        log.error("%s: Redis at %s is full (maxmemory, noeviction): write refused", operation,
                  redact_url(edge.settings.redis_url))
        raise full(edge.settings.redis_url, operation) from exc
    if isinstance(exc, POSTGRES_TRANSIENT):
        metrics.BACKEND_ERRORS.labels("postgres", operation).inc()
        url = edge.settings.database_url
        log.error("%s: PostgreSQL at %s failed: %s", operation, redact_url(url), redact_message(str(exc), url))
        raise PostgresUnavailable(f"PostgreSQL at {redact_url(url)} failed during {operation}: "
                                  f"{redact_message(str(exc), url)}") from exc
    raise exc
