"""The worker: every long-lived task of a manager (the flush loop, periodic cleanup, the backlog poll, event
delivery, and the degraded probe the breaker starts) is started here and runs under one supervisor (restarted
if it dies, ``down()`` meanwhile). ``stop`` ends them, drains what this process's flusher owns, delivers the
events left, and always closes the clients (``try/finally``), whatever failed on the way."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from . import metrics
from ._backpressure import Backpressure
from ._failures import BACKGROUND, RETRYABLE, Failures, describe
from ._flusher import Flusher
from ._supervisor import Supervisor, Work
from ._tiers import Tiers
from .config import Settings
from .events import EventHub

log = logging.getLogger(__name__)
_TERMINATE_BOUND_SECS = 0.5  # the longest terminate() waits for any one step
_RELEASE_FAILURES: Failures = (TimeoutError, *RETRYABLE)


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = asyncio.Event()
        self.supervisor = Supervisor(self.stop_event)

    def start(self, name: str, work: Work) -> None:
        """Run ``work`` supervised as ``name`` (unless running already)."""
        self.supervisor.start(name, work)

    def running(self, name: str) -> bool:
        return self.supervisor.running(name)

    def down(self) -> dict[str, str]:
        """The tasks that died and wait to be restarted, with the error each died of."""
        return self.supervisor.down()

    def run(self, tiers: Tiers, events: EventHub, backpressure: Backpressure,
            cleanup: Callable[[], Coroutine[Any, Any, int]]) -> None:
        """Start every task of a manager whose tiers are open."""
        settings = self.settings
        if tiers.flusher is not None:
            tiers.flusher.on_written = events.row_written
            if settings.run_flusher:
                self.start("flusher", functools.partial(tiers.flusher.run, self.stop_event))
        self.start("cleanup", functools.partial(self._every, settings.cleanup_interval_secs, cleanup))
        if backpressure.enabled:
            self.start("backlog", functools.partial(backpressure.watch, tiers.hot, self.stop_event))
        self.start("events", events.deliver)

    async def _every(self, interval: float, work: Callable[[], Coroutine[Any, Any, int]]) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), interval)
                return
            try:
                await work()
            except BACKGROUND as exc:
                log.warning("periodic cleanup failed, will try again next interval: %s", exc)

    async def stop(self, tiers: Tiers | None, events: EventHub) -> None:
        """End every task, drain this process's flusher (with ``run_flusher``; without, dirty sessions stay in
        Redis for a flusher), deliver the events left, all within ``drain_timeout_secs`` together; then close
        the clients (a server that hangs costs one socket timeout more)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_secs

        def left() -> float:
            return max(0.0, deadline - loop.time())

        try:
            events.stop_delivery()
            await self.supervisor.stop(left())
            if tiers is not None and tiers.flusher is not None and self.settings.run_flusher:
                await self._drain_and_release(tiers.flusher, left())
            await events.drain(left())
        finally:
            if tiers is not None:
                await tiers.close()

    async def terminate(self, tiers: Tiers | None, events: EventHub) -> None:
        """End now: cancel every task, drop the events not delivered, give the flusher's leases back (within a
        short bound: the other flushers take over at once), close the clients. Nothing is drained: dirty
        sessions stay in Redis for the next flusher."""
        bound = min(self.settings.socket_timeout_secs, _TERMINATE_BOUND_SECS)
        try:
            if tiers is not None and tiers.store is not None:
                tiers.store.terminate()  # first: a task in a Postgres call then ends at once
            await self.supervisor.cancel(bound)
            events.cancel()
            if tiers is not None and tiers.flusher is not None:
                try:
                    async with asyncio.timeout(bound):
                        await tiers.flusher.release()
                except _RELEASE_FAILURES as exc:
                    log.warning("terminate: could not release the flusher leases (%s); they expire by themselves",
                                exc)
        finally:
            if tiers is not None:
                await tiers.terminate(bound)

    async def _drain_and_release(self, flusher: Flusher, timeout: float) -> None:
        bound = asyncio.timeout(timeout)  # a statement under way at the deadline ends there too
        try:
            async with bound:
                left = await flusher.drain(timeout)
        except RETRYABLE as exc:
            if bound.expired():
                still = await _dirty_left(flusher)
                log.warning("close: %s sessions still dirty at the drain timeout (%.1fs); they stay in Redis for "
                            "the next flusher", still, self.settings.drain_timeout_secs)
            else:
                metrics.FLUSH_ERRORS.labels(type(exc).__name__).inc()
                log.error("drain on close failed (%s); dirty sessions stay in Redis for the next flusher",
                          describe(exc))
        else:
            if left:
                log.warning("close: %d sessions still dirty after %.1fs; they stay in Redis for the next "
                            "flusher", left, timeout)
            else:
                log.info("close: drained, nothing left dirty")
        try:
            await flusher.release()  # the other flushers take our partitions now, not at lease expiry
        except RETRYABLE as exc:
            log.warning("close: could not release the flusher leases (%s); they expire by themselves", exc)


async def _dirty_left(flusher: Flusher) -> int | str:
    """How many sessions a drain cut short leaves dirty, for its log line ("?" if Redis does not say)."""
    try:
        return await flusher.hot.dirty_total()
    except RETRYABLE:
        return "?"
