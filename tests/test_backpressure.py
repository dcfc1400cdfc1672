"""Past the high watermark writers wait, then get BackpressureError; below the low watermark they proceed."""

from __future__ import annotations

import asyncio

import pytest

from tiered_sessions import BackpressureError, SessionManager, Settings

from .helpers import until


async def test_writers_wait_then_fail_then_proceed(settings: Settings) -> None:
    async with SessionManager(settings=settings, run_flusher=False, backlog_high_watermark=40,
                              backlog_low_watermark=10, backpressure_timeout_secs=0.3,
                              backlog_poll_secs=0.02) as manager:
        for i in range(40):
            await manager.ensure(f"b-{i}")
        await until(lambda: manager.backlog >= 40)
        assert (await manager.get_session_metrics())["backpressure"] is True
        started = asyncio.get_running_loop().time()
        with pytest.raises(BackpressureError, match="high watermark 40"):
            await manager.update_activity("b-1")
        assert asyncio.get_running_loop().time() - started >= 0.3  # it waited before refusing
        with pytest.raises(BackpressureError):
            await manager.ensure("b-new")
        with pytest.raises(BackpressureError):
            await manager.update("b-2", data={"x": 1})
        # Reads and removes are never held back.
        assert await manager.get("b-3") is not None
        await manager.remove("b-4")
        # A writer that waits while the backlog drains goes through.
        waiting = asyncio.create_task(manager.update_activity("b-5"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await manager.flush()
        assert await waiting is True
        await until(lambda: manager.backlog < 40)
        assert await manager.update_activity("b-6") is True


async def test_no_watermark_means_no_backpressure(settings: Settings) -> None:
    async with SessionManager(settings=settings, run_flusher=False, backlog_high_watermark=None) as manager:
        for i in range(30):
            await manager.ensure(f"n-{i}")
        assert (await manager.get_session_metrics())["backpressure"] is False
