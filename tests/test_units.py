"""Logic that needs no server: settings, URL redaction, codecs."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tiered_sessions import ConfigurationError, InvalidSessionData, Settings
from tiered_sessions._codec import encode_document, partition_of, validate_session_id
from tiered_sessions._sql import render_sql
from tiered_sessions.cold_tier import asyncpg_dsn
from tiered_sessions.config import redact_message, redact_url


def test_settings_precedence() -> None:
    env = {"TIERED_SESSIONS_REDIS_URL": "redis://a", "REDIS_URL": "redis://b", "DATABASE_URL": "postgresql://d",
           "TIERED_SESSIONS_FLUSH_BATCH_SIZE": "50", "TIERED_SESSIONS_MAX_CONCURRENT_SESSIONS": "none",
           "TIERED_SESSIONS_ENABLE_PERSISTENCE": "false"}
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://a" and settings.database_url == "postgresql://d"
    assert settings.flush_batch_size == 50 and settings.max_concurrent_sessions is None
    assert settings.enable_persistence is False
    explicit = Settings.from_env(env, redis_url="redis://c", flush_batch_size=7, max_concurrent_sessions=None)
    assert explicit.redis_url == "redis://c" and explicit.flush_batch_size == 7
    assert Settings.from_env({"REDIS_URL": "redis://b"}).redis_url == "redis://b"


@pytest.mark.parametrize("bad", [{"partitions": 0}, {"table": "x; drop"}, {"schema": "a.b"},
                                 {"max_concurrent_sessions": 0}, {"flush_interval_secs": -1},
                                 {"key_prefix": "a b"}, {"redis_max_connections": 2}])
def test_settings_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Settings(**bad)  # type: ignore[arg-type]


def test_settings_refuse_unparseable_env_and_unknown_names() -> None:
    with pytest.raises(ConfigurationError, match="FLUSH_BATCH_SIZE"):
        Settings.from_env({"TIERED_SESSIONS_FLUSH_BATCH_SIZE": "many"})
    with pytest.raises(ConfigurationError, match="unknown"):
        Settings.from_env({}, flush_batchsize=3)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://h:6379") == "redis://h:6379"
    assert redact_url(None) == "<unset>"
    assert redact_message("auth failed for s3cret", "postgresql://u:s3cret@db/x") == "auth failed for ***"


def test_pooler_hint_disables_statement_cache() -> None:
    assert asyncpg_dsn("postgresql://u@h:5432/d", None) == ("postgresql://u@h:5432/d", 100)
    assert asyncpg_dsn("postgresql://u@h:6543/d", None)[1] == 0
    dsn, cache = asyncpg_dsn("postgresql://u@h:5432/d?pgbouncer=true&sslmode=require", None)
    assert (dsn, cache) == ("postgresql://u@h:5432/d?sslmode=require", 0)
    assert asyncpg_dsn("postgresql://u@h:6543/d", 20)[1] == 20


def test_session_ids() -> None:
    assert validate_session_id("a-b_c.d:e") == "a-b_c.d:e"
    assert 0 <= partition_of("abc", 16) < 16
    assert partition_of("abc", 16) == partition_of("abc", 16)


def test_encode_document_refuses_what_jsonb_would_not_keep() -> None:
    pairs = encode_document({"a": [1, 2.5, None, True], "é": "ü"}, "d:", "data")
    assert pairs == [(b"d:a", b"[1,2.5,null,true]"), ("d:é".encode(), '"ü"'.encode())]
    with pytest.raises(InvalidSessionData):
        encode_document({"x": float("nan")}, "d:", "data")
    with pytest.raises(InvalidSessionData):
        encode_document({"x": "nul\x00"}, "d:", "data")


def test_readme_documents_every_setting() -> None:
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [field.name for field in dataclasses.fields(Settings)
               if f"`TIERED_SESSIONS_{field.name.upper()}`" not in readme]
    assert missing == []


@pytest.mark.parametrize("field, value", [("schema", "ts\n"), ("table", "sessions\n"), ("key_prefix", "sessions\n"),
                                          ("schema", "ts\nDROP")])
def test_settings_refuse_a_trailing_newline(field: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Settings(**cast(dict[str, Any], {field: value}))


def test_placeholders_in_sql_comments_are_not_filled() -> None:
    rendered = render_sql("-- ${table} is filled in\nSELECT * FROM ${table} -- not ${table}\n", table='"s"."t"')
    assert rendered == '-- ${table} is filled in\nSELECT * FROM "s"."t" -- not ${table}\n'
