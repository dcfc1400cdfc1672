"""Redis memory per session: INFO used_memory before and after creating N sessions (flushed, so in their
steady state: with a TTL, out of the dirty index), against the same sessions as JSON strings (SET EX)."""

from __future__ import annotations

import asyncio
import functools
import gc
import statistics
from typing import Any

import orjson

from tiered_sessions import SessionManager
from tiered_sessions._hot_tier import HotTier

from ..baselines.redis_py import RawRedis, redis_client
from ..env import ATTRIBUTES, DATA, TIMEOUT_SECS, Env, new_session
from ..harness import OURS, Figure, Sample, ScenarioResult, Target, run_many, timed
from . import Scenario

TASKS = 64
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Safari/537.36")
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "small": (DATA, ATTRIBUTES),
    "small + user agent": (DATA, {**ATTRIBUTES, "user_agent": USER_AGENT}),
    "1 KiB data": ({**DATA, "notes": "x" * 1000}, ATTRIBUTES),
}


async def connected_clients(env: Env) -> int:
    assert env.redis is not None
    return int((await env.redis.info("clients"))["connected_clients"])


async def used_memory(env: Env, idle_clients: int) -> int:
    """Memory of the data, once every client but ours has gone and Redis has freed their buffers (it does so
    lazily, ~20 KB per pooled connection): used_memory less what clients still hold, when it stops moving."""
    assert env.redis is not None
    gc.collect()  # SessionManager.close() leaves its pool's connections open until the manager is collected
    last = -1
    for _ in range(60):
        info = await env.redis.info("memory")
        used = int(info["used_memory"]) - int(info["mem_clients_normal"])
        if await connected_clients(env) <= idle_clients and used == last:
            return used
        last = used
        await asyncio.sleep(0.05)
    return last


async def memory(env: Env) -> ScenarioResult:
    count = env.size(20_000, 500)
    redis = env.redis
    assert redis is not None
    settings = await env.settings("memory")
    per_variant: dict[str, dict[str, float]] = {}
    samples: dict[str, Sample] = {}
    idle_clients = await connected_clients(env)  # ours only, on a Redis of our own
    for variant, (data, attributes) in VARIANTS.items():
        payload = len(orjson.dumps({**data, **attributes}))
        await env.wipe_redis()
        async with SessionManager(settings=settings):
            pass  # loads the scripts (FLUSHALL keeps them), so the first variant does not count them
        before = await used_memory(env, idle_clients)
        async with SessionManager(settings=settings) as manager:
            ours = await timed(functools.partial(_create, manager, data, attributes, count))
            await manager.flush()  # the steady state: clean, with a TTL, out of the dirty index
            hashes, indexes = await _memory_usage(env, manager, HotTier(redis, settings), count)
        del manager
        ours_bytes = (await used_memory(env, idle_clients) - before) / count
        await env.wipe_redis()
        before = await used_memory(env, idle_clients)
        raw = RawRedis(redis_client(env.redis_url), env.key_prefix("raw"), TIMEOUT_SECS)
        raw_sample = await timed(functools.partial(_create_raw, raw, data, attributes, count))
        await raw.client.aclose()
        raw_bytes = (await used_memory(env, idle_clients) - before) / count
        if variant == "small":
            samples = {OURS: ours, "redis_py SET EX": raw_sample}
        per_variant[variant] = {"payload_bytes": payload, "ours_bytes_per_session": round(ours_bytes, 1),
                                "ours_hash_memory_usage": round(hashes, 1),
                                "ours_index_share": round(indexes, 1),
                                "redis_py_bytes_per_session": round(raw_bytes, 1)}
    small = per_variant["small"]
    figures = {name: Figure.from_samples([sample]) for name, sample in samples.items()}
    result = ScenarioResult("memory", f"Redis bytes per session (INFO used_memory delta / {count}); ops/s: "
                            "creating the small sessions", figures)
    result.targets = [Target(f"small session: bytes ≤ payload ({small['payload_bytes']:.0f} B) + 300",
                             small["ours_bytes_per_session"], small["payload_bytes"] + 300, False, unit=" B")]
    result.extra = {"sessions": count, "variants": per_variant,
                    "payload_is": "len(JSON of data + attributes), what the application stores"}
    return result


async def _create(manager: SessionManager, data: dict[str, Any], attributes: dict[str, str], count: int) -> int:
    return len(await run_many(lambda: new_session(manager, data, attributes), count, TASKS))


async def _create_raw(raw: RawRedis, data: dict[str, Any], attributes: dict[str, str], count: int) -> int:
    return len(await run_many(lambda: raw.create(data, attributes), count, TASKS))


async def _memory_usage(env: Env, manager: SessionManager, layout: HotTier, count: int) -> tuple[float, float]:
    """MEMORY USAGE of a sample of session hashes, and of the per-partition keys (dirty index, live counts)
    shared out per session."""
    assert env.redis is not None
    ids = (await manager.list_ids())[:200]
    hashes = [await env.redis.memory_usage(layout.keys(sid).session, samples=0) or 0 for sid in ids]
    indexes = 0
    for partition in range(layout.partitions):
        for key in (layout.counts_key(partition), layout.dirty_key(partition)):
            indexes += await env.redis.memory_usage(key, samples=0) or 0
    return statistics.mean(hashes) if hashes else 0.0, indexes / count


SCENARIOS: dict[str, Scenario] = {"memory": memory}
