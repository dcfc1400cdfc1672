"""Promises the mutation check (scripts/mutants) found unguarded: each test here fails when its promise is broken
in the Lua, SQL or Python that carries it (see tests/mutation.py for the breakages). Real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tiered_sessions import BackpressureError, SessionManager, Settings

from .helpers import until


async def test_an_expired_session_still_waiting_for_its_flush_is_gone(settings: Settings,
                                                                      redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, run_flusher=False, session_timeout_secs=0.3) as manager:
        old = await manager.ensure("lapsed", data={"old": True})
        assert await manager.update_activity("lapsed") is True
        await asyncio.sleep(0.4)
        assert manager.flusher is not None
        key = manager.flusher.hot.keys("lapsed").session
        assert await redis.exists(key) == 1  # still in Redis: dirty, pinned until the flusher writes it
        assert await manager.update_activity("lapsed") is False
        assert await manager.get("lapsed") is None
        fresh = await manager.ensure("lapsed")
        assert fresh.data == {} and fresh.request_count == 0 and fresh.version > old.version


async def test_a_closed_session_takes_no_activity(manager: SessionManager) -> None:
    await manager.ensure("shut")
    await manager.update("shut", closed=True)
    assert await manager.update_activity("shut") is False
    session = await manager.get("shut")
    assert session is not None and session.closed and session.request_count == 0


async def test_ensure_of_a_removed_id_starts_fresh_whatever_the_clock_of_the_remover(
        manager: SessionManager, redis: aioredis.Redis) -> None:
    removed = await manager.ensure("gone", data={"secret": 1})
    await manager.remove("gone")
    assert manager.flusher is not None
    key = manager.flusher.hot.keys("gone").session
    ahead = int(await redis.hget(key, "ex") or 0) + 60_000
    await redis.hset(key, mapping={"ex": ahead, "la": ahead})  # as a remover whose clock runs a minute ahead
    fresh = await manager.ensure("gone")
    assert fresh.data == {} and fresh.version > removed.version + 1
    assert (await manager.get("gone")) is fresh


async def test_held_writers_wait_for_the_low_watermark_not_just_below_the_high(settings: Settings,
                                                                               redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, run_flusher=False, backlog_high_watermark=40,
                              backlog_low_watermark=10, backpressure_timeout_secs=0.5,
                              backlog_poll_secs=0.02) as manager:
        ids = [f"w-{i}" for i in range(40)]
        for sid in ids:
            await manager.ensure(sid)
        await until(lambda: manager.backlog >= 40)
        assert manager.flusher is not None
        hot = manager.flusher.hot
        for sid in ids[:20]:  # as if a flusher acked 20: the backlog is between the watermarks
            await redis.zrem(hot.keys(sid).dirty, sid)
        await until(lambda: manager.backlog == 20)
        with pytest.raises(BackpressureError):
            await manager.update_activity("w-39")
        waiting = asyncio.create_task(manager.update_activity("w-38"))
        for sid in ids[20:30]:  # down to the low watermark: the writer goes through
            await redis.zrem(hot.keys(sid).dirty, sid)
        assert await waiting is True


async def test_close_hands_the_partitions_over_at_once(settings: Settings) -> None:
    lease = 5.0
    first = SessionManager(settings=settings, lease_secs=lease)
    await first.ensure()
    async with SessionManager(settings=settings, lease_secs=lease) as second:
        assert second.flusher is not None and first.flusher is not None
        await until(lambda: len(second.flusher.held) == settings.partitions // 2)  # type: ignore[union-attr]
        closed = asyncio.get_running_loop().time()
        await first.close()
        await until(lambda: len(second.flusher.held) == settings.partitions, timeout=lease / 2)  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() - closed < lease / 2  # not after the leases ran out
