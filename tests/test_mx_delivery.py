"""Delivery like a real MTA: MX routing against a real DNS server on loopback, sinks standing
in for the graduates' providers, STARTTLS, connection reuse, queue lifetime and RFC 3464."""

from __future__ import annotations

import dataclasses
import datetime
import email
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable
from email.message import Message
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forwarder import log
from forwarder.clock import FakeClock
from forwarder.config import DeliverySettings, HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Sink,
    free_port,
    scan_due,
    simple_message,
    smtp_send,
    until,
)
from tests.dnsserver import Behaviour, DnsServer

GRAD = f"lea.bernard@{DOMAIN}"
SENDER = "noreply@jobteaser.test"


@dataclasses.dataclass
class World:
    dns: DnsServer
    port: int
    mx1: Sink  # 127.0.0.2
    mx2: Sink  # 127.0.0.3
    jobteaser: Sink  # 127.0.0.4: the original sender's MX, where DSNs arrive


@pytest.fixture
async def world(dns_server: DnsServer) -> AsyncIterator[World]:
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    port = free_port(hosts)
    sinks = [Sink(h) for h in hosts]
    for sink in sinks:
        await sink.start(port)
    dns_server.set_records("jobteaser.test", "MX", [(10, "mx.jobteaser.test.")])
    dns_server.set_records("mx.jobteaser.test", "A", ["127.0.0.4"])
    dns_server.set_records("mx1.gmail.test", "A", ["127.0.0.2"])
    dns_server.set_records("mx2.gmail.test", "A", ["127.0.0.3"])
    yield World(dns_server, port, *sinks)
    for sink in sinks:
        await sink.stop()


async def start(start_daemon: DaemonFactory, world: World, **delivery: float) -> Daemon:
    settings = DeliverySettings(mx_port=world.port, **delivery)  # type: ignore[arg-type]
    return await start_daemon(dns_servers=(HostPort("127.0.0.1", world.dns.port),),
                              delivery=settings)


def graduate(directory: Directory, target: str) -> None:
    directory.add(GRAD, [target])
    directory.delete(GRAD)


def queue_rows(d: Daemon) -> list[tuple[str, int]]:
    with sqlite3.connect(d.settings.queue_path) as conn:
        return conn.execute("SELECT rcpt, attempts FROM recipients").fetchall()


def rows_become(d: Daemon, *expected: list[tuple[str, int]]) -> Callable[[], bool]:
    """For until(): the queue's rows are one of `expected` (fixed when called)."""
    return lambda: queue_rows(d) in expected


