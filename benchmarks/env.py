"""What every scenario shares: the servers' URLs, a fresh schema, settings per table, the session payload,
seeding PostgreSQL with sessions, and wiping Redis between rounds."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from tiered_sessions import Session, SessionManager, Settings
from tiered_sessions.migrate import migrate

from .baselines import unnest

# The "small session" of every scenario: a few data keys and the usual attributes (no user agent: a real
# one is ~110 bytes; the memory scenario measures that case separately).
DATA: dict[str, Any] = {"theme": "dark", "lang": "en", "cart": [101, 202, 303]}
ATTRIBUTES: dict[str, str] = {"user_id": "user-12345", "user_type": "customer", "ip_address": "203.0.113.7"}
TIMEOUT_SECS = 3600.0
COLD_TTL_SECS = 86_400.0  # rows seeded into PostgreSQL stay live for a day, whatever the run's length


def new_session(manager: SessionManager, data: dict[str, Any] | None = None,
                attributes: dict[str, str] | None = None) -> Awaitable[Session]:
    """``manager.ensure()`` of a new session (random id) holding the payload."""
    given = ATTRIBUTES if attributes is None else attributes
    return manager.ensure(data=DATA if data is None else data, user_id=given.get("user_id"),
                          user_type=given.get("user_type"), ip_address=given.get("ip_address"),
                          user_agent=given.get("user_agent"))


def session_row(session_id: str, now: float, data: dict[str, Any] | None = None, version: int = 1
                ) -> tuple[Any, ...]:
    """A sessions-table row in the flusher's column order (see ``baselines.unnest.COLUMNS``)."""
    return (session_id, orjson.dumps(data if data is not None else DATA).decode(), "active",
            ATTRIBUTES["user_id"], ATTRIBUTES["user_type"], ATTRIBUTES["ip_address"], None,
            now, now, now + COLD_TTL_SECS, 0, 0, "{}", version)


@dataclasses.dataclass
class Env:
    redis_url: str
    database_url: str
    own_redis: bool          # we started this Redis: FLUSHALL is fine; otherwise delete only our keys
    rounds: int
    seconds: float
    quick: bool
    run_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(3))
    redis: Redis | None = None
    pg: asyncpg.Pool | None = None
    _migrated: set[str] = dataclasses.field(default_factory=set)
    _seeded: dict[int, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def schema(self) -> str:
        return f"bench_{self.run_id}"

    @property
    def warmup(self) -> float:
        return min(1.0, self.seconds / 5)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def key_prefix(self, name: str) -> str:
        return f"b{self.run_id}_{name}"[:32]

    def table(self, name: str) -> str:
        return f'"{self.schema}"."{name}"'

    async def start(self) -> None:
        self.redis = Redis.from_url(self.redis_url)
        self.pg = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await self.pg.close()
        if self.redis is not None:
            await self.wipe_redis()
            await self.redis.aclose()

    async def settings(self, table: str, **overrides: Any) -> Settings:
        """Settings for a manager on its own table (migrated on first use) and its own key prefix."""
        base = Settings(redis_url=self.redis_url, database_url=self.database_url, schema=self.schema,
                        table=table, key_prefix=self.key_prefix(table), max_concurrent_sessions=None,
                        session_timeout_secs=TIMEOUT_SECS, drain_timeout_secs=600.0)
        if table not in self._migrated:
            await migrate(base)
            self._migrated.add(table)
        return dataclasses.replace(base, **overrides)

    async def wipe_redis(self) -> None:
        assert self.redis is not None
        if self.own_redis:
            await self.redis.flushall()
            return
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=f"b{self.run_id}_*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            await self.redis.unlink(*batch)

    async def truncate(self, table: str) -> None:
        assert self.pg is not None
        await self.pg.execute(f"TRUNCATE {self.table(table)}")

    async def seeded(self, count: int) -> list[str]:
        """The table ``seeded``: ``count`` live sessions in PostgreSQL only (written once per run)."""
        if count not in self._seeded:
            await self.settings("seeded")
            await self.truncate("seeded")
            ids = [f"seed-{i:07d}" for i in range(count)]
            now = time.time()
            assert self.pg is not None
            async with self.pg.acquire() as proxy:
                connection: asyncpg.Connection = proxy  # type: ignore[assignment]
                for start in range(0, count, 1000):
                    await unnest.upsert(connection, self.table("seeded"),
                                        [session_row(sid, now) for sid in ids[start:start + 1000]])
                await connection.execute(f"ANALYZE {self.table('seeded')}")
            self._seeded = {count: ids}
        return self._seeded[count]
