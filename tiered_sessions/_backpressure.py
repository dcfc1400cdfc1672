"""Backpressure: writers wait while the tier's backlog (dirty sessions, all partitions) is past its high
watermark, until it falls to the low one, and fail with ``BackpressureError`` after
``backpressure_timeout_secs``. One poll per process reads the backlog; the hot path checks a flag."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import metrics
from ._failures import REDIS_ERRORS
from ._hot_tier import HotTier
from .config import Settings
from .errors import BackpressureError

log = logging.getLogger(__name__)


class Backpressure:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.open = asyncio.Event()  # cleared while the backlog is past its high watermark
        self.open.set()
        self.backlog = 0  # dirty sessions in the whole tier, as last read

    @property
    def enabled(self) -> bool:
        return self.settings.enable_persistence and self.settings.backlog_high_watermark is not None

    async def admit(self) -> None:
        """Wait until writers may proceed (call only when ``open`` is clear: the hot path checks it inline)."""
        try:
            await asyncio.wait_for(self.open.wait(), self.settings.backpressure_timeout_secs)
        except TimeoutError:
            metrics.BACKPRESSURE_REJECTIONS.inc()
            raise BackpressureError(
                f"{self.backlog} sessions wait to be flushed (high watermark "
                f"{self.settings.backlog_high_watermark}) and the backlog did not fall to "
                f"{self.settings.low_watermark} within {self.settings.backpressure_timeout_secs}s; "
                "is the flusher running and PostgreSQL reachable?"
            ) from None

    async def watch(self, hot: HotTier, stop: asyncio.Event) -> None:
        """Poll the backlog every ``backlog_poll_secs`` until ``stop``; a failed read keeps the last one."""
        high, low = self.settings.backlog_high_watermark, self.settings.low_watermark
        assert high is not None and low is not None
        failing = False
        while not stop.is_set():
            try:
                self.backlog = await hot.dirty_total()
            except REDIS_ERRORS as exc:
                metrics.BACKEND_ERRORS.labels("redis", "backlog").inc()
                if not failing:  # once per outage, not once per poll
                    log.warning("cannot read the backlog (keeping the last reading, %d): %s", self.backlog, exc)
                failing = True
            else:
                if failing:
                    log.info("backlog readable again: %d", self.backlog)
                failing = False
                if self.backlog >= high and self.open.is_set():
                    self.open.clear()
                    log.warning("backlog %d is past the high watermark %d: writers wait (up to %.1fs) until it "
                                "falls to %d", self.backlog, high, self.settings.backpressure_timeout_secs, low)
                elif self.backlog <= low and not self.open.is_set():
                    self.open.set()
                    log.info("backlog %d is down to the low watermark %d: writers proceed", self.backlog, low)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.backlog_poll_secs)
