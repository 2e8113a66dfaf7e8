"""Two nodes, one PostgreSQL directory (docs/cluster.md): real daemons on 127.0.0.1 and
127.0.0.2, each with its own state directory, queue and copy of the directory, a real
PostgreSQL started for the session (tests/pgfixtures.py), admin commands through the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.daemon import Daemon
from forwarder.directory.pgadmin import PgDirectory
from forwarder.directory.replica import read_srs_key, replica_path
from forwarder.returnpath import load_srs
from forwarder.tokens import TokenKind, make_token
from tests.conftest import DOMAIN, Sink, make_settings, simple_message, smtp_send, until
from tests.pgcluster import PASSWORD, PgCluster

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@gmail.example"


def write_config(path: Path, url: str) -> Path:
    path.write_text(f'directory_url = "{url}"\ndirectory_password = "{PASSWORD}"\n'
                    f'domains = ["{DOMAIN}"]\n')
    path.chmod(0o600)
    return path


def cli(config: Path, state_dir: Path, *argv: str) -> int:
    return main([*argv, "--config", str(config), "--state-dir", str(state_dir)])


class Nodes:
    """Daemons on one PostgreSQL directory, each with its own state directory."""

    def __init__(self, root: Path, url: str, clock: FakeClock) -> None:
        self.root, self.url, self.clock = root, url, clock
        self.running: list[Daemon] = []

    async def __call__(self, name: str, host: str, **changes: Any) -> Daemon:
        # Active accounts' mail goes to the school's mailbox host (nothing listens there:
        # RCPT is what these tests look at).
        changes.setdefault("mailbox_host", HostPort("127.0.0.1", 9))
        settings = make_settings(self.root / name, listen=HostPort(host, 0),
                                 directory_url=self.url, directory_password=PASSWORD,
                                 directory_sweep=0.5, **changes)
        d = Daemon(settings, clock=self.clock)
        await d.start()
        self.running.append(d)
        return d

    async def stop(self, d: Daemon) -> None:
        self.running.remove(d)
        await d.stop()


@pytest.fixture
async def nodes(tmp_path: Path, pg_url: str, clock: FakeClock) -> AsyncIterator[Nodes]:
    started = Nodes(tmp_path, pg_url, clock)
    yield started
    for d in list(started.running):
        await started.stop(d)


async def rcpt(d: Daemon, address: str) -> tuple[int, str]:
    """RCPT's answer, and no message: the transaction is reset."""
    client = aiosmtplib.SMTP(hostname=d.settings.listen.host, port=d.port, timeout=10,
                             start_tls=False, local_hostname="client.test")
    await client.connect()
    try:
        await client.ehlo()
        await client.mail("noreply@jobteaser.com")
        try:
            reply = await client.rcpt(address)
            return reply.code, reply.message
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code, exc.message
    finally:
        await client.quit()


async def rcpt_until(d: Daemon, address: str, code: int, within: float) -> float:
    """Ask RCPT until it answers `code`; return how long that took."""
    start = time.monotonic()
    while True:
        got = await rcpt(d, address)
        if got[0] == code:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still {got} after {within} s"
        await asyncio.sleep(0.05)


async def test_account_added_on_a_answers_on_b_within_a_second(
    nodes: Nodes, tmp_path: Path, pg_url: str
) -> None:
    a = await nodes("a", "127.0.0.1")
    b = await nodes("b", "127.0.0.2")
    config = write_config(tmp_path / "a.toml", pg_url)
    assert (await rcpt(b, GRAD))[0] == 550
    assert cli(config, a.settings.state_dir, "account", "add", GRAD, "--no-dns-check") == 0
    assert await rcpt_until(b, GRAD, 250, within=1.0) < 1.0
    assert (await rcpt(a, GRAD))[0] == 250
    # A redirect change likewise: the graduate leaves, mail goes to the new target.
    assert cli(config, a.settings.state_dir, "account", "redirect", GRAD, TARGET,
               "--no-dns-check") == 0
    assert cli(config, a.settings.state_dir, "account", "delete", GRAD) == 0
    assert a.directory is not None and b.directory is not None

    async def b_sees_target() -> bool:
        assert b.directory is not None
        account = await b.directory.lookup(GRAD)
        return account is not None and [t.target for t in account.targets] == [TARGET] \
            and account.state.value == "deleted"

    deadline = time.monotonic() + 1.0
    while not await b_sees_target():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_postgresql_down_copy_answers_then_451_never_550_then_catch_up(
    nodes: Nodes, tmp_path: Path, pg_url: str, pg_cluster: PgCluster,
    clock: FakeClock,
) -> None:
    a = await nodes("a", "127.0.0.1")
    b = await nodes("b", "127.0.0.2")
    config = write_config(tmp_path / "a.toml", pg_url)
    assert cli(config, a.settings.state_dir, "account", "add", GRAD, "--no-dns-check") == 0
    await rcpt_until(b, GRAD, 250, within=2.0)
    other = f"marie.curie@{DOMAIN}"
    pg_cluster.stop()
    try:
        # Both keep answering from their copy, a refusal included.
        for node in (a, b):
            assert (await rcpt(node, GRAD))[0] == 250
            assert (await rcpt(node, other))[0] == 550
        # A write from the CLI fails cleanly meanwhile: one line, status 1.
        assert cli(config, a.settings.state_dir, "account", "add", other,
                   "--no-dns-check") == 1
        clock.advance(a.settings.directory_max_staleness + 1)
        for node in (a, b):  # the metric says so
            lines = node.metrics.render().decode().splitlines()
            staleness = next(float(line.split()[1]) for line in lines
                             if line.startswith("forwarder_directory_staleness_seconds "))
            assert staleness > node.settings.directory_max_staleness
        for node in (a, b):
            for address in (GRAD, other):
                code, message = await rcpt(node, address)
                assert (code, message.split()[0]) == (451, "4.3.0"), (address, code)
    finally:
        pg_cluster.start()
    # Back: both catch up, including a change made after they were cut off.
    assert cli(config, a.settings.state_dir, "account", "add", other, "--no-dns-check") == 0
    for node in (a, b):
        await rcpt_until(node, other, 250, within=10.0)
        assert (await rcpt(node, GRAD))[0] == 250


