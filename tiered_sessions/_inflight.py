"""A session's in-flight limit in this process (``Session.sem``): a bounded semaphore of ``max_inflight``
permits that counts the permits out (``Session.inflight``).

Rules: the limit is process-local (nothing of it reaches Redis or Postgres; ``SessionManager.lock()`` is the
tier-wide exclusion). While a permit is out its session is held here, so the manager's weakly held cache keeps
handing out the same object, and so the same semaphore, to the call that releases it."""

from __future__ import annotations

import asyncio
from typing import ClassVar, Literal


class InflightLimit(asyncio.BoundedSemaphore):
    # Limits with permits out, with their sessions: held strongly until the last permit comes back.
    _busy: ClassVar[set[InflightLimit]] = set()

    def __init__(self, owner: object, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_inflight must be a positive integer, got {value!r}")
        super().__init__(value)
        self.owner = owner
        self.held = 0

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.held += 1
        self._busy.add(self)
        return True

    def release(self) -> None:
        super().release()  # ValueError past the bound: nothing counted
        self.held -= 1
        if self.held == 0:
            self._busy.discard(self)
