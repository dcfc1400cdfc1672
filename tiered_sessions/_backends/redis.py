"""Every call served from Redis, one round trip where it can. A session Redis lacks is read through from
Postgres (one loader per id in this process), written into Redis, and the call made again: the miss, load,
retry of every operation goes through ``_read_through_then``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from redis.exceptions import ResponseError

from .. import _codec, _paths, metrics
from .._backpressure import Backpressure
from .._dead_letters import DeadLetters
from .._hot_tier import DirtyEntry, HotTier
from .._replies import Status
from ..cold_tier import PostgresSessionStore
from ..config import Settings
from ..errors import SessionLimitExceeded, SessionNotFound, SessionTooLarge, VersionConflict
from ..model import ACTIVE, CLOSED, REMOVED, ColdRecord, Session
from . import Census, Change, NewSession
from ._cold_batch import ColdBatch
from ._loads import Loads

R = TypeVar("R")
P = ParamSpec("P")
_STATE_ARG = {None: b"", True: _codec.STATE_CODES[CLOSED], False: _codec.STATE_CODES[ACTIVE]}
_GUARD_ATTEMPTS = 20  # nested edits recomputed when a guarded field changed under them
_ROTATE_ATTEMPTS = 5  # new ids drawn when one is taken (practically never)
Loaded = tuple[dict[bytes, bytes] | None, int]


def _wrong_type_moved_aside(
        method: Callable[Concatenate[RedisBackend, str, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[RedisBackend, str, P], Coroutine[Any, Any, R]]:
    """A call that meets a non-hash at the session's key moves it aside and runs again (see ``_moved_aside``)."""

    @functools.wraps(method)
    async def wrapper(self: RedisBackend, session_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, session_id, *args, **kwargs)
        except ResponseError as exc:
            if not await self._moved_aside(session_id, exc):
                raise
        return await method(self, session_id, *args, **kwargs)

    return wrapper


