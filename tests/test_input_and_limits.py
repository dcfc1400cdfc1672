"""Bad input gets a named error and changes nothing; the session limit counts the whole tier."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from tiered_sessions import (
    BackendUnavailable,
    InvalidSessionData,
    InvalidSessionId,
    PostgresSessionStore,
    RedisUnavailable,
    SessionLimitExceeded,
    SessionManager,
    SessionTooLarge,
    Settings,
)
from tiered_sessions.errors import MissingSetting, PostgresUnavailable

from .test_cli import _cli


@pytest.mark.parametrize("bad_id", ["", "a" * 256, "has space", "brace{p1}", "tab\t", "ünï", "\x00", 42, None, b"x"])
async def test_invalid_session_ids_are_refused(manager: SessionManager, redis: aioredis.Redis, bad_id: Any) -> None:
    calls = [manager.get(bad_id), manager.update_activity(bad_id), manager.update(bad_id, data={}),
             manager.remove(bad_id)]
    if bad_id is not None:
        calls.append(manager.ensure(bad_id))
    for call in calls:
        with pytest.raises(InvalidSessionId):
            await call
    # nothing but the bookkeeping: the flusher's partition leases and heartbeat, the recorded layout
    keys = cast(list[bytes], await redis.keys())  # the client does not decode
    assert [key for key in keys if not key.endswith((b":lease", b":flushers", b":layout"))] == []


@pytest.mark.parametrize("bad", [
    {"n": math.nan}, {"n": math.inf}, {"s": "nul\x00"}, {"nul\x00key": 1}, {"deep": {"x": [1, {"y": math.nan}]}},
    {"obj": object()}, {"b": b"bytes"}, {"big": 2**70}, {1: "int key"}, ["not", "a", "dict"], "text",
])
async def test_unstorable_data_is_refused_before_anything_is_written(manager: SessionManager, bad: Any) -> None:
    session = await manager.ensure("victim", data={"keep": True})
    version = session.version
    with pytest.raises(InvalidSessionData):
        await manager.update("victim", data=bad)
    with pytest.raises(InvalidSessionData):
        await manager.update("victim", metadata=bad)
    with pytest.raises(InvalidSessionData):
        await manager.ensure("newcomer", data=bad)
    fresh = await manager.get("victim")
    assert fresh is not None and fresh.version == version and fresh.data == {"keep": True}
    assert await manager.get("newcomer") is None


async def test_size_limit_covers_growth_by_small_updates(settings: Settings, redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings, max_session_bytes=2000) as manager:
        with pytest.raises(SessionTooLarge):
            await manager.ensure("huge", data={"blob": "x" * 5000})
        assert await manager.get("huge") is None
        session = await manager.ensure("grows")
        for i in range(10):
            await manager.update("grows", data={f"k{i}": "y" * 150})
        assert manager.flusher is not None
        key = manager.flusher.hot.keys("grows").session
        for i in range(10, 40):
            stored = await redis.hgetall(key)  # as Redis holds it before the call that will be refused
            try:
                await manager.update("grows", data={f"k{i}": "y" * 150})
            except SessionTooLarge as refused:
                assert isinstance(refused, InvalidSessionData)
                break
        else:
            raise AssertionError("the size limit never refused an update")
        assert await redis.hgetall(key) == stored  # the refused call changed nothing in Redis
        before = await manager.get("grows")
        assert before is session
        kept = dict(session.data)
        assert f"k{i}" not in kept
        version = session.version
        # Replacing a value with a smaller one is still allowed at the limit.
        await manager.update("grows", data={"k0": "small"})
        assert (await manager.get("grows")).data["k0"] == "small"  # type: ignore[union-attr]
        assert set(kept) == set(session.data) and session.version == version + 1


async def test_invalid_request_duration(manager: SessionManager) -> None:
    await manager.ensure("d")
    bads: tuple[Any, ...] = (-1, "5", None, True, math.nan)
    for bad in bads:
        with pytest.raises(InvalidSessionData):
            await manager.update_activity("d", request_duration_ms=bad)


async def test_session_limit_counts_live_sessions_across_managers(settings: Settings) -> None:
    async with SessionManager(settings=settings, max_concurrent_sessions=3) as one, \
            SessionManager(settings=settings, max_concurrent_sessions=3) as two:
        await one.ensure("a")
        await two.ensure("b")
        await one.ensure("c")
        with pytest.raises(SessionLimitExceeded) as over:
            await two.ensure("d")
        assert isinstance(over.value, RuntimeError)
        assert str(over.value).startswith("Maximum concurrent sessions")
        assert await two.ensure("a") is not None  # existing sessions are still served
        await one.remove("a")
        assert (await two.ensure("d")).session_id == "d"


async def test_session_limit_frees_expired_sessions_and_follows_touches(settings: Settings) -> None:
    """Live sessions are counted by expiry bucket (1/64 of the timeout: 20 ms here), not by index entry."""
    async with SessionManager(settings=settings, max_concurrent_sessions=2, session_timeout_secs=1.28) as manager:
        await manager.ensure("kept")
        await manager.ensure("lapses")
        with pytest.raises(SessionLimitExceeded):
            await manager.ensure("refused")
        for _ in range(15):  # "kept" slides its expiry through later buckets while "lapses" runs out
            await asyncio.sleep(0.1)
            assert await manager.update_activity("kept")
        assert (await manager.ensure("admitted")).session_id == "admitted"
        with pytest.raises(SessionLimitExceeded):
            await manager.ensure("refused")
        assert manager.flusher is not None
        assert await manager.flusher.hot.live_count(int(time.time() * 1000)) == 2


async def test_unreachable_servers_name_which_and_hide_the_password(settings: Settings) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = SessionManager(f"redis://user:hunter2@127.0.0.1:{port}/0", settings.database_url,
                             schema=settings.schema, socket_timeout_secs=2)
    with pytest.raises(RedisUnavailable) as failed:
        await manager.ensure("x")
    assert "Redis" in str(failed.value) and "hunter2" not in str(failed.value) and "***" in str(failed.value)
    manager = SessionManager(settings.redis_url, f"postgresql://postgres:hunter2@127.0.0.1:{port}/postgres",
                             schema=settings.schema, socket_timeout_secs=2)
    with pytest.raises(PostgresUnavailable) as failed_pg:
        await manager.ensure("x")
    assert "PostgreSQL" in str(failed_pg.value) and "hunter2" not in str(failed_pg.value)


async def test_no_urls_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TIERED_SESSIONS_REDIS_URL", "REDIS_URL", "TIERED_SESSIONS_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MissingSetting, match="no Redis URL") as redis_missing:
        await SessionManager().ensure()
    assert "redis_url" in str(redis_missing.value) and "TIERED_SESSIONS_REDIS_URL" in str(redis_missing.value)
    assert not isinstance(redis_missing.value, BackendUnavailable)  # nothing is down: a setting is missing
    with pytest.raises(MissingSetting, match=r"database_url.*TIERED_SESSIONS_DATABASE_URL"):
        PostgresSessionStore()


def test_the_command_line_names_the_flag_of_a_missing_setting() -> None:
    env = {name: "" for name in ("TIERED_SESSIONS_REDIS_URL", "REDIS_URL", "TIERED_SESSIONS_DATABASE_URL",
                                 "DATABASE_URL")}
    done = _cli("stats", env=env)
    assert done.returncode == 2
    assert "--redis-url" in done.stderr and "TIERED_SESSIONS_REDIS_URL" in done.stderr
    assert "unreachable" not in done.stderr.lower() and "Traceback" not in done.stderr
