"""Metrics and the flusher's HTTP endpoints, against real Redis and PostgreSQL: values move with a workload,
/readyz follows the backends, the scrape passes `promtool check metrics`, and a daemon can embed the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
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
from .ops_helpers import Flusher, Samples, env_for, flusher, get, get_json, parse, promtool, run, total, value, wait_for


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


# The flusher's /metrics without the hot path's series (docs/operations.md has the figures).
FLUSHER_METRICS_LINES_MAX = 160
HOT_PATH_SERIES = ("tiered_sessions_operation_duration_seconds", "tiered_sessions_reads_total",
                   "tiered_sessions_backpressure_rejections_total", "tiered_sessions_event_listener_errors_total")


def _series_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def test_the_flusher_exports_only_what_it_can_move(settings: Settings) -> None:
    async with flusher(settings) as process:
        _, text = await process.samples()
    names = _series_names(text)
    assert not [name for name in names if name.startswith(HOT_PATH_SERIES)], "the flusher serves no calls"
    assert not [name for name in names if name.endswith("_created")]
    for name in ("tiered_sessions_flush_errors_total", "tiered_sessions_flushed_rows_total",
                 "tiered_sessions_flush_lag_seconds", "tiered_sessions_task_restarts_total", "tiered_sessions_ready",
                 "tiered_sessions_layout_refused", "tiered_sessions_mode", "process_resident_memory_bytes"):
        assert name in names, name
    lines = len(text.splitlines())
    assert lines <= FLUSHER_METRICS_LINES_MAX, f"{lines} lines"


# A manager's /metrics: the flusher's plus the hot path's (docs/operations.md has the figures).
MANAGER_METRICS_LINES_MAX = 420


async def test_a_manager_process_exports_the_hot_path(settings: Settings) -> None:
    """`tiered-sessions load` (a SessionManager serving calls, no flusher) exports what calls move."""
    async with flusher(settings, "--rate", "400", "--sessions", "40", command="load") as process:

        async def busy() -> tuple[Samples, str] | None:
            samples, text = await process.samples()
            done = (total(samples, "tiered_sessions_operation_duration_seconds_count", operation="update_activity") >= 1
                    and value(samples, "tiered_sessions_reads_total", tier="miss") >= 1
                    and total(samples, "tiered_sessions_dirty_sessions") >= 1)
            return (samples, text) if done else None

        samples, text = await wait_for(busy, "the load to move the hot path's metrics")
        assert value(samples, "tiered_sessions_reads_total", tier="hot") >= 1
        assert value(samples, "tiered_sessions_ready") == 1
        assert value(samples, "tiered_sessions_mode", mode="normal") == 1
    names = _series_names(text)
    assert {f"{name}_bucket" if name.endswith("_seconds") else name for name in HOT_PATH_SERIES} <= names
    assert not [name for name in names if name.endswith("_created")]
    lines = len(text.splitlines())
    assert lines <= MANAGER_METRICS_LINES_MAX, f"{lines} lines"
    checked = run([promtool(), "check", "metrics"], stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert any("load running" in line for line in process.log)


async def test_a_flusher_refusing_its_layout_says_so_until_stopped(settings: Settings) -> None:
    async with SessionManager(settings=settings):
        pass  # records the tier's layout
    other = str(settings.partitions // 2)
    async with flusher(settings, "--partitions", other, exit_code=2) as process:
        status, health = await get_json(process.port, "/healthz")
        assert status == 503 and health["status"] == "refused to start", health
        assert f"partitions {settings.partitions}" in health["error"] and f"configured with {other}" in health["error"]
        status, ready = await get_json(process.port, "/readyz")
        assert status == 503 and ready == {"ready": False, "refused": health["error"]}
        samples, _ = await process.samples()
        assert value(samples, "tiered_sessions_layout_refused") == 1
        assert value(samples, "tiered_sessions_ready") == 0
    log = "".join(process.log)
    assert "refusing to start" in log and "LayoutMismatch" in log


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


async def test_metrics_and_readyz_answer_in_bounded_time_while_postgres_hangs(
        redis_url: str, own_postgres: PostgresServer) -> None:
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix=f"hang{uuid.uuid4().hex[:8]}",
                        max_concurrent_sessions=None, socket_timeout_secs=3)
    await migrate(settings)
    async with flusher(settings, "--flush-interval", "0.05", "--drain-timeout", "1") as process:
        assert (await get_json(process.port, "/readyz"))[0] == 200
        own_postgres.pause()  # SIGSTOP: connections are accepted, nothing answers
        try:
            for _ in range(3):  # each request bounded, the second and third while the first check still hangs
                started = time.monotonic()
                status, body = await get_json(process.port, "/readyz")
                took = time.monotonic() - started
                assert status == 503 and body["redis"] == "ok", body
                assert "no answer within 3s" in body["postgres"], body
                assert took < 3 + 1.5, f"/readyz took {took:.1f}s"
                started = time.monotonic()
                samples, _ = await process.samples()
                took = time.monotonic() - started
                assert took < 3 + 1.5, f"/metrics took {took:.1f}s"
                assert value(samples, "tiered_sessions_ready") == 0
            assert (await get_json(process.port, "/healthz"))[0] == 200
        finally:
            own_postgres.resume()

        async def ready() -> bool:
            return (await get_json(process.port, "/readyz"))[0] == 200

        await wait_for(ready, "/readyz to recover once PostgreSQL answers", timeout=30)
        samples, _ = await process.samples()
        assert value(samples, "tiered_sessions_ready") == 1


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


async def test_only_refreshing_processes_set_the_global_readings(settings: Settings) -> None:
    """A drain (flush(), close()) or a journal count in a process without a flusher loop exports nothing: a
    reading set once would stay in that process's /metrics, stale, and max() over the processes would keep an
    alert firing after the trouble ended."""
    sentinel = 12345.0
    gauges = (metrics.FLUSH_LAG, metrics.LIVE_SESSIONS, metrics.JOURNAL_PENDING)
    try:
        for gauge in gauges:
            gauge.set(sentinel)
        async with SessionManager(settings=settings, run_flusher=False) as manager:
            await manager.ensure("stale")
            assert await manager.flush() == 0
            assert manager.flusher is not None
            assert await manager.flusher.journal.pending() == 0
        assert [gauge._value.get() for gauge in gauges] == [sentinel] * len(gauges)
        async with SessionManager(settings=settings, run_flusher=False) as manager:
            await metrics.refresh(manager)  # what a scrape does: fresh values
        assert metrics.FLUSH_LAG._value.get() == 0 and metrics.LIVE_SESSIONS._value.get() == 1
    finally:
        for gauge in gauges:
            gauge.set(0)


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


async def test_a_load_visitor_that_dies_ends_the_run_instead_of_vanishing(settings: Settings,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a visitor (anything but a named tier error) must end `tiered-sessions load` with it, not leave
    it running with fewer visitors and exit 0."""
    from tiered_sessions._load import Load

    async def broken(self: Load, chance: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(Load, "visit", broken)
    async with SessionManager(settings=settings) as manager:
        load = Load(manager, rate=100, sessions=10, concurrency=2)
        with pytest.raises(RuntimeError, match="visitor died"):
            await asyncio.wait_for(load.run(asyncio.Event()), 10)


async def test_a_flusher_draining_with_postgres_hung_says_so_and_exits_within_its_bounds(
        redis_url: str, own_postgres: PostgresServer) -> None:
    """SIGTERM while PostgreSQL hangs: while the flusher drains, /readyz says it is stopping (not that Redis
    failed), /metrics serves live gauges and counts no Redis error; the process exits once the drain timeout and
    one socket timeout to close its connections have passed, leaving the sessions dirty for the next flusher."""
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix=f"stop{uuid.uuid4().hex[:8]}",
                        max_concurrent_sessions=None, socket_timeout_secs=3)
    await migrate(settings)
    async with flusher(settings, "--flush-interval", "3600", "--drain-timeout", "8") as process:
        async with SessionManager(settings=settings, run_flusher=False) as writer:
            for n in range(20):
                await writer.ensure(data={"n": n})
        own_postgres.pause()
        try:
            process.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            await wait_for(lambda: _logged(process, "stopping: draining"), "the flusher to start draining")
            status, body = await get_json(process.port, "/readyz")
            assert status == 503 and body.get("stopping") is True and body["redis"] == "ok", body
            samples, _ = await process.samples()
            assert value(samples, "tiered_sessions_backend_errors_total", backend="redis", operation="metrics") == 0
            assert total(samples, "tiered_sessions_dirty_sessions") == 20
            # Each request waits out the Postgres check (3 s) within the drain (8 s)
            async with asyncio.timeout(8 + 3 + 3 + 4):  # the drain, the pass it ends, closing Postgres, slack
                await process.process.wait()
            assert time.monotonic() - stopped < 8 + 3 + 3 + 4
        finally:
            own_postgres.resume()
    async with SessionManager(settings=settings) as successor:
        assert await successor.flush() == 0


async def _logged(process: Flusher, text: str) -> bool:
    return any(text in line for line in process.log)
