"""deploy/: the compose file passes Docker Compose's own validation, uses only commands, flags and settings the
CLI really has; the alert rules pass promtool (syntax and unit tests); the dashboard and the alerts query only
metrics that tiered_sessions/metrics.py defines."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client import REGISTRY

from tiered_sessions import cli, metrics
from tiered_sessions._ops_http import endpoint_registry
from tiered_sessions.config import ENV_PREFIX, Settings

from .ops_helpers import DEPLOY, ROOT, amtool, compose_binary, promtool, run

COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tiered-sessions.json"
OUR_IMAGE_SERVICES = ("migrate", "flusher", "load")
# Scraped by Prometheus: service -> scrape job (the alerts name the flusher's).
SCRAPED = {"flusher": "tiered-sessions-flusher", "load": "tiered-sessions-load", "redis-exporter": "redis",
           "postgres-exporter": "postgres"}
# The variables the stack needs and gives no default (compose refuses to start without them).
REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _compose_config(tmp_path: Path, environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` with only ``environment`` (an env file of its own: no stray deploy/.env)."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in environment.items()))
    clean = {name: value for name, value in os.environ.items() if name not in REQUIRED_SECRETS}
    return subprocess.run([*compose_binary(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", *args],
                          capture_output=True, text=True, timeout=60, check=False, env=clean)


def test_compose_file_passes_docker_compose_validation(tmp_path: Path) -> None:
    secrets = {name: f"secret-{name.lower()}" for name in REQUIRED_SECRETS}
    checked = _compose_config(tmp_path, secrets, "--quiet")
    assert checked.returncode == 0, checked.stderr
    normalized = json.loads(_compose_config(tmp_path, secrets, "--format", "json").stdout)
    services = normalized["services"]
    assert set(services) == {"redis", "postgres", "migrate", "flusher", "load", "redis-exporter",
                             "postgres-exporter", "prometheus", "alertmanager", "grafana"}
    for name in ("flusher", "load"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert Path(services[name]["build"]["context"]) == ROOT  # `..` from deploy/: the repository root
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "secret-grafana_admin_password"
    assert "secret-postgres_password" in services["postgres-exporter"]["environment"]["DATA_SOURCE_NAME"]
    # Published on the loopback only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    # Every long-running service has a healthcheck; migrate runs once (its exit code is its health).
    for name, service in services.items():
        if name != "migrate":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    # No default password: without them compose refuses, naming each.
    for missing in REQUIRED_SECRETS:
        refused = _compose_config(tmp_path, {name: "x" for name in REQUIRED_SECRETS if name != missing}, "--quiet")
        assert refused.returncode != 0 and missing in refused.stderr, refused.stderr


def test_compose_stack_is_what_the_docs_say() -> None:
    services = _compose()["services"]
    redis_command = services["redis"]["command"]
    assert services["redis"]["image"].startswith("redis:7")
    assert _flag(redis_command, "--appendonly") == "yes" and _flag(redis_command, "--appendfsync") == "everysec"
    assert _flag(redis_command, "--maxmemory-policy") == "noeviction" and _flag(redis_command, "--maxmemory")
    assert services["postgres"]["image"].startswith("supabase/postgres:")
    assert services["migrate"]["restart"] == "no"
    assert "GF_SECURITY_ADMIN_PASSWORD" in services["grafana"]["environment"]
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    for name in ("flusher", "load"):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        # The port is the same everywhere: the flag, the healthcheck, the published port, Prometheus's target.
        port = _flag(service["command"], "--metrics-port")
        assert _flag(service["command"], "--metrics-host") == "0.0.0.0"  # reachable from the Prometheus container
        assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])
        assert service["ports"] == [f"127.0.0.1:{port}:{port}"]
        assert jobs[SCRAPED[name]] == [f"{name}:{port}"]
    assert set(jobs) == set(SCRAPED.values())
    for name in ("redis-exporter", "postgres-exporter"):
        port = jobs[SCRAPED[name]][0].rpartition(":")[2]
        assert f"127.0.0.1:{port}/metrics" in " ".join(services[name]["healthcheck"]["test"])
    # Prometheus sends its alerts to the Alertmanager service.
    [alertmanagers] = prometheus["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert services["alertmanager"]["ports"] == ["127.0.0.1:9093:9093"]
    # Drain before the SIGKILL.
    flusher = services["flusher"]
    assert int(flusher["stop_grace_period"].rstrip("s")) > float(_flag(flusher["command"], "--drain-timeout"))
    # Every bind-mounted path exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume


def test_alertmanager_config_passes_amtool() -> None:
    done = run([amtool(), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_commands_flags_and_env_vars_are_real() -> None:
    parser = cli.build_parser()
    fields = {field.name for field in dataclasses.fields(Settings)}
    services = _compose()["services"]
    commands = [services[name]["command"] for name in OUR_IMAGE_SERVICES]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    commands.append(json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1)))  # type: ignore[union-attr]
    for command in commands:
        try:
            parser.parse_args(command)  # argparse exits on an unknown command or flag, or a bad value
        except SystemExit:
            pytest.fail(f"`tiered-sessions {shlex.join(command)}` is not accepted by the CLI")
    for name in OUR_IMAGE_SERVICES:
        environment: dict[str, str] = services[name]["environment"]
        for variable in environment:
            assert variable.startswith(ENV_PREFIX), variable
            assert variable[len(ENV_PREFIX):].lower() in fields, f"{variable} is no Settings field"
        settings = Settings.from_env(environ=environment)  # and each value parses
        assert settings.redis_url == "redis://redis:6379/0" and settings.database_url
    assert re.search(r'^ENTRYPOINT \["tiered-sessions"\]$', dockerfile, re.MULTILINE)


def test_dockerfile_runs_as_non_root_and_copies_what_exists() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for path in ("pyproject.toml", "README.md", "tiered_sessions/", "migrations/"):
        assert f"!{path}" in ignore


def test_promtool_checks_config_and_rules_and_runs_the_alert_unit_tests() -> None:
    tool = promtool()
    for command in (["check", "config", str(PROMETHEUS / "prometheus.yml")],
                    ["check", "rules", str(PROMETHEUS / "alerts.yml")],
                    ["test", "rules", str(PROMETHEUS / "alerts_test.yml")]):
        done = run([tool, *command])
        assert done.returncode == 0, f"promtool {' '.join(command)}:\n{done.stdout}{done.stderr}"


def test_every_alert_has_a_sustained_and_a_blip_case() -> None:
    """An alert fires while its condition holds and resolves soon after: for each alert, a unit test in which it
    fires and a later evaluation finds it resolved, and one (a blip) evaluated at least twice where it never fires."""
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    resolved: set[str] = set()
    never_fired: set[str] = set()
    for case in cases:
        evals: dict[str, list[tuple[float, bool]]] = {}
        for check in case["alert_rule_test"]:
            evals.setdefault(check["alertname"], []).append((_seconds(check["eval_time"]), bool(check["exp_alerts"])))
        for name, seen in evals.items():
            seen.sort()
            fired_at = [time for time, firing in seen if firing]
            if fired_at and any(time > fired_at[0] and not firing for time, firing in seen):
                resolved.add(name)
            if len(seen) >= 2 and not fired_at:
                never_fired.add(name)
    assert alerts - resolved == set(), "no test where these fire and then resolve"
    assert alerts - never_fired == set(), "no blip test where these never fire"


def test_every_alert_has_a_runbook_at_an_existing_heading() -> None:
    for rule in (rule for rule in _rules() if "alert" in rule):
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md" and anchor == rule["alert"].lower(), f"{rule['alert']}: {url!r}"
        text = (ROOT / path).read_text()
        headings = {_slug(heading): start.end() for start in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)
                    for heading in [start.group(1)]}
        assert anchor in headings, f"{url}: no such heading"
        section = re.split(r"^#+ ", text[headings[anchor]:], maxsplit=1, flags=re.MULTILINE)[0]
        for part in ("**What it means.**", "**What to check.**", "**What to do.**"):
            assert part in section, f"{rule['alert']}'s runbook lacks {part}"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([hms])", duration))


def _sample_names() -> set[str]:
    """Every series name the tier's metrics can export (counters' _total, histograms' _bucket, ...)."""
    names: set[str] = set()
    for metric in metrics.all_metrics():
        for family in metric.describe():
            suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                        "gauge": ("",)}[family.type]
            names.update(family.name + suffix for suffix in suffixes)
    return names


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# The exporters of the stack (docker-compose.yml) and the metric names each can export, vendored with their source
# in tests/exporter_metrics/; Prometheus's own series.
EXPORTERS = {"redis-exporter": ("oliver006/redis_exporter:v1.67.0-alpine", "redis_exporter-v1.67.0.txt"),
             "postgres-exporter": ("prometheuscommunity/postgres-exporter:v0.17.1", "postgres_exporter-v0.17.1.txt")}
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def _metric_names(query: str) -> set[str]:
    """The metric names a PromQL query reads: label matchers, ranges, grouping labels, strings, numbers and
    function names taken out."""
    text = re.sub(r'"[^"]*"', "", query)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in _PROMQL_WORDS}


