"""Raw asyncpg batch upsert: one ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE`` per 1000 rows,
one statement at a time on one connection, as the flusher writes. Its rate is the flusher's ceiling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

# The columns of a row tuple, in the order the flusher's batches use.
COLUMNS = ("session_id", "session_data", "session_state", "user_id", "user_type", "ip_address", "user_agent",
           "created_at", "last_activity_at", "expires_at", "request_count", "total_duration_ms", "metadata",
           "version")
_TYPES = ("text", "jsonb", "text", "text", "text", "text", "text", "float8", "float8", "float8", "int8", "int8",
          "jsonb", "int8")


def upsert_sql(table: str) -> str:
    arrays = ", ".join(f"${i + 1}::{'text' if kind == 'jsonb' else kind}[]" for i, kind in enumerate(_TYPES))
    picked = ", ".join(f"to_timestamp(r.{column})" if kind == "float8" else
                       f"r.{column}::jsonb" if kind == "jsonb" else f"r.{column}"
                       for column, kind in zip(COLUMNS, _TYPES, strict=True))
    updates = ", ".join(f"{column} = excluded.{column}" for column in COLUMNS[1:])
    return (f"INSERT INTO {table} ({', '.join(COLUMNS)}) SELECT {picked} "
            f"FROM unnest({arrays}) AS r({', '.join(COLUMNS)}) "
            f"ON CONFLICT (session_id) DO UPDATE SET {updates}, updated_at = now()")


async def upsert(connection: asyncpg.Connection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """One statement for all ``rows`` (tuples in ``COLUMNS`` order)."""
    await connection.execute(upsert_sql(table), *(list(column) for column in zip(*rows, strict=True)))


async def write_all(connection: asyncpg.Connection, table: str, rows: Sequence[tuple[Any, ...]],
                    batch_size: int = 1000) -> int:
    for start in range(0, len(rows), batch_size):
        await upsert(connection, table, rows[start:start + batch_size])
    return len(rows)
