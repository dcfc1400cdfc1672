"""The hot path against the raw SET and GET of every Python Redis client a user could pick (redis-py,
valkey-glide, coredis), on the same sessions, 64 tasks: ours must beat the best of them."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from ..baselines.peers import PeerSessions, connect_peers
from ..env import Env
from ..harness import OURS, Sample, ScenarioResult, Target, alternate, window
from . import Scenario
from .hot_path import DURATION_MS, HOT_SESSIONS, TASKS, contenders


def _best(result: ScenarioResult) -> tuple[str, float]:
    """The fastest peer and our ratio to it."""
    name = min(result.ratios, key=lambda peer: result.ratios[peer])
    return name, result.ratios[name]


async def _against_peers(env: Env, name: str, describe: str, ours_call: str, peer_call: str,
                         raw_label: str) -> ScenarioResult:
    async with contenders(env, HOT_SESSIONS) as (manager, raw, _, ids), AsyncExitStack() as stack:
        peers = [PeerSessions(raw, peer) for peer in await connect_peers(env.redis_url, stack)]
        pick = random.Random(6).choice

        def timed(call: Callable[[str], Awaitable[Any]]) -> Callable[[], Awaitable[Sample]]:
            return lambda: window(lambda _: call(pick(ids)), TASKS, env.seconds, warmup=env.warmup)

        def ours(sid: str) -> Awaitable[Any]:
            if ours_call == "update_activity":
                return manager.update_activity(sid, DURATION_MS)
            return manager.get(sid)

        async def ours_settled() -> Sample:
            sample = await timed(ours)()
            await manager.flush()  # the next contender does not pay for our writes behind
            return sample

        def raw_call(client: Any) -> Callable[[str], Awaitable[Any]]:
            if peer_call == "update_activity":
                return lambda sid: client.update_activity(sid, DURATION_MS)
            return client.get  # type: ignore[no-any-return]

        contenders_by_name: dict[str, Callable[[], Awaitable[Sample]]] = {
            OURS: ours_settled, f"redis_py {raw_label}": timed(raw_call(raw))}
        for peer in peers:
            contenders_by_name[f"{peer.peer.name} {raw_label}"] = timed(raw_call(peer))
        figures = await alternate(contenders_by_name, env.rounds)
    return ScenarioResult(name, describe, figures)


async def update_against_peers(env: Env) -> ScenarioResult:
    result = await _against_peers(env, "peers_update", f"update_activity vs each client's raw SET EX of the "
                                  f"session's JSON, {HOT_SESSIONS} sessions, {TASKS} tasks",
                                  "update_activity", "update_activity", "SET EX")
    best, ratio = _best(result)
    result.targets = [Target(f"≥ 2x the best raw SET EX ({best}) @64", ratio, 2.0, True)]
    return result


async def get_against_peers(env: Env) -> ScenarioResult:
    result = await _against_peers(env, "peers_get", f"get vs each client's raw GET (and JSON decode), "
                                  f"{HOT_SESSIONS} sessions, {TASKS} tasks", "get", "get", "GET")
    best, ratio = _best(result)
    result.targets = [Target(f"≥ 1x the best raw GET ({best}) @64", ratio, 1.0, True)]
    return result


SCENARIOS: dict[str, Scenario] = {"peers_update": update_against_peers, "peers_get": get_against_peers}
