"""``recover_all_sessions`` of 100k sessions into an empty Redis, against the raw pair (cursor SELECT +
pipelined HSET)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import asyncpg

from tiered_sessions import SessionManager

from ..baselines.raw_pair import RawPair
from ..baselines.redis_py import redis_client
from ..env import Env
from ..harness import OURS, Sample, ScenarioResult, Target, alternate, timed
from . import Scenario


async def recover(env: Env) -> ScenarioResult:
    ids = await env.seeded(env.size(100_000, 2000))
    settings = await env.settings("seeded")
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(SessionManager(settings=settings))
        pg = await asyncpg.create_pool(env.database_url, min_size=1, max_size=settings.pg_pool_max_size)
        stack.push_async_callback(pg.close)
        client = redis_client(env.redis_url)
        stack.push_async_callback(client.aclose)
        pair = RawPair(client, pg, env.table("seeded"), env.key_prefix("pair"))

        async def ours() -> Sample:
            await env.wipe_redis()
            return await timed(manager.recover_all_sessions)

        async def raw() -> Sample:
            await env.wipe_redis()
            return await timed(pair.recover)

        figures = await alternate({OURS: ours, "raw pair (SELECT + HSET)": raw}, env.rounds)
    result = ScenarioResult("recover", f"recover_all_sessions() of {len(ids)} sessions into an empty Redis", figures)
    result.targets = [Target("≥ 3x the raw pair's rate", result.ratios["raw pair (SELECT + HSET)"], 3.0, True)]
    result.extra = {"sessions": len(ids), "seconds": {name: round(f.seconds, 3) for name, f in figures.items()}}
    return result


SCENARIOS: dict[str, Scenario] = {"recover": recover}
