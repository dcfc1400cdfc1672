"""Ported from the seed: github.com/Zazzles2908/EX-AI-MCP-Server, tests/week3/test_integration_websocket.py at
commit e818f21ea5803974d6c0f68132601c6d02f10e10: its session-manager tests (``TestWebSocketSessionIntegration``).
The file's other classes test the daemon's timeout configuration, progress heartbeat and circuit breaker, not
the session manager, and are not ported.

Run against ``SessionManager`` with persistence on and off (``seed_managers``); ``SessionManager(...)`` is
``await make(...)`` (a manager on this test's Redis and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest

from .helpers import SeedManagers


class TestWebSocketSessionIntegration:
    """Test WebSocket server integration with session management."""

    async def test_session_created_on_connection(self, seed_managers: SeedManagers) -> None:
        """Test that session is created when WebSocket connects."""
        manager = await seed_managers()

        # Simulate WebSocket connection
        session_id = "test-session-1"
        session = await manager.ensure(session_id)

        assert session is not None
        assert session.session_id == session_id
        assert session.created_at > 0
        assert session.last_activity > 0
        assert session.closed is False

    async def test_session_removed_on_disconnect(self, seed_managers: SeedManagers) -> None:
        """Test that session is removed when WebSocket disconnects."""
        manager = await seed_managers()

        # Create session
        session_id = "test-session-2"
        await manager.ensure(session_id)

        # Verify session exists
        session = await manager.get(session_id)
        assert session is not None

        # Simulate disconnect
        await manager.remove(session_id)

        # Verify session removed
        session = await manager.get(session_id)
        assert session is None

    async def test_session_activity_updated_on_message(self, seed_managers: SeedManagers) -> None:
        """Test that session activity is updated when message received."""
        manager = await seed_managers()

        # Create session
        session_id = "test-session-3"
        session = await manager.ensure(session_id)
        initial_activity = session.last_activity

        # Wait a bit
        await asyncio.sleep(0.1)

        # Simulate message received
        await manager.update_activity(session_id)

        # Verify activity updated
        updated = await manager.get(session_id)
        assert updated is not None and updated.last_activity > initial_activity

    async def test_session_timeout_detection(self, seed_managers: SeedManagers) -> None:
        """Test that timed out sessions are detected correctly."""
        manager = await seed_managers(session_timeout_secs=1)  # 1 second timeout

        # Create session
        session_id = "test-session-4"
        session = await manager.ensure(session_id)

        # Session should not be timed out initially
        assert not manager.is_session_timed_out(session)

        # Wait for timeout
        await asyncio.sleep(1.5)

        # Session should be timed out now
        timed_out = await manager.get(session_id)
        assert manager.is_session_timed_out(timed_out)

    async def test_session_cleanup_removes_stale_sessions(self, seed_managers: SeedManagers) -> None:
        """Test that cleanup removes timed out sessions."""
        manager = await seed_managers(session_timeout_secs=1)

        # Create multiple sessions
        await manager.ensure("session-1")
        await manager.ensure("session-2")
        await manager.ensure("session-3")

        # Wait for timeout
        await asyncio.sleep(1.5)

        # Cleanup stale sessions
        cleaned = await manager.cleanup_stale_sessions()

        # All sessions should be cleaned
        assert cleaned == 3

        # Verify all sessions removed
        metrics = await manager.get_session_metrics()
        assert metrics["total_sessions"] == 0

    async def test_session_limit_enforcement(self, seed_managers: SeedManagers) -> None:
        """Test that session limit is enforced."""
        manager = await seed_managers(max_concurrent_sessions=3)

        # Create sessions up to limit
        await manager.ensure("session-1")
        await manager.ensure("session-2")
        await manager.ensure("session-3")

        # Try to create one more session
        with pytest.raises(RuntimeError, match="Maximum concurrent sessions"):
            await manager.ensure("session-4")

    async def test_session_metrics_collection(self, seed_managers: SeedManagers) -> None:
        """Test that session metrics are collected correctly."""
        manager = await seed_managers()

        # Create sessions
        await manager.ensure("session-1")
        await asyncio.sleep(0.1)
        await manager.ensure("session-2")
        await asyncio.sleep(0.1)
        await manager.ensure("session-3")

        # Get metrics
        metrics = await manager.get_session_metrics()

        assert metrics["total_sessions"] == 3
        assert metrics["active_sessions"] == 3
        assert metrics["oldest_session_age"] > metrics["newest_session_age"]
        assert metrics["avg_session_age"] > 0
