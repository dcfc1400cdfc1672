"""Calls served from Redis: update_activity at 1-256 tasks, get (hot and cold), ensure, and a Zipf 90/10 mix."""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import accumulate
from typing import Any

import asyncpg

from tiered_sessions import SessionManager

from ..baselines.raw_pair import RawPair
from ..baselines.redis_py import RawRedis, redis_client
from ..baselines.write_through import WriteThrough
from ..env import ATTRIBUTES, DATA, TIMEOUT_SECS, Env, new_session, session_row
from ..harness import OURS, Sample, ScenarioResult, Target, alternate, run_many, window
from . import Scenario

CONCURRENCY = (1, 16, 64, 256)
HOT_SESSIONS = 1000   # sessions the update/get scenarios spread their calls over
TASKS = 64            # concurrency of the scenarios that do not vary it
DURATION_MS = 5


class Zipf:
    """Zipf(s) over ranks 0..n-1 by bisecting a precomputed CDF (no numpy)."""

    def __init__(self, n: int, s: float = 1.0, seed: int = 5) -> None:
        self.cdf = list(accumulate(1 / (rank ** s) for rank in range(1, n + 1)))
        self.total = self.cdf[-1]
        self.random = random.Random(seed)

    def sample(self) -> int:
        return bisect.bisect_left(self.cdf, self.random.random() * self.total)


@asynccontextmanager
async def contenders(env: Env, sessions: int, *, table: str = "sessions", write_through: bool = False
                     ) -> AsyncIterator[tuple[SessionManager, RawRedis, WriteThrough | None, list[str]]]:
    """Ours and the baselines, each holding the same number of live sessions."""
    await env.wipe_redis()
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(SessionManager(settings=await env.settings(table)))
        raw = RawRedis(redis_client(env.redis_url), env.key_prefix("raw"), TIMEOUT_SECS)
        stack.push_async_callback(raw.client.aclose)
        ids = [s.session_id for s in await run_many(lambda: new_session(manager), sessions,
                                                    TASKS)]
        await manager.flush()
        await raw.create_many(ids, DATA, ATTRIBUTES)
        through = None
        if write_through:
            await env.settings("wt")
            await env.truncate("wt")
            through = await WriteThrough.connect(env.database_url, env.table("wt"), TIMEOUT_SECS)
            stack.push_async_callback(through.close)
            now = time.time()
            rows = iter(ids)
            await run_many(lambda: through.create(session_row(next(rows), now)), len(ids), 32)
        yield manager, raw, through, ids


async def update_activity(env: Env, tasks: int) -> ScenarioResult:
    async with contenders(env, HOT_SESSIONS, write_through=True) as (manager, raw, through, ids):
        assert through is not None
        pick = random.Random(1).choice

        async def ours() -> Sample:
            sample = await window(lambda _: manager.update_activity(pick(ids), DURATION_MS), tasks, env.seconds,
                                  warmup=env.warmup)
            await manager.flush()  # settle: the next contender does not pay for our writes behind
            return sample

        async def redis_py() -> Sample:
            return await window(lambda _: raw.update_activity(pick(ids), DURATION_MS), tasks, env.seconds,
                                warmup=env.warmup)

        async def write_through() -> Sample:
            return await window(lambda _: through.update_activity(pick(ids), DURATION_MS), tasks, env.seconds,
                                warmup=env.warmup)

        figures = await alternate({OURS: ours, "redis_py SET EX": redis_py, "write_through": write_through},
                                  env.rounds)
    result = ScenarioResult(f"update_activity@{tasks}",
                            f"update_activity on {HOT_SESSIONS} sessions from {tasks} tasks (flusher running)",
                            figures)
    if tasks == 64:
        ratios = result.ratios
        result.targets = [
            Target("≥ 2.0x raw redis-py SET EX @64 (stretch 3x)", ratios["redis_py SET EX"], 2.0, True, stretch=3.0),
            Target("≥ 10x write-through @64 (fsync on, pool of 32)", ratios["write_through"], 10.0, True),
        ]
    return result


async def get_hot(env: Env, tasks: int) -> ScenarioResult:
    async with contenders(env, HOT_SESSIONS) as (manager, raw, _, ids):
        pick = random.Random(2).choice

        async def ours() -> Sample:
            return await window(lambda _: manager.get(pick(ids)), tasks, env.seconds, warmup=env.warmup)

        async def redis_py() -> Sample:
            return await window(lambda _: raw.get(pick(ids)), tasks, env.seconds, warmup=env.warmup)

        figures = await alternate({OURS: ours, "redis_py GET": redis_py}, env.rounds)
    result = ScenarioResult(f"get_hot@{tasks}", f"get of a session in Redis, {tasks} tasks", figures)
    ours_p50, raw_p50 = figures[OURS].p50_ms, figures["redis_py GET"].p50_ms
    assert ours_p50 is not None and raw_p50
    result.targets = [Target(f"p50 ≤ 1.2x raw redis-py GET p50 @{tasks}", ours_p50 / raw_p50, 1.2, False)]
    result.extra = {"p50_ratio": round(ours_p50 / raw_p50, 3)}
    return result


