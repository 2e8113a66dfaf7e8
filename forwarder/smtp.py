"""The SMTP session layer: aiosmtpd's `SMTP` made strict for a server facing the Internet.

aiosmtpd parses the protocol; this subclass decides what a hostile peer gets (issue 7,
docs/security.md):

- lines end only at CRLF, commands and text alike (RFC 5321 2.3.8); DATA ends only at a real
  CRLF.CRLF, and a bare CR or LF, or a NUL, anywhere in the body refuses the whole message
  (SMTP smuggling), after reading on to that real end so nothing is taken as a command;
- command lines of 512 octets, text lines of 1000 (RFC 5321 4.5.3.1), message size checked at
  MAIL (`SIZE=`, RFC 1870) and while the body streams in, without keeping the excess;
- control characters in an argument are a `501`, and every reply carries an enhanced status
  code (RFC 2034, advertised);
- deadlines for a whole command line and a whole DATA body, not idle timers a drip-feeding
  client can reset byte by byte; a session out of time gets `421 4.4.2` and is closed;
- connection caps in all and per client address (`421 4.7.0`, forwarder/connections.py), a
  shutdown notice to sessions between transactions (`421 4.3.2`), and STARTTLS.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from forwarder import log, replies
from forwarder.config import Settings
from forwarder.connections import Connections
from forwarder.replies import Reply
from forwarder.smtpfast import FAST_INIT, fast_init

LOG = log.get("forwarder.smtp")

# RFC 1870 6: the SIZE parameter lengthens MAIL FROM by up to 26 octets.
SIZE_EXTENSION_OCTETS = 26
# Postfix's smtpd_hard_error_limit is 20; garbage gets a shorter rope here.
MAX_BAD_COMMANDS = 10
# A closed session that will not read our last reply is cut off after this long.
ABORT_GRACE = 5.0
# Replies to HELO and EHLO and the greeting carry no enhanced code (RFC 2034 4).
_NO_ENHANCED = frozenset({None, "HELO", "EHLO"})
_COMMAND_WORD = re.compile(rb"[A-Za-z]{1,16}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_REPLY = re.compile(r"([245])(\d\d)([ -])(.*)", re.DOTALL)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_LINE_BREAKS = re.compile(r"[\r\n]+")
# RFC 3463 codes for aiosmtpd's own replies, which carry none.
_DEFAULT_ENHANCED = {
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
    552: "5.3.4", 553: "5.1.3", 555: "5.5.4", 454: "4.7.0", 421: "4.3.0",
}


# --- pure helpers --------------------------------------------------------------------


def with_enhanced_code(status: str) -> str:
    """Give a 2yz/4yz/5yz reply an RFC 3463 code when it has none; others pass unchanged."""
    match = _REPLY.fullmatch(status)
    if match is None:
        return status
    klass, rest, sep, text = match.groups()
    if _ENHANCED.match(text):
        return status
    code = int(klass + rest)
    enhanced = _DEFAULT_ENHANCED.get(code, f"{klass}.0.0")
    return f"{code}{sep}{enhanced} {text}".rstrip()


def split_command(line: bytes) -> tuple[str, bytes] | Reply:
    """`line` without its CRLF -> (COMMAND, raw argument), or the reply refusing it."""
    word, _, arg = line.partition(b" ")
    if not _COMMAND_WORD.fullmatch(word):
        return replies.SYNTAX_ERROR
    return word.decode("ascii").upper(), arg.strip(b" ")


def decode_argument(arg: bytes) -> str | Reply | None:
    """An argument as text; control characters or 8-bit octets are a 501 (no SMTPUTF8)."""
    if not arg:
        return None
    if _CONTROL.search(arg) or not arg.isascii():
        return replies.BAD_ARGUMENT
    return arg.decode("ascii")


def split_path(arg: str) -> tuple[str | None, str | None]:
    """RFC 5321 4.1.2 `Path [SP params]` -> (mailbox, params); (None, None) if malformed.

    Deliberately simpler than RFC 5322 parsing (no comments, no folding): the mailbox is
    returned verbatim for addresses.py to judge. A source route (`@a,@b:x@y`) is dropped, as
    RFC 5321 4.1.1.3 and Appendix C ask; the null path is returned as `<>`.
    """
    text = arg.lstrip(" ")
    if not text:
        return "", ""
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return None, None
        mailbox, rest = text[1:end], text[end + 1 :]
        if not mailbox:
            return "<>", rest
    else:
        mailbox, _, rest = text.partition(" ")
    if mailbox.startswith("@"):
        _, colon, mailbox = mailbox.partition(":")
        if not colon:
            return None, None
    if not mailbox or any(c in mailbox for c in " <>"):
        return None, None
    return mailbox, rest


def declared_size(arg: str | None) -> int | None:
    """The `SIZE=` parameter of a MAIL FROM argument (RFC 1870), if well formed."""
    if arg is None or arg[:5].upper() != "FROM:":
        return None
    _, params = split_path(arg[5:])
    for param in (params or "").upper().split():
        key, eq, value = param.partition("=")
        if key == "SIZE" and eq and value.isdigit():
            return int(value)
    return None


def content_fault(content: bytes) -> Reply | None:
    """What is wrong with a whole body whose lines all end in CRLF, if anything.

    Every CRLF in `content` ends a line, so any other CR or LF is bare (RFC 5321 2.3.8,
    RFC 5322 2.3): counting is the check, at C speed, instead of one scan per line."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        return replies.BARE_LINE_END  # SMTP smuggling
    if b"\x00" in content:
        return replies.NUL_IN_MESSAGE
    return None


