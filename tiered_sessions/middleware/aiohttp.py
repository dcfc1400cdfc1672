"""Sessions for aiohttp.web: a storage for aiohttp-session, and a middleware of our own.

An app on aiohttp-session switches with one line (:class:`TieredStorage`, see its module):

```python
aiohttp_session.setup(app, TieredStorage(manager, secret_key="current-key"))
```

``setup_sessions`` is the middleware of our own: the session is a dict (a ``RequestSession``) that also
rotates with its data kept and files the session under a user (``rotate(user_id=...)``), saves for
streaming responses, and counts in-place edits of nested values without ``changed()``.

```python
app = web.Application()
setup_sessions(app, manager, secret_key="current-key", secure=True)

async def login(request):
    session = request[SESSION_KEY]           # a dict (RequestSession)
    session.rotate(user_id=user.id)          # fresh id when the response starts; the old one stops working
    session["user"] = user.name
    raise web.HTTPFound("/")                 # raised HTTP responses save the session too
async def logout(request):
    request[SESSION_KEY].delete()            # removed, cookie expired
```

The session is saved once, when the response is about to start: after the handler returns (or raises an
``HTTPException``), or when a streaming handler calls ``response.prepare()``. A handler that fails with any
other exception saves nothing. Writes after the save raise ``SessionAlreadySaved``. A response whose request
read or changed the session (or that sets the cookie) gets ``Vary: Cookie``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..errors import SessionAlreadySaved
from ._aiohttp_headers import vary_by_cookie
from ._aiohttp_storage import TieredSession, TieredStorage
from .core import RequestSession, SameSite, SecretKey, SessionCookie, WebSessions

if TYPE_CHECKING:
    from ..manager import SessionManager

__all__ = ["SESSION_KEY", "TieredSession", "TieredStorage", "session_middleware", "setup_sessions"]

SESSION_KEY = web.RequestKey("tiered_sessions.session", RequestSession)


def setup_sessions(app: web.Application, manager: SessionManager, secret_key: SecretKey, *,
                   cookie_name: str = "session", secure: bool = True, samesite: SameSite = "lax", path: str = "/",
                   domain: str | None = None, max_age: int | None = None, partitioned: bool = False,
                   sliding: bool = True, touch_after: float | None = None) -> WebSessions:
    """Install the middleware and the response hook on ``app`` (before it starts). Options as for
    :class:`tiered_sessions.middleware.asgi.SessionMiddleware`."""
    cookie = SessionCookie(secret_key, name=cookie_name, secure=secure, samesite=samesite, path=path,
                           domain=domain, max_age=max_age, partitioned=partitioned)
    sessions = WebSessions(manager, cookie, sliding=sliding, touch_after=touch_after)
    app.middlewares.append(session_middleware(sessions))

    async def save_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        # Still writable here only when a streaming handler prepares its own response: the middleware saved
        # every other one already, and froze the session of a failed handler (its error page saves nothing).
        session = request.get(SESSION_KEY)
        if session is not None and session.writable:
            await _save(sessions, session, response, headers_sent=False)

    app.on_response_prepare.append(save_on_prepare)
    return sessions


def session_middleware(sessions: WebSessions) -> Middleware:
    """The middleware alone (``setup_sessions`` also saves for streaming handlers)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        session = await sessions.load([request.cookies[sessions.cookie.name]]
                                      if sessions.cookie.name in request.cookies else [])
        request[SESSION_KEY] = session
        try:
            response = await handler(request)
        except web.HTTPException as raised:
            await _save(sessions, session, raised, headers_sent=raised.prepared)
            raise
        except BaseException:
            session.freeze("the handler failed: its session changes were not saved")
            raise
        await _save(sessions, session, response, headers_sent=response.prepared)
        return response

    return middleware


async def _save(sessions: WebSessions, session: RequestSession, response: web.StreamResponse, *,
                headers_sent: bool) -> None:
    if not session.writable:
        return  # saved already, when a streaming handler prepared its response
    header = await sessions.save(session)
    if (session.accessed or header is not None) and not headers_sent:
        vary_by_cookie(response)
    if header is None:
        return
    if headers_sent:
        # Only without setup_sessions()'s hook: the headers are gone, and with them the new cookie.
        raise SessionAlreadySaved("the response started before the session was saved, so its cookie could not "
                                  "be set: install the middleware with setup_sessions()")
    response.headers.add("Set-Cookie", header)

