"""The benchmark suite (minutes, run by hand) in its tiny --quick form, so the command never rots: every
scenario runs and reports positive throughput, its ratios and its targets. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCENARIOS = {"update_activity@1", "update_activity@16", "update_activity@64", "update_activity@256", "get_hot@1",
             "get_hot@64", "get_cold", "ensure", "mixed", "drain", "coalescing", "flush_lag", "recover", "memory",
             "seed_timings", "peers_update", "peers_get"}
# Every baseline each scenario must be compared with (the ratio fields).
BASELINES = {
    "update_activity@64": {"redis_py SET EX", "write_through"},
    "get_hot@1": {"redis_py GET"},
    "get_cold": {"raw pair (cache-aside)"},
    "ensure": {"redis_py SET NX EX", "write_through"},
    "mixed": {"redis_py GET/SET EX"},
    "drain": {"raw unnest upsert"},
    "recover": {"raw pair (SELECT + HSET)"},
    "memory": {"redis_py SET EX"},
    "seed_timings": {"persistence off"},
    "peers_update": {"redis_py SET EX", "valkey-glide SET EX", "coredis SET EX"},
    "peers_get": {"redis_py GET", "valkey-glide GET", "coredis GET"},
}


@pytest.mark.timeout(300)  # the subprocess has its own 240 s bound
def test_quick_benchmark_reports_every_scenario() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["scenarios"]) == SCENARIOS
    for name, scenario in report["scenarios"].items():
        results = scenario["results"]
        assert results["tiered_sessions"]["ops_per_s"] > 0, name
        assert set(scenario["ratios"]) == set(results) - {"tiered_sessions"}, name
        assert set(BASELINES.get(name, set())) <= set(scenario["ratios"]), name
        for baseline, ratio in scenario["ratios"].items():
            assert results[baseline]["ops_per_s"] > 0 and ratio > 0, (name, baseline)
        for target in scenario["targets"]:
            assert isinstance(target["measured"], float | int) and isinstance(target["pass"], bool), (name, target)
    targets = [t["target"] for s in report["scenarios"].values() for t in s["targets"]]
    assert len(targets) == 18 and report["summary"]["targets"] == 18
    assert {"nproc", "cpu", "redis_server", "postgresql"} <= set(report["machine"])
