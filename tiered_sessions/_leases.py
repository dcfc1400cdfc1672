"""Flusher leases: many flushers share the partitions through leases (``{prefix}:{pN}:lease``, ``SET NX PX``,
renewed each pass). Each flusher heartbeats into ``{prefix}:flushers`` and aims at its fair share of the
partitions (live flushers sorted by id; the first ``partitions % n`` take one more), releasing extras so
joiners get some. A flusher works only on partitions it holds, and its acks are fenced by the lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator

from . import _codec
from ._failures import RETRYABLE
from ._hot_tier import HotTier
from .config import Settings

log = logging.getLogger(__name__)


class LeaseHolder:
    def __init__(self, hot: HotTier, settings: Settings) -> None:
        self.hot = hot
        self.partitions = list(range(settings.partitions))
        self.lease_secs = settings.lease_secs
        self.lease_ms = max(1, int(settings.lease_secs * 1000))
        # The lease token: unique per holder, readable in Redis when debugging who owns what.
        self.flusher_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: set[int] = set()  # partitions whose lease this flusher holds (as of its last renewal)

    def fair_share(self, live: list[str]) -> int:
        """How many partitions this flusher should hold, given the live flusher ids."""
        members = sorted({*live, self.flusher_id})
        rank, count = members.index(self.flusher_id), len(members)
        return len(self.partitions) // count + (1 if rank < len(self.partitions) % count else 0)

    async def rebalance(self) -> None:
        """Heartbeat, renew the leases held, give back extras, take free partitions up to the fair share."""
        live = await self.hot.heartbeat(self.flusher_id, _codec.now_ms(), self.lease_ms, 3 * self.lease_ms)
        target = self.fair_share(live)
        await self.renew()
        if len(self.held) > target:
            extra = sorted(self.held)[target:]
            await self.hot.release_leases(extra, self.flusher_id)
            self.held.difference_update(extra)
            return
        # Free partitions, from a random start so that flushers don't all race for the same ones.
        free = [p for p in self.partitions if p not in self.held]
        start = random.randrange(len(free)) if free else 0
        free = free[start:] + free[:start]
        while free and len(self.held) < target:
            want, free = free[:target - len(self.held)], free[target - len(self.held):]
            taken = await self.hot.take_leases(want, self.flusher_id, self.lease_ms)
            self.held.update(p for p, ok in zip(want, taken, strict=True) if ok)

    async def renew(self) -> None:
        """Renew every lease held; drop the ones another flusher took meanwhile (ours ran out)."""
        if not self.held:
            return
        held = sorted(self.held)
        kept = await self.hot.take_leases(held, self.flusher_id, self.lease_ms)
        lost = [p for p, ok in zip(held, kept, strict=True) if not ok]
        if lost:
            log.warning("flusher %s lost the lease of partitions %s to another flusher", self.flusher_id, lost)
        self.held = {p for p, ok in zip(held, kept, strict=True) if ok}

    async def release(self) -> None:
        """Give every lease back and leave the heartbeat set, so the other flushers take over at once."""
        held, self.held = sorted(self.held), set()
        if held:
            await self.hot.release_leases(held, self.flusher_id)
        await self.hot.leave(self.flusher_id)

    @contextlib.asynccontextmanager
    async def _renewing(self) -> AsyncIterator[None]:
        """Renew the leases every third of a lease while the block runs: a pass slower than a lease (a slow
        Postgres) keeps its partitions, and its acks count. A renewal that fails is retried at the next tick;
        the block's own Redis calls fail the same way and are retried with the pass."""
        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.lease_secs / 3)
                try:
                    await self.renew()
                except RETRYABLE as exc:
                    log.warning("lease renewal during a pass failed: %s", exc)

        task = asyncio.create_task(heartbeat(), name="ts-lease-heartbeat")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])  # its end, without swallowing a cancellation of our own
