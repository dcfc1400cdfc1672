"""The seams between modes, on real servers: a journal left behind by a manager that closed while Redis was
unreachable, a Redis copy older than Postgres (restored from a backup), and a flush racing a journal replay.
Each ends with Postgres holding every acknowledged write and ``flush()`` telling the truth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tiered_sessions import ConfigurationError, RedisUnavailable, Session, SessionManager, SessionNotFound, Settings
from tiered_sessions.embedded import PostgresServer, RedisServer
from tiered_sessions.migrate import migrate

from . import ops_helpers as ops
from .helpers import pg_row, until
from .test_cli import _cli, _env


def _own(settings: Settings, server: RedisServer, **more: Any) -> Settings:
    fields: dict[str, Any] = {f: getattr(settings, f) for f in ("database_url", "schema", "key_prefix")}
    return Settings(**{**fields, "redis_url": server.url, "flush_interval_secs": 0.05,
                       "max_concurrent_sessions": None, "socket_timeout_secs": 1, "drain_timeout_secs": 5,
                       "redis_probe_interval_secs": 0.2, **more})


@pytest.fixture
def paused_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    with server:
        try:
            yield server
        finally:
            server.resume()  # never leave a stopped process behind a failed test


@contextlib.asynccontextmanager
async def _closes_while_frozen(own: Settings, server: RedisServer, sid: str) -> AsyncIterator[SessionManager]:
    """A manager whose Redis freezes (SIGSTOP: unreachable, data kept) before the block: the block's writes are
    written through to Postgres and journaled, and the manager closes with Redis still frozen, leaving its
    journal behind. The caller resumes Redis."""
    degraded = SessionManager(settings=own, drain_timeout_secs=1)
    await degraded.start()
    server.pause()
    try:
        with pytest.raises(RedisUnavailable):
            await degraded.get(sid)  # trips the breaker; a read: whether or not it ran, it changed nothing
        yield degraded
    finally:
        await degraded.close()


@contextlib.asynccontextmanager
async def _journal_held(own: Settings) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Another process replaying the journal (holding its advisory lock) until the yielded release is awaited."""
    lock = f"tiered_sessions:journal:{own.qualified_table}"
    holder = await asyncpg.connect(own.database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock(hashtext($1))", lock)

        async def release() -> None:
            await holder.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)

        yield release
    finally:
        await holder.close()


async def _base_then_journaled(own: Settings, server: RedisServer, sid: str) -> None:
    """``sid`` flushed with data {"base": 1}; then 3 touches and a merge of {"journaled": True} written through
    and left in the journal by a manager that closed while Redis was frozen; Redis resumed."""
    async with SessionManager(settings=own) as first:
        await first.ensure(sid, data={"base": 1})
        assert await first.flush() == 0
    async with _closes_while_frozen(own, server, sid) as degraded:
        for _ in range(3):
            assert await degraded.update_activity(sid) is True
        await degraded.update(sid, data={"journaled": True})
    server.resume()


async def _flushall(server: RedisServer) -> None:
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


class _RdbBackup:
    """A backup taken with SAVE and put back after a crash: Redis comes back as it was at ``mark()``."""

    def __init__(self) -> None:
        self.server = RedisServer()

    async def mark(self) -> None:
        client = aioredis.Redis.from_url(self.server.url)
        try:
            await client.save()
        finally:
            await client.aclose()
        shutil.copy(self.server.data_dir / "dump.rdb", self.server.data_dir.parent / "backup.rdb")

    def restore(self) -> None:
        self.server.kill()
        shutil.copy(self.server.data_dir.parent / "backup.rdb", self.server.data_dir / "dump.rdb")
        self.server.start()


