"""RFC-derived SMTP sessions against the real daemon, line by line over a raw socket.

Each script is what a client sends and the exact reply the daemon must give, so a change
to the session cannot drift from RFC 5321 (and RFC 1870, 2034, 3207, 6152) silently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

import pytest

from forwarder.config import HostPort
from forwarder.connections import Connections
from forwarder.directory import Directory
from forwarder.smtpevents import Envelope, SessionInfo
from forwarder.smtpserver import SmtpProtocol
from tests.conftest import DOMAIN, DaemonFactory, Sink, make_settings, until
from tests.test_hostile import GRAD, RawClient, forwarding, stuffed

Script = list[tuple[str, tuple[int, str]]]

EHLO = ("EHLO client.test", (250, "forwarder.test\nPIPELINING\nSIZE 26214400\n8BITMIME\n"
                                  "ENHANCEDSTATUSCODES\nDSN\nSMTPUTF8"))
SCRIPTS: dict[str, Script] = {
    # RFC 5321 4.1.1.1, 4.3.2: greeting, then EHLO with its extensions.
    "ehlo": [EHLO],
    "helo": [("HELO client.test", (250, "forwarder.test"))],
    # RFC 5321 4.1.2: a Quoted-string local part may hold spaces and ">"; senders are taken
    # liberally (PRODUCT.md), whatever their local part or address literal.
    **{f"sender {s}": [EHLO, (f"MAIL FROM:<{s}>", (250, "2.1.0 Ok"))] for s in [
        '"john doe"@example.net', '"a>b"@example.net', "user%relay@example.net",
        "bang!user@example.net", '"quoted"@example.net', "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]", ""]},
    "sender with a bad literal": [EHLO, ("MAIL FROM:<user@[300.1.1.1]>",
                                         (553, "5.1.7 bad sender address syntax"))],
    "sender with a space outside quotes": [EHLO, ("MAIL FROM:<john doe@example.net>",
                                                  (553, "5.1.3 Error: malformed address"))],
    # Strict with recipients: our own addresses only, in plain syntax.
    "recipient with a percent hack": [EHLO, ("MAIL FROM:<a@sender.example>", (250, "2.1.0 Ok")),
                                      (f"RCPT TO:<x%y@{DOMAIN}>",
                                       (553, f"5.1.3 <x%y@{DOMAIN}>: bad recipient "
                                                  "address syntax"))],
    "relay denied": [EHLO, ("MAIL FROM:<a@sender.example>", (250, "2.1.0 Ok")),
                     ("RCPT TO:<x@elsewhere.example>",
                      (554, "5.7.1 <x@elsewhere.example>: relay access denied"))],
    # RFC 5321 4.1.1.11: 555 for a parameter that is not recognized or not implemented.
    **{f"mail parameter {p}": [EHLO, (f"MAIL FROM:<a@sender.example> {p}", (555, text))]
       for p, text in [
           ("X-FOO=1", "5.5.4 MAIL FROM parameters not recognized or not implemented"),
           ("AUTH=<>", "5.5.4 MAIL FROM parameters not recognized or not implemented"),
           ("BODY=BINARYMIME", "5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")]},
    "rcpt parameter": [EHLO, ("MAIL FROM:<a@sender.example>", (250, "2.1.0 Ok")),
                       (f"RCPT TO:<{GRAD}> X-FOO=1",
                        (555, "5.5.4 RCPT TO parameters not recognized or not implemented"))],
    # RFC 1870 6.1: a declared size over the limit is refused at MAIL.
    "size": [EHLO, ("MAIL FROM:<a@sender.example> SIZE=26214401",
                    (552, "5.3.4 message size exceeds fixed maximum message size"))],
    # RFC 5321 4.1.1.8: HELP answers 214.
    "help": [("HELP", (214, "2.0.0 Supported commands: DATA EHLO EXPN HELO HELP MAIL NOOP "
                            "QUIT RCPT RSET VRFY"))],
    "help data": [("HELP DATA", (214, "2.0.0 Syntax: DATA"))],
    # RFC 5321 4.1.4 and 3.3: order of commands.
    "mail first": [("MAIL FROM:<a@sender.example>", (503, "5.5.1 Error: send HELO first"))],
    "rcpt first": [EHLO, (f"RCPT TO:<{GRAD}>", (503, "5.5.1 Error: need MAIL command"))],
    "data first": [EHLO, ("DATA", (503, "5.5.1 bad sequence of commands"))],
    "rset": [EHLO, ("MAIL FROM:<a@sender.example>", (250, "2.1.0 Ok")),
             ("RSET", (250, "2.0.0 OK")), ("DATA", (503, "5.5.1 bad sequence of commands"))],
    "noop": [("NOOP", (250, "2.0.0 OK"))],
    # RFC 5321 3.5.3: VRFY neither confirms nor denies; EXPN is not offered.
    "vrfy": [(f"VRFY {GRAD}", (252, "2.0.0 Cannot VRFY user, but will accept message and "
                                    "attempt delivery"))],
    "expn": [("EXPN staff", (502, "5.5.1 command not implemented"))],
    "unknown": [("TURN", (500, "5.5.1 command unrecognized"))],
    # RFC 5321 4.5.3.1.4: 512 octets for a command line.
    "too long": [("NOOP " + "x" * 600, (500, "5.5.2 line too long: command lines are "
                                              "limited to 512 octets"))],
    "starttls unavailable": [("STARTTLS", (454, "4.7.0 TLS not available"))],
    "quit": [("QUIT", (221, "2.0.0 Bye"))],
}


@pytest.fixture
async def daemon_port(start_daemon: DaemonFactory, directory: Directory) -> int:
    forwarding(directory)
    return (await start_daemon()).port


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_session_script(daemon_port: int, name: str) -> None:
    client = await RawClient.open(daemon_port)
    assert await client.reply() == (220, "forwarder.test ESMTP forwarder")
    for line, expected in SCRIPTS[name]:
        assert await client.cmd(line) == expected, line
    await client.close()


async def test_a_quoted_sender_is_forwarded_and_its_bounces_come_back(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    """A sender with a quoted local part is forwarded with an SRS address in the key form
    (an SRS0 local part cannot hold a quoted string), and that address reverses to it."""
    forwarding(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    await client.greet()
    for line in ('MAIL FROM:<"john doe"@example.net>', f"RCPT TO:<{GRAD}>", "DATA"):
        assert (await client.cmd(line))[0] in (250, 354)
    await client.send(stuffed(b"Subject: hi\r\n\r\nhello\r\n"))
    assert (await client.reply())[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.mail_from.startswith("SRS0=") and "=1=" in got.mail_from
    bounce = ["MAIL FROM:<>", f"RCPT TO:<{got.mail_from}>"]
    assert [(await client.cmd(line))[0] for line in bounce] == [250, 250]
    await client.close()


class _BrokenHandler:
    """A handler whose every hook fails, and whose error reply is not even a string."""

    def handle_HELO(self, server: object, session: SessionInfo, envelope: Envelope[str],
                    hostname: str) -> str:
        raise RuntimeError("boom")

    def handle_EHLO(self, server: object, session: SessionInfo, envelope: Envelope[str],
                    hostname: str, responses: list[str]) -> list[str]:
        return responses

    def handle_MAIL(self, server: object, session: SessionInfo, envelope: Envelope[str],
                    address: str, mail_options: list[str]) -> str:
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def _rcpt(self, envelope: Envelope[str], address: str) -> str:
        if address.startswith("fail"):
            raise RuntimeError("boom")
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def handle_RCPT(self, server: object, session: SessionInfo, envelope: Envelope[str],
                    address: str, rcpt_options: list[str]) -> Awaitable[str]:
        return self._rcpt(envelope, address)

    async def _data(self) -> str:
        return None  # type: ignore[return-value]

    def handle_DATA(self, server: object, session: SessionInfo,
                    envelope: Envelope[str]) -> Awaitable[str]:
        return self._data()

    def exception_reply(self, error: BaseException) -> str:
        return 42  # type: ignore[return-value]


async def test_any_handler_failure_ends_in_451(tmp_path: Path) -> None:
    """DESIGN.md habit 4: whatever a handler does wrong, the client gets a 451 at once, not
    silence until the deadline."""
    loop = asyncio.get_running_loop()
    settings = make_settings(tmp_path)
    connections = Connections()
    server = await loop.create_server(
        lambda: SmtpProtocol(_BrokenHandler(), settings, connections), "127.0.0.1", 0)
    try:
        client = await RawClient.open(server.sockets[0].getsockname()[1])
        assert (await client.reply())[0] == 220
        assert await client.cmd("HELO c") == (451, "4.3.0 local error in processing, try "
                                                   "again later")
        assert (await client.cmd("EHLO c"))[0] == 250
        assert (await client.cmd("MAIL FROM:<a@b.example>"))[0] == 250
        assert (await client.cmd("RCPT TO:<fail@y.example>"))[0] == 451
        assert (await client.cmd("RCPT TO:<x@y.example>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert (await client.reply())[0] == 451
        assert await client.cmd("QUIT") == (221, "2.0.0 Bye")
        await client.close()
        await until(lambda: len(connections) == 0)
    finally:
        server.close()
        await server.wait_closed()
