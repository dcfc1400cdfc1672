"""The web middlewares and example apps (Starlette through httpx's ASGITransport, aiohttp through its own test
client) on real Redis and PostgreSQL: lazy creation, writes of only what changed, rotation at login, removal
at logout, forged cookies ignored."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient, TestServer
from itsdangerous import TimestampSigner

from examples import aiohttp_app, starlette_app
from tiered_sessions import SessionManager
from tiered_sessions.errors import ConfigurationError, InvalidSessionData, SessionAlreadySaved
from tiered_sessions.middleware.aiohttp import SESSION_KEY, setup_sessions
from tiered_sessions.middleware.asgi import Message, Receive, Scope, Send, SessionMiddleware
from tiered_sessions.middleware.core import RequestSession, SessionCookie, WebSessions

SECRET = "test-secret-key"
COOKIE = SessionCookie(SECRET)
# (method, path, json body, request headers) -> (status, json body, Set-Cookie headers)
Send_ = Callable[[str, str, Any, dict[str, str]], Awaitable[tuple[int, Any, list[str]]]]


@dataclasses.dataclass
class Browser:
    """Keeps the session cookie by hand (no cookie jar), so tests can see and forge it."""

    send: Send_
    cookie: str | None = None
    set_cookies: list[str] = dataclasses.field(default_factory=list)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"cookie": f"session={self.cookie}"} if self.cookie else {}
        status, payload, self.set_cookies = await self.send(method, path, body, headers)
        assert status == 200, payload
        for header in self.set_cookies:
            name, _, rest = header.partition("=")
            assert name == "session"
            self.cookie = rest.split(";")[0] or None
        return payload

    @property
    def session_id(self) -> str | None:
        return COOKIE.session_id(self.cookie)


@pytest.fixture(params=["starlette", "aiohttp"])
async def browser(request: pytest.FixtureRequest, manager: SessionManager) -> AsyncIterator[Browser]:
    if request.param == "starlette":
        app = starlette_app.create_app(manager, SECRET)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver") as http:
            async def send_httpx(method: str, path: str, body: Any, headers: dict[str, str]
                                 ) -> tuple[int, Any, list[str]]:
                response = await http.request(method, path, json=body, headers=headers)
                http.cookies.clear()  # the Browser keeps the cookie
                return response.status_code, response.json(), response.headers.get_list("set-cookie")

            yield Browser(send_httpx)
    else:
        async with TestClient(TestServer(aiohttp_app.create_app(manager, SECRET)),
                              cookie_jar=DummyCookieJar()) as client:
            async def send_aiohttp(method: str, path: str, body: Any, headers: dict[str, str]
                                   ) -> tuple[int, Any, list[str]]:
                async with client.request(method, path, json=body, headers=headers) as response:
                    return response.status, await response.json(), response.headers.getall("Set-Cookie", [])

            yield Browser(send_aiohttp)


async def test_reading_anonymously_creates_nothing(browser: Browser, manager: SessionManager) -> None:
    assert await browser.call("GET", "/") == {"user": None, "cart": [], "theme": None}
    assert browser.set_cookies == [] and browser.cookie is None
    assert await manager.list_ids() == []


async def test_the_first_write_creates_the_session_and_a_flagged_cookie(browser: Browser,
                                                                         manager: SessionManager) -> None:
    await browser.call("POST", "/cart", {"item": "apple"})
    (header,) = browser.set_cookies
    flags = [part.strip() for part in header.split(";")[1:] if not part.strip().startswith("Max-Age=")]
    assert flags == ["Path=/", "HttpOnly", "SameSite=Lax", "Secure"]
    assert browser.session_id is not None
    session = await manager.get(browser.session_id)
    assert session is not None and session.data == {"cart": ["apple"]}
    assert await manager.list_ids() == [browser.session_id]


async def test_a_request_that_only_reads_writes_nothing(browser: Browser, manager: SessionManager) -> None:
    await browser.call("POST", "/cart", {"item": "apple"})
    sid = browser.session_id
    assert sid is not None
    before = await manager.get(sid)
    assert before is not None
    version = before.version
    for _ in range(3):
        assert await browser.call("GET", "/") == {"user": None, "cart": ["apple"], "theme": None}
        assert browser.set_cookies == []
    after = await manager.get(sid)
    assert after is not None and after.version == version


async def test_login_rotates_the_id_and_the_old_id_stops_working(browser: Browser,
                                                                 manager: SessionManager) -> None:
    await browser.call("POST", "/cart", {"item": "apple"})
    old_cookie, old_id = browser.cookie, browser.session_id
    assert await browser.call("POST", "/login", {"user": "alice"}) == {"user": "alice"}
    new_id = browser.session_id
    assert new_id is not None and new_id != old_id
    # The session moved: cart kept, user added, filed under the user.
    assert await browser.call("GET", "/") == {"user": "alice", "cart": ["apple"], "theme": None}
    assert [s.session_id for s in await manager.list_user_sessions("alice")] == [new_id]
    assert old_id is not None and await manager.get(old_id) is None
    # Whoever kept (or planted) the old cookie gets nothing of it.
    browser.cookie = old_cookie
    assert await browser.call("GET", "/") == {"user": None, "cart": [], "theme": None}


async def test_concurrent_requests_changing_different_keys_both_survive(browser: Browser,
                                                                        manager: SessionManager) -> None:
    await browser.call("POST", "/cart", {"item": "first"})
    for round_ in range(5):
        # Both requests load the session before either saves (they share one round trip to Redis):
        # writing the whole session back would lose one of the two keys.
        await asyncio.gather(browser.call("POST", "/cart", {"item": f"item-{round_}"}),
                             browser.call("POST", "/theme", {"theme": f"theme-{round_}"}))
        state = await browser.call("GET", "/")
        assert state["theme"] == f"theme-{round_}"
        assert state["cart"][-1] == f"item-{round_}"
    assert browser.session_id is not None
    session = await manager.get(browser.session_id)
    assert session is not None and session.data["cart"] == ["first", *(f"item-{r}" for r in range(5))]


async def test_logout_removes_the_session_and_expires_the_cookie(browser: Browser,
                                                                 manager: SessionManager) -> None:
    await browser.call("POST", "/login", {"user": "bob"})
    cookie, sid = browser.cookie, browser.session_id
    assert sid is not None and await manager.get(sid) is not None
    await browser.call("POST", "/logout")
    (header,) = browser.set_cookies
    assert "Max-Age=0" in header and browser.cookie is None
    assert await manager.get(sid) is None
    assert await manager.list_user_sessions("bob") == []
    browser.cookie = cookie  # replaying the old cookie does not bring it back
    assert await browser.call("GET", "/") == {"user": None, "cart": [], "theme": None}


async def test_a_tampered_cookie_gets_a_fresh_anonymous_session(browser: Browser,
                                                                manager: SessionManager) -> None:
    await browser.call("POST", "/login", {"user": "carol"})
    real_cookie, real_id = browser.cookie, browser.session_id
    assert real_cookie is not None and real_id is not None
    victim = await manager.get(real_id)
    assert victim is not None
    version = victim.version
    other_id = "x" * len(real_id)
    forged = [
        real_cookie[:-2] + ("AA" if not real_cookie.endswith("AA") else "BB"),  # a broken signature
        other_id + real_cookie[len(real_id):],  # another id with the real signature
        SessionCookie("someone-elses-key").sign(real_id),  # signed with the wrong key
        "garbage", "",
    ]
    for value in forged:
        browser.cookie = value
        assert await browser.call("GET", "/") == {"user": None, "cart": [], "theme": None}, value
        assert browser.set_cookies == []
    browser.cookie = forged[0]
    await browser.call("POST", "/cart", {"item": "pear"})
    fresh_id = browser.session_id
    assert fresh_id is not None and fresh_id not in (real_id, other_id)
    assert await browser.call("GET", "/") == {"user": None, "cart": ["pear"], "theme": None}
    untouched = await manager.get(real_id)
    assert untouched is not None and untouched.version == version and untouched.data == {"user": "carol"}


# -- the middleware's parts, without an example app ---------------------------------------------------------


async def test_writes_after_the_response_started_raise(manager: SessionManager) -> None:
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session: RequestSession = scope["session"]
        session["before"] = 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            session["after"] = 2
        except SessionAlreadySaved as exc:
            raised.append(exc)
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = SessionMiddleware(app, manager=manager, secret_key=SECRET)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="https://t") as http:
        response = await http.get("/")
    assert len(raised) == 1
    sid = COOKIE.session_id(response.cookies["session"])
    assert sid is not None
    session = await manager.get(sid)
    assert session is not None and session.data == {"before": 1}


async def test_a_failing_handler_saves_nothing(manager: SessionManager) -> None:
    async def fails(request: web.Request) -> web.Response:
        request[SESSION_KEY]["half"] = "done"
        raise RuntimeError("handler bug")

    app = web.Application()
    setup_sessions(app, manager, SECRET)
    app.router.add_get("/", fails)
    async with TestClient(TestServer(app), cookie_jar=DummyCookieJar()) as client, client.get("/") as response:
        assert response.status == 500
        assert "Set-Cookie" not in response.headers
    assert await manager.list_ids() == []


async def test_raised_http_responses_and_streamed_responses_save(manager: SessionManager) -> None:
    async def redirect(request: web.Request) -> web.Response:
        request[SESSION_KEY]["via"] = "redirect"
        raise web.HTTPFound("/elsewhere")

    async def stream(request: web.Request) -> web.StreamResponse:
        request[SESSION_KEY]["via"] = "stream"
        response = web.StreamResponse()
        await response.prepare(request)  # the session is saved here, with the headers
        with pytest.raises(SessionAlreadySaved):
            request[SESSION_KEY]["late"] = True
        await response.write(b"chunk")
        return response

    app = web.Application()
    setup_sessions(app, manager, SECRET)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/stream", stream)
    async with TestClient(TestServer(app), cookie_jar=DummyCookieJar()) as client:
        for path in ("/redirect", "/stream"):
            async with client.get(path, allow_redirects=False) as response:
                await response.read()
                sid = COOKIE.session_id(response.cookies["session"].value)
                assert sid is not None
                session = await manager.get(sid)
                assert session is not None and session.data == {"via": path[1:]}


async def test_in_place_changes_count_and_unchanged_values_do_not(manager: SessionManager) -> None:
    created = await manager.ensure(data={"cart": [1], "n": 1, "prefs": {"a": 1, "b": 2}})
    sessions = WebSessions(manager, COOKIE)
    view = await sessions.load([COOKIE.sign(created.session_id)])
    view["cart"].append(2)  # nested, in place
    view["n"] = 1  # same value
    view["prefs"] = {"b": 2, "a": 1}  # same value, other order
    assert view.changes() == ({"cart": [1, 2]}, [])
    assert created.data["cart"] == [1]  # the manager's shared Session object is not touched
    del view["n"]
    assert view.changes() == ({"cart": [1, 2]}, ["n"])
    assert await sessions.save(view) is None  # same id: no cookie to send
    stored = await manager.get(created.session_id)
    assert stored is not None and stored.data == {"cart": [1, 2], "prefs": {"a": 1, "b": 2}}
    with pytest.raises(SessionAlreadySaved):
        view["x"] = 1
    fresh = await sessions.load([])
    for bad in ("a.b", "", 3):
        with pytest.raises(InvalidSessionData):
            fresh[bad] = 1  # type: ignore[index]


async def test_sliding_expiry_touches_only_when_due(manager: SessionManager) -> None:
    created = await manager.ensure(data={"k": 1})
    version = created.version
    lazy = WebSessions(manager, COOKIE)  # default: touch after half the timeout
    await lazy.save(await lazy.load([COOKIE.sign(created.session_id)]))
    assert (await manager.get(created.session_id)).version == version  # type: ignore[union-attr]
    eager = WebSessions(manager, SessionCookie(SECRET, max_age=600), touch_after=0)
    header = await eager.save(await eager.load([COOKIE.sign(created.session_id)]))
    session = await manager.get(created.session_id)
    assert session is not None and session.version == version + 1 and session.request_count == 1
    assert header is not None and "Max-Age=600" in header  # the cookie slides with the session


async def test_logout_then_write_starts_a_new_session(manager: SessionManager) -> None:
    created = await manager.ensure(data={"user": "dan"})
    sessions = WebSessions(manager, COOKIE)
    view = await sessions.load([COOKIE.sign(created.session_id)])
    view.delete()
    view["flash"] = "logged out"
    header = await sessions.save(view)
    assert header is not None and "Max-Age=0" not in header
    new_id = COOKIE.session_id(header.split(";")[0].partition("=")[2])
    assert new_id is not None and new_id != created.session_id
    assert await manager.get(created.session_id) is None
    new = await manager.get(new_id)
    assert new is not None and new.data == {"flash": "logged out"}


def test_cookie_signing_and_options() -> None:
    rotated = SessionCookie(["old-key", "new-key"])
    assert rotated.session_id(SessionCookie("old-key").sign("abc")) == "abc"  # old keys still verify
    assert SessionCookie("old-key").session_id(rotated.sign("abc")) is None  # the newest key signs
    assert COOKIE.session_id(COOKIE.sign("bad id!")) is None  # well signed, but not a session id
    header = SessionCookie(SECRET, secure=False, samesite="strict", name="sid", max_age=60).set_header("abc")
    assert header.startswith("sid=abc.") and "; Max-Age=60; Path=/; HttpOnly; SameSite=Strict" in header
    assert "Secure" not in header
    bad: dict[str, Any]
    for bad in ({"secret_key": ""}, {"secret_key": []}, {"secret_key": "k", "samesite": "none", "secure": False},
                {"secret_key": "k", "samesite": "sometimes"}, {"secret_key": "k", "name": "a;b"},
                {"secret_key": "k", "max_age": 0}):
        with pytest.raises(ConfigurationError):
            SessionCookie(**bad)


def test_importing_tiered_sessions_imports_no_web_framework() -> None:
    code = ("import sys, tiered_sessions; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'aiohttp', 'itsdangerous', "
            "'httpx') or m.startswith('tiered_sessions.middleware')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_websocket_connections_see_the_session_read_only(manager: SessionManager) -> None:
    created = await manager.ensure(data={"user": "erin"})
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session: RequestSession = scope["session"]
        seen.append(dict(session))
        with pytest.raises(SessionAlreadySaved):
            session["x"] = 1
        await send({"type": "websocket.close", "code": 1000})

    wrapped = SessionMiddleware(app, manager=manager, secret_key=SECRET)
    scope = {"type": "websocket", "path": "/", "headers": [(b"cookie", f"session={COOKIE.sign(created.session_id)}"
                                                                      .encode())]}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await wrapped(scope, receive, send)
    assert seen == [{"user": "erin"}] and sent == [{"type": "websocket.close", "code": 1000}]


# -- a drop-in for Starlette's session middleware -------------------------------------------------------------


async def test_the_session_is_a_dict_and_every_mutation_is_tracked(manager: SessionManager) -> None:
    created = await manager.ensure(data={"a": 1, "b": 2, "c": 3})
    sessions = WebSessions(manager, COOKIE)
    view = await sessions.load([COOKIE.sign(created.session_id)])
    assert isinstance(view, dict) and not view.accessed
    assert json.loads(json.dumps(view)) == dict(view) == {"a": 1, "b": 2, "c": 3}
    assert view.accessed
    view |= {"d": 4}
    view.update([("e", 5)], f=6)
    assert view.popitem() == ("f", 6)  # the last key, as dict does
    assert view.pop("a") == 1 and view.pop("missing", None) is None
    assert view.setdefault("b", 20) == 2 and view.setdefault("g", 7) == 7
    del view["c"]
    view["h"] = [8]
    with pytest.raises(InvalidSessionData):
        view.update({"ok": 1, "not.ok": 2})  # refused whole: nothing of it is applied
    with pytest.raises(InvalidSessionData):
        view |= {"x.y": 1}
    assert "ok" not in view
    assert view.changes() == ({"d": 4, "e": 5, "g": 7, "h": [8]}, ["a", "c"])
    await sessions.save(view)
    stored = await manager.get(created.session_id)
    assert stored is not None and stored.data == {"b": 2, "d": 4, "e": 5, "g": 7, "h": [8]}
    mutations: list[Callable[[RequestSession], object]] = [
        lambda s: s.__setitem__("k", 1), lambda s: s.__delitem__("b"), lambda s: s.update(k=1),
        lambda s: s.__ior__({"k": 1}), lambda s: s.pop("b"), lambda s: s.popitem(),
        lambda s: s.setdefault("k", 1), lambda s: s.clear()]
    for mutate in mutations:
        with pytest.raises(SessionAlreadySaved):
            mutate(view)
    assert dict(view) == {"b": 2, "d": 4, "e": 5, "g": 7, "h": [8]}


async def test_vary_cookie_joins_the_apps_own_vary_header(manager: SessionManager) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        vary = [(b"vary", scope["path"].strip("/").encode())] if scope["path"] != "/" else []
        if scope["path"] != "/untouched":
            scope["session"].get("user")
        await send({"type": "http.response.start", "status": 200, "headers": vary})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = SessionMiddleware(app, manager=manager, secret_key=SECRET)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="https://t") as http:
        assert (await http.get("/")).headers.get_list("vary") == ["Cookie"]
        assert (await http.get("/Accept-Encoding")).headers.get_list("vary") == ["Accept-Encoding, Cookie"]
        assert (await http.get("/cookie")).headers.get_list("vary") == ["cookie"]
        assert (await http.get("/untouched")).headers.get_list("vary") == ["untouched"]


async def test_starlette_parameter_names_are_accepted(manager: SessionManager) -> None:
    from starlette.datastructures import Secret

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["session"]["k"] = 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = SessionMiddleware(app, manager=manager, secret_key=Secret(SECRET), session_cookie="sid",
                                max_age=60, path="/app", same_site="none", https_only=True,
                                domain="example.com", partitioned=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="https://t") as http:
        header = (await http.get("/app")).headers["set-cookie"]
    value, *flags = header.split("; ")
    assert flags == ["Max-Age=60", "Path=/app", "Domain=example.com", "HttpOnly", "SameSite=None", "Secure",
                     "Partitioned"]
    assert SessionCookie(SECRET, name="sid").session_id(value.partition("=")[2]) is not None
    bad: dict[str, Any]
    for bad in ({"https_only": False, "secure": True}, {"same_site": "lax", "samesite": "strict"},
                {"session_cookie": "a", "cookie_name": "b"}, {"partitioned": True, "https_only": False}):
        with pytest.raises(ConfigurationError):
            SessionMiddleware(app, manager=manager, secret_key=SECRET, **bad)
    assert SessionMiddleware(app, manager=manager, secret_key=SECRET, https_only=True, secure=True)


async def test_the_cookie_is_sent_again_past_half_its_max_age(manager: SessionManager,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    created = await manager.ensure(data={"k": 1})
    cookie = SessionCookie(SECRET, max_age=100)
    sessions = WebSessions(manager, cookie)
    assert await sessions.save(await sessions.load([cookie.sign(created.session_id)])) is None
    with monkeypatch.context() as clock:
        clock.setattr(TimestampSigner, "get_timestamp", lambda self: int(time.time()) - 60)
        old = cookie.sign(created.session_id)
    header = await sessions.save(await sessions.load([old]))  # a read, but the cookie would run out
    assert header is not None and "Max-Age=100" in header
    assert cookie.read(header.split(";")[0].partition("=")[2]) is not None
    session = await manager.get(created.session_id)
    assert session is not None and session.version == created.version  # no write for it


async def test_aiohttp_responses_vary_by_cookie_when_the_session_was_used(manager: SessionManager) -> None:
    async def reads(request: web.Request) -> web.Response:
        return web.json_response({"user": request[SESSION_KEY].get("user")}, headers={"Vary": "Accept"})

    async def ignores(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    setup_sessions(app, manager, SECRET)
    app.router.add_get("/reads", reads)
    app.router.add_get("/ignores", ignores)
    async with TestClient(TestServer(app), cookie_jar=DummyCookieJar()) as client:
        async with client.get("/reads") as response:
            assert response.headers.getall("Vary") == ["Accept", "Cookie"]
        async with client.get("/ignores") as response:
            assert "Vary" not in response.headers
