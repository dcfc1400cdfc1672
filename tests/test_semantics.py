"""Session semantics on real Redis and Postgres: field-level edits, compare-and-set, rotation, the per-user
index and lifecycle events."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import redis.asyncio as aioredis

from tiered_sessions import InvalidSessionData, SessionManager, SessionNotFound, Settings, VersionConflict
from tiered_sessions.events import SessionEvent

from .helpers import pg_row


async def test_concurrent_edits_of_different_keys_all_survive(manager: SessionManager, settings: Settings,
                                                              pg: asyncpg.Connection) -> None:
    await manager.ensure("cart", data={"cart": {"owner": "u1"}, "drop": 1, "keep": {"a": 1, "b": 2}})
    # Fifty requests at once, each adding its own item inside the same top-level object.
    await asyncio.gather(*(manager.update("cart", set={f"cart.items.i{i}": i}) for i in range(50)),
                         manager.update("cart", unset=["drop", "keep.a"], set={"flag": True}))
    session = await manager.get("cart")
    assert session is not None
    assert session.data["cart"]["items"] == {f"i{i}": i for i in range(50)}
    assert session.data["cart"]["owner"] == "u1" and session.data["keep"] == {"b": 2}
    assert "drop" not in session.data and session.data["flag"] is True
    await manager.flush()
    row = await pg_row(pg, settings, "cart")
    assert row is not None and json.loads(row["session_data"]) == session.data  # the merged document, once


async def test_edits_are_validated_before_anything_is_written(manager: SessionManager) -> None:
    session = await manager.ensure("edits", data={"scalar": 5})
    version = session.version
    for bad in ({"set": {"scalar.inner": 1}}, {"set": {"a..b": 1}}, {"set": {"x": float("nan")}},
                {"set": {"k": 1}, "unset": ["k"]}, {"set": {"k": 1, "k.j": 2}}, {"unset": "k"}):
        with pytest.raises(InvalidSessionData):
            await manager.update("edits", **bad)
    edited = await manager.get("edits")
    assert edited is not None and edited.version == version
    await manager.update("edits", unset=["missing.path", "also_missing"])  # deleting nothing is fine


async def test_expected_version_guards_against_lost_updates(manager: SessionManager) -> None:
    session = await manager.ensure("cas", data={"n": 0})
    seen = session.version
    assert await manager.update("cas", data={"n": 1}, expected_version=seen) == seen + 1
    with pytest.raises(VersionConflict) as conflict:
        await manager.update("cas", data={"n": 99}, expected_version=seen)
    assert conflict.value.current_version == seen + 1
    assert (await manager.get("cas")).data == {"n": 1}  # type: ignore[union-attr]
    assert session.version == seen + 1  # the held object shows the version the last call saw


async def test_rotate_moves_everything_and_kills_the_old_id(manager: SessionManager, settings: Settings,
                                                            pg: asyncpg.Connection, redis: aioredis.Redis) -> None:
    old = await manager.ensure("before-login", data={"cart": [1, 2]}, user_id="alice")
    for _ in range(3):
        await manager.update_activity("before-login", request_duration_ms=10)
    new = await manager.rotate("before-login")
    assert new.session_id != "before-login" and old.state == "removed"
    assert (new.data, new.request_count, new.total_duration_ms, new.user_id) == ({"cart": [1, 2]}, 3, 30, "alice")
    assert abs(new.expires_at - old.expires_at) < 0.01 and new.created_at == old.created_at
    assert await manager.get("before-login") is None
    assert await manager.update_activity("before-login") is False
    with pytest.raises(SessionNotFound):
        await manager.rotate("before-login")
    await manager.flush()
    assert (await pg_row(pg, settings, "before-login"))["session_state"] == "removed"  # type: ignore[index]
    await redis.flushall()
    assert await manager.get("before-login") is None  # dead in both tiers
    assert (await manager.get(new.session_id)).data == {"cart": [1, 2]}  # type: ignore[union-attr]
    fresh = await manager.ensure("before-login")
    assert fresh.data == {} and fresh.session_id == "before-login"  # a new, empty life


async def test_per_user_index_from_redis_and_from_postgres(manager: SessionManager, settings: Settings,
                                                           pg: asyncpg.Connection, redis: aioredis.Redis) -> None:
    mine = [(await manager.ensure(user_id="bob")).session_id for _ in range(6)]
    await manager.ensure(user_id="carol")
    moved = await manager.ensure(user_id="carol")
    await manager.update(moved.session_id, user_id="bob")  # ownership change moves it in the index
    listed = await manager.list_user_sessions("bob")
    assert {s.session_id for s in listed} == {*mine, moved.session_id}
    assert [s.created_at for s in listed] == sorted(s.created_at for s in listed)
    await manager.flush()
    await redis.flushall()
    cold = await manager.list_user_sessions("bob")  # Redis lost everything: Postgres answers
    assert {s.session_id for s in cold} == {*mine, moved.session_id}
    assert await manager.revoke_user_sessions("bob") == 7
    assert await manager.list_user_sessions("bob") == []
    assert len(await manager.list_user_sessions("carol")) == 1
    await manager.flush()
    rows = await pg.fetch(f"SELECT session_id, session_state FROM {settings.qualified_table} "
                          "WHERE session_id = ANY($1::text[])", [*mine, moved.session_id])
    states = {row["session_id"]: row["session_state"] for row in rows}
    assert set(states.values()) == {"removed"} and len(states) == 7  # tombstones keep no user data


async def test_dirty_sessions_of_a_user_are_found_across_many_scan_steps(settings: Settings) -> None:
    # One partition of 240 dirty sessions: past 128 entries a sorted set is a hashtable, which ZSCAN walks a
    # few entries (COUNT) at a time.
    async with SessionManager(settings=settings, run_flusher=False, partitions=1) as manager:
        owned = {(await manager.ensure(user_id="zed")).session_id for _ in range(40)}
        await asyncio.gather(*(manager.ensure(user_id="other") for _ in range(200)))
        assert manager.flusher is not None
        hot = manager.flusher.hot
        assert set(await hot.dirty_ids_of_user("zed", page=3)) == owned
        await manager.flush()
        assert await hot.dirty_ids_of_user("zed", page=3) == []
        assert {s.session_id for s in await manager.list_user_sessions("zed")} == owned  # from Postgres now


async def test_per_user_listing_follows_an_owner_change_postgres_has_not_seen(manager: SessionManager,
                                                                              pg: asyncpg.Connection,
                                                                              settings: Settings) -> None:
    """Postgres still says carol (the row is flushed), Redis says dave (dirty): Redis's copy wins."""
    session = await manager.ensure(user_id="carol")
    await manager.flush()
    await manager.update(session.session_id, user_id="dave")
    assert (await pg_row(pg, settings, session.session_id))["user_id"] == "carol"  # type: ignore[index]
    assert await manager.list_user_sessions("carol") == []
    assert [s.session_id for s in await manager.list_user_sessions("dave")] == [session.session_id]
    await manager.flush()
    assert [s.session_id for s in await manager.list_user_sessions("dave")] == [session.session_id]


