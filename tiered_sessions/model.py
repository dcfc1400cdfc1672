"""The ``Session`` record that callers hold and the states it moves through."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Final

import orjson

from ._inflight import InflightLimit

ACTIVE: Final = "active"
CLOSED: Final = "closed"
EXPIRED: Final = "expired"
REMOVED: Final = "removed"
STATES: Final = (ACTIVE, CLOSED, EXPIRED, REMOVED)
DEFAULT_MAX_INFLIGHT: Final = 8  # the seed's default of EXAI_WS_SESSION_MAX_INFLIGHT


@dataclasses.dataclass(slots=True, weakref_slot=True, eq=False)
class Session:
    """One session as the manager last saw it in Redis.

    Times are POSIX seconds (floats), as in the in-memory managers this replaces. Within one process
    ``SessionManager.ensure`` and ``get`` return the same object for the same live id and refresh it in place.

    ``max_inflight``, ``sem`` and ``inflight`` are the process's own (never stored, not in ``to_dict``): ``sem``
    is a bounded semaphore of ``max_inflight`` permits (read when ``sem`` is first used) that a daemon holds
    around each request of the session, and ``inflight`` counts the permits out.
    """

    session_id: str
    created_at: float
    last_activity: float
    expires_at: float
    state: str = ACTIVE
    user_id: str | None = None
    user_type: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    request_count: int = 0
    total_duration_ms: int = 0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = 0
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    _limit: InflightLimit | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def closed(self) -> bool:
        return self.state != ACTIVE

    @property
    def sem(self) -> asyncio.BoundedSemaphore:
        if self._limit is None:
            self._limit = InflightLimit(self, self.max_inflight)
        return self._limit

    @property
    def inflight(self) -> int:
        """Permits of ``sem`` out now, in this process."""
        return 0 if self._limit is None else self._limit.held

    def is_expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``from_dict`` reverses it)."""
        out = {name: getattr(self, name) for name in _STORED}
        out["data"] = dict(self.data)
        out["metadata"] = dict(self.metadata)
        out["closed"] = self.closed
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Session:
        values = {key: value for key, value in raw.items() if key in _STORED or key == "max_inflight"}
        if "state" not in values and raw.get("closed"):
            values["state"] = CLOSED
        return cls(**values)

    def _refresh(self, other: Session) -> None:
        """Take ``other``'s stored values, keeping this object's identity (callers hold on to it) and its
        in-flight limit."""
        for name in _STORED:
            setattr(self, name, getattr(other, name))


# What a Session holds of the tier's data (the rest is the process's own: the in-flight limit).
_STORED: Final = tuple(f.name for f in dataclasses.fields(Session) if f.name not in ("max_inflight", "_limit"))


@dataclasses.dataclass(frozen=True, slots=True)
class ColdRecord:
    """One row as read from Postgres (JSON left as text until needed)."""

    session_id: str
    data_json: str
    state: str
    user_id: str | None
    user_type: str | None
    ip_address: str | None
    user_agent: str | None
    created_at: float
    last_activity: float
    expires_at: float
    request_count: int
    total_duration_ms: int
    metadata_json: str
    version: int

    @classmethod
    def from_row(cls, row: bytes) -> ColdRecord:
        """A row the flusher writes (JSON, as claim.lua builds it) as the record Postgres will hold."""
        r = orjson.loads(row)
        return cls(r["i"], orjson.dumps(r["d"]).decode(), r["s"], r.get("u"), r.get("ut"), r.get("ip"), r.get("ua"),
                   r["c"] / 1000, r["la"] / 1000, r["ex"] / 1000, r["rc"], r["td"], orjson.dumps(r["m"]).decode(),
                   r["v"])

    def is_live(self, now: float) -> bool:
        return self.state in ("active", "closed") and self.expires_at > now

    def to_session(self) -> Session:
        return Session(
            session_id=self.session_id, created_at=self.created_at, last_activity=self.last_activity,
            expires_at=self.expires_at, state=self.state, user_id=self.user_id, user_type=self.user_type,
            ip_address=self.ip_address, user_agent=self.user_agent, request_count=self.request_count,
            total_duration_ms=self.total_duration_ms, data=orjson.loads(self.data_json),
            metadata=orjson.loads(self.metadata_json), version=self.version,
        )
