"""MTA-STS (RFC 8461) end to end on loopback: the tests' DNS server publishes the
`_mta-sts` TXT record, the MX and the policy host's address; a real HTTPS server (aiohttp,
with a certificate from a test CA) serves the policy; the MX is an SMTP sink whose
certificate comes from the same CA. The daemon is told to trust that CA (`tls_ca_file`)
and finds the policy host through its own resolver (`dns_servers`): nothing touches the
machine's trust store or /etc/hosts.
"""

from __future__ import annotations

import dataclasses
import datetime
import sqlite3
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forwarder import log
from forwarder.clock import FakeClock
from forwarder.config import DeliverySettings, HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from forwarder.mtasts import PolicyError, mx_matches, parse_policy, parse_txt
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
from tests.dnsserver import DnsServer

GRAD = f"lea.bernard@{DOMAIN}"
SENDER = "noreply@jobteaser.com"
POLICY = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


# --- the policy language, from tables -------------------------------------------------------


@pytest.mark.parametrize(("records", "found"), [
    (["v=STSv1; id=20260101"], "20260101"),
    (["v=STSv1;id=abc123;"], "abc123"),
    (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # two records: none (RFC 8461 3.1)
    (["v=spf1 -all"], None), (["v=STSv1"], None), (["v=STSv1; id=a-b"], None), ([], None),
])
def test_txt_record(records: list[str], found: str | None) -> None:
    assert parse_txt(records) == found


def test_policy_parsed() -> None:
    policy = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\n"
                          "mx: *.example.net\r\nmax_age: 604800\r\n", "id1")
    assert (policy.mode, policy.mx, policy.max_age, policy.id) == (
        "enforce", ("mx1.example.org", "*.example.net"), 604800, "id1")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n").max_age == 31557600


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a\nmax_age: 1\n",  # no version
    "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
    "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
])
def test_bad_policies(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


@pytest.mark.parametrize(("host", "pattern", "match"), [
    ("mx.example.org", "mx.example.org", True), ("MX.Example.org.", "mx.example.org", True),
    ("mx1.example.org", "*.example.org", True), ("a.mx1.example.org", "*.example.org", False),
    ("example.org", "*.example.org", False), ("mx.example.net", "mx.example.org", False),
])
def test_mx_patterns(host: str, pattern: str, match: bool) -> None:
    assert mx_matches(host, pattern) is match


# --- a test CA, an HTTPS policy server, TLS sinks ---------------------------------------------


@dataclasses.dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path
    tmp: Path

    def server_context(self, name: str, signer: Ca | None = None) -> ssl.SSLContext:
        """A server certificate for `name`, signed by this CA (or `signer`)."""
        ca = signer or self
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
                .sign(ca.key, hashes.SHA256()))
        stem = self.tmp / name
        stem.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        stem.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(stem.with_suffix(".crt"), stem.with_suffix(".key"))
        return ctx


def make_ca(tmp: Path, name: str = "Test CA") -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    path = tmp / f"{name.replace(' ', '-')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(key, cert, path, tmp)


@dataclasses.dataclass
class PolicyServer:
    text: str
    fetches: int = 0
    runner: web.AppRunner | None = None

    async def serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.Response(text=self.text, content_type="text/plain")

    async def start(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self.serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port, ssl_context=ctx).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclasses.dataclass
class Secure:
    dns: DnsServer
    ca: Ca
    port: int
    https: PolicyServer
    mx: Sink  # mx.secure.test, 127.0.0.2, its certificate from the test CA

    def policy(self, mode: str, mx: str = "mx.secure.test", policy_id: str = "1") -> None:
        self.https.text = POLICY.format(mode=mode, mx=mx)
        self.dns.set_records("_mta-sts.secure.test", "TXT", [f'"v=STSv1; id={policy_id}"'])

    async def replace_mx(self, tls: ssl.SSLContext | None) -> Sink:
        await self.mx.stop()
        self.mx = Sink("127.0.0.2", tls_context=tls)
        await self.mx.start(self.port)
        return self.mx


@pytest.fixture
async def secure(dns_server: DnsServer, tmp_path: Path) -> AsyncIterator[Secure]:
    ca = make_ca(tmp_path)
    port = free_port(("127.0.0.2", "127.0.0.6"))
    https = PolicyServer(POLICY.format(mode="enforce", mx="mx.secure.test"))
    await https.start("127.0.0.6", port, ca.server_context("mta-sts.secure.test"))
    mx = Sink("127.0.0.2", tls_context=ca.server_context("mx.secure.test"))
    await mx.start(port)
    dns_server.set_records("secure.test", "MX", [(10, "mx.secure.test.")])
    dns_server.set_records("mx.secure.test", "A", ["127.0.0.2"])
    dns_server.set_records("mta-sts.secure.test", "A", ["127.0.0.6"])
    world = Secure(dns_server, ca, port, https, mx)
    world.policy("enforce")
    yield world
    await world.mx.stop()
    await https.stop()


