"""A row Postgres rejects is isolated, kept with its reason, and can be replayed or dropped; the rest of
its batch is written and nothing else waits on it."""

from __future__ import annotations

import json
import logging

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tiered_sessions import SessionManager, Settings

from .helpers import pg_rows
from .test_cli import _cli, _env


def _dead_letter_count() -> float:
    return REGISTRY.get_sample_value("tiered_sessions_dead_letters_total") or 0.0


async def test_poison_rows_are_isolated_listed_replayed_and_dropped(settings: Settings, pg: asyncpg.Connection,
                                                                    redis: aioredis.Redis) -> None:
    await pg.execute(f"ALTER TABLE {settings.qualified_table} ADD CONSTRAINT no_poison "
                     "CHECK (user_id IS DISTINCT FROM 'poison')")
    before = _dead_letter_count()
    async with SessionManager(settings=settings, run_flusher=False, flush_batch_size=16) as manager:
        for i in range(50):
            await manager.ensure(f"s-{i:02d}", user_id="poison" if i in (7, 31) else f"u{i}")
        assert await manager.flush() == 0
        rows = await pg_rows(pg, settings)
        assert len(rows) == 48 and "s-07" not in rows and "s-31" not in rows
        assert (await manager.get_session_metrics())["dirty_sessions"] == 0  # the bad rows block nothing
        assert _dead_letter_count() - before == 2

        listed = _cli("dead-letters", "list", "--json", env=_env(settings))
        assert listed.returncode == 0, listed.stderr
        letters = json.loads(listed.stdout)
        assert sorted(letter["session_id"] for letter in letters) == ["s-07", "s-31"]
        assert all("no_poison" in letter["reason"] and "CheckViolation" in letter["reason"] for letter in letters)

        # Fix the cause, replay one from the CLI (the other after Redis forgot it), and drop nothing.
        await pg.execute(f"ALTER TABLE {settings.qualified_table} DROP CONSTRAINT no_poison")
        assert _cli("dead-letters", "replay", "s-07", env=_env(settings)).returncode == 0
        await redis.delete(manager.flusher.hot.keys("s-31").session)  # type: ignore[union-attr]
        assert await (await manager.dead_letters()).replay(["s-31"]) == 1
        await manager.flush()
        rows = await pg_rows(pg, settings)
        assert len(rows) == 50 and rows["s-31"]["user_id"] == "poison"
        assert await (await manager.dead_letters()).list() == []

        await pg.execute(f"ALTER TABLE {settings.qualified_table} ADD CONSTRAINT no_poison2 "
                         "CHECK (user_id IS DISTINCT FROM 'worse')")
        await manager.update("s-00", user_id="worse")
        await manager.flush()
        assert [letter.session_id for letter in await (await manager.dead_letters()).list()] == ["s-00"]
        refused = _cli("dead-letters", "drop", env=_env(settings))
        assert refused.returncode == 2  # neither ids nor --all: refused, nothing dropped
        assert _cli("dead-letters", "drop", "--all", env=_env(settings)).returncode == 0
        assert await (await manager.dead_letters()).list() == []
        assert (await pg_rows(pg, settings))["s-00"]["user_id"] == "u0"  # the rejected version never landed


async def test_a_dead_letter_logs_its_id_and_error_class_not_the_row(settings: Settings, pg: asyncpg.Connection,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Postgres's DETAIL ("Failing row contains (...)") carries the whole row: user data and IP addresses stay
    in the dead-letter store, shown on request, and out of the logs."""
    await pg.execute(f"ALTER TABLE {settings.qualified_table} ADD CONSTRAINT no_poison "
                     "CHECK (user_id IS DISTINCT FROM 'poison')")
    caplog.set_level(logging.DEBUG)
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await manager.ensure("leaky", user_id="poison", ip_address="203.0.113.77", data={"card": "4111-secret"})
        await manager.ensure("fine", user_id="ok")
        assert await manager.flush() == 0
        (letter,) = await (await manager.dead_letters()).list()
    assert "Failing row contains" in letter.reason and "203.0.113.77" in letter.reason  # kept, on request
    logged = caplog.text
    assert "leaky" in logged and "CheckViolationError" in logged
    for private in ("203.0.113.77", "4111-secret", "Failing row"):
        assert private not in logged
    assert all("\n" not in record.getMessage() for record in caplog.records)  # one line per event
