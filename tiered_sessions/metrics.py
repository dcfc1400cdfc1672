"""Prometheus metrics of the session tier: prefix ``tiered_sessions_``, base units (seconds), ``_total`` counters.

Two kinds, so that several processes exporting at once never double-count (docs/operations.md has the list):

* **Per process** (every counter and histogram, and ``tiered_sessions_mode``): what this process did.
  Aggregate across processes with ``sum()`` (of ``rate()`` for counters).
* **Global readings of the tiers** (flush lag, dirty sessions, live sessions, stored dead letters from Redis;
  journal entries pending from Postgres): every process that refreshes them reads the same keys and exports
  the same value. Aggregate with
  ``max()``, never ``sum()``. A process that never refreshed them exports 0, which ``max()`` ignores.

A process exports only the metrics it can move. The hot path's (``HOT_PATH``: reads, call latency, backpressure
rejections, event listener errors) move only in a process that serves calls, so ``tiered-sessions flusher``
leaves them out; the endpoints' own (``ENDPOINTS``: readiness, a refused layout) only in a process serving
``/readyz`` (``_ops_http``), so they are on no registry by default. Every other metric is registered on
prometheus_client's default ``REGISTRY``; a daemon that serves its own registry adds them with
``register(registry)``. The global readings are refreshed by the flusher loop after each pass (the journal's
by it alone), and by ``await refresh(manager)`` (the ``/metrics`` endpoint of ``tiered-sessions flusher`` calls
it per scrape); a drain or a one-off ``flush()`` leaves them alone, so no process exports a stale reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from ._hot_tier import TierReading

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# -- per process --------------------------------------------------------------------------------------------
FLUSHED_ROWS = Counter("tiered_sessions_flushed_rows_total",
                       "Rows written to Postgres by the flusher, by kind (upsert, activity, tombstone, expired).",
                       ["kind"])
FLUSH_ERRORS = Counter("tiered_sessions_flush_errors_total",
                       "Failed flush attempts, by error kind (the exception's class name).", ["kind"])
FLUSH_REFUSED = Counter("tiered_sessions_flush_refused_total",
                        "Rows Postgres's version guard refused because it held a newer version (a Redis copy "
                        "behind Postgres, or journaled writes not replayed yet): rebased and written again.")
POISON_KEYS = Counter("tiered_sessions_poison_keys_total",
                      "Keys found where a session hash belongs that are not one (another type): moved to "
                      "quarantine and listed with the dead letters, so their partition keeps flushing.")
JOURNAL_REPLAYED = Counter("tiered_sessions_journal_replayed_total",
                           "Journal entries (writes taken while Redis was unreachable) folded back into Redis.")
FLUSH_RETRIES = Counter("tiered_sessions_flush_retries_total", "Flush attempts retried after a backoff.")
FLUSH_BATCH_ROWS = Histogram("tiered_sessions_flush_batch_rows",
                             "Rows per write statement (whole rows or activity rows).",
                             buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
FLUSH_DURATION = Histogram("tiered_sessions_flush_duration_seconds",
                           "Time of one flush pass (claim, write, ack).",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
READS = Counter("tiered_sessions_reads_total",
                "Session reads by the tier that answered: hot (Redis), cold (read-through from Postgres), miss.",
                ["tier"])
BACKEND_ERRORS = Counter("tiered_sessions_backend_errors_total", "Failed calls to Redis or Postgres.",
                         ["backend", "operation"])
DEAD_LETTERS = Counter("tiered_sessions_dead_letters_total", "Rows Postgres rejected, moved to the dead-letter store.")
BACKPRESSURE_REJECTIONS = Counter("tiered_sessions_backpressure_rejections_total",
                                  "Writes refused with BackpressureError after waiting for the backlog to drain.")
# One call in OPERATION_SAMPLE_EVERY per operation is timed: an observe on every call is a measurable share of a
# hot-path call (docs/benchmarks.md). _count and _sum are of the sampled calls.
OPERATION_SAMPLE_EVERY = 16
OPERATION_DURATION = Histogram(
    "tiered_sessions_operation_duration_seconds",
    f"Latency of SessionManager calls, by operation (sampled: one call in {OPERATION_SAMPLE_EVERY}).",
    ["operation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
MODES = ("normal", "degraded")
MODE = Gauge("tiered_sessions_mode",
             "1 for the mode this process runs in, 0 for the other: normal (write-behind) or degraded "
             "(writing through to Postgres).", ["mode"])
TASK_RESTARTS = Counter("tiered_sessions_task_restarts_total",
                        "Background tasks (flusher, cleanup, backlog, redis-probe) that died of an unexpected error "
                        "and were restarted (per process).", ["task"])
EVENT_ERRORS = Counter("tiered_sessions_event_listener_errors_total",
                       "Lifecycle event listeners that raised (per process).", ["kind"])

# -- global readings of Redis (the same in every process: aggregate with max()) -------------------------------
FLUSH_LAG = Gauge("tiered_sessions_flush_lag_seconds",
                  "Age of the oldest session not yet in Postgres. Global reading of Redis: aggregate with max().")
DIRTY_SESSIONS = Gauge("tiered_sessions_dirty_sessions",
                       "Sessions not yet in Postgres, per partition. Global reading of Redis: aggregate with max().",
                       ["partition"])
LIVE_SESSIONS = Gauge("tiered_sessions_live_sessions",
                      "Live sessions in the whole tier. Global reading of Redis: aggregate with max().")
DEAD_LETTERS_STORED = Gauge("tiered_sessions_dead_letters_stored",
                            "Dead letters waiting in the store (tiered-sessions dead-letters list). Global reading "
                            "of Redis: aggregate with max().")
JOURNAL_PENDING = Gauge("tiered_sessions_journal_pending",
                        "Journal entries (writes taken while Redis was unreachable) not yet folded back into Redis. "
                        "Global reading of Postgres: aggregate with max().")

# -- the endpoints' own (only a process serving /readyz exports them: _ops_http) -------------------------------
READY = Gauge("tiered_sessions_ready",
              "1 when this process's last readiness check passed (Redis and Postgres answer, flush lag under the "
              "limit, no background task down), else 0. Checked at every scrape and /readyz.", registry=None)
LAYOUT_REFUSED = Gauge("tiered_sessions_layout_refused",
                       "1 while this process refuses to start because its layout (partitions, key prefix) differs "
                       "from the one the tier recorded.", registry=None)

# What a process exports (see the module's docstring).
HOT_PATH: tuple[MetricWrapperBase, ...] = (READS, OPERATION_DURATION, BACKPRESSURE_REJECTIONS, EVENT_ERRORS)
ENDPOINTS: tuple[MetricWrapperBase, ...] = (READY, LAYOUT_REFUSED)


def set_mode(mode: str) -> None:
    """Export ``mode`` (``normal`` or ``degraded``) as this process's mode: 1 for it, 0 for the other."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name in MODES:
        MODE.labels(name).set(1 if name == mode else 0)


