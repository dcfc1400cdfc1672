"""The write-behind promises against real servers: flush, coalescing, pinning, cold reads, deletes that
stick, recovery after Redis loses everything."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings
from tiered_sessions.cold_tier import PostgresSessionStore, Refusal

from .helpers import pg_row, pg_rows


async def test_seed_integration_story(settings: Settings, redis: aioredis.Redis) -> None:
    """Create with one manager, flush, read with a second manager; again after FLUSHALL."""
    async with SessionManager(settings=settings) as first:
        session = await first.ensure("test-123", data={"cart": [1, 2]}, user_id="u-1")
        await first.update_activity("test-123", request_duration_ms=200)
        await first.flush()
    async with SessionManager(settings=settings) as second:
        recovered = await second.get("test-123")
        assert recovered is not None and recovered.data == {"cart": [1, 2]} and recovered.request_count == 1
        await redis.flushall()
        cold = await second.get("test-123")
        assert cold is not None
        assert (cold.data, cold.user_id, cold.request_count, cold.total_duration_ms, cold.version) == \
            ({"cart": [1, 2]}, "u-1", 1, 200, session.version)


async def test_flush_writes_rows_and_acks(manager: SessionManager, settings: Settings,
                                          pg: asyncpg.Connection, redis: aioredis.Redis) -> None:
    session = await manager.ensure("f1", data={"n": 1}, metadata={"m": "x"}, ip_address="1.2.3.4")
    await manager.update_activity("f1", request_duration_ms=30)
    assert await manager.flush() == 0
    after = await manager.get_session_metrics()
    assert after["dirty_sessions"] == 0 and after["flush_lag_seconds"] == 0
    row = await pg_row(pg, settings, "f1")
    assert row is not None
    assert row["version"] == session.version == 2
    assert row["request_count"] == 1 and row["total_duration_ms"] == 30
    assert row["session_state"] == "active" and row["ip_address"] == "1.2.3.4"
    assert abs(row["expires_at"].timestamp() - session.expires_at) < 0.002
    metrics = await manager.get_session_metrics()
    assert metrics["dirty_sessions"] == 0 and metrics["flush_lag_seconds"] == 0.0


async def test_flushed_rows_keep_every_character(manager: SessionManager, settings: Settings,
                                                  pg: asyncpg.Connection) -> None:
    """The flusher's rows are JSON built in Lua from the hash: keys and strings that need escaping, unicode,
    nesting and empty documents reach Postgres unchanged."""
    data = {'q"uote': 'a\\b "c"\n\t/', "é日本": {"nested": ["ü", 1.5, None, True, {}]}, "": [], "n": -(2**63)}
    metadata = {"k/ey": "\u2028", "e": {}}
    agent = 'Mozilla/5.0 "quoted" \\ back\tslash é'
    await manager.ensure("chars", data=data, metadata=metadata, user_id="u\"1", user_agent=agent)
    await manager.ensure("bare")
    await manager.flush()
    row = await pg_row(pg, settings, "chars")
    assert row is not None
    assert orjson.loads(row["session_data"]) == data and orjson.loads(row["metadata"]) == metadata
    assert (row["user_id"], row["user_agent"], row["user_type"], row["ip_address"]) == ('u"1', agent, None, None)
    bare = await pg_row(pg, settings, "bare")
    assert bare is not None and (bare["session_data"], bare["metadata"], bare["user_id"]) == ("{}", "{}", None)


async def test_many_updates_coalesce_into_one_row_write(settings: Settings, pg: asyncpg.Connection) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("hot")
        await asyncio.gather(*(manager.update_activity("hot", request_duration_ms=1) for _ in range(200)))
        assert manager.flusher is not None
        await manager.flush()
        assert manager.flusher.totals.written == 1
    row = await pg_row(pg, settings, "hot")
    assert row is not None and row["request_count"] == 200 and row["version"] == 201


async def test_dirty_session_is_pinned_until_acked(settings: Settings, redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, run_flusher=False, session_timeout_secs=30) as manager:
        await manager.ensure("pin")
        assert manager.flusher is not None
        key = manager.flusher.hot.keys("pin").session
        assert await redis.pttl(key) == -1  # no TTL while dirty
        await manager.flush()
        assert 0 < await redis.pttl(key) <= 30_000  # the ack applied the real expiry


async def test_a_write_while_its_batch_is_in_postgres_stays_dirty(settings: Settings, pg: asyncpg.Connection,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The ack clears a dirty mark only at the version it wrote: a touch that lands while the batch is being
    written keeps the session dirty, and the next pass writes it."""
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("raced")
        assert manager.flusher is not None
        store = manager.flusher.cold
        upsert = store.upsert_batch
        touched: list[bool] = []

        async def upsert_then_touch(rows: list[Any]) -> dict[str, Refusal]:
            refused = await upsert(rows)
            if not touched:  # once: between this batch's claim and its ack
                touched.append(await manager.update_activity("raced"))
            return refused

        monkeypatch.setattr(store, "upsert_batch", upsert_then_touch)
        left = await manager.flush()
        assert touched == [True]
        row = await pg_row(pg, settings, "raced")
        # The touch is durable, or the flush says one session is not (it came after the flush began)
        assert row is not None and (row["request_count"] == 1 or left == 1), (row, left)
        assert await manager.flush() == 0
        row = await pg_row(pg, settings, "raced")
        assert row is not None and row["request_count"] == 1 and row["version"] == 2