async def start(start_daemon: DaemonFactory, secure: Secure, directory: Directory,
                **changes: Any) -> Daemon:
    directory.add(GRAD, ["lea@secure.test"])
    directory.delete(GRAD)
    return await start_daemon(
        dns_servers=(HostPort("127.0.0.1", secure.dns.port),), tls_ca_file=secure.ca.path,
        delivery=DeliverySettings(mx_port=secure.port, mta_sts_port=secure.port), **changes)


def last_error(d: Daemon) -> list[tuple[int, str]]:
    with sqlite3.connect(d.settings.queue_path) as conn:
        return conn.execute("SELECT attempts, last_error FROM recipients").fetchall()


def counted(d: Daemon, result: str) -> float | None:
    return d.metrics.registry.get_sample_value("forwarder_outbound_tls_total",
                                               {"tls": result})


# --- enforce, testing, caching ---------------------------------------------------------------


async def test_enforce_delivers_over_verified_tls(
    start_daemon: DaemonFactory, secure: Secure, directory: Directory,
) -> None:
    d = await start(start_daemon, secure, directory)
    for n in range(2):
        await smtp_send(d.port, SENDER, [GRAD], simple_message(msgid=f"<{n}@jobteaser.com>"))
        got = await secure.mx.wait_for(n + 1)
        assert got[-1].tls
    assert counted(d, "verified") == 1  # one session, reused
    assert secure.https.fetches == 1  # the policy is cached


@pytest.mark.parametrize("fault", ["no_starttls", "wrong_name", "untrusted", "mx_not_listed"])
async def test_enforce_defers_rather_than_deliver_unprotected(
    start_daemon: DaemonFactory, secure: Secure, directory: Directory, tmp_path: Path,
    fault: str,
) -> None:
    if fault == "no_starttls":
        await secure.replace_mx(None)
    elif fault == "wrong_name":
        await secure.replace_mx(secure.ca.server_context("mx.elsewhere.test"))
    elif fault == "untrusted":
        other = make_ca(tmp_path, "Other CA")
        await secure.replace_mx(secure.ca.server_context("mx.secure.test", signer=other))
    else:
        secure.policy("enforce", mx="*.mail.secure.test")
    d = await start(start_daemon, secure, directory)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    await until(lambda: len(last_error(d)) == 1 and last_error(d)[0][0] == 1)
    ((_, error),) = last_error(d)
    assert error.startswith("x-local; ") and "MTA-STS" in error  # deferred: 4.7.5
    assert secure.mx.messages == []  # never in clear, never to an unlisted MX
    if fault != "mx_not_listed":
        assert counted(d, "policy_failed") == 1


async def test_testing_mode_delivers_and_reports(
    start_daemon: DaemonFactory, secure: Secure, directory: Directory,
) -> None:
    mx = await secure.replace_mx(None)  # no STARTTLS at all
    secure.policy("testing")
    d = await start(start_daemon, secure, directory)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    (got,) = await mx.wait_for(1)
    assert not got.tls
    assert counted(d, "policy_failed") == 1
    assert any(p["event"] == "tls_policy_failed" and p["fields"].get("mode") == "testing"
               for p in log.recent_problems())


async def test_policy_refreshed_when_its_id_changes_or_it_expires(
    start_daemon: DaemonFactory, secure: Secure, directory: Directory, clock: FakeClock,
) -> None:
    secure.dns.default_ttl = 1
    d = await start(start_daemon, secure, directory)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    await secure.mx.wait_for(1)
    assert secure.https.fetches == 1
    # The domain publishes a new policy (a new id): it is fetched again, and applies.
    secure.policy("enforce", mx="*.mail.secure.test", policy_id="2")
    clock.advance(2)  # past the TXT record's TTL
    await smtp_send(d.port, SENDER, [GRAD], simple_message(msgid="<2@jobteaser.com>"))
    await until(lambda: [a for a, _ in last_error(d)] == [1])
    assert secure.https.fetches == 2 and "matches its MTA-STS policy" in last_error(d)[0][1]
    # Past max_age it is fetched again even with the same id.
    secure.policy("enforce", policy_id="2")
    clock.advance(86400)
    assert await scan_due(d) == 1
    await secure.mx.wait_for(2)
    assert secure.https.fetches == 3


async def test_no_policy_server_means_no_policy(
    start_daemon: DaemonFactory, secure: Secure, directory: Directory,
) -> None:
    """RFC 8461 5.1: a policy that cannot be fetched (and none cached) is no policy."""
    await secure.https.stop()
    mx = await secure.replace_mx(None)
    d = await start(start_daemon, secure, directory)
    await smtp_send(d.port, SENDER, [GRAD], simple_message())
    (got,) = await mx.wait_for(1)
    assert not got.tls
    assert any(p["event"] == "mta_sts_fetch_failed" for p in log.recent_problems())
