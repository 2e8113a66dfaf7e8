"""Interoperating like a first-class MTA, over loopback with real parts: 8BITMIME honestly
(BODY=8BITMIME and SIZE, or a 7-bit conversion), SMTPUTF8 (relayed, or 5.6.7), the DSN
extension (passed on, or honoured in our own DSNs), the outbound source address and EHLO
name, and the trace field for IPv6 and TLS clients.

The next hops are aiosmtpd sinks that offer or lack 8BITMIME, SMTPUTF8 and DSN, each
test once with PIPELINING offered as well and once without; aiosmtpd
does not implement DSN, so `ExtSMTP` takes the DSN parameters off the command line,
records them, and hands the rest to aiosmtpd.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from forwarder.config import DeliverySettings, HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.conftest import DOMAIN, DaemonFactory, Received, Sink, SinkHandler, free_port, until
from tests.dnsserver import DnsServer
from tests.test_mx_delivery import delivery_status, queue_rows, self_signed

GRAD = f"prenom.nom@{DOMAIN}"
SENDER = "noreply@jobteaser.test"
UTF8_SENDER = "jöe@exämple.test"
EIGHT_BIT = ("From: Élodie <noreply@jobteaser.test>\r\nTo: prenom.nom@sigma-clermont.fr\r\n"
             "Subject: =?utf-8?q?R=C3=A9initialisation?=\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
             "\r\nBonjour Élodie, voici votre lien de réinitialisation.\r\n").encode()


def _take(arg: str, keys: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """`arg` without the parameters named in `keys`, and those parameters (as sent)."""
    kept, found = [], {}
    for word in arg.split(" "):
        key, eq, value = word.partition("=")
        if eq and key.upper() in keys:
            found[key.upper()] = value
        else:
            kept.append(word)
    return " ".join(kept), found


class ExtSMTP(SMTP):
    """aiosmtpd's server with the DSN parameters taken off first (module docstring)."""

    dsn_mail: dict[str, str]
    dsn_rcpt: list[dict[str, str]]

    async def smtp_MAIL(self, arg: str) -> None:
        arg, self.dsn_mail = _take(arg or "", ("RET", "ENVID"))
        self.dsn_rcpt = []
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        arg, found = _take(arg or "", ("NOTIFY", "ORCPT"))
        self.dsn_rcpt.append(found)
        await super().smtp_RCPT(arg)


@dataclasses.dataclass
class Got:
    """A message as the sink saw it, with its envelope's parameters."""

    received: Received
    mail_options: list[str]
    dsn_mail: dict[str, str]
    dsn_rcpt: list[dict[str, str]]
    peer: str
    helo: str


