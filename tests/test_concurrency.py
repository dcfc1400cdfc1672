"""Interleavings: several processes hammering overlapping sessions, and a hypothesis state machine over
write / flush / ack race / remove / FLUSHALL in one process. Afterwards Postgres equals Redis."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from typing import Any

import asyncpg
import hypothesis.strategies as st
import redis.asyncio as aioredis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tiered_sessions import SessionManager, SessionNotFound, Settings

from .helpers import pg_rows

HAMMER = """
import asyncio, json, random, sys
from collections import Counter
from tiered_sessions import SessionManager, Settings

async def main(settings, shared, doomed, tag, remover):
    acked = Counter()
    async with SessionManager(settings=Settings(**settings), run_flusher=True) as manager:
        async def worker(n):
            for r in range(150):
                sid = random.choice(shared + doomed)
                if await manager.update_activity(sid, request_duration_ms=1):
                    acked[sid] += 1
                if r % 10 == n:
                    await manager.update(random.choice(shared), data={tag: r, f"{tag}-{n}": r})
                if remover and r == 75 and n == 0:
                    for sid in doomed:
                        await manager.remove(sid)
        await asyncio.gather(*(worker(n) for n in range(6)))
    print(json.dumps(acked))

settings, shared, doomed, tag, remover = json.loads(sys.argv[1])
asyncio.run(main(settings, shared, doomed, tag, remover))
"""


async def test_processes_hammering_overlapping_sessions(settings: Settings, pg: asyncpg.Connection) -> None:
    shared = [f"h-{i}" for i in range(12)]
    doomed = [f"z-{i}" for i in range(4)]
    async with SessionManager(settings=settings) as manager:
        for sid in shared + doomed:
            await manager.ensure(sid)
    shown = {name: getattr(settings, name) for name in ("redis_url", "database_url", "schema", "key_prefix",
                                                         "flush_interval_secs", "max_concurrent_sessions")}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", HAMMER, json.dumps([shown, shared, doomed, tag, tag == "a"]),
        stdout=asyncio.subprocess.PIPE) for tag in ("a", "b", "c")]
    outputs = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    acked: Counter[str] = Counter()
    for out, _ in outputs:
        acked.update(json.loads(out))
    async with SessionManager(settings=settings) as manager:
        assert await manager.flush() == 0
        rows = await pg_rows(pg, settings)
        for sid in shared:
            session = await manager.get(sid)
            assert session is not None
            assert session.request_count == acked[sid]  # counters exact across processes
            row = rows[sid]
            assert (row["request_count"], row["version"], json.loads(row["session_data"])) == \
                (session.request_count, session.version, session.data)
        for sid in doomed:
            assert await manager.get(sid) is None  # removed stays removed: later touches did not revive it
            assert rows[sid]["session_state"] == "removed"


def test_state_machine_write_flush_remove_flushall(settings: Settings) -> None:
    """One process, every interleaving hypothesis finds: Redis and Postgres always match the model."""

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            prefix = uuid.uuid4().hex[:6]
            self.ids = [f"{prefix}-{i}" for i in range(4)]
            self.manager = SessionManager(settings=settings, run_flusher=False)
            self.redis = aioredis.Redis.from_url(settings.redis_url or "")
            self.model: dict[str, dict[str, Any] | None] = {}    # what Redis should say
            self.durable: dict[str, dict[str, Any] | None] = {}  # what Postgres should say

        def run(self, coroutine: Any) -> Any:
            return self.loop.run_until_complete(coroutine)

        def gather(self, *coroutines: Any) -> list[Any]:
            async def together() -> list[Any]:
                return list(await asyncio.gather(*coroutines))  # created inside this machine's loop

            return self.run(together())  # type: ignore[no-any-return]

        def teardown(self) -> None:
            self.run(self.manager.close())
            self.run(self.redis.aclose())
            self.loop.close()

        @initialize()
        def start(self) -> None:
            self.run(self.manager.start())

        @rule(index=st.integers(0, 3))
        def ensure(self, index: int) -> None:
            sid = self.ids[index]
            session = self.run(self.manager.ensure(sid))
            if self.model.get(sid) is None:
                self.model[sid] = {"count": 0, "data": {}}
            assert session.request_count == self.model[sid]["count"]  # type: ignore[index]

        @rule(index=st.integers(0, 3), times=st.integers(1, 5))
        def touch(self, index: int, times: int) -> None:
            sid = self.ids[index]
            results = self.gather(*(self.manager.update_activity(sid) for _ in range(times)))
            assert all(results) == (self.model.get(sid) is not None)
            if self.model.get(sid) is not None:
                self.model[sid]["count"] += times  # type: ignore[index]

        @rule(index=st.integers(0, 3), key=st.sampled_from(["a", "b"]), value=st.integers(0, 9))
        def merge(self, index: int, key: str, value: int) -> None:
            sid = self.ids[index]
            try:
                self.run(self.manager.update(sid, data={key: value}))
            except SessionNotFound:
                assert self.model.get(sid) is None
            else:
                self.model[sid]["data"][key] = value  # type: ignore[index]

        @rule(index=st.integers(0, 3))
        def remove(self, index: int) -> None:
            self.run(self.manager.remove(self.ids[index]))
            self.model[self.ids[index]] = None

        @rule()
        def flush(self) -> None:
            assert self.run(self.manager.flush()) == 0
            self.durable = {sid: None if state is None else {"count": state["count"], "data": dict(state["data"])}
                            for sid, state in self.model.items()}

        @rule(index=st.integers(0, 3))
        def flush_racing_a_write(self, index: int) -> None:
            # A write lands between the flusher's claim and its ack: it must stay dirty, not be lost.
            assert self.manager.flusher is not None
            sid = self.ids[index]
            self.gather(self.manager.flusher.flush_once(), self.manager.update_activity(sid))
            if self.model.get(sid) is not None:
                self.model[sid]["count"] += 1  # type: ignore[index]
            self.flush()

        @rule()
        def flushall(self) -> None:
            # Redis loses everything: what was flushed is what is left.
            self.run(self.redis.flushall())
            self.model = {sid: None if state is None else {"count": state["count"], "data": dict(state["data"])}
                          for sid, state in self.durable.items()}

        @invariant()
        def redis_matches_the_model(self) -> None:
            for sid in self.ids:
                session = self.run(self.manager.get(sid))
                expected = self.model.get(sid)
                if expected is None:
                    assert session is None
                else:
                    assert session is not None
                    assert (session.request_count, session.data) == (expected["count"], expected["data"])

    run_state_machine_as_test(Machine, settings=hypothesis_settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))
