"""redis-py's cluster client, raw (no tiered_sessions): 64 tasks of pipelines on a fresh ``RedisCluster`` while a
master is SIGKILLed. A pipeline's retry calls the client's ``aclose()``, which closes every node connection,
including the ones other pipelines are writing on; those fail with ``AttributeError: 'NoneType' object has no
attribute 'writelines'`` instead of a ConnectionError. tiered_sessions turns that into a connection error
(``redis_client.closed_under_the_call``); this script shows the client's behaviour it works around.

    python -m tests.cluster_race --runs 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys

from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from tiered_sessions._redis_client import plain_url

from .local_cluster import LocalCluster

TASKS = 64


async def _pipelines(client: RedisCluster, errors: collections.Counter[str], stop: asyncio.Event, n: int) -> None:
    i = 0
    while not stop.is_set():
        pipe = client.pipeline(transaction=False)
        for k in range(4):
            pipe.incr(f"race-{n}-{i}-{k}")
        try:
            await pipe.execute()
        except (RedisError, RedisClusterException) as exc:
            errors[f"redis error: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.01)
        except Exception as exc:  # noqa: BLE001 - what this script counts: errors outside redis-py's own
            errors[f"OTHER: {type(exc).__name__}: {exc}"] += 1
            await asyncio.sleep(0.01)
        i += 1


async def one_run() -> collections.Counter[str]:
    errors: collections.Counter[str] = collections.Counter()
    with LocalCluster() as local:
        client = RedisCluster.from_url(plain_url(local.url), socket_timeout=3, socket_connect_timeout=3)
        await client.ping()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_pipelines(client, errors, stop, n)) for n in range(TASKS)]
        await asyncio.sleep(0.5)
        local.primaries()[0].kill()
        await asyncio.to_thread(local.wait_ok, local.masters, 20)
        await asyncio.sleep(3.0)  # through the failover (cluster-node-timeout 2000)
        stop.set()
        await asyncio.gather(*tasks)
        await client.aclose()
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster_race", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    hit = 0
    for run in range(1, args.runs + 1):
        errors = asyncio.run(one_run())
        other = {kind: count for kind, count in errors.items() if kind.startswith("OTHER")}
        hit += bool(other)
        print(f"run {run}: {dict(errors)}", flush=True)
    print(f"{hit} of {args.runs} runs raised errors outside redis-py's own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
