"""Degraded mode: when Redis stops answering, serve from Postgres and come back to Redis safely.

A circuit breaker opens on the first Redis connection error. While it is open, calls are served by
``_backends.postgres``: every write goes through to Postgres and is journaled in the same statement
(``<table>_journal``); reads come from Postgres. A probe pings
Redis every ``redis_probe_interval_secs``; when it answers, the journal is replayed onto Redis (see
``journal``) and only then does the breaker close. Replay applies an entry only to a copy that does not
already include it (the hash field ``jv`` holds the newest Postgres version folded in), so:

* Redis back **warm** (its unflushed writes intact): they and the journaled writes both count;
* Redis back **cold**: Postgres already has every journaled write; nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from . import metrics
from ._failures import BACKGROUND
from ._hot_tier import HotTier
from ._journal import Journal
from ._supervisor import Supervisor
from .config import Settings

log = logging.getLogger(__name__)


class DegradedMode:
    def __init__(self, hot: HotTier, journal: Journal, settings: Settings, worker: Supervisor) -> None:
        self.hot = hot
        self.journal = journal
        self.settings = settings
        self.worker = worker  # runs the probe: restarted if it dies, whatever it met
        self.stop = worker.stop_event
        self.active = False
        self.since: float | None = None
        self.in_flight = 0  # write-through calls under way: their journal entries may land after a replay
        self.idle = asyncio.Event()  # set while in_flight is 0
        self.idle.set()
        self.pausing = False  # switching back to Redis: new calls wait for `resumed`
        self.resumed = asyncio.Event()
        self.resumed.set()

    # -- the breaker --------------------------------------------------------------------------------------
    def trip(self, error: BaseException) -> None:
        """Open the breaker (idempotent): later calls write through to Postgres until Redis is back."""
        if self.stop.is_set():
            return
        if not self.active:
            self.active = True
            self.since = time.time()
            metrics.set_mode("degraded")
            log.error("Redis unreachable (%s): degraded mode, writing through to PostgreSQL; probing Redis "
                      "every %.1fs", error, self.settings.redis_probe_interval_secs)
        self.worker.start("redis-probe", self._probe_until_back)  # one at a time; a running one sees the trip

    async def _probe_until_back(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.settings.redis_probe_interval_secs)
            if self.stop.is_set():
                return
            try:
                # Every partition's slot must answer: on a cluster, PING reaches one node, which says nothing
                # of the master that died.
                await self.hot.dirty_total()
                await self.hot.drop_idle_connections()
            except BACKGROUND as exc:
                metrics.BACKEND_ERRORS.labels("redis", "probe").inc()
                log.debug("Redis still unavailable: %s", exc)
                continue
            try:
                replayed = await self.journal.replay(wait=True) or 0
            except BACKGROUND as exc:
                metrics.BACKEND_ERRORS.labels("redis", "replay").inc()
                log.warning("Redis answers but the journal replay failed (%s); staying in degraded mode, "
                            "trying again", exc)
                continue
            # Switch back in two phases: new calls wait while the calls already writing through finish and
            # the rest of the journal is replayed; only then do calls resume on Redis. (A write-through merge
            # replayed after a newer write to Redis would put the older value back.)
            self.pausing = True
            self.resumed.clear()
            try:
                with contextlib.suppress(TimeoutError):  # bounded: a Postgres call is bounded by its timeout
                    await asyncio.wait_for(self.idle.wait(), self.settings.socket_timeout_secs * 2)
                try:
                    replayed += await self.journal.replay(wait=True) or 0
                except BACKGROUND as exc:
                    metrics.BACKEND_ERRORS.labels("redis", "replay").inc()
                    log.warning("journal replay failed while switching back (%s); staying in degraded mode", exc)
                    continue
                self.active = False
                metrics.set_mode("normal")
            finally:
                self.pausing = False
                self.resumed.set()
            if self.active:  # tripped again while switching back: keep probing
                continue
            log.warning("Redis is back after %.1fs: replayed %d journaled writes, normal mode",
                        time.time() - (self.since or time.time()), replayed)
            return

    async def still_active(self) -> bool:
        """For a caller that saw ``active``: wait out a switch back to Redis, then say if still degraded."""
        if self.pausing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.resumed.wait(), self.settings.socket_timeout_secs * 4)
        return self.active

    # -- write-through calls under way ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Mark a write-through call as under way (see ``in_flight``)."""
        self.in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def pending(self) -> int:
        return await self.journal.pending()
