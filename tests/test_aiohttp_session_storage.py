"""aiohttp-session's own storage tests, run against TieredStorage under aiohttp-session's middleware.

Ported from aio-libs/aiohttp-session at c8bd0904e9ce85c40178d45cd36cb9a2867d65d1 (aiohttp-session 2.12.1):

- ``tests/test_redis_storage.py``: every test that applies (the others are listed in README with the reason);
- ``tests/test_get_session.py``: ``test_get_new_session``, the one that asks a storage for a new session (the
  rest test aiohttp-session without a storage, or with a storage that misbehaves);
- ``tests/test_http_exception.py`` and ``tests/test_response_types.py``: ``test_exceptions`` and
  ``test_stream_response``, which save (or rightly do not save) through the storage;
- ``tests/test_path_domain.py``: every test.

Each test keeps its upstream name. What every test changes: the storage is ``TieredStorage`` on the test's
real Redis and PostgreSQL; a session is planted with ``manager.ensure`` and a signed id in the cookie jar
(``make_cookie``) instead of a JSON value under a Redis key or in the cookie, and read back with
``manager.get`` (``load_cookie``); the cookie is not ``Secure`` (``secure=False``) because the test server is
plain http; ``aiohttp_client`` is a local fixture (pytest-aiohttp's, on aiohttp's own TestClient).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from http import cookies
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from aiohttp.typedefs import Handler
from aiohttp_session import (
    SESSION_KEY,
    STORAGE_KEY,
    Session,
    get_session,
    new_session,
    session_middleware,
)

from tiered_sessions import SessionManager
from tiered_sessions.errors import ConfigurationError, InvalidSessionData
from tiered_sessions.middleware.aiohttp import TieredStorage
from tiered_sessions.middleware.core import SessionCookie

# aiohttp-session keeps its own things on the request under str keys, which aiohttp warns about (ours are
# typed keys: pyproject.toml turns a warning from tiered_sessions into an error).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning:aiohttp_session")

SECRET = "test-secret-key"
COOKIE = SessionCookie(SECRET)
AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def aiohttp_client() -> AsyncIterator[AiohttpClient]:
    async with AsyncExitStack() as clients:
        async def client_for(app: web.Application) -> TestClient[web.Request, web.Application]:
            return await clients.enter_async_context(TestClient(TestServer(app)))

        yield client_for


def storage(manager: SessionManager, **options: Any) -> TieredStorage:
    return TieredStorage(manager, secret_key=SECRET, secure=False, **options)


def create_app(handler: Handler, manager: SessionManager, max_age: int | None = None) -> web.Application:
    middleware = session_middleware(storage(manager, max_age=max_age))
    app = web.Application(middlewares=[middleware])
    app.router.add_route("GET", "/", handler)
    return app


async def make_cookie(client: TestClient[web.Request, web.Application], manager: SessionManager,
                      data: dict[Any, Any]) -> str:
    session = await manager.ensure(data=data)
    client.session.cookie_jar.update_cookies({"AIOHTTP_SESSION": COOKIE.sign(session.session_id)})
    return session.session_id


def cookie_session_id(client: TestClient[web.Request, web.Application]) -> str | None:
    cookies_ = client.session.cookie_jar.filter_cookies(client.make_url("/"))
    return COOKIE.session_id(cookies_["AIOHTTP_SESSION"].value)


async def load_cookie(client: TestClient[web.Request, web.Application], manager: SessionManager) -> Any:
    """The session the cookie names, as upstream's Redis value: {"session": data, "created": ...}, or None."""
    session_id = cookie_session_id(client)
    session = None if session_id is None else await manager.get(session_id)
    return None if session is None else {"session": session.data, "created": int(session.created_at)}


def assert_stored(value: Any, expected: dict[str, Any]) -> None:
    """Upstream's checks of a stored session, written once: "session" and "created" are there, and each
    expected key holds its value."""
    assert "session" in value
    assert "created" in value
    for key, item in expected.items():
        assert key in value["session"]
        assert value["session"][key] == item


def assert_flags(morsel: cookies.Morsel[str], path: str = "/", domain: str | None = None) -> None:
    assert morsel["httponly"]
    assert morsel["path"] == path
    if domain is not None:
        assert morsel["domain"] == domain


