"""A PostgreSQL postmaster child process.

Rule: a throwaway cluster on loopback with trust authentication for user ``postgres``; initdb runs once per
data dir; a crash leaves the data dir as a crashed server would (the next start runs crash recovery). As root
the server runs as ``nobody`` (see ``_privileges``).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import EmbeddedServerError
from ._binaries import find_pg_bin_dir
from ._lifecycle import HOST, ManagedServer, remove_dir
from ._privileges import (
    UNPRIVILEGED_USER,
    bin_dir_usable_by_unprivileged,
    chown_tree,
    traversable_by_others,
    unprivileged_ids,
    world_tmp,
)
from ._probes import ProbeError, postgres_ready

logger = logging.getLogger(__name__)

_INITDB_TIMEOUT = 300.0


class PostgresServer(ManagedServer):
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
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _prepare(self) -> None:
        if self._bin_dir is None:
            bin_dir = find_pg_bin_dir()
            if os.geteuid() == 0:
                self._run_as = unprivileged_ids()
                bin_dir = bin_dir_usable_by_unprivileged(bin_dir)
            self._bin_dir = bin_dir
        data = self.data_dir
        if self._run_as is not None and not traversable_by_others(data.parent):
            raise EmbeddedServerError(
                f"PostgreSQL runs as {UNPRIVILEGED_USER!r} when started as root, and cannot reach {data}: "
                "a directory above it is not traversable by others. Use a data dir under a traversable "
                "directory such as /tmp (or no data dir at all for a temp one)")
        data.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None and data.stat().st_uid != self._run_as[0]:
            chown_tree(data, *self._run_as)
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
            self._socket_dir = Path(tempfile.mkdtemp(prefix="tiered-sessions-pgsock-", dir=world_tmp()))
            if self._run_as is not None:
                os.chown(self._socket_dir, *self._run_as)
        settings = {"max_connections": "200", "listen_addresses": HOST}
        if self._fast:
            # Not synchronous_commit=off: it acknowledges commits whose WAL is still in shared memory, and
            # a SIGKILL then loses them. With fsync=off a commit's WAL is still write()n to the OS before
            # the ack, so committed rows survive a process crash (only an OS crash can lose them).
            settings |= {"fsync": "off", "full_page_writes": "off"}
        settings |= self._extra_settings
        args = [str(self._bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(port), "-h", HOST,
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
            raise ProbeError("no postmaster.pid yet") from exc
        if len(lines) < 8 or lines[0].strip() != str(proc.pid) or lines[7].strip() != "ready":
            raise ProbeError("postmaster not ready yet")
        postgres_ready(HOST, port)

    def _after_exit(self) -> None:
        if self._socket_dir is not None:
            remove_dir(self._socket_dir)
            self._socket_dir = None
