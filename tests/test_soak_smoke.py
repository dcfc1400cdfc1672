"""The soak script (minutes of random faults, run by hand) in a short run, so it never rots: a few faults,
then the account of every acknowledged write must show nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_short_soak_loses_nothing() -> None:
    script = Path(__file__).parent.parent / "benchmarks" / "soak.py"
    done = subprocess.run([sys.executable, str(script), "--seconds", "8", "--seed", "3", "--min-faults", "2",
                           "--json"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["writes_acknowledged"] > 1000 and sum(report["faults"].values()) >= 2
    assert report["lost"] == 0 and report["merges_lost"] == 0
    # Extra counts can only come from calls that failed mid-flight after Redis applied them.
    assert report["counted_but_unacknowledged"] <= report["ambiguous_failed_calls"]
