"""The core promises on a real Redis Cluster (3 masters + 3 replicas, test-owned processes), and a failover
under load: a master SIGKILLed, its replica promoted, nothing flushed lost."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from tiered_sessions import SessionManager, Settings
from tiered_sessions.errors import BackendUnavailable, SessionLimitExceeded
from tiered_sessions.migrate import migrate

from .helpers import pg_row, pg_rows, touch_load
from .local_cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster()
    try:
        local.start()
        yield local
    finally:
        local.stop()


async def _settings_on(url: str, database_url: str, **more: object) -> Settings:
    schema = f"c_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, database_url=database_url, schema=schema, key_prefix=schema,
                        flush_interval_secs=0.05, max_concurrent_sessions=None, drain_timeout_secs=10,
                        socket_timeout_secs=3, **more)  # type: ignore[arg-type]
    await migrate(settings)
    return settings


@pytest.fixture
async def cluster_settings(cluster: LocalCluster, database_url: str) -> AsyncIterator[Settings]:
    settings = await _settings_on(cluster.url, database_url)
    yield settings
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{settings.schema}" CASCADE')
    finally:
        await connection.close()


async def test_core_promises_on_a_cluster(cluster: LocalCluster, cluster_settings: Settings,
                                          pg: asyncpg.Connection) -> None:
    ids = [f"c-{i}" for i in range(60)]
    async with SessionManager(settings=cluster_settings) as manager:
        for sid in ids:
            await manager.ensure(sid, data={"sid": sid}, user_id="u1")
            assert await manager.update_activity(sid, request_duration_ms=2)
        await manager.update(ids[0], data={"cart": [1, 2]})
        # Partitions spread over every master: each holds some of the sessions.
        for node in cluster.primaries():
            with cluster.client(node) as client:
                assert client.dbsize() > 0
        assert await manager.flush() == 0
        rows = await pg_rows(pg, cluster_settings)
        assert len(rows) == 60 and all(rows[sid]["request_count"] == 1 for sid in ids)
        assert json.loads(rows[ids[0]]["session_data"]) == {"sid": ids[0], "cart": [1, 2]}
        # The cluster loses everything (FLUSHALL on every primary) and forgets the scripts: reads come back
        # from Postgres, writes reload the scripts (NOSCRIPT) on whichever master they land on.
        cluster.flushall()
        for node in cluster.primaries():
            with cluster.client(node) as client:
                client.script_flush()
        session = await manager.get(ids[0])
        assert session is not None and session.data == {"sid": ids[0], "cart": [1, 2]}
        assert await manager.update_activity(ids[1])
        assert await manager.recover_all_sessions() == 58  # every live one but the two already back
        assert sorted(await manager.list_ids()) == sorted(ids)
        assert len(await manager.list_user_sessions("u1")) == 60
        # remove: durable tombstone, never served again.
        await manager.remove(ids[2])
        assert await manager.get(ids[2]) is None
        assert await manager.flush() == 0
        row = await pg_row(pg, cluster_settings, ids[2])
        assert row is not None and row["session_state"] == "removed"
        row = await pg_row(pg, cluster_settings, ids[1])
        assert row is not None and row["request_count"] == 2
        metrics = await manager.get_session_metrics()
        assert metrics["dirty_sessions"] == 0 and metrics["total_sessions"] == 59


async def test_session_limit_counts_every_master(cluster_settings: Settings) -> None:
    async with SessionManager(settings=cluster_settings, max_concurrent_sessions=20) as manager:
        for _ in range(20):
            await manager.ensure()  # random ids: spread over the partitions, so over the masters
        with pytest.raises(SessionLimitExceeded, match="Maximum concurrent sessions"):
            await manager.ensure()
        existing = (await manager.list_ids())[0]
        assert (await manager.ensure(existing)).session_id == existing  # an existing one is still served


async def test_concurrent_writers_on_a_cluster_count_exactly(cluster_settings: Settings,
                                                            pg: asyncpg.Connection) -> None:
    ids = [f"w-{i}" for i in range(16)]
    counted: Counter[str] = Counter()

    async def writer(manager: SessionManager) -> None:
        for _ in range(150):
            sid = random.choice(ids)
            if await manager.update_activity(sid, request_duration_ms=1):
                counted[sid] += 1
            if random.random() < 0.1:
                await manager.update(sid, data={str(random.randint(0, 3)): 1})

    async with SessionManager(settings=cluster_settings) as one, \
            SessionManager(settings=cluster_settings) as two:
        for sid in ids:
            await one.ensure(sid)
        await asyncio.gather(*(writer(m) for m in (one, two) for _ in range(4)))
        assert await one.flush() == 0
    rows = await pg_rows(pg, cluster_settings)
    for sid in ids:
        assert rows[sid]["request_count"] == counted[sid], sid


async def test_failover_under_load_loses_nothing_flushed(database_url: str, pg: asyncpg.Connection) -> None:
    local = LocalCluster()
    try:
        local.start()
        settings = await _settings_on(local.url, database_url)
        ids = [f"f-{i}" for i in range(200)]
        acked: Counter[str] = Counter()
        failed: list[tuple[str, BackendUnavailable]] = []  # the failover window: counted, not acknowledged
        stop = asyncio.Event()

        async with SessionManager(settings=settings) as manager:
            for sid in ids:
                await manager.ensure(sid)
            tasks = [asyncio.create_task(touch_load(manager, ids, acked, stop, failed)) for _ in range(6)]
            await asyncio.sleep(1.0)
            await manager.flush()  # under load: what was dirty at the call is durable, later writes may not be
            flushed = {sid: row["request_count"] for sid, row in (await pg_rows(pg, settings)).items()}
            victim = local.primaries()[0]
            victim.kill()
            killed = time.monotonic()
            await asyncio.to_thread(local.wait_ok, 3, 20)  # its replica is promoted
            await asyncio.sleep(1.0)  # load goes on against the new topology
            stop.set()
            await asyncio.gather(*tasks)
            # Calls that found the cluster unreachable switched the manager to degraded mode (write-through to
            # Postgres); its probe switches back once the new topology answers, replaying the journal once.
            for _attempt in range(200):
                with contextlib.suppress(BackendUnavailable):
                    if (await manager.get_session_metrics())["mode"] == "normal":
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the manager was still in degraded mode 20 s after the failover began")
            print(f"failover: back to normal {time.monotonic() - killed:.1f}s after the kill")
            # Back to normal: every call works again, and everything reaches Postgres.
            for sid in ids:
                for _attempt in range(50):
                    try:
                        assert await manager.update_activity(sid)
                        break
                    except BackendUnavailable:
                        await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"{sid}: the manager did not ride through the failover")
            assert await manager.flush() == 0
            assert (await manager.get_session_metrics())["mode"] == "normal"
            rows = await pg_rows(pg, settings)
            for sid in ids:
                session = await manager.get(sid)
                assert session is not None
                assert rows[sid]["request_count"] >= flushed[sid] + 1, sid  # nothing flushed was lost
                assert rows[sid]["request_count"] == session.request_count, sid
            assert sum(acked.values()) > 1000
            print(f"failover: {sum(acked.values())} acknowledged, {len(failed)} failed calls")
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{settings.schema}" CASCADE')
        finally:
            await connection.close()
    finally:
        local.stop()


def test_cluster_url_and_setting_pick_the_cluster_client() -> None:
    from tiered_sessions._redis_client import is_cluster, plain_url

    assert is_cluster(Settings(redis_url="redis+cluster://h:7000"))
    assert is_cluster(Settings(redis_url="rediss+cluster://h:7000"))
    assert is_cluster(Settings(redis_url="redis://h:7000", cluster=True))
    assert not is_cluster(Settings(redis_url="redis://h:7000"))
    assert plain_url("rediss+cluster://:pw@h:7000/0") == "rediss://:pw@h:7000/0"


async def test_a_connection_closed_under_a_call_is_a_named_error_and_the_manager_recovers(
        cluster_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's cluster client closes every node connection when it re-maps the cluster, under concurrent
    calls, which then fail with AttributeError on the dead transport (reproduced with the raw client: 64 tasks of
    pipelines on a fresh RedisCluster, a master SIGKILLed, about one run in four). The hot path has its own
    connections, but calls go through redis-py's client when a master cannot be reached (it re-maps the
    cluster). Such a call raises RedisUnavailable, degraded mode takes over, and the manager is back on Redis by
    itself."""
    from redis.asyncio.cluster import ClusterPipeline
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tiered_sessions._cluster_lanes import ClusterLanes

    real_execute, real_connection = ClusterPipeline.execute, ClusterLanes.connection
    broken = [AttributeError("'NoneType' object has no attribute 'writelines'")]
    unreachable = [RedisConnectionError("Connection refused")]

    async def execute_closed_once(self: ClusterPipeline, *args: object, **kwargs: object) -> list[object]:
        if broken:
            raise broken.pop()
        return await real_execute(self, *args, **kwargs)  # type: ignore[arg-type]

    async def unreachable_once(self: ClusterLanes, *args: Any) -> Any:
        if unreachable:
            raise unreachable.pop()
        return await real_connection(self, *args)

    async with SessionManager(settings=cluster_settings, redis_probe_interval_secs=0.1) as manager:
        await manager.ensure("raced")
        assert await manager.flush() == 0
        monkeypatch.setattr(ClusterPipeline, "execute", execute_closed_once)
        monkeypatch.setattr(ClusterLanes, "connection", unreachable_once)
        await manager._tiers.hot.pipeline.aclose()  # type: ignore[union-attr]  # the next call connects afresh
        with pytest.raises(BackendUnavailable, match="closed this call's connection"):
            await manager.update_activity("raced")
        assert (await manager.get_session_metrics())["mode"] == "degraded"
        for _attempt in range(100):
            if (await manager.get_session_metrics())["mode"] == "normal":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the manager did not leave degraded mode")
        assert await manager.update_activity("raced") is True


