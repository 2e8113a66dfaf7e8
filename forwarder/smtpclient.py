"""Outbound SMTP: one transaction to one destination address, and the destination's
verdict on each recipient.

The envelope carries what the message needs and the next hop offers (RFC 5321 4.1.1.2):
`SIZE=` (RFC 1870), `BODY=8BITMIME` for 8-bit mail (RFC 6152), `SMTPUTF8` (RFC 6531), the
DSN parameters RET, ENVID, NOTIFY and ORCPT (RFC 3461). Where the next hop lacks what the
message needs: 8-bit mail is converted to 7-bit (forwarder/mime7bit.py, in a thread), and
mail that needs SMTPUTF8 fails permanently with 5.6.7 (RFC 6531 3.4), as Postfix does.
Connections and their TLS are forwarder/smtppool.py's. Timeouts follow RFC 5321 4.5.3.2;
the wait after the final dot is long on purpose, since giving up there while the server is
still writing to disk duplicates mail. The body goes out in its wire form, a bounded piece
at a time (`WireBody`), never processed in one pass on the event loop; a spooled body on a
plain connection goes from its file by sendfile(2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from forwarder import filesend, log, mime7bit, smtpenvelope, smtppipe
from forwarder.config import DeliverySettings
from forwarder.dns import Destination
from forwarder.metrics import Metrics
from forwarder.policy import Outcome, outcome_of_reply
from forwarder.queue import PLAIN, Body, MessageFlags, SpooledBody, body_size
from forwarder.queue.spool import CHUNK as SPOOL_CHUNK
from forwarder.smtpbody import HEAD_OCTETS, stuffed_pieces, unstuff
from forwarder.smtpenvelope import (
    PLAIN_MAILBOX,
    RCPT_ACCEPTED,
    mail_options,
    pipeline_group,
    plain_path,
    rcpt_options,
)
from forwarder.smtppool import (
    ConnectionPool,
    PooledSession,
    TlsHandshakeFailed,
    TlsPolicy,
    TlsPolicyFailed,
    TlsUse,
)

LOG = log.get("forwarder.delivery")
Reply = aiosmtplib.SMTPResponse

__all__ = [
    "PLAIN_MAILBOX", "Attempt", "ConnectionPool", "OutRcpt", "Outgoing", "Sender",
    "TlsPolicy", "TlsUse", "WireBody", "body_for", "describe", "local_attempt",
    "mail_options", "pipeline_group", "plain_path", "rcpt_options", "relay_name",
    "reply_attempt", "send_body", "send_data",
]

@dataclass(frozen=True)
class Attempt:
    """The destination's verdict on one recipient."""

    outcome: Outcome
    status: str  # enhanced status code (RFC 3463), e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str  # diagnostic as in a DSN: "smtp; 550 5.1.1 ..." or "x-local; ..."
    relay: str | None
    # Not an answer from the destination: could not talk to it (try the next address).
    unreachable: bool = False
    tls_failed: bool = False
    # The session's TLS (None: in clear, or no session), for logs and per-address history.
    tls: TlsUse | None = None
    # The destination offered DSN (RFC 3461): it reports on this recipient from now on.
    dsn_passed: bool = False


@dataclass(frozen=True)
class OutRcpt:
    """A recipient as it goes out, with its DSN parameters (RFC 3461 4.1, 4.2)."""

    address: str
    notify: str | None = None
    orcpt: str | None = None  # decoded, "addr-type;address"


@dataclass(frozen=True)
class Outgoing:
    """One transaction: the envelope, what the message is, and the TLS it requires."""

    sender: str
    recipients: tuple[OutRcpt, ...]
    flags: MessageFlags = PLAIN
    tls: TlsPolicy = TlsPolicy.MAY
    # The policy that set `tls`, for diagnostics ("MTA-STS"); None: none.
    policy: str | None = None


def relay_name(dest: Destination) -> str:
    """Postfix's `relay=` form: host[address]:port."""
    return f"{dest.host}[{dest.address}]:{dest.port}"


def _enhanced(code: int, message: str) -> str:
    first = message.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(code // 100):
        return first
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def reply_attempt(code: int, message: str, relay: str, tls: TlsUse | None = None,
                  dsn_passed: bool = False) -> Attempt:
    text = " ".join(message.split())  # one line: never a raw CR/LF in a log or a DSN
    return Attempt(outcome_of_reply(code), _enhanced(code, text), f"smtp; {code} {text}", relay,
                   tls=tls, dsn_passed=dsn_passed)


def local_attempt(status: str, reason: str, relay: str | None = None, *,
                  unreachable: bool = False, tls_failed: bool = False) -> Attempt:
    outcome = Outcome.FAILED if status.startswith("5") else Outcome.DEFERRED
    return Attempt(outcome, status, f"x-local; {reason}", relay, unreachable, tls_failed)


_TEMP_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError)


