"""Many flushers: partitions shared through leases, fenced acks, fair share, takeover of a dead flusher's
partitions. Real Redis and PostgreSQL; flusher processes where a process has to die."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings
from tiered_sessions._codec import partition_of
from tiered_sessions._flusher import Flusher
from tiered_sessions._hot_tier import HotTier
from tiered_sessions.cold_tier import PostgresSessionStore

from .helpers import pg_row, pg_rows, touch_load
from .test_cli import _env


async def _holders(redis: aioredis.Redis, settings: Settings) -> list[str | None]:
    """The lease token of every partition (None: free)."""
    values = await redis.mget([f"{settings.key_prefix}:{{p{p}}}:lease" for p in range(settings.partitions)])
    return [v.decode() if isinstance(v, bytes) else v for v in values]


@pytest.fixture
async def tier(settings: Settings) -> AsyncIterator[tuple[HotTier, PostgresSessionStore]]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    store = PostgresSessionStore(settings=settings)
    await store.connect()
    yield HotTier(client, settings), store
    await store.close()
    await client.aclose()


async def test_a_flusher_that_lost_its_lease_cannot_ack(settings: Settings, tier: tuple[HotTier, PostgresSessionStore],
                                                        redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    hot, store = tier
    a, b = Flusher(hot, store, settings), Flusher(hot, store, settings)
    await a.rebalance()
    assert a.held == set(range(settings.partitions))  # alone: every partition
    async with SessionManager(settings=settings, run_flusher=False) as writer:
        await writer.ensure("fenced")
        await writer.update_activity("fenced", request_duration_ms=3)
        # a's leases run out (a stalled process); b takes the partitions over.
        await redis.delete(*[hot.lease_key(p) for p in range(settings.partitions)])
        await redis.zrem(hot.flushers_key, a.flusher_id)  # and its heartbeat is too old to count
        await b.rebalance()
        assert b.held == set(range(settings.partitions))
        late = await a.flush_once()  # a still believes it owns them: it writes, but its ack is refused
        assert late.written == 1 and late.acked == 0
        assert partition_of("fenced", settings.partitions) not in a.held  # and it knows it lost that one
        assert await redis.zscore(hot.keys("fenced").dirty, "fenced") is not None  # still dirty
        await writer.update_activity("fenced", request_duration_ms=4)
        owner = await b.flush_once()  # the owner writes the newest version and clears the mark
        assert owner.acked == 1
        assert await hot.dirty_total() == 0
        row = await pg_row(pg, settings, "fenced")
        assert row is not None and row["request_count"] == 2 and row["total_duration_ms"] == 7
        # a's write of the older version, replayed late, changes nothing: the version guard.
        await a.flush_once()
        row = await pg_row(pg, settings, "fenced")
        assert row is not None and row["request_count"] == 2
        # flush() in a process holding no lease: durable at return even though b owns every partition.
        await writer.update_activity("fenced")
        assert await writer.flush() == 0
        row = await pg_row(pg, settings, "fenced")
        assert row is not None and row["request_count"] == 3
        assert await hot.dirty_total() == 1  # b's job to clear the mark; the row is durable already
        await b.flush_once()
        assert await hot.dirty_total() == 0


async def test_flush_beside_the_lease_holder_writes_a_backlog_of_many_batches(
        settings: Settings, tier: tuple[HotTier, PostgresSessionStore], pg: asyncpg.Connection) -> None:
    """flush() where another flusher holds every lease: its acks are refused, so what it wrote stays dirty, and
    each claim must reach past it to the rest. It still returns with every session durable, well within its
    timeout, and writes each one once."""
    small = dataclasses.replace(settings, partitions=2, flush_batch_size=5, run_flusher=False)
    hot, store = tier
    owner = Flusher(HotTier(hot.client, small), store, small)
    await owner.rebalance()
    assert owner.held == {0, 1}
    async with SessionManager(settings=small) as writer:
        ids = [f"beside-{n}" for n in range(37)]  # several batches in each partition
        for sid in ids:
            await writer.ensure(sid, data={"n": sid})
        assert writer.flusher is not None
        started = time.monotonic()
        assert await writer.flush() == 0
        assert time.monotonic() - started < small.drain_timeout_secs / 2
        assert writer.flusher.totals.written == len(ids) and writer.flusher.totals.acked == 0
    assert set(ids) <= set(await pg_rows(pg, small))
    assert await owner.hot.dirty_total() == len(ids)  # the owner's to clear, a batch a pass
    while (await owner.flush_once()).full:
        pass
    assert await owner.hot.dirty_total() == 0


async def test_partitions_spread_evenly_and_follow_joins_and_leaves(settings: Settings, redis: aioredis.Redis,
                                                                    tier: tuple[HotTier, PostgresSessionStore]
                                                                    ) -> None:
    hot, store = tier
    fast = dataclasses.replace(settings, lease_secs=0.6, flush_interval_secs=0.05)
    stops = [asyncio.Event() for _ in range(4)]
    flushers = [Flusher(hot, store, fast) for _ in range(4)]
    tasks: list[asyncio.Task[None]] = []

    async def settled(expected: list[int], within: float) -> list[int]:
        deadline = time.monotonic() + within
        while True:
            holders = Counter(await _holders(redis, fast))
            counts = sorted((holders[f.flusher_id] for f in flushers if holders[f.flusher_id]), reverse=True)
            if (counts == expected and None not in holders) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.05)

    try:
        tasks.append(asyncio.create_task(flushers[0].run(stops[0])))
        assert await settled([16], 2.0) == [16]
        tasks += [asyncio.create_task(f.run(s)) for f, s in zip(flushers[1:3], stops[1:3], strict=True)]
        assert await settled([6, 5, 5], 4 * fast.lease_secs) == [6, 5, 5]  # within a few lease periods
        tasks.append(asyncio.create_task(flushers[3].run(stops[3])))
        assert await settled([4, 4, 4, 4], 4 * fast.lease_secs) == [4, 4, 4, 4]
        stops[1].set()  # one leaves cleanly: it releases at once
        await tasks[1]
        await flushers[1].release()
        assert await settled([6, 5, 5], 4 * fast.lease_secs) == [6, 5, 5]
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks)


async def _spawn_flusher(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "tiered_sessions.cli", "flusher", env=env,
                                                stderr=asyncio.subprocess.DEVNULL)


async def test_three_flusher_processes_one_sigkilled_its_partitions_taken_over(
        settings: Settings, redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    ids = [f"m-{i}" for i in range(300)]
    acked: Counter[str] = Counter()
    stop = asyncio.Event()
    env = {**os.environ, **_env(settings), "TIERED_SESSIONS_FLUSH_BATCH_SIZE": "50",
           "TIERED_SESSIONS_FLUSH_INTERVAL_SECS": "0.02", "TIERED_SESSIONS_LEASE_SECS": "1"}
    processes = [await _spawn_flusher(env) for _ in range(3)]
    try:
        async with SessionManager(settings=settings, run_flusher=False) as manager:
            for sid in ids:
                await manager.ensure(sid)
            load = [asyncio.create_task(touch_load(manager, ids, acked, stop)) for _ in range(6)]
            deadline = time.monotonic() + 15
            while True:  # all three up and sharing (each 5 or 6 of 16)
                counts = Counter(await _holders(redis, settings))
                if None not in counts and sorted(counts.values()) == [5, 5, 6]:
                    break
                assert time.monotonic() < deadline, counts
                await asyncio.sleep(0.1)
            await asyncio.sleep(random.uniform(0.3, 0.8))
            victim = processes[0]
            victim_partitions = [p for p, h in enumerate(await _holders(redis, settings))
                                 if h is not None and f":{victim.pid}:" in h]
            assert len(victim_partitions) in (5, 6)
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            # Its leases run out (1 s), then the two survivors take its partitions (8 each).
            deadline = time.monotonic() + 6
            while True:
                holders = await _holders(redis, settings)
                survivors = Counter(h.split(":")[1] for h in holders if h is not None)
                if None not in holders and sorted(survivors.values()) == [8, 8] \
                        and str(victim.pid) not in survivors:
                    break
                assert time.monotonic() < deadline, holders
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # more load on the taken-over partitions
            stop.set()
            await asyncio.gather(*load)
            deadline = time.monotonic() + 10
            while (await manager.get_session_metrics())["dirty_sessions"]:
                assert time.monotonic() < deadline, "the survivors did not drain the backlog"
                await asyncio.sleep(0.1)
            rows = await pg_rows(pg, settings)
            assert sum(acked.values()) > 500
            for sid in ids:
                session = await manager.get(sid)
                assert session is not None
                # Redis and Postgres agree, and every acknowledged increment is there exactly once.
                assert rows[sid]["request_count"] == session.request_count == acked[sid], sid
                assert rows[sid]["version"] == session.version, sid
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            await process.wait()