def _migrate_slot(cluster: LocalCluster, slot: int, batch: int = 5, pause: float = 0.02) -> tuple[int, int]:
    """Move ``slot`` to another master the way ``redis-cli --cluster reshard`` does (IMPORTING/MIGRATING, MIGRATE
    a few keys at a time, then SETSLOT NODE on every master): calls meanwhile meet ASK, then MOVED. Returns the
    ports of the old and the new owner."""
    migration = _SlotMigration(cluster, slot)
    migration.finish(batch, pause)
    return migration.source.port, migration.target.port


class _SlotMigration:
    """A slot on its way to another master: IMPORTING/MIGRATING set, ``move`` sends chosen keys ahead, ``finish``
    the rest (a few at a time: calls meanwhile meet ASK, or TRYAGAIN where a call's keys are on both sides)."""

    def __init__(self, cluster: LocalCluster, slot: int) -> None:
        self.cluster = cluster
        self.slot = slot
        self.primaries = cluster.primaries()
        self.ids = {}
        for node in self.primaries:
            with cluster.client(node) as client:
                self.ids[node.port] = client.execute_command("CLUSTER", "MYID")
        with cluster.client(self.primaries[0]) as client:
            slots = client.execute_command("CLUSTER", "SLOTS")
        source_port = next(int(entry[2][1]) for entry in slots if entry[0] <= slot <= entry[1])
        self.source = next(node for node in self.primaries if node.port == source_port)
        self.target = next(node for node in self.primaries if node.port != source_port)
        with cluster.client(self.source) as src, cluster.client(self.target) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[self.source.port])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[self.target.port])

    def move(self, keys: list[str]) -> None:
        with self.cluster.client(self.source) as src:
            src.execute_command("MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys)

    def finish(self, batch: int = 5, pause: float = 0.02) -> None:
        with self.cluster.client(self.source) as src, self.cluster.client(self.target) as dst:
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, batch):
                src.execute_command("MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "KEYS", *keys)
                time.sleep(pause)
            dst.script_flush()  # calls sent to the new owner meet NOSCRIPT too, as on a new node
            for node in self.primaries:
                with self.cluster.client(node) as client:
                    client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.ids[self.target.port])


