"""Web middleware: the session from a signed cookie, saved when the response starts (only what changed).

- :mod:`tiered_sessions.middleware.asgi`: pure ASGI (Starlette, FastAPI, any ASGI app), a drop-in for
  Starlette's ``SessionMiddleware``. Extra: ``[asgi]``.
- :mod:`tiered_sessions.middleware.aiohttp`: aiohttp.web. Extra: ``[aiohttp]``.

Both need ``itsdangerous``; neither is imported by ``import tiered_sessions``.
"""

from .core import RequestSession, SessionCookie, WebSessions

__all__ = ["RequestSession", "SessionCookie", "WebSessions"]
