"""The cold tier used on its own (the seed's direct-service API), against real PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tiered_sessions import InvalidSessionData, InvalidSessionId, PostgresSessionStore, Settings


@pytest.fixture(params=["direct", "pgbouncer-transaction-mode"])
async def store(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[PostgresSessionStore]:
    """Every store test runs on a direct connection and through PgBouncer in transaction mode."""
    if request.param != "direct":
        settings = dataclasses.replace(settings, database_url=request.getfixturevalue("pgbouncer_url"))
    async with PostgresSessionStore(settings=settings) as opened:
        yield opened


async def test_save_load_update_delete(store: PostgresSessionStore) -> None:
    assert await store.save_session("s1", {"a": 1}, metadata={"version": "1.0"}, user_id="u") == 1
    loaded = await store.load_session("s1")
    assert loaded is not None and loaded.data == {"a": 1} and loaded.metadata == {"version": "1.0"}
    assert await store.update_session_activity("s1", request_duration_ms=200) is True
    assert await store.update_session_activity("s1", request_duration_ms=50) is True
    loaded = await store.load_session("s1")
    assert loaded is not None and loaded.request_count == 2 and loaded.total_duration_ms == 250
    assert loaded.version == 3 and loaded.user_id == "u"
    assert await store.save_session("s1", {"b": 2}) == 4
    assert (await store.load_session("s1")).data == {"b": 2}  # type: ignore[union-attr]
    assert await store.delete_session("s1") is True
    assert await store.delete_session("s1") is False
    assert await store.load_session("s1") is None
    assert await store.update_session_activity("s1") is False
    assert await store.update_session_activity("missing") is False


async def test_list_sessions_pages_with_a_cursor(store: PostgresSessionStore) -> None:
    for i in range(25):
        await store.save_session(f"p{i:02d}", {"i": i}, state="closed" if i % 5 == 0 else "active")
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_sessions(limit=10, cursor=cursor)
        seen += [s.session_id for s in page]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"p{i:02d}" for i in range(25)]
    closed = await store.list_sessions(state="closed", limit=100)
    assert [s.session_id for s in closed] == ["p00", "p05", "p10", "p15", "p20"] and closed.next_cursor is None
    with pytest.raises(InvalidSessionData):
        await store.list_sessions(state="bogus")


async def test_cleanup_marks_expired_and_purges_old_rows(store: PostgresSessionStore, settings: Settings,
                                                         pg: asyncpg.Connection) -> None:
    await store.save_session("live", {})
    await store.save_session("timed-out", {}, timeout_secs=0)
    await store.save_session("old-tombstone", {})
    await store.delete_session("old-tombstone")
    await pg.execute(f"UPDATE {settings.qualified_table} SET updated_at = now() - interval '8 days' "
                     "WHERE session_id = 'old-tombstone'")
    assert await store.cleanup_expired_sessions(older_than_days=7) == 1
    rows = await pg.fetch(f"SELECT session_id, session_state FROM {settings.qualified_table}")
    states = {row["session_id"]: row["session_state"] for row in rows}
    assert states == {"live": "active", "timed-out": "expired"}


async def test_store_refuses_bad_input(store: PostgresSessionStore) -> None:
    with pytest.raises(InvalidSessionId):
        await store.save_session("bad id", {})
    with pytest.raises(InvalidSessionData):
        await store.save_session("ok", {"x": float("nan")})
    with pytest.raises(InvalidSessionData):
        await store.save_session("ok", {"x": 1}, state="weird")
    assert await store.load_session("ok") is None
