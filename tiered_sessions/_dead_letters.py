"""Rows Postgres rejected, kept with the reason so they can be listed, replayed or dropped.

One Redis hash per partition (``{prefix}:{p7}:dead``: session id -> JSON), beside the partition's other keys.
A dead-lettered session leaves the dirty index (so it no longer holds back the rest); its Redis copy lives
on with its normal expiry, and the dead letter keeps the row as it was, so a replay works even after that.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

import orjson

from . import _codec, metrics
from ._codec import hash_from_record
from ._failures import describe
from ._hot_tier import DirtyEntry, HotTier
from .cold_tier import ColdRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    session_id: str
    version: int
    reason: str
    failed_at: float
    row: tuple[Any, ...]  # the row as the flusher tried to write it (ColdRecord's fields, in order)

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "version": self.version, "reason": self.reason,
                "failed_at": self.failed_at, "row": list(self.row)}


class DeadLetters:
    def __init__(self, hot: HotTier) -> None:
        self.hot = hot

    async def record(self, row: DirtyEntry, error: BaseException) -> None:
        """Keep the row and Postgres's whole reason (DETAIL included) here; the log says only which session
        and the error class (``tiered-sessions dead-letters list`` shows the rest)."""
        letter = DeadLetter(row.session_id, row.version, f"{type(error).__name__}: {error}", time.time(),
                            dataclasses.astuple(ColdRecord.from_row(row.row)))
        await self.hot.store_dead_letter(row.partition, row.session_id, orjson.dumps(letter.to_dict()))
        metrics.DEAD_LETTERS.inc()
        log.error("session %s (version %d) dead-lettered: Postgres rejected it: %s", row.session_id,
                  row.version, describe(error))

    async def record_poison(self, entry: DirtyEntry) -> None:
        """A key that was not a session hash, quarantined by claim.lua (``entry.row``: the error and where the
        key went). Listed here with no row: it is inspected and dropped, not replayed."""
        reason = entry.row.decode(errors="replace")
        letter = DeadLetter(entry.session_id, 0, reason, time.time(), ())
        await self.hot.store_dead_letter(entry.partition, entry.session_id, orjson.dumps(letter.to_dict()))
        log.error("the key of session %s is not a session hash: %s", entry.session_id, reason)

    async def list(self) -> list[DeadLetter]:
        letters = []
        for raw in await self.hot.dead_letters():
            item = orjson.loads(raw)
            letters.append(DeadLetter(item["session_id"], item["version"], item["reason"],
                                      item["failed_at"], tuple(item["row"])))
        return sorted(letters, key=lambda letter: letter.failed_at)

    async def replay(self, session_ids: Iterable[str] | None = None) -> int:
        """Mark the sessions dirty again so the flusher retries them (after the cause was fixed). A session
        Redis no longer holds is first put back from the dead letter's copy. Returns how many."""
        letters = {letter.session_id: letter for letter in await self.list()}
        chosen = list(letters) if session_ids is None else [sid for sid in session_ids if sid in letters]
        now_ms = _codec.now_ms()
        for sid in chosen:
            if not letters[sid].row:
                log.warning("dead letter %s is a quarantined key, not a row: inspect it, then drop it", sid)
                continue
            if not (await self.hot.redirty([sid], now_ms))[0]:
                await self.hot.warm(sid, hash_from_record(ColdRecord(*letters[sid].row)))
                await self.hot.redirty([sid], now_ms)
            await self.hot.forget_dead_letter(sid)
            log.info("dead letter %s replayed: dirty again", sid)
        return sum(1 for sid in chosen if letters[sid].row)

    async def drop(self, session_ids: Iterable[str] | None = None) -> int:
        """Forget dead letters (the sessions are not written to Postgres). Returns how many."""
        letters = {letter.session_id for letter in await self.list()}
        chosen = letters if session_ids is None else letters.intersection(session_ids)
        for sid in chosen:
            await self.hot.forget_dead_letter(sid)
            log.warning("dead letter %s dropped", sid)
        return len(chosen)
