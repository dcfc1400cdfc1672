"""The console script, run as users run it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import asyncpg
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings

from .helpers import pg_rows


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tiered_sessions.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def _env(settings: Settings) -> dict[str, str]:
    return {"TIERED_SESSIONS_REDIS_URL": settings.redis_url or "",
            "TIERED_SESSIONS_DATABASE_URL": settings.database_url or "",
            "TIERED_SESSIONS_SCHEMA": settings.schema, "TIERED_SESSIONS_KEY_PREFIX": settings.key_prefix}


async def test_migrate_and_stats_json(settings: Settings) -> None:
    done = _cli("migrate", env=_env(settings))
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        for _ in range(3):
            await manager.ensure()
    stats = _cli("stats", "--json", env=_env(settings))
    assert stats.returncode == 0, stats.stderr
    shown = json.loads(stats.stdout)
    assert shown["total_sessions"] == 3 and shown["dirty_sessions"] == 3 and shown["flush_lag_seconds"] > 0


async def test_flusher_process_drains_on_sigterm(settings: Settings, pg: asyncpg.Connection) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tiered_sessions.cli", "flusher", "--flush-interval", "60",
        env={**os.environ, **_env(settings)}, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(2)  # started, first pass done; the next would be a minute away
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        for i in range(50):
            await manager.ensure(f"cli-{i}")
    assert await pg_rows(pg, settings) == {}
    process.send_signal(signal.SIGTERM)
    _, stderr_bytes = await asyncio.wait_for(process.communicate(), 30)
    stderr = stderr_bytes.decode()
    assert process.returncode == 0, stderr
    assert len(await pg_rows(pg, settings)) == 50
    assert "draining" in stderr


def test_errors_are_named_and_hide_passwords() -> None:
    done = _cli("stats", env={"TIERED_SESSIONS_REDIS_URL": "redis://:pw-secret@127.0.0.1:1/0",
                              "TIERED_SESSIONS_SOCKET_TIMEOUT_SECS": "2"})
    assert done.returncode == 2
    assert "RedisUnavailable" in done.stdout + done.stderr and "pw-secret" not in done.stdout + done.stderr


def test_help_explains_every_command() -> None:
    done = _cli("--help")
    assert done.returncode == 0
    for command in ("migrate", "flusher", "stats", "recover", "demo"):
        assert command in done.stdout


def test_demo_runs_against_given_servers(settings: Settings) -> None:
    done = _cli("demo", "--sessions", "60", "--updates", "5", "--concurrency", "8", "--json", env=_env(settings))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["lost"] == 0 and summary["served_from_postgres_after_wipe"] == 60
    assert summary["recovered_by_recover_all"] == 60
    assert summary["rows_written"] < summary["writes"]


async def test_flush_command_writes_everything_dirty_and_says_what_is_left(settings: Settings,
                                                                          pg: asyncpg.Connection) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        ids = [(await manager.ensure(data={"n": n})).session_id for n in range(5)]
    done = _cli("flush", "--json", env=_env(settings))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"left": 0}
    assert set(await pg_rows(pg, settings)) >= set(ids)


def test_flush_command_fails_when_postgres_does_not_answer(settings: Settings) -> None:
    env = {**_env(settings), "TIERED_SESSIONS_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"}
    done = _cli("flush", "--drain-timeout", "1", env=env)
    assert done.returncode != 0
    assert "PostgreSQL" in done.stderr


async def test_dead_letters_of_an_unknown_id_say_so_and_fail(settings: Settings) -> None:
    for action in ("replay", "drop"):
        done = _cli("dead-letters", action, "no-such-letter", env=_env(settings))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "no-such-letter" in done.stderr and "no dead letter" in done.stderr


def test_messages_are_not_wrapped_when_not_on_a_terminal() -> None:
    env = {name: "" for name in ("TIERED_SESSIONS_REDIS_URL", "REDIS_URL", "TIERED_SESSIONS_DATABASE_URL",
                                 "DATABASE_URL")}
    done = _cli("stats", env=env)
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]  # one line, however long
    assert len(line) > 80 and "TIERED_SESSIONS_REDIS_URL" in line


def test_json_logs_are_one_object_per_line(settings: Settings) -> None:
    env = {**_env(settings), "TIERED_SESSIONS_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
           "TIERED_SESSIONS_LOG_FORMAT": "json"}
    done = _cli("flush", "--drain-timeout", "1", env=env)
    assert done.returncode != 0
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    assert records[-1]["level"] == "ERROR" and "PostgreSQL" in records[-1]["message"]
    flag = _cli("flush", "--drain-timeout", "1", "--log-format", "json",
                env={**env, "TIERED_SESSIONS_LOG_FORMAT": ""})
    assert all(json.loads(line) for line in flag.stderr.splitlines() if line.strip())


async def test_the_demo_on_your_servers_runs_again_and_leaves_nothing_behind(
        settings: Settings, redis: aioredis.Redis, pg: asyncpg.Connection) -> None:
    """Twice on the same servers (a second run must not trip over the first's layout), counting only its own
    sessions, and removing every row and key it wrote; --table and --key-prefix are not its options."""
    for run in ("--json", "--updates"):  # the second run prints its progress and summary for people
        done = _cli("demo", "--sessions", "30", "--updates", "3", "--concurrency", "4",
                    *(["--json"] if run == "--json" else []), env=_env(settings))
        assert done.returncode == 0, done.stderr
        if run == "--json":
            summary = json.loads(done.stdout)
            assert summary["served_from_postgres_after_wipe"] == 30 and summary["recovered_by_recover_all"] == 30
        else:
            for phase in ("workload", "reads", "recover_all_sessions"):  # every phase shows its progress
                assert phase in done.stdout
            assert "30 / 30" in done.stdout  # served from PostgreSQL: its own sessions only
        assert [key async for key in redis.scan_iter(match="tsdemo:*")] == []  # TTL or not, nothing left
        for suffix in ("", "_journal", "_layout"):
            assert await pg.fetchval(f'SELECT count(*) FROM "{settings.schema}"."tiered_sessions_demo{suffix}"') == 0
    assert _cli("demo", "--table", "sessions", env=_env(settings)).returncode == 2  # not silently ignored


def test_each_subcommand_offers_only_the_options_it_uses() -> None:
    env = {"COLUMNS": "200"}
    unused = {"migrate": ("--redis-url", "--key-prefix", "--partitions"),
              "dead-letters": ("--database-url", "--schema", "--table"),
              "demo": ("--table", "--key-prefix")}
    for command, options in unused.items():
        shown = _cli(command, "--help", env=env).stdout
        assert "--help" in shown
        for option in options:
            assert option not in shown, (command, option)
    assert "--redis-url" in _cli("flusher", "--help", env=env).stdout
    assert "--database-url" in _cli("migrate", "--help", env=env).stdout


async def test_flush_command_flushes_even_where_persistence_is_turned_off_in_the_environment(
        settings: Settings, pg: asyncpg.Connection) -> None:
    """TIERED_SESSIONS_ENABLE_PERSISTENCE=false is a daemon's setting: `flush` must still write, not report
    "everything is in PostgreSQL" having written nothing."""
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        sid = (await manager.ensure(data={"n": 1})).session_id
    done = _cli("flush", "--json", env={**_env(settings), "TIERED_SESSIONS_ENABLE_PERSISTENCE": "false"})
    assert done.returncode == 0, done.stderr
    assert sid in await pg_rows(pg, settings)


async def test_dead_letters_replay_of_a_quarantined_key_says_it_was_not_replayed(
        settings: Settings, redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        await redis.set((await manager.dead_letters()).hot.keys("planted").session, "not a session")
        assert await manager.get("planted") is None  # moved aside: a poison dead letter
    done = _cli("dead-letters", "replay", "planted", env=_env(settings))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "planted" in done.stderr and "not replayed" in done.stderr
