"""Small readers of the real servers' state, shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from tiered_sessions import SessionManager, Settings

# The conftest's seed_managers: ``await make(**arguments)``, the seed's ``SessionManager(**arguments)``.
SeedManagers = Callable[..., Awaitable[SessionManager]]


async def pg_row(pg: asyncpg.Connection, settings: Settings, session_id: str) -> dict[str, Any] | None:
    row = await pg.fetchrow(f"SELECT * FROM {settings.qualified_table} WHERE session_id = $1", session_id)
    return None if row is None else dict(row)


async def pg_rows(pg: asyncpg.Connection, settings: Settings) -> dict[str, dict[str, Any]]:
    rows = await pg.fetch(f"SELECT * FROM {settings.qualified_table}")
    return {row["session_id"]: dict(row) for row in rows}


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait for a condition that background work makes true; fail the test if it never does."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)
