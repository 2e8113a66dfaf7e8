"""The reference docs hold true: every metric, label value and log event they name exists in
the code, every one the code exports is documented, and the README's module table matches
forwarder/. A failure says which name is missing where."""

from __future__ import annotations

import ast
import fnmatch
import re
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import HostPort
from forwarder.metrics import Metrics
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    refused_port,
    simple_message,
    smtp_send,
    until,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PACKAGE = REPO / "forwarder"
LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "critical", "exception",
                         "msg"})
# The labels whose values are a fixed set in forwarder/metrics.py, and so documented one by
# one; `verdict` is the policy's reason and `le` the histogram's buckets.
FIXED_LABELS = ("result", "destination", "reason", "state", "method", "outcome", "action",
                "scope")


def _table_rows(text: str) -> list[list[str]]:
    """The rows of every Markdown table (headers included, rule lines not), as cells."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# --- metrics -------------------------------------------------------------------------


def _exposition() -> tuple[set[str], set[str], dict[str, set[str]]]:
    """What a fresh Metrics() exposes: the metric names (as in `# TYPE`, without the
    `_created` timestamps), every sample name, and the values of each label."""
    text = Metrics().render().decode()
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    metrics = {name for name in families if not name.endswith("_created")}
    samples = set(families)
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.add(sample.name)
            for key, value in sample.labels.items():
                labels[key].add(value)
    return metrics, samples, labels


def _documented_metrics() -> set[str]:
    """The metric names in the first column of docs/metrics.md's tables."""
    found = set()
    for row in _table_rows((DOCS / "metrics.md").read_text()):
        names = _code_spans(row[0])
        if names and names[0].startswith(("forwarder_", "process_")):
            found.add(names[0])
    return found


def _metric_mentions() -> list[tuple[str, str]]:
    """(name, file:line) for every `forwarder_...` name in docs/, the README and bench/."""
    mentions = []
    for path in [*sorted(DOCS.glob("*.md")), REPO / "README.md", REPO / "bench" / "README.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"\bforwarder_[a-z_]+", line):
                mentions.append((name, f"{path.relative_to(REPO)}:{number}"))
    return mentions


def test_every_exported_metric_is_in_the_metrics_table() -> None:
    exported, _, _ = _exposition()
    missing = sorted(exported - _documented_metrics())
    assert not missing, f"exported by forwarder/metrics.py but not in docs/metrics.md: {missing}"


def test_every_metric_the_docs_name_is_exported() -> None:
    _, samples, _ = _exposition()
    unknown = [f"{where} names {name}" for name, where in _metric_mentions()
               if name not in samples]
    assert not unknown, ("metrics named in the docs that forwarder/metrics.py does not "
                         f"export (it exports {sorted(samples)}): {unknown}")


def _documented_label_values() -> dict[str, set[str]]:
    """docs/metrics.md's table of label values: label -> values."""
    text = (DOCS / "metrics.md").read_text()
    section = text.split("## Label values", 1)[1].split("\n## ", 1)[0]
    values: dict[str, set[str]] = defaultdict(set)
    for row in _table_rows(section):
        label, value = _code_spans(row[0]), _code_spans(row[1])
        if label and value:
            values[label[0]].add(value[0])
    return values


def test_fixed_label_values_match_the_docs() -> None:
    _, _, exported = _exposition()
    documented = _documented_label_values()
    problems = []
    for label in FIXED_LABELS:
        for value in sorted(exported[label] - documented[label]):
            problems.append(f"{label}={value!r} is exported but not in docs/metrics.md")
        for value in sorted(documented[label] - exported[label]):
            problems.append(f"{label}={value!r} is in docs/metrics.md but never exported")
    assert not problems, problems


async def test_the_running_daemon_reports_only_documented_queue_states(
    start_daemon: DaemonFactory,
) -> None:
    """The queue-depth states come from the queue file and the dispatcher, not from a list
    in metrics.py: a message waiting for its retry must show only documented ones."""
    d = await start_daemon(smarthost=HostPort("127.0.0.1", await refused_port()))
    _, data = await smtp_send(d.port, "a@sender.example", [f"postmaster@{DOMAIN}"],
                              simple_message())
    assert data is not None and data[0] == 250
    labels = {"destination": "postmaster", "result": "deferred"}
    await until(lambda: d.metrics.registry.get_sample_value(
        "forwarder_deliveries_total", labels) == 1)
    await d.refresh_status()
    states = {sample.labels["state"]: sample.value
              for family in text_string_to_metric_families(d.metrics.render().decode())
              if family.name == "forwarder_queue_depth" for sample in family.samples}
    assert states.get("queued") == 1
    assert set(states) <= _documented_label_values()["state"], states


# --- log events ----------------------------------------------------------------------


def _logged_events() -> dict[str, list[str]]:
    """Event name -> every file:line in forwarder/ that logs it, found by parsing the
    source: a call `NAME.info("event", ...)` on a module-level `NAME = log.get(...)`."""
    events: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        loggers = {
            target.id
            for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) in ("log.get", "structlog.get_logger")
            for target in node.targets if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in loggers and node.func.attr in LOG_METHODS):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            first = node.args[0] if node.args else None
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{where}: the event name must be a string literal, so that it can be checked")
            events[first.value].append(where)
    return events


def _documented_events() -> set[str]:
    events = set()
    for row in _table_rows((DOCS / "logging.md").read_text()):
        if row[0] != "event":
            events.update(_code_spans(row[0]))
    return events


def test_the_event_scan_finds_the_daemons_events() -> None:
    events = _logged_events()
    assert {"connect", "queued", "delivery", "listening", "acceptor_started"} <= set(events)


def test_every_logged_event_is_documented() -> None:
    documented = _documented_events()
    missing = [f"{event!r} (logged at {', '.join(where)})"
               for event, where in sorted(_logged_events().items()) if event not in documented]
    assert not missing, f"events logged but not in docs/logging.md: {missing}"


def test_every_documented_event_is_logged() -> None:
    logged = _logged_events()
    stale = sorted(_documented_events() - set(logged))
    assert not stale, f"events in docs/logging.md that nothing in forwarder/ logs: {stale}"


# --- the README's module table -------------------------------------------------------


def _module_table() -> list[str]:
    """The module names (or patterns, like `cli*.py`) of the README's `| module | holds |`."""
    text = (REPO / "README.md").read_text()
    table = text.split("| module | holds |", 1)[1].split("\n\n", 1)[0]
    return [name for row in _table_rows(table) for name in _code_spans(row[0])]


def _modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py")


def _matches(pattern: str, module: str) -> bool:
    if pattern.endswith("/"):
        return module.startswith(pattern)
    return fnmatch.fnmatchcase(module, pattern)


def test_readme_module_table_names_only_modules_that_exist() -> None:
    stale = [p for p in _module_table() if not any(_matches(p, m) for m in _modules())]
    assert not stale, f"README.md's module table names modules not in forwarder/: {stale}"


def test_every_module_is_in_the_readme_table() -> None:
    table = _module_table()
    missing = [m for m in _modules() if not any(_matches(p, m) for p in table)]
    assert not missing, f"modules in forwarder/ missing from README.md's module table: {missing}"
