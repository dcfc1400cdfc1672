"""Small readers of the real servers' state, shared by the tests."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from tiered_sessions import SessionManager, Settings
from tiered_sessions.errors import BackendUnavailable

# The conftest's seed_managers: ``await make(**arguments)``, the seed's ``SessionManager(**arguments)``.
SeedManagers = Callable[..., Awaitable[SessionManager]]


async def pg_row(pg: asyncpg.Connection, settings: Settings, session_id: str) -> dict[str, Any] | None:
    row = await pg.fetchrow(f"SELECT * FROM {settings.qualified_table} WHERE session_id = $1", session_id)
    return None if row is None else dict(row)


async def pg_rows(pg: asyncpg.Connection, settings: Settings) -> dict[str, dict[str, Any]]:
    rows = await pg.fetch(f"SELECT * FROM {settings.qualified_table}")
    return {row["session_id"]: dict(row) for row in rows}


async def touch_load(manager: SessionManager, ids: list[str], acked: Counter[str], stop: asyncio.Event,
                     failures: list[tuple[str, BackendUnavailable]] | None = None) -> None:
    """Touch random sessions until stopped; count only the writes that were acknowledged. A call that fails with
    the tier's named error is recorded in ``failures`` with its session (without it, the error fails the test)."""
    while not stop.is_set():
        sid = random.choice(ids)
        try:
            if await manager.update_activity(sid, request_duration_ms=1):
                acked[sid] += 1
        except BackendUnavailable as exc:
            if failures is None:
                raise
            failures.append((sid, exc))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait for a condition that background work makes true; fail the test if it never does."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)
