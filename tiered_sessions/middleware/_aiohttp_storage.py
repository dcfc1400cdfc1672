"""An aiohttp-session storage on the tier: an app that uses ``aiohttp_session`` switches with one line,
``setup(app, TieredStorage(manager, secret_key=...))``, and keeps ``get_session``, ``new_session``,
``session.invalidate()``, ``session.changed()``, ``session.new``, ``session.identity`` and ``max_age``.

Rules:

- The cookie carries the session id signed (:mod:`._cookie`), never the data; a forged, stale or unknown one
  gives a new session.
- Only what changed is written: the top-level keys whose value differs from what was loaded go to
  ``manager.update(set=..., unset=...)`` (:mod:`._changes`), so concurrent requests changing different keys
  both survive. aiohttp-session saves only sessions marked changed: an in-place edit of a nested value needs
  ``session.changed()``, as with any aiohttp-session storage.
- A session from ``new_session()`` gets a fresh id when it is saved, and the session the request's cookie
  named is removed (``manager.remove``): a login that calls ``new_session()`` leaves a planted (fixated) id
  worthless. ``invalidate()`` removes the session; keys set after it go into a new one, under a new id.
  A session emptied of every key ends, as it does with aiohttp-session's storages.
- Activity is counted (``update_activity``, which slides the expiry) when a request finds its session more
  than ``touch_after`` seconds (default half the session timeout) past its last activity; with a
  ``max_age``, that request sends the cookie again, as does one whose cookie is past half its age.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp_session import AbstractStorage, Session, SessionData

from ..errors import ConfigurationError, SessionNotFound
from ..manager import SessionManager
from ._aiohttp_headers import vary_by_cookie
from ._changes import Baseline, check_key
from .core import SameSite, SecretKey, SessionCookie, WebSessions

if TYPE_CHECKING:
    from .. import model

log = logging.getLogger(__name__)

# The id of the live session the request's cookie named, when load_session found one ("" when it found none).
_LOADED_ID = web.RequestKey("tiered_sessions.aiohttp_session.loaded_id", str)


class TieredSession(Session):
    """aiohttp-session's ``Session`` over a session of the tier: ``identity`` is its id (None until a new
    one is saved), ``created`` its creation time."""

    def __init__(self, loaded: model.Session | None, *, max_age: int | None) -> None:
        self.baseline = Baseline(loaded.data if loaded is not None else {})
        data: SessionData | None = None if loaded is None else {"created": int(loaded.created_at),
                                                                "session": self.baseline.copy()}
        # max_age=None here: aiohttp-session would drop data whose "created" is older than max_age, while the
        # tier's own expiry decides what is live. max_age stays the cookie's.
        super().__init__(None if loaded is None else loaded.session_id, data=data, new=loaded is None)
        self.max_age = max_age
        self.loaded = loaded
        self.ended = False

    def invalidate(self) -> None:
        super().invalidate()
        self.ended = True

    def set_new_identity(self, identity: Any) -> None:
        raise ConfigurationError("TieredStorage gives new sessions their ids (manager.ensure): "
                                 "set_new_identity is not supported")

    def __setitem__(self, key: str, value: Any) -> None:
        check_key(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        check_key(key)
        super().__delitem__(key)

    def changes(self) -> tuple[dict[str, Any], list[str]]:
        """(keys set to a new value, keys deleted) since the session was loaded."""
        return self.baseline.changes(self._mapping)


class TieredStorage(AbstractStorage):
    """Sessions in the tier for aiohttp-session: ``setup(app, TieredStorage(manager, secret_key=...))``.

    aiohttp-session's cookie options keep their names (``cookie_name``, ``domain``, ``max_age``, ``path``,
    ``secure``, ``httponly``, ``samesite``); ``secure`` defaults to True and ``samesite`` to ``"lax"``, and the
    cookie is always ``HttpOnly``. ``secret_key`` signs the cookie (a list, oldest first, rotates keys);
    ``partitioned`` adds CHIPS' ``Partitioned``. ``key_factory``, ``encoder`` and ``decoder`` have no
    counterpart: the manager makes the ids and stores the data as JSON.
    """

    def __init__(self, manager: SessionManager, *, secret_key: SecretKey, cookie_name: str = "AIOHTTP_SESSION",
                 domain: str | None = None, max_age: int | None = None, path: str = "/", secure: bool = True,
                 httponly: bool = True, samesite: str | None = "lax", partitioned: bool = False,
                 sliding: bool = True, touch_after: float | None = None) -> None:
        if not isinstance(manager, SessionManager):
            raise ConfigurationError(f"TieredStorage needs a SessionManager, got {type(manager).__name__}")
        if httponly is not True:
            raise ConfigurationError("the session cookie is always HttpOnly: scripts have no use for a signed id")
        same_site = "lax" if samesite is None else str(samesite).lower()
        super().__init__(cookie_name=cookie_name, domain=domain, max_age=max_age, path=path, secure=secure,
                         httponly=True, samesite=same_site)
        cookie = SessionCookie(secret_key, name=cookie_name, secure=secure, samesite=_same_site(same_site),
                               path=path, domain=domain, max_age=max_age, partitioned=partitioned)
        self.sessions = WebSessions(manager, cookie, sliding=sliding, touch_after=touch_after)

    async def new_session(self) -> Session:
        return TieredSession(None, max_age=self.max_age)

    async def load_session(self, request: web.Request) -> Session:
        signed = self.sessions.cookie.read(self.load_cookie(request))
        loaded = None if signed is None else await self.sessions.manager.get(signed.session_id)
        request[_LOADED_ID] = "" if loaded is None else loaded.session_id
        session = TieredSession(loaded, max_age=self.max_age)
        if loaded is not None and signed is not None:
            now = time.time()
            touched = self.sessions.touch_due(loaded.last_activity, now)
            if touched:
                await self.sessions.manager.update_activity(loaded.session_id)
            if self.max_age is not None and (touched or self.sessions.cookie.due_for_refresh(signed.signed_at, now)):
                session.changed()  # saved with nothing to write: the cookie is sent again
        return session

    async def save_session(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        if not isinstance(session, TieredSession):
            raise ConfigurationError(f"TieredStorage saves the sessions it made, got {type(session).__name__}")
        header = await self._write(request, session)
        if header is not None:
            response.headers.add("Set-Cookie", header)
        vary_by_cookie(response)

    async def _write(self, request: web.Request, session: TieredSession) -> str | None:
        """Write what the session asks for; the ``Set-Cookie`` value to send, or None."""
        manager, cookie = self.sessions.manager, self.sessions.cookie
        replaced = session.loaded.session_id if session.loaded is not None else self._cookie_session_id(request)
        if session.loaded is None or session.ended or session.empty:
            header = None
            if not session.empty:
                created = await manager.ensure(data=dict(session))
                header = cookie.set_header(created.session_id, max_age=session.max_age)
            elif replaced or self.load_cookie(request):
                header = cookie.expire_header()
            if replaced:
                await manager.remove(replaced)  # after the new one exists: a failed save logs nobody out
            return header
        changed, deleted = session.changes()
        try:
            if changed or deleted:
                await manager.update(replaced, set=changed or None, unset=deleted or None)
        except SessionNotFound:
            # Ended by another request meanwhile (logout, expiry): leave the cookie alone.
            log.warning("a session ended while a request was changing it; that request's changes were dropped")
            return None
        return cookie.set_header(replaced, max_age=session.max_age)  # sent on every save, as aiohttp-session does

    def _cookie_session_id(self, request: web.Request) -> str:
        """The live session the request's cookie named: the one load_session found, or, when the handler went
        straight to new_session(), whatever validly signed id the cookie holds."""
        if _LOADED_ID in request:
            return request[_LOADED_ID]
        signed = self.sessions.cookie.read(self.load_cookie(request))
        return "" if signed is None else signed.session_id


def _same_site(value: str) -> SameSite:
    """aiohttp-session takes any case ("Lax"); the cookie names it in lower case."""
    same_site: dict[str, SameSite] = {"lax": "lax", "strict": "strict", "none": "none"}
    if value not in same_site:
        raise ConfigurationError(f"samesite must be 'lax', 'strict' or 'none', got {value!r}")
    return same_site[value]
