"""How the flusher retries: a failed pass retries as a whole with capped exponential backoff and jitter
(``retrying``), logged once per outage (``Outage``); a partition whose Redis calls fail while others succeed
waits a backoff of its own (``PartitionBackoff``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from . import metrics
from ._failures import POSTGRES_ERRORS, RETRYABLE, describe

log = logging.getLogger(__name__)

# The longest pause between attempts: flushing resumes within about this long after a server is back.
MAX_BACKOFF_SECS = 2.0


def retrying(stop: asyncio.Event | None, deadline: float | None, outage: Outage,
             between: Callable[[], Awaitable[object]]) -> AsyncRetrying:
    """Retry a flush attempt on RETRYABLE errors with capped exponential backoff and jitter, until ``stop`` is
    set or ``deadline`` (monotonic) passes; ``between`` runs before each pause (it may fail)."""

    def should_stop(state: RetryCallState) -> bool:
        return (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() >= deadline)

    async def sleep(seconds: float) -> None:
        # While Postgres is down the lag grows: keep the gauges moving so the alerts can fire.
        with contextlib.suppress(*RETRYABLE):
            await between()
        # Interruptible backoff: close() must not wait out a sleep.
        if stop is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            return

    return AsyncRetrying(retry=retry_if_exception_type(RETRYABLE), stop=should_stop,
                         wait=wait_exponential(multiplier=0.1, max=MAX_BACKOFF_SECS) + wait_random(0, 0.25),
                         sleep=sleep, before_sleep=outage.failed, reraise=True)


class PartitionBackoff:
    """A partition whose Redis calls fail while others succeed (a key of its own at fault, its cluster master
    down) waits a backoff of its own while the others keep flushing; logged when its streak starts and ends,
    each failure counted. A pass where every partition fails, or Postgres fails, is a server's failure: the
    pass retries as a whole."""

    def __init__(self) -> None:
        self.failures: dict[int, int] = {}
        self.until: dict[int, float] = {}

    def due(self, partition: int) -> bool:
        return self.until.get(partition, 0.0) <= time.monotonic()

    def record(self, failed: dict[int, BaseException], flushed: list[int]) -> None:
        for partition, exc in failed.items():
            count = self.failures[partition] = self.failures.get(partition, 0) + 1
            delay = min(MAX_BACKOFF_SECS, 0.1 * 2 ** (count - 1))
            self.until[partition] = time.monotonic() + delay
            metrics.FLUSH_ERRORS.labels(type(exc).__name__).inc()
            if count == 1:
                log.warning("partition %d failed (%s); the other partitions go on, it retries every %.1fs at most",
                            partition, describe(exc), MAX_BACKOFF_SECS)
        for partition in flushed:
            count = self.failures.pop(partition, 0)
            self.until.pop(partition, None)
            if count:
                log.warning("partition %d flushes again after %d failed attempts", partition, count)


class Outage:
    """A streak of failed flush attempts: logged when it starts, every tenth attempt, and once when it ends
    (metrics count every attempt)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.attempts = 0
        self.backend = ""

    def failed(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        kind = type(error).__name__ if error else "unknown"
        metrics.FLUSH_ERRORS.labels(kind).inc()
        metrics.FLUSH_RETRIES.inc()
        backend = "PostgreSQL" if isinstance(error, POSTGRES_ERRORS) else "Redis"
        delay = state.next_action.sleep if state.next_action else 0.0
        self.attempts += 1
        if self.since is None:
            self.since, self.backend = time.monotonic(), backend
            log.warning("flush failed (%s: %s), retrying in %.2fs, then at least every %.0fs; dirty sessions "
                        "stay in Redis", backend, describe(error) if error else "unknown", delay, MAX_BACKOFF_SECS)
        elif self.attempts % 10 == 0:
            log.warning("flush still failing after %d attempts over %.0fs (%s: %s)", self.attempts,
                        time.monotonic() - self.since, backend, describe(error) if error else "unknown")
        else:
            log.debug("flush failed again (%s: %s), attempt %d", backend, describe(error) if error else "unknown",
                      self.attempts)

    def ended(self) -> None:
        if self.since is None:
            return
        log.warning("%s is back: flushing resumed after %.1fs and %d failed attempts", self.backend,
                    time.monotonic() - self.since, self.attempts)
        self.since, self.attempts = None, 0
