"""Session middleware for any ASGI app (Starlette, FastAPI, ...), with no dependency on a framework.

Replacing ``starlette.middleware.sessions.SessionMiddleware`` is an import change plus ``manager=``: the
session is ``request.session``, a dict, and Starlette's parameters are accepted under their names.

```python
from tiered_sessions.middleware.asgi import SessionMiddleware
app.add_middleware(SessionMiddleware, manager=manager, secret_key=["old-key", "current-key"])

async def login(request):
    request.session.rotate(user_id=user.id)  # fresh id when the response starts; the old one stops working
    request.session["user"] = user.name
async def logout(request):
    request.session.clear()                  # removed, cookie expired
```

The session is loaded before the app runs and saved when the app sends ``http.response.start``, so the
``Set-Cookie`` header rides on that message; if the app fails before responding, nothing is saved. Writes
after the response started raise ``SessionAlreadySaved``. A response whose request read or changed the
session (or that sets the cookie) gets ``Vary: Cookie``, so a shared cache does not serve it to someone else.
WebSocket connections see the session read-only (there is no response to carry a new cookie).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigurationError
from .core import SameSite, SecretKey, SessionCookie, WebSessions

if TYPE_CHECKING:
    from starlette.datastructures import Secret

    from ..manager import SessionManager

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FOURTEEN_DAYS = 14 * 24 * 60 * 60  # Starlette's default max_age
_T = TypeVar("_T")


class SessionMiddleware:
    """Puts the request's :class:`~tiered_sessions.middleware.core.RequestSession` in ``scope["session"]``
    (Starlette's ``request.session``) and ``scope["state"]["session"]`` (``request.state.session``).

    Starlette's parameters, under their names: ``session_cookie`` (the cookie's name, also ``cookie_name``),
    ``max_age`` (default 14 days; None makes a browser-session cookie; the server-side expiry applies
    either way), ``path``, ``same_site`` (also ``samesite``), ``https_only`` (also ``secure``; default True,
    unlike Starlette), ``domain`` and ``partitioned`` (CHIPS). ``secret_key`` may also be a list (oldest first)
    to rotate keys. ``sliding`` counts activity (``update_activity``, which slides the expiry) when a request
    finds its session more than ``touch_after`` seconds (default half the session timeout) past its last one.
    """

    def __init__(self, app: ASGIApp, *, manager: SessionManager, secret_key: SecretKey | Secret,
                 session_cookie: str | None = None, max_age: int | None = FOURTEEN_DAYS, path: str = "/",
                 same_site: SameSite | None = None, https_only: bool | None = None, domain: str | None = None,
                 partitioned: bool = False, cookie_name: str | None = None, secure: bool | None = None,
                 samesite: SameSite | None = None, sliding: bool = True, touch_after: float | None = None) -> None:
        self.app = app
        cookie = SessionCookie(_plain_keys(secret_key),
                               name=_either("session_cookie", session_cookie, "cookie_name", cookie_name, "session"),
                               secure=_either("https_only", https_only, "secure", secure, True),
                               samesite=_either("same_site", same_site, "samesite", samesite, "lax"),
                               path=path, domain=domain, max_age=max_age, partitioned=partitioned)
        self.sessions = WebSessions(manager, cookie, sliding=sliding, touch_after=touch_after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        values = list(_cookie_values(scope, self.sessions.cookie.name))
        if scope["type"] == "websocket":
            session = await self.sessions.load(values, read_only="the session is read-only in a WebSocket "
                                                                 "connection: there is no response to set a cookie")
            _expose(scope, session)
            await self.app(scope, receive, send)
            return
        session = await self.sessions.load(values)
        _expose(scope, session)

        async def send_saving(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = await self.sessions.save(session)
                headers = list(message.get("headers", ()))
                if header is not None:
                    headers.append((b"set-cookie", header.encode("latin-1")))
                if session.accessed or header is not None:
                    headers = _vary_by_cookie(headers)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_saving)


def _either(name: str, value: _T | None, alias: str, alias_value: _T | None, default: _T) -> _T:
    """One setting that has Starlette's name and ours: either may be given, or both if they agree."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ConfigurationError(f"{name}={value!r} and {alias}={alias_value!r} name the same setting: give one")
    return value if value is not None else alias_value if alias_value is not None else default


def _plain_keys(secret_key: SecretKey | Secret) -> SecretKey:
    """Starlette's ``Secret`` (``config("SECRET_KEY", cast=Secret)``) as the string it holds."""
    try:
        from starlette.datastructures import Secret
    except ImportError:  # no Starlette: keys are plain strings or bytes
        return secret_key  # type: ignore[return-value]
    if isinstance(secret_key, Secret):
        return str(secret_key)
    if isinstance(secret_key, Sequence) and not isinstance(secret_key, str | bytes):
        return [str(key) if isinstance(key, Secret) else key for key in secret_key]  # type: ignore[return-value]
    return secret_key


def _vary_by_cookie(headers: list[Any]) -> list[Any]:
    """The response headers with ``Cookie`` among the ``Vary`` values (added once, kept if there)."""
    for index, (name, value) in enumerate(headers):
        if bytes(name).lower() == b"vary":
            tokens = {token.strip().lower() for token in bytes(value).split(b",")}
            if not tokens & {b"cookie", b"*"}:
                headers[index] = (name, bytes(value) + b", Cookie")
            return headers
    return [*headers, (b"vary", b"Cookie")]


def _expose(scope: Scope, session: object) -> None:
    scope["session"] = session
    scope.setdefault("state", {})["session"] = session


def _cookie_values(scope: Scope, name: str) -> Iterator[str]:
    """Every value sent for this cookie name, in order (a browser may send one per matching path)."""
    for header, raw in scope.get("headers", ()):
        if header.lower() != b"cookie":
            continue
        for pair in raw.decode("latin-1").split(";"):
            key, sep, value = pair.partition("=")
            if sep and key.strip() == name:
                yield value.strip().strip('"')
