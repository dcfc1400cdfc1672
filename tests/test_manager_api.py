"""The drop-in API on real Redis and PostgreSQL: the seed's semantics callers rely on."""

from __future__ import annotations

import asyncio
import json
import time
from typing import cast

import pytest
import redis.asyncio as aioredis

from tiered_sessions import ConfigurationError, Session, SessionManager, SessionNotFound, Settings
from tiered_sessions._flusher import Flusher

from .helpers import until


async def test_ensure_creates_with_a_random_id_and_returns_the_same_object(manager: SessionManager) -> None:
    session = await manager.ensure()
    assert len(session.session_id) >= 40
    assert session.version == 1 and session.state == "active" and session.request_count == 0
    assert await manager.ensure(session.session_id) is session
    assert await manager.get(session.session_id) is session
    other = await manager.ensure()
    assert other.session_id != session.session_id


async def test_ensure_keeps_creation_attributes(manager: SessionManager) -> None:
    session = await manager.ensure("s-1", user_id="u-9", user_type="admin", ip_address="10.0.0.1",
                                   user_agent="curl/8", data={"cart": [1]}, metadata={"src": "web"})
    assert (session.user_id, session.user_type, session.ip_address, session.user_agent) == \
        ("u-9", "admin", "10.0.0.1", "curl/8")
    assert session.data == {"cart": [1]} and session.metadata == {"src": "web"}
    # Later ensure() calls return the live session untouched.
    again = await manager.ensure("s-1", user_id="someone-else", data={"cart": []})
    assert again is session and session.user_id == "u-9" and session.data == {"cart": [1]}


async def test_update_activity_counts_atomically_and_refreshes_the_held_object(manager: SessionManager) -> None:
    session = await manager.ensure("busy")
    before = session.expires_at
    for _ in range(25):
        assert await manager.update_activity("busy", request_duration_ms=4) is True
    assert session.request_count == 25 and session.total_duration_ms == 100 and session.version == 26
    assert session.expires_at >= before
    fetched = await manager.get("busy")
    assert fetched is session and fetched.request_count == 25


async def test_update_activity_on_missing_session_does_nothing(manager: SessionManager,
                                                               redis: aioredis.Redis) -> None:
    assert await manager.update_activity("nobody-here", request_duration_ms=1) is False
    assert await manager.get("nobody-here") is None
    # nothing but the bookkeeping: the flusher's partition leases and heartbeat, the recorded layout
    keys = cast(list[bytes], await redis.keys())  # the client does not decode
    assert [key for key in keys if not key.endswith((b":lease", b":flushers", b":layout"))] == []


async def test_update_merges_top_level_keys(manager: SessionManager) -> None:
    session = await manager.ensure("cart", data={"a": 1, "b": {"x": 1}})
    version = await manager.update("cart", data={"b": {"y": 2}, "c": [1, 2]}, metadata={"m": 1},
                                   user_id="u1")
    assert version == session.version == 2
    fresh = await manager.get("cart")
    assert fresh is not None
    assert fresh.data == {"a": 1, "b": {"y": 2}, "c": [1, 2]}
    assert fresh.metadata == {"m": 1} and fresh.user_id == "u1"


async def test_update_of_missing_or_removed_session_raises(manager: SessionManager) -> None:
    with pytest.raises(SessionNotFound):
        await manager.update("ghost", data={"a": 1})
    await manager.ensure("gone")
    await manager.remove("gone")
    with pytest.raises(SessionNotFound):
        await manager.update("gone", data={"a": 1})


async def test_remove_is_silent_when_missing_and_ensure_starts_a_new_life(manager: SessionManager) -> None:
    await manager.remove("never-existed")
    old = await manager.ensure("life", data={"secret": "old"})
    for _ in range(3):
        await manager.update_activity("life")
    await manager.remove("life")
    assert old.state == "removed"
    assert await manager.get("life") is None
    assert await manager.update_activity("life") is False
    new = await manager.ensure("life")
    assert new is not old
    assert new.data == {} and new.request_count == 0
    assert new.version > old.version


async def test_list_ids_and_metrics(manager: SessionManager) -> None:
    ids = {(await manager.ensure()).session_id for _ in range(5)}
    await manager.update(sorted(ids)[0], closed=True)
    assert set(await manager.list_ids()) == ids
    metrics = await manager.get_session_metrics()
    for key in ("total_sessions", "active_sessions", "oldest_session_age", "newest_session_age",
                "avg_session_age", "persistence_enabled", "dirty_sessions", "flush_lag_seconds"):
        assert key in metrics
    assert metrics["total_sessions"] == 5 and metrics["active_sessions"] == 4
    assert metrics["persistence_enabled"] is True
    assert metrics["oldest_session_age"] >= metrics["avg_session_age"] >= metrics["newest_session_age"] >= 0


async def test_is_session_timed_out(settings: Settings) -> None:
    async with SessionManager(settings=settings, session_timeout_secs=0.3) as manager:
        session = await manager.ensure("short")
        assert manager.is_session_timed_out(session) is False
        await asyncio.sleep(0.35)
        assert manager.is_session_timed_out(session) is True
        assert await manager.get("short") is None  # logically expired: never served
        assert await manager.update_activity("short") is False
    closed = Session("c", created_at=0, last_activity=time.time(), expires_at=time.time() + 100, state="closed")
    assert SessionManager(settings=settings).is_session_timed_out(closed) is True


