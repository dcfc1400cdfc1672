"""Automatic pipelining on real Redis: calls in one loop turn share a round trip, and each call still gets
its own result or error."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tiered_sessions import SessionManager, Settings
from tiered_sessions._pipelined_connection import OnReplies, PipelinedConnection, pack
from tiered_sessions._pipelining import AutoPipeline

from .conftest import skip_outside_ci


async def test_concurrent_calls_share_round_trips(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # No in-process flusher: its claims would share the pipeline and muddy the count.
    async with SessionManager(settings=dataclasses.replace(settings, run_flusher=False)) as manager:
        ids = [f"p-{i}" for i in range(100)]
        await asyncio.gather(*(manager.ensure(sid) for sid in ids))
        batches: list[int] = []
        original = PipelinedConnection.send

        def counting(connection: PipelinedConnection, data: bytes, count: int, on_replies: OnReplies) -> None:
            batches.append(count)
            original(connection, data, count, on_replies)

        monkeypatch.setattr(PipelinedConnection, "send", counting)
        results = await asyncio.gather(*(manager.update_activity(sid, request_duration_ms=2) for sid in ids))
        assert results == [True] * 100
        # 100 calls: the first goes straight out; the 99 gathered meanwhile go as two combined script calls,
        # one per round trip (Redis runs one while this process handles the other's replies)
        assert batches in ([1], [1, 1], [1, 1, 1])
        assert all(s is not None and s.request_count == 1
                   for s in await asyncio.gather(*(manager.get(sid) for sid in ids)))


async def test_a_combined_call_fails_only_the_session_at_fault(settings: Settings, redis: aioredis.Redis) -> None:
    ids = [f"c-{i}" for i in range(20)]
    async with SessionManager(settings=settings, run_flusher=False) as manager:  # Postgres holds none of them
        await asyncio.gather(*(manager.ensure(sid) for sid in ids))
        broken = manager._tiers.hot.keys("c-7").session  # type: ignore[union-attr]
        await redis.delete(broken)
        await redis.set(broken, "not a hash")
        results = await asyncio.gather(*(manager.update_activity(sid, 3) for sid in ids), return_exceptions=True)
        assert results[7] is False  # its key moved aside (a poison dead letter): the session is missing
        assert results[:7] + results[8:] == [True] * 19
        assert all(s is not None and s.request_count == 1
                   for s in await asyncio.gather(*(manager.get(sid) for sid in ids[:7] + ids[8:])))


async def test_scripts_reload_after_script_flush(manager: SessionManager, redis: aioredis.Redis) -> None:
    await manager.ensure("reload")
    await redis.script_flush()
    results = await asyncio.gather(*(manager.update_activity("reload") for _ in range(10)))
    assert results == [True] * 10
    assert (await manager.get("reload")).request_count == 10  # type: ignore[union-attr]


async def test_one_failing_call_does_not_fail_its_neighbours(redis_url: str, redis: aioredis.Redis) -> None:
    await redis.set("a-string", "x")
    pipeline = AutoPipeline(redis, timeout=5)
    results: tuple[Any, ...] = await asyncio.gather(pipeline.command("SET", "k", "v"),
                                                    pipeline.command("HGETALL", "a-string"),
                                                    pipeline.command("GET", "k"), return_exceptions=True)
    good, bad, also_good = results
    assert good == b"OK" and also_good == b"v"
    assert isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)


async def test_redis_down_fails_every_waiting_call(settings: Settings, own_redis: object) -> None:
    from tiered_sessions import RedisUnavailable
    from tiered_sessions.embedded import RedisServer

    assert isinstance(own_redis, RedisServer)
    async with SessionManager(settings=settings, redis_url=own_redis.url, enable_persistence=False,
                              socket_timeout_secs=2) as manager:
        await manager.ensure("doomed")
        own_redis.kill()
        results = await asyncio.gather(*(manager.update_activity("doomed") for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results)


def test_pack_matches_resp() -> None:
    expected = b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$3\r\n1.5\r\n"
    assert pack(("SET", b"k", 12, 1.5)) == expected
    assert pack(("SET", bytearray(b"k"), 12, 1.5)) == expected  # hiredis refuses a bytearray: the fallback packs it
    with pytest.raises(TypeError):
        pack(("SET", object()))


async def test_round_trips_reuse_the_pipelines_connection(redis: aioredis.Redis,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = AutoPipeline(redis, timeout=5)
    pool = redis.connection_pool
    checkouts = 0
    original = pool.get_connection

    async def counting() -> object:
        nonlocal checkouts
        checkouts += 1
        return await original()  # type: ignore[no-untyped-call]

    monkeypatch.setattr(pool, "get_connection", counting)
    for i in range(20):
        assert await pipeline.command("SET", "kept", i) == b"OK"
    assert checkouts == 1
    await pipeline.aclose()
    assert await pipeline.command("GET", "kept") == b"19" and checkouts == 2


async def test_a_connection_the_server_closed_is_replaced(redis: aioredis.Redis) -> None:
    pipeline = AutoPipeline(redis, timeout=5)
    assert await pipeline.command("CLIENT", "SETNAME", "held-by-pipeline") == b"OK"
    killed = await redis.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")  # type: ignore[no-untyped-call]
    assert killed >= 1
    await asyncio.sleep(0.05)  # the EOF reaches our side of the connection
    assert await pipeline.command("SET", "after-kill", "v") == b"OK"
    assert await redis.get("after-kill") == b"v"


async def test_a_cancelled_round_trip_leaves_no_reply_behind(redis: aioredis.Redis) -> None:
    """A caller cancelled while its reply is on the way must not hand that reply to the next caller."""
    pipeline = AutoPipeline(redis, timeout=5)
    await redis.set("slow-key", "slow")
    # Busy for one second (TIME is seconds and microseconds: whole seconds alone may tick over at once).
    busy = ("local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end "
            "local start = now() while now() - start < 1000000 do end return redis.call('GET', KEYS[1])")
    slow = asyncio.ensure_future(pipeline.command("EVAL", busy, 1, "slow-key"))
    await asyncio.sleep(0.2)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    await redis.set("next-key", "next")
    assert await pipeline.command("GET", "next-key") == b"next"


async def test_batches_sent_back_to_back_get_their_own_replies(redis: aioredis.Redis) -> None:
    pipeline = AutoPipeline(redis, timeout=5)
    try:
        connection = await pipeline._connection(0)
        big = b"x" * 3_000_000  # its reply arrives in many reads
        await redis.set("big", big)
        first = connection.request(pack(("GET", "big")) + pack(("INCR", "n")), 2)
        second = connection.request(pack(("INCR", "n")), 1)
        assert connection.waiting == 2
        assert await first == [big, 1]
        assert await second == [2]
        assert await asyncio.wait_for(pipeline.run([]), 1) == []  # nothing to send: no reply to wait for
    finally:
        await pipeline.aclose()


async def test_a_late_reply_times_out_and_the_next_call_gets_a_fresh_connection(redis: aioredis.Redis) -> None:
    pipeline = AutoPipeline(redis, timeout=0.3)
    busy = ("local function now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end "
            "local start = now() while now() - start < 800000 do end return 'late'")
    try:
        slow = asyncio.ensure_future(pipeline.command("EVAL", busy, 0))
        await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(pipeline.command("GET", "anything"))  # written behind the slow call
        for call in (slow, behind):
            with pytest.raises(RedisTimeoutError):
                await call
        late = pipeline._lanes[0]
        assert late is not None and not late.usable
        await asyncio.sleep(0.6)  # the busy script ends
        assert await pipeline.command("SET", "after-timeout", "v") == b"OK"
        assert pipeline._lanes[0] is not late
        assert await redis.get("after-timeout") == b"v"
    finally:
        await pipeline.aclose()


async def test_push_messages_between_replies_are_skipped(redis: aioredis.Redis) -> None:
    """RESP3 servers push notifications (here: client-side caching invalidations) that answer no command."""
    pipeline = AutoPipeline(redis, timeout=5)
    try:
        connection = await pipeline._connection(0)
        await redis.set("tracked", "1")
        tracking, first = await connection.request(pack(("CLIENT", "TRACKING", "ON")) + pack(("GET", "tracked")), 2)
        if isinstance(tracking, ResponseError):
            skip_outside_ci(f"this connection speaks RESP2: no push messages ({tracking})")
        assert first == b"1"
        await redis.set("tracked", "2")  # the server pushes an invalidation of "tracked" to our connection
        await asyncio.sleep(0.1)
        assert await connection.request(pack(("GET", "tracked")) + pack(("ECHO", "after")), 2) == [b"2", b"after"]
    finally:
        await pipeline.aclose()