@dataclasses.dataclass
class ExtHandler(SinkHandler):
    offer: frozenset[str] = frozenset({"8BITMIME", "SMTPUTF8", "DSN"})
    got: list[Got] = dataclasses.field(default_factory=list)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses[:-1] if r[4:].split(" ")[0] not in ("8BITMIME", "SMTPUTF8")
                or r[4:] in self.offer]
        if "DSN" in self.offer:
            kept.append("250-DSN")
        if "PIPELINING" in self.offer:
            kept.append("250-PIPELINING")
        return [*kept, responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            self.got.append(Got(self.messages[-1], list(envelope.mail_options),
                                server.dsn_mail, server.dsn_rcpt, session.peer[0],
                                session.host_name))
        return reply


class ExtSink(Sink):
    def __init__(self, host: str, offer: set[str], tls_context: Any = None) -> None:
        super().__init__(host, tls_context)
        self.handler = ExtHandler(offer=frozenset(offer))

    def _protocol(self) -> SMTP:
        assert isinstance(self.handler, ExtHandler)
        proto = ExtSMTP(self.handler, hostname="sink.test", decode_data=False,
                        tls_context=self.tls_context,
                        enable_SMTPUTF8="SMTPUTF8" in self.handler.offer)
        self.sessions.append(proto)
        self.connections += 1
        return proto

    @property
    def got(self) -> list[Got]:
        assert isinstance(self.handler, ExtHandler)
        return self.handler.got


@dataclasses.dataclass
class Hops:
    dns: DnsServer
    port: int
    provider: ExtSink  # 127.0.0.2: the graduate's provider (what it offers varies)
    origin: ExtSink  # 127.0.0.4: the senders' MX, offering everything (DSNs arrive here)
    pipelining: bool  # both also offer PIPELINING (RFC 2920): the envelope in one write

    async def provider_offering(self, *offer: str) -> ExtSink:
        await self.provider.stop()
        self.provider = ExtSink("127.0.0.2", {*offer, *self.extra})
        await self.provider.start(self.port)
        return self.provider

    @property
    def extra(self) -> set[str]:
        return {"PIPELINING"} if self.pipelining else set()


@pytest.fixture(params=[False, True], ids=["lockstep", "pipelined"])
async def hops(dns_server: DnsServer, request: pytest.FixtureRequest) -> AsyncIterator[Hops]:
    """Every test here runs against next hops that send one command a round trip and
    against hops that pipeline: what crosses the gateway must not depend on it."""
    port = free_port(("127.0.0.2", "127.0.0.4", "127.0.0.5"))
    extra = {"PIPELINING"} if request.param else set()
    provider = ExtSink("127.0.0.2", {"8BITMIME", "SMTPUTF8", "DSN", *extra})
    origin = ExtSink("127.0.0.4", {"8BITMIME", "SMTPUTF8", "DSN", *extra})
    for sink in (provider, origin):
        await sink.start(port)
    dns_server.set_records("gmail.test", "MX", [(10, "mx.gmail.test.")])
    dns_server.set_records("mx.gmail.test", "A", ["127.0.0.2"])
    for domain in ("jobteaser.test", "exämple.test"):
        dns_server.set_records(domain, "MX", [(10, "mx.origin.test.")])
    dns_server.set_records("mx.origin.test", "A", ["127.0.0.4"])
    world = Hops(dns_server, port, provider, origin, request.param)
    yield world
    for sink in (world.provider, world.origin):
        await sink.stop()


async def start(start_daemon: DaemonFactory, hops: Hops, **changes: Any) -> Daemon:
    return await start_daemon(dns_servers=(HostPort("127.0.0.1", hops.dns.port),),
                              delivery=DeliverySettings(mx_port=hops.port), **changes)


def graduate(directory: Directory, target: str = "lea@gmail.test",
             address: str = GRAD) -> None:
    directory.add(address, [target])
    directory.delete(address)


async def send(port: int, sender: str, rcpts: list[tuple[str, list[str]]], body: bytes,
               mail_options: list[str] | None = None, host: str = "127.0.0.1") -> int:
    """One message with ESMTP parameters; the reply code to DATA."""
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                             local_hostname="client.test")
    await client.connect()
    try:
        await client.ehlo()
        utf8 = "SMTPUTF8" in (mail_options or [])
        await client.mail(sender, options=mail_options or [],
                          encoding="utf-8" if utf8 else "ascii")
        for rcpt, options in rcpts:
            await client.rcpt(rcpt, options=options, encoding="utf-8" if utf8 else "ascii")
        return (await client.data(body)).code
    finally:
        client.close()


# --- 8BITMIME ------------------------------------------------------------------------------


