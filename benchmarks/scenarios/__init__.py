"""The scenarios, by name, in the order a full run takes them. Each runs every round of every contender."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..env import Env
from ..harness import ScenarioResult

Scenario = Callable[[Env], Awaitable[ScenarioResult]]


def load() -> dict[str, Scenario]:
    from . import hot_path, memory, peers, recovery, seed_timings, write_behind

    return {**hot_path.SCENARIOS, **peers.SCENARIOS, **write_behind.SCENARIOS, **recovery.SCENARIOS,
            **memory.SCENARIOS, **seed_timings.SCENARIOS}
