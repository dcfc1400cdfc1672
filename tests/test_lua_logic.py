"""The Lua scripts' logic, fast, on fakeredis (real-Redis behaviour is covered by the other tests)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from tiered_sessions._scripts import (
    ACK,
    ENSURE,
    LEASE,
    LEASE_RELEASE,
    LIVE_COUNT,
    REMOVE,
    TIMED_OUT,
    TOUCH,
    UPDATE,
    LuaScript,
)


async def _run(script: LuaScript, client: fakeredis.FakeAsyncRedis, keys: list[str],
               args: list[Any]) -> Any:
    return await client.eval(script.source, len(keys), *keys, *args)


@pytest.fixture
async def fake() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


KEYS = ["ts:{p0}:s:a", "ts:{p0}:dirty", "ts:{p0}:expiring"]
LEASE_KEY = "ts:{p0}:lease"
ACK_KEYS = [KEYS[1], LEASE_KEY]  # "?" as the token: an on-demand flush, accepted while nobody holds it
BUCKET = 1000  # ms per live-count bucket
T = int(time.time() * 1000) + 600_000  # scripts take "now" from the caller; ahead of the clock, so the
# expiries lie ahead even when a slow suite reaches these tests minutes after collecting them


async def _create(fake: fakeredis.FakeAsyncRedis) -> None:
    reply = await _run(ENSURE, fake, KEYS, [T + 1000, 60_000, "a", "1", "0", 0, 0, 0, BUCKET])
    assert reply[0] == 2


async def test_ack_clears_only_the_version_it_wrote(fake: fakeredis.FakeAsyncRedis) -> None:
    await _create(fake)
    assert await _run(TOUCH, fake, KEYS[:1], [60_000, "1", BUCKET, "0", "1", "0", T + 2000, 5]) == [[2, 1, 5, T + 2000]]
    # The flusher wrote version 1, but version 2 is in Redis: the mark stays, re-scored to the read time.
    assert await _run(ACK, fake, ACK_KEYS, ["ts:{p0}:s:", 600_000, T + 1500, "?", "a", 1, "1"]) == 0
    assert await fake.zscore(KEYS[1], "a") == T + 1500
    assert await fake.ttl(KEYS[0]) == -1  # still pinned
    assert await _run(ACK, fake, ACK_KEYS, ["ts:{p0}:s:", 600_000, T + 2500, "?", "a", 2, "1"]) == 1
    assert await fake.zscore(KEYS[1], "a") is None
    assert await fake.pexpiretime(KEYS[0]) == T + 62_000  # the real expiry: last activity + timeout


async def test_touch_replies_the_version_unless_counters_are_asked_for(fake: fakeredis.FakeAsyncRedis) -> None:
    await _create(fake)
    assert await _run(TOUCH, fake, KEYS[:1], [60_000, "1", BUCKET, "0", "0", "0", T + 2000, 5]) == [2]
    assert await _run(TOUCH, fake, KEYS[:1],
                      [60_000, "1", BUCKET, "0", "1", "0", T + 2001, 7]) == [[3, 2, 12, T + 2001]]
    assert await fake.hmget(KEYS[0], ["la", "ex"]) == [str(T + 2001).encode(), str(T + 62_001).encode()]


async def test_touch_writes_the_declared_dirty_index_and_live_counts(fake: fakeredis.FakeAsyncRedis) -> None:
    """On a cluster the partition's dirty index and live counts come declared after the sessions' keys (Redis
    checks declared keys before a script runs); the touch writes those, not keys built from the session's."""
    await _create(fake)
    await fake.delete(KEYS[1])
    declared = ["ts:{p0}:dirty-declared", "ts:{p0}:expiring-declared"]
    assert await _run(TOUCH, fake, [KEYS[0], *declared], [60_000, "1", BUCKET, "0", "0", "1", T + 2000, 5]) == [2]
    assert await fake.zscore(declared[0], "a") == T + 2000
    assert await fake.zscore(KEYS[1], "a") is None
    assert int(await fake.hget(declared[1], "n") or 0) == 0  # moved between buckets: counted, net zero
    assert len(await fake.hgetall(declared[1])) == 2  # -1 in the old bucket, +1 in the new one


