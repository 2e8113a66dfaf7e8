"""Hostile input over real sockets: SMTP smuggling, injection, open-relay probes,
STARTTLS command injection (CVE-2024-34083), and the exact bytes we send downstream.

Every test talks to the real daemon on loopback, byte by byte where it matters; nothing is
mocked. `RawClient` and `RawSink` are shared with the other session test files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import re
import socket
import sqlite3
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forwarder import replies
from forwarder.config import HostPort, Limits
from forwarder.directory import Directory
from forwarder.smtpbody import content_fault
from forwarder.smtpsyntax import split_path, with_enhanced_code
from tests.conftest import DOMAIN, DaemonFactory, Sink, simple_message, until

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@perso.example"
REPLY_LINE = re.compile(rb"(\d{3})([ -])([\x20-\x7e]*)\r\n")


# --- helpers shared by the session test files -----------------------------------------


class RawClient:
    """An SMTP client that sends exactly the bytes it is given and checks every reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> RawClient:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        return cls(reader, writer)

    async def reply(self, timeout: float = 5.0) -> tuple[int, str]:
        """One complete reply (all its lines); fails on anything not RFC 5321 4.2-shaped."""
        texts: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            match = REPLY_LINE.fullmatch(line)
            assert match is not None, f"malformed reply line {line!r}"
            code, sep, text = int(match[1]), match[2], match[3].decode("ascii")
            texts.append(text)
            if sep == b" ":
                return code, texts[-1] if len(texts) == 1 else "\n".join(texts)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: bytes | str) -> tuple[int, str]:
        data = line.encode("ascii") if isinstance(line, str) else line
        await self.send(data if data.endswith(b"\r\n") else data + b"\r\n")
        return await self.reply()

    async def greet(self, ehlo: str = "client.test") -> None:
        assert (await self.reply())[0] == 220
        assert (await self.cmd(f"EHLO {ehlo}"))[0] == 250

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (EOF), within `timeout`."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionResetError, BrokenPipeError):
            # The server closed while we were still sending (a drip-feeding test client):
            # TCP answers our late bytes with a reset. The server did close.
            return True
        except (ConnectionError, TimeoutError):
            return False
        finally:
            await self.close()
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def stuffed(body: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, as a client must apply it, plus the final dot."""
    lines = body.splitlines(keepends=True)
    return b"".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


def queue_messages(state_dir: Path) -> int:
    conn = sqlite3.connect(state_dir / "queue.sqlite3")
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def forwarding(directory: Directory, *pairs: tuple[str, str]) -> None:
    """Graduates whose school account is deleted, with a declared redirect."""
    for address, target in pairs or ((GRAD, TARGET),):
        directory.add(address, [target])
        directory.delete(address)


@dataclass
class RawSink:
    """A destination MTA on a raw socket: records the exact bytes of each DATA section."""

    data: list[bytes] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.sink ESMTP\r\n")
        try:
            while line := await reader.readuntil(b"\r\n"):
                verb = line[:4].upper()
                if verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                if verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    self.data.append(await reader.readuntil(b"\r\n.\r\n"))
                    self.arrived.set()
                writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A throwaway certificate and key (EC P-256) in PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# --- SMTP smuggling ----------------------------------------------------------------------

# The end-of-data look-alikes from the 2023 SMTP smuggling research (SEC Consult).
PROBES = [b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
          b"\r\n.\r"]
WITH_NUL = [p.replace(b".", b"\x00.") for p in PROBES] + [b"\r\n\x00.\r\n"]
SMUGGLED = (f"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<{GRAD}>\r\nDATA\r\n"
            "Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n").encode()


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("probe", PROBES + WITH_NUL, ids=repr)
async def test_smuggling_probe_is_one_refused_message(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, probe: bytes,
    pipelined: bool,
) -> None:
    forwarding(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    await client.greet()
    envelope = f"MAIL FROM:<a@sender.example>\r\nRCPT TO:<{GRAD}>\r\nDATA\r\n".encode()
    payload = b"Subject: first\r\n\r\nfirst body" + probe + SMUGGLED
    if pipelined:
        await client.send(envelope + payload + b"NOOP\r\n")
        assert [(await client.reply())[0] for _ in range(3)] == [250, 250, 354]
    else:
        for line in envelope.split(b"\r\n")[:3]:
            await client.send(line + b"\r\n")
            assert (await client.reply())[0] in (250, 354)
        await client.send(payload + b"NOOP\r\n")
    # One reply for the whole thing, up to the real CRLF.CRLF: refused, nothing smuggled.
    code, text = await client.reply()
    assert (code, text[:5]) == (550, "5.6.0")
    assert await client.reply() == (250, "2.0.0 OK")  # the NOOP: the session is in step
    # ... and it goes on: a clean message in the same session is the only one delivered.
    await client.send(envelope)
    assert [(await client.reply())[0] for _ in range(3)] == [250, 250, 354]
    await client.send(stuffed(simple_message()))
    assert (await client.reply())[0] == 250
    await client.close()
    (got,) = await sink.wait_for(1)
    assert b"smuggled" not in got.content and got.content.endswith(simple_message())
    # Only what is queued is delivered: once the queue is empty, the sink has it all.
    await until(lambda: queue_messages(d.settings.state_dir) == 0)
    assert len(sink.messages) == 1


async def test_outbound_bytes_have_one_end_of_data(
    start_daemon: DaemonFactory, directory: Directory,
) -> None:
    """What we send is dot-stuffed CRLF text whose only CRLF.CRLF is the real end."""
    forwarding(directory)
    raw = RawSink()
    await raw.start()
    try:
        d = await start_daemon(smarthost=HostPort("127.0.0.1", raw.port))
        client = await RawClient.open(d.port)
        await client.greet()
        body = (b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n. \r\nend.\r\n.\r\n\r\n")
        for line in (b"MAIL FROM:<a@sender.example>", f"RCPT TO:<{GRAD}>".encode(), b"DATA"):
            assert (await client.cmd(line))[0] in (250, 354)
        await client.send(stuffed(body))
        assert (await client.reply())[0] == 250
        await client.close()
        await asyncio.wait_for(raw.arrived.wait(), 10)
    finally:
        await raw.stop()
    (wire,) = raw.data
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    assert b"\x00" not in wire
    unstuffed = b"".join(ln[1:] if ln.startswith(b".") else ln
                         for ln in wire[:-3].splitlines(keepends=True))
    assert unstuffed.startswith(b"Received: ") and unstuffed.endswith(body)


# --- injection ---------------------------------------------------------------------------

CONTROLS = [b"\r", b"\n", b"\x00", b"\t", b"\x1b", b"\x7f", b"\x0b"]


@pytest.mark.parametrize("char", CONTROLS, ids=repr)
async def test_control_characters_in_arguments_get_501(
    start_daemon: DaemonFactory, directory: Directory, char: bytes,
) -> None:
    forwarding(directory)
    d = await start_daemon()
    client = await RawClient.open(d.port)
    assert (await client.reply())[0] == 220
    for verb in (b"EHLO a", b"HELO a"):
        code, text = await client.cmd(verb + char + b"X-Injected: yes")
        assert (code, text[:5]) == (501, "5.5.4")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    code, text = await client.cmd(b"MAIL FROM:<a" + char + b"b@sender.example>")
    assert (code, text[:5]) == (501, "5.5.4")
    assert (await client.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    code, text = await client.cmd(b"RCPT TO:<" + GRAD.encode() + b">" + char + b"DATA")
    assert (code, text[:5]) == (501, "5.5.4")
    await client.close()


@pytest.mark.parametrize("helo", [
    "evil.example (forged) by mx.bank.example", "[127.0.0.1]", "a;b=c", "x" * 400,
    "évil".encode().decode("latin-1"),
])
async def test_helo_name_cannot_add_a_header_line(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, helo: str,
) -> None:
    forwarding(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    assert (await client.reply())[0] == 220
    code, _ = await client.cmd(b"EHLO " + helo.encode("latin-1"))
    if code != 250:  # 8-bit: refused at EHLO (501); fall back to a plain name
        assert code == 501
        await client.cmd("EHLO plain.example")
    for line in ("MAIL FROM:<a@sender.example>", f"RCPT TO:<{GRAD.upper()}>", "DATA"):
        await client.cmd(line)
    await client.send(stuffed(simple_message()))
    assert (await client.reply())[0] == 250
    await client.close()
    (got,) = await sink.wait_for(1)
    trace = got.content[: len(got.content) - len(simple_message())]
    lines = trace.split(b"\r\n")[:-1]
    assert lines[0].startswith(b"Received: from ")
    assert all(ln.startswith(b"\t") for ln in lines[1:]), lines  # continuation lines only
    assert all(0x20 <= c < 0x7F or c == 0x09 for c in trace.replace(b"\r\n", b""))


# --- open relay --------------------------------------------------------------------------

RELAY_PROBES = [
    "x@other.example", f"x%other.example@{DOMAIN}", f'"x@other.example"@{DOMAIN}',
    f"@{DOMAIN}:x@other.example", f"x@other.example@{DOMAIN}", f"other.example!x@{DOMAIN}",
    "x@[127.0.0.1]", f"us(comment)er@{DOMAIN}", f"jean.dupont(x@other.example)@{DOMAIN}",
    f"x@sub.{DOMAIN}", f"x@{DOMAIN}.other.example", f"x@{DOMAIN}..", f"x@.{DOMAIN}",
    "postmaster@other.example", f"SRS0=abcd=TT=other.example=x@{DOMAIN}",
    f"<x@other.example>@{DOMAIN}", f"x@other.example,x@{DOMAIN}", "x@other.example.",
    f"x\\@other.example@{DOMAIN}", "x@localhost", "x@127.0.0.1", "x",
]


async def test_open_relay_probes_are_refused(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    forwarding(directory)
    # Every probe is refused (two errors each): the tarpit would close the session long
    # before the end (tests/test_tarpit.py), so it is out of the way here.
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                           mailbox_host=HostPort("127.0.0.1", sink.port),
                           limits=Limits(max_errors=1000, error_sleep=0.0))
    client = await RawClient.open(d.port)
    await client.greet()
    answers = {}
    for probe in RELAY_PROBES:
        for sender in ("<>", f"<{GRAD}>"):
            await client.cmd(f"MAIL FROM:{sender}")
            answers[probe, sender] = await client.cmd(f"RCPT TO:<{probe}>")
            # DATA must not go anywhere either.
            code, _ = await client.cmd("DATA")
            if code == 354:
                await client.send(stuffed(simple_message()))
                await client.reply()
            await client.cmd("RSET")
    await client.close()
    accepted = {k: v for k, v in answers.items() if v[0] < 400}
    assert accepted == {}
    relay = answers["x@other.example", "<>"]
    assert relay == (554, "5.7.1 <x@other.example>: relay access denied")
    assert answers[f"@{DOMAIN}:x@other.example", "<>"][0] == 554  # route ignored (4.1.1.3)
    # Nothing was accepted, so nothing was queued, and delivery only sends what is queued.
    assert d.metrics.registry.get_sample_value("forwarder_messages_accepted_total") == 0
    assert queue_messages(d.settings.state_dir) == 0 and not d.dispatcher.in_flight
    assert sink.messages == [] and sink.connections == 0


@pytest.mark.parametrize("variant", [GRAD.upper(), f"{GRAD}.", "Jean.Dupont@Sigma-Clermont.Fr."])
async def test_our_domain_case_and_trailing_dot_are_ours(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, variant: str,
) -> None:
    """Deliberate: case and one trailing dot name our domain (RFC 5321 2.4, 2.3.5); the
    copy goes to the declared redirect, never to what the client wrote."""
    forwarding(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    await client.greet()
    assert (await client.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{variant}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(stuffed(simple_message()))
    assert (await client.reply())[0] == 250
    await client.close()
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == [TARGET]


# --- STARTTLS ----------------------------------------------------------------------------


def _tls_session(port: int, injected: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Blocking client (run in a thread): STARTTLS with `injected` in the same packet, then
    EHLO and RCPT over TLS. Returns the plaintext after the 220, the replies over TLS and
    the server certificate."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    file = sock.makefile("rb")
    file.readline()
    sock.sendall(b"EHLO client.test\r\n")
    while file.readline()[3:4] == b"-":
        pass
    sock.sendall(b"STARTTLS\r\n" + injected)
    ready = file.readline()
    sock.settimeout(0.3)
    try:
        leftover = sock.recv(4096)  # anything here would be a plaintext reply to `injected`
    except TimeoutError:
        leftover = b""
    sock.settimeout(5)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_socket(sock, server_hostname="forwarder.test")
    tls_file = tls.makefile("rb")
    tls.sendall(b"EHLO client.test\r\n")
    answers = [tls_file.readline()]
    while answers[-1][3:4] == b"-":
        answers.append(tls_file.readline())
    tls.sendall(f"RCPT TO:<{GRAD}>\r\n".encode())
    answers.append(tls_file.readline())
    cert = tls.getpeercert(binary_form=True) or b""
    tls.close()
    return ready + leftover, answers, cert


async def test_starttls_discards_commands_sent_with_it(
    start_daemon: DaemonFactory, directory: Directory, tmp_path: Path,
) -> None:
    """CVE-2024-34083: plaintext pipelined after STARTTLS is never executed under TLS."""
    forwarding(directory)
    cert, key = self_signed(tmp_path, "first")
    d = await start_daemon(tls_cert=cert, tls_key=key)
    injected = b"MAIL FROM:<ceo@bank.example>\r\n"
    plain, answers, first = await asyncio.to_thread(_tls_session, d.port, injected)
    assert plain.startswith(b"220 2.0.0 ") and plain.count(b"\r\n") == 1
    assert answers[0].startswith(b"250-") and b"STARTTLS" not in b"".join(answers)
    assert answers[-1].startswith(b"503 5.5.1")  # need MAIL: the injected one was dropped
    # Reload (the lead wires SIGHUP to it): new sessions present the new certificate.
    cert2, key2 = self_signed(tmp_path, "second")
    d.connections.reload_tls(dataclasses.replace(d.settings, tls_cert=cert2, tls_key=key2))
    _, _, second = await asyncio.to_thread(_tls_session, d.port, b"")
    assert first and second and first != second


async def test_no_starttls_without_certificate(start_daemon: DaemonFactory) -> None:
    d = await start_daemon()
    client = await RawClient.open(d.port)
    assert (await client.reply())[0] == 220
    code, text = await client.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in text and "AUTH" not in text
    assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= set(text.split("\n"))
    assert (await client.cmd("STARTTLS"))[0] == 454
    assert (await client.cmd("AUTH PLAIN AGZvbwBiYXI="))[:2] == (500, "5.5.1 command unrecognized")
    await client.close()


# --- the pure parts, table-driven (no I/O) -------------------------------------------------


@pytest.mark.parametrize(("status", "expected"), [
    ("250 OK", "250 2.0.0 OK"),
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("501 Syntax: HELO hostname", "501 5.5.4 Syntax: HELO hostname"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
    ("550 5.1.1 <a@b>: user unknown", "550 5.1.1 <a@b>: user unknown"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
])
def test_with_enhanced_code(status: str, expected: str) -> None:
    assert with_enhanced_code(status) == expected


@pytest.mark.parametrize(("arg", "expected"), [
    ("<a@b.example>", ("a@b.example", "")),
    ("<a@b.example> SIZE=10", ("a@b.example", " SIZE=10")),
    ("<>", ("<>", "")),
    ("<@relay.example,@other.example:a@b.example>", ("a@b.example", "")),
    ("a@b.example SIZE=1", ("a@b.example", "SIZE=1")),
    ("<a@b.example", (None, None)),
    ("<a b@c.example>", (None, None)),
    ("<@relay.example>", (None, None)),
    ("", ("", "")),
])
def test_split_path(arg: str, expected: tuple[str | None, str | None]) -> None:
    assert split_path(arg) == expected


@pytest.mark.parametrize(("content", "fault"), [
    (b"a\r\nb\r\n", None),
    (b"", None),
    (b"a\nb\r\n", replies.BARE_LINE_END),
    (b"a\rb\r\n", replies.BARE_LINE_END),
    (b"a\r\r\n", replies.BARE_LINE_END),
    (b"a\r\n\n", replies.BARE_LINE_END),
    (b"a\x00\r\n", replies.NUL_IN_MESSAGE),
])
def test_content_fault(content: bytes, fault: replies.Reply | None) -> None:
    assert content_fault(content) == fault
