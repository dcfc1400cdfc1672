"""The cold tier through PgBouncer in transaction mode (as Supabase's Supavisor on port 6543): migrations,
the write-behind path, read-through, recovery and dead letters, with no server-side prepared statements."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings
from tiered_sessions.migrate import migrate, migration_files

from .helpers import pg_rows


@pytest.fixture
async def pooled(settings: Settings, pgbouncer_url: str, pg: asyncpg.Connection) -> AsyncIterator[Settings]:
    """The test's settings, but on a fresh schema migrated through the pooler."""
    schema = f"pool_{uuid.uuid4().hex[:8]}"
    configured = dataclasses.replace(settings, database_url=pgbouncer_url, schema=schema, key_prefix=schema)
    results = await asyncio.gather(*(migrate(configured) for _ in range(3)))  # racing deployers, via the pooler
    assert sorted(name for applied in results for name in applied) == [p.name for p in migration_files()]
    yield configured
    await pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_write_behind_through_the_pooler(pooled: Settings, pg: asyncpg.Connection,
                                               redis: aioredis.Redis) -> None:
    async with SessionManager(settings=pooled) as manager, SessionManager(settings=pooled) as other:
        ids = [(await manager.ensure(data={"i": i})).session_id for i in range(300)]
        await asyncio.gather(*(other.update_activity(sid, request_duration_ms=2) for sid in ids))
        await manager.remove(ids[0])
        assert await manager.flush() == 0
        rows = await pg_rows(pg, pooled)
        assert len(rows) == 300 and rows[ids[0]]["session_state"] == "removed"
        assert all(rows[sid]["request_count"] == 1 for sid in ids[1:])
        await redis.flushall()
        # Read-through of many sessions at once: many short transactions over 4 server connections.
        sessions = await asyncio.gather(*(other.get(sid) for sid in ids))
        assert sessions[0] is None and all(s is not None and s.request_count == 1 for s in sessions[1:])
        await redis.flushall()
        assert await manager.recover_all_sessions(page_size=50) == 299


async def test_dead_letters_through_the_pooler(pooled: Settings, pg: asyncpg.Connection) -> None:
    await pg.execute(f"ALTER TABLE {pooled.qualified_table} ADD CONSTRAINT no_bad CHECK (user_id <> 'bad')")
    async with SessionManager(settings=pooled, run_flusher=False, flush_batch_size=8) as manager:
        for i in range(20):
            await manager.ensure(f"p{i}", user_id="bad" if i == 13 else "ok")
        await manager.flush()
        assert len(await pg_rows(pg, pooled)) == 19
        assert [letter.session_id for letter in await (await manager.dead_letters()).list()] == ["p13"]