class _AofTailLost:
    """An AOF that loses its tail in a crash (with appendfsync everysec, up to its last second): fsynced on every
    write here, so its length at ``mark()`` is a whole prefix, and the crash cuts it back to that length."""

    def __init__(self) -> None:
        self.server = RedisServer(appendonly=True, extra_args=["--appendfsync", "always"])
        self.cut: tuple[Path, int] | None = None

    async def mark(self) -> None:
        newest = max(self.server.data_dir.rglob("*.aof"), key=lambda path: path.stat().st_mtime)
        self.cut = newest, newest.stat().st_size

    def restore(self) -> None:
        assert self.cut is not None
        self.server.kill()
        path, size = self.cut
        with path.open("r+b") as aof:
            aof.truncate(size)
        self.server.start()


@pytest.fixture(params=[_RdbBackup, _AofTailLost], ids=["backup-restored", "aof-tail-lost"])
def older_redis(request: pytest.FixtureRequest) -> Iterator[_RdbBackup | _AofTailLost]:
    """A Redis that can come back older than Postgres after a crash."""
    restorable = request.param()
    with restorable.server:
        yield restorable


async def test_journal_of_a_manager_closed_while_degraded_is_replayed_by_the_next(
        settings: Settings, paused_redis: RedisServer, pg: asyncpg.Connection) -> None:
    own = _own(settings, paused_redis)
    sid = "journal-left-behind"
    async with SessionManager(settings=own) as first:
        await first.ensure(sid)
        for _ in range(5):
            assert await first.update_activity(sid) is True
        assert await first.flush() == 0
    acknowledged = 5

    async with _closes_while_frozen(own, paused_redis, sid) as degraded:
        for _ in range(3):
            assert await degraded.update_activity(sid) is True  # written through to Postgres, journaled
    acknowledged += 3
    listed = await asyncio.to_thread(_cli, "journal", "list", "--json", env=_env(own))  # Postgres alone answers
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    assert shown["pending"] == 3 and [entry["op"] for entry in shown["entries"]] == ["touch"] * 3
    assert all(entry["session_id"] == sid for entry in shown["entries"])
    paused_redis.resume()

    async with SessionManager(settings=own, run_flusher=False) as second:
        folded = await second.get(sid)  # its start folded the journal in: no flush has run yet
        assert folded is not None and folded.request_count == acknowledged
        for _ in range(5):
            assert await second.update_activity(sid) is True
        acknowledged += 5
        assert await second.flush() == 0
        row = await pg_row(pg, own, sid)
        assert row is not None and row["request_count"] == acknowledged
        session = await second.get(sid)
        assert session is not None and session.request_count == acknowledged
        pending = await pg.fetchval(f"SELECT count(*) FROM {own.qualified_journal}")
        assert pending == 0


async def test_flush_refused_by_a_newer_postgres_row_keeps_the_journaled_writes(
        settings: Settings, paused_redis: RedisServer, pg: asyncpg.Connection) -> None:
    """The exact interleaving: Redis's copy is flushed while journal entries it lacks are still pending (another
    replayer holds the journal), so Postgres is ahead and refuses it. Nothing is lost, and flush() says so."""
    own = _own(settings, paused_redis)
    sid = "refused-then-folded"
    await _base_then_journaled(own, paused_redis, sid)

    async with _journal_held(own) as release, SessionManager(settings=own, run_flusher=False) as second:
        assert await second.flush() > 0  # nothing dirty in Redis, but the journal is not folded in yet
        assert await second.update_activity(sid) is True  # Redis copy: version below Postgres's
        await second.update(sid, data={"after": 1})
        left = await second.flush()
        assert left > 0, "flush() reported durable while journaled writes were not in Redis's copy"
        await release()
        assert await second.flush() == 0  # folds the journal in, then writes the copy that has it all
        row = await pg_row(pg, own, sid)
        assert row is not None
        assert row["request_count"] == 3 + 1
        assert orjson_loads(row["session_data"]) == {"base": 1, "journaled": True, "after": 1}
        session = await second.get(sid)
        assert session is not None and session.request_count == 4
        assert session.version == row["version"]


def orjson_loads(value: object) -> object:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


