"""Outbound SMTP: reused connections per destination, opportunistic STARTTLS, and the
destination's verdict on each recipient.

Like Postfix's `smtp` client at TLS level `may`: STARTTLS is used when offered, without
authenticating the server (RFC 7435 opportunistic security); if the handshake fails the
address is remembered as "clear only" for a while and the delivery is retried in clear.
Timeouts follow RFC 5321 4.5.3.2; the wait after the final dot is long on purpose, since
giving up there while the server is still writing to disk duplicates mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import aiosmtplib

from forwarder.config import DeliverySettings
from forwarder.dns import Destination
from forwarder.policy import Outcome, outcome_of_reply
from forwarder.queue.model import Body, SpooledBody
from forwarder.queue.spool import CHUNK as SPOOL_CHUNK
from forwarder.smtpbody import stuffed_pieces

# How long an address whose TLS handshake failed is contacted in clear only.
NO_TLS_SECONDS = 3600.0

# A plain RFC 5321 mailbox: Dot-string "@" a domain of LDH labels (4.1.2). aiosmtplib's
# mail() and rcpt() run every address through email.utils.parseaddr, an RFC 5322 header
# parser, and that was 11 % of the delivering process's CPU (docs/performance.md); for
# these addresses it returns them unchanged (tests/test_smtpclient_paths.py holds that
# with hypothesis), so they go on the command line as they are. Anything else (a quoted
# local part, an address literal, 8-bit) still goes through the library.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
PLAIN_MAILBOX = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*")


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


def relay_name(dest: Destination) -> str:
    """Postfix's `relay=` form: host[address]:port."""
    return f"{dest.host}[{dest.address}]:{dest.port}"


def _enhanced(code: int, message: str) -> str:
    first = message.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(code // 100):
        return first
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def reply_attempt(code: int, message: str, relay: str) -> Attempt:
    text = " ".join(message.split())  # one line: never a raw CR/LF in a log or a DSN
    return Attempt(outcome_of_reply(code), _enhanced(code, text), f"smtp; {code} {text}", relay)


def local_attempt(status: str, reason: str, relay: str | None = None, *,
                  unreachable: bool = False, tls_failed: bool = False) -> Attempt:
    outcome = Outcome.FAILED if status.startswith("5") else Outcome.DEFERRED
    return Attempt(outcome, status, f"x-local; {reason}", relay, unreachable, tls_failed)


class TlsHandshakeFailed(Exception):
    pass


class ConnectionPool:
    """Open SMTP sessions per destination, reused for several messages."""

    def __init__(self, settings: DeliverySettings, hostname: str) -> None:
        self._settings = settings
        self._hostname = hostname
        self._idle: dict[Destination, list[aiosmtplib.SMTP]] = defaultdict(list)
        self._limits: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._no_tls: dict[tuple[str, int], float] = {}
        self._all = asyncio.Semaphore(max(1, settings.concurrency))
        self._tls = ssl.create_default_context()
        # Opportunistic TLS (RFC 7435): encrypt when offered, do not authenticate.
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE

    def slot(self, dest: Destination) -> asyncio.Semaphore:
        """A cap on concurrent sessions per destination address."""
        key = (dest.address, dest.port)
        if key not in self._limits:
            self._limits[key] = asyncio.Semaphore(self._settings.per_destination)
        return self._limits[key]

    @property
    def total(self) -> asyncio.Semaphore:
        """A cap on concurrent sessions in all."""
        return self._all

    async def acquire(self, dest: Destination) -> aiosmtplib.SMTP:
        idle = self._idle[dest]
        while idle:
            client = idle.pop()
            if client.is_connected:
                return client
        return await self._connect(dest)

    def _tls_allowed(self, dest: Destination) -> bool:
        until = self._no_tls.get((dest.address, dest.port))
        loop_now = asyncio.get_running_loop().time()
        return until is None or loop_now >= until

    async def _connect(self, dest: Destination) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=dest.address, port=dest.port, local_hostname=self._hostname,
            timeout=self._settings.command_timeout, start_tls=False,
        )
        await client.connect(timeout=self._settings.connect_timeout)
        await client.ehlo()
        if client.supports_extension("starttls") and self._tls_allowed(dest):
            try:
                await client.starttls(tls_context=self._tls, server_hostname=dest.host)
            except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                client.close()
                key = (dest.address, dest.port)
                self._no_tls[key] = asyncio.get_running_loop().time() + NO_TLS_SECONDS
                raise TlsHandshakeFailed(str(exc) or type(exc).__name__) from exc
        return client

    def release(self, dest: Destination, client: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and client.is_connected:
            self._idle[dest].append(client)
        else:
            client.close()

    async def close(self) -> None:
        for clients in self._idle.values():
            for client in clients:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.quit(), 2)
                client.close()
        self._idle.clear()


_TEMP_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError)


