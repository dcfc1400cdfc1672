"""Settings: constructor arguments first, then ``TIERED_SESSIONS_*`` environment variables, then defaults."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from .errors import ConfigurationError, MissingSetting
from .model import DEFAULT_MAX_INFLIGHT

ENV_PREFIX = "TIERED_SESSIONS_"


class _Unset:
    """Marks a setting the caller did not give, so the environment or the default applies."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
# Variables read when ours is not set: the usual URL names, and the seed's (EX-AI daemon's) own.
_ALSO_FROM = {"redis_url": "REDIS_URL", "database_url": "DATABASE_URL",
              "session_max_inflight": "EXAI_WS_SESSION_MAX_INFLIGHT"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")  # room for the suffixes of its companion tables


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the session tier. Each field can be set by ``TIERED_SESSIONS_<FIELD>`` in the environment."""

    redis_url: str | None = None
    database_url: str | None = None
    # True: redis_url names a Redis Cluster node (as does a redis+cluster:// or rediss+cluster:// URL).
    cluster: bool = False
    session_timeout_secs: float = 3600.0
    max_concurrent_sessions: int | None = 100
    cleanup_interval_secs: float = 300.0
    enable_persistence: bool = True
    run_flusher: bool = True
    flush_interval_secs: float = 0.5
    flush_batch_size: int = 1000
    # Redis layout: keys are "{key_prefix}:{p<partition>}:..." so one partition lives in one cluster slot.
    partitions: int = 16
    key_prefix: str = "ts"
    # Postgres layout.
    schema: str = "public"
    table: str = "sessions"
    max_session_bytes: int = 1024 * 1024
    # How long Redis keeps a flushed tombstone, so a slow read-through cannot bring a removed session back.
    tombstone_ttl_secs: float = 600.0
    # Backpressure: past the high watermark of dirty sessions, writers wait for the backlog to fall below the
    # low watermark (default 80% of high), up to backpressure_timeout_secs, then get BackpressureError.
    # None: no limit (an unbounded backlog while Postgres is down: Redis memory is the limit).
    backlog_high_watermark: int | None = 1_000_000
    backlog_low_watermark: int | None = None
    backpressure_timeout_secs: float = 5.0
    backlog_poll_secs: float = 0.25
    # Redis unreachable: serve from Postgres (write-through, journaled) and probe Redis this often; when it
    # answers, replay the journal onto it and switch back. False: calls fail with RedisUnavailable instead.
    degraded_mode: bool = True
    redis_probe_interval_secs: float = 1.0
    # Many flushers share the partitions through leases of this length, renewed every pass (and at least every
    # third of it); a dead flusher's partitions are taken over once its leases run out.
    lease_secs: float = 5.0
    # close() / SIGTERM: how long to keep flushing before leaving the rest dirty in Redis.
    drain_timeout_secs: float = 30.0
    # None: asyncpg's default, or 0 (no server-side prepared statements) behind a transaction-mode pooler.
    pg_statement_cache_size: int | None = None
    pg_pool_max_size: int = 10
    redis_max_connections: int = 64
    # Seconds a single Redis or Postgres call may take before it counts as failed.
    socket_timeout_secs: float = 10.0
    # Requests of one session this process runs at once: the permits of Session.sem (process-local).
    session_max_inflight: int = DEFAULT_MAX_INFLIGHT

    def __post_init__(self) -> None:
        positive = ("session_timeout_secs", "cleanup_interval_secs", "flush_interval_secs", "flush_batch_size",
                    "partitions", "max_session_bytes", "tombstone_ttl_secs", "pg_pool_max_size",
                    "redis_max_connections", "socket_timeout_secs", "lease_secs", "session_max_inflight")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.backlog_high_watermark is not None:
            low = self.backlog_low_watermark
            if self.backlog_high_watermark < 1 or (low is not None and not 0 <= low < self.backlog_high_watermark):
                raise ConfigurationError("need 1 <= backlog_high_watermark and 0 <= backlog_low_watermark < high")
        if self.backpressure_timeout_secs < 0 or self.backlog_poll_secs <= 0:
            raise ConfigurationError("backpressure_timeout_secs must be >= 0 and backlog_poll_secs > 0")
        if self.drain_timeout_secs < 0:
            raise ConfigurationError("drain_timeout_secs must be >= 0")
        if self.redis_max_connections < 3:
            # the hot path keeps two connections open: anything less would leave the other calls none
            raise ConfigurationError(f"redis_max_connections must be >= 3, got {self.redis_max_connections}")
        if self.max_concurrent_sessions is not None and self.max_concurrent_sessions < 1:
            raise ConfigurationError("max_concurrent_sessions must be >= 1 or None (no limit)")
        for name in ("schema", "table"):
            if not _IDENTIFIER.fullmatch(getattr(self, name)):
                raise ConfigurationError(f"{name} must be a plain SQL identifier, got {getattr(self, name)!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", self.key_prefix):
            raise ConfigurationError(f"key_prefix must be 1-32 of [A-Za-z0-9_.-], got {self.key_prefix!r}")

    @classmethod
    def merged(cls, settings: Settings | None, given: Mapping[str, Any]) -> Settings:
        """``settings`` (else the environment's) with the arguments ``given`` explicitly (not ``UNSET``; for
        the two URLs, not ``None``) in their place."""
        if settings is None:
            return cls.from_env(**given)
        explicit = {key: value for key, value in given.items() if value is not UNSET
                    and not (value is None and key in ("redis_url", "database_url"))}
        return dataclasses.replace(settings, **explicit)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Explicit ``overrides`` win over the environment, which wins over defaults.

        ``UNSET`` means "not given"; so does ``None`` for the two URLs (``None`` is a real value elsewhere,
        e.g. ``max_concurrent_sessions=None`` for no limit).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            given = overrides.pop(field.name, UNSET)
            if given is None and field.name in ("redis_url", "database_url"):
                given = UNSET
            if given is not UNSET:
                values[field.name] = given
                continue
            for variable in (ENV_PREFIX + field.name.upper(), _ALSO_FROM.get(field.name, "")):
                raw = env.get(variable) if variable else None
                if raw is not None and raw != "":
                    values[field.name] = _parse(variable, str(field.type), raw)
                    break
        if overrides:
            raise ConfigurationError(f"unknown settings: {', '.join(sorted(overrides))}")
        return cls(**values)

    @property
    def low_watermark(self) -> int | None:
        if self.backlog_high_watermark is None:
            return None
        if self.backlog_low_watermark is not None:
            return self.backlog_low_watermark
        return self.backlog_high_watermark * 4 // 5

    def require(self, name: str) -> str:
        """The value of a required URL setting, or ``MissingSetting`` saying how to give it."""
        value: str | None = getattr(self, name)
        if not value:
            what, flag, variables = _REQUIRED[name]
            raise MissingSetting(f"no {what}: pass {name}= (command line: {flag}) or set "
                                 f"{' or '.join(variables)}")
        return value

    @property
    def qualified_table(self) -> str:
        return f'"{self.schema}"."{self.table}"'

    @property
    def qualified_journal(self) -> str:
        return f'"{self.schema}"."{self.table}_journal"'

    @property
    def qualified_layout(self) -> str:
        return f'"{self.schema}"."{self.table}_layout"'

    @property
    def qualified_migrations(self) -> str:
        return f'"{self.schema}"."{self.table}_migrations"'


def _parse(variable: str, type_name: str, raw: str) -> Any:
    try:
        if "bool" in type_name:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in type_name:
            if "None" in type_name and raw.strip().lower() in ("none", "null", "unlimited"):
                return None
            return int(raw)
        if "float" in type_name:
            return float(raw)
    except ValueError:
        raise ConfigurationError(f"{variable}: cannot parse {raw!r} as {type_name}") from None
    return raw


# How each required setting is given: what it is, the command-line flag, the environment variables.
_REQUIRED = {
    "redis_url": ("Redis URL", "--redis-url", ("TIERED_SESSIONS_REDIS_URL", "REDIS_URL")),
    "database_url": ("PostgreSQL URL", "--database-url", ("TIERED_SESSIONS_DATABASE_URL", "DATABASE_URL")),
}

# Query arguments that carry credentials: libpq's and asyncpg's password and sslpassword, redis-py's username and
# password. URLs show none of them; free text is scrubbed of the passwords (a user name is too common a word).
_SECRET_ARGUMENTS = frozenset({"password", "sslpassword", "username"})
_PASSWORD_ARGUMENTS = frozenset({"password", "sslpassword"})


def redact_url(url: str | None) -> str:
    """The URL with every credential (userinfo password, credential query arguments) replaced by ``***``: safe
    for logs, errors and metrics."""
    if not url:
        return "<unset>"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(f"{name}=***" if name.lower() in _SECRET_ARGUMENTS else pair
                     for pair in parts.query.split("&") if pair
                     for name in [pair.partition("=")[0]])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_message(message: str, url: str | None) -> str:
    """Drivers sometimes echo the DSN, or a password, in their errors: replace the URL by its redacted form
    and every credential in it, as written and decoded, by ``***``."""
    if not url:
        return message
    message = message.replace(url, redact_url(url))
    for secret in sorted(_secrets(url), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def _secrets(url: str) -> set[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return set()
    written = [parts.password or ""] if parts.password else []
    written += [value for name, _, value in (pair.partition("=") for pair in parts.query.split("&"))
                if name.lower() in _PASSWORD_ARGUMENTS and value]
    return {form for value in written for form in (value, unquote(value), unquote_plus(value)) if form}
