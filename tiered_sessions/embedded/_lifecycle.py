"""The life of one server process: start on a free loopback port, probe until ready, stop, kill, restart.

Rules: every server runs in its own session, so Ctrl-C in a terminal does not reach it before we shut it down
ourselves. A start that fails leaves no process behind. A chosen port that was taken before the server bound
it ("Address already in use") is swapped for another; an explicit port never is, and once a server has run
on a port its restarts keep it, so URLs handed out stay valid. Errors carry the tail of the server's log.
Servers still running, and the temp dirs we created, are cleaned up when the interpreter exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from ..errors import EmbeddedServerError
from ._privileges import world_tmp
from ._probes import ProbeError
from ._processes import descendants, kill_tree, send_signal

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_PORT_ATTEMPTS = 5
_LOG_TAIL_BYTES = 4000
_POLL_INTERVAL = 0.05
_ADDRESS_IN_USE = "Address already in use"


class PortInUseError(EmbeddedServerError):
    """The server exited because its port was taken between choosing it and binding it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


_live_servers: set[ManagedServer] = set()
_owned_dirs: set[Path] = set()
_registry_lock = threading.Lock()


def remove_dir(path: Path) -> None:
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
        remove_dir(path)


class ManagedServer:
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
                self._owned_tmp = Path(tempfile.mkdtemp(prefix=self._temp_prefix, dir=world_tmp()))
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
                port = self._port if self._port is not None else free_port()
                try:
                    self._start_on(port, timeout)
                except PortInUseError:
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
                    kill_tree(proc, timeout)
            logger.info("%s on port %s stopped", self._kind, self._port)
            self._reap()

    def kill(self) -> None:
        """SIGKILL the server and all its child processes (a crash); committed data stays on disk."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            kill_tree(proc, 10.0)
            logger.info("%s on port %s killed", self._kind, self._port)
            self._reap()

    def pause(self) -> None:
        """SIGSTOP the server and every process it started (PostgreSQL's backends answer the connections they
        hold): unreachable, its data kept (a hung host or a long GC pause)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                os.kill(self._proc.pid, signal.SIGSTOP)  # first: it forks nothing more meanwhile
                for pid, _ in descendants(self._proc.pid):
                    send_signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server and its processes."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                for pid, _ in descendants(self._proc.pid):
                    send_signal(pid, signal.SIGCONT)
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
        """Return when the server is ready; raise OSError or ProbeError when not yet."""
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
                    error = PortInUseError if _ADDRESS_IN_USE in tail else EmbeddedServerError
                    raise error(f"{self._kind} exited with code {code} while starting on port {port}; "
                                f"log {log_path}:\n{tail}")
                try:
                    self._ready(port, proc)
                except (OSError, ProbeError) as exc:
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
                kill_tree(proc, 10.0)
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
            remove_dir(self._owned_tmp)
            with _registry_lock:
                _owned_dirs.discard(self._owned_tmp)
            self._owned_tmp = None
