"""Per-session locks on real Redis: mutual exclusion across managers, fencing tokens, leases, timeouts."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from tiered_sessions import SessionManager, Settings
from tiered_sessions._codec import partition_of
from tiered_sessions.errors import ConfigurationError, LockLost, LockTimeout


def _lock_key(settings: Settings, session_id: str) -> str:
    return f"{settings.key_prefix}:{{p{partition_of(session_id, settings.partitions)}}}:lock:{session_id}"


async def test_mutual_exclusion_across_two_managers(settings: Settings, redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings) as one, SessionManager(settings=settings) as two:
        inside = 0
        most_inside = 0

        async def worker(manager: SessionManager) -> None:
            nonlocal inside, most_inside
            for _ in range(10):
                async with manager.lock("shared", timeout=20, lease=5):
                    inside += 1
                    most_inside = max(most_inside, inside)
                    # A read-modify-write that loses increments unless the lock excludes the others.
                    value = int(await redis.get("counter") or 0)
                    await asyncio.sleep(0.002)
                    await redis.set("counter", value + 1)
                    inside -= 1

        await asyncio.gather(*(worker(m) for m in (one, two, one, two)))
        assert most_inside == 1
        assert int(await redis.get("counter") or 0) == 40
        assert await redis.exists(_lock_key(settings, "shared")) == 0  # every holder released


async def test_fencing_tokens_increase_from_holder_to_holder(settings: Settings, redis: aioredis.Redis) -> None:
    async with SessionManager(settings=settings) as one, SessionManager(settings=settings) as two:
        tokens = []
        for manager in (one, two, one, two):
            async with manager.lock("fenced") as lock:
                assert lock.held and lock.token > 0
                tokens.append(lock.token)
            assert not lock.held and lock.token == 0
        assert tokens == sorted(tokens) and len(set(tokens)) == 4
        # The counter key lives in the session's partition (one cluster slot) and may expire: tokens still grow.
        fence = _lock_key(settings, "fenced").replace(":lock:", ":fence:")
        assert int(await redis.get(fence) or 0) == tokens[-1]
        await redis.delete(fence)
        async with one.lock("fenced") as lock:
            assert lock.token > tokens[-1]
        # Locks of different sessions are independent.
        async with one.lock("fenced") as a, one.lock("other", timeout=0) as b:
            assert a.token > 0 and b.token > 0


async def test_keys_share_the_sessions_cluster_slot(manager: SessionManager, settings: Settings,
                                                    redis: aioredis.Redis) -> None:
    await manager.ensure("slotted")
    async with manager.lock("slotted"):
        keys = {key.decode() if isinstance(key, bytes) else key
                for key in await redis.keys(f"{settings.key_prefix}:*slotted")}
    tag = f"{{p{partition_of('slotted', settings.partitions)}}}"
    assert len(keys) == 3 and all(f":{tag}:" in key for key in keys)  # session hash, lock, fence counter


async def test_lease_expiry_frees_a_dead_holders_lock(settings: Settings) -> None:
    dead = SessionManager(settings=settings)
    taken = dead.lock("orphan", lease=0.3)
    first = await taken.acquire()
    await dead.close()  # the holder "dies" without releasing
    async with SessionManager(settings=settings) as survivor:
        started = time.monotonic()
        async with survivor.lock("orphan", timeout=5) as lock:
            waited = time.monotonic() - started
            assert lock.token > first
        assert 0.1 < waited < 5  # loose upper bound: shared CI machines stall


async def test_timeout_raises_lock_timeout(manager: SessionManager) -> None:
    async with manager.lock("busy", lease=10):
        started = time.monotonic()
        with pytest.raises(LockTimeout) as raised:
            async with manager.lock("busy", timeout=0.3):
                pytest.fail("acquired a held lock")
        assert 0.25 < time.monotonic() - started < 3
        assert isinstance(raised.value, TimeoutError)
        with pytest.raises(LockTimeout):  # timeout=0: a single try
            await manager.lock("busy", timeout=0).acquire()
    async with manager.lock("busy", timeout=0):  # released on exit: free again at once
        pass


async def test_release_after_the_lease_ran_out_leaves_the_next_holders_lock(
        manager: SessionManager, settings: Settings, redis: aioredis.Redis) -> None:
    with pytest.raises(LockLost):
        async with manager.lock("slow", lease=0.2) as slow:
            await asyncio.sleep(0.35)  # a long pause: the lease runs out
            fast = manager.lock("slow", timeout=0, lease=10)
            await fast.acquire()
            assert fast.token > slow.token
    # The late release raised LockLost and left the new holder's key alone.
    assert await redis.get(_lock_key(settings, "slow")) == str(fast.token).encode()
    with pytest.raises(LockTimeout):
        await manager.lock("slow", timeout=0).acquire()
    await fast.release()
    assert await redis.exists(_lock_key(settings, "slow")) == 0


async def test_lock_lost_does_not_hide_the_blocks_own_exception(manager: SessionManager) -> None:
    with pytest.raises(ZeroDivisionError) as raised:
        async with manager.lock("fails", lease=0.1):
            await asyncio.sleep(0.2)
            raise ZeroDivisionError
    assert any("was lost" in note for note in raised.value.__notes__)


async def test_an_exception_or_cancellation_in_the_block_releases(manager: SessionManager) -> None:
    with pytest.raises(KeyError):
        async with manager.lock("raises"):
            raise KeyError("boom")
    async with manager.lock("raises", timeout=0):
        pass

    entered = asyncio.Event()

    async def holder() -> None:
        async with manager.lock("cancelled"):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(holder())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with manager.lock("cancelled", timeout=0):
        pass


async def test_extend_keeps_the_lock_past_its_first_lease(manager: SessionManager) -> None:
    async with manager.lock("long", lease=1.0) as lock:
        for _ in range(3):
            await asyncio.sleep(0.4)  # 1.2 s in all: past the first lease, never past one extension
            await lock.extend()
        with pytest.raises(LockTimeout):
            await manager.lock("long", timeout=0).acquire()
    async with manager.lock("gone", lease=0.1) as lock:
        await asyncio.sleep(0.2)
        with pytest.raises(LockLost):
            await lock.extend()
        assert not lock.held  # lost: leaving the block has nothing to release


async def test_bad_arguments_are_refused(manager: SessionManager) -> None:
    from tiered_sessions.errors import InvalidSessionId

    with pytest.raises(InvalidSessionId):
        manager.lock("bad id!")
    for lease in (0, -1, float("nan"), True):
        with pytest.raises(ConfigurationError):
            manager.lock("x", lease=lease)
    with pytest.raises(ConfigurationError):
        manager.lock("x", timeout=-1)
    lock = manager.lock("x")
    async with lock:
        with pytest.raises(ConfigurationError):
            await lock.acquire()  # one acquisition per lock object
