"""rspamd as the spam gate: a real rspamd on loopback (tests/rspamdfixture.py), the real
daemon, a real SMTP sink."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from forwarder.config import CheckSettings, HostPort, RspamdSettings
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.conftest import DOMAIN, DaemonFactory, Sink, refused_port, smtp_send
from tests.dnsserver import DnsServer
from tests.rspamdfixture import Rspamd

GRAD = f"camille.martin@{DOMAIN}"
POSTMASTER = f"postmaster@{DOMAIN}"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(extra: bytes = b"", body: bytes = b"Bonjour,\r\n") -> bytes:
    return (b"From: JobTeaser <noreply@jobteaser.com>\r\nTo: " + GRAD.encode() + b"\r\n"
            b"Subject: Reinitialisation\r\nMessage-ID: <r@jobteaser.com>\r\n" + extra
            + b"\r\n" + body)


@pytest.fixture
def graduate(directory: Directory) -> str:
    directory.add(GRAD, ["camille@gmail.example"])
    directory.delete(GRAD)
    return GRAD


async def gated(start_daemon: DaemonFactory, sink: Sink, url: str,
                checks: CheckSettings | None = None, dns: DnsServer | None = None,
                **settings: Any) -> Daemon:
    more = {} if dns is None else {"dns_servers": (HostPort(dns.host, dns.port),)}
    return await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                              checks=checks or CheckSettings(),
                              rspamd=RspamdSettings(url=url, **settings), **more)


def spam_count(d: Daemon, action: str) -> float | None:
    return d.metrics.registry.get_sample_value("forwarder_spam_checks_total",
                                               {"action": action})


async def test_gtube_is_refused_as_spam(
    start_daemon: DaemonFactory, sink: Sink, rspamd: Rspamd, graduate: str,
) -> None:
    d = await gated(start_daemon, sink, rspamd.url)
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], message(body=GTUBE))
    assert data == (550, "5.7.1 message refused as spam")
    assert (await d.queue.stats())["messages"] == 0
    assert spam_count(d, "reject") == 1
    assert d.metrics.registry.get_sample_value("forwarder_messages_refused_total",
                                               {"reason": "spam"}) == 1


async def test_clean_message_passes_with_its_score_and_rspamd_saw_everything(
    start_daemon: DaemonFactory, sink: Sink, rspamd: Rspamd, graduate: str,
    dns_server: DnsServer,
) -> None:
    # With the authentication checks on, rspamd gets our Authentication-Results too
    # (the empty zone: spf=none, dkim=none, dmarc=none).
    d = await gated(start_daemon, sink, rspamd.url, checks=CheckSettings(enabled=True),
                    dns=dns_server)
    original = message()
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], original)
    assert data is not None and data[0] == 250, data
    (got,) = await sink.wait_for(1)
    # 0.25: IP, HELO, MAIL FROM, RCPT and queue id arrived; 0.5: our Authentication-Results.
    assert b"X-Spam-Status: No, score=0.75 required=15.00\r\nX-Spam-Score: 0.75\r\n" in \
        got.content
    assert got.content.startswith(b"Authentication-Results: forwarder.test;")
    assert got.content.endswith(original)
    assert spam_count(d, "no_action") == 1


async def test_add_header_forwards_marked_and_never_rewrites_the_subject(
    start_daemon: DaemonFactory, sink: Sink, rspamd: Rspamd, graduate: str,
) -> None:
    d = await gated(start_daemon, sink, rspamd.url)
    original = message(b"X-Test-Score: 7\r\n")
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], original)
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.content.startswith(b"X-Spam-Status: Yes, score=7.25 required=15.00\r\n")
    assert got.content.endswith(original)  # Subject and body as sent
    assert spam_count(d, "add_header") == 1


async def test_soft_reject_and_greylist_defer(
    start_daemon: DaemonFactory, sink: Sink, rspamd: Rspamd, graduate: str,
) -> None:
    d = await gated(start_daemon, sink, rspamd.url)
    for action in (b"soft reject", b"greylist"):
        _, data = await smtp_send(d.port, "a@sender.example", [graduate],
                                  message(b"X-Test-Action: " + action + b"\r\n"))
        assert data is not None and (data[0], data[1][:5]) == (451, "4.7.1"), data
    assert (spam_count(d, "soft_reject"), spam_count(d, "greylist")) == (1, 1)
    assert (await d.queue.stats())["messages"] == 0


async def test_postmaster_is_never_refused_as_spam(
    start_daemon: DaemonFactory, sink: Sink, rspamd: Rspamd, graduate: str,
) -> None:
    d = await gated(start_daemon, sink, rspamd.url)
    _, data = await smtp_send(d.port, "a@sender.example", [POSTMASTER], message(body=GTUBE))
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == ["it-team@school-it.example"]
    assert got.content.startswith(b"X-Spam-Status: Yes, score=15.00")
    # Postmaster mail and other mail do not share a transaction (and so a verdict): the
    # other kind of recipient is asked to come again in the next one (RFC 5321 4.5.3.1.10).
    rcpts, data = await smtp_send(d.port, "a@sender.example", [graduate, POSTMASTER],
                                  message(body=GTUBE))
    assert rcpts[POSTMASTER][0] == 452 and rcpts[POSTMASTER][1].startswith("4.5.3")
    assert data is not None and data[0] == 550
    rcpts, _ = await smtp_send(d.port, "a@sender.example", [POSTMASTER, graduate], message())
    assert rcpts[graduate][0] == 452


async def test_rspamd_down_fails_open_and_counts(
    start_daemon: DaemonFactory, sink: Sink, graduate: str,
) -> None:
    d = await gated(start_daemon, sink, f"http://127.0.0.1:{await refused_port()}")
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], message())
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert not got.content.startswith(b"X-Spam")
    assert spam_count(d, "unavailable") == 1


async def test_rspamd_down_fails_closed_with_451(
    start_daemon: DaemonFactory, sink: Sink, graduate: str,
) -> None:
    d = await gated(start_daemon, sink, f"http://127.0.0.1:{await refused_port()}",
                    fail_open=False)
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], message())
    assert data == (451, "4.7.0 spam filter unavailable, try again later")
    assert (await d.queue.stats())["messages"] == 0
    assert d.metrics.registry.get_sample_value("forwarder_messages_refused_total",
                                               {"reason": "filter_unavailable"}) == 1


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts, reads, never answers: an rspamd that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_slow_rspamd_times_out_and_fails_open(
    start_daemon: DaemonFactory, sink: Sink, graduate: str,
) -> None:
    async with silent_server() as port:
        d = await gated(start_daemon, sink, f"http://127.0.0.1:{port}", timeout=0.3)
        started = time.monotonic()
        _, data = await smtp_send(d.port, "a@sender.example", [graduate], message())
        assert data is not None and data[0] == 250
        assert time.monotonic() - started < 3.0
        assert spam_count(d, "unavailable") == 1
