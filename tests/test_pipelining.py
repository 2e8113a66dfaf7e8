"""RFC 2920 pipelining on the way out (forwarder/smtppipe.py): to a next hop that offers
PIPELINING, MAIL FROM, every RCPT TO and DATA go in one write and the replies are checked
in order, so a message costs two round trips; to one that does not, one command a round
trip as before.

The next hop is `Hop`, a scripted SMTP server on a real loopback socket: it can hold its
replies until the whole group has arrived (a client that waited for a reply before the
next command would hang), send them in one write or a byte at a time, and it records the
command lines of each read and how many times it answered (the round trips).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from forwarder.dns import Destination
from forwarder.policy import Outcome
from forwarder.smtpclient import Attempt, ConnectionPool, Outgoing, OutRcpt, Sender
from tests.conftest import make_settings

BODY = b"Subject: x\r\n\r\nline one\r\n.leading dot\r\n"
SENDER = "noreply@jobteaser.test"
Answer = Callable[[bytes], bytes | None]  # a command line -> its reply, None: the default


@dataclasses.dataclass
class Hop:
    """A scripted next hop (module docstring)."""

    pipelining: bool = True
    answer: Answer = lambda line: None
    hold: bool = False  # hold the replies until DATA (a pipelined group's last command)
    dribble: bool = False  # write the replies a byte at a time
    close_after: bytes | None = None  # close the session after answering this command
    reads: list[list[bytes]] = dataclasses.field(default_factory=list)
    turns: int = 0  # times the hop answered after reading: the round trips
    bodies: list[bytes] = dataclasses.field(default_factory=list)
    connections: int = 0
    port: int = 0
    writers: list[asyncio.StreamWriter] = dataclasses.field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(b"220 hop.test ESMTP\r\n")
        buffer, held = b"", []
        while chunk := await reader.read(65536):
            buffer += chunk
            lines = buffer.split(b"\r\n")
            buffer = lines.pop()
            self.reads.append(lines)
            for line in lines:
                reply = self._reply(line)
                held.append(reply)
                if self.hold and line[:4] in (b"MAIL", b"RCPT"):
                    continue
                await self._send(writer, b"".join(held))
                held = []
                if self.close_after is not None and line.startswith(self.close_after):
                    self.close_after = None  # once
                    writer.close()
                    return
                if line == b"DATA" and reply.startswith(b"354"):
                    buffer = await self._body(reader, writer, buffer)
        writer.close()

    def _reply(self, line: bytes) -> bytes:
        reply = self.answer(line)
        if reply is not None:
            return reply
        if line.startswith(b"EHLO"):
            offers = b"250-PIPELINING\r\n" if self.pipelining else b""
            return b"250-hop.test\r\n" + offers + b"250-SIZE 1000000\r\n250 8BITMIME\r\n"
        if line == b"QUIT":
            return b"221 2.0.0 bye\r\n"
        return b"354 go ahead\r\n" if line == b"DATA" else b"250 2.0.0 ok\r\n"

    async def _send(self, writer: asyncio.StreamWriter, replies: bytes) -> None:
        self.turns += 1
        for piece in [replies[i:i + 1] for i in range(len(replies))] if self.dribble \
                else [replies]:
            writer.write(piece)
            await writer.drain()
            if self.dribble:
                await asyncio.sleep(0.001)  # each byte its own segment (TCP_NODELAY)

    async def _body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    buffer: bytes) -> bytes:
        data = b"\r\n" + buffer
        while (end := data.find(b"\r\n.\r\n")) < 0:
            data += await reader.read(65536)
        self.bodies.append(data[2:end + 2])
        await self._send(writer, b"250 2.0.0 queued\r\n")
        return data[end + 5:]

    def commands(self) -> list[bytes]:
        return [line for lines in self.reads for line in lines]


@pytest.fixture
async def hop() -> AsyncIterator[Hop]:
    hop = Hop()
    server = await asyncio.start_server(hop.serve, "127.0.0.1", 0)
    hop.port = server.sockets[0].getsockname()[1]
    yield hop
    server.close()
    for writer in hop.writers:
        writer.close()
    await server.wait_closed()


@pytest.fixture
async def sender(tmp_path: Path) -> AsyncIterator[Sender]:
    settings = make_settings(tmp_path)
    pool = ConnectionPool(settings)
    yield Sender(settings.delivery, pool)
    await pool.close()


async def send(sender: Sender, hop: Hop, *recipients: str) -> dict[str, Attempt]:
    out = Outgoing(SENDER, tuple(OutRcpt(r) for r in recipients))
    return await sender.send(Destination("hop.test", "127.0.0.1", hop.port), out, BODY)


def refuse(*addresses: str, code: bytes = b"550 5.1.1 no such user") -> Answer:
    return lambda line: code + b"\r\n" if any(a.encode() in line for a in addresses) else None


def delivered(attempt: Attempt) -> bool:
    return attempt.outcome is Outcome.DELIVERED and attempt.status == "2.0.0"


@pytest.mark.parametrize("dribble", [False, True], ids=["coalesced", "byte-by-byte"])
async def test_one_write_two_round_trips_and_a_refused_recipient_in_the_middle(
    hop: Hop, sender: Sender, dribble: bool,
) -> None:
    hop.hold, hop.dribble, hop.answer = True, dribble, refuse("b@x.test")
    results = await send(sender, hop, "a@x.test", "b@x.test", "c@x.test")
    assert delivered(results["a@x.test"]) and delivered(results["c@x.test"])
    refused = results["b@x.test"]
    assert (refused.outcome, refused.status) == (Outcome.FAILED, "5.1.1")
    assert refused.text == "smtp; 550 5.1.1 no such user"
    assert hop.reads[1:] == [[b"MAIL FROM:<noreply@jobteaser.test> SIZE=%d" % len(BODY),
                              b"RCPT TO:<a@x.test>", b"RCPT TO:<b@x.test>",
                              b"RCPT TO:<c@x.test>", b"DATA"]]
    assert hop.bodies == [b"Subject: x\r\n\r\nline one\r\n..leading dot\r\n"]
    turns = hop.turns
    results = await send(sender, hop, "a@x.test")  # the pooled session, reused as it is
    assert delivered(results["a@x.test"]) and len(hop.bodies) == 2
    assert (hop.connections, hop.turns - turns) == (1, 2)


async def test_a_hop_without_pipelining_gets_one_command_a_round_trip(
    hop: Hop, sender: Sender,
) -> None:
    hop.pipelining, hop.answer = False, refuse("b@x.test")
    results = await send(sender, hop, "a@x.test", "b@x.test")
    assert delivered(results["a@x.test"]) and results["b@x.test"].status == "5.1.1"
    assert all(len(lines) <= 1 for lines in hop.reads)  # each command waited for a reply
    turns = hop.turns
    await send(sender, hop, "a@x.test")
    assert hop.turns - turns == 4  # MAIL, RCPT, DATA, the body


@pytest.mark.parametrize("data_reply", [b"554 5.5.1 no valid recipients", b"354 go ahead"])
async def test_all_recipients_refused_sends_no_body_and_the_session_goes_on(
    hop: Hop, sender: Sender, data_reply: bytes,
) -> None:
    """RFC 2920 3.1: DATA's reply is read. A 354 after no accepted recipient is ended at
    once with a single dot (RFC 2920 3.1, as Postfix does), never with the body."""
    refused = refuse("a@x.test", "b@x.test")
    hop.answer = lambda line: data_reply + b"\r\n" if line == b"DATA" else refused(line)
    results = await send(sender, hop, "a@x.test", "b@x.test")
    assert [r.status for r in results.values()] == ["5.1.1", "5.1.1"]
    assert hop.bodies == ([b""] if data_reply.startswith(b"354") else [])
    assert hop.commands()[-1] == b"RSET"
    hop.answer = lambda line: None
    results = await send(sender, hop, "c@x.test")
    assert delivered(results["c@x.test"]) and hop.connections == 1
    assert hop.bodies[-1] == b"Subject: x\r\n\r\nline one\r\n..leading dot\r\n"


async def test_a_refused_mail_fails_the_transaction_with_its_reply(
    hop: Hop, sender: Sender,
) -> None:
    def answer(line: bytes) -> bytes | None:
        if line.startswith(b"MAIL"):
            return b"550 5.7.1 sender rejected\r\n"
        refused = line.startswith(b"RCPT") or line == b"DATA"
        return b"503 5.5.1 need MAIL first\r\n" if refused else None
    hop.hold, hop.answer = True, answer
    results = await send(sender, hop, "a@x.test", "b@x.test")
    assert {r.text for r in results.values()} == {"smtp; 550 5.7.1 sender rejected"}
    assert hop.bodies == [] and hop.commands()[-1] == b"RSET"
    hop.hold, hop.answer = False, lambda line: None
    assert delivered((await send(sender, hop, "a@x.test"))["a@x.test"])
    assert hop.connections == 1


async def test_a_session_lost_in_the_group_defers_and_is_not_reused(
    hop: Hop, sender: Sender,
) -> None:
    """The hop closes after answering MAIL: the other replies of the group never come;
    every recipient is deferred (as when a lock-step session is lost), and the next
    message gets a new session."""
    hop.close_after = b"MAIL"
    results = await send(sender, hop, "a@x.test", "b@x.test")
    assert {(r.outcome, r.status, r.unreachable) for r in results.values()} == {
        (Outcome.DEFERRED, "4.4.2", True)}
    assert delivered((await send(sender, hop, "a@x.test"))["a@x.test"])
    assert hop.connections == 2
