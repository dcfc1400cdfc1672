"""Session middleware for any ASGI app (Starlette, FastAPI, ...), with no dependency on a framework.

```python
app.add_middleware(SessionMiddleware, manager=manager, secret_key=["old-key", "current-key"])

async def login(request):
    session = request.state.session          # also request.scope["session"] (and Starlette's request.session)
    session.rotate(user_id=user.id)          # fresh id when the response starts; the old one stops working
    session["user"] = user.name
async def logout(request):
    request.state.session.delete()           # removed, cookie expired
```

The session is loaded before the app runs and saved when the app sends ``http.response.start``, so the
``Set-Cookie`` header rides on that message; if the app fails before responding, nothing is saved. Writes
after the response started raise ``SessionAlreadySaved``. WebSocket connections see the session read-only
(there is no response to carry a new cookie).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from .core import SameSite, SecretKey, SessionCookie, WebSessions

if TYPE_CHECKING:
    from ..manager import SessionManager

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SessionMiddleware:
    """Puts the request's :class:`~tiered_sessions.middleware.core.RequestSession` in ``scope["session"]``
    and ``scope["state"]["session"]`` (Starlette's ``request.state.session``).

    ``secure`` (default True) sends the cookie over HTTPS only; ``samesite`` is ``"lax"`` unless told;
    ``max_age`` None makes a browser-session cookie (the server-side expiry still applies). ``sliding``
    counts activity (``update_activity``, which slides the expiry) when a request finds its session more than
    ``touch_after`` seconds (default half the session timeout) past its last activity.
    """

    def __init__(self, app: ASGIApp, *, manager: SessionManager, secret_key: SecretKey,
                 cookie_name: str = "session", secure: bool = True, samesite: SameSite = "lax", path: str = "/",
                 domain: str | None = None, max_age: int | None = None, sliding: bool = True,
                 touch_after: float | None = None) -> None:
        self.app = app
        cookie = SessionCookie(secret_key, name=cookie_name, secure=secure, samesite=samesite, path=path,
                               domain=domain, max_age=max_age)
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
                if header is not None:
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (b"set-cookie", header.encode("latin-1"))]}
            await send(message)

        await self.app(scope, receive, send_saving)


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