class Sender:
    """Sends one message to a group of recipients at one destination address."""

    def __init__(self, settings: DeliverySettings, pool: ConnectionPool) -> None:
        self._settings = settings
        self._pool = pool

    async def send(
        self, dest: Destination, sender: str, recipients: Sequence[str], body: Body
    ) -> dict[str, Attempt]:
        relay = relay_name(dest)
        wire = WireBody(body)
        try:
            await wire.open()  # before any connection: a spool file we cannot read is ours
        except OSError as exc:
            return _all(recipients, local_attempt(
                "4.3.0", f"cannot read the queued message: {exc.strerror}", relay))
        try:
            return await self._send(dest, sender, recipients, wire, relay)
        finally:
            wire.close()

    async def _send(
        self, dest: Destination, sender: str, recipients: Sequence[str], wire: WireBody,
        relay: str,
    ) -> dict[str, Attempt]:
        async with self._pool.total, self._pool.slot(dest):
            try:
                client = await self._pool.acquire(dest)
            except TlsHandshakeFailed as exc:
                return _all(recipients, local_attempt(
                    "4.7.5", f"TLS handshake with {relay} failed: {exc}", relay,
                    unreachable=True, tls_failed=True))
            except _TEMP_ERRORS as exc:
                return _all(recipients, local_attempt(
                    "4.4.1", f"connect to {relay}: {describe(exc)}", relay, unreachable=True))
            return await self._on(client, dest, sender, recipients, wire, relay)

    async def _on(
        self, client: aiosmtplib.SMTP, dest: Destination, sender: str,
        recipients: Sequence[str], wire: WireBody, relay: str,
    ) -> dict[str, Attempt]:
        reusable = needs_reset = False
        try:
            results, needs_reset = await self._transaction(client, sender, recipients, wire,
                                                           relay)
            reusable = True
            return results
        except aiosmtplib.SMTPResponseException as exc:
            # 421: the server is closing the session (RFC 5321 3.8).
            reusable = needs_reset = exc.code != 421
            return _all(recipients, reply_attempt(exc.code, exc.message, relay))
        except _TEMP_ERRORS as exc:
            return _all(recipients, local_attempt(
                "4.4.2", f"{relay}: {describe(exc)}", relay, unreachable=True))
        finally:
            if needs_reset:
                reusable = await _reset(client)
            self._pool.release(dest, client, reusable)

    async def _transaction(
        self, client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
        wire: WireBody, relay: str,
    ) -> tuple[dict[str, Attempt], bool]:
        """Per-recipient attempts, and whether the session needs RSET before reuse: not
        after a completed DATA, which ends the transaction (RFC 5321 4.1.1.4), so a
        reused connection costs four round trips a message, not five."""
        await _mail(client, sender)
        results: dict[str, Attempt] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await _rcpt(client, rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[rcpt] = reply_attempt(exc.code, exc.message, relay)
                continue
            accepted.append(rcpt)
        if not accepted:
            return results, True
        # RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot. What we
        # queue has CRLF line ends only (bare CR or LF is refused on receipt) and goes out
        # dot-stuffed, so no byte sequence we relay can be read as an end of data by the
        # destination (SMTP smuggling).
        reply = await send_data(client, wire, self._settings.data_timeout)
        for rcpt in accepted:
            results[rcpt] = reply_attempt(reply.code, reply.message, relay)
        return results, False


class WireBody:
    """A queued message as it goes out after DATA: in its wire form (CRLF, dot-stuffed),
    a bounded piece at a time. A message kept in memory is stuffed piece by piece; a
    spooled one is already in wire form after our own header fields, and is read from
    its file in chunks, each read in a worker thread. Neither is ever processed in one
    pass on the event loop (aiosmtplib's data() runs two regular expressions over the
    whole message there)."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self._file: BinaryIO | None = None
        self._tail = b"\r\n"  # the last octets sent (nothing sent: as after a line end)

    async def open(self) -> None:
        if isinstance(self.body, SpooledBody):
            self._file = await asyncio.to_thread(open, self.body.path, "rb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

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

    def _sent(self, piece: bytes) -> bytes:
        if piece:
            self._tail = piece[-2:]
        return piece

    @property
    def end(self) -> bytes:
        """The end of data: `.` CRLF on a line of its own (RFC 5321 4.5.2)."""
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


async def send_data(client: aiosmtplib.SMTP, wire: WireBody,
                    wait: float) -> aiosmtplib.SMTPResponse:
    """DATA, the message streamed with flow control (the transport never holds more than
    its high-water mark), then the reply to the final dot; `wait` bounds the writing (a
    destination that stops reading) and the wait for that reply each."""
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    try:
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        async with asyncio.timeout(wait):
            async for piece in wire.pieces():
                protocol.write(piece)
                await protocol._drain_helper()
        protocol.write(wire.end)
        reply = await protocol.read_response(timeout=wait)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, TimeoutError,
            ConnectionError):
        client.close()
        raise
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


def plain_path(address: str) -> bytes | None:
    """`<address>` for the command line if it is plain (or the null path), else None."""
    if not address:
        return b"<>"
    if PLAIN_MAILBOX.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    return None


async def _mail(client: aiosmtplib.SMTP, sender: str) -> None:
    """aiosmtplib's mail(), without its header parser for a plain address."""
    path = plain_path(sender)
    if path is None or client.is_ehlo_or_helo_needed:
        await client.mail(sender)
        return
    reply = await client.execute_command(b"MAIL", b"FROM:" + path)
    if reply.code != 250:
        raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)


async def _rcpt(client: aiosmtplib.SMTP, recipient: str) -> None:
    """aiosmtplib's rcpt(), without its header parser for a plain address."""
    path = plain_path(recipient) if recipient else None
    if path is None or client.is_ehlo_or_helo_needed:
        await client.rcpt(recipient)
        return
    reply = await client.execute_command(b"RCPT", b"TO:" + path)
    if reply.code not in (250, 251):  # RFC 5321 4.2.2: 251 will forward
        raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)


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
