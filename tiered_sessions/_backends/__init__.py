"""Where a call is served: one interface, two implementations. ``RedisBackend`` serves every call from Redis
(reading a miss through from Postgres); ``PostgresBackend`` writes through to Postgres, journaled, while Redis
is unreachable (degraded mode). The manager validates and encodes a call once, picks the backend, and keeps
the ``Session`` objects callers hold up to date with what the backend returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from .. import _paths
from ..model import Session


@dataclasses.dataclass(frozen=True, slots=True)
class NewSession:
    """What ``ensure`` creates when the id is not live."""

    data: Mapping[str, Any]
    metadata: Mapping[str, Any]
    attributes: Mapping[str, str | None]  # user_id, user_type, ip_address, user_agent
    pairs: list[bytes | str]  # the hash fields to write, encoded
    size: int  # bytes of data and metadata as stored


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """What ``update`` applies."""

    data: Mapping[str, Any] | None
    metadata: Mapping[str, Any] | None
    edits: _paths.Edits  # set= and unset= paths
    documents: list[tuple[bytes, bytes]]  # data, metadata and top-level set= keys, encoded
    attributes: Mapping[str, str | None]
    encoded_attributes: list[bytes | str]
    closed: bool | None
    expected_version: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Census:
    """What ``get_session_metrics`` reports of the sessions (None: not known in this mode)."""

    mode: str  # "normal" or "degraded"
    total: int
    active: int
    ages: list[float] | None  # seconds since creation of each live session
    dirty: int | None
    flush_lag_seconds: float | None

    def as_metrics(self) -> dict[str, Any]:
        """Its part of ``get_session_metrics``: the seed's session keys, the backlog and the mode."""
        ages = self.ages
        return {
            "total_sessions": self.total,
            "active_sessions": self.active,
            "oldest_session_age": None if ages is None else max(ages, default=0.0),
            "newest_session_age": None if ages is None else min(ages, default=0.0),
            "avg_session_age": None if ages is None else sum(ages) / len(ages) if ages else 0.0,
            "dirty_sessions": self.dirty,
            "flush_lag_seconds": self.flush_lag_seconds,
            "mode": self.mode,
        }


class Backend(Protocol):
    async def ensure(self, session_id: str, fresh: bool, new: NewSession) -> tuple[Session, bool]:
        """The live session (or a new one); True if this call created it."""

    async def get(self, session_id: str) -> Session | None: ...

    async def touch(self, session_id: str, duration_ms: int, held: Session | None) -> bool:
        """Count a request; ``held`` (the object callers hold) gets the new counters."""

    async def update(self, session_id: str, change: Change) -> tuple[int, dict[str, Any]]:
        """The new version, and the new values of the nested paths' top-level keys."""

    async def remove(self, session_id: str) -> None: ...

    async def rotate(self, session_id: str) -> Session: ...

    async def user_sessions(self, user_id: str) -> list[Session]: ...

    async def census(self) -> Census: ...
