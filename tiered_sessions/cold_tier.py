"""The PostgreSQL side of the tier (asyncpg): batch upserts for the flusher, reads for read-through and
recovery, and the seed's direct-service API (``save_session``, ``load_session``, ...) for use on its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from . import metrics
from ._codec import check_json, validate_attribute, validate_session_id
from ._failures import POSTGRES_CONNECT, POSTGRES_DOWN, POSTGRES_TRANSIENT, describe
from ._sql import load_sql
from .config import Settings, redact_message, redact_url
from .errors import InvalidSessionData, MigrationError, PostgresUnavailable, SessionTooLarge
from .model import ACTIVE, STATES, ColdRecord, Session

log = logging.getLogger(__name__)

class Refusal(NamedTuple):
    """A flushed row Postgres does not hold as sent: its version guard refused it (Postgres holds a newer
    version, or the same one with other contents), or the row is gone. Not durable."""

    version: int | None  # the version Postgres holds; None: no row at all
    journaled: bool  # journal entries of the session are pending: the copy lacks writes Postgres has


class JournalEntry(NamedTuple):
    """A write taken while Redis was unreachable (``<table>_journal``), to fold back into Redis."""

    seq: int
    session_id: str
    op: str  # touch, merge, remove, create
    args: dict[str, Any]
    version_after: int  # the Postgres version after the write


class SessionPage(list[Session]):
    """A page of ``list_sessions``: a plain list, plus ``next_cursor`` (None on the last page)."""

    next_cursor: str | None = None


def asyncpg_dsn(url: str, statement_cache_size: int | None) -> tuple[str, int]:
    """Strip our own ``pgbouncer=true`` hint from the URL; a pooler in transaction mode (that hint, or
    Supavisor's port 6543) gets no server-side statement cache."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    behind_pooler = any(key == "pgbouncer" and value.lower() in ("1", "true") for key, value in query)
    behind_pooler = behind_pooler or parts.port == 6543
    dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "pgbouncer"])))
    if statement_cache_size is None:
        statement_cache_size = 0 if behind_pooler else 100
    return dsn, statement_cache_size


def unreachable(url: str, exc: BaseException) -> PostgresUnavailable:
    """The named error for a failed connection to ``url``: no password in it, and ``down`` when the server
    did not answer (as opposed to answering no)."""
    return PostgresUnavailable(f"cannot reach PostgreSQL at {redact_url(url)}: {type(exc).__name__}: "
                               f"{redact_message(str(exc), url)}", down=isinstance(exc, POSTGRES_DOWN))


async def connect_once(settings: Settings) -> asyncpg.Connection:
    """One connection to the database of ``settings`` (migrations, the stats watch): pooler-aware, bounded by
    the socket timeout, ``PostgresUnavailable`` when it cannot be had."""
    url = settings.require("database_url")
    dsn, cache_size = asyncpg_dsn(url, settings.pg_statement_cache_size)
    try:
        connection: asyncpg.Connection = await asyncpg.connect(dsn, statement_cache_size=cache_size,
                                                               timeout=settings.socket_timeout_secs)
    except POSTGRES_CONNECT as exc:
        raise unreachable(url, exc) from None
    return connection


