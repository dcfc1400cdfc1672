"""Per-session locks: a Redis lease with a fencing token, for callers that need one writer at a time.

``async with manager.lock(session_id, timeout=5.0, lease=10.0) as lock:`` waits up to ``timeout`` seconds
(``LockTimeout`` after that) for the lock, holds it for at most ``lease`` seconds, and releases it on exit.

- The lock is one key, ``{prefix}:{p<n>}:lock:<session_id>``, in the session's partition (so in its Redis
  Cluster slot), taken by a script with ``SET ... NX PX lease``. If the holder dies, the lease runs out and
  the next caller gets the lock.
- ``lock.token`` is a fencing token: an integer that only grows from one holder of the session's lock to the
  next (the last token + 1, and at least Redis's clock in microseconds, so it keeps growing after the counter
  key expires or a failover loses it). Pass it to anything the block writes to, which should refuse a token
  lower than the highest it has seen: that stops a holder whose lease ran out (a long pause) from writing
  after the next holder.
- Release deletes the key only if it still holds this token. If the lease ran out before the block ended,
  the block was not exclusive to the end: leaving it raises ``LockLost`` (if the block raised, its own
  exception goes on, with a note). ``await lock.extend()`` renews the lease for long blocks.
- The lock is per id and not reentrant: taking it again in the same task waits for itself until ``timeout``.
  It needs Redis: while Redis is unreachable (degraded mode) it raises ``RedisUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._codec import validate_session_id
from ._hot_tier import HotTier
from ._redis_client import unavailable
from ._scripts import LuaScript
from .errors import ConfigurationError, LockLost, LockTimeout

log = logging.getLogger(__name__)

ACQUIRE = LuaScript("lock")
RELEASE = LuaScript("unlock")
EXTEND = LuaScript("extend")

# The counter behind the tokens outlives locks by a day; after that Redis's clock keeps the tokens growing.
FENCE_TTL_MS = 24 * 3600 * 1000
# Waiting: jittered sleeps growing from 5 ms to 100 ms, never past the holder's remaining lease.
_FIRST_WAIT, _LONGEST_WAIT = 0.005, 0.1


class SessionLock:
    """One acquisition of a session's lock. Made by ``SessionManager.lock``; use it with ``async with``.

    ``token`` is 0 until the lock is acquired.
    """

    def __init__(self, ready: Callable[[], Awaitable[HotTier]], redis_url: str | None, session_id: str, *,
                 timeout: float | None = 5.0, lease: float = 10.0) -> None:
        self.session_id = validate_session_id(session_id)
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0.001 <= lease < 2**31 / 1000:
            raise ConfigurationError(f"lease must be a number of seconds >= 0.001, got {lease!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not timeout >= 0):
            raise ConfigurationError(f"timeout must be >= 0 seconds or None (wait forever), got {timeout!r}")
        self.timeout = timeout
        self.lease = float(lease)
        self.token = 0
        self._ready = ready
        self._redis_url = redis_url
        self._hot: HotTier | None = None
        self._lock_key = ""

    @property
    def held(self) -> bool:
        """Acquired and not released. (Whether the lease is still running only Redis knows: see ``extend``.)"""
        return self.token != 0

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.release()
        except LockLost as lost:
            if exc is None:
                raise
            # The block's own exception matters more; keep the loss visible on it and in the log.
            exc.add_note(str(lost))
            log.warning("%s (while the block raised %s)", lost, type(exc).__name__)

    async def acquire(self) -> int:
        """Wait for the lock (up to ``timeout``); returns the fencing token. Raises ``LockTimeout``."""
        if self.held:
            raise ConfigurationError(f"this lock on session {self.session_id} is held already; "
                                     "make a new one with manager.lock()")
        hot = await self._ready()
        self._lock_key, fence_key = hot.lock_keys(self.session_id)
        self._hot = hot
        keys = [self._lock_key, fence_key]
        lease_ms = max(1, round(self.lease * 1000))
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        wait = _FIRST_WAIT
        while True:
            # If this call is cancelled after Redis ran it, the lock stays taken until its lease runs out.
            reply = int(await self._call(ACQUIRE, keys, [lease_ms, FENCE_TTL_MS], "lock"))
            if reply > 0:
                self.token = reply
                return reply
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise LockTimeout(f"session {self.session_id} is locked by someone else (for up to "
                                  f"{-reply / 1000:.3f}s more); gave up after {self.timeout}s")
            # Full jitter keeps waiters from retrying in lockstep; never sleep past the holder's lease.
            pause = random.uniform(_FIRST_WAIT, wait)
            pause = min(pause, -reply / 1000 + 0.001)
            if left is not None:
                pause = min(pause, left)
            await asyncio.sleep(pause)
            wait = min(wait * 2, _LONGEST_WAIT)

    async def release(self) -> None:
        """Release the lock if it is still ours. Raises ``LockLost`` if the lease had run out (the key expired
        or another holder has it now: that one is left alone)."""
        if not self.held:
            return
        token, self.token = self.token, 0
        if not int(await self._call(RELEASE, [self._lock_key], [token], "unlock")):
            raise LockLost(f"the lock on session {self.session_id} (token {token}) was lost before release: its "
                           f"{self.lease}s lease ran out, so the block was not exclusive to its end")

    async def extend(self, lease: float | None = None) -> None:
        """Restart the lease (``lease`` seconds from now, default the lock's own). Raises ``LockLost`` if the
        lease had run out already."""
        if not self.held:
            raise LockLost(f"the lock on session {self.session_id} is not held")
        seconds = self.lease if lease is None else lease
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0.001 <= seconds < 2**31 / 1000:
            raise ConfigurationError(f"lease must be a number of seconds >= 0.001, got {seconds!r}")
        if not int(await self._call(EXTEND, [self._lock_key], [self.token, max(1, round(seconds * 1000))],
                                    "extend")):
            token, self.token = self.token, 0
            raise LockLost(f"the lock on session {self.session_id} (token {token}) was lost: its lease ran out "
                           "before extend()")

    async def _call(self, script: LuaScript, keys: list[str], args: list[Any], operation: str) -> Any:
        assert self._hot is not None
        try:
            return await self._hot.pipeline.evalsha(script, keys, args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise unavailable(self._redis_url, operation, exc) from exc


__all__ = ["SessionLock"]
