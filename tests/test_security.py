"""Hostile input and secrets: every call works or raises a named error, no other session is touched, and
passwords never reach logs, errors or metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from prometheus_client import REGISTRY, generate_latest

from tiered_sessions import SessionManager, Settings, TieredSessionsError
from tiered_sessions.config import redact_message, redact_url
from tiered_sessions.embedded import RedisServer

from .test_cli import _cli, _env

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
anything = st.one_of(json_like, st.binary(max_size=8), st.tuples(st.integers()), st.sets(st.integers(), max_size=2))
ids = st.one_of(st.text(max_size=300), st.from_regex(r"[A-Za-z0-9_.:\-]{1,40}", fullmatch=True), st.integers(),
                st.none(), st.binary(max_size=5))


def test_fuzzed_calls_work_or_raise_named_errors(settings: Settings) -> None:
    loop = asyncio.new_event_loop()
    manager = SessionManager(settings=settings, run_flusher=False, max_session_bytes=50_000)
    canary = loop.run_until_complete(manager.ensure("canary", data={"safe": [1, 2, 3]}, user_id="c"))
    canary_version = canary.version

    @given(session_id=ids, data=anything, metadata=anything, duration=anything,
           attribute=st.one_of(st.none(), st.text(max_size=40), st.integers()))
    @hypothesis_settings(max_examples=150, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    def fuzz(session_id: Any, data: Any, metadata: Any, duration: Any, attribute: Any) -> None:
        calls: list[Callable[[], Coroutine[Any, Any, Any]]] = [
            lambda: manager.ensure(session_id, data=data, metadata=metadata, user_agent=attribute),
            lambda: manager.update(session_id, data=data, metadata=metadata, user_id=attribute),
            lambda: manager.update_activity(session_id, request_duration_ms=duration),
            lambda: manager.get(session_id),
            lambda: manager.remove(session_id),
        ]
        for call in calls:
            # A named error is the contract; anything else fails the test.
            with contextlib.suppress(TieredSessionsError):
                loop.run_until_complete(call())

    try:
        fuzz()
        loop.run_until_complete(manager.flush())  # whatever was accepted is storable in Postgres
        assert loop.run_until_complete(manager.dead_letters()) is not None
        assert loop.run_until_complete(loop.run_until_complete(manager.dead_letters()).list()) == []
        after = loop.run_until_complete(manager.get("canary"))
        assert after is not None and after.data == {"safe": [1, 2, 3]} and after.version == canary_version
    finally:
        loop.run_until_complete(manager.close())
        loop.close()


async def test_passwords_never_reach_logs_errors_or_metrics(settings: Settings,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55"
    caplog.set_level(logging.DEBUG)
    with RedisServer(password=secret) as redis_server:
        redis_url = redis_server.url
        host, rest = (settings.database_url or "").split("@", 1)
        database_url = f"{host}:{secret}@{rest}"  # trust auth ignores it, but it is in the URL
        errors: list[str] = []
        async with SessionManager(redis_url, database_url, schema=settings.schema, key_prefix="sec",
                                  socket_timeout_secs=1, flush_interval_secs=0.05, degraded_mode=False) as manager:
            await manager.ensure("guarded", data={"x": 1})
            await manager.flush()
            redis_server.kill()
            for call in (manager.get("guarded"), manager.update_activity("guarded")):
                try:
                    await call
                except TieredSessionsError as exc:
                    errors.append(f"{exc!r} {exc.__cause__!r}")
            await asyncio.sleep(0.3)  # the flusher fails and logs meanwhile
            redis_server.start()
        wrong = SessionManager(f"redis://:wrong-{secret}@127.0.0.1:{redis_server.port}/0", enable_persistence=False)
        with pytest.raises(TieredSessionsError) as refused:
            await wrong.ensure()
        errors.append(str(refused.value))
    assert len(errors) == 3
    everything = caplog.text + "\n".join(errors) + generate_latest(REGISTRY).decode()
    assert secret not in everything
    assert "***" in everything


@pytest.mark.parametrize("url", [
    "postgresql://app@db.example:5432/sessions?password={secret}",
    "postgresql://app@db.example/sessions?sslmode=require&sslpassword={secret}",
    "redis://db.example:6379/0?username=app&password={secret}",
    "rediss://app:{secret}@db.example:6380/0",
    "postgresql://app:{quoted}@db.example/sessions",  # percent-encoded: drivers echo it decoded
])
def test_every_credential_form_is_redacted(url: str) -> None:
    secret = "s3cret/Pa55@x"
    given = url.format(secret=quote(secret, safe=""), quoted=quote(secret, safe=""))
    for text in (redact_url(given), redact_message(f"connect to {given} failed: password {secret} refused", given)):
        assert secret not in text and quote(secret, safe="") not in text
        assert "***" in text
    assert "db.example" in redact_url(given)  # what it points at stays readable


async def test_query_string_passwords_never_reach_errors_logs_or_cli_output(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    secret = "q-s3cret-Pa55"
    caplog.set_level(logging.DEBUG)
    with RedisServer(password=secret) as redis_server:
        redis_url = f"redis://127.0.0.1:{redis_server.port}/0?password={secret}"
        database_url = f"{settings.database_url}?password={secret}"  # trust auth ignores it
        errors: list[str] = []
        async with SessionManager(redis_url, database_url, schema=settings.schema, key_prefix="sec-query",
                                  socket_timeout_secs=1, degraded_mode=False) as manager:
            await manager.ensure("guarded")
            redis_server.kill()
            with pytest.raises(TieredSessionsError) as failed:
                await manager.get("guarded")
            errors.append(f"{failed.value!r} {failed.value.__cause__!r}")
            stats = _cli("stats", "--json", env={**_env(settings), "TIERED_SESSIONS_REDIS_URL": redis_url,
                                                  "TIERED_SESSIONS_DATABASE_URL": database_url})
            errors.append(stats.stdout + stats.stderr)
            redis_server.start()
    everything = caplog.text + "\n".join(errors)
    assert "unreachable" in errors[1] or "Redis" in errors[1]  # the CLI said what failed
    assert secret not in everything
    assert "***" in everything
