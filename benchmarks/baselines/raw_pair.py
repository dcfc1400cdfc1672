"""asyncpg and redis-py side by side, no scripts: a session is a Redis hash of its columns.

- ``get``: cache-aside read: HGETALL; on a miss SELECT the row and write it back (HSET + PEXPIREAT, pipelined).
- ``recover``: SELECT every live row through a server-side cursor, 1000 at a time, each page written with
  pipelined HSET + PEXPIREAT.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.asyncio import Redis

_SELECT = ("SELECT session_id, session_data::text, session_state, user_id, user_type, ip_address, user_agent, "
           "extract(epoch FROM created_at)::float8, extract(epoch FROM last_activity_at)::float8, "
           "extract(epoch FROM expires_at)::float8, request_count, total_duration_ms, metadata::text, version "
           "FROM {table}")
_LIVE = " WHERE session_state IN ('active', 'closed') AND expires_at > now()"
_FIELDS = ("id", "data", "state", "user_id", "user_type", "ip", "user_agent", "created", "last_activity",
           "expires", "requests", "duration_ms", "metadata", "version")


class RawPair:
    def __init__(self, redis: Redis, pg: asyncpg.Pool, table: str, prefix: str) -> None:
        self.redis = redis
        self.pg = pg
        self.prefix = prefix + ":"
        self.select_one = _SELECT.format(table=table) + " WHERE session_id = $1"
        self.select_live = _SELECT.format(table=table) + _LIVE

    def _write(self, pipe: Any, row: asyncpg.Record) -> None:
        key = self.prefix + row[0]
        pipe.hset(key, mapping={field: value for field, value in zip(_FIELDS, row, strict=True)
                                if value is not None})
        pipe.pexpireat(key, int(row[9] * 1000))

    async def get(self, session_id: str) -> dict[bytes, bytes] | None:
        cached: dict[bytes, bytes] = await self.redis.hgetall(self.prefix + session_id)  # type: ignore[assignment]
        if cached:
            return cached
        row = await self.pg.fetchrow(self.select_one, session_id)
        if row is None:
            return None
        pipe = self.redis.pipeline(transaction=False)
        self._write(pipe, row)
        await pipe.execute()
        return {field.encode(): str(value).encode() for field, value in zip(_FIELDS, row, strict=True)}

    async def recover(self, page_size: int = 1000) -> int:
        done = 0
        async with self.pg.acquire() as connection, connection.transaction():
            cursor = await connection.cursor(self.select_live)
            while rows := await cursor.fetch(page_size):
                pipe = self.redis.pipeline(transaction=False)
                for row in rows:
                    self._write(pipe, row)
                await pipe.execute()
                done += len(rows)
        return done