async def test_journaled_writes_stay_durable_while_a_refused_copy_waits_for_the_replay(
        settings: Settings, paused_redis: RedisServer, pg: asyncpg.Connection) -> None:
    """A copy refused because it lacks pending journal entries is not rebased over them: written through and
    acknowledged, they stay in Postgres even if Redis is lost before the replay."""
    own = _own(settings, paused_redis)
    sid = "refused-then-lost"
    await _base_then_journaled(own, paused_redis, sid)
    async with _journal_held(own):
        async with SessionManager(settings=own, run_flusher=False, drain_timeout_secs=1) as second:
            assert await second.update_activity(sid) is True
            assert await second.flush() > 0
        await _flushall(paused_redis)  # Redis lost (no persistence) before anyone replayed the journal
    row = await pg_row(pg, own, sid)
    assert row is not None and row["request_count"] >= 3  # what was acknowledged as written through
    assert orjson_loads(row["session_data"]) == {"base": 1, "journaled": True}
    async with SessionManager(settings=own) as third:
        session = await third.get(sid)
        assert session is not None and session.data == {"base": 1, "journaled": True}
        assert session.request_count >= 3


async def test_a_copy_warmed_from_postgres_before_the_replay_counts_nothing_twice(
        settings: Settings, paused_redis: RedisServer, pg: asyncpg.Connection) -> None:
    """Redis comes back cold; a read warms the session from Postgres (which holds the journaled writes) while
    another process holds the journal; the replay that follows must apply none of them again."""
    own = _own(settings, paused_redis)
    sid = "warmed-first"
    async with SessionManager(settings=own) as first:
        await first.ensure(sid)
        for _ in range(2):
            assert await first.update_activity(sid) is True
        assert await first.flush() == 0
    async with _closes_while_frozen(own, paused_redis, sid) as degraded:
        for _ in range(3):
            assert await degraded.update_activity(sid) is True
    paused_redis.resume()
    await _flushall(paused_redis)  # back cold
    async with _journal_held(own) as release, SessionManager(settings=own, run_flusher=False) as second:
        warmed = await second.get(sid)  # read-through: Postgres has the 3 journaled touches
        assert warmed is not None and warmed.request_count == 5
        await release()
        assert await second.flush() == 0  # replays the journal onto the warmed copy: nothing applies
        session = await second.get(sid)
        assert session is not None and session.request_count == 5
    row = await pg_row(pg, own, sid)
    assert row is not None and row["request_count"] == 5


async def test_journal_replay_from_the_command_line(settings: Settings, paused_redis: RedisServer) -> None:
    own = _own(settings, paused_redis)
    sid = "replayed-by-hand"
    async with SessionManager(settings=own) as first:
        await first.ensure(sid)
        assert await first.flush() == 0
    async with _closes_while_frozen(own, paused_redis, sid) as degraded:
        assert await degraded.update_activity(sid) is True
    paused_redis.resume()
    replayed = await asyncio.to_thread(_cli, "journal", "replay", "--json", env=_env(own))
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"pending": 0}
    client = aioredis.Redis.from_url(paused_redis.url)
    try:
        keys = await client.keys(f"{own.key_prefix}:*:s:{sid}")
        assert len(keys) == 1 and await client.hget(keys[0], "rc") == b"1"  # folded into Redis's copy
    finally:
        await client.aclose()