async def test_touch_of_several_slots_takes_the_keys_from_argv(fake: fakeredis.FakeAsyncRedis) -> None:
    """Layout "2" (several slots of one cluster master): no KEYS, the sessions' keys after the time; each touch
    writes its own partition's dirty index."""
    await _create(fake)
    other = ["ts:{p1}:s:b", "ts:{p1}:dirty", "ts:{p1}:expiring"]
    reply = await _run(ENSURE, fake, other, [T + 1000, 60_000, "b", "1", "0", 0, 0, 0, BUCKET])
    assert reply[0] == 2
    await fake.delete(KEYS[1], other[1])
    touched = await _run(TOUCH, fake, [], [60_000, "1", BUCKET, "0", "0", "2", T + 2000, 2, KEYS[0], other[0], 5, 7])
    assert touched == [2, 2]
    assert await fake.zscore(KEYS[1], "a") == T + 2000 and await fake.zscore(other[1], "b") == T + 2000
    assert await fake.hmget(other[0], ["rc", "td"]) == [b"1", b"7"]


async def test_one_ack_clears_more_entries_than_one_zrem_takes(fake: fakeredis.FakeAsyncRedis) -> None:
    ids = [f"s{i}" for i in range(1203)]  # the script removes them 500 at a time
    for sid in ids:
        await fake.hset(f"ts:{{p0}}:s:{sid}", mapping={"v": 1, "st": "a", "ex": T + 60_000})
    await fake.zadd(KEYS[1], {sid: T for sid in ids} | {"written-again": T})
    await fake.hset("ts:{p0}:s:written-again", mapping={"v": 2, "st": "a", "ex": T + 60_000})
    triples = [item for sid in [*ids, "written-again"] for item in (sid, 1, "1")]
    assert await _run(ACK, fake, ACK_KEYS, ["ts:{p0}:s:", 600_000, T + 100, "?", *triples]) == 1203
    assert await fake.zrange(KEYS[1], 0, -1, withscores=True) == [(b"written-again", T + 100)]


async def test_tombstone_versions_climb_and_linger_after_ack(fake: fakeredis.FakeAsyncRedis) -> None:
    await _create(fake)
    assert await _run(REMOVE, fake, KEYS, [T + 3000, "a", "1", "0", 0, BUCKET]) == 2
    assert await _run(REMOVE, fake, KEYS, [T + 3001, "a", "1", "0", 0, BUCKET]) == -1  # already a tombstone
    assert await _run(TOUCH, fake, KEYS[:1], [60_000, "1", BUCKET, "0", "0", "0", T + 3002, 5]) == [-1]
    assert await _run(ACK, fake, ACK_KEYS, ["ts:{p0}:s:", 600_000, T + 3500, "?", "a", 2, "1"]) == 1
    assert 0 < await fake.pttl(KEYS[0]) <= 600_000
    # A new life starts above the tombstone, even when Postgres says an older version.
    reply = await _run(ENSURE, fake, KEYS, [T + 4000, 60_000, "a", "1", "1", 1, 0, 0, BUCKET])
    assert reply[0] == 2 and dict(zip(reply[1][::2], reply[1][1::2], strict=True))[b"v"] == b"3"


async def test_update_refuses_growth_past_the_limit_without_writing(fake: fakeredis.FakeAsyncRedis) -> None:
    await _create(fake)
    keys = KEYS[:2]
    fixed = ["a", 20, "1", "", 1, "", "", 0, 0]  # id, max bytes, persist, state, 1 pair, no journal/CAS/unset/guard
    assert await _run(UPDATE, fake, keys, [T + 2000, *fixed, "d:k", "123456789"]) == [2, 12]
    assert await _run(UPDATE, fake, keys, [T + 2001, *fixed, "d:j", "123456789"]) == [-2, 24]
    assert await fake.hget(KEYS[0], "d:j") is None and await fake.hget(KEYS[0], "v") == b"2"
    assert await _run(UPDATE, fake, keys, [T + 2002, *fixed, "d:k", "1"]) == [3, 4]


