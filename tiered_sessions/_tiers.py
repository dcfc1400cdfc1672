"""A manager's connections, opened together and closed together: Redis (the client and the hot tier) and,
with persistence, Postgres (the store, with the flusher and the journal that work on both). ``open`` checks
the tier's layout and folds back what an earlier process left in the journal; ``close`` closes every client
whatever fails on the way."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from . import _scripts, metrics
from ._failures import REDIS_ERRORS, RETRYABLE
from ._flusher import Flusher
from ._hot_tier import HotTier
from ._journal import Journal
from ._layout import Layout
from ._redis_client import RedisClient, make_client
from .cold_tier import PostgresSessionStore
from .config import Settings, redact_message, redact_url
from .errors import PostgresUnavailable, RedisUnavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Tiers:
    client: RedisClient
    hot: HotTier
    store: PostgresSessionStore | None  # None without persistence
    flusher: Flusher | None  # with the store: also the one to drain at close and on flush()

    @property
    def journal(self) -> Journal | None:
        return None if self.flusher is None else self.flusher.journal

    @classmethod
    async def open(cls, settings: Settings) -> Tiers:
        settings.require("redis_url")
        client = make_client(settings)
        hot = HotTier(client, settings)
        store = PostgresSessionStore(settings=settings) if settings.enable_persistence else None
        tiers = cls(client, hot, store, None if store is None else Flusher(hot, store, settings))
        try:
            try:
                await client.ping()  # on a cluster: every node; the first command also maps the slots
                await hot.pipeline.load_scripts(_scripts.ALL)
            except REDIS_ERRORS as exc:
                raise RedisUnavailable(f"cannot reach Redis at {redact_url(settings.redis_url)}: "
                                       f"{redact_message(str(exc), settings.redis_url)}") from None
            await tiers._check_layout(settings)
            if tiers.journal is not None:
                await _fold(tiers.journal, settings)
        except BaseException:
            await tiers.close()
            raise
        return tiers

    async def _check_layout(self, settings: Settings) -> None:
        """Connect Postgres, and record this process's layout where none is, else check it against the recorded
        one: Postgres's first (it outlives a cold Redis; a start during a Postgres outage goes on without it,
        the flusher connects later), then Redis's, so a refused layout is recorded nowhere."""
        layout = Layout(settings.partitions, settings.key_prefix)
        if self.store is not None:
            try:
                await self.store.connect()
            except PostgresUnavailable as exc:
                if not exc.down:
                    raise
                # Start anyway (a deploy or a restart during an outage): writes land in Redis, the flusher
                # connects when Postgres answers, and /readyz says why it is not ready meanwhile.
                metrics.BACKEND_ERRORS.labels("postgres", "connect").inc()
                log.warning("starting without PostgreSQL: %s; writes wait in Redis until it answers", exc)
            else:
                layout.check(await self.store.record_layout(layout.record()), f"table {settings.qualified_layout}")
        layout.check(await self.hot.record_layout(layout.record()), f"Redis key {self.hot.layout_key}")

    async def terminate(self, timeout: float) -> None:
        """Close every client now: Postgres's connections at once, Redis's within ``timeout``."""
        if self.store is not None:
            self.store.terminate()
        try:
            async with asyncio.timeout(timeout):
                await self.hot.pipeline.aclose()
        finally:
            await self.client.aclose()

    async def close(self) -> None:
        """Close every client, each whatever the others did."""
        try:
            await self.hot.pipeline.aclose()
        finally:
            try:
                await self.client.aclose()
            finally:
                if self.store is not None:
                    await self.store.close()


async def _fold(journal: Journal, settings: Settings) -> None:
    """Fold back what a process left in the journal (whoever wrote it); a failure here is left to the flushers'
    passes, which fold it too."""
    try:
        await journal.replay_pending()
    except RETRYABLE as exc:
        metrics.BACKEND_ERRORS.labels("postgres", "replay").inc()
        log.warning("could not fold the journal back into Redis at start (%s); the flushers retry it",
                    redact_message(str(exc), settings.database_url))
