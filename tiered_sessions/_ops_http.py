"""The HTTP endpoints of ``tiered-sessions flusher --metrics-port N``:

* ``/metrics``: Prometheus exposition (text or OpenMetrics, by the Accept header) of the metrics this process
  can move (``endpoint_registry``). Each scrape runs the readiness checks: the global gauges (flush lag,
  backlog, live sessions, stored dead letters) are read from Redis, so they stay fresh even while the flusher
  itself is stuck retrying, and ``tiered_sessions_ready`` says what ``/readyz`` would.
* ``/healthz``: 200 while the process, its event loop and every supervised background task (the flush loop
  first) are alive; 503 naming the tasks that died and wait to be restarted.
* ``/readyz``: 200 when Redis and PostgreSQL answer and the flush lag is at most ``ready_max_lag`` seconds,
  else 503; the JSON body says which check failed. While the process drains on its way out it is 503 with
  ``"stopping": true``, and the other checks (and ``/metrics``) still report the tier as it drains.

A flusher whose layout the tier refuses (``LayoutMismatch``) serves them in ``refused`` mode until stopped:
503 on ``/healthz`` and ``/readyz`` naming the difference, ``tiered_sessions_layout_refused`` 1 on ``/metrics``,
so a refused deploy is an alert, not a silent restart loop.

Both checks run side by side, each bounded by ``check_timeout``: a server that hangs (accepts connections,
answers nothing) costs one bound, and is named ("no answer within 3s"). A check still waiting is not started
again: later requests report the one in flight, so a hung server never piles up calls.

A small asyncio server in the flusher's own event loop (no thread): a scrape uses the manager's own clients,
and an event loop that stopped turning shows up as a failed health check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import metrics
from .config import redact_message
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._hot_tier import TierReading
    from .manager import SessionManager

log = logging.getLogger(__name__)
T = TypeVar("T")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_REQUEST_TIMEOUT = 10.0


def endpoint_registry(*, serves_calls: bool) -> CollectorRegistry:
    """What a process serving these endpoints exports: its own (CPU, memory, file descriptors, GC, Python) and the
    tier's metrics it can move (``metrics.exported``; the hot path's only with ``serves_calls``)."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    metrics.register(registry, serves_calls=serves_calls, serves_endpoints=True)
    return registry


class Hung(Exception):
    """A check got no answer within its bound."""


