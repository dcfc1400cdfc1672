"""The cookie that carries a session id: signed with itsdangerous's ``TimestampSigner`` (the id, never the
data), checked, and written as ``Set-Cookie`` values. No web framework is imported here.

Rules: the cookie is always ``HttpOnly``; ``Secure`` unless told otherwise; ``SameSite=None`` and
``Partitioned`` (CHIPS) need ``Secure``, as browsers require; a cookie that is missing, malformed, forged or
older than ``max_age`` reads as no session, never as an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple

from itsdangerous import BadSignature, TimestampSigner

from .._codec import validate_session_id
from ..errors import ConfigurationError, InvalidSessionId

log = logging.getLogger(__name__)

SecretKey = str | bytes | Sequence[str] | Sequence[bytes]
SameSite = Literal["lax", "strict", "none"]


class SignedId(NamedTuple):
    session_id: str
    signed_at: int  # POSIX seconds, when the cookie value was signed


class SessionCookie:
    """Signing, checking, and the ``Set-Cookie`` headers of the session cookie.

    ``secret_key`` may be a list (oldest first): the last one signs, all of them verify, so keys can be
    rotated without logging everyone out. ``max_age`` (seconds, or None for a cookie that ends with the
    browser session) is both the cookie's ``Max-Age`` and the oldest signature accepted.
    """

    def __init__(self, secret_key: SecretKey, *, name: str = "session", secure: bool = True,
                 samesite: SameSite = "lax", path: str = "/", domain: str | None = None,
                 max_age: int | None = None, partitioned: bool = False,
                 salt: str = "tiered_sessions.cookie") -> None:
        keys = [_as_bytes(key) for key in ([secret_key] if isinstance(secret_key, str | bytes) else secret_key)]
        if not keys or any(not key for key in keys):
            raise ConfigurationError("the session cookie needs a non-empty secret_key")
        if samesite not in ("lax", "strict", "none"):
            raise ConfigurationError(f"samesite must be 'lax', 'strict' or 'none', got {samesite!r}")
        if samesite == "none" and not secure:
            raise ConfigurationError("browsers drop SameSite=None cookies that are not Secure")
        if partitioned and not secure:
            raise ConfigurationError("browsers drop Partitioned cookies that are not Secure")
        check_max_age(max_age)
        for label, value in (("name", name), ("path", path), ("domain", domain or "")):
            if not isinstance(value, str) or any(c in value for c in ";,\r\n ") or (label == "name" and not value):
                raise ConfigurationError(f"cookie {label} {value!r} has characters a cookie cannot carry")
        self.signer = TimestampSigner(keys, salt=salt)
        self.name = name
        self.secure = secure
        self.samesite = samesite
        self.path = path
        self.domain = domain
        self.max_age = max_age
        self.partitioned = partitioned

    def sign(self, session_id: str) -> str:
        return self.signer.sign(session_id).decode()

    def read(self, value: str | None) -> SignedId | None:
        """The session id in a cookie value and when it was signed, or None when the value is missing,
        malformed, forged or too old."""
        if not value:
            return None
        try:
            raw, signed_at = self.signer.unsign(value, max_age=self.max_age, return_timestamp=True)
            return SignedId(validate_session_id(raw.decode()), int(signed_at.timestamp()))
        except (BadSignature, InvalidSessionId, UnicodeDecodeError) as exc:
            # Expected for tampered or stale cookies: the request goes on without a session.
            log.debug("ignoring session cookie: %s", type(exc).__name__)
            return None

    def session_id(self, value: str | None) -> str | None:
        """The session id in a cookie value, or None (see :meth:`read`)."""
        signed = self.read(value)
        return None if signed is None else signed.session_id

    def set_header(self, session_id: str, *, max_age: int | None = None) -> str:
        """A ``Set-Cookie`` value carrying this session id; ``max_age`` overrides the cookie's own."""
        max_age = self.max_age if max_age is None else max_age
        attributes = [f"{self.name}={self.sign(session_id)}"]
        if max_age is not None:
            attributes.append(f"Max-Age={max_age}")
        return "; ".join(attributes + self._flags())

    def expire_header(self) -> str:
        """A ``Set-Cookie`` value that deletes the cookie."""
        return "; ".join([f"{self.name}=", "Max-Age=0", "Expires=Thu, 01 Jan 1970 00:00:00 GMT", *self._flags()])

    def due_for_refresh(self, signed_at: int | None, now: float) -> bool:
        """True when a cookie signed at ``signed_at`` is past half its ``max_age``: sent again, it does not
        run out under a session that is still in use."""
        return self.max_age is not None and signed_at is not None and now - signed_at >= self.max_age / 2

    def _flags(self) -> list[str]:
        flags = [f"Path={self.path}"]
        if self.domain:
            flags.append(f"Domain={self.domain}")
        flags += ["HttpOnly", f"SameSite={self.samesite.capitalize()}"]
        if self.secure:
            flags.append("Secure")
        if self.partitioned:
            flags.append("Partitioned")
        return flags


def check_max_age(max_age: object) -> None:
    if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int) or max_age <= 0):
        raise ConfigurationError(f"max_age must be a positive number of seconds or None, got {max_age!r}")


def _as_bytes(key: object) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    raise ConfigurationError(f"a secret key is a str or bytes, got {type(key).__name__}")
