"""A real Prometheus scrapes a real flusher and a real manager process (``tiered-sessions load``) through a
PostgreSQL outage: the alerts an outage must raise fire, no other alert does, all of them resolve once
PostgreSQL is back, and every write acknowledged to the load reaches PostgreSQL.

The rules are deploy/prometheus/alerts.yml, the same rule set on a compressed clock: every duration in it (each
``for:``, each range selector such as ``[5m]``, any ``offset``, and the thresholds on a flush lag, which is an
age on the clock) divided by ``TIME_FACTOR``, nothing else changed; Prometheus's scrape and evaluation intervals
are deploy/prometheus/prometheus.yml's, divided by the same factor. One compressed minute is
``60 / TIME_FACTOR`` wall seconds. ``test_the_compressed_rules_differ_only_in_durations`` checks the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml  # type: ignore[import-untyped]

from tiered_sessions import Settings
from tiered_sessions._codec import STATE, STATE_CODES, VERSION
from tiered_sessions._flush_retry import MAX_BACKOFF_SECS
from tiered_sessions._keyspace import KeySpace
from tiered_sessions.embedded import PostgresServer
from tiered_sessions.embedded._lifecycle import free_port
from tiered_sessions.migrate import migrate
from tiered_sessions.model import REMOVED

from .ops_helpers import DEPLOY, Flusher, env_for, flusher, get, get_json, prometheus, promtool, run

# Seconds of the rules' clock per wall second. Bounded above by what the processes do in real time: the flusher
# retries a failing pass at least every MAX_BACKOFF_SECS (plus jitter), and the counter windows of the alerts in
# play ([2m] for the flush errors) must still hold an attempt and a scrape either side of it, or the alert would
# flap on the compressed clock where it holds on the real one (60 does: [2s] against a 2 s backoff).
TIME_FACTOR = 30
RULES = DEPLOY / "prometheus" / "alerts.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
FLUSHER_JOB, LOAD_JOB = "tiered-sessions-flusher", "tiered-sessions-load"

# What a PostgreSQL outage of a quarter of an hour must raise; every other alert must stay silent through it.
OUTAGE_ALERTS = frozenset({"TieredSessionsFlushErrors", "TieredSessionsFlushLagHigh",
                           "TieredSessionsFlushLagCritical", "TieredSessionsFlusherNotReady"})
# Bounds on the compressed clock (minutes). Every outage alert fires by FIRE_WITHIN_MIN (the slowest,
# FlushLagCritical: lag over 10 min, then 5 min); all resolve within RESOLVE_WITHIN_MIN of PostgreSQL answering
# again (the flush errors' [2m] window forgets the last failed attempt, which comes at most a backoff after).
FIRE_WITHIN_MIN = 20.0
RESOLVE_WITHIN_MIN = 5.0
# Quiet before the outage. Prometheus hands new targets to its scrapers up to 5 s (real) after it starts: on the
# compressed clock NoFlusher may fire before the first scrape, so the scenario starts once both targets are up and
# no alert is active, then stays quiet this long.
SETTLE_MIN = 2.0

# The load: a few hundred session slots keep the backlog far under BacklogGrowing's 1000.
LOAD_ARGS = ("--rate", "60", "--sessions", "200", "--concurrency", "4")

# -- the compressed copy --------------------------------------------------------------------------------------------

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "y": 31_536_000_000}
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
# Where a duration sits in PromQL: a range or subquery selector, an offset, or a threshold on an age (a series
# named *lag_seconds*: an age on the clock, so a number of seconds compared with it is a duration too).
_SITES = re.compile(rf"\[(?P<range>{_DURATION})(?::(?P<step>{_DURATION})?)?\]"
                    rf"|\boffset\s+(?P<offset>{_DURATION})"
                    r"|(?P<age>[\w:]*lag_seconds[\w:]*(?:\{[^}]*\})?\s*(?:[<>]=?|==|!=)\s*)(?P<seconds>\d+(?:\.\d+)?)")
# Per-second rates (and increases over a window) do not compress: compared with 0 they mean the same on any clock.
_PER_WINDOW = re.compile(r"\b(?:rate|irate|increase|deriv|delta|idelta)\(")


def duration_ms(text: str) -> int:
    if re.fullmatch(_DURATION, text) is None:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(count) * _UNIT_MS[unit] for count, unit in re.findall(r"(\d+)(ms|[smhdwy])", text))


def compressed_duration(text: str) -> str:
    ms, rest = divmod(duration_ms(text), TIME_FACTOR)
    if rest:
        raise ValueError(f"{text} / {TIME_FACTOR} is not a whole number of milliseconds")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _compressed_seconds(text: str) -> str:
    return f"{float(text) / TIME_FACTOR:g}"


def compressed_expr(expr: str) -> str:
    """``expr`` with each duration divided by TIME_FACTOR. Raises on a ``[`` that is not a range it can read, and
    on a rate not compared directly with 0 (its meaning could change with the clock)."""
    for call in _PER_WINDOW.finditer(expr):
        depth, at = 1, call.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(expr[at], 0)
            at += 1
        compared = re.match(r"[\s)]*(?:[<>]=?|==|!=)\s*(\d+(?:\.\d+)?)", expr[at:])
        if compared is None or float(compared.group(1)) != 0:
            raise ValueError(f"a rate compared with something else than 0 does not compress: {expr!r}")

    def compress(site: re.Match[str]) -> str:
        if site["range"]:
            step = f":{compressed_duration(site['step'])}" if site["step"] else (":" if ":" in site[0] else "")
            return f"[{compressed_duration(site['range'])}{step}]"
        if site["offset"]:
            return f"offset {compressed_duration(site['offset'])}"
        return f"{site['age']}{_compressed_seconds(site['seconds'])}"

    if expr.count("[") != sum(1 for site in _SITES.finditer(expr) if site["range"]):
        raise ValueError(f"a [ that is not a range selector: {expr!r}")
    return _SITES.sub(compress, expr)


def compressed_rules(rules: dict[str, Any]) -> dict[str, Any]:
    groups = []
    for group in rules["groups"]:
        copied = {**group, "rules": [{**rule, "expr": compressed_expr(rule["expr"]),
                                      **({"for": compressed_duration(rule["for"])} if "for" in rule else {})}
                                     for rule in group["rules"]]}
        if "interval" in group:
            copied["interval"] = compressed_duration(group["interval"])
        groups.append(copied)
    return {**rules, "groups": groups}


def prometheus_config(rules_file: Path, targets: dict[str, int]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml on the compressed clock, scraping only ``targets`` (job -> local port),
    with no Alertmanager. A scrape may take its whole interval: how long a scrape takes is real time."""
    deployed: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    interval = compressed_duration(deployed["global"]["scrape_interval"])
    jobs = {job["job_name"]: job for job in deployed["scrape_configs"]}
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": compressed_duration(deployed["global"]["evaluation_interval"])},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{**jobs[job], "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                           for job, port in targets.items()],
    }