class _Check:
    """One backend's check, at most one call in flight: a call still waiting after the bound is reported and
    left to end by its driver's own timeout; requests meanwhile wait for that call instead of starting another."""

    def __init__(self, call: str) -> None:
        self.call = call
        self._task: asyncio.Future[Any] | None = None
        self._since = 0.0

    async def run(self, start: Callable[[], Awaitable[T]], timeout: float) -> T:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(start())
            self._task.add_done_callback(_retrieve)
            self._since = time.monotonic()
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise Hung(f"no answer within {timeout:g}s ({self.call} waiting for {time.monotonic() - self._since:.0f}s)")
        try:
            result: T = task.result()
        except TimeoutError:  # the driver's own bound, no shorter than ours
            raise Hung(f"no answer within {timeout:g}s ({self.call})") from None
        return result


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A hung call may end after every request waiting for it has gone: its error is in the body already."""
    if not task.cancelled():
        task.exception()


class OpsServer:
    """Serves /metrics, /healthz and /readyz for one ``SessionManager`` (started already)."""

    def __init__(self, manager: SessionManager, *, host: str = "127.0.0.1", port: int = 0,
                 ready_max_lag: float = 30.0, check_timeout: float | None = None,
                 registry: CollectorRegistry | None = None, serves_calls: bool = True,
                 refused: str | None = None) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.ready_max_lag = ready_max_lag
        self.check_timeout = check_timeout or min(manager.settings.socket_timeout_secs, 5.0)
        self.registry = registry if registry is not None else endpoint_registry(serves_calls=serves_calls)
        self._server: asyncio.Server | None = None
        self._redis = _Check("reading the tier from Redis")
        self._postgres = _Check("SELECT 1 on PostgreSQL")
        self.refused = refused  # why this process refused to start (its manager is not started)
        metrics.LAYOUT_REFUSED.set(0 if refused is None else 1)

    async def start(self) -> int:
        """Listen; returns the bound port (the one the OS chose for port 0)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- the endpoints ----------------------------------------------------------------------------------------
    async def metrics_page(self, accept: str) -> tuple[int, str, bytes]:
        _, checks = await self.readiness()
        if checks.get("redis", "ok") != "ok":  # serve the last values; the scrape itself must not fail
            metrics.BACKEND_ERRORS.labels("redis", "metrics").inc()
            log.warning("/metrics: cannot read the tier's gauges from Redis, serving the last values: %s",
                        checks["redis"])
        encoder, content_type = choose_encoder(accept)
        return 200, content_type, encoder(self.registry)

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.refused is not None:
            return 503, {"status": "refused to start", "error": self.refused}
        down = self.manager.worker.down()
        if not down:
            return 200, {"status": "alive"}
        return 503, {"status": "background tasks down", "down": down}

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        if self.refused is not None:
            metrics.READY.set(0)
            return 503, {"ready": False, "refused": self.refused}
        checks: dict[str, Any] = {}
        reading, postgres = await asyncio.gather(self._check_redis(), self._check_postgres())
        if isinstance(reading, str):
            checks["redis"] = reading
        else:
            checks["redis"] = "ok"
            checks["flush_lag_seconds"] = round(reading.flush_lag_seconds, 3)
            checks["dirty_sessions"] = reading.dirty_sessions
            if reading.flush_lag_seconds > self.ready_max_lag:
                checks["flush_lag"] = f"{reading.flush_lag_seconds:.1f}s is over the {self.ready_max_lag:g}s limit"
        checks["postgres"] = postgres
        down = self.manager.worker.down()
        if down:
            checks["down"] = down
        if self.manager.stopping:  # draining on the way out: no new work should come here
            checks["stopping"] = True
        ready = (checks["redis"] == "ok" and postgres in ("ok", "not used") and "flush_lag" not in checks
                 and not down and not self.manager.stopping)
        metrics.READY.set(1 if ready else 0)
        return (200 if ready else 503), {"ready": ready, **checks}

    async def _check_redis(self) -> TierReading | str:
        try:
            return await self._redis.run(lambda: metrics.refresh(self.manager), self.check_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the body says which
            return f"error: {self._describe(exc)}"

    async def _check_postgres(self) -> str:
        store = self.manager.store
        if store is None:
            return "not used"
        try:
            await self._postgres.run(store.ping, self.check_timeout)
        except Exception as exc:  # noqa: BLE001
            return f"error: {self._describe(exc)}"
        return "ok"

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, Hung):
            return str(exc)
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        for url in (self.manager.settings.redis_url, self.manager.settings.database_url):
            text = redact_message(text, url)
        return text

    # -- HTTP ---------------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request = (await reader.readline()).decode("latin-1").split()
                accept = ""
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "accept":
                        accept = value.strip()
            status, content_type, body = await self._route(request, accept)
            head = request[0] == "HEAD" if request else False
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1"))
            if not head:
                writer.write(body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as exc:
            log.debug("HTTP request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, request: list[str], accept: str) -> tuple[int, str, bytes]:
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            return _json(400, {"error": "bad request"})
        method, target = request[0], request[1].split("?", 1)[0]
        if target not in ("/metrics", "/healthz", "/readyz"):
            return _json(404, {"error": "not found", "endpoints": ["/metrics", "/healthz", "/readyz"]})
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": "use GET"})
        log.debug("%s %s", method, target)
        if target == "/metrics":
            return await self.metrics_page(accept)
        if target == "/healthz":
            return _json(*self.health())
        return _json(*await self.readiness())


@contextlib.asynccontextmanager
async def serving(manager: SessionManager, port: int | None, host: str, **options: Any) -> AsyncIterator[None]:
    """Serve the endpoints for ``manager`` on ``port`` (None: no server; 0: any free port, logged) while the block
    runs; on the way out close the manager, then the server, so /healthz answers while it drains."""
    server = None
    try:
        if port is not None:
            server = OpsServer(manager, host=host, port=port, **options)
            try:
                bound = await server.start()
            except OSError as exc:
                raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from None
            log.info("serving /metrics, /healthz, /readyz on http://%s:%d", host, bound)
        yield
    finally:
        try:
            await manager.close()
        finally:
            if server is not None:
                await server.close()


def _json(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"