set_mode("normal")
# Series that exist from the start with the values they can take, so rate() over them reads 0 rather than "no
# data" and sees the first increment. Flush errors are labelled with the exception's class: the ones a server
# out of reach raises are known (a killed or restarting Postgres, a hung one, a lost Redis).
FLUSH_ERROR_KINDS = ("ConnectionRefusedError", "ConnectionResetError", "ConnectionDoesNotExistError",
                     "CannotConnectNowError", "TooManyConnectionsError", "AdminShutdownError", "TimeoutError",
                     "ConnectionError", "PostgresUnavailable")
TASKS = ("flusher", "cleanup", "backlog", "events", "redis-probe")
for _kind in ("upsert", "activity", "tombstone", "expired"):
    FLUSHED_ROWS.labels(_kind)
for _kind in FLUSH_ERROR_KINDS:
    FLUSH_ERRORS.labels(_kind)
for _task in TASKS:
    TASK_RESTARTS.labels(_task)
# Bound once: a labels() lookup on every read would cost the hot path a lock and a dict lookup.
READS_BY_TIER: Final = {tier: READS.labels(tier) for tier in ("hot", "cold", "miss")}
for _kind in ("created", "removed", "expired"):
    EVENT_ERRORS.labels(_kind)


class OperationTimer:
    """Decides which calls of one operation are timed (one in ``every``, the first included) and records them."""

    __slots__ = ("_child", "_every", "_left")

    def __init__(self, operation: str, every: int = OPERATION_SAMPLE_EVERY) -> None:
        self._child = OPERATION_DURATION.labels(operation)
        self._every = every
        self._left = 1

    def due(self) -> bool:
        self._left -= 1
        if self._left:
            return False
        self._left = self._every
        return True

    def observe(self, seconds: float) -> None:
        self._child.observe(seconds)


def all_metrics() -> list[MetricWrapperBase]:
    """Every metric this module defines (including any added later)."""
    return [value for value in globals().values() if isinstance(value, MetricWrapperBase)]


def exported(*, serves_calls: bool = True, serves_endpoints: bool = False) -> list[MetricWrapperBase]:
    """The metrics a process exports: without ``serves_calls`` none of ``HOT_PATH``, without ``serves_endpoints``
    none of ``ENDPOINTS``."""
    left_out = (() if serves_calls else HOT_PATH) + (() if serves_endpoints else ENDPOINTS)
    return [metric for metric in all_metrics() if not any(metric is other for other in left_out)]


class TierCollector(Collector):
    """Yields this module's metrics: lets a daemon add them to a registry of its own (see ``register``)."""

    def __init__(self, chosen: list[MetricWrapperBase] | None = None) -> None:
        self._chosen = chosen

    def _metrics(self) -> list[MetricWrapperBase]:
        return exported() if self._chosen is None else self._chosen

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics():
            yield from metric.collect()

    def describe(self) -> Iterable[Metric]:
        for metric in self._metrics():
            yield from metric.describe()


def register(registry: CollectorRegistry, *, serves_calls: bool = True,
             serves_endpoints: bool = False) -> TierCollector:
    """Add the tiered_sessions metrics a process exports (see ``exported``) to ``registry`` (a daemon's own; they
    are on ``REGISTRY`` already). Returns the collector, for ``registry.unregister``."""
    if registry is REGISTRY:
        raise ValueError("the tiered_sessions metrics are on prometheus_client.REGISTRY already")
    collector = TierCollector(exported(serves_calls=serves_calls, serves_endpoints=serves_endpoints))
    registry.register(collector)
    return collector


class _ReadsTheTier(Protocol):
    async def tier_reading(self) -> TierReading: ...


def export(reading: TierReading) -> None:
    """Set the global gauges from one reading of the tier."""
    for partition, dirty in enumerate(reading.dirty_per_partition):
        DIRTY_SESSIONS.labels(str(partition)).set(dirty)
    FLUSH_LAG.set(reading.flush_lag_seconds)
    LIVE_SESSIONS.set(reading.live_sessions)
    if reading.dead_letters_stored is not None:
        DEAD_LETTERS_STORED.set(reading.dead_letters_stored)


async def refresh(manager: _ReadsTheTier) -> TierReading:
    """Read the global gauges' values from Redis (two pipelined round trips) and set them. A daemon's own
    ``/metrics`` handler can await this before rendering; the flusher also sets lag and backlog after each pass."""
    reading = await manager.tier_reading()
    export(reading)
    return reading
