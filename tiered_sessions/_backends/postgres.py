"""Degraded mode's backend: while Redis is unreachable every call is served by Postgres. Writes go through,
each journaled in its own statement (the cold tier's ``*_through`` calls), so Redis gets them when it is back;
what needs Redis (nested edits, ``expected_version``, ``rotate``) raises ``RedisUnavailable``. Every write is
counted in flight by the breaker, which waits for them before switching back (see ``degraded``)."""

from __future__ import annotations

import time
from typing import Any

from .. import metrics
from .._degraded import DegradedMode
from ..cold_tier import PostgresSessionStore
from ..config import Settings
from ..errors import RedisUnavailable, SessionNotFound, SessionTooLarge
from ..model import CLOSED, ColdRecord, Session
from . import Census, Change, NewSession


class PostgresBackend:
    def __init__(self, store: PostgresSessionStore, breaker: DegradedMode, settings: Settings) -> None:
        self.store = store
        self.breaker = breaker
        self.settings = settings

    async def _load(self, session_id: str) -> ColdRecord | None:
        record = await self.store.fetch(session_id)
        return record if record is not None and record.is_live(time.time()) else None

    async def ensure(self, session_id: str, fresh: bool, new: NewSession) -> tuple[Session, bool]:
        created = False
        async with self.breaker.writing():
            record = None if fresh else await self._load(session_id)
            if record is None:
                created = await self.store.create_through(session_id, new.data, new.metadata, new.attributes,
                                                          self.settings.session_timeout_secs)
                record = await self._load(session_id)  # created now, or by someone else a moment ago
        assert record is not None
        return record.to_session(), created

    async def get(self, session_id: str) -> Session | None:
        record = await self._load(session_id)
        metrics.READS_BY_TIER["cold" if record else "miss"].inc()
        return None if record is None else record.to_session()

    async def touch(self, session_id: str, duration_ms: int, held: Session | None) -> bool:
        async with self.breaker.writing():
            counted = await self.store.touch_through(session_id, duration_ms, self.settings.session_timeout_secs)
        if counted and held is not None:
            held.request_count += 1
            held.total_duration_ms += duration_ms
            held.last_activity = time.time()
            held.expires_at = held.last_activity + self.settings.session_timeout_secs
        return counted

    async def update(self, session_id: str, change: Change) -> tuple[int, dict[str, Any]]:
        if change.edits or change.expected_version is not None:
            raise RedisUnavailable("set/unset and expected_version need Redis, which is unreachable "
                                   "(degraded mode); data= and metadata= merges still work")
        state = None if change.closed is None else (CLOSED if change.closed else "active")
        async with self.breaker.writing():
            version = await self.store.merge_through(session_id, change.data or {}, change.metadata or {},
                                                     change.attributes, state, self.settings.max_session_bytes)
        if version is None:
            if await self._load(session_id) is None:
                raise SessionNotFound(f"session {session_id} does not exist, was removed or has expired")
            raise SessionTooLarge(f"session {session_id} would pass max_session_bytes="
                                  f"{self.settings.max_session_bytes}; nothing was changed")
        return version, {}

    async def remove(self, session_id: str) -> None:
        async with self.breaker.writing():
            await self.store.remove_through(session_id)

    async def rotate(self, session_id: str) -> Session:
        raise RedisUnavailable("rotate needs Redis, which is unreachable (degraded mode)")

    async def user_sessions(self, user_id: str) -> list[Session]:
        now = time.time()
        records = (await self.store.fetch_many(await self.store.user_session_ids(user_id))).values()
        return [r.to_session() for r in records if r.is_live(now) and r.user_id == user_id]

    async def census(self) -> Census:
        live = await self.store.count_live()
        return Census("degraded", live, live, None, None, None)