async def test_expiry_shorter_than_flush_interval_is_still_flushed(settings: Settings, pg: asyncpg.Connection,
                                                                    redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, run_flusher=False, session_timeout_secs=0.2) as manager:
        await manager.ensure("brief", data={"last": "state"})
        await manager.update_activity("brief", request_duration_ms=9)
        await asyncio.sleep(0.4)  # expired logically, but still dirty: still in Redis
        assert await manager.get("brief") is None
        assert await redis.exists(manager.flusher.hot.keys("brief").session) == 1  # type: ignore[union-attr]
        await manager.flush()
        assert await redis.exists(manager.flusher.hot.keys("brief").session) == 0  # type: ignore[union-attr]
    row = await pg_row(pg, settings, "brief")
    assert row is not None
    assert row["session_state"] == "expired" and row["request_count"] == 1
    assert row["session_data"] == '{"last": "state"}'


async def test_remove_sticks_through_flush_flushall_and_late_writes(settings: Settings, pg: asyncpg.Connection,
                                                                    redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings) as manager:
        old = await manager.ensure("doomed", data={"secret": 1})
        await manager.flush()
        stale_version = old.version
        await manager.remove("doomed")
        await manager.flush()
        row = await pg_row(pg, settings, "doomed")
        assert row is not None and row["session_state"] == "removed" and row["session_data"] == "{}"
        # A late flush of the old version (a slow flusher) must not bring it back.
        assert manager.store is not None
        now_ms = int(time.time() * 1000)
        late = orjson.dumps({"i": "doomed", "d": {"secret": 1}, "s": "active", "c": now_ms, "la": now_ms,
                             "ex": now_ms + 3_600_000, "rc": 0, "td": 0, "m": {}, "v": stale_version})
        refused = await manager.store.upsert_batch([late])
        assert refused == {"doomed": Refusal(row["version"], False)}  # reported, not durable
        await redis.flushall()
        assert await manager.get("doomed") is None
        again = await manager.ensure("doomed")
        assert again.data == {} and again.version > row["version"]


async def test_remove_of_a_session_only_postgres_knows(settings: Settings, pg: asyncpg.Connection,
                                                       redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings) as manager:
        await manager.ensure("cold-remove", data={"a": 1})
        await manager.flush()
        await redis.flushall()
        await manager.remove("cold-remove")
        await manager.flush()
        row = await pg_row(pg, settings, "cold-remove")
        assert row is not None and row["session_state"] == "removed"
        assert await manager.get("cold-remove") is None


async def test_cold_read_restores_remaining_ttl_and_counts(settings: Settings, redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, session_timeout_secs=120) as manager:
        session = await manager.ensure("ttl")
        await manager.update_activity("ttl", request_duration_ms=5)
        await manager.flush()
        expires_at = session.expires_at
        await redis.flushall()
        warmed = await manager.get("ttl")
        assert warmed is session  # the held object is refreshed, not replaced
        assert abs(warmed.expires_at - expires_at) < 0.002
        ttl = await redis.pttl(manager.flusher.hot.keys("ttl").session)  # type: ignore[union-attr]
        assert 100_000 < ttl <= 120_000
        # The read-through put it back: the next read is a Redis hit with the same data.
        assert await manager.update_activity("ttl") is True
        assert session.request_count == 2


