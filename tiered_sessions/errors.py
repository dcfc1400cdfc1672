"""Every error tiered_sessions raises on purpose is one of these classes."""

from __future__ import annotations


class TieredSessionsError(Exception):
    """Base class of the library's errors."""


class InvalidSessionId(TieredSessionsError, ValueError):
    """A session id is empty, too long, not a string, or has characters outside ``[A-Za-z0-9-_.:]``."""


class InvalidSessionData(TieredSessionsError, ValueError):
    """Data or metadata that cannot be stored as PostgreSQL jsonb (not a JSON object, NaN, NUL, ...)."""


class SessionTooLarge(InvalidSessionData):
    """The session (data + metadata as stored) would exceed ``max_session_bytes``."""


class SessionNotFound(TieredSessionsError, KeyError):
    """The session does not exist, was removed, or has expired."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else "session not found"


class SessionLimitExceeded(TieredSessionsError, RuntimeError):
    """``max_concurrent_sessions`` live sessions exist already."""


class BackpressureError(TieredSessionsError, RuntimeError):
    """The dirty backlog is past its high watermark and did not drain within the writer's timeout."""


class ConfigurationError(TieredSessionsError, ValueError):
    """A setting is missing or out of range."""


class LayoutMismatch(ConfigurationError):
    """This process's layout (partitions, key prefix) differs from the one the tier recorded: it refuses to start."""


class MissingSetting(ConfigurationError):
    """A required setting was not given; the message names the argument, the command-line flag and the
    environment variables that set it."""


class BackendUnavailable(TieredSessionsError, ConnectionError):
    """Redis or PostgreSQL cannot be reached. The message names which, with the URL minus its password."""


class RedisUnavailable(BackendUnavailable):
    """Redis cannot be reached."""


class PostgresUnavailable(BackendUnavailable):
    """PostgreSQL cannot be reached. ``down``: it does not answer (refused, timed out, starting or shutting
    down), which passes; False when it answered and refused us (TLS, authentication, no such database), which
    needs a fix."""

    def __init__(self, message: str, *, down: bool = True) -> None:
        super().__init__(message)
        self.down = down


class RedisFull(TieredSessionsError, RuntimeError):
    """Redis refused a write: it is at its ``maxmemory`` and evicts nothing (``noeviction``, as the tier asks).
    Nothing of that call was written; reads go on. Not ``BackendUnavailable``: Redis answers, and writing
    around it to Postgres would outrun what the flusher can bring back once there is room."""


class MigrationError(TieredSessionsError, RuntimeError):
    """A migration failed, or the existing table is not compatible with the sessions table."""


class EmbeddedServerError(TieredSessionsError, RuntimeError):
    """An embedded Redis or PostgreSQL server could not be found or started."""


class VersionConflict(TieredSessionsError):
    """An update's ``expected_version`` is not the session's version: someone else changed it first."""

    def __init__(self, message: str, current_version: int | None) -> None:
        super().__init__(message)
        self.current_version = current_version


class LockTimeout(TieredSessionsError, TimeoutError):
    """``SessionManager.lock`` waited its ``timeout`` and the session's lock was still held by someone else."""


class LockLost(TieredSessionsError, RuntimeError):
    """A session lock's lease ran out while it was held: the block it guarded was not exclusive to its end."""


class SessionAlreadySaved(TieredSessionsError, RuntimeError):
    """The web middleware saved the session when the response started; later changes would be lost."""
