"""What the ASGI and aiohttp middlewares share: the signed cookie, the per-request session view, and when to
write. No web framework is imported here.

A request's session is loaded from the cookie (it holds only the session id, signed with itsdangerous's
``TimestampSigner``) and handed to the handler as a :class:`RequestSession`, a mutable mapping over a copy of
``Session.data``. When the response starts, only what changed is written: the top-level keys whose value
differs from what was loaded go to ``manager.update(id, set=changed, unset=deleted)``; nothing changed means
nothing is written. A session is created only when something is written to it, so anonymous visitors who
only read cost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson
from itsdangerous import BadSignature, TimestampSigner

from .._codec import validate_session_id
from ..errors import ConfigurationError, InvalidSessionData, InvalidSessionId, SessionAlreadySaved, SessionNotFound

if TYPE_CHECKING:
    from ..manager import SessionManager
    from ..model import Session

log = logging.getLogger(__name__)

SecretKey = str | bytes | Sequence[str] | Sequence[bytes]
SameSite = Literal["lax", "strict", "none"]


class SessionCookie:
    """The cookie that carries the session id: signing, checking, and its ``Set-Cookie`` headers.

    ``secret_key`` may be a list (oldest first): the last one signs, all of them verify, so keys can be
    rotated without logging everyone out. A missing, malformed, forged or (with ``max_age``) too old cookie
    reads as no session, never as an error.
    """

    def __init__(self, secret_key: SecretKey, *, name: str = "session", secure: bool = True,
                 samesite: SameSite = "lax", path: str = "/", domain: str | None = None,
                 max_age: int | None = None, salt: str = "tiered_sessions.cookie") -> None:
        keys = [_as_bytes(key) for key in ([secret_key] if isinstance(secret_key, str | bytes) else secret_key)]
        if not keys or any(not key for key in keys):
            raise ConfigurationError("the session cookie needs a non-empty secret_key")
        if samesite not in ("lax", "strict", "none"):
            raise ConfigurationError(f"samesite must be 'lax', 'strict' or 'none', got {samesite!r}")
        if samesite == "none" and not secure:
            raise ConfigurationError("browsers drop SameSite=None cookies that are not Secure")
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int) or max_age <= 0):
            raise ConfigurationError(f"max_age must be a positive number of seconds or None, got {max_age!r}")
        for label, value in (("name", name), ("path", path), ("domain", domain or "")):
            if any(c in value for c in ";,\r\n ") or (label == "name" and not value):
                raise ConfigurationError(f"cookie {label} {value!r} has characters a cookie cannot carry")
        self.signer = TimestampSigner(keys, salt=salt)
        self.name = name
        self.secure = secure
        self.samesite = samesite
        self.path = path
        self.domain = domain
        self.max_age = max_age

    def sign(self, session_id: str) -> str:
        return self.signer.sign(session_id).decode()

    def session_id(self, value: str | None) -> str | None:
        """The session id in a cookie value, or None when it is missing, malformed, forged or too old."""
        if not value:
            return None
        try:
            return validate_session_id(self.signer.unsign(value, max_age=self.max_age).decode())
        except (BadSignature, InvalidSessionId, UnicodeDecodeError) as exc:
            # Expected for tampered or stale cookies: the request goes on without a session.
            log.debug("ignoring session cookie: %s", exc)
            return None

    def set_header(self, session_id: str) -> str:
        """A ``Set-Cookie`` value carrying this session id."""
        attributes = [f"{self.name}={self.sign(session_id)}"]
        if self.max_age is not None:
            attributes.append(f"Max-Age={self.max_age}")
        return "; ".join(attributes + self._flags())

    def expire_header(self) -> str:
        """A ``Set-Cookie`` value that deletes the cookie."""
        return "; ".join([f"{self.name}=", "Max-Age=0", "Expires=Thu, 01 Jan 1970 00:00:00 GMT", *self._flags()])

    def _flags(self) -> list[str]:
        flags = [f"Path={self.path}"]
        if self.domain:
            flags.append(f"Domain={self.domain}")
        flags += ["HttpOnly", f"SameSite={self.samesite.capitalize()}"]
        if self.secure:
            flags.append("Secure")
        return flags


class RequestSession(MutableMapping[str, Any]):
    """A request's view of its session's ``data``: read and write it like a dict.

    Changes are written when the response starts; what changed is found by comparing each top-level key
    with what was loaded, so mutating a nested value in place (``session["cart"].append(3)``) counts too.
    Keys are top-level names: dots are refused, because ``update(set=...)`` reads them as nested paths.

    - ``rotate(user_id=None)``: at login. When the response starts, the session moves to a fresh id
      (``manager.rotate``: the old id never works again) and the cookie follows; ``user_id`` also files
      the session under that user (``list_user_sessions``, ``revoke_user_sessions``).
    - ``delete()`` (or ``clear()``): at logout. The session is removed (``manager.remove``) and the cookie
      expired. Keys written after ``delete()`` go into a new session.
    """

    def __init__(self, session: Session | None, *, read_only: str | None = None) -> None:
        self._loaded = session
        self._baseline: dict[str, bytes] = {}
        for key, value in (session.data if session is not None else {}).items():
            self._baseline[key] = _dump(value)
        # A deep copy: the manager hands every request of this process the same Session object.
        self._data: dict[str, Any] = {key: orjson.loads(raw) for key, raw in self._baseline.items()}
        self._rotate = False
        self._user_id: str | None = None
        self._ended = False
        self._frozen = read_only

    # -- what the handler sees ------------------------------------------------------------------------
    @property
    def id(self) -> str | None:
        """The session id as loaded (None for a visitor without a session yet, or after ``delete()``)."""
        return None if self._loaded is None or self._ended else self._loaded.session_id

    @property
    def session(self) -> Session | None:
        """The ``Session`` as loaded (attributes, counters, version), or None."""
        return None if self._ended else self._loaded

    @property
    def is_new(self) -> bool:
        return self.id is None

    def rotate(self, *, user_id: str | None = None) -> None:
        """Move the session to a fresh id when the response starts (call it at login)."""
        self._check_writable()
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidSessionData("user_id must be a string")
        self._rotate = True
        self._user_id = user_id if user_id is not None else self._user_id

    def delete(self) -> None:
        """End the session when the response starts (call it at logout)."""
        self._check_writable()
        self._ended = True
        self._baseline = {}
        self._data = {}
        self._rotate = False
        self._user_id = None

    def clear(self) -> None:
        """Same as ``delete()``: an emptied session is ended, not kept empty."""
        self.delete()

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_writable()
        _check_key(key)
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        self._check_writable()
        _check_key(key)
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"RequestSession(id={self.id!r}, data={self._data!r})"

    # -- what the middleware uses -----------------------------------------------------------------------
    def changes(self) -> tuple[dict[str, Any], list[str]]:
        """(keys set to a new value, keys deleted) since the session was loaded (or deleted)."""
        changed = {key: value for key, value in self._data.items() if not _unchanged(self._baseline.get(key), value)}
        return changed, [key for key in self._baseline if key not in self._data]

    @property
    def writable(self) -> bool:
        """False once saved (and in a WebSocket connection): writes would raise ``SessionAlreadySaved``."""
        return self._frozen is None

    def freeze(self, reason: str) -> None:
        self._frozen = reason

    def _check_writable(self) -> None:
        if self._frozen is not None:
            raise SessionAlreadySaved(self._frozen)


class WebSessions:
    """Loads a request's session from its cookie and saves it when the response starts."""

    def __init__(self, manager: SessionManager, cookie: SessionCookie, *, sliding: bool = True,
                 touch_after: float | None = None) -> None:
        self.manager = manager
        self.cookie = cookie
        self.sliding = sliding
        # Sliding expiry without a write per request: count activity only once the session is half used up.
        self.touch_after = manager.session_timeout_secs / 2 if touch_after is None else touch_after

    async def load(self, cookie_values: Iterable[str], *, read_only: str | None = None) -> RequestSession:
        """The session the first validly signed cookie value names; no such value, or a session that is gone
        (removed, rotated away, expired), gives an empty, new one."""
        session_id = next((sid for value in cookie_values if (sid := self.cookie.session_id(value))), None)
        session = None if session_id is None else await self.manager.get(session_id)
        return RequestSession(session, read_only=read_only)

    async def save(self, request_session: RequestSession) -> str | None:
        """Write what changed; returns the ``Set-Cookie`` value to send, or None to leave the cookie alone.

        Called once, when the response starts: later writes to the session raise ``SessionAlreadySaved``.
        """
        request_session.freeze("the session was saved when the response started; change it before that")
        changed, deleted = request_session.changes()
        loaded = request_session.session
        manager = self.manager
        if request_session._ended:
            if request_session._loaded is not None:
                await manager.remove(request_session._loaded.session_id)
            if not changed:
                return self.cookie.expire_header()
        if loaded is None:
            if not changed and request_session._user_id is None:
                return None  # nothing written: no session, no cookie
            created = await manager.ensure(user_id=request_session._user_id, data=changed)
            return self.cookie.set_header(created.session_id)
        session_id = loaded.session_id
        header: str | None = None
        try:
            if request_session._rotate:
                session_id = (await manager.rotate(session_id)).session_id
                header = self.cookie.set_header(session_id)
            if changed or deleted or request_session._user_id is not None:
                await manager.update(session_id, set=changed or None, unset=deleted or None,
                                     user_id=request_session._user_id)
            if self.sliding and time.time() - loaded.last_activity >= self.touch_after:
                await manager.update_activity(session_id)
                if self.cookie.max_age is not None:
                    header = self.cookie.set_header(session_id)  # slide the cookie's own expiry too
        except SessionNotFound:
            # Ended by another request meanwhile (logout, login's rotation, expiry). Leave the cookie alone:
            # expiring it here could delete the new cookie that rotating request set.
            log.warning("session %s ended while a request was changing it; that request's changes were dropped",
                        session_id)
            return header
        return header


def _as_bytes(key: object) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    raise ConfigurationError(f"a secret key is a str or bytes, got {type(key).__name__}")


def _dump(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _unchanged(baseline: bytes | None, value: Any) -> bool:
    if baseline is None:
        return False
    try:
        return baseline == _dump(value)
    except orjson.JSONEncodeError:
        return False  # not JSON: counted as changed, and the write raises InvalidSessionData with the details


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key or "." in key:
        raise InvalidSessionData(f"session keys are non-empty strings without dots, got {key!r}")
