"""Apply ``migrations/*.sql`` in order: each in its own transaction, recorded in a migrations table, under a
transaction-level advisory lock (works through a transaction-mode pooler, unlike a session lock)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import asyncpg

from ._sql import render_sql
from .cold_tier import connect_once
from .config import Settings
from .errors import MigrationError

log = logging.getLogger(__name__)
_NAME = re.compile(r"\d{4}_[a-z0-9_]+\.sql")


def migrations_dir() -> Path:
    """Installed wheels carry the files inside the package; a source checkout has them at the top."""
    packaged = Path(__file__).parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def migration_files(directory: Path | None = None) -> list[Path]:
    directory = directory or migrations_dir()
    files = sorted(path for path in directory.glob("*.sql") if _NAME.fullmatch(path.name))
    if not files:
        raise MigrationError(f"no migrations found in {directory}")
    return files


def render(sql: str, settings: Settings) -> str:
    return render_sql(
        sql, schema=f'"{settings.schema}"', schema_name=settings.schema,
        table=settings.qualified_table, table_name=settings.table, journal=settings.qualified_journal,
        layout=settings.qualified_layout, migrations=settings.qualified_migrations,
    )


async def migrate(settings: Settings, *, directory: Path | None = None,
                  on_applied: Callable[[str], None] | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date)."""
    files = migration_files(directory)
    connection = await connect_once(settings)
    tracking = settings.qualified_migrations  # row level security and revokes: migration 0004
    lock_key = f"tiered_sessions:{settings.schema}.{settings.table}"
    applied: list[str] = []
    try:
        for path in files:
            sql = path.read_text()
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            async with connection.transaction():
                # Two deployers at once: the second waits here, then sees the first one's work.
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key)
                await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema}"')
                await connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {tracking} (name text PRIMARY KEY, checksum text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now())"
                )
                known = await connection.fetchval(f"SELECT checksum FROM {tracking} WHERE name = $1", path.name)
                if known is not None:
                    if known != checksum:
                        raise MigrationError(f"{path.name} was changed after it was applied; "
                                             "add a new migration instead of editing an applied one")
                    continue
                try:
                    await connection.execute(render(sql, settings))
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"{path.name} failed: {exc}") from exc
                await connection.execute(f"INSERT INTO {tracking} (name, checksum) VALUES ($1, $2)",
                                         path.name, checksum)
            log.info("applied migration %s to %s", path.name, settings.qualified_table)
            applied.append(path.name)
            if on_applied is not None:
                on_applied(path.name)
    finally:
        await connection.close()
    return applied
