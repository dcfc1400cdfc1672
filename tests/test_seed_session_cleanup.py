"""Ported from the seed: github.com/Zazzles2908/EX-AI-MCP-Server, tests/week2/test_session_cleanup.py at
commit e818f21ea5803974d6c0f68132601c6d02f10e10 (the tests of ``src.daemon.session_manager.SessionManager``).

Run against ``SessionManager`` with persistence on and off (``seed_managers``). Changes from the original:
``SessionManager(...)`` is ``await make(...)`` (a manager on this test's Redis and PostgreSQL); the seed's
managers were in-memory, so "independent instances" are managers on tiers of their own, and managers on one
tier share their sessions (a test added below says so)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tiered_sessions import Session

from .helpers import SeedManagers


class TestSessionCreation:
    """Test session creation and basic operations."""

    async def test_create_session(self, seed_managers: SeedManagers) -> None:
        """Test creating a new session."""
        manager = await seed_managers()
        session = await manager.ensure("test-session-1")

        assert session is not None
        assert session.session_id == "test-session-1"
        assert session.created_at > 0
        assert session.last_activity > 0
        assert not session.closed

    async def test_create_session_with_auto_id(self, seed_managers: SeedManagers) -> None:
        """Test creating session with auto-generated ID."""
        manager = await seed_managers()
        session = await manager.ensure(None)

        assert session is not None
        assert session.session_id is not None
        assert len(session.session_id) > 0

    async def test_get_existing_session(self, seed_managers: SeedManagers) -> None:
        """Test retrieving existing session."""
        manager = await seed_managers()
        session1 = await manager.ensure("test-session-2")
        session2 = await manager.get("test-session-2")

        assert session1 is session2
        assert session2 is not None and session1.session_id == session2.session_id

    async def test_get_nonexistent_session(self, seed_managers: SeedManagers) -> None:
        """Test retrieving non-existent session returns None."""
        manager = await seed_managers()
        session = await manager.get("nonexistent")

        assert session is None


class TestSessionTimeout:
    """Test session timeout detection and cleanup."""

    async def test_session_not_timed_out_when_active(self, seed_managers: SeedManagers) -> None:
        """Test active session is not timed out."""
        manager = await seed_managers(session_timeout_secs=10)
        session = await manager.ensure("test-session-3")

        is_timed_out = manager.is_session_timed_out(session)
        assert not is_timed_out

    async def test_session_timed_out_after_inactivity(self, seed_managers: SeedManagers) -> None:
        """Test session times out after inactivity period."""
        manager = await seed_managers(session_timeout_secs=1)
        session = await manager.ensure("test-session-4")

        # Wait for timeout
        await asyncio.sleep(1.5)

        is_timed_out = manager.is_session_timed_out(session)
        assert is_timed_out

    async def test_update_activity_prevents_timeout(self, seed_managers: SeedManagers) -> None:
        """Test updating activity prevents timeout."""
        manager = await seed_managers(session_timeout_secs=2)
        session = await manager.ensure("test-session-5")

        # Wait half the timeout
        await asyncio.sleep(1)

        # Update activity
        await manager.update_activity("test-session-5")

        # Wait another half timeout
        await asyncio.sleep(1)

        # Should not be timed out because we updated activity
        is_timed_out = manager.is_session_timed_out(session)
        assert not is_timed_out

    async def test_cleanup_stale_sessions(self, seed_managers: SeedManagers) -> None:
        """Test cleanup of stale sessions."""
        manager = await seed_managers(session_timeout_secs=1)

        # Create multiple sessions
        await manager.ensure("session-1")
        await manager.ensure("session-2")
        await manager.ensure("session-3")

        # Wait for timeout
        await asyncio.sleep(1.5)

        # Cleanup stale sessions
        cleaned = await manager.cleanup_stale_sessions()

        assert cleaned == 3

        # Verify all sessions removed
        session_ids = await manager.list_ids()
        assert len(session_ids) == 0


class TestSessionLimits:
    """Test session limit enforcement."""

    async def test_session_limit_not_exceeded(self, seed_managers: SeedManagers) -> None:
        """Test creating sessions within limit."""
        manager = await seed_managers(max_concurrent_sessions=5)

        # Create sessions within limit
        for i in range(5):
            session = await manager.ensure(f"session-{i}")
            assert session is not None

        session_ids = await manager.list_ids()
        assert len(session_ids) == 5

    async def test_session_limit_exceeded(self, seed_managers: SeedManagers) -> None:
        """Test creating session beyond limit raises error."""
        manager = await seed_managers(max_concurrent_sessions=3)

        # Create sessions up to limit
        for i in range(3):
            await manager.ensure(f"session-{i}")

        # Try to create one more
        with pytest.raises(RuntimeError, match="Maximum concurrent sessions"):
            await manager.ensure("session-overflow")

    async def test_session_limit_after_cleanup(self, seed_managers: SeedManagers) -> None:
        """Test can create new session after cleanup."""
        manager = await seed_managers(max_concurrent_sessions=2, session_timeout_secs=1)

        # Create sessions up to limit
        await manager.ensure("session-1")
        await manager.ensure("session-2")

        # Wait for timeout
        await asyncio.sleep(1.5)

        # Cleanup stale sessions
        await manager.cleanup_stale_sessions()

        # Should be able to create new session
        session = await manager.ensure("session-3")
        assert session is not None


class TestSessionMetrics:
    """Test session metrics collection."""

    async def test_get_session_metrics(self, seed_managers: SeedManagers) -> None:
        """Test getting session metrics."""
        manager = await seed_managers()

        # Create some sessions
        await manager.ensure("session-1")
        await manager.ensure("session-2")

        metrics = await manager.get_session_metrics()

        assert metrics is not None
        assert "total_sessions" in metrics
        assert "active_sessions" in metrics
        assert metrics["total_sessions"] == 2
        assert metrics["active_sessions"] == 2

    async def test_session_duration_tracking(self, seed_managers: SeedManagers) -> None:
        """Test session duration is tracked."""
        manager = await seed_managers()
        session = await manager.ensure("session-1")

        # Wait a bit
        await asyncio.sleep(0.5)

        # Get session duration
        duration = time.time() - session.created_at
        assert duration >= 0.5

    async def test_metrics_after_cleanup(self, seed_managers: SeedManagers) -> None:
        """Test metrics updated after cleanup."""
        manager = await seed_managers(session_timeout_secs=1)

        # Create sessions
        await manager.ensure("session-1")
        await manager.ensure("session-2")

        # Wait for timeout
        await asyncio.sleep(1.5)

        # Cleanup
        await manager.cleanup_stale_sessions()

        # Check metrics
        metrics = await manager.get_session_metrics()
        assert metrics["active_sessions"] == 0


class TestSessionActivityTracking:
    """Test session activity tracking."""

    async def test_last_activity_updated_on_creation(self, seed_managers: SeedManagers) -> None:
        """Test last_activity is set on creation."""
        manager = await seed_managers()
        session = await manager.ensure("session-1")

        assert session.last_activity > 0
        assert session.last_activity >= session.created_at

    async def test_last_activity_updated_on_update(self, seed_managers: SeedManagers) -> None:
        """Test last_activity is updated."""
        manager = await seed_managers()
        session = await manager.ensure("session-1")

        original_activity = session.last_activity

        # Wait a bit
        await asyncio.sleep(0.5)

        # Update activity
        await manager.update_activity("session-1")

        # Get updated session
        updated_session = await manager.get("session-1")
        assert updated_session is not None
        assert updated_session.last_activity > original_activity

    async def test_inactive_time_calculation(self, seed_managers: SeedManagers) -> None:
        """Test calculating inactive time."""
        manager = await seed_managers()
        session = await manager.ensure("session-1")

        # Wait a bit
        await asyncio.sleep(0.5)

        # Calculate inactive time
        inactive_time = time.time() - session.last_activity
        assert inactive_time >= 0.5


class TestSessionRemoval:
    """Test session removal."""

    async def test_remove_session(self, seed_managers: SeedManagers) -> None:
        """Test removing a session."""
        manager = await seed_managers()
        await manager.ensure("session-1")

        # Verify session exists
        session = await manager.get("session-1")
        assert session is not None

        # Remove session
        await manager.remove("session-1")

        # Verify session removed
        session = await manager.get("session-1")
        assert session is None

    async def test_remove_nonexistent_session(self, seed_managers: SeedManagers) -> None:
        """Test removing non-existent session doesn't error."""
        manager = await seed_managers()

        # Should not raise error
        await manager.remove("nonexistent")


class TestSessionManagerSingleton:
    """Test SessionManager can be used as singleton."""

    async def test_multiple_instances_independent(self, seed_managers: SeedManagers) -> None:
        """Test multiple SessionManager instances are independent."""
        manager1 = await seed_managers(own_tier=True)
        manager2 = await seed_managers(own_tier=True)

        await manager1.ensure("session-1")

        # manager2 should not have session-1
        session = await manager2.get("session-1")
        assert session is None

    async def test_instances_on_one_tier_share_sessions(self, seed_managers: SeedManagers) -> None:
        """Not in the seed: managers on one tier (every process of a daemon) see the same sessions, each
        through a Session object of its own."""
        manager1 = await seed_managers()
        manager2 = await seed_managers()

        created = await manager1.ensure("session-1")
        seen = await manager2.get("session-1")
        assert isinstance(seen, Session) and seen is not created
        assert seen.session_id == created.session_id and seen.version == created.version
