"""Read-throughs of one event-loop turn share one Postgres query: when Redis restarts empty every request
misses at once, and Postgres gets one ``session_id = ANY(...)`` per turn instead of one query per request."""

from __future__ import annotations

import asyncio

from ..cold_tier import PostgresSessionStore
from ..model import ColdRecord


class ColdBatch:
    def __init__(self, store: PostgresSessionStore) -> None:
        self.store = store
        self._waiting: dict[str, asyncio.Future[ColdRecord | None]] = {}
        self._queries: set[asyncio.Task[None]] = set()

    def fetch(self, session_id: str) -> asyncio.Future[ColdRecord | None]:
        """The row of ``session_id`` (None if Postgres has none), fetched with the others asked for in this
        loop turn."""
        waiting = self._waiting.get(session_id)
        if waiting is not None:
            return waiting
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._send)
        future: asyncio.Future[ColdRecord | None] = loop.create_future()
        self._waiting[session_id] = future
        return future

    def _send(self) -> None:
        batch, self._waiting = self._waiting, {}
        query = asyncio.get_running_loop().create_task(self._query(batch))
        self._queries.add(query)  # held until done: a task only the loop references may be collected
        query.add_done_callback(self._queries.discard)

    async def _query(self, batch: dict[str, asyncio.Future[ColdRecord | None]]) -> None:
        try:
            found = await self.store.fetch_many(list(batch))
        except BaseException as exc:  # every caller gets the failure, named by the manager's edge
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for session_id, future in batch.items():
            if not future.done():
                future.set_result(found.get(session_id))