async def test_redis_restored_from_an_older_copy_loses_no_later_write(
        settings: Settings, older_redis: _RdbBackup | _AofTailLost, pg: asyncpg.Connection) -> None:
    """Redis comes back older than Postgres (a backup, an AOF missing its last second, a lagging replica):
    every write acknowledged after that reaches Postgres, the refused flushes are not counted durable, and the
    tiers converge."""
    own = _own(settings, older_redis.server)
    ids = [f"restored-{i}" for i in range(6)]
    async with SessionManager(settings=own, run_flusher=False) as before:  # no leases in the backup
        for sid in ids:
            await before.ensure(sid, data={"k0": 0})
            for _ in range(2):
                await before.update_activity(sid)
        assert await before.flush() == 0
        await older_redis.mark()
        for sid in ids:  # durable in Postgres, then lost from Redis by the restore below
            for _ in range(4):
                await before.update_activity(sid)
            await before.update(sid, data={"lost": 1})
        assert await before.flush() == 0
    older_redis.restore()

    refused_before = _refused_total()
    async with SessionManager(settings=own, run_flusher=False) as after:  # flushes happen where the test says
        for sid in ids:  # fewer writes than Redis lost: the copy's version stays at or below Postgres's
            await after.update(sid, data={"after": 1})
            assert await after.update_activity(sid) is True
        assert await after.flush() == 0
        for sid in ids:  # touches only: the next flushes send activity rows, which must carry the data too
            for _ in range(6):
                assert await after.update_activity(sid) is True
        assert await after.flush() == 0
        for sid in ids:
            row = await pg_row(pg, own, sid)
            session = await after.get(sid)
            assert row is not None and session is not None
            assert orjson_loads(row["session_data"]) == {"k0": 0, "after": 1}, sid
            assert row["request_count"] == 2 + 1 + 6, sid  # the backup's, then every write after the restore
            assert session.request_count == row["request_count"] and session.version == row["version"]
            assert session.data == {"k0": 0, "after": 1}
    assert _refused_total() > refused_before  # the refusals were seen and counted, not taken as durable


def _refused_total() -> float:
    return REGISTRY.get_sample_value("tiered_sessions_flush_refused_total") or 0.0



async def test_a_key_of_the_wrong_type_is_quarantined_and_wedges_nothing(
        settings: Settings, redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    poisoned_before = REGISTRY.get_sample_value("tiered_sessions_poison_keys_total") or 0.0
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        hot = (await manager.dead_letters()).hot
        poison = "poison-1"
        keys = hot.keys(poison)
        neighbours = [sid for sid in (f"n-{i}" for i in range(400)) if hot.keys(sid).dirty == keys.dirty][:3]
        others = ["elsewhere-a", "elsewhere-b"]
        for sid in [*neighbours, *others]:
            await manager.ensure(sid, data={"ok": True})
        await redis.set(keys.session, "not a session")  # planted where a session hash belongs
        await redis.zadd(keys.dirty, {poison: 1})  # the oldest entry of its partition
        assert await manager.flush() == 0
        for sid in [*neighbours, *others]:
            row = await pg_row(pg, settings, sid)
            assert row is not None and orjson_loads(row["session_data"]) == {"ok": True}, sid
        assert await redis.zscore(keys.dirty, poison) is None
        assert await redis.exists(keys.session) == 0
        moved = [key if isinstance(key, bytes) else key.encode()
                 for key in await redis.keys(f"{settings.key_prefix}:*quarantine*")]
        assert len(moved) == 1 and await redis.get(moved[0]) == b"not a session"  # kept for inspection
        letters = await (await manager.dead_letters()).list()
        assert [letter.session_id for letter in letters] == [poison]
        assert "WRONGTYPE" in letters[0].reason and moved[0].decode() in letters[0].reason
        assert await pg_row(pg, settings, poison) is None
    assert (REGISTRY.get_sample_value("tiered_sessions_poison_keys_total") or 0.0) == poisoned_before + 1


async def test_a_process_with_another_partition_count_refuses_to_start(settings: Settings, redis: aioredis.Redis,
                                                                       ) -> None:
    async with SessionManager(settings=settings, partitions=16) as first:
        await first.ensure("laid-out")
        mismatched = SessionManager(settings=settings, partitions=8)
        with pytest.raises(ConfigurationError) as refused:
            await mismatched.start()
        assert "partitions 16" in str(refused.value) and "configured with 8" in str(refused.value)
        await mismatched.close()
        flusher = await asyncio.to_thread(_cli, "flusher", "--partitions", "8", env=_env(settings), timeout=60)
        assert flusher.returncode == 2 and "LayoutMismatch" in flusher.stdout + flusher.stderr  # a ConfigurationError
        assert "partitions 16" in flusher.stdout + flusher.stderr
        # Redis lost its record (a cold restart): the table's record still refuses the stray layout.
        await redis.delete(f"{settings.key_prefix}:layout")
        with pytest.raises(ConfigurationError, match="partitions 16"):
            await SessionManager(settings=settings, partitions=8).start()
        # Another key prefix on the same table: two tiers would write one table with unrelated versions.
        with pytest.raises(ConfigurationError, match="key_prefix") as other_prefix:
            await SessionManager(settings=settings, key_prefix="elsewhere").start()
        assert settings.key_prefix in str(other_prefix.value) and "elsewhere" in str(other_prefix.value)
        async with SessionManager(settings=settings, partitions=16) as same:  # the same layout starts
            assert await same.get("laid-out") is not None


async def test_a_flusher_starts_while_postgres_is_down_and_flushes_soon_after_it_returns(
        redis_url: str, own_postgres: PostgresServer) -> None:
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix="pg-down-at-start",
                        max_concurrent_sessions=None, socket_timeout_secs=2, flush_interval_secs=0.05)
    await migrate(settings)
    own_postgres.stop()
    async with ops.flusher(settings) as process:  # a deploy or a crash-restart during the outage
        assert (await process.get("/healthz"))[0] == 200
        status, body = await ops.get_json(process.port, "/readyz")
        assert status == 503 and body["postgres"].startswith("error") and body["redis"] == "ok"
        samples, _ = await process.samples()
        assert ("tiered_sessions_flush_lag_seconds", ()) in samples
        async with SessionManager(settings=settings, run_flusher=False) as writer:  # starts too
            ids = [(await writer.ensure(data={"n": n})).session_id for n in range(5)]
            for sid in ids:
                assert await writer.update_activity(sid) is True
        await asyncio.sleep(8)  # long enough for an unbounded exponential backoff to reach 6 s
        own_postgres.start()
        back = asyncio.get_running_loop().time()

        async def flushed() -> bool:
            connection = await asyncpg.connect(own_postgres.url)
            try:
                count = await connection.fetchval("SELECT count(*) FROM public.sessions WHERE session_id = ANY($1)",
                                                  ids)
            finally:
                await connection.close()
            return bool(count == len(ids))

        await ops.wait_for(flushed, "the sessions written during the outage to reach PostgreSQL", timeout=15)
        assert asyncio.get_running_loop().time() - back < 4  # within a few seconds, not after a long backoff
        status, body = await ops.get_json(process.port, "/readyz")
        assert status == 200, body
        assert sum("PostgreSQL is back" in line for line in process.log) == 1, "".join(process.log)