class PostgresSessionStore:
    """The cold tier. ``async with PostgresSessionStore(url) as store: await store.load_session(id)``."""

    def __init__(self, database_url: str | None = None, *, settings: Settings | None = None,
                 **setting_overrides: Any) -> None:
        self.settings = settings or Settings.from_env(database_url=database_url, **setting_overrides)
        self.url = self.settings.require("database_url")
        self.table = self.settings.qualified_table
        self._pool: asyncpg.Pool | None = None
        self._connect_lock = asyncio.Lock()
        self.sql = {name: load_sql(name, self.settings) for name in (
            "upsert_batch", "activity_batch", "load", "load_many", "live_page", "count_live", "list_page",
            "list_page_by_state", "save", "touch", "delete", "mark_expired", "purge", "degraded_touch",
            "degraded_merge", "degraded_create",
            "degraded_remove", "refusals", "journal_page", "journal_delete", "journal_count", "journal_list",
            "user_sessions", "layout")}

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._pool is not None:
                return
            dsn, cache_size = asyncpg_dsn(self.url, self.settings.pg_statement_cache_size)
            try:
                # min_size=0: while Postgres is down the pool does not log a failed "floor" on every attempt.
                pool = await asyncpg.create_pool(
                    dsn, min_size=0, max_size=self.settings.pg_pool_max_size,
                    statement_cache_size=cache_size, command_timeout=self.settings.socket_timeout_secs,
                    timeout=self.settings.socket_timeout_secs)
                try:
                    async with pool.acquire() as connection:
                        exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", self.table)
                except BaseException:
                    pool.terminate()  # not a graceful close: the server just failed us (it may hang)
                    raise
            except POSTGRES_CONNECT as exc:
                raise unreachable(self.url, exc) from None
            if not exists:
                await pool.close()
                raise MigrationError(f"table {self.table} does not exist at {redact_url(self.url)}: "
                                     "run `tiered-sessions migrate`")
            self._pool = pool

    async def close(self) -> None:
        """Close the pool gracefully (the queries under way end first); a hung server's at once (logged)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(self.settings.socket_timeout_secs):
                    await pool.close()
            except POSTGRES_TRANSIENT as exc:
                pool.terminate()
                metrics.BACKEND_ERRORS.labels("postgres", "close").inc()
                log.warning("PostgreSQL did not let its connections close (%s): closed them at once", describe(exc))

    def terminate(self) -> None:
        """Close every connection at once, queries under way or not."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise PostgresUnavailable("the store is not connected: await connect() first")
        return self._pool

    async def ready_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            await self.connect()
        return self.pool

    async def ping(self) -> None:
        """One round trip on a pooled connection (readiness)."""
        pool = await self.ready_pool()
        await pool.fetchval("SELECT 1")

    # -- the flusher's path ------------------------------------------------------------------------------
    async def upsert_batch(self, rows: Sequence[bytes]) -> dict[str, Refusal]:
        """Write rows (JSON objects as claim.lua builds them) in one statement. Returns the rows Postgres
        does not hold as sent (see ``Refusal``); a row held already at its version with the same contents (a
        duplicate flush) counts as written."""
        return await self._write_batch("upsert_batch", rows)

    async def write_activity_batch(self, rows: Sequence[bytes]) -> dict[str, Refusal]:
        """Write activity rows (version, times and counters of sessions Postgres holds whole) in one
        statement, under the same version guard. Returns what ``upsert_batch`` returns (a session with no
        row at all comes with version None)."""
        return await self._write_batch("activity_batch", rows)

    async def _write_batch(self, statement: str, rows: Sequence[bytes]) -> dict[str, Refusal]:
        batch = (b"[" + b",".join(rows) + b"]").decode()
        pool = await self.ready_pool()
        not_written = [row[0] for row in await pool.fetch(self.sql[statement], batch)]
        if not not_written:
            return {}
        # A statement of its own: it sees the rows concurrent flushes committed while the batch waited on them.
        refused = await pool.fetch(self.sql["refusals"], not_written, batch)
        return {row[0]: Refusal(None if row[1] is None else int(row[1]), bool(row[2])) for row in refused}

    # -- read-through and recovery ------------------------------------------------------------------------
    async def fetch(self, session_id: str) -> ColdRecord | None:
        pool = await self.ready_pool()
        row = await pool.fetchrow(self.sql["load"], session_id)
        return None if row is None else ColdRecord(*row)

    async def fetch_many(self, session_ids: Sequence[str]) -> dict[str, ColdRecord]:
        """The rows of these ids that Postgres holds, in one query."""
        pool = await self.ready_pool()
        return {row[0]: ColdRecord(*row) for row in await pool.fetch(self.sql["load_many"], list(session_ids))}

    async def count_live(self) -> int:
        pool = await self.ready_pool()
        return int(await pool.fetchval(self.sql["count_live"]))

    async def iter_live(self, page_size: int = 1000) -> AsyncIterator[list[ColdRecord]]:
        """Every live session, a page at a time, by keyset pagination (stable under concurrent writes)."""
        async for rows in self.iter_live_rows(page_size):
            yield [ColdRecord(*row) for row in rows]

    async def iter_live_rows(self, page_size: int = 1000) -> AsyncIterator[list[asyncpg.Record]]:
        """As ``iter_live``, the rows as read (ColdRecord's fields, in order)."""
        pool = await self.ready_pool()
        after = ""
        while True:
            rows = await pool.fetch(self.sql["live_page"], after, page_size)
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    async def user_session_ids(self, user_id: str) -> list[str]:
        pool = await self.ready_pool()
        return [row[0] for row in await pool.fetch(self.sql["user_sessions"], user_id)]

    # -- the seed's direct-service API --------------------------------------------------------------------
    async def save_session(self, session_id: str, session_data: Mapping[str, Any] | None = None,
                           metadata: Mapping[str, Any] | None = None, *, state: str = ACTIVE,
                           user_id: str | None = None, user_type: str | None = None,
                           ip_address: str | None = None, user_agent: str | None = None,
                           timeout_secs: float | None = None, request_count: int | None = None,
                           total_duration_ms: int | None = None) -> int:
        """Replace a session's data and metadata (and its counters, when given); returns its new version."""
        validate_session_id(session_id)
        if state not in STATES:
            raise InvalidSessionData(f"state must be one of {', '.join(STATES)}, got {state!r}")
        counters = (request_count, total_duration_ms)
        if any(c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 2**63)
               for c in counters):
            raise InvalidSessionData("request_count and total_duration_ms must be non-negative integers")
        data_json = _json_object(session_data or {}, "session_data")
        meta_json = _json_object(metadata or {}, "metadata")
        if len(data_json) + len(meta_json) > self.settings.max_session_bytes:
            raise SessionTooLarge(f"session {session_id} would be {len(data_json) + len(meta_json)} bytes, "
                                  f"over max_session_bytes={self.settings.max_session_bytes}")
        attributes = [validate_attribute(name, value) for name, value in
                      (("user_id", user_id), ("user_type", user_type), ("ip_address", ip_address),
                       ("user_agent", user_agent))]
        timeout = self.settings.session_timeout_secs if timeout_secs is None else timeout_secs
        pool = await self.ready_pool()
        return int(await pool.fetchval(self.sql["save"], session_id, data_json, meta_json, state,
                                       *attributes, float(timeout), *counters))

    async def load_session(self, session_id: str) -> Session | None:
        """The live session, or None if it does not exist, was removed or has expired."""
        validate_session_id(session_id)
        record = await self.fetch(session_id)
        return record.to_session() if record is not None and record.is_live(time.time()) else None

    async def delete_session(self, session_id: str) -> bool:
        """Tombstone the session; True if there was something to delete."""
        validate_session_id(session_id)
        pool = await self.ready_pool()
        return bool(_rowcount(await pool.execute(self.sql["delete"], session_id)))

    async def update_session_activity(self, session_id: str, request_duration_ms: int = 0) -> bool:
        """Count one request in one atomic statement; False if the session is not live."""
        validate_session_id(session_id)
        if not isinstance(request_duration_ms, int) or request_duration_ms < 0:
            raise InvalidSessionData("request_duration_ms must be a non-negative integer")
        pool = await self.ready_pool()
        return bool(_rowcount(await pool.execute(self.sql["touch"], session_id, request_duration_ms)))

    async def list_sessions(self, state: str | None = None, limit: int = 100,
                            cursor: str | None = None) -> SessionPage:
        """A page of sessions ordered by id; pass ``page.next_cursor`` as ``cursor`` for the next one."""
        if state is not None and state not in STATES:
            raise InvalidSessionData(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidSessionData("limit must be an integer from 1 to 10000")
        pool = await self.ready_pool()
        after = cursor or ""
        if state is None:
            rows = await pool.fetch(self.sql["list_page"], after, limit + 1)
        else:
            rows = await pool.fetch(self.sql["list_page_by_state"], state, after, limit + 1)
        page = SessionPage(ColdRecord(*row).to_session() for row in rows[:limit])
        page.next_cursor = rows[limit - 1][0] if len(rows) > limit else None
        return page

    async def record_layout(self, layout: dict[str, str]) -> dict[str, str]:
        """Record ``layout`` unless a process did (layout.sql); returns the layout as recorded."""
        pool = await self.ready_pool()
        try:
            rows = await pool.fetch(self.sql["layout"], layout["layout"], layout["partitions"], layout["key_prefix"])
        except asyncpg.UndefinedTableError:
            raise MigrationError(f"table {self.settings.qualified_layout} does not exist at {redact_url(self.url)}: "
                                 "run `tiered-sessions migrate`") from None
        return {row[0]: row[1] for row in rows}

    # -- written through while Redis is unreachable (each statement journals its write) --------------------
    async def create_through(self, session_id: str, data: Mapping[str, Any], metadata: Mapping[str, Any],
                             attributes: Mapping[str, str | None], timeout_secs: float) -> bool:
        """A new life for a session Postgres does not hold alive (a live one is left as it is); True if this
        call made it."""
        pool = await self.ready_pool()
        version = await pool.fetchval(self.sql["degraded_create"], session_id, orjson.dumps(data).decode(),
                                      orjson.dumps(metadata).decode(), *_attribute_args(attributes), timeout_secs)
        return version is not None

    async def touch_through(self, session_id: str, duration_ms: int, timeout_secs: float) -> bool:
        """Count a request of a live session; False if it is not live."""
        pool = await self.ready_pool()
        return await pool.fetchval(self.sql["degraded_touch"], session_id, duration_ms, timeout_secs) is not None

    async def merge_through(self, session_id: str, data: Mapping[str, Any], metadata: Mapping[str, Any],
                            attributes: Mapping[str, str | None], state: str | None, max_bytes: int) -> int | None:
        """Merge top-level keys into a live session; its new version, or None if it is not live or the merge
        would pass ``max_bytes``."""
        pool = await self.ready_pool()
        version = await pool.fetchval(self.sql["degraded_merge"], session_id, orjson.dumps(data).decode(),
                                      orjson.dumps(metadata).decode(), *_attribute_args(attributes), state,
                                      max_bytes)
        return None if version is None else int(version)

    async def remove_through(self, session_id: str) -> None:
        pool = await self.ready_pool()
        await pool.fetchval(self.sql["degraded_remove"], session_id)

    # -- the journal (writes taken while Redis was unreachable) --------------------------------------------
    async def journal_pending(self) -> int:
        pool = await self.ready_pool()
        return int(await pool.fetchval(self.sql["journal_count"]))

    async def journal_list(self, limit: int) -> list[tuple[int, str, str, int, float]]:
        """The oldest entries as (seq, session id, operation, version after, created at): no contents."""
        pool = await self.ready_pool()
        return [(row[0], row[1], row[2], row[3], row[4].timestamp())
                for row in await pool.fetch(self.sql["journal_list"], limit)]

    async def replay_journal(self, apply: Callable[[list[JournalEntry]], Awaitable[None]], *, wait: bool,
                             page_size: int = 2000) -> int | None:
        """Hand the journal to ``apply`` a page at a time, oldest first, deleting each page once applied (in
        the page's transaction: a crash mid-replay leaves the page for the next replayer, which ``apply``
        must tolerate). One replayer at a time in the whole tier, so a session's entries reach Redis in
        order: with ``wait`` this waits for the current one, else returns None at once if there is one.
        Returns how many entries were applied."""
        total = 0
        pool = await self.ready_pool()
        lock = f"tiered_sessions:journal:{self.table}"
        async with pool.acquire() as connection:
            while True:
                async with connection.transaction():
                    if wait:
                        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock)
                    elif not await connection.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", lock):
                        return None if total == 0 else total
                    rows = await connection.fetch(self.sql["journal_page"], page_size)
                    if not rows:
                        return total
                    await apply([JournalEntry(seq, sid, op, orjson.loads(args), version)
                                 for seq, sid, op, args, version in rows])
                    await connection.execute(self.sql["journal_delete"], [row[0] for row in rows])
                    total += len(rows)

    async def mark_expired(self) -> list[ColdRecord]:
        """Mark the timed-out live rows expired; returns them (as they are now)."""
        pool = await self.ready_pool()
        return [ColdRecord(*row) for row in await pool.fetch(self.sql["mark_expired"])]

    async def cleanup_expired_sessions(self, older_than_days: int = 7) -> int:
        """Mark timed-out sessions expired, then delete expired and removed rows older than the retention.
        Returns how many rows were deleted."""
        if not isinstance(older_than_days, int) or older_than_days < 0:
            raise InvalidSessionData("older_than_days must be a non-negative integer")
        await self.mark_expired()
        pool = await self.ready_pool()
        return _rowcount(await pool.execute(self.sql["purge"], older_than_days))


def _attribute_args(attributes: Mapping[str, str | None]) -> tuple[str | None, ...]:
    return tuple(attributes.get(name) for name in ("user_id", "user_type", "ip_address", "user_agent"))


def _rowcount(status: str) -> int:
    """asyncpg returns the command tag ("UPDATE 3"); the count is its last word."""
    return int(status.rsplit(" ", 1)[-1])


def _json_object(document: Mapping[str, Any], what: str) -> str:
    if not isinstance(document, Mapping):
        raise InvalidSessionData(f"{what} must be a JSON object (a dict), got {type(document).__name__}")
    check_json(dict(document), what)
    try:
        return orjson.dumps(dict(document)).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidSessionData(f"{what}: cannot be stored as JSON: {exc}") from None


__all__: Sequence[str] = ("ColdRecord", "JournalEntry", "PostgresSessionStore", "Refusal", "SessionPage")