def _known_names() -> set[str]:
    """Every series some exporter of the dev stack can export: ours (the tier's, and a process's own), the
    exporters', Prometheus's, and the recording rules."""
    known = _sample_names() | PROMETHEUS_OWN
    known |= {rule["record"] for rule in _rules() if "record" in rule}
    for family in endpoint_registry(serves_calls=True).collect():
        known |= {sample.name for sample in family.samples}
    services = _compose()["services"]
    for service, (image, listing) in EXPORTERS.items():
        assert services[service]["image"] == image, "the vendored name list must match the image the stack runs"
        lines = (ROOT / "tests" / "exporter_metrics" / listing).read_text().splitlines()
        known |= {line for line in lines if line and not line.startswith("#")}
    return known


def test_dashboard_and_alerts_query_only_metrics_the_stack_exports() -> None:
    """Every panel has queries, and every query (and alert) reads only series that an exporter of the stack or
    metrics.py defines: in the dev stack every panel has a source."""
    known = _known_names()
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [rule["expr"] for rule in _rules()]
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        queries += [target["expr"] for target in panel["targets"]]
    for query in queries:
        names = _metric_names(query)
        assert names, query
        assert names <= known, f"{sorted(names - known)} (in {query}) is exported by nothing in the stack"
    assert _metric_names('sum by (le) (rate(a_bucket{job=~"$job"}[5m])) / on (x) b or vector(0)') == {"a_bucket", "b"}
    # The dashboard shows lag, backlog, throughput, errors, read tiers, latency, alerts, the journal, task
    # restarts, Redis's memory and PostgreSQL.
    shown = set().union(*(_metric_names(query) for query in _dashboard_queries()))
    for name in ("tiered_sessions_flush_lag_seconds", "tiered_sessions_dirty_sessions",
                 "tiered_sessions_flushed_rows_total", "tiered_sessions_flush_errors_total",
                 "tiered_sessions_reads_total", "tiered_sessions_operation_duration_seconds_bucket",
                 "tiered_sessions_live_sessions", "tiered_sessions_dead_letters_stored", "ALERTS",
                 "tiered_sessions_journal_pending", "tiered_sessions_task_restarts_total", "tiered_sessions_ready",
                 "redis_memory_used_bytes", "redis_memory_max_bytes", "pg_up", "pg_stat_database_xact_commit"):
        assert name in shown, name
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert {"TieredSessionsFlushLagHigh", "TieredSessionsBacklogGrowing", "TieredSessionsFlushErrors",
            "TieredSessionsDeadLetters", "TieredSessionsDegradedMode", "TieredSessionsNoFlusher"} <= alerts
    # The names in metrics.py follow Prometheus conventions.
    for family in (f for metric in metrics.all_metrics() for f in metric.describe()):
        assert family.name.startswith("tiered_sessions_"), family.name
        assert not re.search(r"_(milliseconds|ms|minutes|bytes_total)$", family.name), family.name
    # The default registry has every metric but the endpoints' own (metrics.ENDPOINTS).
    assert {f.name for f in REGISTRY.collect() if f.name.startswith("tiered_sessions_")} == \
        {f.name for metric in metrics.exported() for f in metric.describe()}
    assert {f.name for metric in metrics.ENDPOINTS for f in metric.describe()} == \
        {"tiered_sessions_ready", "tiered_sessions_layout_refused"}


def test_every_metric_is_documented() -> None:
    documented = (ROOT / "docs" / "operations.md").read_text()
    for family in (f for metric in metrics.all_metrics() for f in metric.describe()):
        exported = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{exported}`" in documented, f"{exported} is missing from docs/operations.md"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no "check this expression": make each query a recording rule and check the rule file.
    rules = [{"record": f"dashboard:query_{i}",
              "expr": query.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")}
             for i, query in enumerate(_dashboard_queries())]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run([promtool(), "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasources["datasources"][0]["type"] == "prometheus"
    # No hard-wired datasource: a variable, so the dashboard imports anywhere; job and instance variables.
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${datasource}"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            if any(name.startswith("tiered_sessions_") or name == "up" for name in _metric_names(target["expr"])):
                assert '$job"' in target["expr"] and '$instance"' in target["expr"], target["expr"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tiered-sessions.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    grafana = _compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/{DASHBOARD.name}"