async def test_metrics_answer_from_postgres_while_degraded(settings: Settings, paused_redis: RedisServer) -> None:
    own = _own(settings, paused_redis)
    manager = SessionManager(settings=own, drain_timeout_secs=1)
    try:
        await manager.ensure("counted-in-postgres")
        assert await manager.flush() == 0
        normal = await manager.get_session_metrics()
        assert normal["mode"] == "normal" and normal["total_sessions"] == 1 and normal["dirty_sessions"] == 0
        paused_redis.pause()
        with pytest.raises(RedisUnavailable):
            await manager.get("counted-in-postgres")  # trips the breaker
        degraded = await asyncio.wait_for(manager.get_session_metrics(), 5)
        assert degraded["mode"] == "degraded" and degraded["total_sessions"] == 1
        assert degraded["dirty_sessions"] is None and degraded["flush_lag_seconds"] is None  # unknown, not 0
        assert set(degraded) == set(normal)
    finally:
        paused_redis.resume()
        await manager.close()


async def test_a_slow_postgres_still_makes_progress(settings: Settings, pg: asyncpg.Connection,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Every write statement takes 0.6 s, so a pass outlasts its 1 s leases: renewed while the pass runs, its acks
    still count. Under steady writes the lag levels off at what Postgres can take instead of growing a second
    per second, and the backlog drains once Postgres speeds up."""
    await pg.execute(f"""
        CREATE FUNCTION "{settings.schema}".slow_statement() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$;
        CREATE TRIGGER slow_statement BEFORE INSERT OR UPDATE ON {settings.qualified_table}
        FOR EACH STATEMENT EXECUTE FUNCTION "{settings.schema}".slow_statement();""")
    caplog.set_level(logging.WARNING, logger="tiered_sessions._flusher")
    # 4 partitions, one per writer group: a pass takes about two statements, 1.2 s, past the 1 s lease
    async with SessionManager(settings=settings, lease_secs=1.0, partitions=4) as manager:
        ids = [(await manager.ensure()).session_id for _ in range(160)]
        acknowledged = dict.fromkeys(ids, 0)
        lags: list[float] = []
        loop = asyncio.get_running_loop()
        ends = loop.time() + 8
        while loop.time() < ends:  # steady writes for 8 s, the lag read every half second
            for sid in ids[::4]:
                acknowledged[sid] += await manager.update_activity(sid)
            lags.append((await manager.get_session_metrics())["flush_lag_seconds"])
            await asyncio.sleep(0.5)
        assert max(lags[-4:]) < 5, lags  # levelled off: growing a second per second it would be past 8
        await pg.execute(f"DROP TRIGGER slow_statement ON {settings.qualified_table}")

        async def drained() -> bool:
            return bool((await manager.get_session_metrics())["dirty_sessions"] == 0)

        await ops.wait_for(drained, "the backlog to drain once PostgreSQL is fast again", timeout=10)
        counts = {row["session_id"]: row["request_count"]
                  for row in await pg.fetch(f"SELECT session_id, request_count FROM {settings.qualified_table}")}
        assert all(counts.get(sid) == acknowledged[sid] for sid in ids)
    refused = [r.getMessage() for r in caplog.records if "ack was refused" in r.getMessage()]
    assert refused == []


_UNCLOSED = """
import asyncio, sys
from tiered_sessions import RedisUnavailable, SessionManager, Settings

async def main() -> None:
    redis_url, database_url, schema = sys.argv[1:4]
    manager = SessionManager(settings=Settings(redis_url=redis_url, database_url=database_url, schema=schema,
                                               key_prefix=schema, socket_timeout_secs=1, max_concurrent_sessions=None,
                                               redis_probe_interval_secs=0.2, cleanup_interval_secs=0.2))
    await manager.ensure("unclosed")
    assert await manager.flush() == 0
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        await manager.get("unclosed")
    except RedisUnavailable:
        pass
    assert await manager.update_activity("unclosed")  # written through: degraded mode, its probe running
    print("leaving without close()", flush=True)
    raise SystemExit(3)

asyncio.run(main())
"""


async def test_a_process_that_never_closed_its_manager_still_exits(settings: Settings,
                                                                   paused_redis: RedisServer) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _UNCLOSED, paused_redis.url, settings.database_url or "", settings.schema,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert (await process.stdout.readline()).strip() == b"ready"
        paused_redis.pause()  # frozen, not gone: its sockets stay open and silent
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        async with asyncio.timeout(30):
            assert (await process.stdout.readline()).strip() == b"leaving without close()"
        left = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(10):
                code = await process.wait()
        except TimeoutError:
            raise AssertionError("the process hung in asyncio.run's shutdown: a background task ignored "
                                 "its cancellation") from None
        assert code == 3
        assert asyncio.get_running_loop().time() - left < 5
    finally:
        paused_redis.resume()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_probe_that_dies_is_restarted_and_degraded_mode_still_ends(
        settings: Settings, paused_redis: RedisServer, pg: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe meets an exception outside its error tuple (as redis-py's cluster pipeline raised
    AttributeError mid-replay): logged at once with its traceback, counted, restarted; the manager leaves
    degraded mode by itself once Redis serves, and the journal is folded in."""
    own = _own(settings, paused_redis)
    restarts = REGISTRY.get_sample_value("tiered_sessions_task_restarts_total", {"task": "redis-probe"}) or 0.0
    async with SessionManager(settings=own) as manager:
        await manager.ensure("probed")
        assert await manager.flush() == 0
        assert manager.flusher is not None
        journal = manager.flusher.journal
        real_replay = journal.replay
        failures = [AttributeError("'NoneType' object has no attribute 'writelines'")]

        async def replay_that_breaks_once(*, wait: bool) -> int | None:
            if failures and wait:  # the probe's replay (a flusher pass does not wait for another replayer)
                raise failures.pop()
            return await real_replay(wait=wait)

        monkeypatch.setattr(journal, "replay", replay_that_breaks_once)
        paused_redis.pause()
        with pytest.raises(RedisUnavailable):
            await manager.get("probed")
        assert await manager.update_activity("probed") is True  # written through, journaled
        paused_redis.resume()
        await ops.wait_for(lambda: _async(not failures), "the probe to meet its exception")
        assert any(r.levelname == "ERROR" and r.exc_info and "redis-probe" in r.getMessage()
                   for r in caplog.records), "the probe's death was not logged with its traceback"

        async def back() -> bool:
            return bool((await manager.get_session_metrics())["mode"] == "normal")

        await ops.wait_for(back, "degraded mode to end by itself", timeout=15)
        assert await journal.pending() == 0
        session = await manager.get("probed")
        assert session is not None and session.request_count == 1
    after = REGISTRY.get_sample_value("tiered_sessions_task_restarts_total", {"task": "redis-probe"}) or 0.0
    assert after == restarts + 1


async def _async(value: bool) -> bool:
    return value


async def test_stats_answer_from_postgres_while_redis_is_unreachable(settings: Settings,
                                                                     paused_redis: RedisServer) -> None:
    own = _own(settings, paused_redis)
    async with SessionManager(settings=own) as manager:
        await manager.ensure("counted")
        assert await manager.flush() == 0
    paused_redis.pause()
    shown = await asyncio.to_thread(_cli, "stats", "--json",
                                    env={**_env(own), "TIERED_SESSIONS_SOCKET_TIMEOUT_SECS": "1"})
    assert shown.returncode == 0, shown.stderr
    stats = json.loads(shown.stdout)
    assert stats["redis"].startswith("unreachable") and stats["total_sessions"] == 1
    assert stats["dirty_sessions"] is None and stats["journal_pending"] == 0


async def test_a_broken_partition_holds_back_only_itself(settings: Settings, redis: aioredis.Redis,
                                                         pg: asyncpg.Connection) -> None:
    """One partition's Redis calls fail (its dirty index is not a sorted set): it retries on a backoff of its
    own while every other partition keeps its normal lag."""
    async with SessionManager(settings=settings) as manager:
        assert manager.flusher is not None
        hot = manager.flusher.hot
        broken = hot.keys("victim").dirty
        await redis.set(broken, "not a sorted set")
        ids = [sid for sid in (f"fine-{i}" for i in range(200)) if hot.keys(sid).dirty != broken][:30]
        started = asyncio.get_running_loop().time()
        for sid in ids:
            await manager.ensure(sid)

        async def all_flushed() -> bool:
            count = await pg.fetchval(f"SELECT count(*) FROM {settings.qualified_table} WHERE session_id = ANY($1)",
                                      ids)
            return bool(count == len(ids))

        await ops.wait_for(all_flushed, "the healthy partitions to flush", timeout=10)
        assert asyncio.get_running_loop().time() - started < 3
        await redis.delete(broken)


async def test_a_connection_closed_under_a_background_read_is_a_connection_error(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The client's stray AttributeError (a connection closed under a pipeline, as redis-py's cluster client does
    when it re-maps) reaches the backlog poll as the connection error it is: counted and retried, not a death."""
    from redis.asyncio.client import Pipeline

    real_execute = Pipeline.execute
    broken = [AttributeError("'NoneType' object has no attribute 'writelines'")]

    async def execute_closed_once(self: Pipeline, *args: Any, **kwargs: Any) -> list[Any]:
        if broken:
            raise broken.pop()
        return await real_execute(self, *args, **kwargs)

    restarts = REGISTRY.get_sample_value("tiered_sessions_task_restarts_total", {"task": "backlog"}) or 0.0
    async with SessionManager(settings=settings, run_flusher=False, backlog_poll_secs=0.02) as manager:
        await manager.ensure("polled")
        monkeypatch.setattr(Pipeline, "execute", execute_closed_once)
        await until(lambda: not broken)
        await until(lambda: manager.backlog == 1)  # the poll went on
    assert (REGISTRY.get_sample_value("tiered_sessions_task_restarts_total", {"task": "backlog"}) or 0.0) == restarts
    assert any("cannot read the backlog" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("call", ["get", "ensure", "update_activity", "update", "remove", "rotate"])
async def test_a_key_of_the_wrong_type_met_by_a_call_is_quarantined_not_a_500(
        settings: Settings, redis: aioredis.Redis, call: str) -> None:
    """A non-hash where a session's hash belongs (planted, or left by another program) fails every command on
    it with WRONGTYPE. The call that meets it moves it aside (kept, listed as a poison dead letter) and goes on
    as if the session were missing, instead of failing with redis-py's unnamed ResponseError."""
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        hot = (await manager.dead_letters()).hot
        await redis.set(hot.keys("planted").session, "not a session")
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "get": lambda: manager.get("planted"),
            "ensure": lambda: manager.ensure("planted", data={"fresh": True}),
            "update_activity": lambda: manager.update_activity("planted"),
            "update": lambda: manager.update("planted", data={"x": 1}),
            "remove": lambda: manager.remove("planted"),
            "rotate": lambda: manager.rotate("planted"),
        }
        try:
            result = await calls[call]()
        except SessionNotFound:
            result = "not found"
        expected = {"get": None, "update_activity": False, "update": "not found", "remove": None,
                    "rotate": "not found"}
        if call == "ensure":
            assert isinstance(result, Session) and result.data == {"fresh": True}
        else:
            assert result == expected[call]
        moved = await redis.keys(f"{settings.key_prefix}:*quarantine*")
        assert len(moved) == 1 and await redis.get(moved[0]) == b"not a session"  # kept for inspection
        (letter,) = await (await manager.dead_letters()).list()
        assert letter.session_id == "planted" and "WRONGTYPE" in letter.reason


