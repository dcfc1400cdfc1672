"""The peer clients a user could pick instead, each used raw as ``RawRedis`` uses redis-py: a session is one
JSON string, a write is SET with EX, a read is GET (plus the JSON decode). valkey-glide (its Rust core
multiplexes one connection) and coredis (pure Python, RESP3)."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any, Protocol
from urllib.parse import urlsplit

import coredis
import orjson
from glide import ExpirySet, ExpiryType, GlideClient, GlideClientConfiguration, NodeAddress

from .redis_py import RawRedis


class Peer(Protocol):
    name: str

    async def set_ex(self, key: str, value: bytes, seconds: int) -> None: ...

    async def get(self, key: str) -> bytes | None: ...


class Glide:
    name = "valkey-glide"

    def __init__(self, client: GlideClient) -> None:
        self.client = client

    async def set_ex(self, key: str, value: bytes, seconds: int) -> None:
        await self.client.set(key, value, expiry=ExpirySet(ExpiryType.SEC, seconds))

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(key)


class Coredis:
    name = "coredis"

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self.client = client

    async def set_ex(self, key: str, value: bytes, seconds: int) -> None:
        await self.client.set(key, value, ex=seconds)

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(key)


async def connect_peers(url: str, stack: AsyncExitStack) -> list[Peer]:
    """Both peers on the Redis at ``url`` (redis://host:port), closed with ``stack``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    glide = await GlideClient.create(GlideClientConfiguration([NodeAddress(host, port)]))
    stack.push_async_callback(glide.close)
    core: coredis.Redis[bytes] = coredis.Redis(host=host, port=port)
    await stack.enter_async_context(core)
    return [Glide(glide), Coredis(core)]


class PeerSessions:
    """``RawRedis``'s sessions (same keys, same JSON), written and read through a peer client."""

    def __init__(self, raw: RawRedis, peer: Peer) -> None:
        self.raw = raw
        self.peer = peer

    async def update_activity(self, session_id: str, duration_ms: int) -> None:
        session = self.raw.sessions[session_id]
        now = time.time()
        session["request_count"] += 1
        session["total_duration_ms"] += duration_ms
        session["last_activity"] = now
        session["expires_at"] = now + self.raw.ttl
        await self.peer.set_ex(self.raw.prefix + session_id, orjson.dumps(session), self.raw.ttl)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        raw = await self.peer.get(self.raw.prefix + session_id)
        return None if raw is None else orjson.loads(raw)
