"""A writer process of the failover story (tests/failover_story.py): one SessionManager without a flusher,
``update_activity`` from many tasks on the story's sessions until a line arrives on stdin; then it waits for
its manager to be back in normal mode by itself and writes what it saw as JSON: the time of every
acknowledged call per session, how many calls failed (their writes may or may not have been applied), and
its mode and pending journal entries at the end.

    python -m tests.story_writer REDIS_URL DATABASE_URL SCHEMA SESSIONS OUT_FILE
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

from tiered_sessions import SessionManager, Settings
from tiered_sessions.errors import BackendUnavailable

TASKS = 16


async def main(redis_url: str, database_url: str, schema: str, sessions: int, out: Path) -> None:
    settings = Settings(redis_url=redis_url, database_url=database_url, schema=schema, key_prefix=schema,
                        run_flusher=False, max_concurrent_sessions=None, socket_timeout_secs=2,
                        redis_probe_interval_secs=0.2, cleanup_interval_secs=3600)
    ids = [f"story-{i}" for i in range(sessions)]
    acks: dict[str, list[float]] = {sid: [] for sid in ids}
    failed = 0

    async def load(stop: asyncio.Event) -> None:
        nonlocal failed
        rng = random.Random()
        while not stop.is_set():
            sid = rng.choice(ids)
            try:
                if await manager.update_activity(sid):
                    acks[sid].append(time.time())
            except BackendUnavailable:
                failed += 1
                await asyncio.sleep(0.02)

    manager = SessionManager(settings=settings)
    await manager.start()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(load(stop)) for _ in range(TASKS)]
    await asyncio.to_thread(sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks)
    mode = "degraded"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # degraded mode must end by itself once Redis serves again
        try:
            mode = (await manager.get_session_metrics())["mode"]
        except BackendUnavailable:
            mode = "degraded"
        if mode == "normal":
            break
        await asyncio.sleep(0.1)
    assert manager.flusher is not None
    pending = await manager.flusher.journal.pending()
    await manager.close()
    report = json.dumps({"acks": acks, "failed": failed, "mode": mode, "journal_pending": pending})
    await asyncio.to_thread(out.write_text, report)


if __name__ == "__main__":
    redis_url, database_url, schema, sessions, out = sys.argv[1:6]
    asyncio.run(main(redis_url, database_url, schema, int(sessions), Path(out)))