class RedisBackend:
    def __init__(self, hot: HotTier, store: PostgresSessionStore | None, settings: Settings,
                 backpressure: Backpressure) -> None:
        self.hot = hot
        self.store = store
        self.persist = store is not None
        self.settings = settings
        self.backpressure = backpressure
        self.dead_letters = DeadLetters(hot)
        self._cold = None if store is None else ColdBatch(store)
        self.loads: Loads[Loaded] = Loads()
        # Nested edits of one top-level key queue up in this process instead of racing on the same guard.
        self._edit_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    @_wrong_type_moved_aside
    async def ensure(self, session_id: str, fresh: bool, new: NewSession) -> tuple[Session, bool]:
        if not self.backpressure.open.is_set():
            await self.backpressure.admit()
        limit = self.settings.max_concurrent_sessions
        now_ms = _codec.now_ms()
        reply = await self.hot.ensure(session_id, now_ms, check_cold=self.persist and not fresh, min_version=0,
                                      max_sessions=limit, size=new.size, pairs=new.pairs)
        if reply.status is Status.MISSING:
            fields, floor = await self.read_through(session_id)
            if fields is not None:
                return _codec.session_from_hash(session_id, fields), False
            reply = await self.hot.ensure(session_id, now_ms, check_cold=False, min_version=floor,
                                          max_sessions=limit, size=new.size, pairs=new.pairs)
        if reply.status is Status.OVER_LIMIT:
            raise SessionLimitExceeded(f"Maximum concurrent sessions ({limit}) reached: {reply.value} live sessions")
        assert reply.fields is not None
        if reply.status is Status.EXISTING:
            metrics.READS_BY_TIER["hot"].inc()
        return _codec.session_from_hash(session_id, reply.fields), reply.status is Status.CREATED

    @_wrong_type_moved_aside
    async def get(self, session_id: str) -> Session | None:
        fields: dict[bytes, bytes] | None = await self.hot.read(session_id)
        if fields:
            metrics.READS_BY_TIER["hot"].inc()
        elif self.persist:
            fields, _ = await self.read_through(session_id)
        if not fields or not _is_live(fields, _codec.now_ms()):
            metrics.READS_BY_TIER["miss"].inc()  # absent, removed or expired: nothing served
            return None
        return _codec.session_from_hash(session_id, fields)

    async def touch(self, session_id: str, duration_ms: int, held: Session | None) -> bool:
        if not self.backpressure.open.is_set():
            await self.backpressure.admit()
        try:
            reply = await self.hot.touch(session_id, duration_ms, held is not None)
        except ResponseError as exc:  # inline, not the decorator: the hot path pays no extra call
            if not await self._moved_aside(session_id, exc):
                raise
            reply = await self.hot.touch(session_id, duration_ms, held is not None)
        if reply == Status.MISSING and self.persist:
            reply = await self._read_through_then(
                session_id, functools.partial(self.hot.touch, session_id, duration_ms, held is not None), reply)
        if not isinstance(reply, list):
            return reply > 0  # the new version, or a status
        if held is not None:
            held.version, held.request_count, held.total_duration_ms, now_ms = (int(x) for x in reply)
            held.last_activity = now_ms / 1000
            held.expires_at = (now_ms + self.hot.timeout_ms) / 1000
        return True

    @_wrong_type_moved_aside
    async def update(self, session_id: str, change: Change) -> tuple[int, dict[str, Any]]:
        if not self.backpressure.open.is_set():
            await self.backpressure.admit()
        locks = [self._edit_locks.setdefault((session_id, root), asyncio.Lock())
                 for root in sorted(change.edits.roots)]
        async with contextlib.AsyncExitStack() as held:
            for lock in locks:
                await held.enter_async_context(lock)
            return await self._apply(session_id, change)

    async def _apply(self, sid: str, change: Change) -> tuple[int, dict[str, Any]]:
        edits = change.edits
        roots: dict[str, Any] = {}
        for _attempt in range(_GUARD_ATTEMPTS):
            unset_fields = [_paths.field(key) for key in edits.top_unset]
            pairs = _codec.flatten(change.documents)
            guards: list[bytes] = []
            if edits.roots:  # nested paths: edit the current values, guarded against concurrent changes
                current = await self.hot.read_fields_of(sid, [_paths.field(root) for root in edits.roots])
                roots = _paths.apply(edits, dict(zip(edits.roots, current, strict=True)))
                nested = _codec.encode_document(roots, _codec.DATA_PREFIX, "set")
                check_size(sid, _codec.stored_size(change.documents + nested), self.settings.max_session_bytes)
                pairs += _codec.flatten(nested)
                for root, raw in zip(edits.roots, current, strict=True):
                    guards += (_paths.field(root), raw or b"")
                unset_fields += [_paths.field(root) for root in edits.roots if root not in roots]
            once = functools.partial(self.hot.update, sid, _codec.now_ms(), state=_STATE_ARG[change.closed],
                                     pairs=pairs, attributes=change.encoded_attributes, unset=unset_fields,
                                     guards=guards, expected_version=change.expected_version)
            reply = await once()
            if reply.status is Status.MISSING and self.persist:
                reply = await self._read_through_then(sid, once, reply)
            if reply.status is not Status.GUARD_CHANGED:
                break
        else:
            raise VersionConflict(f"session {sid}: nested fields kept changing under {_GUARD_ATTEMPTS} attempts", None)
        if reply.status is Status.VERSION_CONFLICT:
            raise VersionConflict(f"session {sid} is at version {reply.value}, not {change.expected_version}",
                                  reply.value)
        if reply.status is Status.TOO_LARGE:
            raise SessionTooLarge(f"session {sid} would be {reply.value} bytes, over max_session_bytes="
                                  f"{self.settings.max_session_bytes}; nothing was changed")
        if reply.status is not Status.DONE:
            raise SessionNotFound(f"session {sid} does not exist, was removed or has expired")
        return reply.value, roots

    @_wrong_type_moved_aside
    async def remove(self, session_id: str) -> None:
        now_ms = _codec.now_ms()
        reply = await self.hot.remove(session_id, now_ms, check_cold=self.persist, min_version=0)
        if reply.status is Status.MISSING and self.store is not None:
            # Not in Redis: a session only Postgres knows still gets its tombstone.
            record = await self.store.fetch(session_id)
            if record is not None and record.state != REMOVED:
                await self.hot.remove(session_id, now_ms, check_cold=False, min_version=record.version)

    @_wrong_type_moved_aside
    async def rotate(self, session_id: str) -> Session:
        partitions = self.hot.partitions
        partition = _codec.partition_of(session_id, partitions)
        for _attempt in range(_ROTATE_ATTEMPTS):
            new_id = _random_id_in(partition, partitions)  # same partition: one script, one cluster slot
            once = functools.partial(self.hot.rotate, session_id, new_id, _codec.now_ms())
            reply = await once()
            if reply.status is Status.MISSING and self.persist:
                reply = await self._read_through_then(session_id, once, reply)
            if reply.status is not Status.ID_TAKEN:
                break
        if reply.fields is None:
            raise SessionNotFound(f"session {session_id} does not exist, was removed or has expired")
        return _codec.session_from_hash(new_id, reply.fields)

    async def user_sessions(self, user_id: str) -> list[Session]:
        if self.persist:
            candidates = dict.fromkeys(await self.hot.dirty_ids_of_user(user_id))
        else:
            live = await self.hot.live_sessions(_codec.now_ms(), [_codec.ATTRIBUTE_FIELDS["user_id"]])
            candidates = dict.fromkeys(sid for sid, (owner,) in live.items() if owner == user_id.encode())
        if self.store is not None:
            candidates.update(dict.fromkeys(await self.store.user_session_ids(user_id)))
        sessions = await asyncio.gather(*(self.get(sid) for sid in candidates))
        return [s for s in sessions if s is not None and s.user_id == user_id]

    async def census(self) -> Census:
        now_ms = _codec.now_ms()
        reading = await self.hot.reading(now_ms)
        ages: list[float] = []
        active = 0
        for created, state in (await self.hot.live_sessions(now_ms, [_codec.CREATED, _codec.STATE])).values():
            if created is None:
                continue
            ages.append((now_ms - int(created)) / 1000)
            active += state == _codec.STATE_CODES[ACTIVE]
        return Census("normal", len(ages), active, ages, reading.dirty_sessions, reading.flush_lag_seconds)

    async def _moved_aside(self, sid: str, error: ResponseError) -> bool:
        """For a call that failed with WRONGTYPE: if the session's key is not a hash, move it aside (kept,
        listed as a poison dead letter, counted) so the call can go on as if the session were missing."""
        if "WRONGTYPE" not in str(error):
            return False
        reason = await self.hot.quarantine(sid)
        if reason is None:
            return False  # the key is a hash: the WRONGTYPE came from elsewhere
        metrics.POISON_KEYS.inc()
        await self.dead_letters.record_poison(DirtyEntry(self.hot.keys(sid).partition, sid, 0, "poison",
                                                         reason.encode()))
        return True

    # -- read-through -------------------------------------------------------------------------------------
    async def _read_through_then(self, sid: str, again: Callable[[], Awaitable[R]], missed: R) -> R:
        """After a call missed: load the session from Postgres into Redis and make the call again, or
        return the miss's reply ``missed`` if Postgres holds no live copy."""
        fields, _ = await self.read_through(sid)
        return missed if fields is None else await again()

    async def read_through(self, sid: str) -> Loaded:
        """Load from Postgres into Redis (one load per id in this process, see ``_loads``). Returns the hash now
        in Redis if the session is live, else None, and the version any new life must exceed."""
        return await self.loads.load(sid, lambda: self._load_cold(sid))

    async def _load_cold(self, sid: str) -> Loaded:
        assert self._cold is not None
        record: ColdRecord | None = await self._cold.fetch(sid)
        if record is None:
            return None, 0
        if not record.is_live(time.time()):
            return None, record.version
        written, fields = await self.hot.warm(sid, _codec.hash_from_record(record))
        metrics.READS_BY_TIER["cold" if written else "hot"].inc()
        if not _is_live(fields, _codec.now_ms()):
            return None, int(fields.get(_codec.VERSION, 0))
        return fields, record.version


def check_size(sid: str, size: int, limit: int) -> None:
    if size > limit:
        raise SessionTooLarge(f"session {sid} would be at least {size} bytes, over max_session_bytes={limit}; "
                              "nothing was changed")


def _random_id_in(partition: int, partitions: int) -> str:
    while True:
        candidate = secrets.token_urlsafe(32)
        if _codec.partition_of(candidate, partitions) == partition:
            return candidate


def _is_live(fields: Mapping[bytes, bytes], now_ms: int) -> bool:
    return _codec.is_live(fields.get(_codec.STATE), fields.get(_codec.EXPIRES), now_ms)