async def test_a_cold_read_serves_what_redis_then_holds(settings: Settings, redis: aioredis.Redis) -> None:
    # The read-through builds what it serves from the row it wrote into Redis, not from a second read of it.
    data = {"name": "Zoë 🎉", "nested": {"list": [1, 2.5, None, True]}, "big": 2**62, "quote": 'a"b\\c'}
    async with SessionManager(settings=settings) as manager:
        await manager.ensure("exact", data=data, user_id="u-1", user_type="admin", ip_address="2001:db8::1",
                             user_agent="Agent/1.0 (ü)")
        await manager.update("exact", metadata={"m": {"k": "v"}})
        await manager.update_activity("exact", request_duration_ms=7)
        await manager.flush()
    await redis.flushall()
    async with SessionManager(settings=settings) as cold:
        served = await cold.get("exact")
    async with SessionManager(settings=settings) as hot:
        held = await hot.get("exact")  # from Redis: the read-through put it there
    assert served is not None and held is not None
    assert dataclasses.asdict(served) == dataclasses.asdict(held)
    assert served.data == data and served.metadata == {"m": {"k": "v"}} and served.user_agent == "Agent/1.0 (ü)"
    assert served.request_count == 1 and served.total_duration_ms == 7 and served.version >= 3


async def test_update_activity_and_update_after_flushall_read_through(settings: Settings,
                                                                      redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings) as manager:
        await manager.ensure("rt", data={"a": 1})
        await manager.flush()
        await redis.flushall()
        assert await manager.update_activity("rt", request_duration_ms=3) is True
        await redis.flushall()
        await manager.update("rt", data={"b": 2})
        session = await manager.get("rt")
        assert session is not None and session.data == {"a": 1, "b": 2}


async def test_recover_all_sessions_after_flushall(settings: Settings, pg: asyncpg.Connection,
                                                   redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings) as manager:
        ids = [(await manager.ensure(data={"i": i})).session_id for i in range(250)]
        await manager.remove(ids[0])
        await manager.flush()
        await redis.flushall()
        # A write that reached Redis after the wipe must not be overwritten by recovery.
        newer = await manager.ensure(ids[1])
        await manager.update(ids[1], data={"i": "newer"})
        progress: list[tuple[int, int]] = []
        recovered = await manager.recover_all_sessions(lambda done, total: progress.append((done, total)),
                                                       page_size=100)
        assert recovered == 248  # 249 live in Postgres, one of them already back in Redis
        assert progress[-1] == (249, 249) and len(progress) == 3
        assert set(await manager.list_ids()) == set(ids[1:])
        assert newer.data == {"i": "newer"}
        assert (await manager.get(ids[1])) is newer and newer.data == {"i": "newer"}
    assert len(await pg_rows(pg, settings)) == 250


async def test_recovery_keeps_what_redis_holds_and_counts_each_live_session_once(
        settings: Settings, redis: aioredis.Redis) -> None:
    # Two partitions of about 150 sessions each: a partition's page goes out as more than one warm_page.lua
    # call (WARM_PAGE_SESSIONS).
    settings = dataclasses.replace(settings, partitions=2)
    async with SessionManager(settings=settings) as manager:
        ids = [(await manager.ensure(data={"i": i})).session_id for i in range(300)]
        await manager.update(ids[2], closed=True)  # closed: live until it times out, so counted
        await manager.flush()
        await redis.flushall()
        await manager.update(ids[1], data={"i": "newer"})  # read through, then written: Redis's copy is newer
        recovered = await manager.recover_all_sessions()
        assert recovered == 299 and manager.flusher is not None
        hot = manager.flusher.hot
        assert await redis.hget(hot.keys(ids[1]).session, "d:i") == b'"newer"'
        assert await hot.live_count(int(time.time() * 1000)) == 300
    async with SessionManager(settings=settings) as fresh:
        for i, sid in enumerate(ids):
            session = await fresh.get(sid)
            assert session is not None and session.data == {"i": "newer" if i == 1 else i}
            assert session.state == ("closed" if i == 2 else "active")


