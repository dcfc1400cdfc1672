"""Real, test-owned servers: one Redis and one PostgreSQL per test session (throwaway processes on free
loopback ports), a fresh schema per test, and helpers to build managers on them. Tests that kill or restart
a server start their own (see ``own_redis`` / ``own_postgres``)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import asyncpg
import pytest
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings
from tiered_sessions.embedded import PostgresServer, RedisServer
from tiered_sessions.migrate import migrate

from .helpers import SeedManagers

_counter = itertools.count()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, free to kill and restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    if not redis_server.is_running():
        redis_server.start()
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    if not postgres_server.is_running():
        postgres_server.start()
    return postgres_server.url


@pytest.fixture
async def settings(redis_url: str, database_url: str) -> AsyncIterator[Settings]:
    """Settings on a fresh schema and key prefix, migrated; the schema is dropped afterwards."""
    schema = f"t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    configured = Settings(redis_url=redis_url, database_url=database_url, schema=schema,
                          key_prefix=schema, flush_interval_secs=0.05, max_concurrent_sessions=None,
                          drain_timeout_secs=10, socket_timeout_secs=5)
    await migrate(configured)
    yield configured
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
async def manager(settings: Settings) -> AsyncIterator[SessionManager]:
    async with SessionManager(settings=settings) as m:
        yield m


@pytest.fixture(params=[True, False], ids=["persistence", "no-persistence"])
async def seed_managers(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[SeedManagers]:
    """For the tests ported from the seed: ``await make(**its_arguments)`` is its ``SessionManager(...)`` on this
    test's tier, with the seed's defaults (100 sessions, a 1 hour timeout), persistence on or off. With
    ``own_tier=True`` the manager gets a tier of its own (its table and key prefix), as every in-memory manager
    of the seed had. Every manager made is closed afterwards."""
    made: list[SessionManager] = []

    async def make(*, own_tier: bool = False, **arguments: Any) -> SessionManager:
        configured = dataclasses.replace(settings, enable_persistence=request.param, max_concurrent_sessions=100,
                                         session_timeout_secs=3600.0)
        if own_tier:
            configured = dataclasses.replace(configured, table=f"tier_{len(made)}",
                                             key_prefix=f"{settings.key_prefix}-{len(made)}")
            await migrate(configured)
        manager = SessionManager(settings=configured, **arguments)
        made.append(manager)
        await manager.start()
        return manager

    yield make
    for manager in made:
        await manager.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def skip_outside_ci(message: str) -> NoReturn:
    """Skip with ``message`` on a developer's machine; fail in CI (CI=true), where a skip would hide a gap."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _system_tool(name: str, *candidates: str) -> str:
    """A binary the suite needs from the system (scripts/test installs it); fail in CI, skip elsewhere."""
    import shutil

    found = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if found is None:
        skip_outside_ci(f"{name} is not installed (scripts/test installs it with apt-get when it can)")
    return found


@pytest.fixture(scope="session")
def pgbouncer_url(postgres_server: PostgresServer) -> Iterator[str]:
    """PgBouncer in transaction mode in front of the test PostgreSQL (as Supavisor on port 6543)."""
    import pwd
    import socket
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    binary = _system_tool("pgbouncer", "/usr/sbin/pgbouncer")
    folder = Path(tempfile.mkdtemp(prefix="tiered-sessions-pgbouncer-"))
    folder.chmod(0o755)  # pgbouncer drops to an unprivileged user when started as root
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (folder / "users.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={postgres_server.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 200\n"
        f"logfile = {folder / 'pgbouncer.log'}\n"
    )
    for path in folder.iterdir():
        path.chmod(0o644)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    if user:
        os.chown(folder, pwd.getpwnam("nobody").pw_uid, -1)
    process = subprocess.Popen([binary, *user, str(folder / "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (folder / "pgbouncer.log").read_text() if (folder / "pgbouncer.log").exists() else ""
                raise RuntimeError(f"pgbouncer did not start: {process.stderr.read() if process.stderr else b''!r} "
                                   f"{log}") from None
            time.sleep(0.05)
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres?pgbouncer=true"
    process.terminate()
    process.wait(timeout=10)
