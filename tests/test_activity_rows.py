"""Sessions that only see touches (update_activity) flush as activity rows: version, times and counters,
without reading the whole hash or rewriting data. Any other change, and any doubt that Postgres holds the
session whole, makes the next flush write the whole row."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tiered_sessions import SessionManager, Settings, _codec

from .helpers import pg_row


def _activity_rows() -> float:
    return REGISTRY.get_sample_value("tiered_sessions_flushed_rows_total", {"kind": "activity"}) or 0.0


async def test_touches_flush_as_activity_rows_and_changes_as_whole_rows(settings: Settings,
                                                                        pg: asyncpg.Connection) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("a", data={"n": 1}, user_id="u1")
        await manager.flush()
        before = _activity_rows()
        for _ in range(3):
            assert await manager.update_activity("a", request_duration_ms=10)
        await manager.flush()
        assert _activity_rows() - before == 1
        session = await manager.get("a")
        assert session is not None
        row = await pg_row(pg, settings, "a")
        assert row is not None
        assert (row["version"], row["request_count"], row["total_duration_ms"]) == (session.version, 3, 30)
        assert (row["session_data"], row["user_id"], row["session_state"]) == ('{"n": 1}', "u1", "active")
        assert abs(row["expires_at"].timestamp() - session.expires_at) < 0.002
        assert abs(row["last_activity_at"].timestamp() - session.last_activity) < 0.002

        await manager.update("a", data={"n": 2})
        await manager.update_activity("a")
        await manager.flush()
        assert _activity_rows() - before == 1  # a data change: a whole row
        row = await pg_row(pg, settings, "a")
        assert row is not None and row["session_data"] == '{"n": 2}' and row["request_count"] == 4

        await manager.update_activity("a")
        await manager.flush()
        assert _activity_rows() - before == 2
        row = await pg_row(pg, settings, "a")
        assert row is not None and row["session_data"] == '{"n": 2}' and row["request_count"] == 5


async def test_an_activity_row_whose_postgres_row_is_gone_is_written_whole(settings: Settings,
                                                                            pg: asyncpg.Connection) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("purged", data={"keep": "me"}, user_id="u2")
        await manager.flush()
        await pg.execute(f"DELETE FROM {settings.qualified_table} WHERE session_id = 'purged'")
        await manager.update_activity("purged", request_duration_ms=7)
        assert await manager.flush() == 0
        row = await pg_row(pg, settings, "purged")
        assert row is not None
        assert (row["session_data"], row["user_id"], row["request_count"], row["total_duration_ms"]) == \
            ('{"keep": "me"}', "u2", 1, 7)


async def test_a_dead_lettered_change_is_written_whole_once_postgres_takes_it(
        settings: Settings, pg: asyncpg.Connection) -> None:
    """A dead-lettered row is acked (it no longer holds the partition back) but Postgres lacks it: the
    session's next touch must not flush as an activity row over the old data."""
    await pg.execute(f"ALTER TABLE {settings.qualified_table} ADD CONSTRAINT no_poison "
                     "CHECK (user_id IS DISTINCT FROM 'poison')")
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("p", user_id="fine")
        await manager.flush()
        await manager.update("p", user_id="poison")
        await manager.flush()
        assert [letter.session_id for letter in await (await manager.dead_letters()).list()] == ["p"]
        row = await pg_row(pg, settings, "p")
        assert row is not None and row["user_id"] == "fine"

        await pg.execute(f"ALTER TABLE {settings.qualified_table} DROP CONSTRAINT no_poison")
        before = _activity_rows()
        await manager.update_activity("p")
        await manager.flush()
        assert _activity_rows() == before
        row = await pg_row(pg, settings, "p")
        assert row is not None and (row["user_id"], row["request_count"]) == ("poison", 1)


async def test_a_rotated_session_is_written_whole_under_its_new_id(settings: Settings, pg: asyncpg.Connection,
                                                                   redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("old", data={"cart": [1]})
        await manager.update_activity("old")
        await manager.flush()
        before = _activity_rows()
        rotated = await manager.rotate("old")
        await manager.update_activity(rotated.session_id)
        await manager.flush()
        assert _activity_rows() == before
        row = await pg_row(pg, settings, rotated.session_id)
        assert row is not None and (row["session_data"], row["request_count"]) == ('{"cart": [1]}', 2)
        old = await pg_row(pg, settings, "old")
        assert old is not None and old["session_state"] == "removed"
        assert manager.flusher is not None
        assert await redis.hget(manager.flusher.hot.keys(rotated.session_id).session, _codec.KEPT) == b"1"
