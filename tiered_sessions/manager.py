"""``SessionManager``: the drop-in async session manager. Every call is served from Redis (one round trip);
a miss reads Postgres and warms Redis; a background flusher writes dirty sessions behind into Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, NoReturn, ParamSpec, Self, TypeVar

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import codec, metrics, paths, scripts
from .cold_tier import TRANSIENT_ERRORS, ColdRecord, PostgresSessionStore
from .config import UNSET, Settings, redact_message, redact_url
from .dead_letters import DeadLetters
from .degraded import DegradedMode
from .errors import (
    BackendUnavailable,
    BackpressureError,
    ConfigurationError,
    InvalidSessionData,
    PostgresUnavailable,
    RedisUnavailable,
    SessionLimitExceeded,
    SessionNotFound,
    SessionTooLarge,
    VersionConflict,
)
from .events import EventHub, Listener
from .flusher import RETRYABLE, Flusher
from .hot_tier import CREATED, EXISTING, MISS, OVER_LIMIT, DirtyEntry, HotTier, TierReading
from .journal import Journal
from .layout import Layout
from .locks import SessionLock
from .model import ACTIVE, CLOSED, REMOVED, Session
from .redis_client import (
    CLUSTER_ERRORS,
    REDIS_ERRORS,
    RedisClient,
    closed_under_the_call,
    is_unreachable,
    make_client,
    unavailable,
)
from .supervisor import Supervisor

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

# Redis failures that may mean "unreachable" (is_unreachable() decides), and what a periodic cleanup survives.
_REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, *CLUSTER_ERRORS)
_CLEANUP_FAILURES: tuple[type[BaseException], ...] = (RedisUnavailable, PostgresUnavailable, *REDIS_ERRORS,
                                                      asyncpg.PostgresError)
_STATE_ARG = {None: b"", True: codec.STATE_CODES[CLOSED], False: codec.STATE_CODES[ACTIVE]}


def _backend_errors(operation: str) -> Callable[[Callable[P, Coroutine[Any, Any, T]]],
                                                 Callable[P, Coroutine[Any, Any, T]]]:
    """Turn driver connection errors into RedisUnavailable / PostgresUnavailable (URL without password),
    logged and counted. Other errors pass through unchanged."""

    def decorate(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        timer = metrics.OperationTimer(operation)  # latency of one call in 16: an observe per call costs ~9% CPU

        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            timed = timer.due()
            started = time.perf_counter() if timed else 0.0
            try:
                return await method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - always raised again, named or as it was
                _raise_named(args[0], operation, exc)  # type: ignore[arg-type]
            finally:
                if timed:
                    timer.observe(time.perf_counter() - started)

        return wrapper

    return decorate


def _raise_named(manager: SessionManager, operation: str, exc: Exception) -> NoReturn:
    """Raise the named error for a driver's connection failure (logged and counted; a Redis one trips
    degraded mode), or ``exc`` itself for any other error."""
    if isinstance(exc, BackendUnavailable):
        raise exc  # already named and redacted (it is an OSError too: keep it out of the clauses below)
    if (isinstance(exc, _REDIS_FAILURES) and is_unreachable(exc)) or closed_under_the_call(exc):
        metrics.BACKEND_ERRORS.labels("redis", operation).inc()
        if manager.degraded is not None:
            manager.degraded.trip(exc)  # calls from now on write through to Postgres
        url = manager.settings.redis_url
        log.error("%s: Redis at %s failed: %s", operation, redact_url(url), redact_message(str(exc), url))
        raise unavailable(url, operation, exc) from exc
    if isinstance(exc, TRANSIENT_ERRORS):
        metrics.BACKEND_ERRORS.labels("postgres", operation).inc()
        url = manager.settings.database_url
        log.error("%s: PostgreSQL at %s failed: %s", operation, redact_url(url), redact_message(str(exc), url))
        raise PostgresUnavailable(f"PostgreSQL at {redact_url(url)} failed during {operation}: "
                                  f"{redact_message(str(exc), url)}") from exc
    raise exc


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
        given: dict[str, Any] = {
            "redis_url": redis_url, "database_url": database_url, "session_timeout_secs": session_timeout_secs,
            "max_concurrent_sessions": max_concurrent_sessions, "cleanup_interval_secs": cleanup_interval_secs,
            "enable_persistence": enable_persistence, "run_flusher": run_flusher,
            "flush_interval_secs": flush_interval_secs, "flush_batch_size": flush_batch_size, **more_settings,
        }
        if settings is None:
            self.settings = Settings.from_env(**given)
        else:
            explicit: dict[str, Any] = {key: value for key, value in given.items() if value is not UNSET
                                        and not (value is None and key in ("redis_url", "database_url"))}
            self.settings = dataclasses.replace(settings, **explicit)
        self.session_timeout_secs = self.settings.session_timeout_secs
        self.max_concurrent_sessions = self.settings.max_concurrent_sessions
        self.enable_persistence = self.settings.enable_persistence
        self._persist = self.settings.enable_persistence
        self._hot: HotTier | None = None
        self._redis: RedisClient | None = None
        self.store: PostgresSessionStore | None = None
        self.flusher: Flusher | None = None
        self.degraded: DegradedMode | None = None  # the breaker; None without persistence or when turned off
        self.events = EventHub()
        # Nested edits of one top-level key queue up in this process instead of racing on the same guard.
        self._edit_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        self._sessions: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self._loading: dict[str, asyncio.Future[tuple[dict[bytes, bytes] | None, int]]] = {}
        self._start_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.worker = Supervisor(self._stop)  # every long-lived task of this manager
        self._backlog_ok = asyncio.Event()  # cleared while the backlog is past its high watermark
        self._backlog_ok.set()
        self.backlog = 0  # dirty sessions in the whole tier, as last read
        self._closed = False

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
            if self._hot is not None:
                return
            if self._closed:
                raise ConfigurationError("this SessionManager was closed; create a new one")
            settings = self.settings
            if not settings.redis_url:
                raise RedisUnavailable("no Redis URL: pass redis_url or set TIERED_SESSIONS_REDIS_URL or REDIS_URL")
            client = make_client(settings)
            hot = HotTier(client, settings)
            try:
                await client.ping()  # on a cluster: every node; the first command also maps the slots
                await hot.pipeline.load_scripts(scripts.ALL)
            except REDIS_ERRORS as exc:
                await hot.pipeline.aclose()
                await client.aclose()
                raise RedisUnavailable(f"cannot reach Redis at {redact_url(settings.redis_url)}: "
                                       f"{redact_message(str(exc), settings.redis_url)}") from None
            store: PostgresSessionStore | None = None
            try:
                store = PostgresSessionStore(settings=settings) if settings.enable_persistence else None
                await self._open_tiers(hot, store)
            except BaseException:
                if store is not None:
                    await store.close()
                await hot.pipeline.aclose()
                await client.aclose()
                raise
            if store is not None:
                self.store = store
                self.flusher = Flusher(hot, store, settings)
                self.flusher.on_written = self._row_written
                if settings.degraded_mode:
                    self.degraded = DegradedMode(hot, self.flusher.journal, settings, self.worker)
                await self._fold_journal(self.flusher.journal)
                if settings.run_flusher:
                    self.worker.start("flusher", functools.partial(self.flusher.run, self._stop))
            self.worker.start("cleanup", self._cleanup_loop)
            if settings.enable_persistence and settings.backlog_high_watermark is not None:
                self.worker.start("backlog", functools.partial(self._backlog_loop, hot))
            self._redis = client
            self._hot = hot

    async def _open_tiers(self, hot: HotTier, store: PostgresSessionStore | None) -> None:
        """Connect Postgres, and record this process's layout where none is, else check it against the recorded
        one: Postgres's first (it outlives a cold Redis; a start during a Postgres outage goes on without it,
        the flusher connects later), then Redis's, so a refused layout is recorded nowhere."""
        layout = Layout(self.settings.partitions, self.settings.key_prefix)
        if store is not None:
            try:
                await store.connect()
            except PostgresUnavailable as exc:
                if not exc.down:
                    raise
                # Start anyway (a deploy or a restart during an outage): writes land in Redis, the flusher
                # connects when Postgres answers, and /readyz says why it is not ready meanwhile.
                metrics.BACKEND_ERRORS.labels("postgres", "connect").inc()
                log.warning("starting without PostgreSQL: %s; writes wait in Redis until it answers", exc)
            else:
                layout.check(await store.record_layout(layout.record()), f"table {self.settings.qualified_layout}")
        layout.check(await hot.record_layout(layout.record()), f"Redis key {hot.layout_key}")

    async def _fold_journal(self, journal: Journal) -> None:
        """At start, fold back what a process left in the journal (whoever wrote it); a failure here is left
        to the flushers' passes, which fold it too."""
        try:
            await journal.replay_pending()
        except RETRYABLE as exc:
            metrics.BACKEND_ERRORS.labels("postgres", "replay").inc()
            log.warning("could not fold the journal back into Redis at start (%s); the flushers retry it",
                        redact_message(str(exc), self.settings.database_url))

    async def close(self) -> None:
        """Stop background work, drain what this manager's flusher owns (within ``drain_timeout_secs``),
        then close connections, whatever failed on the way. With ``run_flusher=False`` dirty sessions stay in
        Redis for a flusher."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.worker.stop(self.settings.drain_timeout_secs)
            await self.events.drain(self.settings.drain_timeout_secs)
            if self.flusher is not None and self.settings.run_flusher:
                await self._drain_and_release(self.flusher)
        finally:
            if self._hot is not None:
                await self._hot.pipeline.aclose()
            if self._redis is not None:
                await self._redis.aclose()
            if self.store is not None:
                await self.store.close()

    async def _drain_and_release(self, flusher: Flusher) -> None:
        try:
            left = await flusher.drain(self.settings.drain_timeout_secs)
        except RETRYABLE as exc:
            metrics.FLUSH_ERRORS.labels(type(exc).__name__).inc()
            log.error("drain on close failed (%s); dirty sessions stay in Redis for the next flusher", exc)
        else:
            if left:
                log.warning("close: %d sessions still dirty after %.1fs; they stay in Redis for the next "
                            "flusher", left, self.settings.drain_timeout_secs)
            else:
                log.info("close: drained, nothing left dirty")
        try:
            await flusher.release()  # the other flushers take our partitions now, not at lease expiry
        except RETRYABLE as exc:
            log.warning("close: could not release the flusher leases (%s); they expire by themselves", exc)

    async def _ready(self) -> HotTier:
        if self._hot is None:
            await self.start()
            assert self._hot is not None
        return self._hot

    async def _cleanup_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.cleanup_interval_secs)
                return
            except TimeoutError:
                pass
            try:
                await self.cleanup_stale_sessions()
            except _CLEANUP_FAILURES as exc:
                log.warning("periodic cleanup failed, will try again next interval: %s", exc)

    async def _backlog_loop(self, hot: HotTier) -> None:
        high, low = self.settings.backlog_high_watermark, self.settings.low_watermark
        assert high is not None and low is not None
        failing = False
        while not self._stop.is_set():
            try:
                self.backlog = await hot.dirty_total()
            except REDIS_ERRORS as exc:
                metrics.BACKEND_ERRORS.labels("redis", "backlog").inc()
                if not failing:  # once per outage, not once per poll
                    log.warning("cannot read the backlog (keeping the last reading, %d): %s", self.backlog, exc)
                failing = True
            else:
                if failing:
                    log.info("backlog readable again: %d", self.backlog)
                failing = False
                if self.backlog >= high and self._backlog_ok.is_set():
                    self._backlog_ok.clear()
                    log.warning("backlog %d is past the high watermark %d: writers wait (up to %.1fs) until it "
                                "falls to %d", self.backlog, high, self.settings.backpressure_timeout_secs, low)
                elif self.backlog <= low and not self._backlog_ok.is_set():
                    self._backlog_ok.set()
                    log.info("backlog %d is down to the low watermark %d: writers proceed", self.backlog, low)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.backlog_poll_secs)

    async def _wait_for_backlog(self) -> None:
        try:
            await asyncio.wait_for(self._backlog_ok.wait(), self.settings.backpressure_timeout_secs)
        except TimeoutError:
            metrics.BACKPRESSURE_REJECTIONS.inc()
            raise BackpressureError(
                f"{self.backlog} sessions wait to be flushed (high watermark "
                f"{self.settings.backlog_high_watermark}) and the backlog did not fall to "
                f"{self.settings.low_watermark} within {self.settings.backpressure_timeout_secs}s; "
                "is the flusher running and PostgreSQL reachable?"
            ) from None

    # -- the hot path -------------------------------------------------------------------------------------
    @_backend_errors("ensure")
    async def ensure(self, session_id: str | None = None, *, user_id: str | None = None,
                     user_type: str | None = None, ip_address: str | None = None,
                     user_agent: str | None = None, data: Mapping[str, Any] | None = None,
                     metadata: Mapping[str, Any] | None = None) -> Session:
        """The live session with this id, loading it from Postgres if Redis lacks it, or a new one.
        ``None`` makes a new random id. The keyword arguments apply only when a session is created."""
        fresh = session_id is None
        sid = secrets.token_urlsafe(32) if session_id is None else codec.validate_session_id(session_id)
        documents = codec.encode_document(data or {}, codec.DATA_PREFIX, "data")
        documents += codec.encode_document(metadata or {}, codec.META_PREFIX, "metadata")
        size = codec.stored_size(documents)
        self._check_size(sid, size)
        pairs = [*codec.flatten(documents), *codec.encode_attributes(
            user_id=user_id, user_type=user_type, ip_address=ip_address, user_agent=user_agent)]
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
            record = await self.degraded.ensure(
                sid, fresh, dict(data or {}), dict(metadata or {}),
                {"user_id": user_id, "user_type": user_type, "ip_address": ip_address, "user_agent": user_agent})
            return self._adopt_session(record.to_session())
        if not self._backlog_ok.is_set():
            await self._wait_for_backlog()
        limit = self.settings.max_concurrent_sessions
        now_ms = codec.now_ms()
        status, reply = await hot.ensure(sid, now_ms, check_cold=self._persist and not fresh, min_version=0,
                                         max_sessions=limit, size=size, pairs=pairs)
        if status == MISS:
            fields, floor = await self._read_through(sid)
            if fields is not None:
                return self._adopt(sid, fields)
            status, reply = await hot.ensure(sid, now_ms, check_cold=False, min_version=floor,
                                             max_sessions=limit, size=size, pairs=pairs)
        if status == OVER_LIMIT:
            raise SessionLimitExceeded(f"Maximum concurrent sessions ({limit}) reached: {reply} live sessions")
        assert isinstance(reply, dict)
        if status == EXISTING:
            metrics.READS.labels("hot").inc()
        session = self._adopt(sid, reply)
        if status == CREATED and self.events.wants("created"):
            self.events.emit("created", sid, session)
        return session

    @_backend_errors("get")
    async def get(self, session_id: str) -> Session | None:
        """The live session, or None. Reads Postgres on a Redis miss and warms Redis with what it finds."""
        sid = codec.validate_session_id(session_id)
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
            record = await self.degraded.load(sid)
            metrics.READS.labels("cold" if record else "miss").inc()
            return None if record is None else self._adopt_session(record.to_session())
        fields: dict[bytes, bytes] | None = await hot.read(sid)
        if fields:
            metrics.READS.labels("hot").inc()
        elif self._persist:
            fields, _ = await self._read_through(sid)
        if not fields or not _is_live(fields, codec.now_ms()):
            metrics.READS.labels("miss").inc()  # absent, removed or expired: nothing served
            self._sessions.pop(sid, None)
            return None
        return self._adopt(sid, fields)

    async def update_activity(self, session_id: str, request_duration_ms: int = 0) -> bool:
        """Count one request and slide the expiry, atomically in Redis. Does nothing (returns False) when the
        session is missing, closed or expired, as the in-memory managers do."""
        # The hottest call does _backend_errors' work inline: the decorator's extra coroutine cost ~4% of it.
        timed = _UPDATE_ACTIVITY_TIMER.due()
        started = time.perf_counter() if timed else 0.0
        try:
            sid = codec.validate_session_id(session_id)
            if isinstance(request_duration_ms, bool) or not isinstance(request_duration_ms, (int, float)) \
                    or not 0 <= request_duration_ms < 2**53:
                raise InvalidSessionData("request_duration_ms must be a non-negative number")
            duration = int(request_duration_ms)
            hot = self._hot if self._hot is not None else await self._ready()
            if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
                counted = await self.degraded.touch(sid, duration)
                held = self._sessions.get(sid)
                if counted and held is not None:
                    held.request_count += 1
                    held.total_duration_ms += duration
                    held.last_activity = time.time()
                    held.expires_at = held.last_activity + self.settings.session_timeout_secs
                return counted
            if not self._backlog_ok.is_set():
                await self._wait_for_backlog()
            # A Session object a caller holds sees the new counters, which only then come back (a miss in a
            # WeakValueDictionary raises and catches a KeyError: asking its size first is cheaper)
            session = self._sessions.get(sid) if self._sessions else None
            reply = await hot.touch(sid, duration, session is not None)
            if reply == 0 and self._persist:
                fields, _ = await self._read_through(sid)
                if fields is not None:
                    reply = await hot.touch(sid, duration, session is not None)
            if not isinstance(reply, list):
                return reply > 0  # the new version, or a status: 0 missing, -1 gone
            if session is not None:
                session.version, session.request_count, session.total_duration_ms, now_ms = (int(x) for x in reply)
                session.last_activity = now_ms / 1000
                session.expires_at = (now_ms + hot.timeout_ms) / 1000
            return True
        except Exception as exc:  # noqa: BLE001 - always raised again, named or as it was
            _raise_named(self, "update_activity", exc)
        finally:
            if timed:
                _UPDATE_ACTIVITY_TIMER.observe(time.perf_counter() - started)

    @_backend_errors("update")
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
        sid = codec.validate_session_id(session_id)
        documents = codec.encode_document(data or {}, codec.DATA_PREFIX, "data")
        documents += codec.encode_document(metadata or {}, codec.META_PREFIX, "metadata")
        edits = paths.plan(set, unset)
        documents += codec.encode_document(edits.top_set, codec.DATA_PREFIX, "set")
        if closed is not None and not isinstance(closed, bool):
            raise InvalidSessionData("closed must be True, False or None")
        if expected_version is not None and (isinstance(expected_version, bool)
                                             or not isinstance(expected_version, int)):
            raise InvalidSessionData("expected_version must be an integer")
        attributes = codec.encode_attributes(user_id=user_id, user_type=user_type, ip_address=ip_address,
                                             user_agent=user_agent)
        self._check_size(sid, codec.stored_size(documents))
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
            if edits or expected_version is not None:
                raise RedisUnavailable("set/unset and expected_version need Redis, which is unreachable "
                                       "(degraded mode); data= and metadata= merges still work")
            return await self._update_degraded(self.degraded, sid, data, metadata, closed, {
                "user_id": user_id, "user_type": user_type, "ip_address": ip_address, "user_agent": user_agent})
        if not self._backlog_ok.is_set():
            await self._wait_for_backlog()
        locks = [self._edit_locks.setdefault((sid, root), asyncio.Lock()) for root in sorted(edits.roots)]
        async with contextlib.AsyncExitStack() as held:
            for lock in locks:
                await held.enter_async_context(lock)
            return await self._apply_update(hot, sid, documents, edits, attributes, closed, expected_version,
                                            data, metadata, user_id=user_id, user_type=user_type,
                                            ip_address=ip_address, user_agent=user_agent)

    async def _apply_update(self, hot: HotTier, sid: str, documents: list[tuple[bytes, bytes]], edits: paths.Edits,
                            attributes: list[bytes | str], closed: bool | None, expected_version: int | None,
                            data: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None,
                            **given: str | None) -> int:
        unset_fields = [paths.field(key) for key in edits.top_unset]
        roots: dict[str, Any] = {}
        for _attempt in range(20):
            pairs = codec.flatten(documents)
            guards: list[bytes] = []
            if edits.roots:  # nested paths: edit the current values, guarded against concurrent changes
                current = await hot.read_fields_of(sid, [paths.field(root) for root in edits.roots])
                roots = paths.apply(edits, dict(zip(edits.roots, current, strict=True)))
                nested = codec.encode_document(roots, codec.DATA_PREFIX, "set")
                self._check_size(sid, codec.stored_size(documents + nested))
                pairs += codec.flatten(nested)
                for root, raw in zip(edits.roots, current, strict=True):
                    guards += (paths.field(root), raw or b"")
                unset_fields += [paths.field(root) for root in edits.roots if root not in roots]
            reply = await hot.update(sid, codec.now_ms(), state=_STATE_ARG[closed], pairs=pairs, attributes=attributes,
                                     unset=unset_fields, guards=guards, expected_version=expected_version)
            if reply == 0 and self._persist:
                fields, _ = await self._read_through(sid)
                if fields is not None:
                    continue
            if not (isinstance(reply, list) and int(reply[0]) == -4):
                break
            unset_fields = [paths.field(key) for key in edits.top_unset]
        else:
            raise VersionConflict(f"session {sid}: nested fields kept changing under 20 attempts", None)
        if not isinstance(reply, list):
            raise SessionNotFound(f"session {sid} does not exist, was removed or has expired")
        if int(reply[0]) == -5:
            raise VersionConflict(f"session {sid} is at version {reply[1]}, not {expected_version}", int(reply[1]))
        if int(reply[0]) == -2:
            raise SessionTooLarge(f"session {sid} would be {reply[1]} bytes, over max_session_bytes="
                                  f"{self.settings.max_session_bytes}; nothing was changed")
        version = int(reply[0])
        session = self._sessions.get(sid)
        if session is not None:
            session.data.update(data or {})
            paths.apply_locally(session.data, edits, roots)
            session.metadata.update(metadata or {})
            for name, value in given.items():
                if value is not None:
                    setattr(session, name, value)
            if closed is not None:
                session.state = CLOSED if closed else ACTIVE
            session.version = version
        return version

    @_backend_errors("remove")
    async def remove(self, session_id: str) -> None:
        """Delete the session durably (a tombstone the flusher writes to Postgres). Silent if missing."""
        sid = codec.validate_session_id(session_id)
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
            await self.degraded.remove(sid)
            removed = self._sessions.pop(sid, None)
            if removed is not None:
                removed.state = REMOVED
            return
        now_ms = codec.now_ms()
        reply = await hot.remove(sid, now_ms, check_cold=self._persist, min_version=0)
        if reply == 0 and self.store is not None:
            # Not in Redis: a session only Postgres knows still gets its tombstone.
            record = await self.store.fetch(sid)
            if record is not None and record.state != REMOVED:
                await hot.remove(sid, now_ms, check_cold=False, min_version=record.version)
        session = self._sessions.pop(sid, None)
        if session is not None:
            session.state = REMOVED

    # -- read-through -------------------------------------------------------------------------------------
    async def _read_through(self, sid: str) -> tuple[dict[bytes, bytes] | None, int]:
        """Load from Postgres into Redis (one loader per id in this process). Returns the hash now in Redis
        if the session is live, else None, and the version any new life must exceed."""
        pending = self._loading.get(sid)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[dict[bytes, bytes] | None, int]] = \
            asyncio.get_running_loop().create_future()
        self._loading[sid] = future
        try:
            result = await self._load_cold(sid)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so waiters-less failures are not reported as unhandled
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._loading[sid]

    async def _load_cold(self, sid: str) -> tuple[dict[bytes, bytes] | None, int]:
        assert self.store is not None and self._hot is not None
        record: ColdRecord | None = await self.store.fetch(sid)
        if record is None:
            return None, 0
        if not record.is_live(time.time()):
            return None, record.version
        pairs, expires_ms = codec.hash_from_record(record)
        written, fields = await self._hot.warm(sid, expires_ms, pairs)
        metrics.READS.labels("cold" if written else "hot").inc()
        if not _is_live(fields, codec.now_ms()):
            return None, int(fields.get(codec.VERSION, 0))
        return fields, record.version

    # -- whole-tier operations ----------------------------------------------------------------------------
    @_backend_errors("list_ids")
    async def list_ids(self) -> list[str]:
        """Ids of the live sessions in Redis (all processes), in no particular order."""
        hot = await self._ready()
        return list(await hot.live_sessions(codec.now_ms()))

    @_backend_errors("recover_all_sessions")
    async def recover_all_sessions(self, progress: Callable[[int, int], None] | None = None,
                                   page_size: int = 1000) -> int:
        """Warm every live session from Postgres into Redis (keeping any newer copy Redis has). Returns how
        many sessions were put (back) into Redis. ``progress(done, total)`` is called after every page."""
        hot = await self._ready()
        if self.store is None:
            return 0
        total = await self.store.count_live()
        done = written = 0
        async for page in self.store.iter_live(page_size):
            warmed = []
            for record in page:
                pairs, expires_ms = codec.hash_from_record(record)
                warmed.append((record.session_id, expires_ms, pairs))
            written += await hot.warm_many(warmed)
            done += len(page)
            if progress is not None:
                progress(done, max(total, done))
        log.info("recovered %d sessions into Redis (%d live in Postgres)", written, done)
        return written

    @_backend_errors("cleanup_stale_sessions")
    async def cleanup_stale_sessions(self) -> int:
        """Expire timed-out sessions and remove closed ones, in both tiers. Returns how many."""
        hot = await self._ready()
        now_ms = codec.now_ms()
        await hot.live_counts(now_ms)  # drops the live counts' buckets that have passed
        closed = 0
        for sid, (state,) in (await hot.live_sessions(now_ms, [codec.STATE])).items():
            if state == codec.STATE_CODES[CLOSED]:
                await self.remove(sid)
                closed += 1
        expired = 0
        if self.store is not None:
            # Redis lets a flushed session lapse by its TTL; Postgres still says live until marked here. (One
            # that expired while dirty is written as expired by the flusher, with its event.)
            records = await self.store.mark_expired()
            in_redis = await hot.read_fields([r.session_id for r in records], [codec.STATE, codec.EXPIRES])
            for record, (state, expires) in zip(records, in_redis, strict=True):
                if codec.is_live(state, expires, now_ms):
                    continue  # touched since its last flush: that flush makes the row live again
                expired += 1
                self.events.emit("expired", record.session_id, record.to_session())
        for sid in [sid for sid, s in self._sessions.items() if s.is_expired(now_ms / 1000)]:
            self._sessions.pop(sid, None)
        return expired + closed

    @_backend_errors("get_session_metrics")
    async def get_session_metrics(self) -> dict[str, Any]:
        """The seed's metrics (over live sessions in Redis) plus the write-behind backlog and lag. In degraded
        mode they come from Postgres (live rows; ages, backlog and lag unknown: None) with ``mode`` saying so."""
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and self.store is not None:
            return self._metrics_from(await self.store.count_live(), None, None, mode="degraded")
        now_ms = codec.now_ms()
        reading = await hot.reading(now_ms)
        ages: list[float] = []
        active = 0
        for created, state in (await hot.live_sessions(now_ms, [codec.CREATED, codec.STATE])).values():
            if created is None:
                continue
            ages.append((now_ms - int(created)) / 1000)
            active += state == codec.STATE_CODES[ACTIVE]
        metrics_now = self._metrics_from(len(ages), reading.dirty_sessions, reading.flush_lag_seconds, mode="normal")
        metrics_now.update({
            "active_sessions": active,
            "oldest_session_age": max(ages, default=0.0),
            "newest_session_age": min(ages, default=0.0),
            "avg_session_age": sum(ages) / len(ages) if ages else 0.0,
        })
        return metrics_now

    def _metrics_from(self, live: int, dirty: int | None, lag: float | None, *, mode: str) -> dict[str, Any]:
        return {
            "total_sessions": live,
            "active_sessions": live,
            "oldest_session_age": None,
            "newest_session_age": None,
            "avg_session_age": None,
            "persistence_enabled": self._persist,
            "dirty_sessions": dirty,
            "flush_lag_seconds": lag,
            "max_concurrent_sessions": self.settings.max_concurrent_sessions,
            "session_timeout_secs": self.settings.session_timeout_secs,
            "partitions": self.settings.partitions,
            "backpressure": not self._backlog_ok.is_set(),
            "mode": mode,
            "flusher_running": bool(self.settings.run_flusher and self.flusher is not None and not self._closed),
        }

    async def tier_reading(self) -> TierReading:
        """Lag, backlog, live sessions and stored dead letters of the whole tier, as Redis says now (what
        ``metrics.refresh`` exports)."""
        hot = await self._ready()
        return await hot.reading(codec.now_ms(), dead_letters=True)

    # -- rotation, per-user index, events -----------------------------------------------------------------
    @_backend_errors("rotate")
    async def rotate(self, session_id: str) -> Session:
        """Move a live session to a fresh random id (session fixation defence, e.g. at login): data, counters
        and expiry move with it; the old id is tombstoned in both tiers and never works again."""
        sid = codec.validate_session_id(session_id)
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
            raise RedisUnavailable("rotate needs Redis, which is unreachable (degraded mode)")
        partition = codec.partition_of(sid, hot.partitions)
        reply: int | dict[bytes, bytes] = 0
        for _attempt in range(5):
            new_id = _random_id_in(partition, hot.partitions)  # same partition: one script, one cluster slot
            reply = await hot.rotate(sid, new_id, codec.now_ms())
            if reply == 0 and self._persist:
                fields, _ = await self._read_through(sid)
                if fields is not None:
                    continue
            if reply != -2:  # -2: the new id is taken (practically never): draw again
                break
        if not isinstance(reply, dict):
            raise SessionNotFound(f"session {sid} does not exist, was removed or has expired")
        old = self._sessions.pop(sid, None)
        if old is not None:
            old.state = REMOVED
        return self._adopt(new_id, reply)

    @_backend_errors("list_user_sessions")
    async def list_user_sessions(self, user_id: str) -> list[Session]:
        """The user's live sessions, oldest first. Postgres's user_id index lists the flushed ones, the dirty
        index the rest (new sessions, a new owner): each candidate is then read and its owner checked. Without
        persistence, every live session in Redis is checked."""
        uid = codec.validate_attribute("user_id", user_id)
        if uid is None:
            raise InvalidSessionData("user_id must be a string")
        hot = await self._ready()
        if self.degraded is not None and self.degraded.active and await self.degraded.still_active():
            assert self.store is not None
            records = [await self.degraded.load(sid) for sid in await self.store.user_session_ids(uid)]
            return sorted((r.to_session() for r in records if r is not None and r.user_id == uid),
                          key=lambda s: s.created_at)
        if self._persist:
            candidates = dict.fromkeys(await hot.dirty_ids_of_user(uid))
        else:
            live = await hot.live_sessions(codec.now_ms(), [codec.ATTRIBUTE_FIELDS["user_id"]])
            candidates = dict.fromkeys(sid for sid, (owner,) in live.items() if owner == uid.encode())
        if self.store is not None:
            candidates.update(dict.fromkeys(await self.store.user_session_ids(uid)))
        sessions = await asyncio.gather(*(self.get(sid) for sid in candidates))
        return sorted((s for s in sessions if s is not None and s.user_id == uid), key=lambda s: s.created_at)

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

    def _row_written(self, row: DirtyEntry) -> None:
        kind = "removed" if row.kind == "tombstone" else "expired"
        if self.events.wants(kind):
            self.events.emit(kind, row.session_id, ColdRecord.from_row(row.row).to_session())

    async def dead_letters(self) -> DeadLetters:
        """The store of rows Postgres rejected: ``list()``, ``replay(ids)``, ``drop(ids)``."""
        return DeadLetters(await self._ready())

    def lock(self, session_id: str, *, timeout: float | None = 5.0, lease: float = 10.0) -> SessionLock:
        """The session's lock, for ``async with manager.lock(id, timeout=5.0, lease=10.0) as lock:``: a Redis
        lease with a fencing token (``lock.token``), released on exit, expiring by itself if the holder dies.
        Raises ``LockTimeout`` after ``timeout`` seconds (None: wait forever). See :mod:`tiered_sessions.locks`."""
        return SessionLock(self._ready, self.settings.redis_url, session_id, timeout=timeout, lease=lease)

    def is_session_timed_out(self, session: Session) -> bool:
        """True if the session is closed or has seen no activity for ``session_timeout_secs``."""
        return session.state != ACTIVE or time.time() >= session.expires_at

    @_backend_errors("flush")
    async def flush(self) -> int:
        """Write everything dirty now to Postgres; returns when it is durable. Returns how many sessions
        written meanwhile by others are still dirty (0 when the tier was quiet). Raises after retrying
        for ``drain_timeout_secs`` if Postgres stays unreachable."""
        await self._ready()
        if self.flusher is None:
            return 0
        return await self.flusher.drain(self.settings.drain_timeout_secs, only_dirty_before_now=True)

    # -- helpers ------------------------------------------------------------------------------------------
    def _adopt(self, sid: str, fields: dict[bytes, bytes]) -> Session:
        """One object per live id in this process: refresh the one callers hold, or register a new one."""
        fresh = codec.session_from_hash(sid, fields)
        current = self._sessions.get(sid)
        if current is None:
            self._sessions[sid] = fresh
            return fresh
        current._refresh(fresh)
        return current

    def _adopt_session(self, fresh: Session) -> Session:
        """As _adopt, for a session read from Postgres (degraded mode)."""
        current = self._sessions.get(fresh.session_id)
        if current is None:
            self._sessions[fresh.session_id] = fresh
            return fresh
        current._refresh(fresh)
        return current

    async def _update_degraded(self, degraded: DegradedMode, sid: str, data: Mapping[str, Any] | None,
                               metadata: Mapping[str, Any] | None, closed: bool | None,
                               attributes: dict[str, str | None]) -> int:
        version = await degraded.merge(sid, dict(data or {}), dict(metadata or {}), attributes, closed)
        if version is None:
            if await degraded.load(sid) is None:
                raise SessionNotFound(f"session {sid} does not exist, was removed or has expired")
            raise SessionTooLarge(f"session {sid} would pass max_session_bytes={self.settings.max_session_bytes}; "
                                  "nothing was changed")
        record = await degraded.load(sid)
        if record is not None:
            self._adopt_session(record.to_session())
        return version

    def _check_size(self, sid: str, size: int) -> None:
        if size > self.settings.max_session_bytes:
            raise SessionTooLarge(f"session {sid} would be at least {size} bytes, over max_session_bytes="
                                  f"{self.settings.max_session_bytes}; nothing was changed")


def _random_id_in(partition: int, partitions: int) -> str:
    while True:
        candidate = secrets.token_urlsafe(32)
        if codec.partition_of(candidate, partitions) == partition:
            return candidate


def _is_live(fields: Mapping[bytes, bytes], now_ms: int) -> bool:
    return codec.is_live(fields.get(codec.STATE), fields.get(codec.EXPIRES), now_ms)


__all__ = ["SessionManager"]
