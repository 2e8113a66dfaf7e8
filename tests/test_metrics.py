"""Metrics scraped over real HTTP from the asyncio endpoint, parsed as Prometheus would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from forwarder.metrics import (
    DELIVERY_RESULTS,
    DESTINATION_CLASSES,
    LATENCY_BUCKETS,
    Metrics,
    MetricsServer,
    start_metrics_server,
)
from forwarder.policy import Outcome, Route

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