async def test_a_flush_while_a_slot_moves_clears_no_mark_whose_session_moved_ahead(
        cluster: LocalCluster, cluster_settings: Settings, pg: asyncpg.Connection) -> None:
    """Mid-resharding a session's hash can be on the new owner while the dirty index is still on the old: a
    flush there must not take the hash for gone and clear its mark (Postgres would never get the session). It
    holds because Redis refuses a script's read of a key of a moving slot that is not on its node ("non local
    key"), even undeclared: the claim fails and is retried. It may not finish while the slot moves; once it has
    moved, every session is written."""
    from redis.crc import key_slot

    from tiered_sessions._codec import partition_of

    settings = dataclasses.replace(cluster_settings, drain_timeout_secs=1.5)
    moving = [sid for sid in (f"s-{i}" for i in range(2000)) if partition_of(sid, settings.partitions) == 0][:20]
    slot = key_slot(f"{settings.key_prefix}:{{p0}}:".encode())
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        for n, sid in enumerate(moving):
            await manager.ensure(sid, data={"n": n})  # dirty, never flushed
        assert manager.flusher is not None
        keys = manager.flusher.hot.keys
        migration = await asyncio.to_thread(_SlotMigration, cluster, slot)
        try:
            await asyncio.to_thread(migration.move, [keys(sid).session for sid in moving[:10]])
            try:  # the index on the old owner, half the hashes on the new one
                during: int | BackendUnavailable = await manager.flush()
            except BackendUnavailable as exc:
                during = exc
            assert during != 0, "the flush did not meet the move"  # it cannot make the moved half durable
        finally:
            await asyncio.to_thread(migration.finish)
        assert await manager.flush() == 0
    rows = await pg_rows(pg, settings)
    missing = [sid for sid in moving if sid not in rows]
    assert not missing, f"{len(missing)} sessions never reached PostgreSQL: their marks were cleared"
    assert [orjson.loads(rows[sid]["session_data"])["n"] for sid in moving] == list(range(20))


