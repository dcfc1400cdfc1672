"""The Redis side of the tier: one call per operation (a Lua script or a single command), each reply decoded
(``_replies``). Where each thing lives is ``_keyspace``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, NamedTuple

from redis.asyncio import Redis, RedisCluster

from . import _codec, _replies, _scripts
from ._codec import pairs_to_dict, partition_of
from ._keyspace import KeySpace
from ._pipelining import AutoPipeline
from ._redis_client import RedisClient, executed
from ._replies import Reply
from .config import Settings

# The most sessions one warm_page.lua call writes: a bound on how long recovery holds Redis at a time.
WARM_PAGE_SESSIONS = 128


class DirtyEntry(NamedTuple):  # a tuple: a pass builds thousands, a frozen dataclass is slower to build
    """A claimed dirty session: its row for Postgres as JSON (built by claim.lua), or version 0, kind "gone"
    and no row when the hash is gone (nothing to write, just clear the mark)."""

    partition: int
    session_id: str
    version: int
    kind: str  # upsert, activity, tombstone, expired (the flushed-rows metric's label), gone or poison
    row: bytes


# claim.lua's kinds; "poison": a key that is not a session hash, quarantined (its row: the reason)
_KINDS = {b"u": "upsert", b"a": "activity", b"t": "tombstone", b"e": "expired", b"": "gone", b"p": "poison"}


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionStats:
    dirty: int
    oldest_dirty_ms: int | None
    live: int


@dataclasses.dataclass(frozen=True, slots=True)
class TierReading:
    """What Redis says of the whole tier at one moment: the same in every process that reads it."""

    flush_lag_seconds: float  # age of the oldest dirty entry
    dirty_per_partition: list[int]
    live_sessions: int
    dead_letters_stored: int | None  # None when not asked for

    @property
    def dirty_sessions(self) -> int:
        return sum(self.dirty_per_partition)


class HotTier(KeySpace):
    def __init__(self, client: RedisClient, settings: Settings) -> None:
        super().__init__(settings.key_prefix, settings.partitions)
        self.client = client
        self.persist = "1" if settings.enable_persistence else "0"
        self.timeout_ms = int(settings.session_timeout_secs * 1000)
        self.tombstone_ttl_ms = int(settings.tombstone_ttl_secs * 1000)
        self.max_bytes = settings.max_session_bytes
        # Live counts go by expiry buckets of 1/64 of the timeout: a partition's count hash has about 65
        # fields (compact in Redis), and a count is exact to one bucket.
        self.bucket_ms = max(1, self.timeout_ms // 64)
        # On a cluster every script touches one slot: the session limit is counted before the script instead,
        # and touch.lua gets its partition's dirty index and live counts declared (see its header).
        self.cluster = isinstance(client, RedisCluster)
        self._declared = ([(self.dirty_key(p), self.counts_key(p)) for p in range(self.partitions)]
                          if self.cluster else None)
        # touch.lua's shared ARGV: plain touches (reply: the version), touches whose caller holds a Session
        # (reply: the counters too), journal replays
        self._touch_shared = (self.timeout_ms, self.persist, self.bucket_ms, "0", "0")
        self._counters_shared = (self.timeout_ms, self.persist, self.bucket_ms, "0", "1")
        self._replay_shared = (self.timeout_ms, self.persist, self.bucket_ms, "1", "0")
        self.pipeline = AutoPipeline(client, settings.socket_timeout_secs)

    async def record_layout(self, layout: dict[str, str]) -> dict[str, str]:
        """Record ``layout`` unless a process did (layout.lua); returns the layout as recorded."""
        flat = [item for pair in layout.items() for item in pair]
        reply = await self.pipeline.evalsha(_scripts.LAYOUT, [self.layout_key], flat)
        return {reply[i].decode(): reply[i + 1].decode() for i in range(0, len(reply), 2)}

    # -- hot path: one round trip each -------------------------------------------------------------------
    async def read(self, session_id: str) -> dict[bytes, bytes]:
        reply = await self.pipeline.command("HGETALL", self.keys(session_id).session)
        return reply if isinstance(reply, dict) else pairs_to_dict(reply)  # RESP3 sends a map, RESP2 a list

    def touch(self, session_id: str, duration_ms: int, counters: bool = False,
              journal_version: int | None = None) -> Awaitable[int | list[int]]:
        """Replies ``Status.MISSING``, ``GONE``, ``REPLAYED`` (as their numbers), or the new version (> 0); with
        ``counters``, ``[version, requests, duration, now_ms]`` instead of the version. The touch's time is
        when the pipeline sends it (calls in one loop turn share it).

        Not a coroutine: the hot path's caller awaits the pipeline's future directly, one layer less. The
        script finds the id, dirty index and live counts from the session key: two items per call to pack."""
        partition = partition_of(session_id, self.partitions)
        session = (self._partition_keys[partition][0] + session_id,)
        slot = partition if self.cluster else None
        declared = self._declared[partition] if self._declared else ()
        if journal_version is None:
            shared = self._counters_shared if counters else self._touch_shared
            return self.pipeline.combined(_scripts.TOUCH, shared, session, (duration_ms,), slot, declared)
        return self.pipeline.combined(_scripts.TOUCH, self._replay_shared, session, (duration_ms, journal_version),
                                      slot, declared)

    async def ensure(self, session_id: str, now_ms: int, *, check_cold: bool, min_version: int,
                     max_sessions: int | None, size: int, pairs: Sequence[bytes | str]) -> Reply:
        keys = self.keys(session_id)
        all_keys = [keys.session, keys.dirty, keys.counts]
        limit_arg = max_sessions or 0
        if max_sessions and self.cluster:
            # Counted here, one script per partition (one round trip per node): approximate under races, as
            # sessions created by others between the count and the script are not seen.
            live = await self.live_count(now_ms)
            limit_arg = -live if live >= max_sessions else 0
        elif max_sessions:
            all_keys += self.counts_keys
        reply = await self.pipeline.evalsha(
            _scripts.ENSURE, all_keys,
            [now_ms, self.timeout_ms, session_id, self.persist, "1" if check_cold else "0", min_version,
             limit_arg, size, self.bucket_ms, *pairs],
        )
        return _replies.ensure(reply)

    async def update(self, session_id: str, now_ms: int, *, state: bytes, pairs: Sequence[bytes],
                     attributes: Sequence[bytes | str], unset: Sequence[bytes] = (),
                     guards: Sequence[bytes] = (), expected_version: int | None = None,
                     journal_version: int | None = None) -> Reply:
        """``pairs``/``guards`` are flat field, value lists; a guard's value ``b""`` means "field absent"."""
        keys = self.keys(session_id)
        reply = await self.pipeline.evalsha(
            _scripts.UPDATE, [keys.session, keys.dirty],
            [now_ms, session_id, self.max_bytes, self.persist, state, len(pairs) // 2,
             "" if journal_version is None else journal_version,
             "" if expected_version is None else expected_version, len(unset), len(guards) // 2,
             *pairs, *unset, *guards, *attributes],
        )
        return _replies.update(reply)

    async def read_fields_of(self, session_id: str, fields: Sequence[bytes]) -> list[bytes | None]:
        reply: list[bytes | None] = await self.pipeline.command("HMGET", self.keys(session_id).session, *fields)
        return reply

    async def quarantine(self, session_id: str) -> str | None:
        """Move the session's key aside if it is not a hash (quarantine.lua); the reason, or None if nothing
        was moved."""
        keys = self.keys(session_id)
        moved = self.quarantine_key_prefix(keys.partition) + session_id
        reply = await self.pipeline.evalsha(_scripts.QUARANTINE, [keys.session, keys.dirty, moved], [session_id])
        if not reply:
            return None
        return f"WRONGTYPE: a {reply[0].decode()} where the session's hash belongs (moved to {moved})"

    async def delete(self, session_id: str) -> None:
        await self.pipeline.command("DEL", self.keys(session_id).session)

    async def rotate(self, old_id: str, new_id: str, now_ms: int) -> Reply:
        old, new = self.keys(old_id), self.keys(new_id)
        assert old.dirty == new.dirty, "rotate needs both ids in one partition"
        reply = await self.pipeline.evalsha(_scripts.ROTATE, [old.session, new.session, old.dirty],
                                            [now_ms, old_id, new_id, self.persist])
        return _replies.rotate(reply)

    async def dirty_ids_of_user(self, user_id: str, page: int = 1000) -> list[str]:
        """Ids of the user's sessions that are dirty (Postgres may not hold them, or not as this user's): one
        ZSCAN step of each partition's dirty index per round trip."""
        found: dict[str, None] = {}  # ZSCAN may return an entry twice
        cursors: dict[int, bytes | int] = dict.fromkeys(range(self.partitions), 0)
        while cursors:
            calls = [(_scripts.DIRTY_OF_USER, [self.dirty_key(p)], [self.session_key_prefix(p), user_id, cursor, page])
                     for p, cursor in cursors.items()]
            replies = await self.pipeline.run_scripts(calls)
            for p, reply in zip(list(cursors), replies, strict=True):
                found.update(dict.fromkeys(member.decode() for member in reply[1:]))
                if int(reply[0]) == 0:
                    del cursors[p]
                else:
                    cursors[p] = reply[0]
        return list(found)

    async def remove(self, session_id: str, now_ms: int, *, check_cold: bool, min_version: int,
                     journal_version: int | None = None, stale: bool = False) -> Reply:
        """``stale``: a cleanup removes a closed session; if this call counts it out of the live counts, the
        next ``timed_out`` reports it."""
        script, keys, args = self._remove_call(session_id, now_ms, check_cold, min_version, journal_version, stale)
        return _replies.remove(int(await self.pipeline.evalsha(script, keys, args)))

    async def remove_stale(self, session_ids: Sequence[str], now_ms: int) -> None:
        """``remove`` of each of a cleanup's closed sessions (``check_cold``, ``stale``), in one round trip."""
        if session_ids:
            await self.pipeline.run_scripts([self._remove_call(sid, now_ms, True, 0, None, True)
                                             for sid in session_ids])

    def _remove_call(self, session_id: str, now_ms: int, check_cold: bool, min_version: int,
                     journal_version: int | None, stale: bool) -> tuple[_scripts.LuaScript, list[str], list[Any]]:
        keys = self.keys(session_id)
        return _scripts.REMOVE, [keys.session, keys.dirty, keys.counts], [
            now_ms, session_id, self.persist, "1" if check_cold else "0", min_version, self.bucket_ms,
            "" if journal_version is None else journal_version, "1" if stale else "0"]

    # -- read-through and recovery ------------------------------------------------------------------------
    async def warm(self, session_id: str, row: _codec.WarmHash) -> tuple[bool, dict[bytes, bytes]]:
        """Put a session read from Postgres into Redis unless Redis has it; returns whether it was written,
        and the hash Redis now holds (its own copy, when that won)."""
        keys = self.keys(session_id)
        reply = await self.pipeline.evalsha(_scripts.WARM, [keys.session, keys.counts], [
            session_id, row.expires_ms, _codec.now_ms(), self.bucket_ms, *row.pairs])
        if reply[0]:  # written: Redis holds the pairs sent, as it would give them back
            return True, row.as_fields()
        return False, pairs_to_dict(reply[1])

    async def warm_page(self, rows: Iterable[tuple[str, _codec.WarmHash]]) -> int:
        """Recovery: put sessions read from Postgres into Redis, each unless Redis has it, in one round trip
        (a warm_page.lua call per partition and at most ``WARM_PAGE_SESSIONS`` sessions); returns how many
        were written."""
        calls: list[tuple[_scripts.LuaScript, list[str], list[Any]]] = []
        open_calls: dict[int, tuple[list[str], list[Any]]] = {}
        now_ms = _codec.now_ms()
        for session_id, row in rows:
            partition = partition_of(session_id, self.partitions)
            call = open_calls.get(partition)
            if call is None or len(call[0]) > WARM_PAGE_SESSIONS:
                call = open_calls[partition] = ([self.counts_key(partition)], [now_ms, self.bucket_ms])
                calls.append((_scripts.WARM_PAGE, *call))
            keys, args = call
            keys.append(self._partition_keys[partition][0] + session_id)
            args += (row.expires_ms, row.state, len(row.pairs))
            args += row.pairs
        replies = await self.pipeline.run_scripts(calls)
        return sum(replies)

    # -- flusher ------------------------------------------------------------------------------------------
    async def claim(self, partition: int, limit: int, max_score_ms: int, now_ms: int) -> list[DirtyEntry]:
        """The oldest dirty entries of a partition (dirty at or before ``max_score_ms``), at most ``limit``. A
        row whose expiry is at or before ``now_ms`` comes as expired."""
        reply = await self.pipeline.evalsha(_scripts.CLAIM, [self.dirty_key(partition)],
                                            [self.session_key_prefix(partition), limit, max_score_ms, now_ms,
                                             self.quarantine_key_prefix(partition)])
        return [DirtyEntry(partition, reply[i].decode(), int(reply[i + 1] or 0), _KINDS[reply[i + 2] or b""],
                           reply[i + 3] or b"")
                for i in range(0, len(reply), 4)]

    async def ack(self, written: dict[int, list[tuple[str, int, bool]]], read_ms: int, tokens: dict[int, str]
                  ) -> dict[int, int]:
        """Clear dirty marks of (session_id, version, kept) entries now durable in Postgres, per partition,
        under the partition's lease (``tokens[p]``; "" for no lease). ``kept``: Postgres holds that version
        whole (not dead-lettered), so later touches may flush as activity rows. Returns per partition how many
        were cleared, or -1 where the lease is not ours (nothing cleared there)."""
        calls = []
        for partition, entries in written.items():
            flat: list[str | int] = []
            for session_id, version, kept in entries:
                flat += (session_id, version, "1" if kept else "0")
            calls.append((_scripts.ACK, [self.dirty_key(partition), self.lease_key(partition)],
                          [self.session_key_prefix(partition), self.tombstone_ttl_ms, read_ms,
                           tokens.get(partition, ""), *flat]))
        replies = await self.pipeline.run_scripts(calls)
        return {partition: int(reply) for partition, reply in zip(written, replies, strict=True)}

    async def redirty(self, session_ids: Sequence[str], now_ms: int) -> list[bool]:
        """Mark these sessions dirty, to be written whole by the next pass (redirty.lua), in one round trip;
        False where Redis does not hold the session."""
        return [reply != 0 for reply in await self._redirty(session_ids, now_ms, [None] * len(session_ids))]

    async def rebase(self, session_ids: Sequence[str], now_ms: int, above: Sequence[int | None]) -> list[bool]:
        """As ``redirty``, each copy first moved to the version after ``above`` (the version Postgres holds,
        where its guard refused the copy's) unless it is past it already. True where a copy was moved."""
        return [reply != 0 and int(reply[1]) == 1 for reply in await self._redirty(session_ids, now_ms, above)]

    async def _redirty(self, session_ids: Sequence[str], now_ms: int, above: Sequence[int | None]) -> list[Any]:
        calls = []
        for session_id, version in zip(session_ids, above, strict=True):
            keys = self.keys(session_id)
            args: list[str | int] = [now_ms, session_id] if version is None else [now_ms, session_id, version]
            calls.append((_scripts.REDIRTY, [keys.session, keys.dirty], args))
        replies: list[Any] = await self.pipeline.run_scripts(calls)
        return replies

    # -- flusher leases -----------------------------------------------------------------------------------
    async def take_leases(self, partitions: Sequence[int], token: str, lease_ms: int) -> list[bool]:
        """Take (if free) or renew (if ours) each partition's lease; True where we hold it now."""
        calls = [(_scripts.LEASE, [self.lease_key(p)], [token, lease_ms]) for p in partitions]
        return [bool(reply) for reply in await self.pipeline.run_scripts(calls)]

    async def release_leases(self, partitions: Sequence[int], token: str) -> None:
        calls = [(_scripts.LEASE_RELEASE, [self.lease_key(p)], [token]) for p in partitions]
        await self.pipeline.run_scripts(calls)

    async def heartbeat(self, flusher_id: str, now_ms: int, live_ms: int, forget_ms: int) -> list[str]:
        """Record that this flusher is alive; returns the ids seen within ``live_ms`` (dropping those silent
        for ``forget_ms``)."""
        alive = await self.pipeline.evalsha(_scripts.HEARTBEAT, [self.flushers_key],
                                            [flusher_id, now_ms, now_ms - live_ms, now_ms - forget_ms])
        return [member.decode() for member in alive]

    async def leave(self, flusher_id: str) -> None:
        await self.client.zrem(self.flushers_key, flusher_id)

    async def drop_idle_connections(self) -> None:
        """After an outage: pooled connections from before it are dead; dropped now, or each would fail once
        on first use. (The cluster client reconnects per node by itself.)"""
        if isinstance(self.client, Redis):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    # -- dead letters -------------------------------------------------------------------------------------
    async def store_dead_letter(self, partition: int, session_id: str, letter: bytes) -> None:
        await self.pipeline.command("HSET", self.dead_letters_key(partition), session_id, letter)

    async def dead_letters(self) -> list[bytes]:
        """Every stored dead letter, all partitions."""
        pipe = self.client.pipeline(transaction=False)
        for partition in range(self.partitions):
            pipe.hvals(self.dead_letters_key(partition))
        return [letter for stored in await executed(pipe.execute()) for letter in stored]

    async def forget_dead_letter(self, session_id: str) -> None:
        await self.pipeline.command("HDEL", self.dead_letters_key(self.keys(session_id).partition), session_id)

    # -- whole-tier readings ------------------------------------------------------------------------------
    async def stats(self, now_ms: int) -> list[PartitionStats]:
        pipe = self.client.pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.zcard(self.dirty_key(p))
            pipe.zrange(self.dirty_key(p), 0, 0, withscores=True)
        replies = await executed(pipe.execute())
        live = await self.live_counts(now_ms)
        return [PartitionStats(int(dirty), int(oldest[0][1]) if oldest else None, count)
                for dirty, oldest, count in zip(replies[::2], replies[1::2], live, strict=True)]

    async def reading(self, now_ms: int, *, dead_letters: bool = False) -> TierReading:
        """Lag, backlog and live sessions (and the dead letters stored, if asked): the tier's one reading."""
        stats = await self.stats(now_ms)
        stored = None
        if dead_letters:
            pipe = self.client.pipeline(transaction=False)
            for partition in range(self.partitions):
                pipe.hlen(self.dead_letters_key(partition))
            stored = sum(int(count) for count in await executed(pipe.execute()))
        oldest = [s.oldest_dirty_ms for s in stats if s.oldest_dirty_ms is not None]
        return TierReading(max(0.0, (now_ms - min(oldest)) / 1000) if oldest else 0.0, [s.dirty for s in stats],
                           sum(s.live for s in stats), stored)

    async def live_counts(self, now_ms: int) -> list[int]:
        """Live sessions per partition, exact to one expiry bucket (sessions that expired within now's bucket
        still count); drops the buckets that have passed."""
        calls = [(_scripts.LIVE_COUNT, [key], [now_ms, self.bucket_ms]) for key in self.counts_keys]
        return [int(count) for count in await self.pipeline.run_scripts(calls)]

    async def timed_out(self, now_ms: int) -> int:
        """Sessions counted out since any process last asked (timed_out.lua), every partition: those that timed
        out before now's expiry bucket, and closed ones a cleanup removed. Each is reported once."""
        calls = [(_scripts.TIMED_OUT, [key], [now_ms, self.bucket_ms]) for key in self.counts_keys]
        return sum(int(count) for count in await self.pipeline.run_scripts(calls))

    async def live_count(self, now_ms: int) -> int:
        return sum(await self.live_counts(now_ms))

    async def dirty_total(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.zcard(self.dirty_key(p))
        return sum(int(count) for count in await executed(pipe.execute()))

    async def live_sessions(self, now_ms: int, fields: Sequence[bytes] = (), page: int = 1000
                            ) -> dict[str, list[bytes | None]]:
        """The sessions live now (not removed, expiry after now), each with the values of ``fields``, read in
        the same HMGET as the state and expiry that decide it: a SCAN of the session keys (every node of a
        cluster), then one read a key. Work in proportion to the keys in Redis: for listings and cleanup, not
        for the hot path."""
        pattern = self.session_key_pattern
        found = list(dict.fromkeys([key async for key in self.client.scan_iter(match=pattern, count=page,
                                                                                _type="hash")]))
        ids = [key.decode().partition("}:s:")[2] for key in found]
        live: dict[str, list[bytes | None]] = {}
        for start in range(0, len(ids), page):
            chunk = ids[start:start + page]
            for sid, (state, expires, *values) in zip(
                    chunk, await self.read_fields(chunk, [_codec.STATE, _codec.EXPIRES, *fields]), strict=True):
                if _codec.is_live(state, expires, now_ms):
                    live[sid] = values
        return live

    async def read_fields(self, session_ids: Sequence[str], fields: Sequence[bytes]) -> list[list[bytes | None]]:
        pipe = self.client.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hmget(self.keys(session_id).session, list(fields))
        return list(await executed(pipe.execute()))
