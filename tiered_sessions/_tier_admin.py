"""Whole-tier work any process may do: warm Redis from Postgres (``recover``), and the cleanup sweep
(``remove_closed``, ``expire_in_postgres``). Work in proportion to the sessions stored: for the CLI and the
periodic cleanup, never the hot path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg

from . import _codec
from ._tiers import Tiers
from .model import CLOSED, ColdRecord

log = logging.getLogger(__name__)


async def recover(tiers: Tiers, progress: Callable[[int, int], None] | None, page_size: int) -> int:
    """Warm every live session from Postgres into Redis (keeping any newer copy Redis has); returns how many
    were put (back) into Redis. ``progress(done, total)`` after every page."""
    if tiers.store is None:
        return 0
    total = await tiers.store.count_live()
    done = written = 0
    # Three pages at once: the next one read from Postgres and its hashes built, this one sent to Redis, and
    # the one before still being written there, so that neither server waits for this process.
    # Plain tasks, not a TaskGroup: its ExceptionGroup would hide the driver error the manager names.
    pages = aiter(tiers.store.iter_live_rows(page_size))
    page = await _next_page(pages)
    warming: asyncio.Future[int] | None = None
    warming_size = 0
    while page is not None:
        reading = asyncio.ensure_future(_next_page(pages))
        previous, previous_size = warming, warming_size
        warming, warming_size = asyncio.ensure_future(tiers.hot.warm_page(page)), len(page)
        try:
            if previous is not None:
                written += await previous
                done += previous_size
                _report(progress, done, total)
            page = await reading
        except BaseException:
            for task in (reading, warming):
                task.cancel()
            await asyncio.gather(reading, warming, return_exceptions=True)
            raise
    if warming is not None:
        written += await warming
        done += warming_size
        _report(progress, done, total)
    log.info("recovered %d sessions into Redis (%d live in Postgres)", written, done)
    return written


def _report(progress: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, max(total, done))


async def remove_closed(tiers: Tiers, now_ms: int) -> list[str]:
    """Remove the closed sessions Redis holds alive at ``now_ms`` (tombstones, as ``remove``); returns their
    ids. Each one this removes before its expiry is counted toward ``hot.timed_out``, once in the whole tier."""
    live = await tiers.hot.live_sessions(now_ms, [_codec.STATE])
    closed = [sid for sid, (state,) in live.items() if state == _codec.STATE_CODES[CLOSED]]
    # In one round trip. check_cold: one that left Redis since the scan expired (its bucket counts it), nothing
    # to tombstone.
    await tiers.hot.remove_stale(closed, now_ms)
    return closed


async def _next_page(pages: AsyncIterator[list[asyncpg.Record]]) -> list[tuple[str, _codec.WarmHash]] | None:
    """The next page of live rows, as warm_page takes them (None after the last)."""
    rows = await anext(pages, None)
    if rows is None:
        return None
    return [(row[0], _codec.hash_from_row(row)) for row in rows]


async def expire_in_postgres(tiers: Tiers, now_ms: int) -> list[ColdRecord]:
    """Mark the timed-out rows expired in Postgres; returns those Redis does not hold alive either. (Redis lets
    a flushed session lapse by its TTL; Postgres says live until marked here. One that expired while dirty is
    written as expired by the flusher.)"""
    if tiers.store is None:
        return []
    records = await tiers.store.mark_expired()
    in_redis = await tiers.hot.read_fields([r.session_id for r in records], [_codec.STATE, _codec.EXPIRES])
    # One touched since its last flush is not expired: that flush makes the row live again.
    return [record for record, (state, expires) in zip(records, in_redis, strict=True)
            if not _codec.is_live(state, expires, now_ms)]
