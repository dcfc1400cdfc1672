"""The seed's cold-tier service over ``PostgresSessionStore``: code written against EX-AI's
``SupabaseSessionService`` (``save_session``, ``load_session``, ``list_sessions``, ``delete_session``,
``cleanup_expired_sessions``, ``update_session_activity``, ``get_session_service()``) runs unchanged.

Rules: the seed's payload fields ``state``, ``user_id``, ``user_type``, ``ip_address``, ``user_agent``,
``request_count`` and ``total_duration_ms`` move into their columns; ``session_data`` keeps the rest, and a
loaded row's ``session_data`` has them back from the columns (current, not as saved). The seed's states map to
ours (``inactive`` is ``closed``). Unlike the seed, errors raise (named, from ``tiered_sessions.errors``), a
delete is a tombstone, and only live sessions load."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from .cold_tier import PostgresSessionStore
from .config import Settings
from .errors import InvalidSessionData, PostgresUnavailable
from .model import ACTIVE, CLOSED, EXPIRED, Session

SEED_STATES = {"active": ACTIVE, "inactive": CLOSED, "expired": EXPIRED}  # the seed's name: ours
_SEED_NAME = {ours: seed for seed, ours in SEED_STATES.items()}
_ATTRIBUTES = ("user_id", "user_type", "ip_address", "user_agent")
_COUNTERS = ("request_count", "total_duration_ms")
MOVED = ("state", *_ATTRIBUTES, *_COUNTERS)  # payload keys that live in columns
_ABSENT = {"state": "active", "user_type": "human"}  # the seed's values for keys the payload lacks


class SupabaseSessionService:
    """``SupabaseSessionService()`` reads the tier's settings from the environment (``TIERED_SESSIONS_*``,
    ``DATABASE_URL``); pass a store to share one. Without a database URL it is not ``enabled`` and every call
    raises ``PostgresUnavailable``."""

    def __init__(self, store: PostgresSessionStore | None = None, *, settings: Settings | None = None) -> None:
        if store is None:
            settings = settings or Settings.from_env()
            store = PostgresSessionStore(settings=settings) if settings.database_url else None
        self._store = store

    @property
    def enabled(self) -> bool:
        return self._store is not None

    @property
    def store(self) -> PostgresSessionStore:
        if self._store is None:
            raise PostgresUnavailable("no PostgreSQL URL: set TIERED_SESSIONS_DATABASE_URL or DATABASE_URL")
        return self._store

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def save_session(self, session_id: str, session_data: Mapping[str, Any],
                           metadata: Mapping[str, Any] | None = None) -> bool:
        """Upsert the session: the payload's seed fields into their columns, the rest as ``session_data``."""
        if not isinstance(session_data, Mapping):
            raise InvalidSessionData(f"session_data must be a dict, got {type(session_data).__name__}")
        payload = dict(session_data)
        moved = {name: payload.pop(name, _ABSENT.get(name)) for name in MOVED}
        state = SEED_STATES.get(moved["state"])
        if state is None:
            raise InvalidSessionData(f"state must be one of {', '.join(SEED_STATES)}, got {moved['state']!r}")
        await self.store.save_session(
            session_id, payload, metadata, state=state, **{name: moved[name] for name in _ATTRIBUTES},
            request_count=moved["request_count"] or 0, total_duration_ms=moved["total_duration_ms"] or 0)
        return True

    async def load_session(self, session_id: str) -> dict[str, Any] | None:
        """The session's row as a dict (``session_state``, ``session_data``, ``user_id``, ...), or None if it
        does not exist, was deleted or has expired."""
        session = await self.store.load_session(session_id)
        return None if session is None else seed_row(session)

    async def update_session_activity(self, session_id: str, request_duration_ms: int | None = None) -> bool:
        """Count one request (atomically); False if the session is not live."""
        return await self.store.update_session_activity(session_id, request_duration_ms or 0)

    async def list_sessions(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` rows (deleted ones never), by id; ``state`` in the seed's names."""
        ours = None if state is None else SEED_STATES.get(state)
        if state is not None and ours is None:
            raise InvalidSessionData(f"state must be one of {', '.join(SEED_STATES)}, got {state!r}")
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(rows) < limit:
            page = await self.store.list_sessions(state=ours, limit=limit - len(rows), cursor=cursor)
            rows += [seed_row(session) for session in page if session.state in _SEED_NAME]
            cursor = page.next_cursor
            if cursor is None:
                break
        return rows

    async def delete_session(self, session_id: str) -> bool:
        """Delete (tombstone) the session; False if there was nothing to delete."""
        return await self.store.delete_session(session_id)

    async def cleanup_expired_sessions(self, older_than_days: int = 7) -> int:
        """Mark timed-out sessions expired and purge expired and deleted ones older than ``older_than_days``;
        returns how many rows were purged."""
        return await self.store.cleanup_expired_sessions(older_than_days)


def seed_row(session: Session) -> dict[str, Any]:
    """A session as the seed's service returned its row (times as ISO 8601 text, as Supabase sends them)."""
    state = _SEED_NAME.get(session.state, session.state)
    columns: dict[str, Any] = {"state": state, **{name: getattr(session, name) for name in _ATTRIBUTES + _COUNTERS}}
    return {
        "session_id": session.session_id, "session_data": {**session.data, **columns}, "session_state": state,
        **{name: columns[name] for name in _ATTRIBUTES + _COUNTERS},
        "created_at": _iso(session.created_at), "last_activity_at": _iso(session.last_activity),
        "expires_at": _iso(session.expires_at), "metadata": session.metadata, "version": session.version,
    }


def _iso(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat()


_service: SupabaseSessionService | None = None


def get_session_service() -> SupabaseSessionService:
    """The process's one service, configured from the environment on first use."""
    global _service
    if _service is None:
        _service = SupabaseSessionService()
    return _service


__all__ = ["SEED_STATES", "SupabaseSessionService", "get_session_service", "seed_row"]
