"""The seed's timing assertions (its tests/week3/test_performance.py and tests/week2/test_session_cleanup.py:
50 concurrent ensure() within 5 s, 20 sessions' update_activity + get within 2 s, a cleanup of 100 timed-out
sessions within 1 s) as a scenario, at 1000 sessions, with persistence on and off. The ported tests keep the
seed's checks of what happens; how long it takes is measured here, on a machine meant for it."""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import AsyncExitStack

from tiered_sessions import SessionManager

from ..env import Env
from ..harness import OURS, Sample, ScenarioResult, Target, alternate
from . import Scenario

TIMEOUT_SECS = 1.0  # the sessions of a round time out before its cleanup is timed (the wait is not timed)
PHASES = {  # phase: the seed's bound at its size, in seconds (kept at 1000 sessions)
    "ensure": 5.0,
    "update_activity + get": 2.0,
    "cleanup": 1.0,
}
OFF = "persistence off"


async def _round(manager: SessionManager, count: int, seconds: dict[str, list[float]]) -> Sample:
    """One round on fresh ids: concurrent ensure(), concurrent update_activity() + get(), then (once they timed
    out) cleanup_stale_sessions(), which must count every one."""
    ids = [f"seed-{secrets.token_hex(8)}" for _ in range(count)]
    started = time.perf_counter()
    await asyncio.gather(*(manager.ensure(sid) for sid in ids))
    created = time.perf_counter()
    await asyncio.gather(*(call for sid in ids for call in (manager.update_activity(sid), manager.get(sid))))
    operated = time.perf_counter()
    await asyncio.sleep(TIMEOUT_SECS * 1.1)
    cleaning = time.perf_counter()
    cleaned = await manager.cleanup_stale_sessions()
    done = time.perf_counter()
    if cleaned != count:
        raise AssertionError(f"cleanup_stale_sessions() counted {cleaned} of {count} timed-out sessions")
    for phase, took in zip(PHASES, (created - started, operated - created, done - cleaning), strict=True):
        seconds[phase].append(took)
    return Sample(count * 4, (created - started) + (operated - created) + (done - cleaning))


async def seed_timings(env: Env) -> ScenarioResult:
    count = env.size(1000, 100)
    seconds: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in (OURS, OFF)}
    async with AsyncExitStack() as stack:
        on = await stack.enter_async_context(SessionManager(
            settings=await env.settings("seed_on", session_timeout_secs=TIMEOUT_SECS)))
        off = await stack.enter_async_context(SessionManager(
            settings=await env.settings("seed_off", session_timeout_secs=TIMEOUT_SECS, enable_persistence=False)))

        async def ours() -> Sample:
            return await _round(on, count, seconds[OURS])

        async def without_persistence() -> Sample:
            return await _round(off, count, seconds[OFF])

        figures = await alternate({OURS: ours, OFF: without_persistence}, env.rounds)
    result = ScenarioResult("seed_timings", f"the seed's timed session-manager tests at {count} sessions: "
                                            "ensure, update_activity + get, cleanup of the timed-out", figures)
    medians = {name: {phase: sorted(taken)[len(taken) // 2] for phase, taken in phases.items()}
               for name, phases in seconds.items()}
    result.targets = [Target(f"{phase} of {count} sessions ({'persistence on' if name == OURS else name}) "
                             f"≤ {bound:g} s", medians[name][phase], bound, False, unit=" s")
                      for name in (OURS, OFF) for phase, bound in PHASES.items()]
    result.extra = {"sessions": count, "median_seconds": {name: {phase: round(value, 4) for phase, value in
                                                                 phases.items()} for name, phases in medians.items()}}
    return result


SCENARIOS: dict[str, Scenario] = {"seed_timings": seed_timings}
