"""Benchmark suite: tiered_sessions against raw redis-py, write-through and raw asyncpg, in one run.

    python -m benchmarks.run                          # every scenario, 5 rounds of 3 s: a table
    python -m benchmarks.run --quick --json           # every scenario tiny (CI smoke), machine-readable
    python -m benchmarks.run --scenario update_activity --scenario drain --plot docs/benchmarks-throughput.png

Without URLs it starts its own Redis and PostgreSQL (``tiered_sessions.embedded``; PostgreSQL with its
durable defaults, fsync on); with them it works in a fresh schema and under its own key prefix, and removes
both at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tiered_sessions.embedded import PostgresServer, RedisServer

from .env import Env
from .harness import ScenarioResult, render_tables
from .plot import plot_throughput
from .scenarios import load


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (keys under a bench prefix)")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of starting one (a fresh schema)")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="run only this scenario (repeatable); 'update_activity' picks every update_activity@N")
    parser.add_argument("--rounds", type=int, help="alternating rounds per scenario, median reported (default 5)")
    parser.add_argument("--seconds", type=float, help="measurement window per round (default 3)")
    parser.add_argument("--quick", action="store_true", help="every scenario tiny: 1 round of 0.25 s, small sets")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--save", type=Path, metavar="JSON", help="also write the JSON report to this file")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write throughput against concurrency here")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.seconds is None:
        args.seconds = 0.25 if args.quick else 3.0
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    return args


def select(wanted: list[str] | None, available: list[str]) -> list[str]:
    if not wanted:
        return available
    chosen: list[str] = []
    for name in wanted:
        matches = [s for s in available if s == name or s.split("@")[0] == name]
        if not matches:
            raise SystemExit(f"unknown scenario {name!r}; choose from: {', '.join(available)}")
        chosen += [m for m in matches if m not in chosen]
    return [name for name in available if name in chosen]  # the registry's order


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def machine(env: Env) -> dict[str, Any]:
    assert env.redis is not None and env.pg is not None
    cpu = cpu_model()
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    server = await env.redis.info("server")
    pg_version, fsync, commit = [await env.pg.fetchval(f"SHOW {name}") for name in
                                 ("server_version", "fsync", "synchronous_commit")]
    packages = {name: importlib.metadata.version(name) for name in ("redis", "hiredis", "asyncpg", "orjson")}
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(ram_gib, 1), "python": platform.python_version(),
            "platform": platform.platform(), "redis_server": server["redis_version"],
            "postgresql": pg_version, "postgresql_fsync": fsync, "postgresql_synchronous_commit": commit,
            "packages": packages}


async def run(args: argparse.Namespace, redis_url: str, database_url: str, own_redis: bool
              ) -> tuple[dict[str, Any], list[ScenarioResult]]:
    scenarios = load()
    names = select(args.scenario, list(scenarios))
    env = Env(redis_url, database_url, own_redis, args.rounds, args.seconds, args.quick)
    await env.start()
    results: list[ScenarioResult] = []
    try:
        about = await machine(env)
        for index, name in enumerate(names, 1):
            started = time.monotonic()
            print(f"[{index}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            result = await scenarios[name](env)
            results.append(result)
            print(f"[{index}/{len(names)}] {name} done in {time.monotonic() - started:.1f}s", file=sys.stderr,
                  flush=True)
    finally:
        await env.close()
    return about, results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        print("\n".join(load()))
        return 0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as servers:
        redis_url = args.redis_url or servers.enter_context(RedisServer()).url
        # The durable defaults (fsync on) for every contender: write-through is measured as deployed.
        database_url = args.database_url or servers.enter_context(PostgresServer(fast=False)).url
        about, results = asyncio.run(run(args, redis_url, database_url, own_redis=args.redis_url is None))
    targets = [t for r in results for t in r.targets]
    if args.plot is not None:
        plot_throughput(results, args.plot)
    command = "python -m benchmarks.run" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    report = json.dumps({
        "command": command, "machine": about,
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "quick": args.quick},
        "scenarios": {r.name: r.as_dict() for r in results},
        "summary": {"targets": len(targets), "passed": sum(t.passed for t in targets),
                    "missed": [f"{r.name}: {t.text}" for r in results for t in r.targets if not t.passed]},
    }, indent=2)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(report + "\n")
    if args.json:
        print(report)
    else:
        print(f"{command}\n{about['nproc']} x {about['cpu']}, {about['ram_gib']} GiB, Python {about['python']}, "
              f"redis-server {about['redis_server']}, PostgreSQL {about['postgresql']} (fsync "
              f"{about['postgresql_fsync']}); {args.rounds} rounds x {args.seconds:g} s, medians\n")
        print(render_tables(results))
        print(f"\n{sum(t.passed for t in targets)}/{len(targets)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
