"""Soak: minutes of write load under random faults, then an account of every acknowledged write.

    python benchmarks/soak.py --seconds 120            # a table
    python benchmarks/soak.py --seconds 120 --json     # one JSON object

It starts its own Redis (AOF, fsync always) and PostgreSQL, two ``tiered-sessions flusher`` processes, and a
writer (a SessionManager with degraded mode on) hammering 400 sessions, while an injector picks a fault every
1-3 s: SIGKILL a flusher mid-batch, SIGTERM one (drain), kill PostgreSQL for 1-3 s, kill Redis for 1-3 s
(it comes back warm from its AOF). Afterwards everything is drained and each session's row in PostgreSQL is
compared with what the writer was told succeeded: request counts and the last value merged into its data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from typing import Any

from tiered_sessions import SessionManager, Settings
from tiered_sessions.embedded import PostgresServer, RedisServer
from tiered_sessions.errors import BackendUnavailable, BackpressureError
from tiered_sessions.migrate import migrate

FAULTS = ["flusher-sigkill", "flusher-sigterm", "postgres-down", "redis-down"]
SESSIONS = 400
WRITERS = 16


class Soak:
    def __init__(self, redis: RedisServer, postgres: PostgresServer, seconds: float, seed: int,
                 kinds: list[str], min_faults: int = 0) -> None:
        self.redis, self.postgres, self.seconds, self.kinds = redis, postgres, seconds, kinds
        self.min_faults = min_faults
        self.random = random.Random(seed)
        self.settings = Settings(redis_url=redis.url, database_url=postgres.url, key_prefix="soak",
                                 flush_interval_secs=0.1, max_concurrent_sessions=None, socket_timeout_secs=1,
                                 redis_probe_interval_secs=0.2, drain_timeout_secs=60, run_flusher=False)
        self.ids = [f"soak-{i:04d}" for i in range(SESSIONS)]
        self.acked: Counter[str] = Counter()        # update_activity calls that returned True
        self.last_merge: dict[str, int] = {}         # last acknowledged value of data["n"], per session
        self.unconfirmed_merges: dict[str, set[int]] = {}  # values sent since then whose call failed
        self.ambiguous = 0                           # calls that failed on a dying connection: may have applied
        self.refused = Counter[str]()                # calls refused with a named error (not acknowledged)
        self.faults = Counter[str]()
        self.flushers: list[asyncio.subprocess.Process] = []
        self.stop = asyncio.Event()

    async def start_flusher(self) -> asyncio.subprocess.Process:
        env = {**os.environ, "TIERED_SESSIONS_REDIS_URL": self.redis.url,
               "TIERED_SESSIONS_DATABASE_URL": self.postgres.url, "TIERED_SESSIONS_KEY_PREFIX": "soak",
               "TIERED_SESSIONS_FLUSH_INTERVAL_SECS": "0.1", "TIERED_SESSIONS_FLUSH_BATCH_SIZE": "100",
               "TIERED_SESSIONS_SOCKET_TIMEOUT_SECS": "1"}
        return await asyncio.create_subprocess_exec(sys.executable, "-m", "tiered_sessions.cli", "flusher", env=env,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)

    async def writer(self, manager: SessionManager, owned: list[str]) -> None:
        counter = 0
        while not self.stop.is_set():
            sid = self.random.choice(self.ids)
            merging: str | None = None
            try:
                if await manager.update_activity(sid, request_duration_ms=1):
                    self.acked[sid] += 1
                merging = self.random.choice(owned)  # merges to a session come from one writer: order is known
                counter += 1
                await manager.update(merging, data={"n": counter})
                self.last_merge[merging] = counter
                self.unconfirmed_merges.pop(merging, None)
            except BackendUnavailable:
                self.ambiguous += 1
                if merging is not None:  # the connection died mid-call: it may have been applied
                    self.unconfirmed_merges.setdefault(merging, set()).add(counter)
                await asyncio.sleep(0.02)
            except BackpressureError:
                self.refused["backpressure"] += 1
            await asyncio.sleep(0)

    async def inject(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.random.uniform(1.0, 3.0))
            if self.stop.is_set():
                return
            kind = self.random.choice(self.kinds)
            self.faults[kind] += 1
            if kind.startswith("flusher"):
                index = self.random.randrange(len(self.flushers))
                victim = self.flushers[index]
                victim.send_signal(signal.SIGKILL if kind == "flusher-sigkill" else signal.SIGTERM)
                await victim.wait()
                self.flushers[index] = await self.start_flusher()
            elif kind == "postgres-down":
                await asyncio.to_thread(self.postgres.kill)
                await asyncio.sleep(self.random.uniform(1.0, 3.0))
                await asyncio.to_thread(self.postgres.start)
            else:
                await asyncio.to_thread(self.redis.kill)
                await asyncio.sleep(self.random.uniform(1.0, 3.0))
                await asyncio.to_thread(self.redis.start)

    async def run(self) -> dict[str, Any]:
        await migrate(self.settings)
        async with SessionManager(settings=self.settings) as manager:
            for sid in self.ids:
                await manager.ensure(sid)
            self.flushers = [await self.start_flusher() for _ in range(2)]
            owned = [self.ids[i::WRITERS] for i in range(WRITERS)]
            tasks = [asyncio.create_task(self.writer(manager, owned[i])) for i in range(WRITERS)]
            injector = asyncio.create_task(self.inject())
            await asyncio.sleep(self.seconds)
            # A slow machine may inject fewer faults in the time: run on until the minimum is met.
            while sum(self.faults.values()) < self.min_faults:  # noqa: ASYNC110 - polls a counter
                await asyncio.sleep(0.1)
            self.stop.set()
            await injector
            await asyncio.gather(*tasks)
            # Everything up again; wait until the writer is back in normal mode, then drain.
            if not self.redis.is_running():
                self.redis.start()
            if not self.postgres.is_running():
                self.postgres.start()
            while manager.degraded is not None and manager.degraded.active:  # noqa: ASYNC110 - polls a flag
                await asyncio.sleep(0.1)
            drain_started = time.perf_counter()
            while (await manager.get_session_metrics())["dirty_sessions"]:  # noqa: ASYNC110 - polls Redis
                await asyncio.sleep(0.05)
            drained_in = time.perf_counter() - drain_started
            for flusher in self.flushers:
                flusher.send_signal(signal.SIGTERM)
                await flusher.wait()
            assert manager.store is not None
            rows = {record.session_id: record async for page in manager.store.iter_live(1000) for record in page}
        found = sum(rows[sid].request_count for sid in self.ids if sid in rows)
        lost = sum(max(0, self.acked[sid] - (rows[sid].request_count if sid in rows else 0)) for sid in self.ids)
        extra = sum(max(0, rows[sid].request_count - self.acked[sid]) for sid in self.ids if sid in rows)
        # A session must hold its last acknowledged value, or a later one whose call failed mid-flight (the
        # server may have applied it before the connection died); anything else is a lost write.
        stored = {sid: json.loads(rows[sid].data_json).get("n") if sid in rows else None for sid in self.last_merge}
        merges_lost = sum(1 for sid, value in self.last_merge.items()
                          if stored[sid] != value and stored[sid] not in self.unconfirmed_merges.get(sid, ()))
        unconfirmed_applied = sum(1 for sid, value in self.last_merge.items()
                                  if stored[sid] != value and stored[sid] in self.unconfirmed_merges.get(sid, ()))
        return {
            "seconds": self.seconds, "sessions": SESSIONS, "faults": dict(self.faults),
            "writes_acknowledged": sum(self.acked.values()), "writes_found_in_postgres": found,
            "lost": lost, "counted_but_unacknowledged": extra, "ambiguous_failed_calls": self.ambiguous,
            "merged_sessions_checked": len(self.last_merge), "merges_lost": merges_lost,
            "failed_merges_found_applied": unconfirmed_applied,
            "refused": dict(self.refused), "seconds_to_drain_after_load": round(drained_in, 3),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to inject faults (default 120)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--min-faults", type=int, default=0,
                        help="keep the load and faults going past --seconds until this many faults were injected")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=FAULTS, metavar="FAULT",
                        help=f"which faults to inject (default all: {', '.join(FAULTS)})")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    with RedisServer(appendonly=True, extra_args=["--appendfsync", "always"]) as redis, \
            PostgresServer() as postgres:
        report = asyncio.run(Soak(redis, postgres, args.seconds, seed, args.faults,
                                        args.min_faults).run())
    report["seed"] = seed
    if args.json:
        print(json.dumps(report))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0 if report["lost"] == 0 and report["merges_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
