"""tiered_sessions: a write-behind session tier (Redis hot tier, PostgreSQL cold tier)."""

from .cold_tier import PostgresSessionStore, SessionPage
from .config import Settings
from .errors import (
    BackendUnavailable,
    BackpressureError,
    ConfigurationError,
    InvalidSessionData,
    InvalidSessionId,
    LockLost,
    LockTimeout,
    MigrationError,
    MissingSetting,
    PostgresUnavailable,
    RedisFull,
    RedisUnavailable,
    SessionAlreadySaved,
    SessionLimitExceeded,
    SessionNotFound,
    SessionTooLarge,
    TieredSessionsError,
    VersionConflict,
)
from .manager import SessionManager
from .model import Session

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "BackpressureError",
    "ConfigurationError",
    "InvalidSessionData",
    "InvalidSessionId",
    "LockLost",
    "LockTimeout",
    "MigrationError",
    "MissingSetting",
    "PostgresSessionStore",
    "PostgresUnavailable",
    "RedisFull",
    "RedisUnavailable",
    "Session",
    "SessionAlreadySaved",
    "SessionLimitExceeded",
    "SessionManager",
    "SessionNotFound",
    "SessionPage",
    "SessionTooLarge",
    "Settings",
    "TieredSessionsError",
    "VersionConflict",
    "__version__",
]
