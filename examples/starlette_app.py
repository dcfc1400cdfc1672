"""A small shop on Starlette with sessions in tiered_sessions (Redis hot tier, PostgreSQL behind).

    pip install 'tiered-sessions[asgi]' uvicorn
    TIERED_SESSIONS_REDIS_URL=redis://localhost:6379/0 TIERED_SESSIONS_DATABASE_URL=postgresql://... \
    SESSION_SECRET=change-me uvicorn --factory examples.starlette_app:app_from_env

(INSECURE_COOKIES=1 drops the Secure flag, for plain http://localhost.)

GET / shows the session; POST /cart {"item": ...} and POST /theme {"theme": ...} change one key each;
POST /login {"user": ...} rotates the session id; POST /logout ends the session.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Lifespan

from tiered_sessions import SessionManager
from tiered_sessions.middleware.asgi import SessionMiddleware
from tiered_sessions.middleware.core import RequestSession


def create_app(manager: SessionManager, secret_key: str | list[str], *, secure: bool = True,
               lifespan: Lifespan[Starlette] | None = None) -> Starlette:
    async def home(request: Request) -> JSONResponse:
        session = _session(request)  # only read: nothing is written, no cookie is set
        return JSONResponse({"user": session.get("user"), "cart": session.get("cart", []),
                             "theme": session.get("theme")})

    async def login(request: Request) -> JSONResponse:
        user = str((await request.json())["user"])  # a real app checks a password here
        session = _session(request)
        session.rotate(user_id=user)  # a fresh id at login: a planted (fixated) id is worthless
        session["user"] = user
        return JSONResponse({"user": user})

    async def logout(request: Request) -> JSONResponse:
        _session(request).delete()
        return JSONResponse({"user": None})

    async def add_to_cart(request: Request) -> JSONResponse:
        item = (await request.json())["item"]
        session = _session(request)
        session["cart"] = [*session.get("cart", []), item]  # only "cart" is written
        return JSONResponse({"cart": session["cart"]})

    async def set_theme(request: Request) -> JSONResponse:
        session = _session(request)
        session["theme"] = str((await request.json())["theme"])  # only "theme" is written
        return JSONResponse({"theme": session["theme"]})

    return Starlette(
        routes=[Route("/", home), Route("/login", login, methods=["POST"]),
                Route("/logout", logout, methods=["POST"]), Route("/cart", add_to_cart, methods=["POST"]),
                Route("/theme", set_theme, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, manager=manager, secret_key=secret_key, secure=secure)],
        lifespan=lifespan,
    )


def _session(request: Request) -> RequestSession:
    session = request.session  # a dict, as with Starlette's own middleware, plus rotate() and delete()
    assert isinstance(session, RequestSession)
    return session


def app_from_env() -> Starlette:
    manager = SessionManager()  # settings from TIERED_SESSIONS_* / REDIS_URL / DATABASE_URL

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with manager:  # connects, and on shutdown drains what is dirty to PostgreSQL
            yield

    return create_app(manager, os.environ["SESSION_SECRET"], secure=os.environ.get("INSECURE_COOKIES") != "1",
                      lifespan=lifespan)
