"""Raw redis-py: a session is one JSON string; a write is SET with EX, a read is GET (plus the JSON decode)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis


def redis_client(url: str, max_connections: int = 64, timeout: float = 10.0) -> Redis:
    """The same client settings as SessionManager's: hiredis (when installed), a blocking pool of 64."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout,
                                           socket_timeout=timeout, socket_connect_timeout=timeout)
    return Redis.from_pool(pool)  # aclose() closes the pool's connections too


class RawRedis:
    def __init__(self, client: Redis, prefix: str, timeout_secs: float) -> None:
        self.client = client
        self.prefix = prefix + ":"
        self.ttl = int(timeout_secs)
        self.sessions: dict[str, dict[str, Any]] = {}  # this process's copy, as the in-memory managers keep

    def new_session(self, session_id: str, data: dict[str, Any], attributes: dict[str, str]) -> dict[str, Any]:
        now = time.time()
        session = {"session_id": session_id, "created_at": now, "last_activity": now, "state": "active",
                   "request_count": 0, "total_duration_ms": 0, "data": data, "metadata": {},
                   "expires_at": now + self.ttl, **attributes}
        self.sessions[session_id] = session
        return session

    async def create(self, data: dict[str, Any], attributes: dict[str, str], session_id: str | None = None
                     ) -> str:
        """A new session: SET NX EX (so an id collision never overwrites)."""
        sid = session_id or secrets.token_urlsafe(32)
        session = self.new_session(sid, data, attributes)
        await self.client.set(self.prefix + sid, orjson.dumps(session), ex=self.ttl, nx=True)
        return sid

    async def create_many(self, ids: Iterable[str], data: dict[str, Any], attributes: dict[str, str]) -> None:
        """Set-up only: many sessions in pipelined SETs."""
        pipe = self.client.pipeline(transaction=False)
        for sid in ids:
            pipe.set(self.prefix + sid, orjson.dumps(self.new_session(sid, data, attributes)), ex=self.ttl)
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()

    async def update_activity(self, session_id: str, duration_ms: int) -> None:
        session = self.sessions[session_id]
        now = time.time()
        session["request_count"] += 1
        session["total_duration_ms"] += duration_ms
        session["last_activity"] = now
        session["expires_at"] = now + self.ttl
        await self.client.set(self.prefix + session_id, orjson.dumps(session), ex=self.ttl)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        raw = await self.client.get(self.prefix + session_id)
        return None if raw is None else orjson.loads(raw)
