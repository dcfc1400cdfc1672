"""A redis-server child process.

Rule: a throwaway Redis, nothing more: loopback only, no RDB snapshots (AOF when asked for), and ready only
once the process we started answers on its port.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ._binaries import find_redis_server
from ._lifecycle import HOST, ManagedServer
from ._probes import redis_ready


class RedisServer(ManagedServer):
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
        return f"redis://{auth}{HOST}:{self.port}/0"

    def _prepare(self) -> None:
        if self._binary is None:
            self._binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, port: int, log: int) -> subprocess.Popen[bytes]:
        assert self._binary is not None
        args = [str(self._binary), "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "yes" if self._appendonly else "no", "--dir", str(self.data_dir),
                "--daemonize", "no", "--protected-mode", "no", *self._extra_args]
        if self._password:
            args += ["--requirepass", self._password]
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def _ready(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        # our process must be the one answering, not someone who grabbed the port first
        redis_ready(HOST, port, password=self._password, pid=proc.pid)
