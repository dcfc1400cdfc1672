"""What the ASGI and aiohttp middlewares share: when to load a request's session and what to write when its
response starts. No web framework is imported here.

A request's session is loaded from the cookie (:mod:`._cookie`: it holds only the session id, signed) and
handed to the handler as a :class:`RequestSession`, a dict holding a copy of ``Session.data``. When the
response starts, only what changed is written: the top-level keys whose value differs from what was loaded
go to ``manager.update(id, set=changed, unset=deleted)``; nothing changed means nothing is written. A session
is created only when something is written to it, so anonymous visitors who only read cost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import SessionNotFound
from ._cookie import SameSite, SecretKey, SessionCookie, SignedId
from ._request_session import RequestSession

if TYPE_CHECKING:
    from ..manager import SessionManager

__all__ = ["RequestSession", "SameSite", "SecretKey", "SessionCookie", "WebSessions"]

log = logging.getLogger(__name__)


class WebSessions:
    """Loads a request's session from its cookie and saves it when the response starts."""

    def __init__(self, manager: SessionManager, cookie: SessionCookie, *, sliding: bool = True,
                 touch_after: float | None = None) -> None:
        self.manager = manager
        self.cookie = cookie
        self.sliding = sliding
        # Sliding expiry without a write per request: count activity only once the session is half used up.
        self.touch_after = manager.session_timeout_secs / 2 if touch_after is None else touch_after

    def touch_due(self, last_activity: float, now: float) -> bool:
        """Whether a request at ``now`` counts activity (``update_activity``, which slides the expiry)."""
        return self.sliding and now - last_activity >= self.touch_after

    async def load(self, cookie_values: Iterable[str], *, read_only: str | None = None) -> RequestSession:
        """The session the first validly signed cookie value names; no such value, or a session that is gone
        (removed, rotated away, expired), gives an empty, new one."""
        signed: SignedId | None = next((found for value in cookie_values if (found := self.cookie.read(value))), None)
        session = None if signed is None else await self.manager.get(signed.session_id)
        return RequestSession(session, read_only=read_only,
                              cookie_signed_at=None if signed is None else signed.signed_at)

    async def save(self, request_session: RequestSession) -> str | None:
        """Write what changed; returns the ``Set-Cookie`` value to send, or None to leave the cookie alone.

        Called once, when the response starts: later writes to the session raise ``SessionAlreadySaved``.
        With a ``max_age``, the cookie is sent again whenever the session is written or touched, or its
        signature is past half its age, so it does not run out under a session in use.
        """
        request_session.freeze("the session was saved when the response started; change it before that")
        changed, deleted = request_session.changes()
        loaded = request_session.session
        manager = self.manager
        if request_session._ended:
            if request_session._loaded is not None:
                await manager.remove(request_session._loaded.session_id)
            if not changed:
                presented = request_session._loaded is not None or request_session.cookie_signed_at is not None
                return self.cookie.expire_header() if presented else None
        if loaded is None:
            if not changed and request_session._user_id is None:
                return None  # nothing written: no session, no cookie
            created = await manager.ensure(user_id=request_session._user_id, data=changed)
            return self.cookie.set_header(created.session_id)
        session_id = loaded.session_id
        header: str | None = None
        now = time.time()
        try:
            if request_session._rotate:
                session_id = (await manager.rotate(session_id)).session_id
                header = self.cookie.set_header(session_id)
            written = bool(changed or deleted or request_session._user_id is not None)
            if written:
                await manager.update(session_id, set=changed or None, unset=deleted or None,
                                     user_id=request_session._user_id)
            touched = self.touch_due(loaded.last_activity, now)
            if touched:
                await manager.update_activity(session_id)
            if self.cookie.max_age is not None and (
                    written or touched or self.cookie.due_for_refresh(request_session.cookie_signed_at, now)):
                header = self.cookie.set_header(session_id)  # the cookie's own expiry slides with the session
        except SessionNotFound:
            # Ended by another request meanwhile (logout, login's rotation, expiry). Leave the cookie alone:
            # expiring it here could delete the new cookie that rotating request set.
            log.warning("a session ended while a request was changing it; that request's changes were dropped")
            return header
        return header
