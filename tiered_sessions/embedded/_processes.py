"""A server's process tree: its descendants, whether they live, and killing all of it.

Rule: a process is named by its pid *and* its start time (a pid alone may be reused), the tree is found
through the parent links in /proc (PostgreSQL's children call setsid(), so the process group misses them),
and a kill returns only once every process of the tree is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from ..errors import EmbeddedServerError

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.05

ProcessId = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from /proc/<pid>/stat, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ... starttime is #22
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> set[ProcessId]:
    """All live descendants of ``pid``, found through the parent links in /proc."""
    children: dict[int, list[ProcessId]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _proc_stat(int(entry.name))) is not None and info[0] != "Z":
            children.setdefault(info[1], []).append((int(entry.name), info[2]))
    found: set[ProcessId] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child[0])
    return found


def alive(process: ProcessId) -> bool:
    info = _proc_stat(process[0])
    return info is not None and info[2] == process[1] and info[0] not in ("Z", "X")


def send_signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        logger.debug("pid %d already gone (signal %s)", pid, sig.name)


def kill_tree(proc: subprocess.Popen[bytes], timeout: float) -> None:
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
    tree: set[ProcessId] = set()
    if proc.poll() is None:
        send_signal(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 1.0
        while (info := _proc_stat(proc.pid)) is not None and info[0] not in ("T", "t", "Z", "X"):
            if time.monotonic() > deadline:
                break  # snapshot anyway: only a fork racing the snapshot could be missed
            time.sleep(0.001)
        tree = descendants(proc.pid)
        for pid, _start in tree:
            send_signal(pid, signal.SIGKILL)
        send_signal(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(alive(process) for process in tree):
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"processes {sorted(p[0] for p in tree if alive(p))} survive SIGKILL")
        time.sleep(_POLL_INTERVAL)
