"""The flusher: draining a big backlog (against raw unnest upserts), coalescing, and flush lag under load."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import statistics
import time

import asyncpg

from tiered_sessions import SessionManager

from ..baselines import unnest
from ..env import Env, new_session, session_row
from ..harness import OURS, Sample, ScenarioResult, Target, alternate, percentile, run_many, timed, window
from . import Scenario

TASKS = 64
LAG_RATE = 10_000.0  # updates per second, the steady load


async def drain(env: Env) -> ScenarioResult:
    """Time ``manager.flush()`` of a backlog of new dirty sessions (claim, read, upsert, ack) against the same
    number of rows written by raw 1000-row unnest upserts."""
    backlog = env.size(200_000, 3000)
    settings = await env.settings("drain", run_flusher=False)
    await env.settings("unnest")
    connection = await asyncpg.connect(env.database_url)
    try:
        async with SessionManager(settings=settings) as manager:
            assert manager.flusher is not None
            flusher = manager.flusher

            async def ours() -> Sample:
                await env.wipe_redis()
                await env.truncate("drain")
                await run_many(lambda: new_session(manager), backlog, 256)

                async def work() -> int:
                    before = flusher.totals.written
                    left = await manager.flush()
                    if left:
                        raise RuntimeError(f"flush left {left} sessions dirty")
                    return flusher.totals.written - before

                return await timed(work)

            async def raw() -> Sample:
                await env.truncate("unnest")
                now = time.time()
                rows = [session_row(secrets.token_urlsafe(32), now) for _ in range(backlog)]
                return await timed(lambda: unnest.write_all(connection, env.table("unnest"), rows))

            figures = await alternate({OURS: ours, "raw unnest upsert": raw}, env.rounds)
    finally:
        await connection.close()
    result = ScenarioResult("drain", f"flush() of {backlog} dirty sessions, rows/s end to end", figures)
    result.targets = [Target("≥ 0.9x raw asyncpg unnest upsert rate", result.ratios["raw unnest upsert"], 0.9, True)]
    result.extra = {"backlog": backlog, "seconds": {name: round(f.seconds, 3) for name, f in figures.items()}}
    return result


async def coalescing(env: Env) -> ScenarioResult:
    """About 100 updates per session per flush interval: how many rows reach PostgreSQL per session touched."""
    settings = await env.settings("sessions")
    interval = settings.flush_interval_secs
    seconds = env.seconds if env.quick else max(env.seconds, 20 * interval)  # edge effects under 5%
    await env.wipe_redis()
    async with SessionManager(settings=settings) as manager:
        assert manager.flusher is not None
        flusher = manager.flusher
        ids = [s.session_id for s in await run_many(lambda: new_session(manager), 1000, TASKS)]
        await manager.flush()
        pick = random.Random(6).choice
        calibration = await window(lambda _: manager.update_activity(pick(ids), 5), TASKS, min(1.0, env.seconds))
        touched_per_interval = max(1, int(calibration.ops_per_s * interval / 100))
        hot = ids[:touched_per_interval]
        ratios: list[float] = []
        per_update: list[float] = []
        achieved: list[float] = []

        async def ours() -> Sample:
            await manager.flush()
            written_before = flusher.totals.written
            touched: set[tuple[int, str]] = set()   # (interval number, session id)
            counter = itertools.count()
            started = time.perf_counter()

            async def op(_: int) -> object:
                sid = hot[next(counter) % len(hot)]
                touched.add((int((time.perf_counter() - started) / interval), sid))
                return await manager.update_activity(sid, 5)

            sample = await window(op, TASKS, seconds)
            await manager.flush()
            rows = flusher.totals.written - written_before
            ratios.append(rows / len(touched))
            per_update.append(rows / max(1, sample.ops))
            achieved.append(sample.ops / max(1, len(touched)))
            return sample

        figures = await alternate({OURS: ours}, env.rounds)
    result = ScenarioResult("coalescing", f"update_activity on {len(hot)} sessions (~100 updates per session per "
                            f"{interval}s flush interval), {TASKS} tasks", figures)
    ratio = statistics.median(ratios)
    result.targets = [Target("rows written ≤ 1.1 x sessions touched per interval", ratio, 1.1, False)]
    result.extra = {"rows_per_session_touched_per_interval": [round(r, 3) for r in ratios],
                    "rows_per_update": round(statistics.median(per_update), 5),
                    "updates_per_session_per_interval": round(statistics.median(achieved), 1),
                    "sessions": len(hot), "window_seconds": seconds,
                    "write_through_rows_per_update": 1.0}
    return result


async def flush_lag(env: Env) -> ScenarioResult:
    """A steady 10k update_activity/s over 10k sessions; the flush lag (age of the oldest dirty session) is read
    every 50 ms with ``Flusher.update_gauges()``."""
    sessions = env.size(10_000, 500)
    settings = await env.settings("sessions")
    bound = settings.flush_interval_secs + 0.25
    await env.wipe_redis()
    async with SessionManager(settings=settings) as manager:
        assert manager.flusher is not None
        flusher = manager.flusher
        ids = [s.session_id for s in await run_many(lambda: new_session(manager), sessions,
                                                    TASKS)]
        await manager.flush()
        pick = random.Random(7).choice
        lag_p99: list[float] = []
        lag_max: list[float] = []

        async def ours() -> Sample:
            lags: list[float] = []
            stop = asyncio.Event()
            measure_from = time.perf_counter() + env.warmup

            async def sample_lag() -> None:
                while not stop.is_set():
                    _, lag = await flusher.update_gauges()
                    if time.perf_counter() >= measure_from:
                        lags.append(lag)
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample_lag())
            sample = await window(lambda _: manager.update_activity(pick(ids), 5), TASKS, env.seconds,
                                  warmup=env.warmup, rate=LAG_RATE)
            stop.set()
            await sampler
            await manager.flush()
            lag_p99.append(percentile(lags, 99))
            lag_max.append(max(lags, default=0.0))
            return sample

        figures = await alternate({OURS: ours}, env.rounds)
    result = ScenarioResult("flush_lag", f"steady {LAG_RATE:,.0f} update_activity/s over {sessions} sessions, "
                            "lag sampled every 50 ms", figures)
    result.targets = [Target(f"flush lag p99 ≤ flush interval + 250 ms ({bound:.2f} s)", statistics.median(lag_p99),
                             bound, False, unit=" s")]
    result.extra = {"lag_p99_s_per_round": [round(x, 3) for x in lag_p99],
                    "lag_max_s_per_round": [round(x, 3) for x in lag_max], "offered_rate": LAG_RATE}
    return result


SCENARIOS: dict[str, Scenario] = {"drain": drain, "coalescing": coalescing, "flush_lag": flush_lag}