async def test_8bit_mail_goes_with_body_8bitmime_and_size(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    graduate(directory)
    d = await start(start_daemon, hops)
    assert await send(d.port, SENDER, [(GRAD, [])], EIGHT_BIT, ["BODY=8BITMIME"]) == 250
    await hops.provider.wait_for(1)
    (got,) = hops.provider.got
    assert "BODY=8BITMIME" in got.mail_options
    assert f"SIZE={len(got.received.content)}" in got.mail_options
    assert got.received.content.endswith(EIGHT_BIT)  # unchanged: DKIM still verifies


async def test_8bit_mail_converted_for_a_hop_without_8bitmime(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    """RFC 6152 3: never 8-bit to a server that did not offer 8BITMIME; converted to
    quoted-printable (and logged) instead, as Postfix does."""
    provider = await hops.provider_offering("SMTPUTF8", "DSN")
    graduate(directory)
    d = await start(start_daemon, hops)
    # No BODY= from this client: the body itself says it is 8-bit.
    assert await send(d.port, SENDER, [(GRAD, [])], EIGHT_BIT) == 250
    await provider.wait_for(1)
    (got,) = provider.got
    content = got.received.content
    _, _, text = content.partition(b"\r\n\r\n")
    assert text.isascii() and not any(o.startswith("BODY=") for o in got.mail_options)
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content().replace("\r\n", "\n") == (
        "Bonjour Élodie, voici votre lien de réinitialisation.\n")
    assert message["From"] == "Élodie <noreply@jobteaser.test>"  # raw header kept as is
    assert d.metrics.registry.get_sample_value("forwarder_mime_conversions_total") == 1


# --- SMTPUTF8 ------------------------------------------------------------------------------


async def test_utf8_sender_relayed_with_smtputf8_and_its_srs_round_trips(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    graduate(directory)
    d = await start(start_daemon, hops)
    body = "Subject: café\r\nFrom: Jöe <jöe@exämple.test>\r\n\r\nsalut\r\n".encode()
    assert await send(d.port, UTF8_SENDER, [(GRAD, [])], body, ["SMTPUTF8"]) == 250
    await hops.provider.wait_for(1)
    (got,) = hops.provider.got
    assert "SMTPUTF8" in got.mail_options
    srs = got.received.mail_from
    assert srs.startswith("SRS0=") and srs.endswith(f"=exämple.test=jöe@{DOMAIN}")
    assert b"with UTF8SMTP id" in got.received.content
    assert d.return_path is not None
    assert await d.return_path.reverse(srs) == UTF8_SENDER
    # The provider's later bounce comes back to the SRS address and reaches Jöe.
    dsn = b"From: MAILER-DAEMON@gmail.test\r\nSubject: Undelivered\r\n\r\ngone\r\n"
    assert await send(d.port, "", [(srs, [])], dsn, ["SMTPUTF8"]) == 250
    (back,) = await hops.origin.wait_for(1)
    assert back.rcpt_tos == [UTF8_SENDER] and back.mail_from in ("", "<>")


async def test_utf8_mail_to_a_hop_without_smtputf8_fails_with_5_6_7(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    """RFC 6531 3.4: no downgrade; a permanent failure with 5.6.7, and a DSN."""
    provider = await hops.provider_offering("8BITMIME", "DSN")
    graduate(directory)
    d = await start(start_daemon, hops)
    body = "Subject: résumé\r\nFrom: Élodie <noreply@jobteaser.test>\r\n\r\nx\r\n".encode()
    assert await send(d.port, SENDER, [(GRAD, [])], body, ["SMTPUTF8"]) == 250
    (dsn,) = await hops.origin.wait_for(1)
    _, (rcpt,) = delivery_status(dsn.content)
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.6.7"
    assert "SMTPUTF8 is required" in rcpt["Diagnostic-Code"]
    assert provider.messages == []
    await until(lambda: queue_rows(d) == [])


async def test_ascii_mail_that_asked_for_smtputf8_goes_without_it(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    provider = await hops.provider_offering("8BITMIME", "DSN")
    graduate(directory)
    d = await start(start_daemon, hops)
    body = b"Subject: plain\r\n\r\nx\r\n"
    assert await send(d.port, SENDER, [(GRAD, [])], body, ["SMTPUTF8"]) == 250
    await provider.wait_for(1)
    assert "SMTPUTF8" not in provider.got[0].mail_options


# --- DSN (RFC 3461) ------------------------------------------------------------------------


async def test_dsn_parameters_are_passed_to_a_hop_that_offers_dsn(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    graduate(directory)
    graduate(directory, "other@gmail.test", f"autre.nom@{DOMAIN}")
    d = await start(start_daemon, hops)
    rcpts = [(GRAD, ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;Prenom.Nom+2Bx@{DOMAIN}"]),
             (f"autre.nom@{DOMAIN}", [])]
    code = await send(d.port, SENDER, rcpts, b"Subject: x\r\n\r\nx\r\n",
                      ["RET=HDRS", "ENVID=reset+2B42"])
    assert code == 250
    await hops.provider.wait_for(1)
    (got,) = hops.provider.got
    assert got.dsn_mail == {"RET": "HDRS", "ENVID": "reset+2B42"}
    assert got.dsn_rcpt == [
        {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": f"rfc822;Prenom.Nom+2Bx@{DOMAIN}"},
        # No ORCPT from the client: the address it wrote to, so the provider's own
        # reports name prenom.nom@ our domain, not the graduate's private address.
        {"ORCPT": f"rfc822;autre.nom@{DOMAIN}"}]
    await until(lambda: queue_rows(d) == [])
    assert hops.origin.messages == []  # the next hop reports on success, not us


async def test_notify_success_to_a_hop_without_dsn_gives_a_relayed_report(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    """RFC 3461 5.2.2.1: relaying to a server without DSN, we say "relayed"."""
    provider = await hops.provider_offering("8BITMIME", "SMTPUTF8")
    graduate(directory)
    d = await start(start_daemon, hops)
    rcpts = [(GRAD, ["NOTIFY=SUCCESS", f"ORCPT=rfc822;{GRAD}"])]
    assert await send(d.port, SENDER, rcpts, b"Subject: x\r\n\r\nx\r\n", ["ENVID=e1"]) == 250
    await provider.wait_for(1)
    assert provider.got[0].dsn_rcpt == [{}]  # nothing it would not understand
    (report,) = await hops.origin.wait_for(1)
    per_message, (rcpt,) = delivery_status(report.content)
    assert per_message["Original-Envelope-Id"] == "e1"
    assert rcpt["Action"] == "relayed" and rcpt["Status"].startswith("2.")
    assert rcpt["Original-Recipient"] == f"rfc822; {GRAD}"
    assert rcpt["Final-Recipient"] == "rfc822; lea@gmail.test"


@pytest.mark.parametrize("notify", ["NEVER", "FAILURE"])
async def test_failure_reports_follow_notify(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory, notify: str,
) -> None:
    hops.provider.handler.rcpt_reply = lambda rcpt: "550 5.1.1 no such user"
    graduate(directory)
    d = await start(start_daemon, hops)
    rcpts = [(GRAD, [f"NOTIFY={notify}", f"ORCPT=rfc822;{GRAD.upper()}"])]
    assert await send(d.port, SENDER, rcpts, b"Subject: x\r\n\r\nx\r\n") == 250
    # The DSN, if any, is queued in the same commit that removes the recipient.
    await until(lambda: queue_rows(d) == [] or len(hops.origin.messages) == 1)
    await until(lambda: queue_rows(d) == [])
    if notify == "NEVER":
        assert hops.origin.messages == []
        return
    (dsn,) = hops.origin.messages
    _, (rcpt,) = delivery_status(dsn.content)
    assert rcpt["Original-Recipient"] == f"rfc822; {GRAD.upper()}"


# --- where mail leaves from, and the trace field --------------------------------------------


async def test_source_address_and_ehlo_name(
    start_daemon: DaemonFactory, hops: Hops, directory: Directory,
) -> None:
    graduate(directory)
    d = await start(start_daemon, hops, source_address="127.0.0.5",
                    helo_name="out.forwarder.test")
    assert await send(d.port, SENDER, [(GRAD, [])], b"Subject: x\r\n\r\nx\r\n") == 250
    await hops.provider.wait_for(1)
    (got,) = hops.provider.got
    assert (got.peer, got.helo) == ("127.0.0.5", "out.forwarder.test")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_client_written_as_an_ipv6_literal(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    graduate(directory)
    d = await start_daemon(listen=HostPort("::1", 0), smarthost=HostPort("127.0.0.1", sink.port))
    assert await send(d.port, SENDER, [(GRAD, [])], b"Subject: x\r\n\r\nx\r\n",
                      host="::1") == 250
    (got,) = await sink.wait_for(1)
    assert got.content.startswith(b"Received: from client.test ([IPv6:::1])\r\n")


async def test_tls_client_recorded_in_received(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, tmp_path: Path,
) -> None:
    self_signed(tmp_path)
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                           tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port, start_tls=False,
                             local_hostname="client.test")
    await client.connect()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    await client.starttls(tls_context=context)
    await client.sendmail(SENDER, [GRAD], b"Subject: x\r\n\r\nx\r\n")
    client.close()
    (got,) = await sink.wait_for(1)
    trace = got.content.split(b"\r\nSubject:")[0]
    assert b"\r\n\t(using TLSv1.3 with cipher " in trace
    assert b"with ESMTPS id" in trace
