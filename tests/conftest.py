"""Shared test parts: a real SMTP sink on loopback, the real daemon, an SMTP client.

Nothing here is a mock: the daemon listens on a real socket, the sink is an aiosmtpd
server the daemon connects to, and the databases are real SQLite files in tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from forwarder import log
from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.config import HostPort, Settings
from forwarder.daemon import Daemon
from forwarder.directory import Directory, Written
from tests.dnsserver import DnsServer

pytest_plugins = ["tests.dnsfixtures", "tests.rspamdfixture", "tests.pgfixtures"]

DOMAIN = "sigma-clermont.fr"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool = False


@dataclass
class SinkHandler:
    """Behaviour of the sink, changeable while a test runs."""

    messages: list[Received] = field(default_factory=list)
    rcpt_reply: Callable[[str], str | None] = lambda rcpt: None  # None: accept
    data_reply: str | None = None  # None: accept
    hang: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self.rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.hang:
            await asyncio.Event().wait()
        if self.data_reply is not None:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, bool(session.ssl)))
        self.arrived.set()
        return "250 2.0.0 Ok: stored"


class Sink:
    """An aiosmtpd server on 127.0.0.1 standing in for a destination MTA."""

    def __init__(self, host: str = "127.0.0.1", tls_context: Any = None) -> None:
        self.host = host
        self.tls_context = tls_context
        self.connections = 0
        self.handler = SinkHandler()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.sessions: list[SMTP] = []

    def _protocol(self) -> SMTP:
        proto = SMTP(self.handler, hostname="sink.test", decode_data=False,
                     tls_context=self.tls_context)
        self.sessions.append(proto)
        self.connections += 1
        return proto

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for proto in self.sessions:
                if proto.transport is not None:
                    proto.transport.close()
            self.sessions.clear()
            await self.server.wait_closed()
            self.server = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until `count` messages have arrived (an event, not a fixed sleep)."""
        async def _wait() -> None:
            while len(self.handler.messages) < count:
                self.handler.arrived.clear()
                await self.handler.arrived.wait()
        await asyncio.wait_for(_wait(), timeout)
        return self.handler.messages


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    log.configure("json", "warning")


@pytest.fixture(autouse=True)
def _same_umask() -> Iterator[None]:
    """The CLI narrows the process umask (forwarder/privileges.py) and some tests run it
    in this process: each test starts with the umask the suite started with (a private
    Postfix cannot read its own queue directories under 027)."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def pending_datagrams(sock: socket.socket) -> list[bytes]:
    """The datagrams waiting on a non-blocking socket, now."""
    got = []
    while True:
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            return got


def make_settings(state_dir: Path, **changes: Any) -> Settings:
    base = Settings(
        listen=HostPort("127.0.0.1", 0),
        domains=(DOMAIN,),
        hostname="forwarder.test",
        state_dir=state_dir,
        postmaster="it-team@school-it.example",
        # Never the machine's resolver: a test that needs DNS starts its own server on
        # loopback (tests/dnsserver.py); nothing answers on this port, so MX routing fails
        # as a temporary error.
        dns_servers=(HostPort("127.0.0.1", 9),),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


class NoticedDirectory(Directory):
    """The directory as an admin command leaves it: the notices its declarations owe have
    been queued by the command (here: nowhere), so the daemon does not send them. Tests
    about notices declare through the CLI instead, as admins do."""

    def add(self, address: str, targets: Sequence[str] = ()) -> Written:
        return self._noticed(super().add(address, targets))

    def set_targets(self, address: str, targets: Sequence[str]) -> Written:
        return self._noticed(super().set_targets(address, targets))

    def switch_target(self, address: str, target: str, on: bool) -> Written:
        return self._noticed(super().switch_target(address, target, on))

    def _noticed(self, written: Written) -> Written:
        self.notices_sent([item.target_id for item in written.declared])
        return written


@pytest.fixture
def directory(state_dir: Path) -> Directory:
    return NoticedDirectory(state_dir / "directory.sqlite3", actor="test")


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], state_dir: Path) -> Run:
    """Run `forwarder ARGS --state-dir STATE`; return (status, stdout, stderr)."""

    def _run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what a daemon in the test logged before
        code = main([*argv, "--state-dir", str(state_dir)])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def run_json(run: Run, *argv: str) -> Any:
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(
    state_dir: Path, clock: FakeClock
) -> AsyncIterator[DaemonFactory]:
    started: list[Daemon] = []

    async def factory(**changes: Any) -> Daemon:
        router = changes.pop("router", None)
        d = Daemon(make_settings(state_dir, **changes), clock=clock, router=router)
        await d.start()
        started.append(d)
        return d

    yield factory
    for d in started:
        await d.stop()


async def smtp_send(
    port: int, sender: str, recipients: list[str], body: bytes, timeout: float = 10.0,
    host: str = "127.0.0.1",
) -> tuple[dict[str, tuple[int, str]], tuple[int, str] | None]:
    """Send one message; return each RCPT's reply, and DATA's (None if no RCPT accepted).
    `timeout` bounds the wait for each reply."""
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                             timeout=timeout, local_hostname="client.test")
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(sender)
        rcpt_replies: dict[str, tuple[int, str]] = {}
        for rcpt in recipients:
            try:
                r = await client.rcpt(rcpt)
                rcpt_replies[rcpt] = (r.code, r.message)
            except aiosmtplib.SMTPRecipientRefused as exc:
                rcpt_replies[rcpt] = (exc.code, exc.message)
        if not any(code == 250 for code, _ in rcpt_replies.values()):
            return rcpt_replies, None
        try:
            d = await client.data(body)
            data_reply = (d.code, d.message)
        except aiosmtplib.SMTPDataError as exc:
            data_reply = (exc.code, exc.message)
        return rcpt_replies, data_reply
    finally:
        client.close()


def simple_message(subject: str = "hello", msgid: str = "<1@jobteaser.example>") -> bytes:
    return (
        f"From: JobTeaser <noreply@jobteaser.com>\r\nTo: someone@{DOMAIN}\r\n"
        f"Subject: {subject}\r\nMessage-ID: {msgid}\r\n\r\nbody line\r\n.leading dot\r\n"
    ).encode()


async def scan_due(d: Daemon, timeout: float = 10.0) -> int:
    """Run the dispatcher's scan once no delivery is in flight. A test that saw a result in
    the queue file may get there before the worker that wrote it has let go of its
    recipients; scanning then would (rightly) skip them."""
    async def _idle() -> None:
        while d.dispatcher.in_flight:
            await asyncio.sleep(0.005)
    await asyncio.wait_for(_idle(), timeout)
    return await d.dispatcher.scan()


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll a condition on real state (queue rows, a sink) until it holds, with a deadline."""
    async def _wait() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(_wait(), timeout)


