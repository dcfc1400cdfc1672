"""The HTTP endpoints of ``tiered-sessions flusher --metrics-port N``:

* ``/metrics``: Prometheus exposition (text or OpenMetrics, by the Accept header). The global gauges (flush lag,
  backlog, live sessions, stored dead letters) are read from Redis at each scrape, so they stay fresh even while
  the flusher itself is stuck retrying.
* ``/healthz``: 200 while the process, its event loop and every supervised background task (the flush loop
  first) are alive; 503 naming the tasks that died and wait to be restarted.
* ``/readyz``: 200 when Redis and PostgreSQL answer and the flush lag is at most ``ready_max_lag`` seconds,
  else 503; the JSON body says which check failed.

A small asyncio server in the flusher's own event loop (no thread): a scrape uses the manager's own clients,
and an event loop that stopped turning shows up as a failed health check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import metrics
from .config import redact_message

if TYPE_CHECKING:
    from .manager import SessionManager

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_REQUEST_TIMEOUT = 10.0


class OpsServer:
    """Serves /metrics, /healthz and /readyz for one ``SessionManager`` (started already)."""

    def __init__(self, manager: SessionManager, *, host: str = "127.0.0.1", port: int = 0,
                 ready_max_lag: float = 30.0, check_timeout: float | None = None,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.ready_max_lag = ready_max_lag
        self.check_timeout = check_timeout or min(manager.settings.socket_timeout_secs, 5.0)
        self.registry = registry
        self._server: asyncio.Server | None = None

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
        try:
            await asyncio.wait_for(metrics.refresh(self.manager), self.check_timeout)
        except Exception as exc:  # noqa: BLE001 - serve the last values; the scrape itself must not fail
            metrics.BACKEND_ERRORS.labels("redis", "metrics").inc()
            log.warning("/metrics: cannot read the tier's gauges from Redis, serving the last values: %s",
                        self._describe(exc))
        encoder, content_type = choose_encoder(accept)
        return 200, content_type, encoder(self.registry)

    def health(self) -> tuple[int, dict[str, Any]]:
        down = self.manager.worker.down()
        if not down:
            return 200, {"status": "alive"}
        return 503, {"status": "background tasks down", "down": down}

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ready = True
        try:
            reading = await asyncio.wait_for(metrics.refresh(self.manager), self.check_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the body says which
            ready = False
            checks["redis"] = f"error: {self._describe(exc)}"
        else:
            checks["redis"] = "ok"
            checks["flush_lag_seconds"] = round(reading.flush_lag_seconds, 3)
            checks["dirty_sessions"] = reading.dirty_sessions
            if reading.flush_lag_seconds > self.ready_max_lag:
                ready = False
                checks["flush_lag"] = f"{reading.flush_lag_seconds:.1f}s is over the {self.ready_max_lag:g}s limit"
        store = self.manager.store
        if store is None:
            checks["postgres"] = "not used"
        else:
            try:
                async with asyncio.timeout(self.check_timeout):
                    await store.ping()
            except Exception as exc:  # noqa: BLE001
                ready = False
                checks["postgres"] = f"error: {self._describe(exc)}"
            else:
                checks["postgres"] = "ok"
        down = self.manager.worker.down()
        if down:
            ready = False
            checks["down"] = down
        return (200 if ready else 503), {"ready": ready, **checks}

    def _describe(self, exc: BaseException) -> str:
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


def _json(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"
