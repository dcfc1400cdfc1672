"""A small shop on aiohttp.web with sessions in tiered_sessions (Redis hot tier, PostgreSQL behind).

    pip install 'tiered-sessions[aiohttp]'
    TIERED_SESSIONS_REDIS_URL=redis://localhost:6379/0 TIERED_SESSIONS_DATABASE_URL=postgresql://... \
    SESSION_SECRET=change-me python -m examples.aiohttp_app

(INSECURE_COOKIES=1 drops the Secure flag, for plain http://localhost.)

The same endpoints as examples/starlette_app.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import web

from tiered_sessions import SessionManager
from tiered_sessions.middleware.aiohttp import SESSION_KEY, setup_sessions
from tiered_sessions.middleware.core import RequestSession


async def home(request: web.Request) -> web.Response:
    session = _session(request)  # only read: nothing is written, no cookie is set
    return web.json_response({"user": session.get("user"), "cart": session.get("cart", []),
                              "theme": session.get("theme")})


async def login(request: web.Request) -> web.Response:
    user = str((await request.json())["user"])  # a real app checks a password here
    session = _session(request)
    session.rotate(user_id=user)  # a fresh id at login: a planted (fixated) id is worthless
    session["user"] = user
    return web.json_response({"user": user})


async def logout(request: web.Request) -> web.Response:
    _session(request).delete()
    return web.json_response({"user": None})


async def add_to_cart(request: web.Request) -> web.Response:
    item = (await request.json())["item"]
    session = _session(request)
    session["cart"] = [*session.get("cart", []), item]  # only "cart" is written
    return web.json_response({"cart": session["cart"]})


async def set_theme(request: web.Request) -> web.Response:
    session = _session(request)
    session["theme"] = str((await request.json())["theme"])  # only "theme" is written
    return web.json_response({"theme": session["theme"]})


def create_app(manager: SessionManager, secret_key: str | list[str], *, secure: bool = True) -> web.Application:
    app = web.Application()
    setup_sessions(app, manager, secret_key, secure=secure)
    app.add_routes([web.get("/", home), web.post("/login", login), web.post("/logout", logout),
                    web.post("/cart", add_to_cart), web.post("/theme", set_theme)])
    return app


def _session(request: web.Request) -> RequestSession:
    return request[SESSION_KEY]


def main() -> None:
    manager = SessionManager()  # settings from TIERED_SESSIONS_* / REDIS_URL / DATABASE_URL
    app = create_app(manager, os.environ["SESSION_SECRET"], secure=os.environ.get("INSECURE_COOKIES") != "1")

    async def manage(_: web.Application) -> AsyncIterator[None]:
        async with manager:  # connects, and on shutdown drains what is dirty to PostgreSQL
            yield

    app.cleanup_ctx.append(manage)
    web.run_app(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))


if __name__ == "__main__":
    main()