async def test_long_sender_forwarded_by_a_bounce_to_b_reaches_the_sender(
    nodes: Nodes, tmp_path: Path, pg_url: str, sink: Sink, pg_cluster: PgCluster
) -> None:
    config = write_config(tmp_path / "a.toml", pg_url)
    a = await nodes("a", "127.0.0.1", smarthost=HostPort("127.0.0.1", sink.port))
    b = await nodes("b", "127.0.0.2", smarthost=HostPort("127.0.0.1", sink.port))
    assert cli(config, a.settings.state_dir, "account", "add", GRAD, "--redirect", TARGET,
               "--no-dns-check") == 0
    assert cli(config, a.settings.state_dir, "account", "delete", GRAD) == 0
    await rcpt_until(a, GRAD, 250, within=2.0)
    sender = "a" * 50 + "@" + "c" * 40 + ".example"  # too long for an SRS0 local part
    _, data = await smtp_send(a.port, sender, [GRAD], simple_message(), host="127.0.0.1")
    assert data is not None and data[0] == 250
    await until(lambda: any(m.mail_from.upper().startswith("SRS0=")
                            for m in sink.messages))
    srs = next(m.mail_from for m in sink.messages if m.mail_from.upper().startswith("SRS0="))
    assert sender not in srs  # the long-sender form: a key in PostgreSQL
    key = srs.split("=")[-1].split("@")[0]
    # The key reaches B's copy: B reverses the address even without PostgreSQL.
    await until(lambda: read_srs_key(replica_path(b.settings.state_dir), key) == sender)
    pg_cluster.stop()
    try:
        rcpts, data = await smtp_send(b.port, "", [srs], b"Subject: bounce\r\n\r\nno\r\n",
                                      host="127.0.0.2")
    finally:
        pg_cluster.start()
    assert rcpts[srs][0] == 250 and data is not None and data[0] == 250
    await until(lambda: any(m.rcpt_tos == [sender] for m in sink.messages))


async def test_confirmation_token_checks_on_every_node(
    nodes: Nodes, pg_url: str, clock: FakeClock
) -> None:
    """A notice's token is signed with the secret every node copies, and checked by B
    against the binding A's write put in PostgreSQL."""
    a = await nodes("a", "127.0.0.1")
    b = await nodes("b", "127.0.0.2")
    directory = PgDirectory(pg_url, PASSWORD, actor="test")
    with contextlib.closing(directory):
        declared = directory.add(GRAD, [TARGET]).declared[0]
        token = make_token(TokenKind.CONFIRM, declared.target_id, declared.binding,
                           clock.now() + 86400, directory.token_secrets()[0])
    address = f"{TokenKind.CONFIRM.prefix}{token}@{DOMAIN}"
    await rcpt_until(b, address, 250, within=2.0)
    assert (await rcpt(a, address))[0] == 250


async def test_secrets_rotated_on_one_node_are_used_by_every_node(
    nodes: Nodes, tmp_path: Path, pg_url: str, clock: FakeClock
) -> None:
    a = await nodes("a", "127.0.0.1")
    b = await nodes("b", "127.0.0.2")
    config = write_config(tmp_path / "a.toml", pg_url)
    assert cli(config, a.settings.state_dir, "srs", "rotate") == 0
    assert cli(config, a.settings.state_dir, "token", "rotate") == 0
    for node in (a, b):
        await uses_two_secrets(node, clock)


async def uses_two_secrets(node: Daemon, clock: FakeClock) -> None:
    """The node checks tokens with both token secrets and signs SRS with the new one."""
    assert node.front is not None and node.return_path is not None
    front, return_path = node.front, node.return_path
    await until(lambda: len(front.token_secrets) == 2, timeout=2.0)
    secrets = return_path.secrets.load()
    assert len(secrets) == 2
    signer = load_srs(return_path.secrets, DOMAIN, clock, record=False)
    await until(lambda: return_path.srs.forward("noreply@jobteaser.com")
                == signer.forward("noreply@jobteaser.com"), timeout=2.0)


async def test_node_restarted_without_postgresql_serves_its_copy_then_catches_up(
    nodes: Nodes, tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    a = await nodes("a", "127.0.0.1")
    b = await nodes("b", "127.0.0.2")
    config = write_config(tmp_path / "a.toml", pg_url)
    other = f"marie.curie@{DOMAIN}"
    assert cli(config, a.settings.state_dir, "account", "add", GRAD, "--no-dns-check") == 0
    await rcpt_until(b, GRAD, 250, within=2.0)
    await nodes.stop(b)
    # Changed while B was away: B replays it when it comes back.
    assert cli(config, a.settings.state_dir, "account", "add", other, "--no-dns-check") == 0
    pg_cluster.stop()
    try:
        b = await nodes("b", "127.0.0.2")  # starts on its copy, as it was
        assert (await rcpt(b, GRAD))[0] == 250
        assert (await rcpt(b, other))[0] == 550
    finally:
        pg_cluster.start()
    await rcpt_until(b, other, 250, within=10.0)