def _alerts(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _leaves(value, (*path, str(index)))
    else:
        yield path, tree


def _site_seconds(site: re.Match[str]) -> list[float]:
    found = [duration_ms(site[name]) / 1000 for name in ("range", "step", "offset") if site[name]]
    return found if found else [float(site["seconds"])]


def test_the_compressed_rules_differ_only_in_durations(tmp_path: Path) -> None:
    original = yaml.safe_load(RULES.read_text())
    compressed = compressed_rules(original)
    before, after = dict(_leaves(original)), dict(_leaves(compressed))
    assert before.keys() == after.keys()
    changed = 0
    for path, value in before.items():
        if path[-1] == "for":
            assert duration_ms(value) == duration_ms(after[path]) * TIME_FACTOR, path
            changed += 1
        elif path[-1] == "expr":
            assert _SITES.sub("<duration>", value) == _SITES.sub("<duration>", after[path]), path
            old = [s for site in _SITES.finditer(value) for s in _site_seconds(site)]
            new = [s for site in _SITES.finditer(after[path]) for s in _site_seconds(site)]
            assert [s / TIME_FACTOR for s in old] == pytest.approx(new), path
            changed += len(old)
        else:
            assert after[path] == value, path
    alerts = _alerts(compressed)
    assert changed > len(alerts) and all("for" in rule for rule in alerts.values())
    errors = alerts["TieredSessionsFlushErrors"]
    assert errors["expr"] == f"sum(rate(tiered_sessions_flush_errors_total[{120 // TIME_FACTOR}s])) > 0"
    assert errors["for"] == f"{300 // TIME_FACTOR}s"
    lag_high = alerts["TieredSessionsFlushLagHigh"]["expr"]
    assert lag_high == f"tiered_sessions:flush_lag_seconds:max > {60 / TIME_FACTOR:g}"
    with pytest.raises(ValueError, match="rate compared"):
        compressed_expr("sum(rate(x_total[5m])) > 0.5")
    with pytest.raises(ValueError, match="not a range"):
        compressed_expr('x{mode=~"[a-z]+"}')

    rules_file = tmp_path / "alerts.yml"
    rules_file.write_text(yaml.safe_dump(compressed, sort_keys=False))
    checked = run([promtool(), "check", "rules", str(rules_file)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    generated = prometheus_config(rules_file, {FLUSHER_JOB: 9464, LOAD_JOB: 9465})
    # TIME_FACTOR's bound: the flush errors' window holds a failed attempt with a scrape either side of it.
    window = duration_ms(re.findall(r"\[(\w+)\]", errors["expr"])[0]) / 1000
    scrape = duration_ms(generated["global"]["scrape_interval"]) / 1000
    assert window - 2 * scrape > MAX_BACKOFF_SECS + 0.5, f"TIME_FACTOR {TIME_FACTOR} is too large"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(generated))
    checked = run([promtool(), "check", "config", str(config)])
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the live run ---------------------------------------------------------------------------------------------------

def compressed_minutes(wall_secs: float) -> float:
    return wall_secs * TIME_FACTOR / 60


def wall_secs(compressed_min: float) -> float:
    return compressed_min * 60 / TIME_FACTOR


@dataclasses.dataclass
class Timeline:
    """Each alert's state changes as Prometheus's /api/v1/alerts shows them, and the scenario's steps, at
    ``time.monotonic()``; shown in wall seconds (and compressed minutes) from ``origin``, the outage's start."""

    origin: float = dataclasses.field(default_factory=time.monotonic)
    states: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: Exception | None = None  # the watcher's error: the states stopped moving
    changes: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    marks: list[tuple[float, str]] = dataclasses.field(default_factory=list)

    def observe(self, states: dict[str, str]) -> None:
        at = time.monotonic()
        for name in sorted(self.states.keys() | states.keys()):
            state = states.get(name, "resolved")
            if self.states.get(name, "resolved") != state:
                self.changes.append((at, name, state))
        self.states = states

    def mark(self, what: str) -> float:
        at = time.monotonic()
        self.marks.append((at, what))
        return at

    def first(self, name: str, state: str, after: float) -> float | None:
        return next((at for at, alert, seen in self.changes if alert == name and seen == state and at >= after), None)

    def active_since(self, since: float) -> set[str]:
        """The alerts pending or firing at any time from ``since`` on."""
        before: dict[str, str] = {}
        for at, name, state in self.changes:
            if at < since:
                before[name] = state
        return ({name for name, state in before.items() if state != "resolved"}
                | {name for at, name, state in self.changes if at >= since and state != "resolved"})

    def __str__(self) -> str:
        events = sorted([(at, f"{name} {state}") for at, name, state in self.changes] + self.marks)
        return "\n".join(f"  {at - self.origin:+7.1f} s  {compressed_minutes(at - self.origin):+6.1f} min  {what}"
                         for at, what in events)


@contextlib.asynccontextmanager
async def running_prometheus(binary: str, folder: Path, config: dict[str, Any]) -> AsyncIterator[int]:
    """A Prometheus server on ``config``, its data in ``folder``; yields its port once it is ready."""
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while (await _status(port, "/-/ready")) != 200:
            assert process.returncode is None and time.monotonic() < deadline, f"no prometheus:\n{log.read_text()}"
            await asyncio.sleep(0.1)
        yield port
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _status(port: int, path: str) -> int:
    try:
        return (await get(port, path))[0]
    except OSError:
        return 0


async def _alert_states(port: int) -> dict[str, str]:
    """Alert name -> pending or firing (one alert per name here: one flusher, one load)."""
    status, body = await get_json(port, "/api/v1/alerts")
    assert status == 200, body
    states: dict[str, str] = {}
    for alert in body["data"]["alerts"]:
        name = alert["labels"]["alertname"]
        states[name] = "firing" if "firing" in (alert["state"], states.get(name)) else alert["state"]
    return states


async def _query(port: int, promql: str) -> list[dict[str, Any]]:
    status, body = await get_json(port, "/api/v1/query?query=" + quote(promql, safe=""))
    assert status == 200, body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def _watch(port: int, timeline: Timeline) -> None:
    try:
        while True:
            timeline.observe(await _alert_states(port))
            await asyncio.sleep(0.2)
    except Exception as exc:
        timeline.failed = exc
        raise


async def _until(timeline: Timeline, done: Callable[[Timeline], bool], what: str, within: float) -> None:
    """Wait until ``done(timeline)`` holds; fail after ``within`` wall seconds."""
    deadline = time.monotonic() + within
    while not done(timeline):
        if timeline.failed is not None:
            raise AssertionError(f"watching the alerts failed\n{timeline}") from timeline.failed
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within:.1f} s ({compressed_minutes(within):.1f} compressed "
                                 f"min); active now: {timeline.states or 'none'}\n{timeline}")
        await asyncio.sleep(0.1)


async def test_a_postgres_outage_fires_the_flush_alerts_and_they_resolve(
        tmp_path: Path, redis_url: str, own_postgres: PostgresServer) -> None:
    binary = prometheus()
    settings = Settings(redis_url=redis_url, database_url=own_postgres.url, key_prefix=f"al{uuid.uuid4().hex[:8]}",
                        max_concurrent_sessions=None, socket_timeout_secs=3)
    await migrate(settings)
    rules = compressed_rules(yaml.safe_load(RULES.read_text()))
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    # The flusher passes often (the steady lag stays far under the compressed 2 s threshold); /readyz's lag limit
    # (30 s by default) is on the compressed clock too.
    async with flusher(settings, "--flush-interval", "0.05", "--drain-timeout", "5",
                       "--ready-max-lag", f"{30 / TIME_FACTOR:g}") as flushing, \
            flusher(settings, *LOAD_ARGS, command="load") as load, \
            running_prometheus(binary, tmp_path, prometheus_config(tmp_path / "alerts.yml", {
                FLUSHER_JOB: flushing.port, LOAD_JOB: load.port})) as port:
        timeline = Timeline()
        watcher = asyncio.create_task(_watch(port, timeline))
        try:
            await _outage_and_back(port, timeline, own_postgres, load)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        print(f"\nalerts on the compressed clock (x{TIME_FACTOR}), from the start of the outage:\n{timeline}")
    await _every_acknowledged_session_is_in_postgres(settings)


async def _outage_and_back(port: int, timeline: Timeline, postgres: PostgresServer, load: Flusher) -> None:
    deadline = time.monotonic() + 30
    while not ((up := await _query(port, "up")) and len(up) == 2 and all(s["value"][1] == "1" for s in up)):
        assert time.monotonic() < deadline, f"prometheus does not scrape both targets:\n{timeline}"
        await asyncio.sleep(0.2)
    await _until(timeline, lambda t: not t.states, "no alert active", within=wall_secs(SETTLE_MIN) + 10)
    quiet_from = timeline.mark("settled: both targets up, no alert active")
    await asyncio.sleep(wall_secs(SETTLE_MIN))
    assert not timeline.active_since(quiet_from), f"alerts before the outage:\n{timeline}"

    # Marked before the stop: the flush errors begin with the shutdown, before stop() returns
    outage = timeline.origin = timeline.mark("PostgreSQL stopped")
    await asyncio.to_thread(postgres.stop)
    await _until(timeline, lambda t: all(t.states.get(name) == "firing" for name in OUTAGE_ALERTS),
                 "every outage alert firing", within=wall_secs(FIRE_WITHIN_MIN))
    dirty = await _query(port, "tiered_sessions:dirty_sessions:sum")
    waiting = int(float(dirty[0]["value"][1])) if dirty else 0
    timeline.mark(f"every outage alert firing; {waiting} sessions wait for PostgreSQL")
    assert load.process.returncode is None, "the load ended during the outage:\n" + "".join(load.log[-30:])
    assert waiting >= 20, f"the load wrote too little during the outage:\n{timeline}"

    await asyncio.to_thread(postgres.start)
    back = timeline.mark("PostgreSQL answers again")
    await _until(timeline, lambda t: not t.states, "every alert resolved", within=wall_secs(RESOLVE_WITHIN_MIN))
    resolved = timeline.mark("every alert resolved")
    await asyncio.sleep(wall_secs(1))
    assert not timeline.active_since(resolved), f"an alert came back:\n{timeline}"

    assert timeline.active_since(outage) == OUTAGE_ALERTS, f"other alerts than the outage's:\n{timeline}"
    for name, rule in _alerts(yaml.safe_load(RULES.read_text())).items():
        if name not in OUTAGE_ALERTS:
            continue
        # Not before its `for:` and, for a lag, its threshold allow, on the compressed clock.
        fired = timeline.first(name, "firing", after=outage)
        lag = re.search(r"lag_seconds:max > (\d+)", rule["expr"])
        earliest = (duration_ms(rule["for"]) / 1000 + (float(lag[1]) if lag else 0.0)) / TIME_FACTOR
        assert fired is not None and fired - outage >= earliest, f"{name} fired before {earliest} s\n{timeline}"
        assert timeline.first(name, "resolved", after=back) is not None, f"{name}\n{timeline}"


async def _every_acknowledged_session_is_in_postgres(settings: Settings) -> None:
    """The load is stopped: every session in Redis is in PostgreSQL at the version Redis holds (a removed one:
    its tombstone's row, or none), and `tiered-sessions flush` finds nothing acknowledged left."""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tiered_sessions.cli", "flush", "--json", "--drain-timeout", "30"],
        env=env_for(settings), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == '{"left": 0}', done.stdout + done.stderr
    keys = KeySpace(settings.key_prefix, settings.partitions)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    connection = await asyncpg.connect(settings.database_url)
    try:
        in_redis: dict[str, tuple[int, bytes | str | None]] = {}
        async for key in client.scan_iter(match=keys.session_key_pattern, count=500):
            version, state = await client.hmget(key, [VERSION, STATE])
            in_redis[key.decode().rsplit(":s:", 1)[1]] = (int(version or 0), state)
        rows = {row["session_id"]: row["version"] for row in
                await connection.fetch(f"SELECT session_id, version FROM {settings.qualified_table}")}
    finally:
        await client.aclose()
        await connection.close()
    live = {sid for sid, (_, state) in in_redis.items() if state != STATE_CODES[REMOVED]}
    assert len(live) >= 20, f"the load kept only {len(live)} sessions"
    wrong = {sid: (version, rows.get(sid)) for sid, (version, state) in in_redis.items()
             if rows.get(sid) != version and (sid in live or sid in rows)}
    assert not wrong, f"sessions whose acknowledged version is not in PostgreSQL (redis, postgres): {wrong}"
