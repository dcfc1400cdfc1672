"""Timing windows, alternating rounds, percentiles, targets and the result table.

A *window* runs ``concurrency`` tasks calling one operation in a loop for a fixed time and counts the calls
that complete inside it (after a short warm-up), with each call's latency. A scenario runs every contender
(tiered_sessions first, then each baseline) once per round, for several rounds, and reports the median
round: on small shared machines one run swings by a quarter either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

OURS = "tiered_sessions"
T = TypeVar("T")

Op = Callable[[int], Awaitable[Any]]          # one call; the argument is the worker's index
Contender = Callable[[], Awaitable["Sample"]]  # one measured round of one implementation


@dataclasses.dataclass(slots=True)
class Sample:
    """One round of one contender: ``ops`` done in ``seconds``, and their latencies (seconds) if known."""

    ops: int
    seconds: float
    latencies: list[float] = dataclasses.field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted values; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclasses.dataclass(slots=True)
class Figure:
    """The median over rounds of one contender's throughput and latency percentiles."""

    ops_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    seconds: float                     # median duration of a round (for fixed-work scenarios: the time taken)
    rounds_ops_per_s: list[float]

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> Figure:
        timed = [s for s in samples if s.latencies]
        return cls(
            ops_per_s=statistics.median(s.ops_per_s for s in samples),
            p50_ms=statistics.median(percentile(s.latencies, 50) * 1000 for s in timed) if timed else None,
            p99_ms=statistics.median(percentile(s.latencies, 99) * 1000 for s in timed) if timed else None,
            seconds=statistics.median(s.seconds for s in samples),
            rounds_ops_per_s=[round(s.ops_per_s, 1) for s in samples],
        )


async def window(op: Op, concurrency: int, seconds: float, *, warmup: float = 0.0,
                 rate: float | None = None) -> Sample:
    """Run ``op`` from ``concurrency`` tasks for ``warmup + seconds``; count what completes after the warm-up.

    With ``rate`` (calls per second, all tasks together) each task paces itself to ``rate / concurrency``:
    a steady load generator rather than a closed loop.
    """
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + seconds
    latencies: list[float] = []
    period = concurrency / rate if rate else 0.0

    async def worker(index: int) -> None:
        next_at = start + index * period / concurrency
        while True:
            if period:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += period
            began = time.perf_counter()
            if began >= end:
                return
            await op(index)
            done = time.perf_counter()
            if measure_from <= done <= end:
                latencies.append(done - began)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return Sample(len(latencies), seconds, latencies)


async def timed(work: Callable[[], Awaitable[int]]) -> Sample:
    """A fixed amount of work (returns how many items it did), timed end to end: no per-item latency."""
    started = time.perf_counter()
    done = await work()
    return Sample(done, time.perf_counter() - started)


async def run_many(call: Callable[[], Awaitable[T]], count: int, tasks: int) -> list[T]:
    """Set-up work: ``count`` calls from ``tasks`` workers (not timed; no task per call)."""
    results: list[T] = []
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            results.append(await call())

    await asyncio.gather(*(worker() for _ in range(min(tasks, count))))
    return results


async def alternate(contenders: dict[str, Contender], rounds: int) -> dict[str, Figure]:
    """Rounds of ours, baseline, ours, baseline...; the median round of each contender."""
    samples: dict[str, list[Sample]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            samples[name].append(await run())
    return {name: Figure.from_samples(found) for name, found in samples.items()}


@dataclasses.dataclass(slots=True)
class Target:
    """One of the issue's targets: ``measured`` against ``bound`` (at least, or at most)."""

    text: str
    measured: float
    bound: float
    at_least: bool
    unit: str = "x"
    stretch: float | None = None

    @property
    def passed(self) -> bool:
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.text, "measured": round(self.measured, 4), "bound": self.bound,
                "comparison": ">=" if self.at_least else "<=", "unit": self.unit, "stretch": self.stretch,
                "pass": self.passed}


@dataclasses.dataclass(slots=True)
class ScenarioResult:
    name: str
    description: str
    figures: dict[str, Figure]   # OURS first, then each baseline
    targets: list[Target] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float]:
        """Our throughput divided by each baseline's (above 1: we are faster)."""
        ours = self.figures[OURS].ops_per_s
        return {name: ours / figure.ops_per_s if figure.ops_per_s else 0.0
                for name, figure in self.figures.items() if name != OURS}

    @property
    def paired_ratios(self) -> dict[str, list[float]]:
        """Per round, our throughput divided by the baseline's in the same round (the spread behind a ratio)."""
        ours = self.figures[OURS].rounds_ops_per_s
        return {name: [round(a / b, 3) if b else 0.0 for a, b in zip(ours, figure.rounds_ops_per_s, strict=False)]
                for name, figure in self.figures.items() if name != OURS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "results": {name: {"ops_per_s": round(f.ops_per_s, 1), "p50_ms": _round(f.p50_ms),
                               "p99_ms": _round(f.p99_ms), "seconds": round(f.seconds, 3),
                               "rounds_ops_per_s": f.rounds_ops_per_s}
                        for name, f in self.figures.items()},
            "ratios": {name: round(value, 3) for name, value in self.ratios.items()},
            "paired_ratios": self.paired_ratios,
            "targets": [target.as_dict() for target in self.targets],
            "extra": self.extra,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_tables(results: Sequence[ScenarioResult]) -> str:
    """Two markdown tables: every contender's figures with the ratio to it, then the targets."""
    lines = ["| scenario | implementation | ops/s | p50 ms | p99 ms | ours ÷ this |",
             "|---|---|--:|--:|--:|--:|"]
    for result in results:
        ratios = result.ratios
        for name, figure in result.figures.items():
            ratio = "" if name == OURS else f"{ratios[name]:.2f}x"
            lines.append(f"| {result.name} | {name} | {figure.ops_per_s:,.0f} | {_cell(figure.p50_ms, 3)} | "
                         f"{_cell(figure.p99_ms, 3)} | {ratio} |")
    lines += ["", "| scenario | target | measured | result |", "|---|---|--:|---|"]
    for result in results:
        for target in result.targets:
            stretch = ""
            if target.stretch is not None:
                stretch = " (stretch met)" if target.measured >= target.stretch else " (stretch not met)"
            lines.append(f"| {result.name} | {target.text} | {target.measured:,.3g}{target.unit} | "
                         f"{'PASS' if target.passed else 'MISS'}{stretch} |")
    return "\n".join(lines)
