"""The seed's per-session in-flight limit (``Session.inflight``, ``max_inflight``, ``sem``): process-local, one
semaphore per live id, shared by every holder in the process, and never stored."""

from __future__ import annotations

import asyncio
import gc

import pytest

from tiered_sessions import Session, SessionManager, Settings


async def test_a_session_carries_the_seeds_inflight_fields(manager: SessionManager) -> None:
    session = await manager.ensure("quota")
    assert session.inflight == 0 and session.max_inflight == 8
    assert isinstance(session.sem, asyncio.BoundedSemaphore)
    assert "sem" not in session.to_dict() and "inflight" not in session.to_dict()


async def test_the_semaphore_bounds_requests_in_flight(settings: Settings) -> None:
    async with SessionManager(settings=settings, session_max_inflight=2) as manager:
        session = await manager.ensure("busy")
        await session.sem.acquire()
        async with session.sem:
            assert session.inflight == 2 and session.sem.locked()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(session.sem.acquire(), 0.05)  # the daemon's "retry soon"
        assert session.inflight == 1
        session.sem.release()
        assert session.inflight == 0
        with pytest.raises(ValueError):  # bounded: a release without an acquire is a bug, not a free permit
            session.sem.release()
        assert session.inflight == 0


async def test_every_holder_in_the_process_shares_one_semaphore(manager: SessionManager) -> None:
    """The daemon acquires through one ``get`` and releases through another, holding nothing in between."""
    sid = (await manager.ensure()).session_id
    await (await manager.ensure(sid)).sem.acquire()
    gc.collect()  # nobody holds the Session: the permit out must keep it (and its semaphore) the same
    again = await manager.get(sid)
    assert again is not None and again.inflight == 1
    await manager.update_activity(sid, request_duration_ms=5)  # refreshes the object, keeps the semaphore
    assert again.inflight == 1
    (await manager.get(sid)).sem.release()  # type: ignore[union-attr]
    assert again.inflight == 0


async def test_the_limit_is_process_local(settings: Settings) -> None:
    """Two processes (two managers) on one tier each have their own limit: it is never read from Redis."""
    async with SessionManager(settings=settings, session_max_inflight=1) as one, \
            SessionManager(settings=settings, session_max_inflight=1) as other:
        mine = await one.ensure("shared")
        theirs = await other.ensure("shared")
        async with mine.sem:
            await asyncio.wait_for(theirs.sem.acquire(), 1.0)
            assert mine.inflight == theirs.inflight == 1
        theirs.sem.release()


def test_max_inflight_comes_from_the_seeds_variable_unless_ours_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAI_WS_SESSION_MAX_INFLIGHT", "3")
    assert Settings.from_env().session_max_inflight == 3
    monkeypatch.setenv("TIERED_SESSIONS_SESSION_MAX_INFLIGHT", "5")
    assert Settings.from_env().session_max_inflight == 5
    assert Settings.from_env(session_max_inflight=7).session_max_inflight == 7


async def test_sessions_of_a_manager_take_its_limit(settings: Settings) -> None:
    async with SessionManager(settings=settings, session_max_inflight=3) as manager:
        session = await manager.ensure()
        assert session.max_inflight == 3
        rotated = await manager.rotate(session.session_id)
        assert rotated.max_inflight == 3


def test_a_session_built_by_hand_has_the_default_limit() -> None:
    session = Session("by-hand", created_at=0, last_activity=0, expires_at=1)
    assert session.max_inflight == 8 and session.inflight == 0
    assert Session.from_dict(session.to_dict()).max_inflight == 8
