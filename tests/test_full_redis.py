"""A Redis at its ``maxmemory`` with ``noeviction`` (what the tier asks of it): a write that would grow it is
refused whole with a named error, reads go on, and the flusher still drains it, since flushing is what gives
the sessions their TTL back. Each test owns its Redis and fills it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tiered_sessions import RedisFull, SessionManager, Settings
from tiered_sessions.embedded import RedisServer

from .helpers import pg_rows, until


@pytest.fixture
async def full_client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    await client.config_set("maxmemory-policy", "noeviction")
    yield client
    await client.aclose()


async def fill(client: aioredis.Redis) -> int:
    """Make Redis full: maxmemory well under what it uses now (so that no freed buffer makes room); returns
    what it uses."""
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used // 2)
    return used


def refused(operation: str) -> float:
    return REGISTRY.get_sample_value("tiered_sessions_backend_errors_total",
                                     {"backend": "redis", "operation": operation}) or 0.0


async def test_a_write_that_would_grow_a_full_redis_is_refused_whole_and_reads_go_on(
        own_redis: RedisServer, full_client: aioredis.Redis, settings: Settings) -> None:
    settings = dataclasses.replace(settings, redis_url=own_redis.url)
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        kept = await manager.ensure("kept", data={"a": 1})
        await manager.ensure("leaving", data={"pad": "x" * 20_000})
        await manager.ensure("gone")
        await manager.remove("gone")  # a tombstone: ensure gives it a new life by rewriting the key
        used = await fill(full_client)
        before = refused("ensure")
        for sid in ("new", "gone"):
            with pytest.raises(RedisFull, match="maxmemory"):
                await manager.ensure(sid, data={"pad": "x" * 20_000})
            assert await manager.get(sid) is None  # nothing of it written
        assert refused("ensure") == before + 2
        for write in (manager.update("kept", data={"b": "x" * 20_000}), manager.update_activity("kept")):
            with pytest.raises(RedisFull):
                await write
        assert int((await full_client.info("memory"))["used_memory"]) < used + 20_000  # no way past the limit
        assert (await manager.get("kept")) is kept and kept.data == {"a": 1} and kept.request_count == 0
        await manager.remove("leaving")  # a remove frees memory: a full Redis lets it through
        assert await manager.get("leaving") is None
        assert (await manager.get_session_metrics())["mode"] == "normal"  # Redis answers: not degraded
        await full_client.config_set("maxmemory", 0)
        await manager.update("kept", data={"b": 2})
        assert kept.data == {"a": 1, "b": 2}


async def test_a_full_redis_is_drained_by_flush_and_by_a_flusher_started_while_full(
        own_redis: RedisServer, full_client: aioredis.Redis, settings: Settings, pg: asyncpg.Connection) -> None:
    settings = dataclasses.replace(settings, redis_url=own_redis.url)
    async with SessionManager(settings=settings, run_flusher=False) as writer:
        first = [(await writer.ensure(data={"i": i})).session_id for i in range(200)]
        assert await writer.flush() == 0
        for sid in first:  # flushed before, touched since: these flush as activity rows
            await writer.update_activity(sid)
        second = [(await writer.ensure(data={"i": i})).session_id for i in range(200)]
        await fill(full_client)
        with pytest.raises(RedisFull):
            await writer.ensure(data={"pad": "x" * 5000})
        # flush() needs no lease: its acks must get through to a Redis that refuses anything that grows it
        assert await writer.flush() == 0
    rows = await pg_rows(pg, settings)
    assert set(first + second) <= set(rows)
    # A flusher process started while Redis is full: it must record itself, take leases and ack
    async with SessionManager(settings=settings, run_flusher=False) as toucher:
        await full_client.config_set("maxmemory", 0)
        for sid in second:
            await toucher.update_activity(sid)
        await fill(full_client)
    async with SessionManager(settings=settings, flush_interval_secs=0.05) as flusher:
        assert flusher.flusher is not None
        totals = flusher.flusher.totals
        await until(lambda: totals.acked >= len(second))
        assert (await flusher.get_session_metrics())["dirty_sessions"] == 0
    rows = await pg_rows(pg, settings)
    assert all(rows[sid]["request_count"] == 1 for sid in second)
