"""The school's wiring, for real: a private Postfix instance as the gateway (MX) in front of
the forwarder, configured as docs/admin.md section 3 says, with the tables that
`forwarder check` prints (forwarder/postfixmaps.py). A graduate's mail goes through it to
the forwarder and on, with SRS; the provider's later bounce, sent to the SRS address at the
gateway, reaches the original sender; a forged SRS address is refused at RCPT time.

The Postfix is ours alone: `postfix -c DIR` with its own main.cf and master.cf, queue and
data directories in a temporary directory, listening on a loopback port; it never reads or
touches /etc/postfix or /var/spool/postfix (the benchmarks use the system's Postfix). It
needs root (its daemons run as the `postfix` user) and Debian's postfix package.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from forwarder.config import CheckSettings, HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from forwarder.postfixmaps import RECIPIENTS_FILE, TRANSPORT_FILE, postfix_maps
from tests.conftest import DOMAIN, DaemonFactory, Sink, until
from tests.dnsserver import DnsServer

POSTFIX = "/usr/sbin/postfix"
GRAD = f"prenom.nom@{DOMAIN}"
SENDER = "noreply@jobteaser.com"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(POSTFIX) and shutil.which("postmap") and os.geteuid() == 0),
    reason="needs Debian's postfix and root (CI installs it and runs as root)")

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {out.decode(errors='replace')}"


class Gateway:
    """A private Postfix in `root` relaying our domain to the forwarder at `forwarder`."""

    def __init__(self, root: Path, forwarder: int, accounts: dict[str, bool],
                 main_cf: tuple[str, ...] = ()) -> None:
        self.root = root
        self.main_cf = main_cf  # more main.cf lines
        self.conf = root / "conf"
        self.port = free_loopback_port()
        self.forwarder = forwarder
        self.accounts = accounts  # address -> deleted (routed to the forwarder)

    def write(self) -> None:
        conf, root = self.conf, self.root
        for name in ("conf", "queue", "data"):
            (root / name).mkdir()
        os.chown(root / "data", pwd.getpwnam("postfix").pw_uid, -1)
        maps = postfix_maps((DOMAIN,), DOMAIN, f"127.0.0.1:{self.forwarder}", str(conf))
        nexthop = f"smtp:[127.0.0.1]:{self.forwarder}"
        (conf / "transport_forwarder").write_text(
            "".join(f"{a}\t{nexthop}\n" for a, deleted in self.accounts.items() if deleted))
        (conf / "relay_recipients").write_text("".join(f"{a}\tOK\n" for a in self.accounts))
        (conf / TRANSPORT_FILE).write_text("\n".join(maps.transport) + "\n")
        (conf / RECIPIENTS_FILE).write_text("\n".join(maps.recipients) + "\n")
        (conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (conf / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {root}/queue", f"data_directory = {root}/data",
            f"maillog_file = {root}/maillog", f"maillog_file_prefixes = {root}",
            "myhostname = gateway.sigma-clermont.test", "mydestination =",
            "inet_interfaces = 127.0.0.1", "inet_protocols = ipv4",
            # Nobody is a trusted network: the test's clients are the Internet.
            "mynetworks = 127.0.0.254/32", "alias_maps =", "alias_database =",
            "smtp_host_lookup = native", "smtpd_peername_lookup = no",
            # docs/admin.md section 3, with the tables `forwarder check` prints:
            *maps.main_cf,
            "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,"
            " reject_unverified_recipient",
            "unverified_recipient_reject_code = 550",
            # Test speed only: smtpd polls the verify service every 3 s by default.
            "address_verify_poll_delay = 1s",
            *self.main_cf,
        ]) + "\n")

    async def start(self) -> None:
        self.write()
        # `-c`: the private configuration, not /etc/postfix/main.cf, which a machine whose
        # postfix was installed with "No configuration" does not have.
        await run("postmap", "-c", str(self.conf), f"hash:{self.conf}/transport_forwarder",
                  f"hash:{self.conf}/relay_recipients")
        await run(POSTFIX, "-c", str(self.conf), "start")

    async def stop(self) -> None:
        if (self.root / "queue" / "pid" / "master.pid").exists():  # it did start
            await run(POSTFIX, "-c", str(self.conf), "stop")

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def gateway_in_front(d: Daemon, main_cf: tuple[str, ...] = ()) -> AsyncIterator[Gateway]:
    # Not pytest's tmp_path: Postfix's daemons run as `postfix` and must reach the files.
    root = Path(tempfile.mkdtemp(prefix="forwarder-postfix-", dir="/tmp"))
    os.chmod(root, 0o755)
    gateway = Gateway(root, d.port, {GRAD: True, f"eleve.actif@{DOMAIN}": False}, main_cf)
    try:
        await gateway.start()
        yield gateway
    finally:
        try:
            await gateway.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def chain(start_daemon: DaemonFactory, sink: Sink,
                directory: Directory) -> AsyncIterator[tuple[Gateway, Daemon]]:
    directory.add(GRAD, ["lea@gmail.test"])
    directory.delete(GRAD)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    async with gateway_in_front(d) as gateway:
        yield gateway, d


async def through_gateway(gateway: Gateway, sender: str, rcpt: str, body: bytes,
                          source: str = "127.0.0.1") -> tuple[int, str]:
    """One message to the gateway from `source`; the first refusal or the reply to DATA."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.port, start_tls=False,
                             local_hostname="mx.provider.test", timeout=30,
                             source_address=(source, 0))
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(sender)
        try:
            await client.rcpt(rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code, exc.message
        reply = await client.data(body)
        return reply.code, reply.message
    finally:
        client.close()


@pytest.mark.timeout(90)
async def test_bounce_to_an_srs_address_reaches_the_original_sender(
    chain: tuple[Gateway, Daemon], sink: Sink,
) -> None:
    gateway, _ = chain
    reset = b"From: JobTeaser <noreply@jobteaser.com>\r\nSubject: reset\r\n\r\nlink\r\n"
    code, text = await through_gateway(gateway, SENDER, GRAD, reset)
    assert code == 250, (text, gateway.log())
    (forwarded,) = await sink.wait_for(1, timeout=30)
    srs = forwarded.mail_from
    assert forwarded.rcpt_tos == ["lea@gmail.test"] and srs.startswith("SRS0=")
    # Days later the provider bounces it, to the SRS address, at the school's MX. Sent in
    # lower case, as some MTAs fold it: the gateway's tables match it all the same.
    bounce = (b"From: MAILER-DAEMON@gmail.test\r\nSubject: Undelivered Mail\r\n\r\n"
              b"lea@gmail.test: mailbox full\r\n")
    code, text = await through_gateway(gateway, "", srs.lower(), bounce)
    assert code == 250, (text, gateway.log())
    (_, returned) = await sink.wait_for(2, timeout=30)
    assert returned.rcpt_tos == [SENDER] and returned.mail_from in ("", "<>")
    assert b"mailbox full" in returned.content


@pytest.mark.timeout(90)
async def test_forged_srs_address_is_refused_at_the_gateway(
    chain: tuple[Gateway, Daemon], sink: Sink,
) -> None:
    """The gateway asks the forwarder at RCPT time (reject_unverified_recipient): a forged
    SRS address gets 550 there, and nothing is accepted that would later bounce."""
    gateway, _ = chain
    forged = f"SRS0=XXXX=AB=evil.example=victim@{DOMAIN}"
    code, text = await through_gateway(gateway, "", forged, b"Subject: x\r\n\r\nx\r\n")
    assert code == 550, (text, gateway.log())
    await until(lambda: "status=undeliverable" in gateway.log() or "550" in gateway.log(),
                timeout=10)
    assert sink.messages == []


RELAYED = "relayed.example"  # its SPF names only the Internet client, not the gateway


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("trusted", "spf"), [(True, "pass"), (False, "fail")])
async def test_the_gateway_tells_the_checks_who_its_client_was(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, trusted: bool, spf: str,
) -> None:
    """docs/admin.md section 3: with `smtp_send_xforward_command = yes` at the gateway (one
    of the lines `forwarder check` prints) and its address in `xforward_hosts`, SPF is
    checked against the Internet client (127.0.0.9 here) and its HELO, not the gateway;
    untrusted, XFORWARD is not offered and SPF sees the gateway (and fails, as it does for
    every relayed message without XFORWARD)."""
    directory.add(GRAD, ["lea@gmail.test"])
    directory.delete(GRAD)
    async with DnsServer() as zone:
        zone.set_records(RELAYED, "TXT", ['"v=spf1 ip4:127.0.0.9 -all"'])
        d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                               dns_servers=(HostPort("127.0.0.1", zone.port),),
                               checks=CheckSettings(enabled=True, dmarc_reject="mark"),
                               xforward_hosts=("127.0.0.1/32",) if trusted else ())
        async with gateway_in_front(d) as gateway:
            body = f"From: <news@{RELAYED}>\r\nSubject: hello\r\n\r\nhi\r\n".encode()
            code, text = await through_gateway(gateway, f"news@{RELAYED}", GRAD, body,
                                               source="127.0.0.9")
            assert code == 250, (text, gateway.log())
            (got,) = await sink.wait_for(1, timeout=30)
    assert f"spf={spf} smtp.mailfrom=news@{RELAYED}".encode() in got.content
    # Our own trace field still names the hop we spoke to: the gateway.
    assert b"Received: from gateway.sigma-clermont.test ([127.0.0.1])" in got.content
