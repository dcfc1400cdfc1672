"""Redis down, Postgres up: calls keep working by writing through to Postgres (journaled); when Redis comes
back, warm or cold, no acknowledged write is lost, reverted or counted twice."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tiered_sessions import RedisUnavailable, SessionManager, Settings
from tiered_sessions.embedded import RedisServer

from .helpers import pg_rows, until

IDS = [f"g-{i}" for i in range(12)]


def _mode(name: str) -> float | None:
    return REGISTRY.get_sample_value("tiered_sessions_mode", {"mode": name})



@pytest.fixture
async def on_own_redis(settings: Settings) -> AsyncIterator[tuple[Settings, RedisServer]]:
    # AOF with fsync on every write: a SIGKILLed Redis comes back with everything it acknowledged.
    with RedisServer(appendonly=True, extra_args=["--appendfsync", "always"]) as server:
        yield Settings(**{**{f: getattr(settings, f) for f in ("database_url", "schema", "key_prefix")},
                          "redis_url": server.url, "flush_interval_secs": 0.05, "max_concurrent_sessions": None,
                          "socket_timeout_secs": 1, "redis_probe_interval_secs": 0.2}), server


async def _outage_writes(manager: SessionManager) -> None:
    """Redis is gone: the first call fails and opens the breaker; every later call works on Postgres."""
    with pytest.raises(RedisUnavailable):
        await manager.update_activity(IDS[0])
    assert manager.degraded is not None and manager.degraded.active
    assert _mode("degraded") == 1.0 and _mode("normal") == 0.0
    for sid in IDS:
        for _ in range(4):
            assert await manager.update_activity(sid, request_duration_ms=1) is True
    assert await manager.update(IDS[1], data={"during": "outage"}) > 0
    await manager.remove(IDS[2])
    created = await manager.ensure("born-in-outage", data={"k": "v"})
    assert created.version >= 1
    during = await manager.get(IDS[3])
    assert during is not None and during.request_count >= 4
    assert await manager.get(IDS[2]) is None
    assert manager.degraded is not None and await manager.degraded.pending() > 0


async def test_redis_back_warm_keeps_writes_from_both_sides(on_own_redis: tuple[Settings, RedisServer],
                                                            pg: asyncpg.Connection) -> None:
    settings, server = on_own_redis
    async with SessionManager(settings=settings) as manager:
        for sid in IDS:
            await manager.ensure(sid, data={"pre": 0})
            for _ in range(3):
                await manager.update_activity(sid, request_duration_ms=1)
        await manager.flush()
        for sid in IDS:  # acknowledged by Redis, not yet in Postgres when Redis dies
            await manager.update_activity(sid, request_duration_ms=1)
            await manager.update_activity(sid, request_duration_ms=1)
        await manager.update(IDS[0], data={"pre": "unflushed"})
        server.kill()
        await _outage_writes(manager)
        server.start()  # warm: the AOF brings back the unflushed writes
        await until(lambda: not manager.degraded.active)  # type: ignore[union-attr]
        assert _mode("normal") == 1.0
        assert await manager.degraded.pending() == 0  # type: ignore[union-attr]
        assert await manager.flush() == 0
        rows = await pg_rows(pg, settings)
        for sid in IDS:
            if sid == IDS[2]:
                assert await manager.get(sid) is None and rows[sid]["session_state"] == "removed"
                continue
            session = await manager.get(sid)
            assert session is not None
            assert session.request_count == 3 + 2 + 4, sid  # before, unflushed and during the outage
            assert rows[sid]["request_count"] == session.request_count
        assert (await manager.get(IDS[0])).data == {"pre": "unflushed"}  # type: ignore[union-attr]
        assert (await manager.get(IDS[1])).data == {"pre": 0, "during": "outage"}  # type: ignore[union-attr]
        assert (await manager.get("born-in-outage")).data == {"k": "v"}  # type: ignore[union-attr]


async def test_redis_back_cold_counts_nothing_twice(on_own_redis: tuple[Settings, RedisServer],
                                                    pg: asyncpg.Connection) -> None:
    settings, server = on_own_redis
    async with SessionManager(settings=settings, redis_probe_interval_secs=1.5) as manager:
        for sid in IDS:
            await manager.ensure(sid, data={"pre": 0})
            for _ in range(5):
                await manager.update_activity(sid, request_duration_ms=1)
        await manager.flush()
        server.kill()
        await _outage_writes(manager)
        server.stop()
        for path in server.data_dir.iterdir():  # come back cold: no AOF
            if path.name.startswith("appendonly"):
                if path.is_dir():
                    for inner in path.iterdir():
                        inner.unlink()
                    path.rmdir()
                else:
                    path.unlink()
        server.start()
        # Before this manager's probe replays the journal, another one reads a session: it warms the
        # Postgres copy, which already holds the outage's writes. The replay must not apply them again.
        async with SessionManager(settings=settings, run_flusher=False) as other:
            early = await other.get(IDS[5])
            assert early is not None and early.request_count == 9
        await until(lambda: not manager.degraded.active)  # type: ignore[union-attr]
        assert await manager.flush() == 0
        rows = await pg_rows(pg, settings)
        for sid in IDS:
            if sid == IDS[2]:
                assert await manager.get(sid) is None and rows[sid]["session_state"] == "removed"
                continue
            session = await manager.get(sid)
            assert session is not None and session.request_count == 5 + 4, sid
            assert rows[sid]["request_count"] == 9
        assert (await manager.get(IDS[1])).data == {"pre": 0, "during": "outage"}  # type: ignore[union-attr]
