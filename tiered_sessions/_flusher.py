"""The write-behind loop: claim the oldest dirty sessions, write them in one version-guarded statement per
batch, then ack (clear the dirty mark only where the version is unchanged). A crash anywhere leaves the
sessions dirty in Redis for the next pass; a replay is harmless thanks to the version guard.

Many flushers share the partitions through leases (``_leases``): the loop works only on partitions it holds,
and the ack is fenced: it clears nothing unless the lease is still ours. Failures retry (``_flush_retry``).
An on-demand ``drain()`` (``flush()``, ``close()``) works on every partition; see ``drain``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from . import _codec, metrics
from ._dead_letters import DeadLetters
from ._failures import REDIS_ERRORS, RETRYABLE, ROW_ERRORS, describe
from ._flush_retry import Outage, PartitionBackoff, retrying
from ._hot_tier import DirtyEntry, HotTier
from ._journal import Journal
from ._leases import LeaseHolder
from .cold_tier import PostgresSessionStore, Refusal
from .config import Settings

log = logging.getLogger(__name__)




@dataclasses.dataclass(slots=True)
class PassResult:
    claimed: int = 0   # dirty entries read
    written: int = 0   # rows sent to Postgres
    acked: int = 0     # dirty marks cleared
    dead: int = 0      # rows Postgres rejected, now in the dead-letter store
    full: bool = False  # some partition had more than one batch waiting


class NotDurable(NamedTuple):
    """Claimed ids a pass left dirty, not durable."""

    rewrite: set[str]  # by the next pass, whole
    after_journal: set[str]  # once the journal replay has folded pending entries into them


def _by_partition(entries: list[DirtyEntry], kept: set[str]) -> dict[int, list[tuple[str, int, bool]]]:
    """The (session id, version, kept) entries to ack, per partition (version 0: the hash was gone; kept:
    Postgres now holds that version whole)."""
    acks: dict[int, list[tuple[str, int, bool]]] = {}
    for entry in entries:
        acks.setdefault(entry.partition, []).append((entry.session_id, entry.version, entry.session_id in kept))
    return acks


class Flusher(LeaseHolder):
    def __init__(self, hot: HotTier, cold: PostgresSessionStore, settings: Settings) -> None:
        super().__init__(hot, settings)
        self.cold = cold
        self.batch_size = settings.flush_batch_size
        self.write_concurrency = max(1, min(4, settings.pg_pool_max_size))  # upserts in flight at once
        self.interval = settings.flush_interval_secs
        self.totals = PassResult()  # since start, for summaries (the metrics hold the same per process)
        self.dead_letters = DeadLetters(hot)
        self.journal = Journal(hot, cold)  # whoever wrote it: every pass folds back what it finds
        self.outage = Outage()
        self.backoff = PartitionBackoff()
        # Called for every tombstone or expired row written, before the ack (lifecycle events).
        self.on_written: Callable[[DirtyEntry], None] | None = None

    # -- passes -------------------------------------------------------------------------------------------
    async def flush_once(self, max_score_ms: int | None = None) -> PassResult:
        """One pass over the partitions this flusher holds: what was dirty at or before ``max_score_ms``
        (default: now). Acks are fenced by the lease; a partition whose lease is gone is dropped."""
        started = time.perf_counter()
        result = PassResult()
        tokens = dict.fromkeys(self.held, self.flusher_id)
        failed: dict[int, BaseException] = {}
        flushed: list[int] = []

        async def one_group(group: list[int]) -> None:
            # A partition at a time: one group's claim runs in Redis while another's batch is written, and a
            # partition claimed later in the pass takes along what was dirtied meanwhile
            for partition in group:
                if not self.backoff.due(partition):
                    continue
                read_ms = _codec.now_ms()
                try:
                    entries = await self.hot.claim(partition, self.batch_size, max_score_ms or read_ms, read_ms)
                    result.claimed += len(entries)
                    result.full = result.full or len(entries) >= self.batch_size
                    if entries:
                        await self._write_and_ack({partition: entries}, read_ms, tokens, result)
                except REDIS_ERRORS as exc:  # its key or its slot; a Postgres failure fails the pass
                    failed[partition] = exc
                else:
                    flushed.append(partition)

        async with self._renewing():
            await self._in_groups(sorted(self.held), one_group)
        if failed and not flushed:  # every partition tried failed: a server, not a partition (the pass retries)
            raise next(iter(failed.values()))
        self.backoff.record(failed, flushed)
        if result.claimed:
            metrics.FLUSH_DURATION.observe(time.perf_counter() - started)
        self._count(result)
        return result

    async def _in_groups(self, partitions: list[int], work: Callable[[list[int]], Awaitable[None]]) -> None:
        """Run ``work`` (claim, write, ack) on a few groups of the partitions side by side, so that one group's
        claim runs in Redis (which builds the rows) while another's upsert runs in Postgres and a third's
        rows go out from Python; one after the other, each of the three would wait for the others."""
        groups = [partitions[i::self.write_concurrency] for i in range(self.write_concurrency)]
        outcomes = await asyncio.gather(*(work(group) for group in groups if group), return_exceptions=True)
        for outcome in outcomes:  # every group has finished (a finished write is harmless): now report
            if isinstance(outcome, BaseException):
                raise outcome

    async def _write_and_ack(self, claims: dict[int, list[DirtyEntry]], read_ms: int, tokens: dict[int, str],
                             result: PassResult) -> NotDurable:
        """Write the claimed entries, a batch at a time, acking each batch under ``tokens``. A partition whose
        ack is refused (the lease is not ours: nothing cleared there) is dropped from ``held``. Returns the
        ids left dirty, not durable: to write whole by the next pass (rows the version guard refused, rebased
        past it; activity rows Postgres could not take), or after the journal replay (see ``_rewrite_whole``)."""
        replies: dict[int, int] = {}
        left = NotDurable(set(), set())
        pending = [entry for entries in claims.values() for entry in entries]
        for start in range(0, len(pending), self.batch_size):
            # In id order: two flushers writing the same rows (an on-demand flush beside the lease holder) then
            # lock them in the same order, and neither can wait on the other in a cycle (a deadlock).
            batch = sorted(pending[start:start + self.batch_size], key=_session_id)
            for entry in batch:
                if entry.kind == "poison":  # claim.lua moved it out of the way; keep it listed, with why
                    metrics.POISON_KEYS.inc()
                    await self.dead_letters.record_poison(entry)
            # An entry whose hash is gone (FLUSHALL, eviction, poison) has nothing to write: its mark is dropped.
            whole = [entry for entry in batch if entry.version and entry.kind != "activity"]
            activity = [entry for entry in batch if entry.kind == "activity"]
            handled, refused = await self._write(whole) if whole else ([], {})
            not_written = dict(refused)
            if activity:
                not_written.update(await self._write_activity(activity))
            if not_written:
                batch_left = await self._rewrite_whole(not_written)
                left.rewrite.update(batch_left.rewrite)
                left.after_journal.update(batch_left.after_journal)
            result.written += len(handled) + len(activity) - len(not_written)
            result.dead += len(whole) - len(handled)
            kept = {entry.session_id for entry in handled} | {entry.session_id for entry in activity}
            acks = _by_partition([entry for entry in batch if entry.session_id not in not_written], kept)
            for partition, cleared in (await self.hot.ack(acks, read_ms, tokens)).items():
                replies[partition] = -1 if cleared < 0 or replies.get(partition, 0) < 0 else \
                    replies.get(partition, 0) + cleared
        for partition, cleared in replies.items():
            if cleared < 0:
                if partition in self.held:
                    log.warning("flusher %s lost the lease of partition %d: its ack was refused (the rows it "
                                "wrote are harmless, the new owner writes them again)", self.flusher_id, partition)
                self.held.discard(partition)
            else:
                result.acked += cleared
        return left

    async def _rewrite_whole(self, rows: dict[str, Refusal]) -> NotDurable:
        """Leave ``rows`` dirty for a whole-row write, unacked. Where Postgres's guard refused the copy (it holds
        a newer version: Redis restored from an older copy, a lagging replica) the copy is rebased above that
        version, so the writes Redis acknowledged since are not swallowed by the guard. Where journal entries
        of the session are pending, the copy lacks writes Postgres holds: it waits for the replay, which
        folds them in (rebasing it now would overwrite them in Postgres)."""
        after_journal = {sid for sid, refusal in rows.items() if refusal.journaled}
        ids = sorted(rows)
        above = [None if sid in after_journal else rows[sid].version for sid in ids]
        rebased = sum(await self.hot.rebase(ids, _codec.now_ms(), above))
        if rebased:  # not a newer flush of the same copy, which this copy has already passed
            metrics.FLUSH_REFUSED.inc(rebased)
            log.warning("PostgreSQL holds newer versions of %d sessions than their Redis copies (Redis restored "
                        "from an older copy, or a lagging replica): rebased above them and written again", rebased)
        return NotDurable(set(rows) - after_journal, after_journal)

    def _count(self, result: PassResult) -> None:
        self.totals.claimed += result.claimed
        self.totals.written += result.written
        self.totals.acked += result.acked
        self.totals.dead += result.dead

    async def _write(self, rows: list[DirtyEntry]) -> tuple[list[DirtyEntry], dict[str, Refusal]]:
        """Upsert ``rows`` in one statement. If Postgres rejects a row (a data or constraint error), split
        the batch until the bad rows are alone, dead-letter them, and write the rest. Returns the rows not
        dead-lettered, and of those the ones the version guard refused (with the version Postgres holds);
        every row passed in is handled when this returns."""
        try:
            refused = await self.cold.upsert_batch([row.row for row in rows])
        except ROW_ERRORS as exc:
            if len(rows) == 1:
                await self.dead_letters.record(rows[0], exc)
                return [], {}
            middle = len(rows) // 2
            first, first_refused = await self._write(rows[:middle])
            second, second_refused = await self._write(rows[middle:])
            return first + second, first_refused | second_refused
        metrics.FLUSH_BATCH_ROWS.observe(len(rows))
        for kind, count in collections.Counter(row.kind for row in rows if row.session_id not in refused).items():
            metrics.FLUSHED_ROWS.labels(kind).inc(count)
        if self.on_written is not None:
            for row in rows:
                if row.kind in ("tombstone", "expired") and row.session_id not in refused:
                    self.on_written(row)
        return rows, refused

    async def _write_activity(self, rows: list[DirtyEntry]) -> dict[str, Refusal]:
        """Write activity rows in one statement. Returns the rows not written, to write whole instead: with
        the version the guard refused them for, or None where Postgres has no row (or refused the batch, so
        that the whole-row path isolates and dead-letters a bad row)."""
        try:
            missing = await self.cold.write_activity_batch([row.row for row in rows])
        except ROW_ERRORS as exc:
            log.warning("PostgreSQL refused %d activity rows (%s): writing them as whole rows", len(rows),
                        describe(exc))
            metrics.FLUSH_ERRORS.labels(type(exc).__name__).inc()
            missing = dict.fromkeys((row.session_id for row in rows), Refusal(None, False))
        metrics.FLUSH_BATCH_ROWS.observe(len(rows))
        metrics.FLUSHED_ROWS.labels("activity").inc(len(rows) - len(missing))
        return missing

    async def update_gauges(self) -> tuple[int, float]:
        """Refresh the backlog and lag gauges from Redis; returns (dirty sessions, lag seconds)."""
        reading = await self.hot.reading(_codec.now_ms())
        metrics.export(reading)
        return reading.dirty_sessions, reading.flush_lag_seconds

    async def _backlog(self) -> tuple[int, float]:
        """The backlog and lag without exporting them: a drain (``flush()``, ``close()``) runs in processes that
        refresh no gauge afterwards, and a reading exported once would stay there, stale, for good."""
        reading = await self.hot.reading(_codec.now_ms())
        return reading.dirty_sessions, reading.flush_lag_seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until ``stop`` is set. Failures are retried with backoff; nothing dirty is ever dropped."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                async for attempt in retrying(stop, None, self.outage, self.update_gauges):
                    with attempt:
                        await self.rebalance()
                        # Only this loop exports the count: a process that read it once would export it forever.
                        metrics.JOURNAL_PENDING.set(await self.journal.replay_pending())
                        result = await self.flush_once()
                        await self.update_gauges()
                self.outage.ended()
            except RETRYABLE:
                if stop.is_set():
                    return
                raise
            if not result.full:
                await self._idle(stop, started + self.interval)

    async def _idle(self, stop: asyncio.Event, deadline: float) -> None:
        """Wait until ``deadline`` (passes start every ``interval``, so a write waits at most about one interval
        plus one pass), renewing the leases at least every third of a lease."""
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(left, self.lease_secs / 3))
            if not stop.is_set() and deadline - time.monotonic() > 0:
                try:
                    await self.rebalance()
                except RETRYABLE as exc:  # the next pass retries with backoff; a lapsed lease is just retaken
                    log.warning("lease renewal failed: %s", exc)

    async def drain(self, timeout: float, *, only_dirty_before_now: bool = False,
                    progress: Callable[[PassResult], None] | None = None) -> int:
        """Flush every partition until nothing is dirty or ``timeout`` seconds have passed; with
        ``only_dirty_before_now``, only what was dirty when the call began (so busy writers cannot keep it going).

        This is the on-demand flush: it needs no lease and never waits for one. It writes what it claims
        (harmless next to the owner's write: the version guard) and its ack is accepted where this flusher
        holds the lease or nobody does. Where another flusher holds
        the lease the ack is refused, but the rows are in Postgres: durable. They are not written again unless
        their version moves; the owner clears their marks.
        Journal entries (writes taken while Redis was unreachable) are folded into Redis first, so the copies
        written include them. Returns how many sessions are still dirty and not made durable by this call
        (they stay in Redis for the next flusher), plus the journal entries still pending (another replayer
        holds them): 0 means everything acknowledged before the call is in Postgres."""
        deadline = time.monotonic() + timeout
        up_to = _codec.now_ms() if only_dirty_before_now else None
        journaled = 0  # journal entries still pending: the copies they belong to lack them
        done: dict[str, int] = {}  # session id -> version this call wrote (0: a mark with no hash)
        deferred: dict[str, int] = {}  # session id -> version refused until the journal replay folds entries in
        extra = dict.fromkeys(self.partitions, 0)  # per partition: entries already done, to claim beyond them
        durable_dirty = 0
        while time.monotonic() < deadline:
            async for attempt in retrying(None, deadline, self.outage, _no_gauges):
                with attempt:
                    journaled = await self.journal.replay_pending()
                    result, durable_dirty, complete = await self._drain_pass(up_to, done, deferred, extra, deadline)
            self.outage.ended()
            if progress is not None:
                progress(result)
            if complete:
                break
        dirty, _ = await self._backlog()
        if journaled:  # folded in by now (by another replayer), or still pending: only the count can tell
            journaled = await self.journal.pending()
        return max(0, dirty - durable_dirty) + journaled

    async def _drain_pass(self, up_to: int | None, done: dict[str, int], deferred: dict[str, int],
                          extra: dict[int, int], deadline: float) -> tuple[PassResult, int, bool]:
        """One on-demand pass over every partition. ``done``: the versions this drain made durable; ``deferred``:
        the versions that wait for the journal replay (not durable, not retried until their version moves).
        Returns the result, how many claimed entries were already durable (written by this drain at their
        current version), and whether the pass saw every dirty entry and had nothing new to write."""
        started = time.perf_counter()
        await self.renew()
        result = PassResult()
        saw_all = True
        wrote = False
        durable = dict.fromkeys(self.partitions, 0)
        token = "?" + self.flusher_id  # ours or nobody's (our loop may take one)

        async def one_group(group: list[int]) -> None:
            # A partition at a time, claimed again until it holds nothing more: while this group writes one
            # batch to Postgres, the other groups' claims run in Redis, with no wait for a whole pass between.
            nonlocal saw_all, wrote
            for partition in group:
                full = True
                while full and time.monotonic() < deadline:
                    read_ms = _codec.now_ms()
                    limit = self.batch_size + extra[partition]
                    entries = await self.hot.claim(partition, limit, up_to or read_ms, read_ms)
                    new = [e for e in entries
                           if done.get(e.session_id) != e.version and deferred.get(e.session_id) != e.version]
                    extra[partition] = len(entries) - len(new)  # claim beyond these next time
                    durable[partition] = sum(done.get(e.session_id) == e.version for e in entries)
                    full = len(entries) >= limit
                    if not new:
                        continue
                    result.claimed += len(new)
                    left = await self._write_and_ack({partition: new}, read_ms, {partition: token}, result)
                    for entry in new:
                        if entry.session_id in left.after_journal:
                            deferred[entry.session_id] = entry.version
                        elif entry.session_id not in left.rewrite:
                            done[entry.session_id] = entry.version
                    wrote = True
                saw_all = saw_all and not full

        await self._in_groups(self.partitions, one_group)
        result.full = not saw_all
        if result.claimed:
            metrics.FLUSH_DURATION.observe(time.perf_counter() - started)
        self._count(result)
        return result, sum(durable.values()), saw_all and not wrote


async def _no_gauges() -> None:
    """A drain's pause between attempts: it exports no gauge (see ``Flusher._backlog``)."""


def _session_id(entry: DirtyEntry) -> str:
    return entry.session_id