class Sender:
    """Sends one message to a group of recipients at one destination address."""

    def __init__(self, settings: DeliverySettings, pool: ConnectionPool,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics

    async def send(self, dest: Destination, out: Outgoing, body: Body) -> dict[str, Attempt]:
        relay = relay_name(dest)
        wire = WireBody(body)
        try:
            await wire.open()  # before any connection: a spool file we cannot read is ours
        except OSError as exc:
            return _all([r.address for r in out.recipients], local_attempt(
                "4.3.0", f"cannot read the queued message: {exc.strerror}", relay))
        try:
            return await self._send(dest, out, wire, relay)
        finally:
            wire.close()

    async def _send(self, dest: Destination, out: Outgoing, wire: WireBody,
                    relay: str) -> dict[str, Attempt]:
        recipients = [r.address for r in out.recipients]
        try:
            session = await self._pool.acquire(dest, out.tls)
        except TlsPolicyFailed as exc:
            # RFC 8461 5.2: a policy failure defers; it never bounces.
            return _all(recipients, local_attempt(
                "4.7.5", f"TLS required by {out.policy or 'policy'} for {relay}: {exc}", relay,
                unreachable=True))
        except TlsHandshakeFailed as exc:
            return _all(recipients, local_attempt(
                "4.7.5", f"TLS handshake with {relay} failed: {exc}", relay,
                unreachable=True, tls_failed=True))
        except _TEMP_ERRORS as exc:
            return _all(recipients, local_attempt(
                "4.4.1", f"connect to {relay}: {describe(exc)}", relay, unreachable=True))
        return await self._on(session, dest, out, wire, relay)

    async def _on(self, session: PooledSession, dest: Destination, out: Outgoing,
                  wire: WireBody, relay: str) -> dict[str, Attempt]:
        reusable = needs_reset = False
        client = session.client
        recipients = [r.address for r in out.recipients]
        try:
            refusal = _cannot_carry(client, out, wire.head, relay)
            if refusal is not None:
                reusable = True
                return _all(recipients, refusal)
            results, needs_reset = await self._transaction(session, out, wire, relay)
            reusable = True
            return results
        except aiosmtplib.SMTPResponseException as exc:
            # 421: the server is closing the session (RFC 5321 3.8).
            reusable = needs_reset = exc.code != 421
            return _all(recipients, reply_attempt(exc.code, exc.message, relay, session.tls))
        except _TEMP_ERRORS as exc:
            return _all(recipients, local_attempt(
                "4.4.2", f"{relay}: {describe(exc)}", relay, unreachable=True))
        finally:
            if needs_reset:
                reusable = await _reset(client)
            self._pool.release(dest, session, reusable)

    async def _transaction(self, session: PooledSession, out: Outgoing, wire: WireBody,
                           relay: str) -> tuple[dict[str, Attempt], bool]:
        """Per-recipient attempts, and whether the session needs RSET before reuse: not
        after a completed DATA, which ends the transaction (RFC 5321 4.1.1.4), so a
        reused connection costs four round trips a message, not five (two where the
        next hop pipelines: `_pipelined`)."""
        client = session.client
        wire = await body_for(client, out.flags, wire, self._metrics)
        dsn = client.supports_extension("dsn")
        group = pipeline_group(client, out, wire.size, dsn)
        if group is not None:
            return await self._pipelined(session, out, wire, relay, group, dsn)
        utf8 = out.flags.smtputf8 and client.supports_extension("smtputf8")
        await smtpenvelope.mail(client, out.sender, mail_options(client, out, wire.size), utf8)
        results: dict[str, Attempt] = {}
        accepted: list[str] = []
        for rcpt in out.recipients:
            try:
                options = rcpt_options(rcpt) if dsn else []
                await smtpenvelope.rcpt(client, rcpt.address, options, utf8)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[rcpt.address] = reply_attempt(exc.code, exc.message, relay, session.tls)
                continue
            accepted.append(rcpt.address)
        if not accepted:
            return results, True
        # RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot. What we
        # queue has CRLF line ends only (bare CR or LF is refused on receipt) and goes out
        # dot-stuffed, so no byte sequence we relay can be read as an end of data by the
        # destination (SMTP smuggling).
        reply = await send_data(client, wire, self._settings.data_timeout)
        return _delivered(results, accepted, reply, relay, session.tls, dsn), False

    async def _pipelined(self, session: PooledSession, out: Outgoing, wire: WireBody,
                         relay: str, group: list[bytes],
                         dsn: bool) -> tuple[dict[str, Attempt], bool]:
        """RFC 2920 3.1: MAIL FROM, every RCPT TO and DATA in one write, then each reply
        checked in order; the body follows a 354 as in lock step. Outcomes are those of
        `_transaction` for the same replies."""
        client = session.client
        replies, error = await smtppipe.exchange(client, group, client.timeout)
        if replies and replies[0].code != 250:
            # The replies to the RCPTs and DATA after a refused MAIL were read (and are
            # refusals, RFC 2920 3.1); the transaction fails with MAIL's reply.
            if error is None:
                await _end_empty(client, replies[-1])
            raise aiosmtplib.SMTPSenderRefused(replies[0].code, replies[0].message, out.sender)
        if error is not None:
            raise error
        results, accepted = _rcpt_results(out, replies[1:-1], relay, session.tls)
        if not accepted:
            await _end_empty(client, replies[-1])
            return results, True
        if replies[-1].code != 354:
            raise aiosmtplib.SMTPDataError(replies[-1].code, replies[-1].message)
        reply = await send_body(client, wire, self._settings.data_timeout)
        return _delivered(results, accepted, reply, relay, session.tls, dsn), False


def _rcpt_results(out: Outgoing, replies: Sequence[Reply],
                  relay: str, tls: TlsUse | None) -> tuple[dict[str, Attempt], list[str]]:
    """The refused recipients' attempts and the accepted recipients, from the RCPT
    replies. A 421 closed the session (smtppipe.exchange); in lock step the next command,
    if there was one, would have found it so."""
    results: dict[str, Attempt] = {}
    accepted: list[str] = []
    for index, (rcpt, reply) in enumerate(zip(out.recipients, replies, strict=True)):
        if reply.code in RCPT_ACCEPTED:
            accepted.append(rcpt.address)
            continue
        if reply.code == 421 and (accepted or index < len(replies) - 1):
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        results[rcpt.address] = reply_attempt(reply.code, reply.message, relay, tls)
    return results, accepted


async def _end_empty(client: aiosmtplib.SMTP, data: Reply) -> None:
    """DATA was answered although no transaction can go on (MAIL refused, or no recipient
    accepted). RFC 2920 3.1: the client "cannot assume that the DATA command will be
    rejected"; if it was accepted (354) the client "should send a single dot", never the
    body, as Postfix's smtp client does (smtp_proto.c: "just send "." as per RFC 2197").
    That dot's reply means nothing. The caller's RSET (or a closed session, if this
    fails) leaves the session clean."""
    if data.code != 354 or not client.is_connected:
        return
    with contextlib.suppress(*_TEMP_ERRORS):
        await client.execute_command(b".")


def _delivered(results: dict[str, Attempt], accepted: list[str], reply: Reply, relay: str,
               tls: TlsUse | None, dsn: bool) -> dict[str, Attempt]:
    for rcpt_address in accepted:
        results[rcpt_address] = reply_attempt(reply.code, reply.message, relay, tls, dsn)
    return results


async def body_for(client: aiosmtplib.SMTP, flags: MessageFlags, wire: WireBody,
                   metrics: Metrics | None = None) -> WireBody:
    """The body as this next hop may take it: 8-bit mail to a server without 8BITMIME is
    converted to 7-bit (RFC 6152 3), off the event loop, and the conversion logged. (A
    spooled body is read back into memory for that, in a worker thread: a rare case, as
    such servers are.)"""
    if not flags.eight_bit or client.supports_extension("8bitmime"):
        return wire
    body = await wire.whole()
    converted = await mime7bit.convert(body)
    LOG.info("converted_7bit", relay=client.hostname, size=len(body),
             converted_size=len(converted))
    if metrics is not None:
        metrics.converted_7bit()
    return WireBody(converted)


class WireBody:
    """A queued message as it goes out after DATA: in its wire form (CRLF, dot-stuffed),
    a bounded piece at a time. A message kept in memory is stuffed piece by piece; a
    spooled one is already in wire form after our own header fields: on a plain TCP
    connection the kernel sends it from its file (sendfile(2), forwarder/filesend.py);
    through TLS it is read in chunks, each in a worker thread. Neither is ever processed
    in one pass on the event loop (aiosmtplib's data() runs two regular expressions over the
    whole message there). `head`: the message's first octets unstuffed (its header
    section, or the first HEAD_OCTETS of it)."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.size = body_size(body)
        self.head = body if isinstance(body, bytes) else body.head
        self._file: BinaryIO | None = None
        self._file_size, self._file_tail = 0, b""  # read with the open, off the loop
        self._tail = b"\r\n"  # the last octets sent (nothing sent: as after a line end)

    async def open(self) -> None:
        if isinstance(self.body, SpooledBody):
            opened, self._file_size, self._file_tail = await asyncio.to_thread(
                _open_spooled, self.body.path)
            self._file = opened
            if not self.head:
                raw = await asyncio.to_thread(opened.read, HEAD_OCTETS)
                self.head = self.body.prefix + unstuff(raw[:raw.rfind(b"\r\n") + 2])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def whole(self) -> bytes:
        """The whole message unstuffed, in memory (for a conversion)."""
        if isinstance(self.body, bytes):
            return self.body
        assert self._file is not None
        self._file.seek(0)
        rest = await asyncio.to_thread(self._file.read)
        return self.body.prefix + await asyncio.to_thread(unstuff, rest)

    async def pieces(self) -> AsyncIterator[bytes]:
        body = self.body
        if isinstance(body, bytes):
            for piece in stuffed_pieces(body):
                yield self._sent(piece)
            return
        for piece in stuffed_pieces(body.prefix):
            yield self._sent(piece)
        assert self._file is not None
        self._file.seek(0)  # the same file goes to each destination in turn
        while chunk := await asyncio.to_thread(self._file.read, SPOOL_CHUNK):
            yield self._sent(chunk)

    async def write_to(self, protocol: SMTPProtocol) -> None:
        """The message up to its end of data (`end`), with flow control (the transport
        never holds more than its high-water mark). A spooled body on a plain TCP
        connection goes from its file to the socket by sendfile(2) (forwarder/filesend.py)."""
        fd = None if self._file is None else filesend.plain_socket(protocol.transport)
        if fd is None:
            async for piece in self.pieces():
                protocol.write(piece)
                await protocol._drain_helper()
            return
        assert self._file is not None and isinstance(self.body, SpooledBody)
        prefix = b"".join(stuffed_pieces(self.body.prefix))
        await filesend.send(fd, prefix, self._file.fileno(), self._file_size)
        self._sent(prefix)
        self._sent(self._file_tail)

    def _sent(self, piece: bytes) -> bytes:
        self._tail = (self._tail + piece)[-2:]
        return piece

    @property
    def end(self) -> bytes:
        """The end of data: `.` CRLF on a line of its own (RFC 5321 4.5.2)."""
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def _open_spooled(path: Path) -> tuple[BinaryIO, int, bytes]:
    """A spool file open for sending (in a worker thread), its size and its last two
    octets (the end of data depends on them): read here, so that no file call but
    sendfile(2) runs on the event loop. The kernel is asked to read the file ahead, so
    that sendfile(2) finds its pages in memory even after a restart (POSIX_FADV_WILLNEED
    starts the reads and returns). A spool file never changes once queued."""
    fh = open(path, "rb")  # noqa: SIM115 (closed by WireBody.close)
    try:
        size = os.fstat(fh.fileno()).st_size
        tail = os.pread(fh.fileno(), 2, max(size - 2, 0))
    except OSError:
        fh.close()
        raise
    with contextlib.suppress(OSError):
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
    return fh, size, tail


async def send_data(client: aiosmtplib.SMTP, wire: WireBody,
                    wait: float) -> aiosmtplib.SMTPResponse:
    """DATA, then the message (`send_body`)."""
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    return await send_body(client, wire, wait)


async def send_body(client: aiosmtplib.SMTP, wire: WireBody,
                    wait: float) -> aiosmtplib.SMTPResponse:
    """The message after a 354 (`WireBody.write_to`), then the reply to the final dot;
    `wait` bounds the writing (a destination that stops reading) and the wait for that
    reply each."""
    protocol = client.protocol
    try:
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        async with asyncio.timeout(wait):
            await wire.write_to(protocol)
        protocol.write(wire.end)
        reply = await protocol.read_response(timeout=wait)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, TimeoutError,
            ConnectionError):
        client.close()
        raise
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


def needs_smtputf8(out: Outgoing, body: bytes) -> bool:
    """RFC 6531 3.4: the message needs SMTPUTF8 if it asked for it and its envelope or
    header section really holds UTF-8 (Postfix's rule: an ASCII message that merely
    asked goes out without it)."""
    if not out.flags.smtputf8:
        return False
    if not out.sender.isascii() or any(not r.address.isascii() for r in out.recipients):
        return True
    end = body.find(b"\r\n\r\n")
    return not (body if end < 0 else body[:end]).isascii()


def _cannot_carry(client: aiosmtplib.SMTP, out: Outgoing, body: bytes,
                  relay: str) -> Attempt | None:
    if needs_smtputf8(out, body) and not client.supports_extension("smtputf8"):
        # RFC 6531 3.4 and 3.7.5: no downgrade; the sender gets a DSN with 5.6.7.
        return local_attempt("5.6.7", f"SMTPUTF8 is required, but was not offered by {relay}",
                             relay)
    return None


def _all(recipients: Sequence[str], attempt: Attempt) -> dict[str, Attempt]:
    return dict.fromkeys(recipients, attempt)


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET between transactions on a reused connection; False if the session is unusable."""
    try:
        await client.rset()
    except _TEMP_ERRORS:
        return False
    return True


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "timed out"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
