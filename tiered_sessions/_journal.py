"""The journal belongs to the tier: writes taken while Redis was unreachable (written through to Postgres and
journaled in ``<table>_journal``) are folded back into Redis exactly once, by whichever process finds Redis
reachable: the degraded probe of the process that wrote them, any flusher pass, ``flush()``, ``close()`` or a
manager's start, whether the process that journaled them is alive, closed or dead.

Exactly once: an entry is applied only to a copy that does not already include it (the hash field ``jv``
holds the newest Postgres version folded in; a copy read from Postgres carries the row's version), and
deleted in the same transaction that read it. A Redis copy that lacks entries still pending may meanwhile be
flushed: Postgres, which holds them, refuses it (its version guard) and the flusher rebases it, so the entries
are folded in once replayed and reach Postgres with the copy's own writes (see docs/reliability.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import _codec, metrics
from ._codec import DATA_PREFIX, FOLDED, META_PREFIX, STATE, STATE_CODES, encode_attributes, split_document
from ._hot_tier import HotTier
from ._replies import Status
from .cold_tier import JournalEntry, PostgresSessionStore
from .model import REMOVED

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, hot: HotTier, store: PostgresSessionStore) -> None:
        self.hot = hot
        self.store = store

    async def pending(self) -> int:
        """Entries not yet folded back (the flusher loop exports it as ``tiered_sessions_journal_pending``)."""
        return await self.store.journal_pending()

    async def replay(self, *, wait: bool) -> int | None:
        """Fold every pending entry into Redis, oldest first. With ``wait``, after any replay under way in
        another process; without, return None at once if there is one (it folds them)."""
        replayed = await self.store.replay_journal(self._apply_page, wait=wait)
        if replayed:
            metrics.JOURNAL_REPLAYED.inc(replayed)
            log.info("folded %d journaled writes back into Redis", replayed)
        return replayed

    async def replay_pending(self) -> int:
        """For a flusher pass: replay only if entries wait (one cheap count otherwise), never waiting for
        another replayer. Returns the entries still pending."""
        if await self.pending() == 0:
            return 0
        await self.replay(wait=False)
        return await self.pending()

    async def _apply_page(self, entries: list[JournalEntry]) -> None:
        # In order within a session; sessions side by side, so the calls share round trips.
        by_session: dict[str, list[JournalEntry]] = {}
        for entry in entries:
            by_session.setdefault(entry.session_id, []).append(entry)
        await asyncio.gather(*(self._apply_in_order(batch) for batch in by_session.values()))

    async def _apply_in_order(self, entries: list[JournalEntry]) -> None:
        for entry in entries:
            await self._apply(entry.session_id, entry.op, entry.args, entry.version_after)

    async def _apply(self, sid: str, op: str, args: dict[str, Any], version: int) -> None:
        if op == "touch":
            await self.hot.touch(sid, int(args["duration_ms"]), journal_version=version)
            return
        now_ms = _codec.now_ms()
        if op == "merge":
            pairs = [item for pair in split_document(args["data"], DATA_PREFIX)
                     + split_document(args["metadata"], META_PREFIX) for item in pair]
            state = STATE_CODES[args["state"]] if args.get("state") else b""
            reply = await self.hot.update(sid, now_ms, state=state, pairs=pairs,
                                          attributes=encode_attributes(**args["attributes"]),
                                          journal_version=version)
            if reply.status is Status.TOO_LARGE:
                metrics.BACKEND_ERRORS.labels("redis", "replay").inc()
                log.error("replay of a merge into %s refused by the size limit; Postgres has it, Redis not", sid)
        elif op == "remove":
            await self.hot.remove(sid, now_ms, check_cold=True, min_version=0, journal_version=version)
        elif op == "create":
            # A new life made in Postgres: a dead copy in Redis must not hide it (a live one is the session).
            current, expires, folded = await self.hot.read_fields_of(sid, [STATE, b"ex", FOLDED])
            dead = current == STATE_CODES[REMOVED] or (expires is not None and int(expires) <= now_ms)
            if current is not None and dead and int(folded or 0) < version:
                await self.hot.delete(sid)
        else:
            log.error("unknown journal operation %r for %s: skipped", op, sid)