# The end of DATA: "." CRLF at the start of a line (RFC 5321 4.5.2).
_DOT_CRLF = b".\r\n"
# Dot-stuffing adds one octet to a line of at least three (".x" CRLF): the stuffed form of a
# body within the size limit is never longer than this.
_STUFFED = 4 / 3


def finish_body(raw: bytes, max_size: int, max_line: int) -> bytes | Reply:
    """A whole DATA body as read from the wire, without its final `.` CRLF -> the message,
    or what is wrong with it. Undoes dot-stuffing (RFC 5321 4.5.2: a line's leading "." is
    removed) and checks the size, the text line length (RFC 5321 4.5.3.1.6) and the line
    ends, each in one pass at C speed."""
    content = raw[1:] if raw[:1] == b"." else raw
    content = content.replace(b"\r\n.", b"\r\n")
    if len(content) > max_size:
        return replies.SIZE_EXCEEDED
    if content and max(map(len, content.split(b"\r\n"))) + 2 > max_line:
        return replies.TEXT_LINE_TOO_LONG
    return content_fault(content) or content


async def read_body(reader: asyncio.StreamReader, max_size: int, max_line: int) -> bytes | Reply:
    """Read a DATA body up to the line `.` (RFC 5321 4.5.2) and check it (`finish_body`).

    Read in pieces that end at each `.` CRLF (or at the reader's buffer limit), not line by
    line: a `.` CRLF ends the body only where the two octets before it are a CRLF, or at the
    very start. Past the size limit the pieces are dropped but the reading goes on to that
    real end, so memory stays bounded and the client's remaining bytes are never taken for
    commands.
    """
    pieces: list[bytes] = []
    received = 0
    oversized = False
    last_two = b"\r\n"  # the body starts at the start of a line
    while True:
        try:
            piece = await reader.readuntil(_DOT_CRLF)
            ended = (last_two + piece)[-5:-3] == b"\r\n"
        except asyncio.LimitOverrunError as exc:
            piece = await reader.readexactly(exc.consumed)
            ended = False
        last_two = (last_two + piece)[-2:]
        received += len(piece)
        if received > max_size * _STUFFED + len(_DOT_CRLF):
            oversized = True
            pieces.clear()
        elif not oversized:
            pieces.append(piece)
        if ended:
            break
    if oversized:
        return replies.SIZE_EXCEEDED
    return finish_body(b"".join(pieces)[: -len(_DOT_CRLF)], max_size, max_line)


@functools.lru_cache(maxsize=512)
def render_reply(text: str, enhanced: bool) -> bytes:
    """A reply line on the wire. Cached: almost every reply is one of a few constants, and
    this was a regular expression or two per reply (docs/performance.md)."""
    if enhanced:
        text = with_enhanced_code(text)
    # A reply is one line: nothing a handler returns may add another (RFC 5321 4.2).
    return _LINE_BREAKS.sub(" ", text).encode("ascii", "replace") + b"\r\n"


# --- the session ---------------------------------------------------------------------


def _stream(transport: object) -> asyncio.Transport | None:
    """The transport as a stream we can write to and abort. Duck-typed, not isinstance:
    uvloop's transports implement the interface without deriving from asyncio's classes."""
    if all(hasattr(transport, name) for name in ("write", "close", "abort")):
        return cast(asyncio.Transport, transport)
    return None



