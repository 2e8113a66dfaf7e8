"""The inbound checks end to end: the real daemon, a real DNS server on loopback publishing
SPF, DKIM keys and DMARC (tests/authzone.py), a real SMTP sink, and the admin CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import authres
import dkim
import pytest
import pytest_asyncio

from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.config import CheckSettings, HostPort, RateLimits, RspamdSettings
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.authzone import JOBTEASER, NEWSLETTER, RELAXED, SELECTOR, SPOOFER, SigningKey, publish
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Sink,
    make_settings,
    refused_port,
    smtp_send,
    until,
)
from tests.dnsserver import Behaviour, DnsServer
from tests.test_dkim import password_reset

GRAD = f"camille.martin@{DOMAIN}"
TARGET = "camille.martin@gmail.example"
OURS = "forwarder.test"  # the test daemon's hostname, so our authserv-id


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey()


@pytest.fixture
def clock() -> FakeClock:
    # Today, so that `report senders --since` (which reads the real date) sees the counts.
    return FakeClock(time.time())


@pytest_asyncio.fixture
async def zone(key: SigningKey) -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        publish(server, key)
        yield server


@pytest.fixture
def graduate(directory: Directory) -> str:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    return GRAD


async def checking_daemon(start_daemon: DaemonFactory, zone: DnsServer, sink: Sink,
                          **checks: Any) -> Daemon:
    return await start_daemon(
        smarthost=HostPort("127.0.0.1", sink.port),
        dns_servers=(HostPort("127.0.0.1", zone.port),),
        checks=CheckSettings(enabled=True, **checks))


def signed_reset(key: SigningKey, message: bytes | None = None) -> bytes:
    message = message or password_reset()
    signature = dkim.sign(message, SELECTOR.encode(), JOBTEASER.encode(), key.private,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return bytes(signature) + message


def dnsfunc(key: SigningKey) -> Any:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{SELECTOR}._domainkey.{JOBTEASER}.".encode()
        return key.record.encode()
    return lookup


def message_from(domain: str, subject: str = "hello") -> bytes:
    return (f"From: Someone <someone@{domain}>\r\nTo: {GRAD}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@{domain}>\r\n\r\nbody\r\n").encode()


def our_results(content: bytes) -> dict[str, str]:
    """method -> result of the Authentication-Results field on top of the message."""
    assert content.startswith(b"Authentication-Results: " + OURS.encode() + b";")
    field = content.split(b"\r\n", 1)[0]
    rest = content.split(b"\r\n", 1)[1]
    while rest.startswith(b"\t"):
        line, rest = rest.split(b"\r\n", 1)
        field += line
    parsed = authres.parse(field.decode())
    return {r.method: r.result for r in parsed.results}


async def test_signed_reset_passes_and_still_verifies_at_the_sink(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
    key: SigningKey,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink)
    signed = signed_reset(key)
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [graduate], signed)
    assert data is not None and data[0] == 250, data
    (got,) = await sink.wait_for(1)
    # 127.0.0.1 is not in jobteaser.com's SPF: DMARC passes through the aligned signature.
    assert our_results(got.content) == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}
    assert b"header.d=jobteaser.com header.s=s2026" in got.content
    # Our fields were prepended, the sender's bytes left alone: the signature verifies.
    assert got.content.endswith(signed)
    assert dkim.verify(got.content, dnsfunc=dnsfunc(key))
    assert d.metrics.registry.get_sample_value(
        "forwarder_auth_results_total", {"method": "dkim", "outcome": "pass"}) == 1
    # Every question went to the test's own server.
    assert zone.queries_for(f"{SELECTOR}._domainkey.{JOBTEASER}", "TXT")
    assert zone.queries_for(f"_dmarc.{JOBTEASER}", "TXT")


@pytest.mark.parametrize("mailfrom", ["noreply@jobteaser.com", f"bounce@{SPOOFER}"])
async def test_unsigned_mail_claiming_a_p_reject_domain_is_refused(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str, mailfrom: str,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink)
    _, data = await smtp_send(d.port, mailfrom, [graduate], password_reset())
    assert data is not None and data[0] == 550 and data[1].startswith("5.7.1"), data
    assert (await d.queue.stats())["messages"] == 0
    assert d.metrics.registry.get_sample_value(
        "forwarder_messages_refused_total", {"reason": "dmarc"}) == 1
    assert not sink.messages


async def test_mark_mode_forwards_the_failure_with_its_header(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink, dmarc_reject="mark")
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [graduate], password_reset())
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert our_results(got.content) == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert b"dmarc=fail (p=REJECT dis=REJECT) header.from=jobteaser.com" in got.content


async def test_p_none_failure_and_spoofer_spf_are_forwarded(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink)
    _, data = await smtp_send(d.port, f"a@{RELAXED}", [graduate], message_from(RELAXED))
    assert data is not None and data[0] == 250
    _, data = await smtp_send(d.port, f"a@{SPOOFER}", [graduate], message_from(SPOOFER, "b"))
    assert data is not None and data[0] == 250
    first, second = await sink.wait_for(2)
    assert our_results(first.content) == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert b"(p=NONE dis=NONE)" in first.content
    assert our_results(second.content) == {"spf": "pass", "dkim": "none", "dmarc": "pass"}
    assert b"smtp.mailfrom=a@spoofer.example" in second.content


FORGED = (b"Authentication-Results: forwarder.test;\r\n"
          b"\tdkim=pass header.d=jobteaser.com;\r\n\tdmarc=pass header.from=jobteaser.com\r\n")
THEIRS = b"Authentication-Results: mx.jobteaser.com; spf=pass smtp.mailfrom=jobteaser.com\r\n"


async def test_forged_results_with_our_id_do_not_reach_the_sink(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
    key: SigningKey,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink, dmarc_reject="mark")
    signed = signed_reset(key)
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [graduate],
                              FORGED + THEIRS + signed)
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.content.count(b"forwarder.test;") == 1  # ours, on top
    assert FORGED not in got.content
    assert got.content.endswith(THEIRS + signed)  # the other server's field stays
    assert dkim.verify(got.content, dnsfunc=dnsfunc(key))


async def test_spf_lookup_limits_give_permerror(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink)
    for sender in ("a@greedy.example", "a@void.example"):
        _, data = await smtp_send(d.port, sender, [graduate], message_from("greedy.example"))
        assert data is not None and data[0] == 250
    first, second = await sink.wait_for(2)
    assert our_results(first.content)["spf"] == "permerror"  # 11 DNS mechanisms
    assert our_results(second.content)["spf"] == "permerror"  # 3 void lookups
    assert len(zone.queries_for("h10.greedy.example")) == 0  # stopped at the limit


async def test_null_sender_follows_the_same_rules_checked_on_its_helo(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
) -> None:
    d = await checking_daemon(start_daemon, zone, sink)
    zone.set_records("client.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    dsn = (f"From: Mail Delivery System <mailer-daemon@client.test>\r\nTo: {GRAD}\r\n"
           "Subject: Undelivered Mail\r\n\r\nbody\r\n").encode()
    _, data = await smtp_send(d.port, "", [graduate], dsn)
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    # RFC 7208 2.4: with MAIL FROM null, HELO is the identity SPF checks.
    assert b"spf=pass smtp.helo=client.test" in got.content
    assert our_results(got.content) == {"spf": "pass", "dkim": "none", "dmarc": "none"}
    # A bounce claiming a p=reject domain it cannot authenticate is refused like any mail.
    _, data = await smtp_send(d.port, "", [graduate], message_from(NEWSLETTER))
    assert data is not None and data[0] == 550


@pytest.mark.parametrize(("fail_open", "code"), [(True, 250), (False, 451)])
async def test_dns_failure_is_temperror_never_a_5xx(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
    fail_open: bool, code: int,
) -> None:
    zone.set_behaviour(f"_dmarc.{JOBTEASER}", Behaviour.SERVFAIL)
    d = await checking_daemon(start_daemon, zone, sink, fail_open=fail_open)
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [graduate], password_reset())
    assert data is not None and data[0] == code, data
    if code == 451:
        assert data[1].startswith("4.7.0")
        assert (await d.queue.stats())["messages"] == 0
        return
    (got,) = await sink.wait_for(1)
    assert our_results(got.content)["dmarc"] == "temperror"


async def test_an_unanswering_name_server_costs_the_deadline_only(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
) -> None:
    for name in (JOBTEASER, f"_dmarc.{JOBTEASER}"):
        zone.set_behaviour(name, Behaviour.TIMEOUT)
    d = await checking_daemon(start_daemon, zone, sink, deadline=0.5)
    started = time.monotonic()
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [graduate], password_reset())
    assert data is not None and data[0] == 250  # failing open, the default
    assert time.monotonic() - started < 3.0
    (got,) = await sink.wait_for(1)
    assert our_results(got.content) == {"spf": "temperror", "dkim": "none",
                                        "dmarc": "temperror"}


async def test_the_n_plus_first_message_from_a_client_is_deferred(
    start_daemon: DaemonFactory, sink: Sink, graduate: str, clock: FakeClock,
) -> None:
    # The rate limits work with the authentication checks off.
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                           rate_limits=RateLimits(client_per_minute=3, exempt=()))
    for _ in range(3):
        _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
        assert data is not None and data[0] == 250
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
    assert data is not None and (data[0], data[1][:5]) == (451, "4.7.0"), data
    assert d.metrics.registry.get_sample_value(
        "forwarder_rate_limited_total", {"scope": "client"}) == 1
    clock.advance(20)  # a third of a minute: one message's worth
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
    assert data is not None and data[0] == 250


async def test_recipient_limit(
    start_daemon: DaemonFactory, sink: Sink, graduate: str,
) -> None:
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                           rate_limits=RateLimits(recipient_per_hour=1))
    _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
    assert data is not None and data[0] == 250
    _, data = await smtp_send(d.port, "a@sender.example", [graduate.upper()],
                              message_from("x"))
    assert data is not None and data[0] == 451 and "recipient" in data[1], data


def report(state_dir: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert main(["report", "senders", "--state-dir", str(state_dir), *argv]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else out


async def test_report_senders_after_a_mix(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str,
    key: SigningKey, state_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    d = await checking_daemon(start_daemon, zone, sink)
    sends = [("noreply@jobteaser.com", signed_reset(key)),  # DKIM-aligned
             ("noreply@jobteaser.com", signed_reset(key)),
             (f"news@{NEWSLETTER}", message_from(NEWSLETTER, "n1")),  # SPF only
             (f"news@{NEWSLETTER}", message_from(NEWSLETTER, "n2")),
             (f"a@{RELAXED}", message_from(RELAXED, "r")),  # neither (p=none: forwarded)
             ("noreply@jobteaser.com", password_reset())]  # neither: refused, still counted
    for sender, body in sends:
        _, data = await smtp_send(d.port, sender, [graduate], body)
        assert data is not None
    assert await d.flush_senders() == 3
    assert await d.flush_senders() == 0  # nothing new: no write
    doc = report(state_dir, capsys, "--json")
    rows = {r["domain"]: r for r in doc["domains"]}
    # Most messages at risk first (2, 1, 1), then the smaller share surviving (0 % < 67 %).
    assert [r["domain"] for r in doc["domains"]] == [NEWSLETTER, RELAXED, JOBTEASER]
    assert (rows[JOBTEASER]["dkim_aligned"], rows[JOBTEASER]["spf_only"],
            rows[JOBTEASER]["unaligned"], rows[JOBTEASER]["policy"]) == (2, 0, 1, "reject")
    assert (rows[NEWSLETTER]["spf_only"], rows[NEWSLETTER]["survives"]) == (2, 0.0)
    assert rows[RELAXED]["unaligned"] == 1 and doc["messages"] == 6
    text = report(state_dir, capsys)
    assert "Passing through SPF only: newsletter.example" in text
    assert text.splitlines()[2].startswith(NEWSLETTER)


async def test_counts_are_flushed_when_the_daemon_stops(
    zone: DnsServer, sink: Sink, graduate: str, state_dir: Path, clock: FakeClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = Daemon(make_settings(state_dir, smarthost=HostPort("127.0.0.1", sink.port),
                             dns_servers=(HostPort("127.0.0.1", zone.port),),
                             checks=CheckSettings(enabled=True)), clock=clock)
    await d.start()
    try:
        _, data = await smtp_send(d.port, f"news@{NEWSLETTER}", [graduate],
                                  message_from(NEWSLETTER))
        assert data is not None and data[0] == 250
    finally:
        await d.stop()
    doc = report(state_dir, capsys, "--json", "--since", "1")
    assert [(r["domain"], r["spf_only"]) for r in doc["domains"]] == [(NEWSLETTER, 1)]


async def test_spf_results_are_reused_until_their_dns_answers_expire(
    start_daemon: DaemonFactory, zone: DnsServer, sink: Sink, graduate: str, clock: FakeClock,
) -> None:
    zone.set_ttl(NEWSLETTER, "TXT", 300)
    d = await checking_daemon(start_daemon, zone, sink, dmarc_reject="mark")

    async def spf() -> str:
        _, data = await smtp_send(d.port, f"news@{NEWSLETTER}", [graduate],
                                  message_from(NEWSLETTER))
        assert data is not None and data[0] == 250
        got = await sink.wait_for(len(sink.messages) + 1)
        return our_results(got[-1].content)["spf"]

    assert await spf() == "pass"
    zone.set_records(NEWSLETTER, "TXT", ['"v=spf1 -all"'])  # the domain changes its record
    assert await spf() == "pass"  # within the TTL: the answer (and result) still hold
    assert len(zone.queries_for(NEWSLETTER, "TXT")) == 1
    clock.advance(301)
    assert await spf() == "fail"
    assert len(zone.queries_for(NEWSLETTER, "TXT")) == 2


async def test_sighup_applies_new_checks_settings(
    sink: Sink, graduate: str, state_dir: Path, clock: FakeClock,
) -> None:
    first = make_settings(state_dir, smarthost=HostPort("127.0.0.1", sink.port),
                          rate_limits=RateLimits(client_per_minute=1, exempt=()))
    current = [first]
    d = Daemon(first, clock=clock, reload_settings=lambda: current[0])
    await d.start()
    try:
        for code in (250, 451):
            _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
            assert data is not None and data[0] == code
        current[0] = dataclasses.replace(
            first, rate_limits=RateLimits(client_per_minute=0),
            rspamd=RspamdSettings(url=f"http://127.0.0.1:{await refused_port()}",
                                  fail_open=False))
        assert d.reload()
        _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
        assert data == (451, "4.7.0 spam filter unavailable, try again later")
        current[0] = first
        assert d.reload()  # rspamd off again; the limit back, with a full bucket
        _, data = await smtp_send(d.port, "a@sender.example", [graduate], message_from("x"))
        assert data is not None and data[0] == 250
    finally:
        await d.stop()


async def test_stopping_releases_threads_waiting_on_dns(
    zone: DnsServer, sink: Sink, graduate: str, state_dir: Path, clock: FakeClock,
) -> None:
    """A check waiting on a silent name server does not hold the process's exit for its
    deadline: the interpreter joins the pool's threads before it exits."""
    zone.set_behaviour(JOBTEASER, Behaviour.TIMEOUT)
    d = Daemon(make_settings(state_dir, smarthost=HostPort("127.0.0.1", sink.port),
                             dns_servers=(HostPort("127.0.0.1", zone.port),), stop_timeout=0.5,
                             checks=CheckSettings(enabled=True, deadline=60)), clock=clock)
    await d.start()
    sending = asyncio.ensure_future(smtp_send(d.port, "noreply@jobteaser.com", [graduate],
                                              password_reset()))
    try:
        await until(lambda: zone.queries_for(JOBTEASER, "TXT"))
        started = time.monotonic()
        await d.stop()
        await until(lambda: not any(t.name.startswith("checks") and t.is_alive()
                                    for t in threading.enumerate()), timeout=5)
        assert time.monotonic() - started < 5
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
