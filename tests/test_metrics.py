"""Metrics scraped over real HTTP from the asyncio endpoint, parsed as Prometheus would."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from forwarder.config import Limits
from forwarder.metrics import (
    DELIVERY_RESULTS,
    DESTINATION_CLASSES,
    LATENCY_BUCKETS,
    REFUSAL_REASONS,
    Metrics,
    _ProcessCollector,
    resident_memory_bytes,
)
from forwarder.metricsserver import MetricsServer, start_metrics_server
from forwarder.policy import Outcome, Route
from tests.conftest import DOMAIN, DaemonFactory

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send a raw request on a real socket; return status line, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return status, headers, body


async def _scrape(port: int) -> Samples:
    status, headers, body = await _http(port, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.0 200 OK"
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert int(headers["content-length"]) == len(body)
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics(verdicts=["forward", "unknown"], queue_states=["queued", "deferred"])
    server = await start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        yield metrics, server
    finally:
        await server.close()


async def test_events_are_scraped_over_http(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    assert server.port > 0
    for verdict in ["forward", "forward", "unknown", "closed"]:
        metrics.rcpt_verdict(verdict)
    metrics.message_accepted(1200)
    metrics.message_accepted(800)
    metrics.message_refused("size")
    metrics.delivered("redirect", 0.2)
    metrics.delivered("mailbox", 7200.0)
    metrics.deferred("redirect")
    metrics.failed("bounce")
    metrics.queue_snapshot({"queued": 4, "deferred": 2}, 3600.0)
    metrics.session_opened()
    metrics.session_opened()
    metrics.session_closed()

    s = await _scrape(server.port)
    assert s[("forwarder_rcpt_verdicts_total", (("verdict", "forward"),))] == 2
    assert s[("forwarder_rcpt_verdicts_total", (("verdict", "unknown"),))] == 1
    assert s[("forwarder_rcpt_verdicts_total", (("verdict", "closed"),))] == 1
    assert s[("forwarder_messages_accepted_total", ())] == 2
    assert s[("forwarder_accepted_bytes_total", ())] == 2000
    assert s[("forwarder_messages_refused_total", (("reason", "size"),))] == 1
    delivered_redirect = (("destination", "redirect"), ("result", "delivered"))
    assert s[("forwarder_deliveries_total", delivered_redirect)] == 1
    assert s[("forwarder_deliveries_total", (("destination", "redirect"), ("result", "deferred")))]
    assert s[("forwarder_deliveries_total", (("destination", "bounce"), ("result", "failed")))]
    assert s[("forwarder_queue_depth", (("state", "queued"),))] == 4
    assert s[("forwarder_queue_depth", (("state", "deferred"),))] == 2
    assert s[("forwarder_queue_oldest_age_seconds", ())] == 3600.0
    assert s[("forwarder_smtp_sessions_open", ())] == 1
    assert s[("forwarder_smtp_sessions_total", ())] == 2


async def test_latency_histogram_buckets(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.delivered("redirect", 0.005)
    metrics.delivered("redirect", 0.2)
    metrics.delivered("mailbox", 3 * 86400.0)
    metrics.delivery_result(Outcome.DELIVERED, "postmaster", 60.0)

    s = await _scrape(server.port)
    name = "forwarder_delivery_latency_seconds"

    def bucket(le: str) -> float:
        return s[(name + "_bucket", (("le", le),))]

    assert bucket("0.01") == 1
    assert bucket("0.25") == 2
    assert bucket("60.0") == 3
    assert bucket("259200.0") == 4
    assert bucket("+Inf") == 4
    assert s[(name + "_count", ())] == 4
    assert s[(name + "_sum", ())] == pytest.approx(0.005 + 0.2 + 3 * 86400.0 + 60.0)
    assert LATENCY_BUCKETS[0] == 0.01
    assert LATENCY_BUCKETS[-1] == 5 * 86400.0


def test_fixed_label_sets_are_the_policy_enums() -> None:
    """The label values written out in metrics.py (and docs/metrics.md) are exactly the
    delivery outcomes and routes the code produces."""
    assert set(DELIVERY_RESULTS) == {outcome.value for outcome in Outcome}
    assert set(DESTINATION_CLASSES) == {route.value for route in Route}


async def test_fixed_label_sets_are_exported_at_zero(
    served: tuple[Metrics, MetricsServer],
) -> None:
    _, server = served
    s = await _scrape(server.port)
    for result in DELIVERY_RESULTS:
        for destination in DESTINATION_CLASSES:
            key = (("destination", destination), ("result", result))
            assert s[("forwarder_deliveries_total", key)] == 0
    assert s[("forwarder_rcpt_verdicts_total", (("verdict", "forward"),))] == 0
    assert s[("forwarder_queue_depth", (("state", "queued"),))] == 0
    assert s[("forwarder_queue_oldest_age_seconds", ())] == 0


async def test_queue_snapshot_zeroes_states_that_emptied(
    served: tuple[Metrics, MetricsServer],
) -> None:
    metrics, server = served
    metrics.queue_snapshot({"queued": 3, "leased": 1}, 12.5)
    metrics.queue_snapshot({"deferred": 5}, None)
    s = await _scrape(server.port)
    assert s[("forwarder_queue_depth", (("state", "queued"),))] == 0
    assert s[("forwarder_queue_depth", (("state", "leased"),))] == 0
    assert s[("forwarder_queue_depth", (("state", "deferred"),))] == 5
    assert s[("forwarder_queue_oldest_age_seconds", ())] == 0


def test_unknown_fixed_labels_are_programming_errors() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="destination"):
        metrics.delivered("elsewhere", 1.0)
    # delivery_result takes a policy.Outcome (mypy refuses anything else); the label
    # check behind it still refuses a result outside the fixed set.
    with pytest.raises(ValueError, match="result"):
        metrics._delivery("lost", "mailbox")
    with pytest.raises(ValueError, match="refusal reason"):
        metrics.message_refused("tired")


def test_registries_are_independent() -> None:
    # Two instances in one process: neither collides with the other nor with the global one.
    first, second = Metrics(), Metrics()
    first.message_accepted(10)
    assert first.registry.get_sample_value("forwarder_messages_accepted_total") == 1
    assert second.registry.get_sample_value("forwarder_messages_accepted_total") == 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "HTTP/1.0 404 Not Found"),
        (b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "HTTP/1.0 405 Method Not Allowed"),
        (b"nonsense\r\n\r\n", "HTTP/1.0 400 Bad Request"),
        (b"GET /metrics?name[]=x HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.0 200 OK"),
    ],
)
async def test_other_requests(
    served: tuple[Metrics, MetricsServer], request_bytes: bytes, status: str
) -> None:
    _, server = served
    got, headers, _ = await _http(server.port, request_bytes)
    assert got == status
    assert headers["connection"] == "close"


async def test_a_silent_client_does_not_block_scrapes(
    served: tuple[Metrics, MetricsServer],
) -> None:
    _, server = served
    # A client that connects and sends nothing holds only its own handler.
    _, idle = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert ("forwarder_messages_accepted_total", ()) in await _scrape(server.port)
    finally:
        idle.close()
        await idle.wait_closed()


async def _reply(reader: asyncio.StreamReader) -> int:
    """The code of one reply, multiline or not."""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if line[3:4] != b"-":
            return int(line[:3])


async def test_the_sessions_own_refusals_are_counted_by_reason(
    start_daemon: DaemonFactory,
) -> None:
    """What the session refuses after the final dot, by itself, shows in
    forwarder_messages_refused_total under the reason docs/metrics.md gives."""
    d = await start_daemon(limits=Limits(max_message_size=4096))
    bodies = {
        "size": (b"x" * 998 + b"\r\n") * 5,
        "bare_lf": b"Subject: a\r\n\r\nbare\nLF\r\n",
        "nul": b"Subject: a\r\n\r\nNUL \x00 here\r\n",
        "line_too_long": b"Subject: a\r\n\r\n" + b"y" * 1200 + b"\r\n",
    }
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    try:
        assert await _reply(reader) == 220
        writer.write(b"EHLO client.test\r\n")
        assert await _reply(reader) == 250
        for body in bodies.values():
            writer.write(f"MAIL FROM:<a@sender.example>\r\nRCPT TO:<postmaster@{DOMAIN}>\r\n"
                         "DATA\r\n".encode())
            assert [await _reply(reader) for _ in range(3)] == [250, 250, 354]
            writer.write(body + b".\r\n")
            assert await _reply(reader) in (550, 552)
    finally:
        writer.close()
        await writer.wait_closed()
    for reason in REFUSAL_REASONS:
        counted = d.metrics.registry.get_sample_value(
            "forwarder_messages_refused_total", {"reason": reason})
        assert counted == (1 if reason in bodies else 0), reason


async def test_process_metrics_are_exported(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    s = await _scrape(server.port)
    # The dashboard's memory panel: prometheus_client's process collector, per registry.
    assert s[("process_resident_memory_bytes", ())] == pytest.approx(
        resident_memory_bytes(), rel=0.5)
    assert s[("process_cpu_seconds_total", ())] > 0
    assert s[("process_start_time_seconds", ())] == pytest.approx(
        time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + _own_start_ticks(), abs=5)
    assert s[("forwarder_acceptors_resident_memory_bytes", ())] == 0
    metrics.absorb("acceptor-0", {}, 0, rss=30_000_000)
    metrics.absorb("acceptor-1", {}, 0, rss=20_000_000)
    s = await _scrape(server.port)
    assert s[("forwarder_acceptors_resident_memory_bytes", ())] == 50_000_000
    metrics.forget("acceptor-1")
    assert metrics.registry.get_sample_value(
        "forwarder_acceptors_resident_memory_bytes") == 30_000_000


def _own_start_ticks() -> float:
    with open("/proc/self/stat", "rb") as stat:
        return int(stat.read().split(b")")[-1].split()[19]) / os.sysconf("SC_CLK_TCK")


def test_process_metrics_without_proc_stat(tmp_path: Path) -> None:
    """The unit's ProcSubset=pid hides /proc/stat, where prometheus_client reads the boot
    time: with only the process's own directory, the metrics must still be there."""
    (tmp_path / "self").symlink_to("/proc/self")
    registry = CollectorRegistry()
    _ProcessCollector(proc=str(tmp_path), registry=registry)
    assert registry.get_sample_value("process_resident_memory_bytes") > 0  # type: ignore[operator]
    started = registry.get_sample_value("process_start_time_seconds")
    assert started is not None and abs(started - (time.time() - _uptime())) < 3600


