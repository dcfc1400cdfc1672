"""``cleanup_stale_sessions()`` answers how many sessions timed out (or were closed and removed) since the last
cleanup anywhere in the tier: every one, whether Redis still holds it or let it go by its TTL, whether it was
flushed or not, and each exactly once across processes."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings

# Margins: a loaded machine may be a fifth of a second late either side.
TIMEOUT = 1.0
PAST_TIMEOUT = 1.3

MODES = pytest.mark.parametrize("persist", [True, False], ids=["persistence", "no-persistence"])


def tier(settings: Settings, persist: bool, timeout: float = TIMEOUT, flush_interval: float | None = None
         ) -> Settings:
    return dataclasses.replace(settings, enable_persistence=persist, session_timeout_secs=timeout,
                               flush_interval_secs=flush_interval or settings.flush_interval_secs)


@MODES
@pytest.mark.parametrize("count", [3, 100])
async def test_every_timed_out_session_is_counted_once(settings: Settings, persist: bool, count: int) -> None:
    async with SessionManager(settings=tier(settings, persist)) as manager:
        await asyncio.gather(*(manager.ensure(f"s-{i}") for i in range(count)))
        await asyncio.sleep(PAST_TIMEOUT)
        assert await manager.cleanup_stale_sessions() == count
        assert await manager.cleanup_stale_sessions() == 0
        assert await manager.list_ids() == []


async def test_sessions_that_expired_before_any_flush_count(settings: Settings) -> None:
    """A session dirty when it expired is written to Postgres as expired by the flusher, not by the cleanup."""
    async with SessionManager(settings=tier(settings, True, flush_interval=5)) as manager:
        await manager.ensure("flushed")
        await manager.flush()
        await manager.ensure("dirty-1")
        await manager.ensure("dirty-2")
        await asyncio.sleep(PAST_TIMEOUT)
        assert await manager.cleanup_stale_sessions() == 3


@MODES
async def test_a_session_redis_already_let_go_counts(settings: Settings, redis: aioredis.Redis,
                                                     persist: bool) -> None:
    async with SessionManager(settings=tier(settings, persist)) as manager:
        await manager.ensure("lapses")
        await manager.flush()  # clean: Redis applies the real expiry
        await asyncio.sleep(PAST_TIMEOUT)
        assert [key async for key in redis.scan_iter(match=f"{settings.key_prefix}:*:s:*")] == []
        assert await manager.cleanup_stale_sessions() == 1


@MODES
async def test_each_timed_out_session_is_counted_by_one_process_only(settings: Settings, persist: bool) -> None:
    config = tier(settings, persist)
    async with SessionManager(settings=config) as one, SessionManager(settings=config) as other:
        for i in range(5):
            await one.ensure(f"one-{i}")
            await other.ensure(f"other-{i}")
        await asyncio.sleep(PAST_TIMEOUT)
        await one.get_session_metrics()  # readings drop the passed buckets too: they must not eat the count
        await other.tier_reading()
        counts = await asyncio.gather(*(m.cleanup_stale_sessions() for m in (one, other, one, other)))
        assert sum(counts) == 10


@MODES
async def test_removed_sessions_do_not_count_and_closed_ones_count_once(settings: Settings, persist: bool) -> None:
    config = tier(settings, persist, timeout=30.0)
    async with SessionManager(settings=config) as one, SessionManager(settings=config) as other:
        await one.ensure("removed")
        await one.remove("removed")
        await one.ensure("closed")
        await one.update("closed", closed=True)
        await one.ensure("alive")
        counts = await asyncio.gather(one.cleanup_stale_sessions(), other.cleanup_stale_sessions())
        assert sum(counts) == 1
        assert await one.get("closed") is None and await one.list_ids() == ["alive"]
        assert await one.cleanup_stale_sessions() == 0
