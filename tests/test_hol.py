"""Head-of-line blocking: two tarpit destinations cannot hold the mail of the others.

Three MX destinations on loopback: `tarpit1.test` (127.0.0.2) accepts TCP and never says a
word, `tarpit2.test` (127.0.0.3) takes the whole message and never answers the final dot,
`good.test` (127.0.0.4) is an ordinary server; the school's mailbox host is a fourth sink.
With 8 slots for MX destinations and a quarter of them each at most, the tarpits hold 2
slots each while the good destination's and the mailbox host's mail flows; the messages
waiting for a tarpit slot hold no body in memory; once their sessions time out, the
tarpits are suspended (their mail deferred at once, without connecting), and a tarpit that
comes back is delivered to again after the suspension.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator

import pytest

from forwarder.clock import FakeClock
from forwarder.config import DeliverySettings, HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from forwarder.policy import Route
from tests.conftest import DOMAIN, DaemonFactory, Sink, free_port, simple_message, smtp_send, until
from tests.dnsserver import DnsServer

SENDER = "noreply@jobteaser.test"
TIMEOUT = 3.0  # the tarpits' sessions time out after this (connect and final dot)


class Silent(asyncio.Protocol):
    """A server that accepts the connection and never greets."""

    def __init__(self, tarpit: Tarpit) -> None:
        self.tarpit = tarpit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tarpit.opened += 1
        self.tarpit.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tarpit.open_now -= 1


@dataclasses.dataclass
class Tarpit:
    host: str
    opened: int = 0
    open_now: int = 0
    transports: set[asyncio.BaseTransport] = dataclasses.field(default_factory=set)
    server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        def protocol() -> Silent:
            self.open_now += 1
            return Silent(self)

        self.server = await asyncio.get_running_loop().create_server(protocol, self.host, port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for transport in self.transports:
                transport.close()
            await self.server.wait_closed()
            self.server = None


@dataclasses.dataclass
class Net:
    dns: DnsServer
    port: int
    silent: Tarpit  # tarpit1.test
    stall: Sink  # tarpit2.test: hangs after the final dot
    good: Sink  # good.test
    mailbox: Sink  # the school's mailbox host


@pytest.fixture
async def net(dns_server: DnsServer) -> AsyncIterator[Net]:
    port = free_port(("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    silent, stall, good, mailbox = Tarpit("127.0.0.2"), Sink("127.0.0.3"), Sink("127.0.0.4"), Sink()
    stall.handler.hang = True
    await silent.start(port)
    for sink in (stall, good):
        await sink.start(port)
    await mailbox.start()
    for n, host in ((1, "127.0.0.2"), (2, "127.0.0.3")):
        dns_server.set_records(f"tarpit{n}.test", "MX", [(10, f"mx.tarpit{n}.test.")])
        dns_server.set_records(f"mx.tarpit{n}.test", "A", [host])
    dns_server.set_records("good.test", "MX", [(10, "mx.good.test.")])
    dns_server.set_records("mx.good.test", "A", ["127.0.0.4"])
    world = Net(dns_server, port, silent, stall, good, mailbox)
    yield world
    await world.silent.stop()
    for sink in (world.stall, world.good, world.mailbox):
        await sink.stop()


def address(kind: str, n: int) -> str:
    return f"{kind}{n}@{DOMAIN}"


def deferred(d: Daemon, domain: str) -> list[tuple[int, str]]:
    with sqlite3.connect(d.settings.queue_path) as conn:
        return conn.execute("SELECT attempts, last_error FROM recipients WHERE rcpt LIKE ?"
                            " AND attempts > 0", (f"%@{domain}",)).fetchall()


async def send_each(d: Daemon, rcpts: list[str]) -> None:
    for rcpt in rcpts:
        _, data = await smtp_send(d.port, SENDER, [rcpt], simple_message())
        assert data is not None and data[0] == 250


@pytest.mark.timeout(60)
async def test_tarpits_hold_bounded_slots_and_are_throttled(
    start_daemon: DaemonFactory, net: Net, directory: Directory, clock: FakeClock,
) -> None:
    for n in range(6):
        for kind in ("silent", "stall", "good"):
            target = {"silent": "tarpit1.test", "stall": "tarpit2.test",
                      "good": "good.test"}[kind]
            directory.add(address(kind, n), [f"g{n}@{target}"])
            directory.delete(address(kind, n))
        directory.add(address("student", n))  # enrolled: the mailbox host
    settings = DeliverySettings(
        mx_port=net.port, concurrency=8, destination_share=0.25, per_destination=10,
        connect_timeout=TIMEOUT, command_timeout=TIMEOUT, data_timeout=TIMEOUT,
        dead_destination_time=600.0)
    d = await start_daemon(dns_servers=(HostPort("127.0.0.1", net.dns.port),),
                           mailbox_host=HostPort("127.0.0.1", net.mailbox.port),
                           delivery=settings)
    # Twelve messages for the tarpits: each takes its 2 slots (a quarter of 8), the rest
    # wait for them, without their bodies.
    await send_each(d, [address(k, n) for k in ("silent", "stall") for n in range(6)])
    await until(lambda: net.silent.open_now == 2 and len(net.stall.sessions) == 2)
    await until(lambda: d.dispatcher.outbound.waiting == 8)
    assert d.dispatcher.bodies_held <= 4  # only the messages on the wire
    # Meanwhile the good destination's and the mailbox host's mail flows.
    await send_each(d, [address(k, n) for k in ("good", "student") for n in range(6)])
    await net.good.wait_for(6)
    await net.mailbox.wait_for(6)
    assert net.silent.open_now == 2 and net.silent.opened == 2  # still held, never more
    assert not deferred(d, "tarpit1.test") and not deferred(d, "tarpit2.test")

    # The tarpits' sessions time out: each destination is suspended, and the mail that
    # waited for it is deferred at once, without a connection more.
    await until(lambda: len(deferred(d, "tarpit1.test")) == 6
                and len(deferred(d, "tarpit2.test")) == 6, timeout=4 * TIMEOUT)
    suspended = [e for _, e in deferred(d, "tarpit1.test") if "temporarily suspended" in e]
    assert len(suspended) == 4
    assert d.metrics.registry.get_sample_value("forwarder_destinations_suspended") == 2
    assert net.silent.opened == 2 and len(net.stall.sessions) == 2
    assert d.dispatcher.bodies_held == 0

    # A retry during the suspension does not connect.
    clock.advance(300)
    await until(lambda: d.dispatcher.in_flight == set())
    assert await d.dispatcher.scan() == 12
    await until(lambda: {a for a, _ in deferred(d, "tarpit1.test")} == {2})
    assert net.silent.opened == 2

    # tarpit1 comes back as a working server; after the suspension its mail goes out.
    await net.silent.stop()
    back = Sink("127.0.0.2")
    await back.start(net.port)
    try:
        clock.advance(700)
        await until(lambda: d.dispatcher.in_flight == set())
        await d.dispatcher.scan()
        await back.wait_for(6)
        assert d.metrics.registry.get_sample_value("forwarder_destinations_suspended") == 0
        site = d.router.site("g0@tarpit1.test", Route.REDIRECT)
        assert d.dispatcher.outbound.slots.window(site) == 2  # one probe, then widened
    finally:
        await back.stop()
