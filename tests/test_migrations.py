"""Migrations on real PostgreSQL: idempotent, race-free, loud on an incompatible table, RLS for Supabase."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tiered_sessions import MigrationError, Settings
from tiered_sessions.migrate import migrate, migration_files


@pytest.fixture
async def fresh(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[Settings]:
    schema = f"m_{uuid.uuid4().hex[:10]}"
    yield Settings(database_url=database_url, schema=schema)
    await pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_migrate_is_idempotent_and_safe_to_race(fresh: Settings, pg: asyncpg.Connection) -> None:
    results = await asyncio.gather(*(migrate(fresh) for _ in range(4)))
    # Racing deployers may share the work file by file, but each file is applied exactly once.
    assert sorted(name for applied in results for name in applied) == [p.name for p in migration_files()]
    assert await migrate(fresh) == []
    columns = {row["column_name"]: row["data_type"] for row in await pg.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 "
        "AND table_name = 'sessions'", fresh.schema)}
    assert columns["version"] == "bigint" and columns["request_count"] == "bigint"
    assert columns["session_data"] == "jsonb"
    options = await pg.fetchval("SELECT reloptions FROM pg_class WHERE oid = $1::regclass",
                                fresh.qualified_table)
    assert "fillfactor=80" in options


async def test_seed_table_without_version_is_upgraded(fresh: Settings, pg: asyncpg.Connection) -> None:
    await pg.execute(f'CREATE SCHEMA "{fresh.schema}"')
    await pg.execute(f"""CREATE TABLE {fresh.qualified_table} (
        session_id text PRIMARY KEY, session_data jsonb DEFAULT '{{}}', session_state text DEFAULT 'active',
        user_id text, user_type text, ip_address text, user_agent text, created_at timestamptz DEFAULT now(),
        updated_at timestamptz DEFAULT now(), last_activity_at timestamptz DEFAULT now(), expires_at timestamptz,
        request_count integer DEFAULT 0, total_duration_ms integer DEFAULT 0, metadata jsonb DEFAULT '{{}}')""")
    await pg.execute(f"INSERT INTO {fresh.qualified_table} (session_id) VALUES ('old')")
    assert await migrate(fresh) == [path.name for path in migration_files()]
    row = await pg.fetchrow(f"SELECT version, request_count FROM {fresh.qualified_table}")
    assert row is not None and row["version"] == 0 and row["request_count"] == 0


async def test_incompatible_existing_table_fails_loudly(fresh: Settings, pg: asyncpg.Connection) -> None:
    await pg.execute(f'CREATE SCHEMA "{fresh.schema}"')
    await pg.execute(f"CREATE TABLE {fresh.qualified_table} (session_id integer, session_data text)")
    with pytest.raises(MigrationError, match="not compatible") as failed:
        await migrate(fresh)
    assert "session_data is text" in str(failed.value) and "metadata is missing" in str(failed.value)
    # Nothing was half-applied: the table is as it was and no migration is recorded.
    assert await pg.fetchval("SELECT to_regclass($1)", f'"{fresh.schema}".sessions_migrations') is None
    columns = await pg.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = $1",
                                fresh.schema)
    assert columns == 2


async def test_changed_applied_migration_is_refused(fresh: Settings, tmp_path: object,
                                                    pg: asyncpg.Connection) -> None:
    from pathlib import Path

    from tiered_sessions.migrate import migration_files

    directory = Path(str(tmp_path))
    source = migration_files()[0]
    (directory / source.name).write_text(source.read_text())
    await migrate(fresh, directory=directory)
    (directory / source.name).write_text(source.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(fresh, directory=directory)


async def test_supabase_roles_get_nothing(fresh: Settings, pg: asyncpg.Connection, database_url: str) -> None:
    for role in ("anon", "authenticated"):
        exists = await pg.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if not exists:
            await pg.execute(f"CREATE ROLE {role} NOLOGIN")
    await pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{fresh.schema}"')
    # As on Supabase: broad default grants that the migration must take back for this table.
    await pg.execute(f'GRANT USAGE ON SCHEMA "{fresh.schema}" TO anon, authenticated')
    await pg.execute(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{fresh.schema}" GRANT ALL ON TABLES TO anon, authenticated')
    await migrate(fresh)
    await pg.execute(f"INSERT INTO {fresh.qualified_table} (session_id) VALUES ('private')")
    assert await pg.fetchval("SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass", fresh.qualified_table)
    for role in ("anon", "authenticated"):
        async with pg.transaction():
            await pg.execute(f"SET LOCAL ROLE {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await pg.fetch(f"SELECT * FROM {fresh.qualified_table}")
        async with pg.transaction():
            await pg.execute(f"SET LOCAL ROLE {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await pg.execute(f"INSERT INTO {fresh.qualified_table} (session_id) VALUES ('x')")


async def test_supabase_roles_reach_no_object_the_tier_creates(fresh: Settings, pg: asyncpg.Connection) -> None:
    """Every table and sequence in the schema after migrating, the migrations' own tracking table included:
    row level security on, and anon / authenticated can neither read, write nor truncate it."""
    for role in ("anon", "authenticated"):
        if not await pg.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await pg.execute(f"CREATE ROLE {role} NOLOGIN")
    await pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{fresh.schema}"')
    await pg.execute(f'GRANT USAGE ON SCHEMA "{fresh.schema}" TO anon, authenticated')
    for kind in ("TABLES", "SEQUENCES"):  # as on Supabase: broad default grants the migrations take back
        await pg.execute(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{fresh.schema}" '
                         f"GRANT ALL ON {kind} TO anon, authenticated")
    await migrate(fresh)
    objects = await pg.fetch("SELECT c.relname, c.relkind::text AS relkind, c.relrowsecurity FROM pg_class c "
                             "JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'S')", fresh.schema)
    names = {row["relname"] for row in objects}
    assert {fresh.table, f"{fresh.table}_journal", f"{fresh.table}_layout", f"{fresh.table}_migrations"} <= names
    assert any(row["relkind"] == "S" for row in objects)  # the journal's sequence
    for row in objects:
        qualified = f'"{fresh.schema}"."{row["relname"]}"'
        if row["relkind"] != "S":
            assert row["relrowsecurity"], f"{qualified} has no row level security"
        statements = ([f"SELECT nextval('{qualified}')", f"SELECT * FROM {qualified}"] if row["relkind"] == "S"
                      else [f"SELECT * FROM {qualified}", f"DELETE FROM {qualified}", f"TRUNCATE {qualified}"])
        for role in ("anon", "authenticated"):
            for statement in statements:
                async with pg.transaction():
                    await pg.execute(f"SET LOCAL ROLE {role}")
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await pg.execute(statement)
