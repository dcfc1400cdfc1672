"""One run of the cluster failover story (tests/failover_story.py): a master and a flusher SIGKILLed under load
from three writer processes; nothing acknowledged lost outside the killed master's replication window."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .failover_story import run_story


async def test_cluster_failover_story(database_url: str, tmp_path: Path) -> None:
    result = await run_story(database_url, tmp_path)
    assert result.ok, dataclasses.asdict(result)
    assert result.acknowledged > 1000 and result.failover_secs > 1  # there was load, and a real failover
