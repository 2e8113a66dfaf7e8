"""Limits over real sockets (PRODUCT.md "Limits"): message size, recipients, line lengths,
address lengths, connection caps, deadlines against idle and drip-feeding clients, and
pipelining."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from pathlib import Path

import pytest

from forwarder.clock import FakeClock
from forwarder.config import HostPort, Limits
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from forwarder.smtpserver import SmtpProtocol
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Sink,
    make_settings,
    simple_message,
    smtp_send,
    until,
)
from tests.test_hostile import GRAD, RawClient, forwarding, queue_messages, stuffed

SMALL = 64 * 1024
ENVELOPE = f"MAIL FROM:<a@sender.example>\r\nRCPT TO:<{GRAD}>\r\nDATA\r\n".encode()


async def _start_data(client: RawClient) -> None:
    await client.send(ENVELOPE)
    assert [(await client.reply())[0] for _ in range(3)] == [250, 250, 354]


def test_defaults_are_the_product_limits() -> None:
    limits = Limits()
    assert (limits.max_message_size, limits.max_recipients) == (25 * 1024 * 1024, 100)
    assert (limits.max_connections, limits.max_connections_per_client) == (500, 20)
    assert (limits.max_command_line, limits.max_line_length) == (512, 1000)
    assert limits.command_timeout >= 300  # RFC 5321 4.5.3.2.7


# --- message size --------------------------------------------------------------------


async def test_size_parameter_over_the_limit_is_refused_at_mail(
    start_daemon: DaemonFactory, directory: Directory,
) -> None:
    forwarding(directory)
    d = await start_daemon(limits=Limits(max_message_size=SMALL))
    client = await RawClient.open(d.port)
    await client.greet()
    code, text = await client.cmd(f"MAIL FROM:<a@sender.example> SIZE={SMALL + 1}")
    assert (code, text) == (552, "5.3.4 message size exceeds fixed maximum message size")
    assert (await client.cmd(f"MAIL FROM:<a@sender.example> SIZE={SMALL}"))[0] == 250
    await client.close()


async def test_body_over_the_limit_gets_552_after_the_dot_and_nothing_queued(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    forwarding(directory)
    d = await start_daemon(limits=Limits(max_message_size=SMALL),
                           smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    await client.greet()
    await _start_data(client)
    await client.send(b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n")
    await client.send((b"y" * 998 + b"\r\n") * 70 + b".\r\n")
    code, text = await client.reply()
    assert (code, text[:5]) == (552, "5.3.4")
    # The session goes on; a message at the limit is accepted.
    await _start_data(client)
    await client.send(stuffed(simple_message()))
    assert (await client.reply())[0] == 250
    await client.close()
    assert len(await sink.wait_for(1)) == 1
    # Delivery only takes what is in the queue, and the refused message never got there:
    # once the queue is empty, the sink has all it will ever get.
    await until(lambda: queue_messages(d.settings.state_dir) == 0)
    assert len(sink.messages) == 1
    assert d.metrics.registry.get_sample_value("forwarder_messages_refused_total",
                                               {"reason": "size"}) == 1


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def test_memory_stays_bounded_while_an_oversized_body_streams_in(
    start_daemon: DaemonFactory, directory: Directory,
) -> None:
    forwarding(directory)
    d = await start_daemon(limits=Limits(max_message_size=1024 * 1024))
    client = await RawClient.open(d.port)
    await client.greet()
    await _start_data(client)
    chunk = (b"z" * 998 + b"\r\n") * 1024  # 1 MiB
    base, peak = _rss(), 0
    for _ in range(48):
        await client.send(chunk)
        peak = max(peak, _rss())
    await client.send(b".\r\n")
    assert (await client.reply(timeout=30))[0] == 552
    await client.close()
    # 48 MiB went through; had it been kept, RSS would have grown by more than that.
    assert peak - base < 16 * 1024 * 1024, (base, peak)
    assert queue_messages(d.settings.state_dir) == 0


# --- recipients ----------------------------------------------------------------------


async def test_recipient_101_gets_452_and_the_first_100_are_delivered(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    people = [f"student{i}@{DOMAIN}" for i in range(101)]
    for address in people:
        directory.add(address)  # active: relayed to the mailbox host
    d = await start_daemon(mailbox_host=HostPort("127.0.0.1", sink.port))
    rcpts, data = await smtp_send(d.port, "a@sender.example", people, simple_message())
    assert all(rcpts[p][0] == 250 for p in people[:100])
    assert rcpts[people[100]] == (452, "4.5.3 too many recipients")
    assert data is not None and data[0] == 250
    await until(lambda: {r for m in sink.messages for r in m.rcpt_tos} == set(people[:100]))


# --- line lengths --------------------------------------------------------------------


async def test_command_line_is_limited_to_512_octets_with_crlf(
    start_daemon: DaemonFactory,
) -> None:
    d = await start_daemon()
    client = await RawClient.open(d.port)
    await client.greet()
    assert (await client.cmd(b"NOOP " + b"a" * (512 - 7)))[0] == 250  # exactly 512
    code, text = await client.cmd(b"NOOP " + b"a" * (512 - 6))
    assert (code, text[:5]) == (500, "5.5.2")
    # Far past the stream buffer, without a CRLF for 100 kB: skipped, and the session goes on.
    code, text = await client.cmd(b"NOOP " + b"b" * 100_000)
    assert (code, text[:5]) == (500, "5.5.2")
    assert (await client.cmd("NOOP"))[0] == 250
    await client.close()


async def test_text_line_is_limited_to_1000_octets_with_crlf(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    forwarding(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    await client.greet()
    longest = b"." + b"d" * 997 + b"\r\n"  # 1000 octets; 1001 on the wire once stuffed
    await _start_data(client)
    await client.send(stuffed(b"Subject: long\r\n\r\n" + longest))
    assert (await client.reply())[0] == 250
    for too_long in (b"e" * 999 + b"\r\n", b"f" * 5000 + b"\r\n"):
        await _start_data(client)
        await client.send(stuffed(b"Subject: long\r\n\r\n" + too_long))
        code, text = await client.reply()
        assert (code, text[:5]) == (550, "5.6.0")
    await client.close()
    (got,) = await sink.wait_for(1)
    assert got.content.endswith(longest)


@pytest.mark.parametrize(("command", "reply"), [
    ("MAIL FROM:<{}@sender.example>", (553, "5.1.7")),
    ("RCPT TO:<{}@" + DOMAIN + ">", (553, "5.1.3")),
])
async def test_local_part_over_64_octets_is_refused(
    start_daemon: DaemonFactory, directory: Directory, command: str, reply: tuple[int, str],
) -> None:
    directory.add(f"{'l' * 64}@{DOMAIN}")
    d = await start_daemon()
    client = await RawClient.open(d.port)
    await client.greet()
    if command.startswith("RCPT"):
        await client.cmd("MAIL FROM:<a@sender.example>")
    code, text = await client.cmd(command.format("l" * 65))
    assert (code, text[:5]) == reply
    ok = await client.cmd(command.format("l" * 64))
    assert ok[0] in (250, 451)  # accepted syntax (451: the active account has no mailbox)
    await client.close()


async def test_domain_over_255_octets_is_refused(start_daemon: DaemonFactory) -> None:
    d = await start_daemon()
    client = await RawClient.open(d.port)
    await client.greet()
    domain = ".".join(["a" * 63] * 4)  # 255 octets
    code, text = await client.cmd(f"MAIL FROM:<a@{domain}a>")
    assert (code, text[:5]) == (553, "5.1.7")
    await client.cmd("MAIL FROM:<a@sender.example>")
    code, text = await client.cmd(f"RCPT TO:<a@{domain}a>")
    assert (code, text[:5]) == (553, "5.1.3")
    await client.close()


# --- connections ---------------------------------------------------------------------


async def test_connections_per_client_are_capped(start_daemon: DaemonFactory) -> None:
    d = await start_daemon()
    clients = [await RawClient.open(d.port) for _ in range(20)]
    for c in clients:
        assert (await c.reply())[0] == 220
    extra = await RawClient.open(d.port)
    assert await extra.reply() == (421, "4.7.0 too many connections, try again later")
    assert await extra.closed()
    other = await RawClient.open(d.port, source="127.0.0.2")  # another client is served
    assert (await other.reply())[0] == 220
    await clients[0].cmd("QUIT")
    await clients[0].close()
    await until(lambda: d.connections.count("127.0.0.1") < 20)
    again = await RawClient.open(d.port)
    assert (await again.reply())[0] == 220
    for c in [*clients[1:], other, again]:
        await c.close()


async def test_clients_that_close_before_the_greeting_free_their_slots(
    start_daemon: DaemonFactory,
) -> None:
    """Connections opened and closed while the event loop is busy elsewhere reach the
    server already at EOF: the session must still be counted out and its socket closed,
    or twenty such probes lock the client address out for good (and 500 lock out all)."""
    d = await start_daemon()
    for _ in range(40):  # twice the per-client cap, all before the loop runs again
        with socket.create_connection(("127.0.0.1", d.port)):
            pass
    await until(lambda: len(d.connections) == 0)
    assert d.connections.count("127.0.0.1") == 0
    client = await RawClient.open(d.port)
    assert (await client.reply())[0] == 220
    await client.close()


async def test_a_finished_session_is_freed_without_the_cycle_collector(
    start_daemon: DaemonFactory,
) -> None:
    """Under load every connection is a session object graph: left in reference cycles,
    each waits for Python's cycle collector, which cost a fifth of the throughput
    (docs/performance.md). A session that ends is freed by reference counting alone."""
    d = await start_daemon()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            client = await RawClient.open(d.port)
            await client.greet()
            assert (await client.cmd("QUIT"))[0] == 221
            assert await client.closed()
            await client.close()
        await until(lambda: len(d.connections) == 0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, SmtpProtocol)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


async def test_500_idle_connections_do_not_stop_a_new_client(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    forwarding(directory)
    d = await start_daemon(limits=Limits(max_connections=501),
                           smarthost=HostPort("127.0.0.1", sink.port))
    sources = [f"127.0.0.{2 + i // 20}" for i in range(500)]
    idle: list[RawClient] = []
    for batch in range(0, 500, 50):  # within the listen backlog (100)
        opened = await asyncio.gather(*(RawClient.open(d.port, s)
                                        for s in sources[batch:batch + 50]))
        assert {(await c.reply())[0] for c in opened} == {220}
        idle += opened
    assert len(d.connections) == 500
    _, data = await smtp_send(d.port, "a@sender.example", [GRAD], simple_message())
    assert data is not None and data[0] == 250
    refused = await RawClient.open(d.port, "127.0.0.100")  # the 502nd: over the total cap
    assert (await refused.reply())[0] == 421
    await refused.close()
    await asyncio.gather(*(c.close() for c in idle))
    await sink.wait_for(1)


async def test_idle_client_is_disconnected_with_421(start_daemon: DaemonFactory) -> None:
    d = await start_daemon(limits=Limits(command_timeout=0.5))
    client = await RawClient.open(d.port)
    started = time.monotonic()
    assert (await client.reply())[0] == 220
    assert await client.reply() == (421, "4.4.2 timeout exceeded, closing connection")
    assert await client.closed()
    # Not before the deadline (a timer never fires early, so this holds under any load).
    assert time.monotonic() - started > 0.4
    # The client can see the close before the server's connection_lost has run.
    await until(lambda: len(d.connections) == 0)


async def _drip(client: RawClient, data: bytes, pause: float) -> None:
    """Send `data` in pieces, one every `pause` seconds, until cancelled."""
    for i in range(len(data)):
        client.writer.write(data[i : i + 1])
        await asyncio.sleep(pause)


async def test_drip_fed_command_hits_the_command_deadline(start_daemon: DaemonFactory) -> None:
    """Slowloris: one byte every 0.1 s never resets the deadline for the whole line. The
    drip lasts 3 s, the deadline is 0.5 s: had each byte reset it, no reply would come
    before the drip ended."""
    d = await start_daemon(limits=Limits(command_timeout=0.5))
    client = await RawClient.open(d.port)
    await client.greet()
    dripper = asyncio.create_task(_drip(client, b"MAIL FROM:<slow@sender.example>", 0.1))
    try:
        assert await client.reply() == (421, "4.4.2 timeout exceeded, closing connection")
        assert not dripper.done(), "the deadline came only once the client stopped sending"
    finally:
        dripper.cancel()
    assert await client.closed()
    await until(lambda: len(d.connections) == 0)


async def test_drip_fed_data_hits_the_data_deadline(
    start_daemon: DaemonFactory, directory: Directory,
) -> None:
    forwarding(directory)
    d = await start_daemon(limits=Limits(command_timeout=30, data_timeout=1.0))
    client = await RawClient.open(d.port)
    await client.greet()
    await _start_data(client)
    started = time.monotonic()
    # 600 octets, one every 10 ms: 6 s of drip against a 1 s deadline for the whole body
    # (and 30 s for a command: only the data deadline can end the session this early).
    dripper = asyncio.create_task(_drip(client, b"Subject: slow\r\n" * 40, 0.01))
    try:
        assert (await client.reply())[:1] == (421,)
        assert not dripper.done(), "the deadline came only once the client stopped sending"
    finally:
        dripper.cancel()
    assert time.monotonic() - started > 0.9  # not before the data deadline
    assert await client.closed()
    await until(lambda: len(d.connections) == 0)
    assert queue_messages(d.settings.state_dir) == 0


async def test_shutdown_says_421_to_idle_sessions_and_lets_a_transaction_finish(
    state_dir: Path, clock: FakeClock, sink: Sink, directory: Directory,
) -> None:
    forwarding(directory)
    d = Daemon(make_settings(state_dir, smarthost=HostPort("127.0.0.1", sink.port),
                             stop_timeout=5), clock=clock)
    await d.start()
    idle, busy = await RawClient.open(d.port), await RawClient.open(d.port)
    await idle.greet()
    await busy.greet()
    assert (await busy.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await busy.cmd(f"RCPT TO:<{GRAD}>"))[0] == 250
    stopping = asyncio.create_task(d.stop())
    shutting_down = (421, "4.3.2 service shutting down, try again later")
    assert await idle.reply() == shutting_down
    assert await idle.closed()
    assert (await busy.cmd("DATA"))[0] == 354
    await busy.send(stuffed(simple_message()))
    assert (await busy.reply())[0] == 250  # the transaction in flight is honoured
    assert await busy.cmd("NOOP") == shutting_down
    assert await busy.closed()
    await asyncio.wait_for(stopping, 10)
    assert queue_messages(state_dir) + len(sink.messages) == 1


# --- pipelining ----------------------------------------------------------------------


async def test_pipelined_transactions_are_answered_in_order(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    """RFC 2920: PIPELINING is advertised; a whole session in one packet works."""
    forwarding(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    assert (await client.reply())[0] == 220
    batch = b"EHLO client.test\r\n" + (ENVELOPE + stuffed(simple_message())) * 2
    await client.send(batch + b"RCPT TO:<x@other.example>\r\nQUIT\r\n")
    codes = [(await client.reply())[0] for _ in range(10)]
    assert codes == [250, 250, 250, 354, 250, 250, 250, 354, 250, 503]
    assert (await client.reply())[0] == 221
    assert await client.closed()
    assert len(await sink.wait_for(2)) == 2


async def test_a_client_that_floods_commands_without_reading_is_held_back(
    start_daemon: DaemonFactory,
) -> None:
    """Pipelined commands from a client that never reads the replies: once our replies back
    up, the session stops answering and then stops reading; TCP holds the client back, and
    the input we hold stays bounded (forwarder/readgate.py `flow`). (EHLO: NOOPs would
    meet the junk-command limit first, test_junk_commands_are_limited.)"""
    d = await start_daemon()
    _reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    chunk = b"EHLO c\r\n" * 7_500  # 60 kB, as many octets as 10,000 NOOPs
    blocked = False
    for _ in range(2000):  # up to 120 MB, far more than the socket buffers hold
        writer.write(chunk)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            blocked = True
            break
    assert blocked, "the daemon kept reading a client that does not read"
    (session,) = list(d.connections._sessions)
    assert isinstance(session, SmtpProtocol)
    assert session.session is not None and session.session.buffered <= 2 * 65536
    writer.transport.abort()  # a reset: the daemon need not wait to flush its replies


async def test_client_at_the_cap_can_reconnect_right_after_quit(
    start_daemon: DaemonFactory,
) -> None:
    """smtp-source's pattern: 20 sessions, a new connection per message. A session that
    said QUIT frees its slot at once, so the reconnect does not race the close."""
    d = await start_daemon(limits=Limits(max_connections_per_client=20))
    clients = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(20)]
    for reader, _ in clients:
        assert (await reader.readline()).startswith(b"220")
    for _ in range(30):
        reader, writer = clients.pop(0)
        writer.write(b"QUIT\r\n")
        assert (await reader.readline()).startswith(b"221")
        assert d.connections.count("127.0.0.1") == 19  # freed at QUIT, before the close
        writer.close()  # and reconnect at once
        new_reader, new_writer = await asyncio.open_connection("127.0.0.1", d.port)
        assert (await new_reader.readline()).startswith(b"220 ")
        clients.append((new_reader, new_writer))
    for _, writer in clients:
        writer.close()
