"""Promises the mutation check (scripts/mutants) found unguarded: each test here fails when its promise is broken
in the Lua, SQL or Python that carries it (see tests/mutation.py for the breakages). Real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from tiered_sessions import BackpressureError, ConfigurationError, SessionManager, Settings
from tiered_sessions.embedded import PostgresServer
from tiered_sessions.events import SessionEvent
from tiered_sessions.migrate import migrate

from .helpers import pg_rows, until


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


async def test_terminate_returns_at_once_and_leaves_the_dirty_sessions_to_the_next_flusher(
        redis_url: str, own_postgres: PostgresServer) -> None:
    """close() drains (up to drain_timeout_secs); terminate() does not wait: with Postgres hung it returns at
    once, and what was dirty stays in Redis, flushed by the next manager."""
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix="terminated",
                        max_concurrent_sessions=None, socket_timeout_secs=2, drain_timeout_secs=20,
                        flush_interval_secs=3600)
    await migrate(settings)
    manager = SessionManager(settings=settings)
    ids = [(await manager.ensure(data={"n": n})).session_id for n in range(5)]
    own_postgres.pause()  # hung, not refusing: every Postgres call waits out its timeout
    try:
        started = asyncio.get_running_loop().time()
        await manager.terminate()
        assert asyncio.get_running_loop().time() - started < 1.5
        with pytest.raises(ConfigurationError):
            await manager.get(ids[0])  # terminated for good, like a closed one
    finally:
        own_postgres.resume()
    await _the_next_manager_flushes_them(settings, own_postgres, ids)


async def test_close_keeps_to_its_drain_timeout_while_postgres_hangs(redis_url: str,
                                                                     own_postgres: PostgresServer) -> None:
    """close() with PostgreSQL hung and an event listener that never finishes: it returns (it raised asyncpg's
    TimeoutError from closing the pool), within ``drain_timeout_secs`` for the loop's stop, the drain and the
    events together (each had a timeout of its own), plus closing the connections: one socket timeout for a
    statement under way, one for the pool. What it could not flush stays dirty for the next flusher."""
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix="closebound",
                        max_concurrent_sessions=None, socket_timeout_secs=1, drain_timeout_secs=2,
                        flush_interval_secs=0.05)
    await migrate(settings)
    manager = SessionManager(settings=settings)

    @manager.on_created
    async def never_done(event: SessionEvent) -> None:
        await asyncio.sleep(3600)

    ids = [(await manager.ensure(data={"n": n})).session_id for n in range(5)]
    await until(lambda: manager.flusher is not None and manager.flusher.totals.acked >= 5)
    own_postgres.pause()  # hung: the flush loop's pass and the drain each wait out their statements
    try:
        ids += [(await manager.ensure(data={"n": n})).session_id for n in range(5, 10)]
        await asyncio.sleep(0.3)  # a pass is under way against the hung server
        started = asyncio.get_running_loop().time()
        await manager.close()
        took = asyncio.get_running_loop().time() - started
        assert took < 2 + 1 + 1 + 0.75, f"close() took {took:.1f}s"
    finally:
        own_postgres.resume()
    await _the_next_manager_flushes_them(settings, own_postgres, ids)


async def _the_next_manager_flushes_them(settings: Settings, postgres: PostgresServer, ids: list[str]) -> None:
    """A manager started after the one that left ``ids`` dirty flushes them all (data ``{"n": 0..}``)."""
    async with SessionManager(settings=settings) as successor:
        assert await successor.flush() == 0
    connection = await asyncpg.connect(postgres.url)
    try:
        rows = await pg_rows(connection, settings)
    finally:
        await connection.close()
    assert sorted(orjson.loads(rows[sid]["session_data"])["n"] for sid in ids) == list(range(len(ids)))
