"""``SessionManager``: the drop-in async session manager. Every call is served from Redis (one round trip);
a miss reads Postgres and warms Redis; a background flusher writes dirty sessions behind into Postgres.

The manager holds the operations: it validates and encodes a call once, picks where it is served (Redis, or
Postgres while Redis is unreachable: ``_backends``), and keeps the ``Session`` objects callers hold up to date.
Connections are opened and closed together (``_tiers``); every long-lived task runs in the worker
(``_worker``)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from . import _codec, _paths, _tier_admin, metrics
from ._backends import Backend, Census, Change, NewSession
from ._backends.postgres import PostgresBackend
from ._backends.redis import RedisBackend, check_size
from ._backpressure import Backpressure
from ._dead_letters import DeadLetters
from ._degraded import DegradedMode
from ._flusher import Flusher
from ._hot_tier import HotTier, TierReading
from ._naming import named_errors, raise_named
from ._session_cache import SessionCache
from ._tiers import Tiers
from ._worker import Worker
from .cold_tier import PostgresSessionStore
from .config import UNSET, Settings
from .errors import ConfigurationError, InvalidSessionData
from .events import EventHub, Listener
from .locks import SessionLock
from .model import ACTIVE, Session

log = logging.getLogger(__name__)
_UPDATE_ACTIVITY_TIMER = metrics.OperationTimer("update_activity")


class SessionManager:
    """Async session manager over Redis (hot) and PostgreSQL (cold, written behind).

    Arguments not given come from ``TIERED_SESSIONS_*`` environment variables, then the defaults of
    :class:`~tiered_sessions.config.Settings` (shown in the signature's documentation: 3600 s timeout,
    100 sessions, 300 s cleanup interval, persistence and flusher on, 0.5 s flush interval, 1000-row batches).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        database_url: str | None = None,
        session_timeout_secs: float = UNSET,
        max_concurrent_sessions: int | None = UNSET,
        cleanup_interval_secs: float = UNSET,
        enable_persistence: bool = UNSET,
        run_flusher: bool = UNSET,
        flush_interval_secs: float = UNSET,
        flush_batch_size: int = UNSET,
        *,
        settings: Settings | None = None,
        **more_settings: Any,
    ) -> None:
        self.settings = Settings.merged(settings, {
            "redis_url": redis_url, "database_url": database_url, "session_timeout_secs": session_timeout_secs,
            "max_concurrent_sessions": max_concurrent_sessions, "cleanup_interval_secs": cleanup_interval_secs,
            "enable_persistence": enable_persistence, "run_flusher": run_flusher,
            "flush_interval_secs": flush_interval_secs, "flush_batch_size": flush_batch_size, **more_settings,
        })
        self.session_timeout_secs = self.settings.session_timeout_secs
        self.max_concurrent_sessions = self.settings.max_concurrent_sessions
        self.enable_persistence = self.settings.enable_persistence
        self.events = EventHub()
        self.worker = Worker(self.settings)  # every long-lived task of this manager
        self.degraded: DegradedMode | None = None  # the breaker; None without persistence or when turned off
        self._backpressure = Backpressure(self.settings)
        self._sessions = SessionCache(self.settings.session_max_inflight)
        self._tiers: Tiers | None = None
        self._redis: RedisBackend | None = None
        self._postgres: PostgresBackend | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False  # close() or terminate() called: calls are refused
        self._stopped = False  # and they have closed the connections

    @property
    def store(self) -> PostgresSessionStore | None:
        """The cold tier (None before start and without persistence)."""
        return None if self._tiers is None else self._tiers.store

    @property
    def flusher(self) -> Flusher | None:
        """This manager's flusher (None before start and without persistence)."""
        return None if self._tiers is None else self._tiers.flusher

    @property
    def stopping(self) -> bool:
        """True while ``close()`` drains (or ``terminate()`` ends): calls are refused, readings still answer."""
        return self._closed and not self._stopped and self._tiers is not None

    @property
    def backlog(self) -> int:
        """Dirty sessions in the whole tier, as last read by the backlog poll."""
        return self._backpressure.backlog

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Redis (and Postgres with persistence). Called by the first operation if not before."""
        async with self._start_lock:
            if self._tiers is not None:
                return
            if self._closed:
                raise ConfigurationError("this SessionManager was closed; create a new one")
            tiers = await Tiers.open(self.settings)
            self._redis = RedisBackend(tiers.hot, tiers.store, self.settings, self._backpressure)
            if tiers.store is not None and tiers.journal is not None and self.settings.degraded_mode:
                self.degraded = DegradedMode(tiers.hot, tiers.journal, self.settings, self.worker.supervisor)
                self._postgres = PostgresBackend(tiers.store, self.degraded, self.settings)
            self.worker.run(tiers, self.events, self._backpressure, self.cleanup_stale_sessions)
            self._tiers = tiers

    async def close(self) -> None:
        """Stop background work, drain what this manager's flusher owns (within ``drain_timeout_secs``),
        then close connections, whatever failed on the way. With ``run_flusher=False`` dirty sessions stay in
        Redis for a flusher."""
        if await self._mark_closed():
            try:
                await self.worker.stop(self._tiers, self.events)
            finally:
                self._stopped = True

    async def terminate(self) -> None:
        """Stop now, as asyncpg's ``terminate()``: cancel background work, close connections, drain nothing
        (what is dirty stays in Redis for the next flusher; nothing acknowledged is lost)."""
        if await self._mark_closed():
            try:
                await self.worker.terminate(self._tiers, self.events)
            finally:
                self._stopped = True

    async def _mark_closed(self) -> bool:
        """Refuse calls from now on, end the loads nobody waits for; False if closed already. Waits for a start
        under way, so its tiers are closed too."""
        async with self._start_lock:
            if self._closed:
                return False
            self._closed = True
            redis, self._redis = self._redis, None  # the hot path's shortcut: calls go through _open, which refuses
            if redis is not None:
                redis.loads.cancel_unwaited()
            return True

    async def _open(self) -> Tiers:
        if self._closed:
            raise ConfigurationError("this SessionManager was closed; create a new one")
        if self._tiers is None:
            await self.start()
            assert self._tiers is not None
        return self._tiers

    async def _backend(self) -> Backend:
        """Where this call is served: Redis, or Postgres while Redis is unreachable (degraded mode)."""
        await self._open()
        degraded = self.degraded
        if degraded is not None and degraded.active and await degraded.still_active():
            assert self._postgres is not None
            return self._postgres
        assert self._redis is not None
        return self._redis

    # -- the hot path -------------------------------------------------------------------------------------
    @named_errors("ensure")
    async def ensure(self, session_id: str | None = None, *, user_id: str | None = None,
                     user_type: str | None = None, ip_address: str | None = None,
                     user_agent: str | None = None, data: Mapping[str, Any] | None = None,
                     metadata: Mapping[str, Any] | None = None) -> Session:
        """The live session with this id, loading it from Postgres if Redis lacks it, or a new one.
        ``None`` makes a new random id. The keyword arguments apply only when a session is created."""
        fresh = session_id is None
        sid = secrets.token_urlsafe(32) if session_id is None else _codec.validate_session_id(session_id)
        documents = _codec.encode_document(data or {}, _codec.DATA_PREFIX, "data")
        documents += _codec.encode_document(metadata or {}, _codec.META_PREFIX, "metadata")
        size = _codec.stored_size(documents)
        check_size(sid, size, self.settings.max_session_bytes)
        attributes = {"user_id": user_id, "user_type": user_type, "ip_address": ip_address, "user_agent": user_agent}
        pairs = [*_codec.flatten(documents), *_codec.encode_attributes(**attributes)]
        backend = await self._backend()
        fresh_session, created = await backend.ensure(sid, fresh, NewSession(dict(data or {}), dict(metadata or {}),
                                                                             attributes, pairs, size))
        session = self._sessions.adopt(fresh_session)
        if created:
            self.events.emit("created", sid, session)
        return session

    @named_errors("get")
    async def get(self, session_id: str) -> Session | None:
        """The live session, or None. Reads Postgres on a Redis miss and warms Redis with what it finds."""
        sid = _codec.validate_session_id(session_id)
        fresh = await (await self._backend()).get(sid)
        if fresh is None:
            self._sessions.forget(sid)
            return None
        return self._sessions.adopt(fresh)

    async def update_activity(self, session_id: str, request_duration_ms: int = 0) -> bool:
        """Count one request and slide the expiry, atomically in Redis. Does nothing (returns False) when the
        session is missing, closed or expired, as the in-memory managers do."""
        # The hottest call names its errors inline: named_errors' extra coroutine is a measurable share of it.
        timed = _UPDATE_ACTIVITY_TIMER.due()
        started = time.perf_counter() if timed else 0.0
        try:
            sid = _codec.validate_session_id(session_id)
            if isinstance(request_duration_ms, bool) or not isinstance(request_duration_ms, (int, float)) \
                    or not 0 <= request_duration_ms < 2**53:
                raise InvalidSessionData("request_duration_ms must be a non-negative number")
            degraded = self.degraded
            backend: Backend | None = self._redis if degraded is None or not degraded.active else None
            if backend is None:
                backend = await self._backend()
            return await backend.touch(sid, int(request_duration_ms),
                                       self._sessions.held(sid) if self._sessions else None)
        except Exception as exc:  # noqa: BLE001 - always raised again, named or as it was
            raise_named(self, "update_activity", exc)
        finally:
            if timed:
                _UPDATE_ACTIVITY_TIMER.observe(time.perf_counter() - started)

    @named_errors("update")
    async def update(self, session_id: str, data: Mapping[str, Any] | None = None,
                     metadata: Mapping[str, Any] | None = None, *, set: Mapping[str, Any] | None = None,
                     unset: Iterable[str] | None = None, expected_version: int | None = None,
                     user_id: str | None = None, user_type: str | None = None, ip_address: str | None = None,
                     user_agent: str | None = None, closed: bool | None = None) -> int:
        """Change a session atomically; returns its new version.

        ``data`` / ``metadata`` merge top-level keys (other keys stay). ``set`` takes paths into ``data``
        (``{"cart.items": [...]}``: dots walk into objects, creating them) and ``unset`` deletes paths; edits of
        different keys by concurrent requests all survive. With ``expected_version``, the update happens only
        if the session is still at that version, else ``VersionConflict``. Raises ``SessionNotFound`` if the
        session is missing, removed or expired, and ``SessionTooLarge`` (changing nothing) past the size limit.
        """
        sid = _codec.validate_session_id(session_id)
        documents = _codec.encode_document(data or {}, _codec.DATA_PREFIX, "data")
        documents += _codec.encode_document(metadata or {}, _codec.META_PREFIX, "metadata")
        edits = _paths.plan(set, unset)
        documents += _codec.encode_document(edits.top_set, _codec.DATA_PREFIX, "set")
        if closed is not None and not isinstance(closed, bool):
            raise InvalidSessionData("closed must be True, False or None")
        if expected_version is not None and (isinstance(expected_version, bool)
                                             or not isinstance(expected_version, int)):
            raise InvalidSessionData("expected_version must be an integer")
        attributes = {"user_id": user_id, "user_type": user_type, "ip_address": ip_address, "user_agent": user_agent}
        encoded_attributes = _codec.encode_attributes(**attributes)
        check_size(sid, _codec.stored_size(documents), self.settings.max_session_bytes)
        change = Change(data, metadata, edits, documents, attributes, encoded_attributes, closed, expected_version)
        version, roots = await (await self._backend()).update(sid, change)
        self._sessions.changed(sid, version, data, metadata, edits, roots, attributes, closed)
        return version

    @named_errors("remove")
    async def remove(self, session_id: str) -> None:
        """Delete the session durably (a tombstone the flusher writes to Postgres). Silent if missing."""
        sid = _codec.validate_session_id(session_id)
        await (await self._backend()).remove(sid)
        self._sessions.removed(sid)

    # -- whole-tier operations ----------------------------------------------------------------------------
    @named_errors("list_ids")
    async def list_ids(self) -> list[str]:
        """Ids of the live sessions in Redis (all processes), in no particular order."""
        tiers = await self._open()
        return list(await tiers.hot.live_sessions(_codec.now_ms()))

    @named_errors("recover_all_sessions")
    async def recover_all_sessions(self, progress: Callable[[int, int], None] | None = None,
                                   page_size: int = 1000) -> int:
        """Warm every live session from Postgres into Redis (keeping any newer copy Redis has). Returns how
        many sessions were put (back) into Redis. ``progress(done, total)`` is called after every page."""
        return await _tier_admin.recover(await self._open(), progress, page_size)

    @named_errors("cleanup_stale_sessions")
    async def cleanup_stale_sessions(self) -> int:
        """Remove closed sessions and mark timed-out ones expired, in both tiers. Returns how many sessions
        timed out (or were closed and removed) since the last cleanup of any process: each is counted by one
        cleanup in the whole tier, including those Redis let go by their TTL and those never flushed. One that
        timed out within the last 1/64 of the timeout is counted by the next cleanup."""
        tiers = await self._open()
        now_ms = _codec.now_ms()
        for sid in await _tier_admin.remove_closed(tiers, now_ms):
            self._sessions.removed(sid)
        expired = await _tier_admin.expire_in_postgres(tiers, now_ms)
        for record in expired:
            self.events.emit("expired", record.session_id, record.to_session())
        self._sessions.forget_expired(now_ms / 1000)
        return await tiers.hot.timed_out(now_ms)

    @named_errors("get_session_metrics")
    async def get_session_metrics(self) -> dict[str, Any]:
        """The seed's metrics (over live sessions in Redis) plus the write-behind backlog and lag. In degraded
        mode they come from Postgres (live rows; ages, backlog and lag unknown: None) with ``mode`` saying so."""
        await self._open()
        # Not _backend(): a reading must not wait out a switch back to Redis.
        degraded = self.degraded
        backend = self._postgres if degraded is not None and degraded.active else self._redis
        assert backend is not None
        census: Census = await backend.census()
        return {
            **census.as_metrics(),
            "persistence_enabled": self.settings.enable_persistence,
            "max_concurrent_sessions": self.settings.max_concurrent_sessions,
            "session_timeout_secs": self.settings.session_timeout_secs,
            "partitions": self.settings.partitions,
            "backpressure": not self._backpressure.open.is_set(),
            "flusher_running": self.worker.running("flusher"),
        }

    async def tier_reading(self) -> TierReading:
        """Lag, backlog, live sessions and dead letters of the tier now (``metrics.refresh``), also while closing."""
        tiers = self._tiers if self.stopping and self._tiers is not None else await self._open()
        return await tiers.hot.reading(_codec.now_ms(), dead_letters=True)

    # -- rotation, per-user index, events -----------------------------------------------------------------
    @named_errors("rotate")
    async def rotate(self, session_id: str) -> Session:
        """Move a live session to a fresh random id (session fixation defence, e.g. at login): data, counters
        and expiry move with it; the old id is tombstoned in both tiers and never works again."""
        sid = _codec.validate_session_id(session_id)
        moved = await (await self._backend()).rotate(sid)
        self._sessions.removed(sid)
        return self._sessions.adopt(moved)

    @named_errors("list_user_sessions")
    async def list_user_sessions(self, user_id: str) -> list[Session]:
        """The user's live sessions, oldest first. Postgres's user_id index lists the flushed ones, the dirty
        index the rest (new sessions, a new owner): each candidate is then read and its owner checked. Without
        persistence, every live session in Redis is checked."""
        uid = _codec.validate_attribute("user_id", user_id)
        if uid is None:
            raise InvalidSessionData("user_id must be a string")
        found = await (await self._backend()).user_sessions(uid)
        return sorted((self._sessions.adopt(s) for s in found), key=lambda s: s.created_at)

    async def revoke_user_sessions(self, user_id: str) -> int:
        """Log the user out everywhere: remove every live session of theirs. Returns how many."""
        sessions = await self.list_user_sessions(user_id)
        for session in sessions:
            await self.remove(session.session_id)
        return len(sessions)

    def on_created(self, listener: Listener) -> Listener:
        """Call ``await listener(event)`` when a session is created (usable as a decorator)."""
        return self.events.subscribe("created", listener)

    def on_removed(self, listener: Listener) -> Listener:
        """Call ``await listener(event)`` when a removal reaches Postgres (from this manager's flusher)."""
        return self.events.subscribe("removed", listener)

    def on_expired(self, listener: Listener) -> Listener:
        """Call ``await listener(event)`` when a session is found expired (flusher or cleanup)."""
        return self.events.subscribe("expired", listener)

    async def dead_letters(self) -> DeadLetters:
        """The store of rows Postgres rejected: ``list()``, ``replay(ids)``, ``drop(ids)``."""
        return DeadLetters((await self._open()).hot)

    def lock(self, session_id: str, *, timeout: float | None = 5.0, lease: float = 10.0) -> SessionLock:
        """The session's lock, for ``async with manager.lock(id, timeout=5.0, lease=10.0) as lock:``: a Redis
        lease with a fencing token (``lock.token``), released on exit, expiring by itself if the holder dies.
        Raises ``LockTimeout`` after ``timeout`` seconds (None: wait forever). See :mod:`tiered_sessions.locks`."""
        return SessionLock(self._hot_tier, self.settings.redis_url, session_id, timeout=timeout, lease=lease)

    def is_session_timed_out(self, session: Session | None) -> bool:
        """True if the session is closed or has seen no activity for ``session_timeout_secs``, or is None (what
        ``get`` answers for a session that timed out, or is gone)."""
        return session is None or session.state != ACTIVE or time.time() >= session.expires_at

    @named_errors("flush")
    async def flush(self) -> int:
        """Write everything dirty now to Postgres; returns when it is durable. Returns how many sessions
        written meanwhile by others are still dirty (0 when the tier was quiet). Raises after retrying
        for ``drain_timeout_secs`` if Postgres stays unreachable."""
        tiers = await self._open()
        if tiers.flusher is None:
            return 0
        return await tiers.flusher.drain(self.settings.drain_timeout_secs, only_dirty_before_now=True)

    async def _hot_tier(self) -> HotTier:
        return (await self._open()).hot


__all__ = ["SessionManager"]
