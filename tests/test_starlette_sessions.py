"""Starlette's own session middleware tests, run against tiered_sessions' SessionMiddleware.

Ported from encode/starlette ``tests/middleware/test_session.py`` as released in starlette 1.10.0 (the PyPI
sdist, ``starlette-1.10.0/tests/middleware/test_session.py``; that release's commit is not in our mirror, whose
newest commit, cb8f84f5284dc301ca7a31eb732b9e140769dd48 (0.47.3), has an older subset of these tests). Each
test keeps its upstream name. What changed, test by test, is said where it changed; what every test changes:

- The app gets ``manager=`` (sessions live in the test's real Redis and PostgreSQL) and the client is httpx's
  AsyncClient on an ASGITransport (Starlette's TestClient runs the app on an event loop of its own, which the
  manager's connections do not belong to).
- The client talks https unless the test is about http: our cookie is ``Secure`` unless ``https_only=False``
  (Starlette's is not), and an http client does not send a Secure cookie back.
- Cookie attribute names are compared case-insensitively (RFC 6265 5.2): we write ``Path=``, Starlette ``path=``.
- Apps are built by ``app_with(manager, *routes, **options)`` where upstream spells out ``Starlette(...)``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from tiered_sessions import SessionManager
from tiered_sessions.errors import ConfigurationError
from tiered_sessions.middleware.asgi import SessionMiddleware
from tiered_sessions.middleware.core import RequestSession

ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def test_client_factory() -> AsyncIterator[ClientFactory]:
    async with AsyncExitStack() as clients:
        def factory(app: Starlette, base_url: str = "https://testserver",
                    cookies: dict[str, str] | None = None) -> httpx.AsyncClient:
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url, cookies=cookies)
            clients.push_async_callback(client.aclose)
            return client

        yield factory


def view_session(request: Request) -> JSONResponse:
    return JSONResponse({"session": request.session})


async def update_session(request: Request) -> JSONResponse:
    data = await request.json()
    request.session.update(data)
    return JSONResponse({"session": request.session})


async def inplace_update_session(request: Request) -> JSONResponse:
    data = await request.json()
    session = request.session
    session |= data
    return JSONResponse({"session": request.session})


async def popitem_session(request: Request) -> JSONResponse:
    request.session.popitem()
    return JSONResponse({"session": request.session})


async def clear_session(request: Request) -> JSONResponse:
    request.session.clear()
    return JSONResponse({"session": request.session})


def no_session_access(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


VIEW = Route("/view_session", endpoint=view_session)
UPDATE = Route("/update_session", endpoint=update_session, methods=["POST"])
INPLACE_UPDATE = Route("/inplace_update_session", endpoint=inplace_update_session, methods=["POST"])
POPITEM = Route("/popitem_session", endpoint=popitem_session, methods=["POST"])
CLEAR = Route("/clear_session", endpoint=clear_session, methods=["POST"])
NO_SESSION = Route("/no_session", endpoint=no_session_access)


def sessions(manager: SessionManager, **options: Any) -> Middleware:
    return Middleware(SessionMiddleware, manager=manager, secret_key="example", **options)


def app_with(manager: SessionManager, *routes: Route, **options: Any) -> Starlette:
    """Upstream's ``Starlette(routes=[...], middleware=[Middleware(SessionMiddleware, ...)])``, with ``manager=``."""
    return Starlette(routes=list(routes), middleware=[sessions(manager, **options)])


async def test_session(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE, CLEAR)
    client = test_client_factory(app)

    response = await client.get("/view_session")
    assert response.json() == {"session": {}}

    response = await client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    # check cookie max-age
    set_cookie = response.headers["set-cookie"]
    max_age_matches = re.search(r"; Max-Age=([0-9]+);", set_cookie)
    assert max_age_matches is not None
    assert int(max_age_matches[1]) == 14 * 24 * 3600

    response = await client.get("/view_session")
    assert response.json() == {"session": {"some": "data"}}

    response = await client.post("/clear_session")
    assert response.json() == {"session": {}}

    response = await client.get("/view_session")
    assert response.json() == {"session": {}}


