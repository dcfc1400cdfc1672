"""Lifecycle events: ``created``, ``removed`` and ``expired``, delivered to async callbacks at least once.

They come from the data, not from Redis keyspace notifications (lost on restarts and on clusters):
``created`` from the manager that created the session, when the call returns; ``removed`` and ``expired``
from the flusher, for each tombstone or expired row it writes, before it acks (a crash means another
delivery later), and ``expired`` also from ``cleanup_stale_sessions`` for sessions that expired after their
last flush (the rows it marks expired in Postgres). With persistence off only ``created`` is delivered.
Duplicates are possible; callbacks should be idempotent. A failing callback is logged and
counted; it never fails the call that emitted the event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from . import metrics
from ._hot_tier import DirtyEntry
from .model import ColdRecord, Session

log = logging.getLogger(__name__)
KINDS = ("created", "removed", "expired")


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEvent:
    kind: str
    session_id: str
    session: Session | None  # the last state known (None when nothing is left of it)


Listener = Callable[[SessionEvent], Awaitable[None]]


class EventHub:
    """Events wait in a queue; the worker's ``events`` task hands each to its listeners (one task per listener,
    so a slow one holds up no other). ``drain`` delivers what is left at close."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[Listener]] = {kind: [] for kind in KINDS}
        self._queue: asyncio.Queue[SessionEvent | None] = asyncio.Queue()
        self._running: set[asyncio.Task[None]] = set()

    def subscribe(self, kind: str, listener: Listener) -> Listener:
        if not callable(listener):
            raise TypeError("a listener must be an async callable taking a SessionEvent")
        self.listeners[kind].append(listener)
        return listener

    def wants(self, kind: str) -> bool:
        return bool(self.listeners[kind])

    def emit(self, kind: str, session_id: str, session: Session | None) -> None:
        if self.listeners[kind]:
            self._queue.put_nowait(SessionEvent(kind, session_id, session))

    def row_written(self, row: DirtyEntry) -> None:
        """The flusher wrote a tombstone or an expired row: ``removed`` or ``expired``."""
        kind = "removed" if row.kind == "tombstone" else "expired"
        if self.listeners[kind]:
            self.emit(kind, row.session_id, ColdRecord.from_row(row.row).to_session())

    async def deliver(self) -> None:
        """Hand events to their listeners as they come, until ``stop_delivery`` (the worker runs this)."""
        while (event := await self._queue.get()) is not None:
            self._dispatch(event)

    def stop_delivery(self) -> None:
        self._queue.put_nowait(None)

    def _dispatch(self, event: SessionEvent) -> None:
        for listener in self.listeners[event.kind]:
            task = asyncio.get_running_loop().create_task(self._deliver(listener, event))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _deliver(self, listener: Listener, event: SessionEvent) -> None:
        try:
            await listener(event)
        except Exception:
            metrics.EVENT_ERRORS.labels(event.kind).inc()
            log.exception("%s listener failed for session %s", event.kind, event.session_id)

    def cancel(self) -> None:
        """Drop what is queued and cancel the deliveries under way (at terminate), saying how many."""
        dropped = 0
        while not self._queue.empty():
            dropped += self._queue.get_nowait() is not None
        for task in self._running:
            task.cancel()
        if dropped or self._running:
            log.warning("terminated: %d queued events dropped, %d deliveries cancelled", dropped, len(self._running))

    async def drain(self, timeout: float) -> None:
        """Deliver what is still queued and let deliveries in flight finish within ``timeout`` (at close)."""
        while not self._queue.empty():
            event = self._queue.get_nowait()
            if event is not None:
                self._dispatch(event)
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=timeout)
            for task in late:
                log.warning("an event listener did not finish within %.1fs of close: cancelled", timeout)
                task.cancel()
