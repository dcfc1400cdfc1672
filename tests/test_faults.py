"""Faults on real, test-owned processes: a flusher SIGKILLed mid-batch, PostgreSQL down under write load,
Redis restarted cold. Every acknowledged write is accounted for."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import time
from collections import Counter

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tiered_sessions import SessionManager, Settings
from tiered_sessions.embedded import PostgresServer, RedisServer
from tiered_sessions.errors import BackendUnavailable, PostgresUnavailable
from tiered_sessions.migrate import migrate

from .helpers import pg_rows, touch_load, until
from .test_cli import _env


def _activity_rows() -> float:
    return REGISTRY.get_sample_value("tiered_sessions_flushed_rows_total", {"kind": "activity"}) or 0.0


async def test_flusher_sigkilled_mid_batch_loses_nothing(settings: Settings, pg: asyncpg.Connection) -> None:
    ids = [f"k-{i}" for i in range(300)]
    acked: Counter[str] = Counter()
    stop = asyncio.Event()
    env = {**os.environ, **_env(settings), "TIERED_SESSIONS_FLUSH_BATCH_SIZE": "40",
           "TIERED_SESSIONS_FLUSH_INTERVAL_SECS": "0.01"}
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        for sid in ids:
            await manager.ensure(sid)
        load = [asyncio.create_task(touch_load(manager, ids, acked, stop)) for _ in range(8)]
        kills = 0
        for _ in range(8):
            flusher = await asyncio.create_subprocess_exec(sys.executable, "-m", "tiered_sessions.cli", "flusher",
                                                           env=env, stderr=asyncio.subprocess.DEVNULL)
            await asyncio.sleep(random.uniform(0.8, 1.5))  # it starts (~0.5 s) and flushes for a while
            flusher.send_signal(signal.SIGKILL)
            await flusher.wait()
            kills += flusher.returncode == -signal.SIGKILL
        stop.set()
        await asyncio.gather(*load)
        assert kills == 8
        written_before_final = len(await pg_rows(pg, settings))
        assert written_before_final > 0  # the killed flushers did write
        assert await manager.flush() == 0  # a new flusher finishes the job
    rows = await pg_rows(pg, settings)
    assert sum(acked.values()) > 1000
    for sid in ids:
        assert rows[sid]["request_count"] == acked[sid], sid  # nothing lost, nothing counted twice


async def test_postgres_down_under_write_load(redis_url: str, own_postgres: PostgresServer,
                                              caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix="pgdown",
                        flush_interval_secs=0.05, max_concurrent_sessions=None, socket_timeout_secs=2,
                        drain_timeout_secs=1)
    await migrate(settings)
    ids = [f"d-{i}" for i in range(100)]
    acked: Counter[str] = Counter()
    stop = asyncio.Event()
    manager = SessionManager(settings=settings)
    for sid in ids:
        await manager.ensure(sid)
    await manager.flush()
    load = [asyncio.create_task(touch_load(manager, ids, acked, stop)) for _ in range(4)]
    own_postgres.kill()
    await asyncio.sleep(2.0)  # writes keep landing in Redis while the flusher retries with backoff
    metrics = await manager.get_session_metrics()
    assert metrics["dirty_sessions"] > 0 and metrics["flush_lag_seconds"] > 0.5
    assert sum(acked.values()) > 200
    # A new session with a random id needs no Postgres; one with a caller's id does (it may exist there).
    assert (await manager.ensure()).version == 1
    stop.set()
    await asyncio.gather(*load)
    caplog.set_level(logging.WARNING, logger="tiered_sessions")
    await manager.close()  # cannot drain: says how many it leaves in Redis
    assert any("still dirty" in r.getMessage() or "drain on close failed" in r.getMessage()
               for r in caplog.records)
    own_postgres.start()
    activity_before = _activity_rows()
    async with SessionManager(settings=settings) as recovered:
        assert await recovered.flush() == 0
        # The touches since the last whole write go out as activity rows (counters only): that path, too,
        # must account for every acknowledged write after the outage.
        assert _activity_rows() > activity_before
        metrics = await recovered.get_session_metrics()
        assert metrics["dirty_sessions"] == 0
    connection = await asyncpg.connect(own_postgres.url)
    try:
        rows = await connection.fetch("SELECT session_id, request_count FROM public.sessions")
        counts = {row["session_id"]: row["request_count"] for row in rows}
    finally:
        await connection.close()
    for sid in ids:
        assert counts[sid] == acked[sid], sid


async def test_a_pooled_connection_caught_in_a_shutdown_is_postgres_unavailable(manager: SessionManager,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    """The driver's error for a pooled connection its server was terminating (asyncpg#784) is the tier's named
    PostgresUnavailable, every time (the test below meets it only when a stop lands in its window)."""
    assert manager._tiers is not None and manager._tiers.store is not None
    store = manager._tiers.store

    async def terminating(_ids: object) -> object:
        raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")

    monkeypatch.setattr(store, "fetch_many", terminating)
    with pytest.raises(PostgresUnavailable, match="during get"):
        await manager.get("never-written")


async def test_reads_in_flight_while_postgres_shuts_down_raise_only_named_errors(
        redis_url: str, own_postgres: PostgresServer) -> None:
    """Read-throughs (misses, ensure of a caller's id) in flight while PostgreSQL shuts down fail with
    PostgresUnavailable, never a driver error: a pooled connection whose server just said "terminating" can be
    handed out before its socket closes, and asyncpg then raises InternalClientError (MagicStack/asyncpg#784)."""
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix="pgstop",
                        max_concurrent_sessions=None, socket_timeout_secs=2, drain_timeout_secs=1)
    await migrate(settings)
    unnamed: Counter[str] = Counter()
    named = 0

    async def reader(manager: SessionManager, task: int, stop: asyncio.Event) -> None:
        nonlocal named
        call = 0
        while not stop.is_set():
            call += 1
            try:
                if call % 2:
                    await manager.get(f"miss-{task}-{call}")
                else:
                    await manager.ensure(f"new-{task}-{call}")
            except BackendUnavailable:
                named += 1
            except Exception as exc:  # noqa: BLE001 - what the test is about
                unnamed[type(exc).__name__] += 1

    for attempt in range(6):  # the window is a few milliseconds: several stops, each at another moment
        async with SessionManager(settings=settings) as manager:
            stop = asyncio.Event()
            readers = [asyncio.create_task(reader(manager, task, stop)) for task in range(16)]
            await asyncio.sleep(0.3 + 0.05 * attempt)
            await asyncio.to_thread(own_postgres.stop)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*readers)
            own_postgres.start()
    assert named > 0, "the readers never met the outage"
    assert not unnamed, f"driver errors escaped the manager: {dict(unnamed)}"