async def test_lifecycle_events_come_from_the_data(settings: Settings) -> None:
    events: list[SessionEvent] = []

    async with SessionManager(settings=settings, session_timeout_secs=0.3, run_flusher=False) as manager:
        @manager.on_created
        async def created(event: SessionEvent) -> None:
            events.append(event)

        @manager.on_removed
        async def removed(event: SessionEvent) -> None:
            events.append(event)

        @manager.on_expired
        async def expired(event: SessionEvent) -> None:
            events.append(event)

        async def broken(event: SessionEvent) -> None:
            raise RuntimeError("a buggy listener")

        manager.on_created(broken)
        await manager.ensure("e-removed", data={"x": 1})
        await manager.ensure("e-expires", data={"y": 2})
        await manager.remove("e-removed")
        await asyncio.sleep(0.35)
        await manager.flush()  # writes the tombstone and the expired row: their events fire
        await asyncio.sleep(0.05)
    kinds = sorted((e.kind, e.session_id) for e in events)
    assert ("created", "e-expires") in kinds and ("created", "e-removed") in kinds
    assert ("removed", "e-removed") in kinds and ("expired", "e-expires") in kinds
    last = next(e for e in events if e.kind == "expired")
    assert last.session is not None and last.session.data == {"y": 2}


async def test_cleanup_reports_sessions_that_expired_after_their_flush(settings: Settings) -> None:
    expired: list[str] = []
    async with SessionManager(settings=settings, session_timeout_secs=0.3) as manager:
        async def record(event: SessionEvent) -> None:
            expired.append(event.session_id)

        manager.on_expired(record)
        await manager.ensure("lapses")
        await manager.flush()  # clean: Redis will just let it expire, no flush will see it
        await asyncio.sleep(0.4)
        assert await manager.cleanup_stale_sessions() >= 1
        await asyncio.sleep(0.05)
    assert "lapses" in expired


async def test_events_of_the_final_drain_are_delivered_before_close_returns(settings: Settings) -> None:
    """close() drains what its flusher owns: the tombstones it writes then fire ``removed`` before it returns,
    not in tasks left to a loop that may be closing."""
    removed: list[str] = []
    manager = SessionManager(settings=settings, flush_interval_secs=3600)  # nothing flushed before close

    @manager.on_removed
    async def record(event: SessionEvent) -> None:
        await asyncio.sleep(0.2)  # a listener that takes a while (a webhook, say)
        removed.append(event.session_id)

    await manager.ensure("drained-at-close")
    await manager.remove("drained-at-close")
    await manager.close()
    assert removed == ["drained-at-close"]
