"""Read-through loads: one per session id in this process, however many calls miss it at once. Each load is a
task of its own that every caller shields: a caller that gives up (a request timed out) cancels only its own
wait, never the load the others wait on. A load that fails after every caller gave up is logged and counted
here, since no caller will report it; ``cancel_unwaited`` ends the loads nobody waits for (at close)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from .. import metrics
from .._failures import REDIS_ERRORS, describe

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Load(Generic[T]):
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiters = 0


class Loads(Generic[T]):
    def __init__(self) -> None:
        self._loads: dict[str, _Load[T]] = {}

    async def load(self, session_id: str, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The result of the load of ``session_id`` under way, or of a new one made by ``start()``."""
        load = self._loads.get(session_id)
        if load is None:
            load = self._loads[session_id] = _Load(asyncio.get_running_loop().create_task(start()))
            # Called before the callers' shields are: a caller still counted here will get the outcome
            load.task.add_done_callback(functools.partial(self._done, session_id, load))
        load.waiters += 1
        try:
            return await asyncio.shield(load.task)
        finally:
            load.waiters -= 1

    def cancel_unwaited(self) -> None:
        for load in self._loads.values():
            if not load.waiters:
                load.task.cancel()

    def _done(self, session_id: str, load: _Load[T], task: asyncio.Task[T]) -> None:
        del self._loads[session_id]
        if task.cancelled():
            return
        error = task.exception()  # retrieved either way: never "exception was never retrieved"
        if error is not None and not load.waiters:
            backend = "redis" if isinstance(error, REDIS_ERRORS) else "postgres"
            metrics.BACKEND_ERRORS.labels(backend, "read_through").inc()
            log.warning("read-through of session %s failed after every caller gave up: %s", session_id,
                        describe(error))