async def test_a_slot_moved_to_another_master_under_load_is_followed(cluster: LocalCluster,
                                                                     cluster_settings: Settings,
                                                                     pg: asyncpg.Connection,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A resharding under load: calls that meet ASK or MOVED are sent again where the slot now lives (they did
    not run where they were refused), no touch is half applied, every acknowledged touch is counted once, and a
    failed one at most once (a call that fails on a connection redis-py's client closed under it, as it
    re-maps the cluster, may have run: see ``_redis_client.closed_under_the_call``)."""
    from redis.crc import key_slot

    from tiered_sessions._cluster_lanes import REDIRECTED, ClusterLanes
    from tiered_sessions._codec import partition_of

    redirected: Counter[str] = Counter()  # replies that sent a call elsewhere, by kind
    follow = ClusterLanes.follow_redirections

    async def counting(self: ClusterLanes, commands: list[Any], results: list[Any], lane: int) -> None:
        redirected.update(type(result).__name__ for result in results if isinstance(result, REDIRECTED))
        await follow(self, commands, results, lane)

    monkeypatch.setattr(ClusterLanes, "follow_redirections", counting)

    # 40 sessions in the partition whose slot moves, and as many in the others: a loop turn's touches of one
    # master's slots go as one script call, which must write nothing when one of its slots is moving.
    partitions = cluster_settings.partitions
    moving = [sid for sid in (f"m-{i}" for i in range(2000)) if partition_of(sid, partitions) == 0][:40]
    ids = moving + [f"o-{i}" for i in range(40)]
    slot = key_slot(f"{cluster_settings.key_prefix}:{{p0}}:".encode())
    acked: Counter[str] = Counter()
    failures: list[tuple[str, BackendUnavailable]] = []
    stop = asyncio.Event()

    async with SessionManager(settings=cluster_settings, redis_probe_interval_secs=0.1) as manager:
        for sid in ids:
            await manager.ensure(sid)
        tasks = [asyncio.create_task(touch_load(manager, ids, acked, stop, failures)) for _ in range(16)]
        await asyncio.sleep(0.3)
        before = sum(acked.values())
        source, target = await asyncio.to_thread(_migrate_slot, cluster, slot)
        during = sum(acked.values()) - before
        await asyncio.sleep(0.5)  # the load goes on against the new owner: MOVED, then the new map
        stop.set()
        await asyncio.gather(*tasks)
        for _attempt in range(100):  # a TRYAGAIN may have tripped degraded mode: its probe ends it
            if (await manager.get_session_metrics())["mode"] == "normal":
                break
            await asyncio.sleep(0.05)
        assert (await manager.get_session_metrics())["mode"] == "normal"
        assert during > 0 and redirected, f"the load did not meet the move ({during} calls, {dict(redirected)})"
        # Checked before anything else touches them: a half-applied touch (counted in Redis, its dirty mark
        # lost) would be in Redis and not in Postgres
        assert await manager.flush() == 0
        rows = await pg_rows(pg, cluster_settings)
        failed = Counter(sid for sid, _ in failures)
        errors = Counter(str(exc).rsplit(": ", 1)[-1] for _, exc in failures)
        for sid in ids:
            session = await manager.get(sid)
            assert session is not None and acked[sid] <= session.request_count <= acked[sid] + failed[sid], \
                (sid, dict(errors))
            assert rows[sid]["request_count"] == session.request_count, sid
        # The slot's new owner serves every call from now on
        with cluster.client(next(n for n in cluster.nodes if n.port == target)) as client:
            assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= len(moving)
        for sid in moving:
            before_touch = (await manager.get(sid) or pytest.fail(sid)).request_count
            assert await manager.update_activity(sid)
            assert (await manager.get(sid) or pytest.fail(sid)).request_count == before_touch + 1
    print(f"resharding: slot {slot} {source}->{target}; {sum(acked.values())} acknowledged ({during} while "
          f"moving), redirected: {dict(redirected)}, failed: {dict(errors)}")


async def test_a_master_that_hangs_while_connecting_holds_up_no_other_master(cluster: LocalCluster,
                                                                          cluster_settings: Settings) -> None:
    """Opening the hot path's connection to a master that does not answer (a paused process: the kernel
    accepts, nothing replies) waits for that master only: calls to the others, which need a connection opened
    too, go on."""
    async with SessionManager(settings=cluster_settings) as manager:
        assert manager._tiers is not None
        hot = manager._tiers.hot
        lanes = hot.pipeline._cluster
        assert lanes is not None
        by_master: dict[str, str] = {}
        for sid in (f"h-{i}" for i in range(200)):
            await manager.ensure(sid)
            master = lanes.master_of(hot.keys(sid).session)
            assert master is not None
            by_master.setdefault(master.name, sid)
        assert len(by_master) == 3
        await hot.pipeline.aclose()  # every call below opens its master's connection afresh
        (hung_name, hung_sid), (_, other_sid) = list(by_master.items())[:2]
        hung = next(node for node in cluster.nodes if hung_name.endswith(f":{node.port}"))
        hung.pause()
        # Resumed within the cluster's node timeout (2 s): no failover, and the stuck call then completes
        resuming = asyncio.get_running_loop().call_later(1.0, hung.resume)
        try:
            stuck = asyncio.create_task(manager.get(hung_sid))
            await asyncio.sleep(0.05)  # it is opening its master's connection
            started = time.monotonic()
            assert await manager.get(other_sid) is not None
            waited = time.monotonic() - started
            assert await stuck is not None
        finally:
            resuming.cancel()
            hung.resume()
        assert waited < 0.5, f"a call to a healthy master waited {waited:.2f}s for the hung one"