def parts(msg: Message) -> list[Message]:
    """The parts of a multipart message (or of a message/delivery-status: its blocks)."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    found = [part for part in payload if isinstance(part, Message)]
    assert len(found) == len(payload)
    return found


def delivery_status(dsn: bytes) -> tuple[Message, list[Message]]:
    """Parse a DSN as RFC 3464: the per-message block and the per-recipient blocks."""
    msg = email.message_from_bytes(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = parts(msg)
    assert human.get_content_type() == "text/plain"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert status.get_content_type() == "message/delivery-status"
    blocks = parts(status)
    return blocks[0], blocks[1:]


async def test_mx_preference_order_and_fallback_to_next_mx(
    start_daemon: DaemonFactory, world: World, directory: Directory
) -> None:
    world.dns.set_records("gmail.test", "MX", [(20, "mx2.gmail.test."), (10, "mx1.gmail.test.")])
    graduate(directory, "lea@gmail.test")
    await world.mx1.stop()  # the preferred MX refuses connections
    d = await start(start_daemon, world)
    _, data = await smtp_send(d.port, SENDER, [GRAD], simple_message())
    assert data is not None and data[0] == 250
    (got,) = await world.mx2.wait_for(1)
    assert got.rcpt_tos == ["lea@gmail.test"]
    assert got.mail_from.startswith("SRS0=")


async def test_implicit_mx_from_a_record(
    start_daemon: DaemonFactory, world: World, directory: Directory
) -> None:
    world.dns.set_records("uni.test", "A", ["127.0.0.3"])  # no MX at all
    graduate(directory, "lea@uni.test")
    d = await start(start_daemon, world)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    (got,) = await world.mx2.wait_for(1)
    assert got.rcpt_tos == ["lea@uni.test"]


@pytest.mark.parametrize(
    ("setup", "status"),
    [("null_mx", "5.1.10"), ("nxdomain", "5.1.2")],
)
async def test_permanent_dns_failure_bounces_at_once(
    start_daemon: DaemonFactory, world: World, directory: Directory, setup: str, status: str
) -> None:
    if setup == "null_mx":
        world.dns.set_records("nomail.test", "MX", [(0, ".")])
    else:
        world.dns.set_behaviour("nomail.test", Behaviour.NXDOMAIN)
    graduate(directory, "lea@nomail.test")
    d = await start(start_daemon, world)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    (dsn,) = await world.jobteaser.wait_for(1)
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [SENDER]
    _, (rcpt,) = delivery_status(dsn.content)
    assert rcpt["Action"] == "failed" and rcpt["Status"] == status
    assert rcpt["Final-Recipient"] == "rfc822; lea@nomail.test"
    assert rcpt["Original-Recipient"] == f"rfc822; {GRAD}"
    await until(lambda: queue_rows(d) == [])


async def test_servfail_is_retried_later(
    start_daemon: DaemonFactory, world: World, directory: Directory, clock: FakeClock
) -> None:
    world.dns.set_behaviour("flaky.test", Behaviour.SERVFAIL)
    graduate(directory, "lea@flaky.test")
    d = await start(start_daemon, world)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    await until(lambda: queue_rows(d) == [("lea@flaky.test", 1)])
    world.dns.set_behaviour("flaky.test", Behaviour.NORMAL)
    world.dns.set_records("flaky.test", "MX", [(10, "mx1.gmail.test.")])
    clock.advance(300)
    assert await scan_due(d) == 1
    (got,) = await world.mx1.wait_for(1)
    assert got.rcpt_tos == ["lea@flaky.test"]
    assert world.jobteaser.messages == []


async def test_550_from_destination_bounces_once_with_diagnostic(
    start_daemon: DaemonFactory, world: World, directory: Directory
) -> None:
    world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
    world.mx1.handler.rcpt_reply = lambda rcpt: "550 5.1.1 The email account does not exist"
    graduate(directory, "gone@gmail.test")
    d = await start(start_daemon, world)
    await smtp_send(d.port, SENDER, [GRAD], simple_message(subject="Reset your password"))
    (dsn,) = await world.jobteaser.wait_for(1)
    per_message, (rcpt,) = delivery_status(dsn.content)
    assert per_message["Reporting-MTA"] == "dns; forwarder.test"
    assert "Arrival-Date" in per_message
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx1.gmail.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 The email account does not exist"
    assert "Last-Attempt-Date" in rcpt
    headers = parts(email.message_from_bytes(dsn.content))[2]
    assert b"Subject: Reset your password" in headers.as_bytes()
    await until(lambda: queue_rows(d) == [])
    assert len(world.jobteaser.messages) == 1


async def test_tempfail_past_lifetime_gives_exactly_one_dsn(
    start_daemon: DaemonFactory, world: World, directory: Directory, clock: FakeClock
) -> None:
    world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
    world.mx1.handler.rcpt_reply = lambda rcpt: "451 4.7.1 greylisted, try later"
    graduate(directory, "lea@gmail.test")
    d = await start(start_daemon, world, queue_lifetime=5 * 86400.0)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    attempts = 1
    await until(lambda: queue_rows(d) == [("lea@gmail.test", 1)])
    while queue_rows(d):
        clock.advance(4000)  # past every backoff step; the lifetime ends after ~108 rounds
        if await scan_due(d):
            attempts += 1
            await until(rows_become(d, [], [("lea@gmail.test", attempts)]))
    (dsn,) = await world.jobteaser.wait_for(1)
    _, (rcpt,) = delivery_status(dsn.content)
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "4.4.7"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted, try later"
    # The queue is empty (the DSN was delivered, then removed) and nothing is in flight:
    # nothing is left that could send another.
    clock.advance(86400)
    assert await scan_due(d) == 0 and queue_rows(d) == []
    assert len(world.jobteaser.messages) == 1  # exactly one


async def test_null_sender_failure_produces_no_dsn(
    start_daemon: DaemonFactory, world: World, directory: Directory
) -> None:
    world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
    world.mx1.handler.rcpt_reply = lambda rcpt: "550 5.1.1 no such user"
    graduate(directory, "gone@gmail.test")
    d = await start(start_daemon, world)
    await smtp_send(d.port, "", [GRAD], simple_message())
    # A DSN is queued in the same transaction as the failure that causes it: once the
    # queue is empty, one would have been delivered already.
    await until(lambda: queue_rows(d) == [])
    assert world.jobteaser.messages == [] and world.mx1.messages == []


async def test_delay_warning_once_when_enabled(
    start_daemon: DaemonFactory, world: World, directory: Directory, clock: FakeClock
) -> None:
    world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
    world.mx1.handler.rcpt_reply = lambda rcpt: "452 4.2.2 mailbox full"
    graduate(directory, "lea@gmail.test")
    d = await start(start_daemon, world, delay_warning=3600.0)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    await until(lambda: queue_rows(d) == [("lea@gmail.test", 1)])
    for n in (2, 3, 4, 5):
        clock.advance(4000)
        await scan_due(d)
        # Only the original's row: every DSN queued so far has been delivered.
        await until(rows_become(d, [("lea@gmail.test", n)]))
    (dsn,) = await world.jobteaser.wait_for(1)  # exactly one warning for all those rounds
    _, (rcpt,) = delivery_status(dsn.content)
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.2.2"
    assert "Will-Retry-Until" in rcpt


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx1.gmail.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx


async def test_a_spooled_message_goes_whole_through_starttls(
    start_daemon: DaemonFactory, world: World, directory: Directory, tmp_path: Path,
) -> None:
    """A body past the spool threshold goes from its file by sendfile(2) on a plain
    connection (forwarder/filesend.py); over TLS it must go through the TLS layer
    instead, and arrives byte for byte, dot lines included."""
    body = simple_message() + b"..a dot line\r\n" + (b"z" * 900 + b"\r\n") * 700
    await world.mx1.stop()
    tls_sink = Sink("127.0.0.2", tls_context=self_signed(tmp_path))
    await tls_sink.start(world.port)
    try:
        world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
        graduate(directory, "lea@gmail.test")
        d = await start(start_daemon, world)
        _, data = await smtp_send(d.port, SENDER, [GRAD], body)
        assert data is not None and data[0] == 250
        (got,) = await tls_sink.wait_for(1)
        assert got.tls is True
        assert got.content.startswith(b"Received: ") and got.content.endswith(body)
    finally:
        await tls_sink.stop()


def tls_failures() -> list[dict[str, object]]:
    return [p for p in log.recent_problems() if p["event"] == "tls_failed"]


@pytest.mark.parametrize("broken", [False, True])
# Setting up the deliberately obsolete server below is itself deprecated.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_opportunistic_starttls(
    start_daemon: DaemonFactory, world: World, directory: Directory, tmp_path: Path,
    broken: bool,
) -> None:
    ctx = self_signed(tmp_path)
    if broken:
        # The server only speaks a TLS version our client refuses: the handshake fails.
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    await world.mx1.stop()
    tls_sink = Sink("127.0.0.2", tls_context=ctx)
    await tls_sink.start(world.port)
    try:
        world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
        graduate(directory, "lea@gmail.test")
        d = await start(start_daemon, world)
        before = len(tls_failures())
        await smtp_send(d.port, SENDER, [GRAD], simple_message())
        (got,) = await tls_sink.wait_for(1)
        # A self-signed certificate is fine (RFC 7435); a failed handshake falls back to
        # a delivery in clear, as Postfix's "may" level does, and is logged and counted.
        assert got.tls is (not broken)
        counted = {r: d.metrics.registry.get_sample_value(
            "forwarder_outbound_tls_total", {"tls": r}) for r in ("encrypted",
                                                                     "handshake_failed")}
        assert counted == ({"encrypted": 0, "handshake_failed": 1} if broken
                           else {"encrypted": 1, "handshake_failed": 0})
        assert len(tls_failures()) - before == int(broken)
    finally:
        await tls_sink.stop()


async def test_connection_reused_for_several_messages(
    start_daemon: DaemonFactory, world: World, directory: Directory
) -> None:
    world.dns.set_records("gmail.test", "MX", [(10, "mx1.gmail.test.")])
    graduate(directory, "lea@gmail.test")
    d = await start(start_daemon, world)
    for i in range(3):
        await smtp_send(d.port, SENDER, [GRAD], simple_message(msgid=f"<{i}@jobteaser.test>"))
        await world.mx1.wait_for(i + 1)
    assert world.mx1.connections == 1
