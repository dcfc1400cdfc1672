"""Several processes on the same sessions: no lost increments, Postgres ends equal to Redis."""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings

from .helpers import pg_rows

WORKER = """
import asyncio, json, sys
from tiered_sessions import SessionManager, Settings

async def main(settings, ids, rounds, tag):
    async with SessionManager(settings=Settings(**settings), run_flusher=True) as manager:
        for sid in ids:
            await manager.ensure(sid)
        for r in range(rounds):
            await asyncio.gather(*(manager.update_activity(sid, request_duration_ms=3) for sid in ids))
            await manager.update(ids[r % len(ids)], data={tag: r})

settings, ids, rounds, tag = json.loads(sys.argv[1])
asyncio.run(main(settings, ids, rounds, tag))
"""


async def test_two_processes_updating_the_same_sessions(settings: Settings, pg: asyncpg.Connection,
                                                        redis: aioredis.Redis) -> None:
    ids = [f"shared-{i}" for i in range(20)]
    rounds = 60
    shown = {name: getattr(settings, name) for name in ("redis_url", "database_url", "schema", "key_prefix",
                                                         "flush_interval_secs", "max_concurrent_sessions")}
    workers = [await asyncio.create_subprocess_exec(sys.executable, "-c", WORKER,
                                                    json.dumps([shown, ids, rounds, tag]))
               for tag in ("left", "right")]
    assert [await worker.wait() for worker in workers] == [0, 0]
    async with SessionManager(settings=settings) as manager:
        assert await manager.flush() == 0
        rows = await pg_rows(pg, settings)
        for sid in ids:
            session = await manager.get(sid)
            assert session is not None
            assert session.request_count == 2 * rounds  # no lost increments
            assert session.total_duration_ms == 6 * rounds
            row = rows[sid]
            assert (row["request_count"], row["version"]) == (session.request_count, session.version)
            assert json.loads(row["session_data"]) == session.data
        assert {key for s in ids for key in (await manager.get(s)).data} == {"left", "right"}  # type: ignore[union-attr]