@pytest.mark.parametrize("partitioned", [False, True])
async def test_partitioned_session(test_client_factory: ClientFactory, manager: SessionManager,
                                   partitioned: bool) -> None:
    app = app_with(manager, UPDATE, CLEAR, https_only=True, same_site="none", partitioned=partitioned)
    client = test_client_factory(app, base_url="https://testserver")
    response = await client.post("/update_session", json={"some": "data"})
    attributes = response.headers["set-cookie"].lower().split("; ")
    assert ("partitioned" in attributes) is partitioned

    response = await client.post("/clear_session")
    attributes = response.headers["set-cookie"].lower().split("; ")
    assert ("partitioned" in attributes) is partitioned


async def test_session_expires(test_client_factory: ClientFactory, manager: SessionManager,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Upstream uses max_age=-1 to make every cookie too old at once; we refuse a max_age that is not positive
    # (see test_session_zero_max_age), so the cookie is signed 10 s in the past against a max_age of 5 s.
    app = app_with(manager, VIEW, UPDATE, max_age=5)
    client = test_client_factory(app)

    with monkeypatch.context() as clock:
        clock.setattr(TimestampSigner, "get_timestamp", lambda self: int(time.time()) - 10)
        response = await client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    # requests removes expired cookies from response.cookies, we need to
    # fetch session id from the headers and pass it explicitly
    expired_cookie_header = response.headers["set-cookie"]
    expired_session_match = re.search(r"session=([^;]*);", expired_cookie_header)
    assert expired_session_match is not None
    expired_session_value = expired_session_match[1]
    client = test_client_factory(app, cookies={"session": expired_session_value})
    response = await client.get("/view_session")
    assert response.json() == {"session": {}}


async def test_secure_session(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE, CLEAR, https_only=True)
    secure_client = test_client_factory(app, base_url="https://testserver")
    unsecure_client = test_client_factory(app, base_url="http://testserver")

    response = await unsecure_client.get("/view_session")
    assert response.json() == {"session": {}}

    response = await unsecure_client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    response = await unsecure_client.get("/view_session")
    assert response.json() == {"session": {}}

    response = await secure_client.get("/view_session")
    assert response.json() == {"session": {}}

    response = await secure_client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    response = await secure_client.get("/view_session")
    assert response.json() == {"session": {"some": "data"}}

    response = await secure_client.post("/clear_session")
    assert response.json() == {"session": {}}

    response = await secure_client.get("/view_session")
    assert response.json() == {"session": {}}


async def test_session_cookie_subpath(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    second_app = app_with(manager, UPDATE, path="/second_app")
    app = Starlette(routes=[Mount("/second_app", app=second_app)])
    client = test_client_factory(app, base_url="https://testserver/second_app")
    response = await client.post("/update_session", json={"some": "data"})
    assert response.status_code == 200
    cookie = response.headers["set-cookie"]
    cookie_path_match = re.search(r"; path=(\S+);", cookie, re.IGNORECASE)
    assert cookie_path_match is not None
    cookie_path = cookie_path_match.groups()[0]
    assert cookie_path == "/second_app"


async def test_invalid_session_cookie(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE)
    client = test_client_factory(app)

    response = await client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    # we expect it to not raise an exception if we provide a bogus session cookie
    client = test_client_factory(app, cookies={"session": "invalid"})
    response = await client.get("/view_session")
    assert response.json() == {"session": {}}


async def test_session_cookie(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE, max_age=None)
    client = test_client_factory(app)

    response = await client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    # check cookie max-age
    set_cookie = response.headers["set-cookie"]
    assert "Max-Age" not in set_cookie

    client.cookies.delete("session")
    response = await client.get("/view_session")
    assert response.json() == {"session": {}}


async def test_session_zero_max_age(manager: SessionManager) -> None:
    # Upstream sends "Max-Age=0" (a cookie the browser drops at once). A max_age that is not positive is a
    # configuration mistake here, refused when the middleware is built.
    for max_age in (0, -1):
        with pytest.raises(ConfigurationError, match="max_age"):
            SessionMiddleware(Starlette(), manager=manager, secret_key="example", max_age=max_age)


async def test_domain_cookie(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE, domain=".example.com")
    client = test_client_factory(app)

    response = await client.post("/update_session", json={"some": "data"})
    assert response.json() == {"session": {"some": "data"}}

    # check cookie max-age
    set_cookie = response.headers["set-cookie"]
    assert "domain=.example.com" in set_cookie.lower()

    client.cookies.delete("session")
    response = await client.get("/view_session")
    assert response.json() == {"session": {}}


async def test_set_cookie_only_on_modification(test_client_factory: ClientFactory,
                                               manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE)
    client = test_client_factory(app)

    # Write to session - should send Set-Cookie
    response = await client.post("/update_session", json={"some": "data"})
    assert "set-cookie" in response.headers

    # Read-only access - should NOT send Set-Cookie
    response = await client.get("/view_session")
    assert response.json() == {"session": {"some": "data"}}
    assert "set-cookie" not in response.headers


async def test_vary_cookie_on_access(test_client_factory: ClientFactory, manager: SessionManager) -> None:
    app = app_with(manager, VIEW, UPDATE, NO_SESSION)
    client = test_client_factory(app)

    # Modifying session should add Vary: Cookie
    response = await client.post("/update_session", json={"some": "data"})
    assert "cookie" in response.headers.get("vary", "").lower()

    # Reading a non-empty session should add Vary: Cookie
    response = await client.get("/view_session")
    assert "cookie" in response.headers.get("vary", "").lower()

    # Not accessing session at all should NOT add Vary: Cookie
    response = await client.get("/no_session")
    assert "cookie" not in response.headers.get("vary", "").lower()


async def test_session_tracks_modification(manager: SessionManager) -> None:
    # Upstream builds starlette's Session from a dict; ours is the session a request loaded from the tier.
    async def loaded(data: dict[str, str]) -> RequestSession:
        created = await manager.ensure(data=data)
        return RequestSession(await manager.get(created.session_id))

    session = await loaded({"a": "1", "b": "2"})
    assert not session.modified

    # __setitem__
    session["c"] = "3"
    assert session.modified

    # __delitem__
    session = await loaded({"a": "1"})
    del session["a"]
    assert session.modified

    # clear
    session = await loaded({"a": "1"})
    session.clear()
    assert session.modified

    # pop with existing key
    session = await loaded({"a": "1"})
    session.pop("a")
    assert session.modified
    assert session.accessed

    # pop with missing key
    session = await loaded({"a": "1"})
    session.pop("missing", None)
    assert not session.modified
    # Upstream: `not session.accessed`. Ours counts it as a read: what the request does next may depend on the
    # key being absent (a flash message popped), so the response must vary by cookie.
    assert session.accessed

    # setdefault with missing key
    session = await loaded({"a": "1"})
    session.setdefault("b", "2")
    assert session.modified

    # setdefault with existing key
    session = await loaded({"a": "1"})
    session.setdefault("a", "2")
    assert not session.modified


@pytest.mark.parametrize(
    ("path", "data", "expected"),
    [
        ("/inplace_update_session", {"c": "3"}, {"a": "1", "b": "2", "c": "3"}),
        ("/popitem_session", None, {"a": "1"}),
    ],
)
async def test_session_persists_mutations(
    test_client_factory: ClientFactory,
    manager: SessionManager,
    path: str,
    data: dict[str, str] | None,
    expected: dict[str, str],
) -> None:
    app = app_with(manager, VIEW, UPDATE, INPLACE_UPDATE, POPITEM)
    client = test_client_factory(app)

    response = await client.post("/update_session", json={"a": "1", "b": "2"})
    assert response.json() == {"session": {"a": "1", "b": "2"}}

    response = await client.post(path, json=data)
    assert response.json() == {"session": expected}

    response = await client.get("/view_session")
    assert response.json() == {"session": expected}
