"""``tiered-sessions load``: a steady session workload through ``SessionManager``, with its own ``/metrics``,
``/healthz`` and ``/readyz`` (the dev stack scrapes it, so the hot path's panels and alerts have a source).

Each of ``concurrency`` tasks plays visitors on a pool of session slots at ``rate / concurrency`` calls per
second: a slot without a session starts one (``ensure``); a slot with one gets, mostly, an activity update, else
a read, a data update, or its end (``remove``, the slot starts a new session next time); a few reads ask for ids
that never existed (misses). A call that fails with the tier's own error (Redis or Postgres unreachable,
backpressure, the session limit) is counted and logged in the periodic summary, and the load goes on: what the
metrics and alerts show is the point.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import time

from ._ops_http import serving
from .config import Settings
from .errors import ConfigurationError, TieredSessionsError
from .manager import SessionManager

log = logging.getLogger(__name__)
_SUMMARY_EVERY_SECS = 30.0
# The call mix of a visitor whose session exists, by cumulative share.
_MIX = (("update_activity", 0.60), ("get", 0.85), ("update", 0.95), ("miss", 0.99), ("remove", 1.0))


class Load:
    def __init__(self, manager: SessionManager, *, rate: float, sessions: int, concurrency: int) -> None:
        if rate <= 0 or sessions < 1 or concurrency < 1:
            raise ConfigurationError("load: --rate must be > 0, --sessions and --concurrency >= 1")
        self.manager = manager
        self.rate = rate
        self.concurrency = concurrency
        self.slots: list[str | None] = [None] * sessions
        self.calls = 0
        self.failures: collections.Counter[str] = collections.Counter()

    async def run(self, stop: asyncio.Event) -> None:
        """Visit until ``stop``; a visitor that dies of anything but a named tier error ends the run with it."""
        tasks = [asyncio.create_task(self._visitor(stop, random.Random(index))) for index in range(self.concurrency)]
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await asyncio.wait([*tasks, stopping], timeout=_SUMMARY_EVERY_SECS,
                                   return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise RuntimeError("a load visitor died") from task.exception()
                self._summary()
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)

    async def _visitor(self, stop: asyncio.Event, chance: random.Random) -> None:
        pause = self.concurrency / self.rate
        next_call = time.monotonic()
        while not stop.is_set():
            try:
                await self.visit(chance)
            except TieredSessionsError as exc:
                self.failures[type(exc).__name__] += 1
            self.calls += 1
            next_call = max(next_call + pause, time.monotonic() - 1.0)  # catch up a second at most
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_call - time.monotonic()))

    async def visit(self, chance: random.Random) -> None:
        """One call on a random slot (see the module's docstring)."""
        slot = chance.randrange(len(self.slots))
        session_id = self.slots[slot]
        if session_id is None:
            session = await self.manager.ensure(f"load-{secrets.token_hex(8)}", user_id=f"user-{slot % 97}",
                                                data={"cart": []})
            self.slots[slot] = session.session_id
            return
        roll = chance.random()
        call = next(name for name, share in _MIX if roll < share)
        if call == "update_activity":
            await self.manager.update_activity(session_id, request_duration_ms=chance.randrange(1, 50))
        elif call == "get":
            if await self.manager.get(session_id) is None:
                self.slots[slot] = None  # expired or removed meanwhile: a new visitor next time
        elif call == "update":
            await self.manager.update(session_id, data={"cart": [chance.randrange(100)], "step": "browse"})
        elif call == "miss":
            await self.manager.get(f"load-missing-{secrets.token_hex(8)}")
        else:
            await self.manager.remove(session_id)
            self.slots[slot] = None

    def _summary(self) -> None:
        live = sum(slot is not None for slot in self.slots)
        if self.failures:
            log.warning("load: %d calls, %d sessions; failed: %s", self.calls, live,
                        ", ".join(f"{name} {count}" for name, count in sorted(self.failures.items())))
        else:
            log.info("load: %d calls, %d sessions, none failed", self.calls, live)
        self.calls = 0
        self.failures.clear()


async def run_load(settings: Settings, *, rate: float, sessions: int, concurrency: int, host: str,
                   port: int | None, ready_max_lag: float, stop: asyncio.Event) -> int:
    """Run the workload until ``stop`` is set, serving the endpoints on ``port`` if given (0: any free port)."""
    manager = SessionManager(settings=settings)
    await manager.start()
    async with serving(manager, port, host, ready_max_lag=ready_max_lag, serves_calls=True):
        load = Load(manager, rate=rate, sessions=sessions, concurrency=concurrency)
        log.info("load running: %.0f calls/s over %d sessions, %d tasks", rate, sessions, concurrency)
        await load.run(stop)
        log.info("load stopped")
    return 0
