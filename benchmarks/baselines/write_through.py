"""Write-through: every update is an ``INSERT ... ON CONFLICT DO UPDATE`` of the full row, through an asyncpg
pool of 32 connections; the process keeps its own copy of each row (as the seed's in-memory manager did)."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from .unnest import COLUMNS

_UPDATABLE = [column for column in COLUMNS if column != "session_id"]
_REQUESTS, _DURATION, _LAST, _EXPIRES, _VERSION = (COLUMNS.index(name) for name in (
    "request_count", "total_duration_ms", "last_activity_at", "expires_at", "version"))


def upsert_sql(table: str) -> str:
    values = ", ".join(f"to_timestamp(${i + 1})" if column.endswith(("_at",)) else f"${i + 1}"
                       for i, column in enumerate(COLUMNS))
    updates = ", ".join(f"{column} = excluded.{column}" for column in _UPDATABLE)
    return (f"INSERT INTO {table} ({', '.join(COLUMNS)}, updated_at) VALUES ({values}, now()) "
            f"ON CONFLICT (session_id) DO UPDATE SET {updates}, updated_at = now()")


class WriteThrough:
    def __init__(self, pool: asyncpg.Pool, table: str, timeout_secs: float) -> None:
        self.pool = pool
        self.sql = upsert_sql(table)
        self.timeout = timeout_secs
        self.rows: dict[str, list[Any]] = {}

    @classmethod
    async def connect(cls, url: str, table: str, timeout_secs: float, size: int = 32) -> WriteThrough:
        pool = await asyncpg.create_pool(url, min_size=size, max_size=size)
        return cls(pool, table, timeout_secs)

    async def close(self) -> None:
        await self.pool.close()

    async def create(self, row: tuple[Any, ...]) -> None:
        """Insert a new session (row values in ``COLUMNS`` order)."""
        self.rows[row[0]] = list(row)
        await self.pool.execute(self.sql, *row)

    async def update_activity(self, session_id: str, duration_ms: int) -> None:
        row = self.rows[session_id]
        now = time.time()
        row[_REQUESTS] += 1
        row[_DURATION] += duration_ms
        row[_LAST] = now
        row[_EXPIRES] = now + self.timeout
        row[_VERSION] += 1
        await self.pool.execute(self.sql, *row)