@contextlib.asynccontextmanager
async def held_by_another_process(code: str, path: Path) -> AsyncIterator[None]:
    """Run `code` (Python, with the file as sys.argv[1]) in another process, which takes a
    lock on `path` and holds it while the block runs. Locks must come from another
    process: POSIX locks of our own never conflict with each other."""
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        f"import sys\n{code}\nprint('locked', flush=True)\nsys.stdin.read()", str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert locker.stdout is not None and locker.stdin is not None
    assert await locker.stdout.readline() == b"locked\n"
    try:
        yield
    finally:
        locker.stdin.close()
        await locker.wait()


async def refused_port() -> int:
    """A loopback port where connections are refused (a destination that is down); a Sink
    can be started on it later to bring the destination back."""
    down = Sink()
    await down.start()
    port = down.port
    await down.stop()
    return port


def free_port(hosts: tuple[str, ...]) -> int:
    """A port number free on every one of `hosts` (each sink binds its own loopback IP)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


@dataclass
class Providers:
    """Graduates' mail providers on loopback, found by MX through a real DNS server: each
    domain's sink listens on its own address, all on `port` (the daemon's mx_port)."""

    dns: DnsServer
    port: int
    sinks: dict[str, Sink]

    def __getitem__(self, domain: str) -> Sink:
        return self.sinks[domain]


# domain -> the loopback address of its MX (the school's admin and the senders share one).
PROVIDERS = {"perso.example": "127.0.0.2", "work.example": "127.0.0.3",
             "jobteaser.example": "127.0.0.4", "school-it.example": "127.0.0.4"}


@pytest.fixture
async def providers(dns_server: DnsServer) -> AsyncIterator[Providers]:
    hosts = tuple(sorted(set(PROVIDERS.values())))
    port = free_port(hosts)
    by_host = {host: Sink(host) for host in hosts}
    for sink in by_host.values():
        await sink.start(port)
    for domain, host in PROVIDERS.items():
        dns_server.set_records(domain, "MX", [(10, f"mx.{domain}.")])
        dns_server.set_records(f"mx.{domain}", "A", [host])
    yield Providers(dns_server, port, {d: by_host[h] for d, h in PROVIDERS.items()})
    for sink in by_host.values():
        await sink.stop()