class ForwarderSMTP(SMTP):
    """One SMTP session. See the module docstring for what it changes in aiosmtpd."""

    def __init__(self, handler: Any, settings: Settings, connections: Connections) -> None:
        self.limits = settings.limits
        self.connections = connections
        # The stream buffer limit: the longest text line, dot-stuffed (RFC 5321 4.5.2).
        self.line_length_limit = max(self.limits.max_line_length + 1,
                                     self.limits.max_command_line + SIZE_EXTENSION_OCTETS)
        if FAST_INIT:
            fast_init(self, handler, hostname=settings.hostname, ident="forwarder",
                      data_size_limit=self.limits.max_message_size,
                      timeout=self.limits.command_timeout, tls_context=connections.tls_context)
        else:
            super().__init__(
                handler, hostname=settings.hostname, ident="forwarder",
                data_size_limit=self.limits.max_message_size,
                timeout=self.limits.command_timeout, enable_SMTPUTF8=False,
                decode_data=False, tls_context=connections.tls_context,
                auth_exclude_mechanism=["LOGIN", "PLAIN"],
            )
        # No AUTH: this server relays for nobody, authenticated or not.
        self._smtp_methods.pop("AUTH", None)
        self._client = "unknown"
        self._deadline = 0.0
        self._admitted = False
        self._waiting = False
        self._current: str | None = None
        self._bad_commands = 0

    # --- connection life --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # the TLS layer after STARTTLS
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refusal = self.connections.admit(self, self._client, self.limits)
        if refusal is not None:
            LOG.warning("connection_refused", client=self._client, reply=refusal.code,
                        reason=refusal.enhanced)
            stream = _stream(transport)
            if stream is not None:
                stream.write(f"{refusal}\r\n".encode("ascii"))
                stream.close()
            return
        self._admitted = True
        super().connection_made(transport)

    async def smtp_QUIT(self, arg: str | None) -> None:
        if not arg and self._admitted:
            # The client is leaving: free its slot now, not when the close completes, or a
            # client that reconnects at once (a new connection per message, at exactly the
            # per-client cap) would race its own departing session and get 421.
            self.connections.release(self, self._client)
        await super().smtp_QUIT(arg)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self.connections.release(self, self._client)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        """The client closed its side: close ours. aiosmtpd cancels the session task here
        and would keep the socket half-open for that task to close; but a connection that
        reaches us already at EOF has its task cancelled before it ever ran, nothing would
        close it, and it would hold a connection slot (and a file descriptor) for good."""
        if self._admitted:
            super().eof_received()  # cancels the session task
        return False

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Set the session's deadline. One timer per session, moved lazily: a timer that
        fires before the current deadline re-arms itself for what is left, so a command
        costs a clock read, not a cancelled timer and a new one (seven a message)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """The command or DATA deadline passed (RFC 5321 4.5.3.2): say so and close."""
        if self.loop.time() < self._deadline:  # moved since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        LOG.info("session_timeout", client=self._client, command=self._current)
        self._say_and_close(replies.TIMEOUT)

    def _say_and_close(self, reply: Reply) -> None:
        transport = _stream(self.transport)
        if transport is None:
            return
        transport.write(f"{reply}\r\n".encode("ascii"))
        transport.close()
        # close() waits to flush; a peer that never reads must not keep the socket.
        self.loop.call_later(ABORT_GRACE, transport.abort)

    def close_if_idle(self) -> None:
        """Shutdown: a session waiting for a command outside a transaction leaves now."""
        if self._waiting and self._between_transactions():
            self._say_and_close(replies.SHUTTING_DOWN)

    def abort(self) -> None:
        transport = _stream(self.transport)
        if transport is not None:
            transport.abort()

    def _between_transactions(self) -> bool:
        return self.envelope is None or self.envelope.mail_from is None

    # --- replies ----------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        await self._write(self._reply_line(status))

    async def _send(self, statuses: list[str] | list[str | bytes]) -> None:
        """Write reply lines in one segment: a multiline reply (EHLO) is one send, not one
        per line."""
        await self._write(b"".join(self._reply_line(s) for s in statuses))

    async def _write(self, data: bytes) -> None:
        """Straight to the transport (the current one, TLS after STARTTLS); wait for the
        peer only when the transport is holding data back."""
        transport = self.transport
        if transport is None:
            return
        transport.write(data)  # type: ignore[attr-defined]
        if transport.get_write_buffer_size():  # type: ignore[attr-defined]
            await self._writer.drain()

    def _reply_line(self, status: str | bytes) -> bytes:
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        return render_reply(text, self._current not in _NO_ENHANCED)

    async def _refuse(self, reply: Reply) -> None:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            await self.push(str(replies.TOO_MANY_ERRORS))
            self._close()
        else:
            await self.push(str(reply))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- the command loop -------------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            await self.push(f"220 {self.hostname} ESMTP {self.__ident__}")
            while self.transport is not None and not self.transport.is_closing():
                await self._one_command()
        except asyncio.CancelledError:
            self._writer.close()
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            self._close()
        finally:
            # The session is over: break its reference cycles (the command table's bound
            # methods, the stream writer's link back to us) so that reference counting frees
            # it now, instead of leaving a few dozen objects per connection to the cyclic
            # garbage collector.
            self._smtp_methods = {}
            self._client_connected_cb = None
            del self._writer

    async def _one_command(self) -> None:
        if self.connections.closing and self._between_transactions():
            await self.push(str(replies.SHUTTING_DOWN))
            self._close()
            return
        self._current = None
        self._reset_timeout(self.limits.command_timeout)
        self._waiting = True
        try:
            line = await self._read_line()
        finally:
            self._waiting = False
        if line is None:
            await self._refuse(replies.COMMAND_TOO_LONG)
            return
        parsed = self._parse(line)
        if isinstance(parsed, Reply):
            await self._refuse(parsed)
            return
        command, method, arg = parsed
        self._current = command
        try:
            await method(arg)
        except TLSSetupException:
            self._close()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as error:
            await self.push(await self._exception_reply(error))

    def _parse(self, line: bytes) -> tuple[str, Callable[..., Any], str | None] | Reply:
        split = split_command(line)
        if isinstance(split, Reply):
            return split
        command, raw_arg = split
        limit = self.limits.max_command_line
        if command == "MAIL" and self.session is not None and self.session.extended_smtp:
            limit += SIZE_EXTENSION_OCTETS
        if len(line) + 2 > limit:
            return replies.COMMAND_TOO_LONG
        method = self._smtp_methods.get(command)
        if method is None:
            return replies.COMMAND_UNRECOGNIZED
        arg = decode_argument(raw_arg)
        if isinstance(arg, Reply):
            return arg
        return command, method, arg

    async def _read_line(self) -> bytes | None:
        """One command line without its CRLF; None if it was too long (and was skipped)."""
        try:
            return (await self._reader.readuntil(b"\r\n"))[:-2]
        except asyncio.LimitOverrunError as exc:
            await self._reader.readexactly(exc.consumed)
        while True:
            try:
                await self._reader.readuntil(b"\r\n")
                return None
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    async def _exception_reply(self, error: Exception) -> str:
        """DESIGN.md habit 4: the handler turns errors into a 451; never an exception text."""
        try:
            status: str = await self.handle_exception(error)
        except Exception:
            LOG.exception("handle_exception_failed")
            return str(replies.LOCAL_ERROR)
        return status

    # --- commands ---------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return split_path(arg)

    async def smtp_EHLO(self, hostname: str | None) -> None:
        """RFC 5321 4.1.1.1 and the extensions we implement (not aiosmtpd's list: no AUTH,
        and PIPELINING, which is safe because commands are read and answered in order)."""
        if not hostname:
            await self.push(str(replies.BAD_ARGUMENT))
            return
        self.envelope = self._create_envelope()  # RFC 5321 4.1.4: EHLO resets
        assert self.session is not None
        self.session.extended_smtp = True
        keywords = ["PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME",
                    "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and self._tls_protocol is None:
            keywords.append("STARTTLS")
        lines = [f"250-{self.hostname}"] + [f"250-{k}" for k in keywords[:-1]]
        lines.append(f"250 {keywords[-1]}")
        result = await self._call_handler_hook("EHLO", hostname, lines)
        if result is MISSING:
            self.session.host_name = hostname
            result = lines
        await self._send(list(result))

    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, with SIZE= over the limit answered 552 5.3.4 (RFC 1870 6.1)."""
        size = declared_size(arg)
        assert self.session is not None and self.envelope is not None
        if (size is not None and size > self.limits.max_message_size
                and self.session.extended_smtp and self.envelope.mail_from is None):
            await self.push(str(replies.SIZE_EXCEEDED))
            return
        await super().smtp_MAIL(arg)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push(str(replies.NOT_IMPLEMENTED))

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push(str(replies.BAD_SEQUENCE))
            return
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NO_VALID_RECIPIENTS))
            return
        if arg:
            await self.push(str(replies.BAD_ARGUMENT))
            return
        await self.push(replies.START_DATA)
        self._reset_timeout(self.limits.data_timeout)
        body = await read_body(self._reader, self.limits.max_message_size,
                               self.limits.max_line_length)
        self._reset_timeout(self.limits.command_timeout)
        if isinstance(body, Reply):
            LOG.info("data_refused", client=self._client, reply=str(body))
            self.envelope = self._create_envelope()
            await self.push(str(body))
            return
        self.envelope.content = self.envelope.original_content = body
        status = await self._data_hook()
        self.envelope = self._create_envelope()
        await self.push(str(replies.LOCAL_ERROR) if status is MISSING else status)

    async def _data_hook(self) -> Any:
        """Run the handler shielded: a client leaving after the dot must not cancel a queue
        commit half-way (the message would sit leased, unannounced to delivery)."""
        task = asyncio.ensure_future(self._call_handler_hook("DATA"))
        self.connections.keep(task)
        return await asyncio.shield(task)