async def test_a_session_created_while_degraded_fires_created(settings: Settings, paused_redis: RedisServer) -> None:
    """ensure() of a new id written through to Postgres (Redis unreachable) creates the session: its
    ``created`` event fires as on Redis; an existing one's does not."""
    own = _own(settings, paused_redis)
    created: list[str] = []
    manager = SessionManager(settings=own, drain_timeout_secs=1)

    @manager.on_created
    async def record(event: Any) -> None:
        created.append(event.session_id)

    try:
        await manager.ensure("before-the-outage")
        assert await manager.flush() == 0
        paused_redis.pause()
        with pytest.raises(RedisUnavailable):
            await manager.get("before-the-outage")  # trips the breaker
        assert (await manager.ensure("made-in-postgres", data={"x": 1})).data == {"x": 1}
        await manager.ensure("before-the-outage")  # exists: no event
        await until(lambda: "made-in-postgres" in created)
        assert created == ["before-the-outage", "made-in-postgres"]
    finally:
        paused_redis.resume()
        await manager.close()


async def test_a_users_sessions_are_listed_from_postgres_while_degraded(settings: Settings,
                                                                       paused_redis: RedisServer) -> None:
    own = _own(settings, paused_redis)
    manager = SessionManager(settings=own, drain_timeout_secs=1)
    try:
        for sid in ("alice-1", "alice-2", "bob-1"):
            await manager.ensure(sid, user_id=sid.split("-")[0])
        await manager.remove("alice-2")
        assert await manager.flush() == 0
        paused_redis.pause()
        with pytest.raises(RedisUnavailable):
            await manager.get("alice-1")  # trips the breaker
        assert [s.session_id for s in await manager.list_user_sessions("alice")] == ["alice-1"]
    finally:
        paused_redis.resume()
        await manager.close()
