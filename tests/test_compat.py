"""``tiered_sessions.compat.SupabaseSessionService``: code written against the seed's cold-tier service
(EX-AI's ``src/infrastructure/session_service.py``) runs unchanged over our store, its fields in our columns."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tiered_sessions import Settings, compat
from tiered_sessions.compat import SupabaseSessionService, get_session_service
from tiered_sessions.errors import InvalidSessionData, PostgresUnavailable

from .helpers import pg_row

SEED_PAYLOAD = {"state": "active", "user_id": "test-user", "user_type": "human", "ip_address": "127.0.0.1",
                "user_agent": "test-client/1.0", "request_count": 5, "total_duration_ms": 1500,
                "metadata": {"test": True, "version": "1.0"}}


@pytest.fixture
async def service(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SupabaseSessionService]:
    """The seed's way in: the singleton, configured from the environment alone."""
    monkeypatch.setenv("TIERED_SESSIONS_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("TIERED_SESSIONS_SCHEMA", settings.schema)
    monkeypatch.setattr(compat, "_service", None)
    found = get_session_service()
    yield found
    await found.close()


async def test_save_moves_the_seeds_fields_into_columns(service: SupabaseSessionService, settings: Settings,
                                                        pg: asyncpg.Connection) -> None:
    assert service.enabled and get_session_service() is service
    assert await service.save_session("seed-1", SEED_PAYLOAD, metadata={"test": True}) is True
    row = await pg_row(pg, settings, "seed-1")
    assert row is not None
    assert (row["session_state"], row["user_id"], row["user_type"], row["ip_address"], row["user_agent"],
            row["request_count"], row["total_duration_ms"]) == \
        ("active", "test-user", "human", "127.0.0.1", "test-client/1.0", 5, 1500)
    assert row["metadata"] == '{"test": true}'
    assert row["session_data"] == '{"metadata": {"test": true, "version": "1.0"}}'  # what was not moved


async def test_load_returns_the_row_with_the_payload_as_saved(service: SupabaseSessionService) -> None:
    await service.save_session("seed-2", SEED_PAYLOAD, metadata={"m": 1})
    loaded = await service.load_session("seed-2")
    assert loaded is not None
    assert loaded["session_id"] == "seed-2" and loaded["session_state"] == "active"
    assert loaded["user_id"] == "test-user" and loaded["request_count"] == 5 and loaded["metadata"] == {"m": 1}
    assert loaded["session_data"] == SEED_PAYLOAD  # the seed's manager recovers sessions from these keys
    for moment in ("created_at", "last_activity_at", "expires_at"):
        assert isinstance(loaded[moment], str) and loaded[moment].endswith("+00:00")
    assert await service.load_session("never-saved") is None


async def test_activity_counts_in_the_columns_and_the_loaded_payload(service: SupabaseSessionService) -> None:
    await service.save_session("seed-3", SEED_PAYLOAD)
    assert await service.update_session_activity("seed-3", request_duration_ms=200) is True
    assert await service.update_session_activity("seed-3") is True
    loaded = await service.load_session("seed-3")
    assert loaded is not None
    assert (loaded["request_count"], loaded["total_duration_ms"]) == (7, 1700)
    assert loaded["session_data"]["request_count"] == 7
    assert await service.update_session_activity("never-saved") is False


async def test_defaults_of_a_bare_payload(service: SupabaseSessionService, settings: Settings,
                                          pg: asyncpg.Connection) -> None:
    await service.save_session("bare", {"k": 1})
    row = await pg_row(pg, settings, "bare")
    assert row is not None
    assert (row["session_state"], row["user_type"], row["request_count"], row["total_duration_ms"]) == \
        ("active", "human", 0, 0)
    # saved again with counters: they replace the row's, as the seed's upsert does
    await service.save_session("bare", {"k": 2, "request_count": 3})
    loaded = await service.load_session("bare")
    assert loaded is not None and loaded["request_count"] == 3 and loaded["session_data"]["k"] == 2


async def test_the_seeds_states_map_to_ours(service: SupabaseSessionService, settings: Settings,
                                            pg: asyncpg.Connection) -> None:
    await service.save_session("idle", {**SEED_PAYLOAD, "state": "inactive"})
    await service.save_session("busy", SEED_PAYLOAD)
    row = await pg_row(pg, settings, "idle")
    assert row is not None and row["session_state"] == "closed"
    loaded = await service.load_session("idle")
    assert loaded is not None and loaded["session_state"] == "inactive"
    assert loaded["session_data"]["state"] == "inactive"
    assert [s["session_id"] for s in await service.list_sessions(state="inactive")] == ["idle"]
    assert [s["session_id"] for s in await service.list_sessions(state="active")] == ["busy"]
    with pytest.raises(InvalidSessionData):
        await service.save_session("odd", {"state": "sleeping"})
    with pytest.raises(InvalidSessionData):
        await service.list_sessions(state="sleeping")


async def test_delete_and_listing(service: SupabaseSessionService) -> None:
    for i in range(5):
        await service.save_session(f"list-{i}", SEED_PAYLOAD)
    assert await service.delete_session("list-0") is True
    assert await service.delete_session("list-0") is False
    assert await service.load_session("list-0") is None
    listed = await service.list_sessions(limit=3)
    assert [s["session_id"] for s in listed] == ["list-1", "list-2", "list-3"]  # a deleted one never shows
    assert len(await service.list_sessions()) == 4
    assert await service.list_sessions(state="expired") == []
    assert await service.cleanup_expired_sessions(older_than_days=7) == 0


async def test_without_a_database_url_it_is_disabled_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TIERED_SESSIONS_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    service = SupabaseSessionService()
    assert service.enabled is False
    with pytest.raises(PostgresUnavailable):
        await service.save_session("x", {})
