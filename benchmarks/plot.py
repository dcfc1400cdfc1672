"""The throughput-against-concurrency plot (PNG), if matplotlib is importable; it is not a dependency."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from .harness import OURS, ScenarioResult

PREFIX = "update_activity@"


def plot_throughput(results: Sequence[ScenarioResult], path: Path) -> bool:
    """Write the plot; False (with a message on stderr) when matplotlib or the update_activity runs are missing."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib) - not writing {path}",
              file=sys.stderr)
        return False
    runs = sorted((int(r.name.removeprefix(PREFIX)), r) for r in results if r.name.startswith(PREFIX))
    if not runs:
        print("plot skipped: no update_activity@N scenario was run", file=sys.stderr)
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=120)
    names = list(runs[0][1].figures)
    for name in names:
        xs = [tasks for tasks, r in runs if name in r.figures]
        ys = [r.figures[name].ops_per_s for _, r in runs if name in r.figures]
        axes.plot(xs, ys, marker="o", linewidth=2.5 if name == OURS else 1.5, label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks([tasks for tasks, _ in runs], [str(tasks) for tasks, _ in runs])
    axes.set_xlabel("concurrent tasks")
    axes.set_ylabel("update_activity calls/s (median round)")
    axes.set_title("update_activity throughput against concurrency")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    print(f"plot written to {path}", file=sys.stderr)
    return True
