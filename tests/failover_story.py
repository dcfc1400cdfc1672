"""The cluster failover story: a Redis Cluster (3 masters + 3 replicas, cluster-node-timeout 2000), 3 writer
processes (tests/story_writer.py), 2 `tiered-sessions flusher` processes; a master is SIGKILLed under load,
then a flusher is SIGKILLed and replaced. At the end every acknowledged write must be in Postgres, except what
the killed master acknowledged in its last second and had not replicated (asynchronous replication: the
durability window), no writer may be left in degraded mode, no journal entry left, and Redis and Postgres must
agree on every session.

    python -m tests.failover_story --runs 20      (its own PostgreSQL unless --database-url is given)

tests/test_failover_story.py runs it once in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
from redis.crc import key_slot

from tiered_sessions import SessionManager, Settings
from tiered_sessions._codec import partition_of
from tiered_sessions.embedded import PostgresServer, RedisServer
from tiered_sessions.migrate import migrate

from .local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
SESSIONS = 300
WRITERS = 3
WINDOW_SECS = 1.0  # what a killed master may have acknowledged without replicating it


@dataclasses.dataclass
class StoryResult:
    acknowledged: int = 0
    found: int = 0
    lost: int = 0  # acknowledged increments missing from Postgres
    lost_outside_window: int = 0  # of those, more than the killed master acknowledged in its last second
    lost_on_healthy_masters: int = 0
    extra: int = 0  # in Postgres but never acknowledged: calls that failed after being applied
    failed_calls: int = 0  # calls that raised: applied or not
    writers_degraded: int = 0
    journal_pending: int = 0
    tiers_differ: int = 0  # sessions whose Redis copy and Postgres row differ (count or version)
    failover_secs: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost_outside_window or self.lost_on_healthy_masters or self.extra > self.failed_calls
                    or self.writers_degraded or self.journal_pending or self.tiers_differ or self.problems)


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "TIERED_SESSIONS_REDIS_URL": settings.redis_url or "",
            "TIERED_SESSIONS_DATABASE_URL": settings.database_url or "", "TIERED_SESSIONS_SCHEMA": settings.schema,
            "TIERED_SESSIONS_KEY_PREFIX": settings.key_prefix, "TIERED_SESSIONS_SOCKET_TIMEOUT_SECS": "2",
            "TIERED_SESSIONS_LEASE_SECS": "2", "TIERED_SESSIONS_FLUSH_INTERVAL_SECS": "0.1"}


def _flusher(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tiered_sessions.cli", "flusher"], env=_env(settings),
                                cwd=ROOT, stdout=out, stderr=out)


def _writer(settings: Settings, n: int, folder: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.story_writer", settings.redis_url or "",
                                 settings.database_url or "", settings.schema, str(SESSIONS),
                                 str(folder / f"writer{n}.json")],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=out, stderr=out)


def _wait_or_kill(process: subprocess.Popen[bytes], timeout: float, result: StoryResult, problem: str) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        result.problems.append(problem)


def _victim_slots(cluster: LocalCluster, victim: RedisServer) -> list[tuple[int, int]]:
    with cluster.client(victim) as client:
        slots = client.execute_command("CLUSTER", "SLOTS")
    return [(int(entry[0]), int(entry[1])) for entry in slots if int(entry[2][1]) == victim.port]


def _wait_promoted(cluster: LocalCluster, victim: RedisServer, timeout: float) -> None:
    """Until a live node says no slot is served by ``victim`` any more (its replica took over) and the cluster
    is ok again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception), cluster.client(next(n for n in cluster.nodes if n.is_running())) as c:
            if all(int(entry[2][1]) != victim.port for entry in c.execute_command("CLUSTER", "SLOTS")):
                cluster.wait_ok(cluster.masters, max(0.1, deadline - time.monotonic()))
                return
        time.sleep(0.05)
    raise TimeoutError("the killed master's replica was not promoted")


