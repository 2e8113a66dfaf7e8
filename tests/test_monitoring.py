"""The Prometheus alert rules and the Grafana dashboard in contrib/, checked for truth:
every metric they query exists in the code and in docs/metrics.md, every alert has a
promtool unit test and a runbook in docs/admin.md, and every dashboard query returns data
from a real Prometheus (Debian's binary) scraping a real daemon under a little load.

promtool and prometheus come from Debian's `prometheus` package, which .ci/run installs: a
test that needs them is skipped where they are absent, except in CI (CI=true), where that
is a failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder.directory import Directory
from forwarder.metrics import Metrics
from tests.conftest import DOMAIN, Sink, simple_message, smtp_send
from tests.test_service import Service, config_text

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "contrib" / "prometheus" / "forwarder-alerts.yml"
RULE_TESTS = sorted((REPO / "contrib" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = REPO / "contrib" / "grafana" / "forwarder.json"
ADMIN = REPO / "docs" / "admin.md"
METRICS_DOC = REPO / "docs" / "metrics.md"

# Series Prometheus makes itself rather than the daemon.
PROMETHEUS_OWN = {"up"}
# PromQL words that look like metric names.
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "offset", "and", "or", "unless", "max",
    "min", "histogram_quantile", "absent", "le", "deriv", "on", "ignoring", "bool",
}


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{tool} not installed (Debian package prometheus)")
    return found


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"])
            for panel in doc["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (label names and values taken out)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", w)}


SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",),
                   "histogram": ("_bucket", "_count", "_sum")}


def exported_names() -> set[str]:
    """Every sample name the daemon's registry can export, from each family's type (a
    labelled family has no sample before its first event)."""
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in SAMPLE_SUFFIXES[family.type]}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub (and most renderers) give the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# --- the names ------------------------------------------------------------------------


def test_every_metric_queried_exists_in_the_code_and_the_docs() -> None:
    exported = exported_names()
    documented = METRICS_DOC.read_text()
    queries = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    queries += [(f"panel {title!r}", expr) for title, expr in dashboard_targets()]
    assert len(queries) > 15
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names - PROMETHEUS_OWN:
            assert name in exported, f"{where} queries {name}, which the daemon does not export"
            family = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert f"`{family}" in documented, f"{where}: {family} is not in docs/metrics.md"


def test_the_name_reader_sees_through_promql() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(forwarder_delivery_latency_seconds_bucket'
            '{job="$job", instance=~"$instance"}[$__rate_interval]))) and up offset 10m')
    assert metric_names(expr) == {"forwarder_delivery_latency_seconds_bucket", "up"}


# --- the alert rules ------------------------------------------------------------------


def test_every_alert_has_a_summary_and_a_runbook_in_admin_md() -> None:
    anchors = github_anchors(ADMIN.read_text())
    for rule in alert_rules():
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/admin.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading #{anchor} in docs/admin.md"
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../forwarder-alerts.yml"], path.name
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert {rule["alert"] for rule in alert_rules()} <= fired


def test_promtool_checks_the_rules() -> None:
    promtool = need("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    promtool = need("promtool")
    done = subprocess.run([promtool, "test", "rules", *map(str, RULE_TESTS)],
                          capture_output=True, text=True, timeout=120,
                          cwd=RULES.parent / "tests")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_TESTS)


# --- the dashboard in a real Prometheus -----------------------------------------------

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@perso.example"
SLOW = f"marie.curie@{DOMAIN}"
SLOW_TARGET = "marie@slow.example"
# Grafana's variables, as the dashboard would fill them in for this test's one daemon.
WINDOW = "30s"


def grafana_expr(expr: str) -> str:
    return (expr.replace("$__rate_interval", WINDOW).replace("$job", "forwarder")
            .replace("$instance", ".*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    """Debian's prometheus on loopback, scraping the daemon every second."""

    def __init__(self, tmp: Path, metrics_port: int) -> None:
        self.port = free_port()
        self.tmp = tmp
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "forwarder", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log = (self.tmp / "prometheus.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            need("prometheus"), f"--config.file={self.tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}", stdout=self.log, stderr=self.log)
        await self.until(lambda: self.get("/-/ready") is not None, "ready")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)
        self.log.close()

    def get(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                body = answer.read()
        except OSError:
            return None
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer is not None and answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def until(self, ready: Any, what: str, timeout: float = 20.0) -> None:
        async def _wait() -> None:
            while not await asyncio.to_thread(ready):
                await asyncio.sleep(0.25)
        try:
            await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            tail = (self.tmp / "prometheus.log").read_text()[-2000:]
            pytest.fail(f"prometheus: timed out waiting for {what}\n{tail}")


def has_numbers(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.fixture
async def loaded_daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Service]:
    """The daemon with one acceptor process, relaying to the sink, after some mail of each
    kind: delivered, deferred (still queued), refused at RCPT, refused after DATA."""
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    for address, target in ((GRAD, TARGET), (SLOW, SLOW_TARGET)):
        directory.add(address, [target])
        directory.delete(address)
    sink.handler.rcpt_reply = lambda rcpt: "451 4.7.1 later" if rcpt == SLOW_TARGET else None
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port, extra="acceptors = 1\n"))
    await svc.start()
    await svc.wait_notify("READY=1")
    await svc.wait_log("metrics_listening")
    yield svc
    assert await svc.close() == 0


async def send_load(svc: Service, sink: Sink, rounds: int) -> None:
    looped = b"".join(b"Received: from hop%d\r\n" % i for i in range(60)) + simple_message()
    for i in range(rounds):
        body = simple_message(msgid=f"<{i}@jobteaser.test>")
        await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD, f"nobody@{DOMAIN}"], body)
        await smtp_send(svc.port, "noreply@jobteaser.com", [SLOW], body)
        await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD], looped)
    await sink.wait_for(rounds)


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, loaded_daemon: Service, sink: Sink
) -> None:
    prometheus = Prometheus(tmp_path, loaded_daemon.metrics_port)
    await prometheus.start()
    try:
        await prometheus.until(lambda: has_numbers(prometheus.query('up{job="forwarder"} == 1')),
                               "the first scrape")
        await send_load(loaded_daemon, sink, rounds=8)
        for title, expr in dashboard_targets():
            query = grafana_expr(expr)
            await prometheus.until(lambda q=query: has_numbers(prometheus.query(q)),
                                   f"data for panel {title!r}: {query}")
        # The alert rules load and evaluate against the real series without error.
        answer = prometheus.get("/api/v1/rules")
        rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        assert len(rules) == len(alert_rules())
        await prometheus.until(
            lambda: all(r["health"] == "ok" for g in prometheus.get("/api/v1/rules")["data"]
                        ["groups"] for r in g["rules"]), "every rule evaluated without error")
    finally:
        await prometheus.stop()


def test_admin_md_says_what_each_panel_answers() -> None:
    admin = ADMIN.read_text()
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        assert f"\n| {panel['title']}" in admin, panel["title"]
        assert panel["description"], panel["title"]