async def test_close_drains_and_run_flusher_false_leaves_work_for_a_flusher(settings: Settings,
                                                                            pg: asyncpg.Connection) -> None:
    manager = SessionManager(settings=settings, run_flusher=False)
    for i in range(20):
        await manager.ensure(f"later-{i}")
    await manager.close()
    assert await pg_rows(pg, settings) == {}
    flusher = SessionManager(settings=settings, flush_interval_secs=10)
    await flusher.start()
    await flusher.close()  # drains what is dirty, even though its loop never got to run
    assert len(await pg_rows(pg, settings)) == 20


async def test_background_flusher_writes_within_a_few_intervals(manager: SessionManager, settings: Settings,
                                                                pg: asyncpg.Connection) -> None:
    await manager.ensure("bg", data={"v": 1})
    deadline = time.monotonic() + 5
    while await pg_row(pg, settings, "bg") is None:
        assert time.monotonic() < deadline, "the background flusher never wrote the session"
        await asyncio.sleep(0.02)


async def test_each_batch_goes_to_postgres_in_session_id_order(settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two flushers writing the same rows lock them in the same order: no deadlock between them."""
    async with SessionManager(settings=dataclasses.replace(settings, run_flusher=False)) as manager:
        assert manager.store is not None
        ids = [f"order-{n:03d}" for n in range(200, 0, -1)]  # newest first: not the dirty index's order
        for sid in ids:
            await manager.ensure(sid)
        statements: list[list[str]] = []
        original = manager.store.upsert_batch

        async def recording(rows: list[bytes]) -> dict[str, Refusal]:
            statements.append([orjson.loads(row)["i"] for row in rows])
            return await original(rows)

        monkeypatch.setattr(manager.store, "upsert_batch", recording)
        assert await manager.flush() == 0
    assert sorted(sid for statement in statements for sid in statement) == sorted(ids)
    assert all(statement == sorted(statement) for statement in statements)
    assert any(len(statement) > 1 for statement in statements)


async def test_concurrent_read_throughs_share_one_postgres_query(settings: Settings, redis: aioredis.Redis,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted empty, every request misses: the misses of one loop turn are loaded with one query
    (session_id = ANY(...)), however many tasks miss, and each id once (single flight)."""
    async with SessionManager(settings=settings) as writer:
        ids = [(await writer.ensure(data={"n": n})).session_id for n in range(200)]
        assert await writer.flush() == 0
    await redis.flushdb()
    queries: list[str] = []
    for name in ("fetch", "fetchrow", "fetchval"):
        original = getattr(asyncpg.Pool, name)

        async def counted(pool: asyncpg.Pool, query: str, *args: object, _original: Any = original,
                          **kwargs: object) -> object:
            queries.append(query)
            return await _original(pool, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Pool, name, counted)
    async with SessionManager(settings=settings, run_flusher=False) as reader:
        queries.clear()
        sessions = await asyncio.gather(*(reader.get(sid) for sid in ids + ids[:50]))  # 50 asked twice
    assert [s.data["n"] for s in sessions if s is not None] == list(range(200)) + list(range(50))
    loads = [query for query in queries if "session_id" in query]
    assert len(loads) <= 3, f"{len(loads)} Postgres queries for 250 concurrent misses"


async def test_a_cancelled_reader_does_not_fail_the_others_waiting_on_the_same_load(
        settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers of one cold id share one load. The first reader giving up (a request timed out) must not hand
    its CancelledError to the readers still waiting."""
    async with SessionManager(settings=settings) as writer:
        await writer.ensure("shared-load", data={"n": 1})
        assert await writer.flush() == 0
    await redis.flushdb()
    original = PostgresSessionStore.fetch_many

    async def slow(self: PostgresSessionStore, session_ids: Any) -> Any:
        await asyncio.sleep(0.3)
        return await original(self, session_ids)

    monkeypatch.setattr(PostgresSessionStore, "fetch_many", slow)
    async with SessionManager(settings=settings, run_flusher=False) as reader:
        impatient = asyncio.create_task(reader.get("shared-load"))
        await asyncio.sleep(0.05)
        patient = asyncio.create_task(reader.get("shared-load"))
        await asyncio.sleep(0.05)
        impatient.cancel()
        session = await patient
        assert session is not None and session.data == {"n": 1}
