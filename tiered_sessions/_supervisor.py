"""Supervised background work: every long-lived task of a process (flush loop, cleanup, backlog poll, Redis probe)
is started here, in one place. A task that dies of an unexpected exception is logged at once with its
traceback, counted (``tiered_sessions_task_restarts_total{task}``) and started again after a backoff; while it
waits to restart it is "down" (``/healthz`` fails). ``stop()`` sets the stop event the loops watch, waits for
them within a deadline, then cancels what is left: it always returns.

A loop returns when the stop event is set; any other return means its work is done (a probe that found Redis
back) and it is not restarted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from . import metrics

log = logging.getLogger(__name__)

Work = Callable[[], Coroutine[Any, Any, None]]
_FIRST_BACKOFF_SECS = 0.1
_MAX_BACKOFF_SECS = 5.0


class Supervisor:
    def __init__(self, stop: asyncio.Event) -> None:
        self.stop_event = stop
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: dict[str, str] = {}  # task name -> why it is down (waiting to restart)

    def start(self, name: str, work: Work) -> None:
        """Run ``work`` under supervision as ``name``, unless a task of that name is running already."""
        running = self._tasks.get(name)
        if running is not None and not running.done():
            return
        if self.stop_event.is_set():
            return
        self._tasks[name] = asyncio.get_running_loop().create_task(self._supervise(name, work), name=f"ts-{name}")

    def running(self, name: str) -> bool:
        """The task ``name`` runs now (started, not ended, not waiting to be restarted)."""
        task = self._tasks.get(name)
        return task is not None and not task.done() and name not in self._down

    def down(self) -> dict[str, str]:
        """The tasks that died and wait to be restarted, with the error each died of."""
        return dict(self._down)

    async def _supervise(self, name: str, work: Work) -> None:
        backoff = _FIRST_BACKOFF_SECS
        while not self.stop_event.is_set():
            try:
                await work()
                return
            except Exception as exc:
                metrics.TASK_RESTARTS.labels(name).inc()
                self._down[name] = f"{type(exc).__name__}: {exc}"
                log.exception("background task %s died; restarting it in %.1fs", name, backoff)
            try:
                await asyncio.wait_for(self.stop_event.wait(), backoff)
            except TimeoutError:
                pass
            finally:
                self._down.pop(name, None)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECS)

    async def cancel(self, timeout: float) -> None:
        """Set the stop event and cancel every task now, waiting ``timeout`` at most for them to end."""
        self.stop_event.set()
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout)
            for task in stuck:
                log.error("background task %s ignored its cancellation for %.1fs; left behind", task.get_name(),
                          timeout)
        self._tasks.clear()

    async def stop(self, timeout: float) -> None:
        """Set the stop event, let the loops end within ``timeout`` seconds, then cancel the rest and wait for
        them: a loop stuck in a driver call that ignores the stop event cannot keep the process alive."""
        self.stop_event.set()
        tasks = [task for task in self._tasks.values() if not task.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                log.warning("background task %s did not stop within %.1fs: cancelled", task.get_name(), timeout)
                task.cancel()
            if late:
                _, stuck = await asyncio.wait(late, timeout=timeout)
                for task in stuck:  # its driver call ignores cancellation: say so instead of waiting forever
                    log.error("background task %s ignored its cancellation for %.1fs; left behind",
                              task.get_name(), timeout)
        for task in self._tasks.values():
            if task.done() and not task.cancelled() and task.exception() is not None:  # not supervised: a bug here
                log.error("background task %s ended with %r", task.get_name(), task.exception())
        self._tasks.clear()