def _uptime() -> float:
    with open("/proc/self/stat", "rb") as stat:
        ticks = int(stat.read().split(b")")[-1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to mount a /proc like the unit's")
def test_process_metrics_under_the_units_proc_subset() -> None:
    """The same, in a real /proc mounted with subset=pid, as ProcSubset=pid gives the unit."""
    code = ("from forwarder.metrics import Metrics; "
            "print(Metrics().registry.get_sample_value('process_resident_memory_bytes'))")
    script = ("mount -t proc -o subset=pid proc /proc && test ! -e /proc/stat && "
              f"exec {sys.executable} -c \"{code}\"")
    done = subprocess.run(["unshare", "--mount", "--pid", "--fork", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"namespaces not permitted here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 1_000_000


def test_summary_reads_back_what_status_shows() -> None:
    metrics = Metrics()
    metrics.message_accepted(100)
    metrics.message_refused("size")
    metrics.delivered("redirect", 1.0)
    metrics.deferred("redirect")
    metrics.deferred("mailbox")
    metrics.queue_snapshot({"queued": 2, "failed": 1}, 90.0)
    metrics.absorb("acceptor-0", {'["forwarder_messages_accepted_total", []]': 3}, 2, rss=10)
    summary = metrics.summary()
    assert summary["accepted"] == 4 and summary["refused"] == 1
    assert summary["deliveries"] == {"delivered": 1, "deferred": 2, "failed": 0}
    assert summary["queue_depth"] == {"queued": 2, "failed": 1, "in_flight": 0}
    assert summary["queue_oldest_age_seconds"] == 90.0
    assert summary["smtp_sessions_open"] == 2
    assert summary["resident_memory_bytes"] == pytest.approx(resident_memory_bytes() + 10,
                                                             rel=0.5)