async def invalidate(request: web.Request) -> web.StreamResponse:
    session = await get_session(request)
    session.invalidate()
    return web.Response(body=b"OK")


# -- tests/test_redis_storage.py -------------------------------------------------------------------------------


async def new_and_empty(request: web.Request) -> web.StreamResponse:
    """Upstream's handler of test_create_new_session (test_load_bad_session's, as adapted here)."""
    session = await get_session(request)
    assert isinstance(session, Session)
    assert session.new
    assert not session._changed
    assert cast(MutableMapping[str, Any], {}) == session
    return web.Response(body=b"OK")


async def test_create_new_session(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    client = await aiohttp_client(create_app(new_and_empty, manager))
    resp = await client.get("/")
    assert resp.status == 200


async def test_load_existing_session(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        assert isinstance(session, Session)
        assert not session.new
        assert not session._changed
        assert cast(MutableMapping[str, Any], {"a": 1, "b": 12}) == session
        return web.Response(body=b"OK")

    client = await aiohttp_client(create_app(handler, manager))
    await make_cookie(client, manager, {"a": 1, "b": 12})
    resp = await client.get("/")
    assert resp.status == 200


async def test_load_bad_session(aiohttp_client: AiohttpClient, manager: SessionManager,
                                redis: aioredis.Redis) -> None:
    # Upstream stores "" under the session's Redis key, which its decoder cannot read. The tier checks what it
    # stores, so the bad value here is the nearest one: a key where the session's hash belongs that holds a
    # string, written behind the tier's back. Upstream then serves an empty session under the old identity
    # (`not session.new`); ours is a new one, with a new id if something is written.
    client = await aiohttp_client(create_app(new_and_empty, manager))
    session_id = uuid.uuid4().hex
    await redis.set((await manager.dead_letters()).hot.keys(session_id).session, "")
    client.session.cookie_jar.update_cookies({"AIOHTTP_SESSION": COOKIE.sign(session_id)})
    resp = await client.get("/")
    assert resp.status == 200


async def test_change_session(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["c"] = 3
        return web.Response(body=b"OK")

    client = await aiohttp_client(create_app(handler, manager))
    await make_cookie(client, manager, {"a": 1, "b": 2})
    resp = await client.get("/")
    assert resp.status == 200

    value = await load_cookie(client, manager)
    assert_stored(value, {"a": 1, "b": 2, "c": 3})
    assert_flags(resp.cookies["AIOHTTP_SESSION"])


async def test_clear_cookie_on_session_invalidation(aiohttp_client: AiohttpClient,
                                                    manager: SessionManager) -> None:
    client = await aiohttp_client(create_app(invalidate, manager))
    session_id = await make_cookie(client, manager, {"a": 1, "b": 2})
    resp = await client.get("/")
    assert resp.status == 200

    # Upstream reads {} under the old key; here the session is gone (removed, in both tiers).
    assert await manager.get(session_id) is None
    morsel = resp.cookies["AIOHTTP_SESSION"]
    assert morsel["path"] == "/"
    assert morsel["expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert morsel["max-age"] == "0"


async def test_create_cookie_in_handler(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["a"] = 1
        session["b"] = 2
        return web.Response(body=b"OK", headers={"HOST": "example.com"})

    client = await aiohttp_client(create_app(handler, manager))
    resp = await client.get("/")
    assert resp.status == 200

    value = await load_cookie(client, manager)
    assert_stored(value, {"a": 1, "b": 2})
    morsel = resp.cookies["AIOHTTP_SESSION"]
    assert_flags(morsel)
    session_id = COOKIE.session_id(morsel.value)
    assert session_id is not None
    exists = await manager.get(session_id)
    assert exists


async def test_set_ttl_on_session_saving(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    # Upstream checks the Redis key's TTL. The tier owns its keys' expiry (none while a session waits for its
    # flush, then the session's own); max_age is the cookie's, so that is what is checked.
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["a"] = 1
        return web.Response(body=b"OK")

    client = await aiohttp_client(create_app(handler, manager, max_age=10))
    resp = await client.get("/")
    assert resp.status == 200

    assert resp.cookies["AIOHTTP_SESSION"]["max-age"] == "10"


async def test_set_ttl_manually_set(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    # As test_set_ttl_on_session_saving: the cookie's Max-Age, not a Redis TTL.
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session.max_age = 10
        session["a"] = 1
        return web.Response(body=b"OK")

    client = await aiohttp_client(create_app(handler, manager))
    resp = await client.get("/")
    assert resp.status == 200

    assert resp.cookies["AIOHTTP_SESSION"]["max-age"] == "10"


async def test_create_new_session_if_key_doesnt_exists_in_redis(aiohttp_client: AiohttpClient,
                                                               manager: SessionManager) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        assert session.new
        return web.Response(body=b"OK")

    client = await aiohttp_client(create_app(handler, manager))
    client.session.cookie_jar.update_cookies({"AIOHTTP_SESSION": "invalid_key"})
    resp = await client.get("/")
    assert resp.status == 200
    # Ours: also a well signed id that names no session.
    client.session.cookie_jar.update_cookies({"AIOHTTP_SESSION": COOKIE.sign("no-such-session")})
    resp = await client.get("/")
    assert resp.status == 200


async def test_redis_session_fixation(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    async def login(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["k"] = "v"
        return web.Response()

    app = create_app(login, manager)
    app.router.add_route("DELETE", "/", invalidate)
    client = await aiohttp_client(app)
    resp = await client.get("/")
    assert "AIOHTTP_SESSION" in resp.cookies
    evil_cookie = resp.cookies["AIOHTTP_SESSION"].value
    resp = await client.delete("/")
    assert resp.cookies["AIOHTTP_SESSION"].value == ""
    client.session.cookie_jar.update_cookies({"AIOHTTP_SESSION": evil_cookie})
    resp = await client.get("/")
    assert resp.cookies["AIOHTTP_SESSION"].value != evil_cookie


async def test_not_redis_provided_to_storage(manager: SessionManager) -> None:
    # Upstream: RedisStorage(None) raises TypeError. Ours takes a SessionManager and names the mistake.
    with pytest.raises(ConfigurationError, match="SessionManager"):
        TieredStorage(None, secret_key=SECRET)  # type: ignore[arg-type]


async def test_load_session_dont_load_expired_session(aiohttp_client: AiohttpClient,
                                                      manager: SessionManager) -> None:
    # Upstream: max_age=2 and a 5 s sleep. max_age limits the signed cookie's age here (the session's own
    # expiry is the tier's), so the cookie is given 1 s and the test sleeps past it.
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        exp_param = request.rel_url.query.get("exp", None)
        if exp_param is None:
            session["a"] = 1
            session["b"] = 2
        else:
            assert cast(MutableMapping[str, Any], {}) == session

        return web.Response(body=b"OK")

    client = await aiohttp_client(create_app(handler, manager, 1))
    resp = await client.get("/")
    assert resp.status == 200

    await asyncio.sleep(2.2)

    resp = await client.get("/?exp=yes")
    assert resp.status == 200


# -- tests/test_get_session.py -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")  # upstream sets aiohttp-session's keys
async def test_get_new_session(manager: SessionManager) -> None:
    req = make_mocked_request("GET", "/")
    session = Session("identity", data=None, new=False)

    req[SESSION_KEY] = session
    req[STORAGE_KEY] = storage(manager)

    ret = await new_session(req)
    assert ret is not session
    assert ret.new and ret.identity is None  # ours: a new session has no id until it is saved


# -- tests/test_http_exception.py, tests/test_response_types.py -----------------------------------------------


def create_routes_app(manager: SessionManager, *handlers: tuple[str, Handler]) -> web.Application:
    middleware = session_middleware(storage(manager))
    app = web.Application(middlewares=[middleware])
    for url, handler in handlers:
        app.router.add_route("GET", url, handler)
    return app


async def test_exceptions(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    async def save(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["message"] = "works"
        raise web.HTTPFound("/show")

    async def show(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        message = session.get("message")
        return web.Response(text=str(message))

    client = await aiohttp_client(create_routes_app(manager, ("/save", save), ("/show", show)))

    resp = await client.get("/save")
    assert resp.status == 200
    assert str(resp.url)[-5:] == "/show"
    text = await resp.text()
    assert text == "works"


async def test_stream_response(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    async def stream_response(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session["will_not"] = "show up"
        return web.StreamResponse()

    client = await aiohttp_client(create_routes_app(manager, ("/stream", stream_response)))

    resp = await client.get("/stream")
    assert resp.status == 200
    assert SESSION_KEY.upper() not in resp.cookies


# -- tests/test_path_domain.py ---------------------------------------------------------------------------------


def make_path_cookie(client: TestClient[web.Request, web.Application], session_id: str,
                     path: str | None = None, domain: str | None = None) -> None:
    jar: cookies.SimpleCookie = cookies.SimpleCookie()
    jar["AIOHTTP_SESSION"] = COOKIE.sign(session_id)
    jar["AIOHTTP_SESSION"]["path"] = path or ""
    jar["AIOHTTP_SESSION"]["domain"] = domain or ""
    client.session.cookie_jar.update_cookies(jar)


def create_path_app(handler: Handler, manager: SessionManager) -> web.Application:
    middleware = session_middleware(storage(manager, max_age=10, path="/anotherpath", domain="127.0.0.1"))
    app = web.Application(middlewares=[middleware])
    app.router.add_route("GET", "/", handler)
    app.router.add_route("GET", "/anotherpath", handler)
    return app


async def stored(manager: SessionManager, morsel: cookies.Morsel[str]) -> dict[str, Any]:
    """The session a response's cookie names, as upstream reads it out of the cookie."""
    session_id = COOKIE.session_id(morsel.value)
    session = None if session_id is None else await manager.get(session_id)
    return {} if session is None else {"session": session.data, "created": int(session.created_at)}


async def set_c(request: web.Request) -> web.StreamResponse:
    session = await get_session(request)
    session["c"] = 3
    return web.Response(body=b"OK")


async def planted_visit(client: TestClient[web.Request, web.Application], manager: SessionManager, path: str,
                        domain: str) -> tuple[cookies.Morsel[str], dict[str, Any]]:
    """Upstream's steps, written once: a session {"a": 1, "b": 2} planted under a cookie with this path and
    domain, then GET /anotherpath; the response's cookie and the session it names."""
    make_path_cookie(client, (await manager.ensure(data={"a": 1, "b": 2})).session_id, path=path, domain=domain)
    resp = await client.get("/anotherpath")
    assert resp.status == 200
    morsel = resp.cookies["AIOHTTP_SESSION"]
    return morsel, await stored(manager, morsel)


async def test_with_same_path_domain(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    client = await aiohttp_client(create_path_app(set_c, manager))
    morsel, cookie_data = await planted_visit(client, manager, "/anotherpath", "127.0.0.1")
    assert_stored(cookie_data, {"a": 1, "b": 2, "c": 3})
    assert_flags(morsel, "/anotherpath", "127.0.0.1")


async def planted_cookie_not_sent(aiohttp_client: AiohttpClient, manager: SessionManager, path: str,
                                  domain: str) -> None:
    """Upstream's test_with_different_path and test_with_different_domain, which differ in one argument: the
    planted cookie does not match the storage's path or domain, so the request starts a new session."""
    client = await aiohttp_client(create_path_app(set_c, manager))
    morsel, cookie_data = await planted_visit(client, manager, path, domain)
    assert_stored(cookie_data, {"c": 3})
    assert "a" not in cookie_data["session"]
    assert "b" not in cookie_data["session"]
    assert_flags(morsel, "/anotherpath", "127.0.0.1")


async def test_with_different_path(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    await planted_cookie_not_sent(aiohttp_client, manager, "/NotTheSame", "127.0.0.1")


async def test_with_different_domain(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    await planted_cookie_not_sent(aiohttp_client, manager, "/anotherpath", "localhost")


async def test_invalidate_with_same_path_domain(aiohttp_client: AiohttpClient, manager: SessionManager) -> None:
    client = await aiohttp_client(create_path_app(invalidate, manager))
    morsel, cookie_data = await planted_visit(client, manager, "/anotherpath", "127.0.0.1")
    assert cookie_data == {}
    assert_flags(morsel, "/anotherpath", "127.0.0.1")


# -- ours: what TieredStorage adds to, or keeps from, the tier ----------------------------------------------------


async def test_new_session_at_login_rotates_the_id_and_ends_the_old_one(aiohttp_client: AiohttpClient,
                                                                         manager: SessionManager) -> None:
    async def login(request: web.Request) -> web.StreamResponse:
        if "direct" not in request.query:
            assert (await get_session(request))["cart"] == [1]
        session = await new_session(request)  # aiohttp-session's defence against fixation
        session["user"] = "alice"
        return web.Response(text="ok")

    app = web.Application(middlewares=[session_middleware(storage(manager))])
    app.router.add_route("GET", "/login", login)
    client = await aiohttp_client(app)
    for query in ("", "?direct"):  # after get_session, and without it
        client.session.cookie_jar.clear()
        planted = await make_cookie(client, manager, {"cart": [1]})
        resp = await client.get("/login" + query)
        assert resp.status == 200
        new_id = COOKIE.session_id(resp.cookies["AIOHTTP_SESSION"].value)
        assert new_id is not None and new_id != planted
        assert await manager.get(planted) is None  # the planted id is worthless now
        new = await manager.get(new_id)
        assert new is not None and new.data == {"user": "alice"}  # a new session: nothing carried over
        assert "Cookie" in resp.headers.getall("Vary")


async def test_concurrent_requests_changing_different_keys_both_survive(aiohttp_client: AiohttpClient,
                                                                         manager: SessionManager) -> None:
    async def put(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        await asyncio.sleep(0.05)  # both requests have loaded the session before either saves
        session[request.match_info["key"]] = request.query["value"]
        return web.Response(text="ok")

    app = web.Application(middlewares=[session_middleware(storage(manager))])
    app.router.add_route("GET", "/{key}", put)
    client = await aiohttp_client(app)
    session_id = await make_cookie(client, manager, {"keep": True})
    for round_ in range(3):
        responses = await asyncio.gather(client.get(f"/theme?value=t{round_}"), client.get(f"/cart?value=c{round_}"))
        assert [r.status for r in responses] == [200, 200]
        session = await manager.get(session_id)
        assert session is not None and session.data == {"keep": True, "theme": f"t{round_}", "cart": f"c{round_}"}


async def test_invalidate_then_write_starts_a_new_session(aiohttp_client: AiohttpClient,
                                                          manager: SessionManager) -> None:
    async def logout(request: web.Request) -> web.StreamResponse:
        session = await get_session(request)
        session.invalidate()
        session["flash"] = "bye"
        return web.Response(text="ok")

    client = await aiohttp_client(create_app(logout, manager))
    old_id = await make_cookie(client, manager, {"user": "bob"})
    resp = await client.get("/")
    new_id = COOKIE.session_id(resp.cookies["AIOHTTP_SESSION"].value)
    assert new_id is not None and new_id != old_id
    assert await manager.get(old_id) is None
    new = await manager.get(new_id)
    assert new is not None and new.data == {"flash": "bye"}


async def test_a_due_touch_slides_the_session_and_its_cookie(aiohttp_client: AiohttpClient,
                                                             manager: SessionManager) -> None:
    async def read(request: web.Request) -> web.StreamResponse:
        return web.Response(text=str((await get_session(request)).get("k")))

    app = web.Application(middlewares=[session_middleware(storage(manager, max_age=600, touch_after=0))])
    app.router.add_route("GET", "/", read)
    client = await aiohttp_client(app)
    session_id = await make_cookie(client, manager, {"k": 1})
    before = await manager.get(session_id)
    assert before is not None
    version = before.version
    resp = await client.get("/")
    assert await resp.text() == "1" and resp.cookies["AIOHTTP_SESSION"]["max-age"] == "600"
    after = await manager.get(session_id)
    assert after is not None and after.request_count == 1 and after.version == version + 1 and after.data == {"k": 1}


async def test_storage_options_and_session_misuse_are_named(manager: SessionManager) -> None:
    assert storage(manager, samesite="Strict").sessions.cookie.samesite == "strict"
    with pytest.raises(ConfigurationError, match="HttpOnly"):
        storage(manager, httponly=False)
    with pytest.raises(ConfigurationError, match="samesite"):
        storage(manager, samesite="sometimes")
    with pytest.raises(ConfigurationError, match="max_age"):
        storage(manager, max_age=0)
    session = await storage(manager).new_session()
    with pytest.raises(ConfigurationError, match="set_new_identity"):
        session.set_new_identity("chosen")
    with pytest.raises(InvalidSessionData):
        session["a.b"] = 1