async def test_ack_is_fenced_by_the_partition_lease(fake: fakeredis.FakeAsyncRedis) -> None:
    await _create(fake)
    assert await _run(LEASE, fake, [LEASE_KEY], ["flusher-a", 5000]) == 1
    assert await _run(LEASE, fake, [LEASE_KEY], ["flusher-b", 5000]) == 0  # held by a
    args = ["ts:{p0}:s:", 600_000, T + 1500]
    assert await _run(ACK, fake, ACK_KEYS, [*args, "flusher-b", "a", 1, "1"]) == -1  # not the holder
    assert await _run(ACK, fake, ACK_KEYS, [*args, "?flusher-b", "a", 1, "1"]) == -1  # on demand, but a holds it
    assert await fake.zscore(KEYS[1], "a") is not None
    assert await _run(LEASE_RELEASE, fake, [LEASE_KEY], ["flusher-b"]) == 0  # compare-and-delete
    assert await _run(ACK, fake, ACK_KEYS, [*args, "?flusher-a", "a", 1, "1"]) == 1  # on demand, by the holder
    assert await _run(LEASE_RELEASE, fake, [LEASE_KEY], ["flusher-a"]) == 1
    assert await _run(LEASE, fake, [LEASE_KEY], ["flusher-b", 5000]) == 1  # free again: b takes it


async def test_live_counts_follow_creates_slides_removes_and_expiry(fake: fakeredis.FakeAsyncRedis) -> None:
    counts = KEYS[2]

    async def count(now: int) -> int:
        return int(await _run(LIVE_COUNT, fake, [counts], [now, BUCKET]))

    def keys(sid: str) -> list[str]:
        return [f"ts:{{p0}}:s:{sid}", KEYS[1], counts]

    for sid in ("a", "b", "c"):
        assert (await _run(ENSURE, fake, keys(sid), [T, 10_000, sid, "1", "0", 0, 0, 0, BUCKET]))[0] == 2
    assert await count(T) == 3
    # "a" slides its expiry into a later bucket: still one session
    await _run(TOUCH, fake, keys("a")[:1], [10_000, "1", BUCKET, "0", "0", "0", T + 5_000, 0])
    assert await count(T + 5_000) == 3
    assert await _run(REMOVE, fake, keys("b"), [T + 5_001, "b", "1", "0", 0, BUCKET]) == 2
    assert await count(T + 5_001) == 2
    # "c" expires at T + 10 s (counted until its bucket has passed), "a" at T + 15 s
    assert await count(T + 11_000) == 1
    assert await count(T + 16_000) == 0
    assert sorted(await fake.hkeys(counts)) == [b"lo", b"n", b"t"]  # the passed buckets are gone, counted out
    # ensure counts the same way against its limit (here: 1 session)
    limited = [*keys("d"), counts]
    assert (await _run(ENSURE, fake, limited, [T + 16_000, 10_000, "d", "1", "0", 0, 1, 0, BUCKET]))[0] == 2
    limited = [*keys("e"), counts]
    assert await _run(ENSURE, fake, limited, [T + 16_000, 10_000, "e", "1", "0", 0, 1, 0, BUCKET]) == [-1, 1]


async def test_timed_out_reports_each_session_counted_out_once(fake: fakeredis.FakeAsyncRedis) -> None:
    counts = KEYS[2]

    def keys(sid: str) -> list[str]:
        return [f"ts:{{p0}}:s:{sid}", KEYS[1], counts]

    async def timed_out(now: int) -> int:
        return int(await _run(TIMED_OUT, fake, [counts], [now, BUCKET]))

    assert await timed_out(T) == 0 and await fake.exists(counts) == 0  # no sessions: no key left behind
    for sid in ("a", "b", "c", "d"):
        assert (await _run(ENSURE, fake, keys(sid), [T, 10_000, sid, "1", "0", 0, 0, 0, BUCKET]))[0] == 2
    # a cleanup removing a closed session counts it; a plain remove does not
    assert await _run(REMOVE, fake, keys("b"), [T + 1_000, "b", "1", "0", 0, BUCKET, "", "1"]) == 2
    assert await _run(REMOVE, fake, keys("c"), [T + 1_000, "c", "1", "0", 0, BUCKET, ""]) == 2
    assert await timed_out(T + 1_000) == 1
    # a reading drops the passed buckets (a and d timed out at T + 10 s) without taking what it counted out
    assert int(await _run(LIVE_COUNT, fake, [counts], [T + 11_000, BUCKET])) == 0
    assert await timed_out(T + 11_000) == 2
    assert await timed_out(T + 12_000) == 0
    # removing a session counted out as timed out already counts nothing more
    assert await _run(REMOVE, fake, keys("d"), [T + 9_000, "d", "1", "0", 0, BUCKET, "", "1"]) == 2
    assert await timed_out(T + 12_000) == 0
