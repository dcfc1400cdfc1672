"""The mutation check: each promise the tier makes, broken on purpose in a scratch copy of the project, must
turn the tests that guard it red. A mutant the tests survive is a promise nobody checks.

    scripts/mutants                 every mutant (minutes: each runs its tests against real servers)
    scripts/mutants --sample 3      three at random (a quick look)
    scripts/mutants --only NAME...  the named ones
    scripts/mutants --list          names and promises

Each mutant replaces one exact piece of Lua, SQL or Python (it must occur exactly once, so a mutant that no
longer applies fails loudly instead of passing), then runs only the test files that guard that promise. The
unmutated copy must pass those tests first, or the run stops: a red baseline kills every mutant for nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    promise: str  # what breaks
    path: str  # relative to the project root
    old: str  # exact text, once in the file
    new: str
    tests: tuple[str, ...]  # pytest selections that must fail


_FULL_REDIS = "tests/test_full_redis.py"
_CLOSE_BOUND = "tests/test_promises.py::test_close_keeps_to_its_drain_timeout_while_postgres_hangs"
_FULL_REFUSES = _FULL_REDIS + "::test_a_write_that_would_grow_a_full_redis_is_refused_whole_and_reads_go_on"
_FULL_DRAINS = _FULL_REDIS + "::test_a_full_redis_is_drained_by_flush_and_by_a_flusher_started_while_full"
_ACK_ZREM = """for first = 1, #cleared, 500 do
  redis.call('ZREM', KEYS[1], unpack(cleared, first, math.min(first + 499, #cleared)))
end
"""
_ACK_SETTLE = "for _, entry in ipairs(settle) do\n"
_ACK_FREES_FIRST = _ACK_ZREM + _ACK_SETTLE
_ACK_GROWS_FIRST = (_ACK_SETTLE + "  if entry[4] then redis.call('HSET', entry[1], 'k', '1') end\nend\n"
                    + _ACK_FREES_FIRST)
_RECOVERY_TEST = "tests/test_write_behind.py::test_recovery_keeps_what_redis_holds_and_counts_each_live_session_once"

MUTANTS = (
    Mutant("upsert-no-version-guard", "a late or duplicate flush cannot regress a row",
           "tiered_sessions/sql/upsert_batch.sql", "    WHERE s.version < excluded.version\n",
           "    WHERE true\n", ("tests/test_write_behind.py",)),
    Mutant("activity-no-version-guard", "a late activity row cannot regress or revive a row",
           "tiered_sessions/sql/activity_batch.sql", "WHERE s.session_id = r.i AND s.version < r.v",
           "WHERE s.session_id = r.i", ("tests/test_activity_rows.py", "tests/test_seams.py")),
    Mutant("refusals-unreported", "a row the version guard refused is not counted durable",
           "tiered_sessions/sql/refusals.sql", "WHERE r.i = ANY($1::text[])", "WHERE false AND r.i = ANY($1::text[])",
           ("tests/test_seams.py",)),
    Mutant("no-rebase", "a Redis copy behind Postgres is rebased, not swallowed by the guard",
           "tiered_sessions/lua/redirty.lua", "if above and version <= above then", "if false then",
           ("tests/test_seams.py::test_redis_restored_from_an_older_copy_loses_no_later_write",)),
    Mutant("rebase-over-pending-journal", "journaled writes stay in Postgres until the replay folds them in",
           "tiered_sessions/_flusher.py",
           "after_journal = {sid for sid, refusal in rows.items() if refusal.journaled}",
           "after_journal: set[str] = set()", ("tests/test_seams.py",)),
    Mutant("ack-ignores-version", "the ack clears a dirty mark only at the version written",
           "tiered_sessions/lua/ack.lua", "elseif current[1] == ARGV[i + 1] then", "elseif true then",
           ("tests/test_write_behind.py", "tests/test_concurrency.py")),  # the first is deterministic
    Mutant("journal-applied-twice", "a journal entry is folded into a copy once",
           "tiered_sessions/lua/touch.lua",
           "if tonumber(redis.call('HGET', session, 'jv') or '0') >= tonumber(journal) then return -3 end",
           "if tonumber(redis.call('HGET', session, 'jv') or '0') > tonumber(journal) then return -3 end",
           ("tests/test_degraded.py", "tests/test_seams.py")),
    Mutant("no-journal-fold-at-start", "a manager folds back a journal another process left",
           "tiered_sessions/_tiers.py", "            if tiers.journal is not None:\n                await _fold(",
           "            if False:\n                await _fold(",
           ("tests/test_seams.py::test_journal_of_a_manager_closed_while_degraded_is_replayed_by_the_next",)),
    Mutant("no-journal-fold-in-flush", "flush() folds the journal in before it writes",
           "tiered_sessions/_flusher.py", "                    journaled = await self.journal.replay_pending()\n",
           "                    journaled = await self.journal.pending()\n", ("tests/test_seams.py",)),
    Mutant("flush-ignores-journal", "flush() does not report success while journal entries are pending",
           "tiered_sessions/_flusher.py", "return max(0, dirty - durable_dirty) + journaled",
           "return max(0, dirty - durable_dirty)", ("tests/test_seams.py",)),
    Mutant("poison-not-isolated", "a key of the wrong type does not wedge its partition",
           "tiered_sessions/lua/claim.lua", "local ok, version, kind, row = pcall(entry, id, key)",
           "local ok, version, kind, row = true, entry(id, key)",
           ("tests/test_seams.py::test_a_key_of_the_wrong_type_is_quarantined_and_wedges_nothing",)),
    Mutant("wrong-type-not-moved-by-calls", "a call that meets a non-hash at a session's key goes on as if missing",
           "tiered_sessions/lua/quarantine.lua", "redis.call('RENAME', KEYS[1], KEYS[3])", "do return false end",
           ("tests/test_seams.py::test_a_key_of_the_wrong_type_met_by_a_call_is_quarantined_not_a_500",)),
    Mutant("layout-unchecked", "a process laid out otherwise refuses to start",
           "tiered_sessions/_layout.py", "            if theirs is not None and theirs != ours[name]:\n",
           "            if False:\n",
           ("tests/test_seams.py::test_a_process_with_another_partition_count_refuses_to_start",)),
    Mutant("layout-only-in-redis", "a layout check survives a cold Redis (Postgres keeps the record)",
           "tiered_sessions/_tiers.py",
           "                layout.check(await self.store.record_layout(layout.record()), "
           "f\"table {settings.qualified_layout}\")\n",
           "                pass\n",
           ("tests/test_seams.py::test_a_process_with_another_partition_count_refuses_to_start",)),
    Mutant("no-start-without-postgres", "a flusher or manager starts while Postgres is down",
           "tiered_sessions/_tiers.py", "            except PostgresUnavailable as exc:\n",
           "            except ZeroDivisionError as exc:\n",
           ("tests/test_seams.py::test_a_flusher_starts_while_postgres_is_down_and_flushes_soon_after_it_returns",)),
    Mutant("long-backoff", "flushing resumes within a few seconds of an outage's end",
           "tiered_sessions/_flush_retry.py", "MAX_BACKOFF_SECS = 2.0", "MAX_BACKOFF_SECS = 30.0",
           ("tests/test_seams.py::test_a_flusher_starts_while_postgres_is_down_and_flushes_soon_after_it_returns",)),
    Mutant("metrics-raise-while-degraded", "get_session_metrics() answers in degraded mode",
           "tiered_sessions/manager.py",
           "backend = self._postgres if degraded is not None and degraded.active else self._redis",
           "backend = self._redis",
           ("tests/test_seams.py::test_metrics_answer_from_postgres_while_degraded",)),
    Mutant("no-lease-heartbeat", "a pass slower than its lease still acks its work",
           "tiered_sessions/_flusher.py", "        async with self._renewing():\n            await self._in_groups(",
           "        if True:\n            await self._in_groups(",
           ("tests/test_seams.py::test_a_slow_postgres_still_makes_progress",)),
    Mutant("unsupervised-tasks", "a background task that dies is restarted (degraded mode ends by itself)",
           "tiered_sessions/_supervisor.py",
           "                log.exception(\"background task %s died; restarting it in %.1fs\", name, backoff)\n",
           "                raise\n",
           ("tests/test_seams.py::test_a_probe_that_dies_is_restarted_and_degraded_mode_still_ends",
            "tests/test_metrics.py")),
    Mutant("cluster-race-unnamed", "a cluster connection closed under a call is a connection error",
           "tiered_sessions/_redis_client.py",
           "        if not closed_under_the_call(exc):\n            raise\n", "        raise\n",
           ("tests/test_cluster.py::test_a_connection_closed_under_a_call_is_a_named_error_and_the_manager_recovers",)),
    Mutant("stats-need-redis", "tiered-sessions stats answers from Postgres while Redis is unreachable",
           "tiered_sessions/cli.py", "        if not settings.database_url:\n            raise\n",
           "        raise\n",
           ("tests/test_seams.py::test_stats_answer_from_postgres_while_redis_is_unreachable",)),
    Mutant("pass-wide-retry", "a broken partition holds back only itself",
           "tiered_sessions/_flusher.py",
           "                except REDIS_ERRORS as exc:  # its key or its slot; a Postgres failure fails the pass\n",
           "                except ZeroDivisionError as exc:\n",
           ("tests/test_seams.py::test_a_broken_partition_holds_back_only_itself",)),
    Mutant("background-read-race-unnamed", "a connection closed under a background read is a connection error",
           "tiered_sessions/_hot_tier.py",
           "            pipe.zcard(self.dirty_key(p))\n"
           "        return sum(int(count) for count in await executed(pipe.execute()))",
           "            pipe.zcard(self.dirty_key(p))\n"
           "        return sum(int(count) for count in await pipe.execute())",
           ("tests/test_seams.py::test_a_connection_closed_under_a_background_read_is_a_connection_error",)),
    Mutant("shutdown-race-unnamed", "a connection caught in PostgreSQL's shutdown is PostgresUnavailable",
           "tiered_sessions/_failures.py", "    asyncpg.InternalClientError,\n", "",
           ("tests/test_faults.py::test_a_pooled_connection_caught_in_a_shutdown_is_postgres_unavailable",)),
    Mutant("touch-undeclared-keys", "on a cluster a touch meets ASK/TRYAGAIN before it writes, never fails midway",
           "tiered_sessions/_hot_tier.py", "                          if self.cluster else None)",
           "                          if False else None)",
           ("tests/test_cluster.py::test_a_slot_moved_to_another_master_under_load_is_followed",)),
    Mutant("merged-touch-unprobed", "a touch of several slots writes nothing while one of them moves",
           "tiered_sessions/lua/touch.lua", "\nif probed then\n", "\nif false then\n",
           ("tests/test_cluster.py::test_a_slot_moved_to_another_master_under_load_is_followed",)),
    Mutant("touch-revives-expired", "update_activity on an expired session still in Redis returns False",
           "tiered_sessions/lua/touch.lua", "if state_and_expiry[1] ~= 'a' or old_expiry <= now then return -1 end",
           "if state_and_expiry[1] ~= 'a' then return -1 end", ("tests/test_promises.py",)),
    Mutant("touch-on-closed", "update_activity on a closed session returns False",
           "tiered_sessions/lua/touch.lua", "if state_and_expiry[1] ~= 'a' or old_expiry <= now then return -1 end",
           "if state_and_expiry[1] == 'x' or old_expiry <= now then return -1 end",
           ("tests/test_promises.py",)),
    Mutant("tombstone-lives-by-clock", "ensure of a removed id starts fresh whatever the remover's clock",
           "tiered_sessions/lua/ensure.lua",
           "if current[1] and current[1] ~= 'x' and tonumber(current[2]) > now then",
           "if current[1] and tonumber(current[2]) > now then", ("tests/test_promises.py",)),
    Mutant("oversize-update-applied", "an update past the size limit changes nothing",
           "tiered_sessions/lua/update.lua", "if size > tonumber(ARGV[3]) then return {-2, size} end",
           "if false then return {-2, size} end", ("tests/test_input_and_limits.py",)),
    Mutant("backlog-releases-early", "writers held by backpressure wait for the low watermark",
           "tiered_sessions/_backpressure.py", "elif self.backlog <= low and not self.open.is_set():",
           "elif self.backlog < high and not self.open.is_set():",
           ("tests/test_promises.py",)),
    Mutant("close-keeps-leases", "close() releases its leases so another flusher takes over at once",
           "tiered_sessions/_worker.py",
           "            await flusher.release()  # the other flushers take our partitions now",
           "            pass  # the other flushers take our partitions now",
           ("tests/test_promises.py",)),
    Mutant("timed-out-counted-twice", "cleanup_stale_sessions() counts each timed-out session once in the tier",
           "tiered_sessions/lua/timed_out.lua", "if counted ~= 0 then redis.call('HDEL', KEYS[1], 't') end",
           "", ("tests/test_cleanup_count.py",)),
    Mutant("flush-errors-alert-never-fires", "a PostgreSQL outage fires TieredSessionsFlushErrors",
           "deploy/prometheus/alerts.yml", "expr: sum(rate(tiered_sessions_flush_errors_total[2m])) > 0",
           "expr: sum(rate(tiered_sessions_flush_errors_total[2m])) < 0",
           ("tests/test_alerts_live.py::test_a_postgres_outage_fires_the_flush_alerts_and_they_resolve",)),
    Mutant("flush-errors-alert-never-resolves", "TieredSessionsFlushErrors resolves soon after the outage ends",
           "deploy/prometheus/alerts.yml", "expr: sum(rate(tiered_sessions_flush_errors_total[2m])) > 0",
           "expr: sum(rate(tiered_sessions_flush_errors_total[1h])) > 0",
           ("tests/test_alerts_live.py::test_a_postgres_outage_fires_the_flush_alerts_and_they_resolve",)),
    Mutant("recovery-overwrites-redis", "recovery keeps a copy Redis already holds (a write got there first)",
           "tiered_sessions/lua/warm_page.lua", "if redis.call('EXISTS', KEYS[k]) == 0 then", "if true then",
           (_RECOVERY_TEST,)),
    Mutant("recovery-uncounted", "each session recovery puts back is counted live once",
           "tiered_sessions/lua/warm_page.lua", "if counted ~= 0 then redis.call('HINCRBY', KEYS[1], 'n', counted) end",
           "", (_RECOVERY_TEST,)),
    Mutant("read-through-serves-other-than-stored", "a cold read serves exactly the hash it put into Redis",
           "tiered_sessions/_codec.py", 'fields[field] = b"%d" % fields[field]',
           'fields[field] = b"%d" % (fields[field] + 1)',
           ("tests/test_write_behind.py::test_a_cold_read_serves_what_redis_then_holds",)),
    Mutant("full-redis-ensure-deletes-first", "a full Redis refuses a new life over a tombstone whole",
           "tiered_sessions/lua/ensure.lua",
           "  redis.call('HSET', KEYS[1], 'v', version)\n  redis.call('DEL', KEYS[1])", "  redis.call('DEL', KEYS[1])",
           (_FULL_REFUSES,)),
    Mutant("full-redis-remove-grows-first", "a remove goes through on a full Redis (it frees)",
           "tiered_sessions/lua/remove.lua", "redis.call('DEL', KEYS[1])\nif current[4]",
           "if current[4]", (_FULL_REFUSES,)),
    Mutant("full-redis-reading-grows-first", "get_session_metrics() answers on a full Redis",
           "tiered_sessions/lua/lib/live_counts.lua", "    redis.call('HDEL', counts, '')\n", "",
           (_FULL_REDIS,)),
    Mutant("full-redis-ack-grows-first", "flush() drains a full Redis (its acks free it)",
           "tiered_sessions/lua/ack.lua", _ACK_FREES_FIRST, _ACK_GROWS_FIRST,
           (_FULL_DRAINS,)),
    Mutant("full-redis-lease-grows-first", "a flusher started while Redis is full takes its leases",
           "tiered_sessions/lua/lease.lua", "redis.call('DEL', KEYS[1])\n", "",
           (_FULL_DRAINS,)),
    Mutant("full-redis-heartbeat-grows-first", "a flusher keeps its place while Redis is full",
           "tiered_sessions/lua/heartbeat.lua",
           "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])\nredis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])",
           "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])\nredis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])",
           (_FULL_DRAINS,)),
    Mutant("full-redis-layout-rewritten", "a process starts on a full Redis (the layout is written only once)",
           "tiered_sessions/lua/layout.lua", "  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then redis.call(",
           "  if true then redis.call(", (_FULL_DRAINS,)),
    Mutant("readings-refused-while-draining", "a draining flusher's endpoints report the tier, not a Redis error",
           "tiered_sessions/manager.py",
           "tiers = self._tiers if self.stopping and self._tiers is not None else await self._open()",
           "tiers = await self._open()",
           ("tests/test_metrics.py::test_a_flusher_draining_with_postgres_hung_says_so_and_exits_within_its_bounds",)),
    Mutant("unwaited-load-failure-dropped", "a read-through that fails after its callers gave up is reported",
           "tiered_sessions/_backends/_loads.py", "if error is not None and not load.waiters:",
           "if error is not None and False:",
           ("tests/test_faults.py::test_a_read_through_that_fails_after_its_caller_gave_up_is_logged_and_counted",)),
    Mutant("close-raises-on-hung-postgres", "close() returns with PostgreSQL hung (its pool closed at once)",
           "tiered_sessions/cold_tier.py", "except POSTGRES_TRANSIENT as exc:\n                pool.terminate()",
           "except ZeroDivisionError as exc:\n                pool.terminate()", (_CLOSE_BOUND,)),
    Mutant("close-phases-each-their-timeout", "close() keeps to drain_timeout_secs as a whole",
           "tiered_sessions/_worker.py", "await events.drain(left())",
           "await events.drain(self.settings.drain_timeout_secs)", (_CLOSE_BOUND,)),
    Mutant("closed-removal-uncounted", "cleanup_stale_sessions() counts the closed sessions it removes",
           "tiered_sessions/lua/remove.lua", "-1) and ARGV[8] == '1' then", "-1) and false then",
           ("tests/test_cleanup_count.py",)),
)


def _copy_project(into: Path) -> Path:
    scratch = into / "project"
    shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                                     ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    return scratch


def _pytest(project: Path, selections: Sequence[str], timeout: float) -> tuple[int, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               *selections]
    try:
        # As in CI: a test that would skip (a tool missing) fails instead, since a skipped test kills nothing.
        done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "CI": "true"})
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = done.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED tests", "ERROR tests"))]
    return done.returncode, "; ".join([*failed, *lines[-1:]])


def _imports_the_copy(project: Path) -> bool:
    found = subprocess.run([sys.executable, "-c", "import tiered_sessions; print(tiered_sessions.__file__)"],
                           cwd=project, capture_output=True, text=True, check=True).stdout.strip()
    return Path(found).resolve().is_relative_to(project.resolve())


def apply(mutant: Mutant, project: Path) -> None:
    path = project / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: the text to replace occurs {count} times in {mutant.path}; "
                         "update the mutant to the code")
    path.write_text(text.replace(mutant.old, mutant.new))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, help="run this many mutants, chosen at random")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    args = parser.parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:30} {mutant.promise}")
        return 0
    chosen = list(MUTANTS)
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"no such mutant: {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.sample:
        chosen = random.sample(chosen, min(args.sample, len(chosen)))
    with tempfile.TemporaryDirectory(prefix="tiered-sessions-mutants-") as tmp:
        project = _copy_project(Path(tmp))
        if not _imports_the_copy(project):
            raise SystemExit("the scratch copy does not import its own tiered_sessions; run from the venv")
        selections = sorted({test for mutant in chosen for test in mutant.tests})
        code, tail = _pytest(project, selections, args.timeout * 2)
        if code != 0:
            print(f"baseline is red ({tail}): fix the tests before judging mutants", file=sys.stderr)
            return 2
        survived = []
        for mutant in chosen:
            pristine = {mutant.path: (project / mutant.path).read_text()}
            apply(mutant, project)
            started = time.monotonic()
            try:
                code, tail = _pytest(project, mutant.tests, args.timeout)
            finally:
                for path, text in pristine.items():
                    (project / path).write_text(text)
            killed = code != 0
            if not killed:
                survived.append(mutant)
            print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name:30} {time.monotonic() - started:6.1f}s  "
                  f"{tail}", flush=True)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed")
    for mutant in survived:
        print(f"  survived: {mutant.name}: nothing checks that {mutant.promise}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
