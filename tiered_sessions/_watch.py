"""``tiered-sessions stats --watch``: a live table (or JSON lines) of the tier's state, refreshed every interval.

Lag, backlog, live sessions and stored dead letters are global readings of Redis (the same ones the flusher
exports as metrics). Throughput is the number of rows PostgreSQL wrote into the sessions table per second,
from its table statistics (``pg_stat_user_tables``: inserts + updates, by every flusher), so it needs no
flusher to be scraped; PostgreSQL publishes those counters about once a second, so short intervals are jumpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import signal
import time
from typing import Any

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import metrics
from .cold_tier import connect_once
from .config import Settings, redact_message, redact_url
from .errors import ConfigurationError, PostgresUnavailable
from .manager import SessionManager

log = logging.getLogger(__name__)

_ROWS_WRITTEN = """SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2"""


class _RowsWritten:
    """Rows written into the sessions table so far, as PostgreSQL's statistics count them (None: unknown)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection: asyncpg.Connection | None = None
        self.problem: str | None = None if settings.database_url else "no database URL"

    async def read(self) -> int | None:
        url = self.settings.database_url
        if not url:
            return None
        try:
            if self.connection is None or self.connection.is_closed():
                self.connection = await connect_once(self.settings)
            value = await self.connection.fetchval(_ROWS_WRITTEN, self.settings.schema, self.settings.table,
                                                   timeout=self.settings.socket_timeout_secs)
        except (PostgresUnavailable, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            problem = f"PostgreSQL at {redact_url(url)}: {type(exc).__name__}: {redact_message(str(exc), url)}"
            if problem != self.problem:
                log.warning("throughput unknown: %s", problem)
            self.problem = problem
            await self.close()
            return None
        self.problem = None if value is not None else f"no table {self.settings.qualified_table}"
        return None if value is None else int(value)

    async def close(self) -> None:
        if self.connection is not None:
            connection, self.connection = self.connection, None
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await connection.close(timeout=1)


async def watch_stats(settings: Settings, console: Console, *, interval: float, count: int | None,
                      as_json: bool) -> int:
    if interval <= 0:
        raise ConfigurationError("--interval must be > 0")
    if count is not None and count < 1:
        raise ConfigurationError("--count must be >= 1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    rows_written = _RowsWritten(settings)
    title = f"tiered_sessions ({settings.key_prefix}, {settings.partitions} partitions)"
    previous: tuple[float, int] | None = None
    shown = 0
    try:
        async with SessionManager(settings=settings) as manager:
            with Live(_table(title, None, None), console=console, auto_refresh=False,
                      transient=False) if not as_json else contextlib.nullcontext() as live:
                while not stop.is_set():
                    reading = await metrics.refresh(manager)
                    written = await rows_written.read()
                    now = time.monotonic()
                    rate = None
                    if written is not None and previous is not None and now > previous[0]:
                        rate = max(0, written - previous[1]) / (now - previous[0])
                    previous = (now, written) if written is not None else None
                    row = {"time": time.time(), "flush_lag_seconds": round(reading.flush_lag_seconds, 3),
                           "dirty_sessions": reading.dirty_sessions, "total_sessions": reading.live_sessions,
                           "dead_letters": reading.dead_letters_stored,
                           "rows_written_per_second": None if rate is None else round(rate, 1)}
                    if live is None:
                        print(json.dumps(row), flush=True)
                    else:
                        live.update(_table(title, row, rows_written.problem), refresh=True)
                    shown += 1
                    if count is not None and shown >= count:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)
    finally:
        await rows_written.close()
    return 0


def _table(title: str, row: dict[str, Any] | None, problem: str | None) -> Table:
    table = Table(title=title, caption="Ctrl-C to stop")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if row is None:
        table.add_row("reading", "…")
        return table
    rate = row["rows_written_per_second"]
    # The names `stats` prints, for the same quantities.
    table.add_row("flush_lag_seconds", f"{row['flush_lag_seconds']:.3f}")
    table.add_row("dirty_sessions", str(row["dirty_sessions"]))
    table.add_row("total_sessions", str(row["total_sessions"]))
    table.add_row("dead_letters", str(row["dead_letters"]))
    table.add_row("rows_written_per_second",
                  f"{rate:.1f}" if rate is not None else f"n/a ({problem})" if problem else "n/a (next refresh)")
    table.add_row("updated", datetime.datetime.fromtimestamp(row["time"]).strftime("%H:%M:%S"))
    return table