async def test_is_session_timed_out_of_a_session_get_no_longer_serves(settings: Settings) -> None:
    """The daemon asks ``is_session_timed_out(await manager.get(sid))``: a timed-out session comes back as None."""
    async with SessionManager(settings=settings, session_timeout_secs=0.3) as manager:
        await manager.ensure("lapsing")
        assert manager.is_session_timed_out(await manager.get("lapsing")) is False
        await asyncio.sleep(0.35)
        assert manager.is_session_timed_out(await manager.get("lapsing")) is True
        assert manager.is_session_timed_out(await manager.get("never-was")) is True


async def test_cleanup_stale_sessions_removes_closed_and_expired(settings: Settings) -> None:
    # Margins of a fifth of a second either side: a loaded machine may be that late
    async with SessionManager(settings=settings, session_timeout_secs=1.0) as manager:
        await manager.ensure("will-expire")
        await manager.ensure("will-close")
        await manager.update("will-close", closed=True)
        await asyncio.sleep(0.3)
        await manager.ensure("stays")
        await asyncio.sleep(0.8)
        removed = await manager.cleanup_stale_sessions()
        assert removed == 2
        assert await manager.list_ids() == ["stays"]
        assert await manager.get("will-close") is None


async def test_session_to_dict_round_trip(manager: SessionManager) -> None:
    session = await manager.ensure("dict", data={"k": [1, "two", None]}, metadata={"a": {"b": True}})
    raw = session.to_dict()


    assert json.loads(json.dumps(raw)) == raw
    assert raw["closed"] is False
    back = Session.from_dict(raw)
    assert back.to_dict() == raw


async def test_persistence_disabled_uses_redis_only(redis_url: str, redis: aioredis.Redis) -> None:
    async with SessionManager(redis_url, enable_persistence=False, key_prefix="nop",
                              session_timeout_secs=60) as manager:
        session = await manager.ensure("solo")
        await manager.update_activity("solo")
        assert manager.store is None
        assert await manager.flush() == 0
        metrics = await manager.get_session_metrics()
        assert metrics["persistence_enabled"] is False and metrics["dirty_sessions"] == 0
        ttl = await redis.pttl(f"nop:{{p{_partition('solo')}}}:s:solo")
        assert 0 < ttl <= 60_000  # never pinned: nothing would ever flush it
        await manager.ensure("other", user_id="erin")
        await manager.ensure("mine", user_id="frank")
        assert [s.session_id for s in await manager.list_user_sessions("frank")] == ["mine"]
        await manager.remove("solo")
        assert await manager.get("solo") is None
        assert session.state == "removed"


def _partition(session_id: str, partitions: int = 16) -> int:
    import zlib

    return zlib.crc32(session_id.encode()) % partitions


async def test_ensure_of_an_expired_id_starts_a_fresh_session(settings: Settings) -> None:
    async with SessionManager(settings=settings, session_timeout_secs=0.3) as manager:
        old = await manager.ensure("lapsed", data={"old": True})
        await manager.update_activity("lapsed")
        await manager.flush()
        await asyncio.sleep(0.4)
        assert await manager.get("lapsed") is None
        new = await manager.ensure("lapsed")
        assert new.data == {} and new.request_count == 0 and new.version > old.version
        assert new.created_at > old.created_at


async def test_close_closes_every_redis_connection(settings: Settings, redis: aioredis.Redis) -> None:
    before = len(await redis.client_list())
    async with SessionManager(settings=settings) as manager:
        await asyncio.gather(*(manager.ensure() for _ in range(50)))
        assert len(await redis.client_list()) > before
    # Not left for the garbage collector: close() closes the pool (connections from other tests may be
    # collected meanwhile, hence <=).
    assert len(await redis.client_list()) <= before


async def test_a_closed_manager_refuses_calls_instead_of_reconnecting(settings: Settings) -> None:
    manager = SessionManager(settings=settings)
    session = await manager.ensure()
    await manager.close()
    for call in (manager.get(session.session_id), manager.update_activity(session.session_id),
                 manager.ensure(session.session_id), manager.get_session_metrics()):
        with pytest.raises(ConfigurationError, match="closed"):
            await call


async def test_metrics_say_the_flusher_is_not_running_while_it_is_down(settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """flusher_running comes from the flusher task, not from the settings: a flusher that died and waits to be
    restarted is not running."""
    async def dies(self: object, stop: asyncio.Event) -> None:
        raise RuntimeError("a flusher bug")

    monkeypatch.setattr(Flusher, "run", dies)
    async with SessionManager(settings=settings) as manager:
        await until(lambda: "flusher" in manager.worker.down())
        assert (await manager.get_session_metrics())["flusher_running"] is False
    async with SessionManager(settings=settings, run_flusher=False) as idle:
        assert (await idle.get_session_metrics())["flusher_running"] is False