async def get_cold(env: Env) -> ScenarioResult:
    """Read-through: every round starts with an empty Redis; each call reads a different session."""
    ids = await env.seeded(env.size(100_000, 2000))
    settings = await env.settings("seeded")
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(SessionManager(settings=settings))
        pg = await asyncpg.create_pool(env.database_url, min_size=1, max_size=settings.pg_pool_max_size)
        stack.push_async_callback(pg.close)
        client = redis_client(env.redis_url)
        stack.push_async_callback(client.aclose)
        pair = RawPair(client, pg, env.table("seeded"), env.key_prefix("pair"))
        wrapped = {"count": 0}

        async def reads(get: Callable[[str], Awaitable[Any]]) -> Sample:
            await env.wipe_redis()
            counter = itertools.count()

            async def op(_: int) -> object:
                n = next(counter)
                if n >= len(ids):
                    wrapped["count"] += 1  # ran out of cold sessions: this read is hot
                return await get(ids[n % len(ids)])

            return await window(op, TASKS, env.seconds, warmup=env.warmup)

        figures = await alternate({OURS: lambda: reads(manager.get),
                                   "raw pair (cache-aside)": lambda: reads(pair.get)}, env.rounds)
    result = ScenarioResult("get_cold", f"get of sessions only PostgreSQL holds (read-through), {TASKS} tasks",
                            figures)
    result.extra = {"sessions_in_postgres": len(ids), "reads_past_the_cold_set": wrapped["count"]}
    result.targets = [Target("≥ 4x the raw cache-aside pair (read-throughs of a turn share a query)",
                             result.ratios["raw pair (cache-aside)"], 4.0, True)]
    return result


async def ensure_new(env: Env) -> ScenarioResult:
    async with contenders(env, 1, write_through=True) as (manager, raw, through, _):
        assert through is not None

        async def ours() -> Sample:
            sample = await window(lambda _: new_session(manager), TASKS, env.seconds,
                                  warmup=env.warmup)
            await manager.flush()
            return sample

        async def redis_py() -> Sample:
            return await window(lambda _: raw.create(DATA, ATTRIBUTES), TASKS, env.seconds, warmup=env.warmup)

        async def write_through() -> Sample:
            return await window(lambda _: through.create(session_row(secrets.token_urlsafe(32), time.time())),
                                TASKS, env.seconds, warmup=env.warmup)

        figures = await alternate({OURS: ours, "redis_py SET NX EX": redis_py, "write_through": write_through},
                                  env.rounds)
    return ScenarioResult("ensure", f"ensure() of new sessions (random ids), {TASKS} tasks", figures)


async def mixed(env: Env) -> ScenarioResult:
    """90% get / 10% update_activity over 100k sessions, keys drawn from Zipf(1.0)."""
    ids = await env.seeded(env.size(100_000, 2000))
    await env.wipe_redis()
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(SessionManager(settings=await env.settings("seeded")))
        await manager.recover_all_sessions()
        raw = RawRedis(redis_client(env.redis_url), env.key_prefix("raw"), TIMEOUT_SECS)
        stack.push_async_callback(raw.client.aclose)
        await raw.create_many(ids, DATA, ATTRIBUTES)
        order = ids[:]
        random.Random(3).shuffle(order)  # the hottest keys spread over the partitions
        zipf = Zipf(len(order))
        coin = random.Random(4).random

        async def ours_op(_: int) -> object:
            sid = order[zipf.sample()]
            if coin() < 0.9:
                return await manager.get(sid)
            return await manager.update_activity(sid, DURATION_MS)

        async def raw_op(_: int) -> object:
            sid = order[zipf.sample()]
            if coin() < 0.9:
                return await raw.get(sid)
            await raw.update_activity(sid, DURATION_MS)
            return None

        async def ours() -> Sample:
            sample = await window(ours_op, TASKS, env.seconds, warmup=env.warmup)
            await manager.flush()
            return sample

        figures = await alternate({OURS: ours, "redis_py GET/SET EX": lambda: window(
            raw_op, TASKS, env.seconds, warmup=env.warmup)}, env.rounds)
    return ScenarioResult("mixed", f"90% get / 10% update_activity, Zipf(1.0) over {len(ids)} sessions, "
                          f"{TASKS} tasks", figures)


SCENARIOS: dict[str, Scenario] = {
    **{f"update_activity@{tasks}": functools.partial(update_activity, tasks=tasks) for tasks in CONCURRENCY},
    **{f"get_hot@{tasks}": functools.partial(get_hot, tasks=tasks) for tasks in (1, 64)},
    "get_cold": get_cold,
    "ensure": ensure_new,
    "mixed": mixed,
}
