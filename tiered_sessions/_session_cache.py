"""One ``Session`` object per live id in this process: a call returns the object its callers already hold,
refreshed, so a session a request handler keeps sees what later calls changed, and every holder shares its
in-flight limit (``Session.sem``), which takes this manager's ``session_max_inflight``. Held weakly: an object
nobody holds (and whose semaphore has no permit out) is forgotten."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from . import _paths
from .model import ACTIVE, CLOSED, REMOVED, Session


class SessionCache:
    def __init__(self, max_inflight: int) -> None:
        self._held: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self._max_inflight = max_inflight

    def __bool__(self) -> bool:
        # The hot path asks this first: a miss in a WeakValueDictionary raises and catches a KeyError.
        return bool(self._held)

    def held(self, session_id: str) -> Session | None:
        return self._held.get(session_id)

    def adopt(self, fresh: Session) -> Session:
        """Refresh the object callers hold for this id, or hold ``fresh`` as it."""
        current = self._held.get(fresh.session_id)
        if current is None:
            fresh.max_inflight = self._max_inflight
            self._held[fresh.session_id] = fresh
            return fresh
        current._refresh(fresh)
        return current

    def forget(self, session_id: str) -> None:
        self._held.pop(session_id, None)

    def removed(self, session_id: str) -> None:
        session = self._held.pop(session_id, None)
        if session is not None:
            session.state = REMOVED

    def forget_expired(self, now: float) -> None:
        for session_id in [sid for sid, session in self._held.items() if session.is_expired(now)]:
            self._held.pop(session_id, None)

    def changed(self, session_id: str, version: int, data: Mapping[str, Any] | None,
                metadata: Mapping[str, Any] | None, edits: _paths.Edits, roots: dict[str, Any],
                attributes: Mapping[str, str | None], closed: bool | None) -> None:
        """Apply an update that reached the tier to the object callers hold (no read back)."""
        session = self._held.get(session_id)
        if session is None:
            return
        session.data.update(data or {})
        _paths.apply_locally(session.data, edits, roots)
        session.metadata.update(metadata or {})
        for name, value in attributes.items():
            if value is not None:
                setattr(session, name, value)
        if closed is not None:
            session.state = CLOSED if closed else ACTIVE
        session.version = version
