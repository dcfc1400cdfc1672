"""Read-throughs share Postgres queries: when Redis restarts empty every request misses at once, and Postgres
gets one ``session_id = ANY(...)`` per batch instead of one query per request. As with Redis round trips
(``_pipelining``), at most ``QUERIES_IN_FLIGHT`` queries are out at once and the ids asked for meanwhile gather
for the next one, so the busier the process, the fuller each query."""

from __future__ import annotations

import asyncio

from ..cold_tier import PostgresSessionStore
from ..model import ColdRecord

QUERIES_IN_FLIGHT = 2


class ColdBatch:
    def __init__(self, store: PostgresSessionStore) -> None:
        self.store = store
        self._waiting: dict[str, asyncio.Future[ColdRecord | None]] = {}
        self._queries: set[asyncio.Task[None]] = set()
        self._send_scheduled = False

    def fetch(self, session_id: str) -> asyncio.Future[ColdRecord | None]:
        """The row of ``session_id`` (None if Postgres has none), fetched with the others asked for in this
        loop turn, or while the queries before it were out."""
        waiting = self._waiting.get(session_id)
        if waiting is not None:
            return waiting
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ColdRecord | None] = loop.create_future()
        self._waiting[session_id] = future
        if len(self._queries) < QUERIES_IN_FLIGHT:
            self._schedule_send(loop)
        return future

    def _schedule_send(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._send_scheduled:
            self._send_scheduled = True
            loop.call_soon(self._send)

    def _send(self) -> None:
        self._send_scheduled = False
        if not self._waiting:
            return
        batch, self._waiting = self._waiting, {}
        query = asyncio.get_running_loop().create_task(self._query(batch))
        self._queries.add(query)  # held until done: a task only the loop references may be collected
        query.add_done_callback(self._query_done)

    def _query_done(self, query: asyncio.Task[None]) -> None:
        self._queries.discard(query)
        if self._waiting:  # gathered while the queries were out
            self._schedule_send(query.get_loop())
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