async def run_story(database_url: str, folder: Path, *, before_kill: float = 2.0, after_kill: float = 4.0
                    ) -> StoryResult:
    result = StoryResult()
    schema = f"story_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with LocalCluster() as cluster:
        settings = Settings(redis_url=cluster.url, database_url=database_url, schema=schema, key_prefix=schema,
                            max_concurrent_sessions=None, socket_timeout_secs=2, drain_timeout_secs=30)
        await migrate(settings)
        ids = [f"story-{i}" for i in range(SESSIONS)]
        async with SessionManager(settings=settings, run_flusher=False) as setup:
            for sid in ids:
                await setup.ensure(sid)
            if await setup.flush():
                result.problems.append("the first flush did not complete")
        logs = folder / "logs.txt"
        flushers = [_flusher(settings, logs) for _ in range(2)]
        writers = [_writer(settings, n, folder, logs) for n in range(WRITERS)]
        try:
            await asyncio.sleep(before_kill)
            victim = cluster.primaries()[0]
            ranges = _victim_slots(cluster, victim)
            killed_at = time.time()
            victim.kill()
            started = time.monotonic()
            await asyncio.to_thread(_wait_promoted, cluster, victim, 30)
            result.failover_secs = time.monotonic() - started
            await asyncio.sleep(1.0)
            flushers[0].send_signal(signal.SIGKILL)  # a flusher dies mid-pass; another takes its place
            flushers[0].wait(10)
            settings = dataclasses.replace(settings, redis_url=cluster.url)  # a seed node that is alive
            flushers[0] = _flusher(settings, logs)
            await asyncio.sleep(after_kill)
        finally:
            for writer in writers:
                with contextlib.suppress(OSError):
                    assert writer.stdin is not None
                    writer.stdin.write(b"stop\n")
                    writer.stdin.close()
            for writer in writers:
                _wait_or_kill(writer, 90, result, "a writer did not finish")
            for flusher in flushers:
                flusher.send_signal(signal.SIGTERM)
            for flusher in flushers:
                _wait_or_kill(flusher, 60, result, "a flusher did not drain and exit on SIGTERM")
        await _account(result, settings, folder, ids, ranges, killed_at)
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()
    return result


async def _account(result: StoryResult, settings: Settings, folder: Path, ids: list[str],
                   ranges: list[tuple[int, int]], killed_at: float) -> None:
    acked: dict[str, int] = dict.fromkeys(ids, 0)
    in_window: dict[str, int] = dict.fromkeys(ids, 0)
    for n in range(WRITERS):
        path = folder / f"writer{n}.json"
        if not path.exists():
            result.problems.append(f"writer {n} wrote no report")
            continue
        report = json.loads(path.read_text())
        result.failed_calls += report["failed"]
        result.writers_degraded += report["mode"] != "normal"
        for sid, times in report["acks"].items():
            acked[sid] += len(times)
            in_window[sid] += sum(killed_at - WINDOW_SECS <= t <= killed_at for t in times)
    async with SessionManager(settings=settings, run_flusher=False) as checker:
        if await checker.flush():
            result.problems.append("the final flush did not complete")
        assert checker.flusher is not None
        result.journal_pending = await checker.flusher.journal.pending()
        connection = await asyncpg.connect(settings.database_url)
        try:
            rows = {row["session_id"]: (row["request_count"], row["version"]) for row in await connection.fetch(
                f"SELECT session_id, request_count, version FROM {settings.qualified_table}")}
        finally:
            await connection.close()
        for sid in ids:
            count, version = rows.get(sid, (0, 0))
            result.acknowledged += acked[sid]
            result.found += count
            lost = max(0, acked[sid] - count)
            result.extra += max(0, count - acked[sid])
            result.lost += lost
            slot = key_slot(f"{settings.key_prefix}:{{p{partition_of(sid, settings.partitions)}}}:dirty".encode())
            if any(start <= slot <= end for start, end in ranges):
                result.lost_outside_window += max(0, lost - in_window[sid])
            else:
                result.lost_on_healthy_masters += lost
            session = await checker.get(sid)
            if session is None or (session.request_count, session.version) != (count, version):
                result.tiers_differ += 1


@contextlib.contextmanager
def _postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with PostgresServer() as server:
        yield server.url


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.failover_story", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--database-url", help="a PostgreSQL to use (default: an embedded one of its own)")
    args = parser.parse_args()
    failures = 0
    with _postgres(args.database_url) as database_url:
        for run in range(1, args.runs + 1):
            with tempfile.TemporaryDirectory(prefix="tiered-sessions-story-") as folder:
                result = asyncio.run(run_story(database_url, Path(folder)))
            failures += not result.ok
            fields = {k: v for k, v in dataclasses.asdict(result).items() if v}
            print(f"run {run}: {'ok' if result.ok else 'FAILED'} {json.dumps(fields)}", flush=True)
    print(f"{args.runs - failures} of {args.runs} runs passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
