"""Metrics and the flusher's HTTP endpoints, against real Redis and PostgreSQL: values move with a workload,
/readyz follows the backends, the scrape passes `promtool check metrics`, and a daemon can embed the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from tiered_sessions import SessionManager, Settings, metrics
from tiered_sessions._codec import partition_of
from tiered_sessions._ops_http import OpsServer
from tiered_sessions.embedded import PostgresServer
from tiered_sessions.migrate import migrate

from .helpers import until
from .ops_helpers import Samples, env_for, flusher, get, get_json, parse, promtool, run, total, value, wait_for


async def test_flusher_serves_metrics_health_and_readiness(settings: Settings) -> None:
    async with flusher(settings, "--flush-interval", "0.05") as process:
        assert await get_json(process.port, "/healthz") == (200, {"status": "alive"})
        status, ready = await get_json(process.port, "/readyz")
        assert status == 200 and ready["ready"] and ready["redis"] == ready["postgres"] == "ok", ready

        async with SessionManager(settings=settings, run_flusher=False) as manager:
            for i in range(40):
                await manager.ensure(f"metrics-{i}")
            await manager.remove("metrics-0")

        async def flushed() -> tuple[Samples, str] | None:
            samples, text = await process.samples()
            done = (total(samples, "tiered_sessions_flushed_rows_total", kind="tombstone") >= 1
                    and total(samples, "tiered_sessions_dirty_sessions") == 0)
            return (samples, text) if done else None

        samples, text = await wait_for(flushed, "the flusher to write the workload")
        assert value(samples, "tiered_sessions_flushed_rows_total", kind="upsert") >= 39
        assert value(samples, "tiered_sessions_flush_batch_rows_count") >= 1
        assert value(samples, "tiered_sessions_flush_batch_rows_sum") >= 40
        assert value(samples, "tiered_sessions_flush_duration_seconds_count") >= 1
        assert value(samples, "tiered_sessions_live_sessions") == 39
        assert value(samples, "tiered_sessions_flush_lag_seconds") == 0
        assert len([key for key in samples if key[0] == "tiered_sessions_dirty_sessions"]) == settings.partitions
        assert value(samples, "tiered_sessions_mode", mode="normal") == 1
        assert value(samples, "tiered_sessions_dead_letters_stored") == 0

        checked = run([promtool(), "check", "metrics"], stdin=text)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        status, body = await get(process.port, "/nope")
        assert status == 404 and "/readyz" in body
    assert any("serving /metrics" in line for line in process.log)


async def test_readyz_fails_while_postgres_is_down(redis_url: str, own_postgres: PostgresServer) -> None:
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix=f"rz{uuid.uuid4().hex[:8]}",
                        max_concurrent_sessions=None, socket_timeout_secs=3)
    await migrate(settings)
    async with flusher(settings, "--flush-interval", "0.05", "--drain-timeout", "1") as process, \
            SessionManager(settings=settings, run_flusher=False) as manager:
        assert (await get_json(process.port, "/readyz"))[0] == 200
        own_postgres.kill()
        for _ in range(10):
            await manager.ensure()  # new ids: Redis only, they stay dirty

        async def not_ready() -> dict[str, Any] | None:
            status, body = await get_json(process.port, "/readyz")
            return body if status == 503 else None

        body = await wait_for(not_ready, "/readyz to report PostgreSQL down")
        assert body["ready"] is False and body["redis"] == "ok" and body["postgres"].startswith("error"), body
        assert (await get_json(process.port, "/healthz"))[0] == 200  # alive: it keeps retrying

        async def failing() -> Samples | None:
            samples, _ = await process.samples()
            return samples if total(samples, "tiered_sessions_flush_errors_total") >= 1 else None

        samples = await wait_for(failing, "flush errors to be counted")
        assert value(samples, "tiered_sessions_flush_retries_total") >= 1
        assert total(samples, "tiered_sessions_dirty_sessions") == 10
        assert value(samples, "tiered_sessions_flush_lag_seconds") > 0
    assert any("flush failed" in line for line in process.log)


async def test_embedded_metrics_reads_by_tier_latency_and_lag_readiness(settings: Settings,
                                                                        redis: aioredis.Redis) -> None:
    registry = CollectorRegistry()
    collector = metrics.register(registry)  # a daemon's own registry gets the same metrics
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        server = OpsServer(manager, registry=registry, ready_max_lag=0.2)
        port = await server.start()
        try:
            before = parse((await get(port, "/metrics"))[1])
            await manager.ensure("reader")
            assert await manager.get("reader") is not None  # hot
            await manager.flush()
            await redis.delete(f"{settings.key_prefix}:{{p{partition_of('reader', settings.partitions)}}}:s:reader")
            assert await manager.get("reader") is not None  # cold: read through from Postgres
            assert await manager.get("nobody") is None  # miss
            for _ in range(2 * metrics.OPERATION_SAMPLE_EVERY):
                await manager.update_activity("reader", 5)
            status, text = await get(port, "/metrics")
            after = parse(text)

            def delta(name: str, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            assert delta("tiered_sessions_reads_total", tier="hot") >= 1
            assert delta("tiered_sessions_reads_total", tier="cold") == 1
            assert delta("tiered_sessions_reads_total", tier="miss") == 1
            # One call in OPERATION_SAMPLE_EVERY is timed, whatever the phase: 2 of these 32.
            assert delta("tiered_sessions_operation_duration_seconds_count", operation="update_activity") == 2
            assert delta("tiered_sessions_operation_duration_seconds_sum", operation="update_activity") > 0
            # The key deleted from outside the tier (as an eviction would) still counts until its expiry has
            # passed, beside its copy read back from Postgres: live counts keep no per-session entry.
            assert value(after, "tiered_sessions_live_sessions") == 2
            ours = {family.name for family in REGISTRY.collect() if family.name.startswith("tiered_sessions_")}
            assert {family.name for family in registry.collect()} == ours
            assert b"tiered_sessions_flush_lag_seconds" in generate_latest(registry)

            # Without a flusher the backlog ages: past ready_max_lag, /readyz says so; a flush makes it ready.
            await manager.update("reader", data={"k": 1})
            await asyncio.sleep(0.3)
            status, body = await get_json(port, "/readyz")
            assert status == 503 and "flush_lag" in body and body["postgres"] == "ok", body
            assert body["flush_lag_seconds"] >= 0.3
            await manager.flush()
            assert (await get_json(port, "/readyz"))[0] == 200
            async def dies() -> None:
                raise RuntimeError("broken")

            manager.worker.start("doomed", dies)  # a background task that dies: restarted, down meanwhile
            await until(lambda: "doomed" in manager.worker.down())
            assert await get_json(port, "/healthz") == (503, {"status": "background tasks down",
                                                               "down": {"doomed": "RuntimeError: broken"}})
            status, body = await get_json(port, "/readyz")
            assert status == 503 and body["down"] == {"doomed": "RuntimeError: broken"}
        finally:
            await server.close()
            registry.unregister(collector)


def test_mode_gauge_and_registration_errors() -> None:
    try:
        metrics.set_mode("degraded")
        assert metrics.MODE.labels("degraded")._value.get() == 1
        assert metrics.MODE.labels("normal")._value.get() == 0
    finally:
        metrics.set_mode("normal")
    assert metrics.MODE.labels("normal")._value.get() == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        metrics.set_mode("broken")
    with pytest.raises(ValueError, match="REGISTRY already"):
        metrics.register(REGISTRY)


def _stats(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tiered_sessions.cli", "stats", *args], capture_output=True,
                          text=True, timeout=60, env={**env_for(settings), "COLUMNS": "100"}, check=False)


async def test_stats_watch(settings: Settings) -> None:
    async with SessionManager(settings=settings, run_flusher=False) as manager:
        for _ in range(5):
            await manager.ensure()
    done = await asyncio.to_thread(_stats, settings, "--watch", "--json", "--interval", "0.2", "--count", "3")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 3
    assert rows[0]["dirty_sessions"] == 5 and rows[0]["total_sessions"] == 5 and rows[0]["dead_letters"] == 0
    assert rows[0]["rows_written_per_second"] is None  # needs two readings
    assert all(isinstance(row["rows_written_per_second"], float) for row in rows[1:]), rows
    assert rows[2]["flush_lag_seconds"] >= rows[0]["flush_lag_seconds"] > 0

    done = await asyncio.to_thread(_stats, settings, "--watch", "--interval", "0.1", "--count", "2")
    assert done.returncode == 0, done.stderr
    for label in ("flush_lag_seconds", "dirty_sessions", "total_sessions", "rows_written_per_second"):
        assert label in done.stdout, done.stdout

    plain = await asyncio.to_thread(_stats, settings, "--json")  # the same names without --watch
    assert plain.returncode == 0 and json.loads(plain.stdout)["dirty_sessions"] == 5
    shared = set(json.loads(plain.stdout)) & set(rows[0])
    assert {"total_sessions", "dirty_sessions", "flush_lag_seconds"} <= shared


def test_cli_help_explains_the_new_options() -> None:
    env = {**os.environ, "COLUMNS": "200"}
    flusher_help = subprocess.run([sys.executable, "-m", "tiered_sessions.cli", "flusher", "--help"],
                                  capture_output=True, text=True, env=env, check=True).stdout
    for option in ("--metrics-port", "--metrics-host", "--ready-max-lag"):
        assert option in flusher_help
    stats_help = subprocess.run([sys.executable, "-m", "tiered_sessions.cli", "stats", "--help"],
                                capture_output=True, text=True, env=env, check=True).stdout
    for option in ("--watch", "--interval", "--count", "--json"):
        assert option in stats_help
