"""``tiered-sessions demo``: a workload, a Redis wipe, and proof that every session comes back. On servers of
your own it keeps to its own table and key prefix and, when it ends, removes every row and key it wrote
(keys without a TTL included), so it can run again and leaves nothing behind."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .cold_tier import connect_once
from .config import Settings, redact_url
from .manager import SessionManager
from .migrate import migrate

log = logging.getLogger(__name__)
DEMO_TABLE = "tiered_sessions_demo"
DEMO_KEY_PREFIX = "tsdemo"


@contextlib.contextmanager
def _servers(settings: Settings, data_dir: str | None, console: Console) -> Iterator[Settings]:
    """Embedded Redis / PostgreSQL for whichever URL is not configured."""
    with contextlib.ExitStack() as stack:
        from . import embedded

        root = Path(data_dir) if data_dir else None
        if not settings.redis_url:
            redis = stack.enter_context(embedded.RedisServer(data_dir=root / "redis" if root else None))
            console.print(f"embedded Redis on {redis.url}")
            settings = dataclasses.replace(settings, redis_url=redis.url)
        if not settings.database_url:
            console.print("starting embedded PostgreSQL (first start runs initdb: a few seconds)...")
            postgres = stack.enter_context(embedded.PostgresServer(data_dir=root / "postgres" if root else None))
            console.print(f"embedded PostgreSQL on {postgres.url}")
            settings = dataclasses.replace(settings, database_url=postgres.url)
        yield settings


async def _wipe_keys(redis_url: str, prefix: str) -> int:
    """Delete only the demo's keys (never FLUSHALL someone's Redis)."""
    client = Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


async def _clean_up(settings: Settings) -> None:
    """Remove every row and key the demo wrote: its table and prefix are its own."""
    assert settings.redis_url
    await _wipe_keys(settings.redis_url, settings.key_prefix)
    connection = await connect_once(settings)
    try:
        for table in (settings.qualified_table, settings.qualified_journal, settings.qualified_layout):
            await connection.execute(f"DELETE FROM {table}")
    finally:
        await connection.close()


async def run_demo(args: argparse.Namespace, console: Console,
                   make_progress: Callable[[Console, bool], Progress]) -> int:
    given = {"redis_url": args.redis_url, "database_url": args.database_url, "schema": args.schema,
             "partitions": args.partitions}
    base = Settings.from_env(**{name: value for name, value in given.items() if value is not None})
    # Its own table and key prefix: the demo must never touch real sessions.
    base = dataclasses.replace(base, table=DEMO_TABLE, key_prefix=DEMO_KEY_PREFIX, max_concurrent_sessions=None,
                               flush_interval_secs=0.25)
    quiet = bool(args.json)
    out = Console(stderr=True) if quiet else console
    with _servers(base, args.data_dir, out) as settings:
        assert settings.redis_url and settings.database_url
        await migrate(settings)
        try:
            summary = await _workload(settings, args, out, make_progress, quiet)
        except BaseException:
            # The workload's failure is the one to report: a cleanup failing too (servers down) is logged.
            try:
                await _clean_up(settings)
            except Exception:  # logged; the workload's error is the one that propagates
                log.exception("the demo could not clean up after its failure")
            raise
        await _clean_up(settings)
        summary["redis"] = redact_url(settings.redis_url)
        summary["postgres"] = redact_url(settings.database_url)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(console, summary)
    return 0 if summary["lost"] == 0 else 1


async def _workload(settings: Settings, args: argparse.Namespace, console: Console,
                    make_progress: Callable[[Console, bool], Progress], quiet: bool) -> dict[str, Any]:
    sessions, updates = args.sessions, args.updates
    run = secrets.token_hex(4)  # fresh ids each run, even with a kept --data-dir
    ids = [f"demo-{run}-{i:07d}" for i in range(sessions)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for sid in ids:
        queue.put_nowait(sid)
    max_lag = 0.0
    async with SessionManager(settings=settings) as manager:
        with make_progress(console, quiet) as progress:
            task = progress.add_task("workload", total=sessions)

            async def worker() -> None:
                while not queue.empty():
                    sid = queue.get_nowait()
                    await manager.ensure(sid, user_id=f"user-{hash(sid) % 97}", data={"cart": []})
                    for _ in range(updates):
                        await manager.update_activity(sid, request_duration_ms=7)
                    await manager.update(sid, data={"cart": [1, 2, 3], "step": "checkout"})
                    progress.advance(task)

            started = time.perf_counter()
            workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=0.25)
                assert manager.flusher is not None
                max_lag = max(max_lag, (await manager.flusher.update_gauges())[1])
            for w in workers:
                w.result()
            elapsed = time.perf_counter() - started
        await manager.flush()
        assert manager.flusher is not None
        rows = manager.flusher.totals.written
    operations = sessions * (updates + 2)
    console.print(f"wiping the demo's Redis keys ({settings.key_prefix}:*) to simulate a cold Redis")
    await _wipe_keys(settings.redis_url or "", settings.key_prefix)
    async with SessionManager(settings=settings) as cold:
        back = 0
        with make_progress(console, quiet) as progress:
            reads = progress.add_task("reads (from PostgreSQL)", total=sessions)
            for sid in ids:
                session = await cold.get(sid)
                if (session is not None and session.request_count == updates
                        and session.data.get("step") == "checkout"):
                    back += 1
                progress.advance(reads)
        await _wipe_keys(settings.redis_url or "", settings.key_prefix)
        with make_progress(console, quiet) as progress:
            recovery = progress.add_task("recover_all_sessions()", total=sessions)
            recovered = await cold.recover_all_sessions(
                lambda done, total: progress.update(recovery, completed=done, total=total))
    return {
        "sessions": sessions, "operations": operations, "seconds": round(elapsed, 3),
        "ops_per_second": round(operations / elapsed), "writes": sessions * (updates + 2),
        "rows_written": rows, "max_flush_lag_seconds": round(max_lag, 3),
        "served_from_postgres_after_wipe": back, "recovered_by_recover_all": recovered,
        "lost": sessions - back,
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="tiered_sessions demo", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_row("Redis / PostgreSQL", f"{summary['redis']} / {summary['postgres']}")
    table.add_row("sessions", str(summary["sessions"]))
    table.add_row("operations (ensure + updates)", f"{summary['operations']} in {summary['seconds']} s")
    table.add_row("throughput", f"{summary['ops_per_second']} ops/s")
    table.add_row("rows written to PostgreSQL", f"{summary['rows_written']} for {summary['writes']} writes "
                                                f"({summary['writes'] / max(summary['rows_written'], 1):.0f}x "
                                                "coalescing)")
    table.add_row("max flush lag seen", f"{summary['max_flush_lag_seconds']} s")
    table.add_row("after wiping Redis: served from PostgreSQL",
                  f"{summary['served_from_postgres_after_wipe']} / {summary['sessions']}")
    table.add_row("recover_all_sessions() after a second wipe", str(summary["recovered_by_recover_all"]))
    table.add_row("lost", str(summary["lost"]))
    console.print(table)