async def test_redis_restarted_cold_serves_everything_flushed(own_redis: RedisServer, settings: Settings,
                                                             pg: asyncpg.Connection) -> None:
    settings = Settings(**{**{f: getattr(settings, f) for f in ("database_url", "schema", "key_prefix")},
                           "redis_url": own_redis.url, "flush_interval_secs": 0.05,
                           "max_concurrent_sessions": None, "socket_timeout_secs": 2})
    ids = [f"c-{i}" for i in range(200)]
    async with SessionManager(settings=settings) as manager:
        for sid in ids:
            await manager.ensure(sid, data={"sid": sid})
            await manager.update_activity(sid, request_duration_ms=5)
        assert await manager.flush() == 0
        flushed = {sid: row["version"] for sid, row in (await pg_rows(pg, settings)).items()}
        assert len(flushed) == 200
        # Writes after the last flush are the durability window a Redis crash can lose.
        await manager.update_activity(ids[0])
        own_redis.kill()
        own_redis.restart()  # no persistence configured: it comes back empty
        # Every flushed session is served from Postgres; the manager reconnects by itself.
        served = 0
        for sid in ids:
            for _attempt in range(3):
                try:
                    session = await manager.get(sid)
                    break
                except BackendUnavailable:  # calls already on a dead connection fail once
                    await asyncio.sleep(0.05)
            assert session is not None and session.data == {"sid": sid}
            assert session.version >= flushed[sid]
            served += 1
        assert served == 200
        assert await manager.update_activity(ids[1]) is True
        # The live counts died with Redis; each session put back from Postgres (read-through or recovery)
        # is counted once again.
        await manager.recover_all_sessions()
        assert manager.flusher is not None
        assert await manager.flusher.hot.live_count(int(time.time() * 1000)) == 200


async def test_recovery_that_loses_redis_raises_the_named_error(own_redis: RedisServer, database_url: str) -> None:
    """recover_all_sessions() warms a page while it reads the next: Redis lost meanwhile is RedisUnavailable,
    as for any call, not the group of the two tasks' errors."""
    settings = Settings(redis_url=own_redis.url, database_url=database_url, key_prefix="recoverlost",
                        schema="recoverlost", max_concurrent_sessions=None, socket_timeout_secs=2)
    await migrate(settings)
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        for i in range(30):
            await manager.ensure(f"r-{i}")
        assert await manager.flush() == 0
        own_redis.stop()
        with pytest.raises(BackendUnavailable, match="recover_all_sessions"):
            await manager.recover_all_sessions(page_size=10)
        own_redis.start()



async def test_a_read_through_that_fails_after_its_caller_gave_up_is_logged_and_counted(
        redis_url: str, own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """The load a miss starts outlives a caller that gives up (its other callers share it); if it then fails,
    no caller reports it, so the load itself does (once), instead of dropping the error."""
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix="gaveup",
                        max_concurrent_sessions=None, socket_timeout_secs=1)
    await migrate(settings)

    def failed_loads() -> float:
        return REGISTRY.get_sample_value("tiered_sessions_backend_errors_total",
                                         {"backend": "postgres", "operation": "read_through"}) or 0.0

    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("cold-one")
        assert await manager.flush() == 0
        await manager.flusher.hot.delete("cold-one")  # type: ignore[union-attr]  # Redis lost it: a miss
        before = failed_loads()
        own_postgres.pause()  # the load's query waits out its 1 s timeout
        try:
            reader = asyncio.create_task(manager.get("cold-one"))
            await asyncio.sleep(0.2)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            await until(lambda: failed_loads() == before + 1, timeout=5)
        finally:
            own_postgres.resume()
        assert sum("read-through of session cold-one failed" in r.getMessage() for r in caplog.records) == 1
        assert (await manager.get("cold-one")) is not None  # a later miss loads it afresh
