"""The SMTP session layer: a strict SMTP server for a host facing the Internet.

It speaks the protocol aiosmtpd speaks (same replies, same handler interface: forwarder/
front.py), on asyncio's Protocol interface rather than aiosmtpd's streams, which cost
about twice as much CPU a message (docs/performance.md section 11). What a hostile peer
gets (issue 7, docs/security.md):

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
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from forwarder import log, replies
from forwarder.config import Settings
from forwarder.connections import Connections
from forwarder.replies import Reply

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
# RFC 3463 codes for the replies (aiosmtpd's wording) that carry none.
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


@functools.lru_cache(maxsize=512)
def render_reply(text: str, enhanced: bool) -> bytes:
    """A reply line on the wire. Cached: almost every reply is one of a few constants, and
    this was a regular expression or two per reply (docs/performance.md)."""
    if enhanced:
        text = with_enhanced_code(text)
    # A reply is one line: nothing a handler returns may add another (RFC 5321 4.2).
    return _LINE_BREAKS.sub(" ", text).encode("ascii", "replace") + b"\r\n"


class BodyReader:
    """A DATA body taken in as it arrives, up to the line `.` (RFC 5321 4.5.2), then
    checked by `finish_body`.

    The end is a `.` CRLF at the start of a line: CRLF `.` CRLF anywhere, or `.` CRLF at
    the very start. Past the size limit the bytes are dropped but the reading goes on to
    that real end, so memory stays bounded and the client's remaining bytes are never
    taken for commands. `feed` returns None until the end, then the result and the bytes
    that came after the end (pipelined commands).
    """

    def __init__(self, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self.max_line = max_line
        # Dot-stuffing adds at most a third: more octets than this is over the limit.
        self._ceiling = int(max_size * _STUFFED) + len(_DOT_CRLF)
        self._buf = bytearray()
        self._dropped = 0  # octets discarded past the size limit
        self._scanned = 0  # where the next search for the end may start

    def feed(self, data: bytes | bytearray) -> tuple[bytes | Reply, bytes] | None:
        buf = self._buf
        buf += data
        if not self._dropped and buf[:3] == _DOT_CRLF:
            end = 0  # an empty body
        else:
            found = buf.find(b"\r\n.\r\n", max(0, self._scanned - 4))
            if found < 0:
                self._scanned = len(buf)
                if self._dropped + len(buf) > self._ceiling:
                    # Keep the last four octets: the end may straddle two reads.
                    self._dropped += len(buf) - 4
                    del buf[:-4]
                    self._scanned = 4
                return None
            end = found + 2
        rest = bytes(buf[end + 3:])
        if self._dropped or end + 3 > self._ceiling:
            return replies.SIZE_EXCEEDED, rest
        return finish_body(bytes(buf[:end]), self.max_size, self.max_line), rest


# --- the session ---------------------------------------------------------------------


def _stream(transport: object) -> asyncio.Transport | None:
    """The transport as a stream we can write to and abort. Duck-typed, not isinstance:
    uvloop's transports implement the interface without deriving from asyncio's classes."""
    if all(hasattr(transport, name) for name in ("write", "close", "abort")):
        return cast(asyncio.Transport, transport)
    return None


class SessionInfo:
    """What the handler knows about the client (the names aiosmtpd's Session uses)."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.host_name: str | None = None
        self.extended_smtp = False
        self.ssl: Any = None


class Envelope:
    """One transaction (the names aiosmtpd's Envelope uses; the handler adds its own)."""

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.content: bytes | None = None
        self.original_content: bytes | None = None
        self.smtp_utf8 = False


# HELP's answers (RFC 5321 4.1.1.8); STARTTLS is listed only where it is offered.
_SYNTAX = {
    "DATA": "DATA", "EHLO": "EHLO hostname", "EXPN": "EXPN <address>", "HELO": "HELO hostname",
    "HELP": "HELP [command]", "MAIL": "MAIL FROM: <address> [SP <mail-parameters>]",
    "NOOP": "NOOP [ignored]", "QUIT": "QUIT", "RCPT": "RCPT TO: <address> [SP <mail-parameters>]",
    "RSET": "RSET", "STARTTLS": "STARTTLS", "VRFY": "VRFY <address>",
}
# Past this much input held (a command waiting, replies backed up), stop reading.
_HIGH_WATER = 65536


class ForwarderSMTP(asyncio.Protocol):
    """One SMTP session, on asyncio's Protocol interface (see the module docstring).

    Commands are parsed and answered as their bytes arrive, in `data_received`; only the
    steps that wait for something (the directory at RCPT, the queue commit after the dot,
    the TLS handshake) run as a task, and input is held meanwhile, so replies keep the
    order of the commands (RFC 2920). aiosmtpd's stream-based session spent about twice
    as much CPU a message on the same work (docs/performance.md section 11)."""

    def __init__(self, handler: Any, settings: Settings, connections: Connections) -> None:
        self.handler = handler
        self.limits = settings.limits
        self.hostname = settings.hostname
        self.connections = connections
        self.tls_context = connections.tls_context
        self.loop = asyncio.get_running_loop()
        # The longest line read whole: a text line (RFC 5321 4.5.3.1.6) or a MAIL command
        # with its SIZE parameter; anything longer is skipped to its CRLF and refused.
        self.line_length_limit = max(self.limits.max_line_length + 1,
                                     self.limits.max_command_line + SIZE_EXTENSION_OCTETS)
        self.transport: asyncio.Transport | None = None
        self.session: SessionInfo | None = None
        self.envelope: Envelope | None = None
        self._client = "unknown"
        self._admitted = False
        self._buf = bytearray()
        self._skipping = False  # inside an overlong line, up to its CRLF
        self._body: BodyReader | None = None  # reading a DATA body
        self._busy = False  # a handler is working: input waits
        self._read_paused = False
        self._write_paused = False
        self._task: asyncio.Future[Any] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._current: str | None = None
        self._bad_commands = 0
        self._tls = False

    # --- connection life --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = _stream(transport)
        if stream is None:  # not a stream transport: nothing to speak SMTP over
            return
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refusal = self.connections.admit(self, self._client, self.limits)
        if refusal is not None:
            LOG.warning("connection_refused", client=self._client, reply=refusal.code,
                        reason=refusal.enhanced)
            stream.write(f"{refusal}\r\n".encode("ascii"))
            stream.close()
            return
        self._admitted = True
        self.transport = stream
        self.session = SessionInfo(peer)
        self.envelope = Envelope()
        self._reset_timeout(self.limits.command_timeout)
        self.push(f"220 {self.hostname} ESMTP forwarder")

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self._buf += data
        self._pump()

    def eof_received(self) -> bool:
        """The client closed its side: close ours (a commit in flight still completes)."""
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self.connections.release(self, self._client)
        if self._timer is not None:
            self._timer.cancel()
        # A lookup or handshake in flight is abandoned; a queue commit is not (it runs on
        # its own, held by Connections, and its result is only not sent).
        if self._task is not None and not self._task.done():
            self._task.cancel()
        # Break the session's reference cycles (transport, timer, task) so that reference
        # counting frees it now rather than the cyclic garbage collector.
        self.transport = None
        self._timer = None
        self._task = None
        self._body = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    def _reset_timeout(self, duration: float) -> None:
        """Set the session's deadline. One timer per session, moved lazily: a timer that
        fires before the current deadline re-arms itself for what is left, so a command
        costs a clock read, not a cancelled timer and a new one."""
        self._deadline = self.loop.time() + duration
        timer = self._timer
        if timer is None or timer.cancelled() or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """The command or DATA deadline passed (RFC 5321 4.5.3.2): say so and close."""
        if self.transport is None:
            return
        if self.loop.time() < self._deadline:  # moved since the timer was set
            self._timer = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        LOG.info("session_timeout", client=self._client, command=self._current)
        self._say_and_close(replies.TIMEOUT)

    def _say_and_close(self, reply: Reply) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(f"{reply}\r\n".encode("ascii"))
        transport.close()
        # close() waits to flush; a peer that never reads must not keep the socket.
        self.loop.call_later(ABORT_GRACE, transport.abort)

    def close_if_idle(self) -> None:
        """Shutdown: a session waiting for a command outside a transaction leaves now."""
        if self._waiting() and self._between_transactions():
            self._say_and_close(replies.SHUTTING_DOWN)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _waiting(self) -> bool:
        return self.transport is not None and not self._busy and self._body is None

    def _between_transactions(self) -> bool:
        return self.envelope is None or self.envelope.mail_from is None

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- replies ----------------------------------------------------------------------

    def push(self, status: str | bytes) -> None:
        if self.transport is not None:
            self.transport.write(self._reply_line(status))

    def _send(self, statuses: list[str]) -> None:
        """Write reply lines in one segment: a multiline reply (EHLO) is one send."""
        if self.transport is not None:
            self.transport.write(b"".join(self._reply_line(s) for s in statuses))

    def _reply_line(self, status: str | bytes) -> bytes:
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        return render_reply(text, self._current not in _NO_ENHANCED)

    def _refuse(self, reply: Reply) -> None:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self.push(str(replies.TOO_MANY_ERRORS))
            self._close()
        else:
            self.push(str(reply))

    # --- input ------------------------------------------------------------------------

    def _pump(self) -> None:
        """Answer every complete command buffered, until one has to wait."""
        while (self.transport is not None and not self._busy and not self._write_paused
               and not self.transport.is_closing()):
            if self._body is not None:
                if not self._buf:
                    break
                data = bytes(self._buf)
                self._buf.clear()
                self._feed_body(data)
                continue
            if self.connections.closing and self._between_transactions():
                self.push(str(replies.SHUTTING_DOWN))
                self._close()
                break
            line = self._next_line()
            if line is None:
                break
            self._current = None
            if line is _TOO_LONG:
                self._refuse(replies.COMMAND_TOO_LONG)
            else:
                self._command(line)
            if not self._busy and self._body is None:  # the wait for the next one starts
                self._reset_timeout(self.limits.command_timeout)
        self._flow()

    def _flow(self) -> None:
        """Input waits while a handler works or the client is not reading our replies:
        past _HIGH_WATER octets of it, stop reading the socket (TCP then holds the client
        back), so a flood of pipelined commands costs bounded memory."""
        if self.transport is None:
            return
        size = len(self._buf)
        if not self._read_paused and size > _HIGH_WATER:
            self._read_paused = True
            self.transport.pause_reading()
        elif self._read_paused and size <= _HIGH_WATER // 2:
            self._read_paused = False
            self.transport.resume_reading()

    def _next_line(self) -> bytes | None:
        """The next command line without its CRLF, `_TOO_LONG` for a line past the limit
        (skipped up to its CRLF, so its tail is never read as a command), or None."""
        buf = self._buf
        end = buf.find(b"\r\n")
        if self._skipping:
            if end < 0:
                del buf[:-1]  # keep a final CR: the CRLF may straddle two reads
                return None
            del buf[:end + 2]
            self._skipping = False
            return _TOO_LONG
        if end < 0:
            if len(buf) > self.line_length_limit:
                self._skipping = True
                del buf[:-1]
            return None
        if end > self.line_length_limit:
            del buf[:end + 2]
            return _TOO_LONG
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line

    def _command(self, line: bytes) -> None:
        parsed = self._parse(line)
        if isinstance(parsed, Reply):
            self._refuse(parsed)
            return
        command, method, arg = parsed
        self._current = command
        try:
            method(self, arg)
        except Exception as error:
            self.push(self._exception_reply(error))

    def _parse(self, line: bytes) -> tuple[str, Callable[..., None], str | None] | Reply:
        split = split_command(line)
        if isinstance(split, Reply):
            return split
        command, raw_arg = split
        limit = self.limits.max_command_line
        if command == "MAIL" and self.session is not None and self.session.extended_smtp:
            limit += SIZE_EXTENSION_OCTETS
        if len(line) + 2 > limit:
            return replies.COMMAND_TOO_LONG
        method = _COMMANDS.get(command)
        if method is None:
            return replies.COMMAND_UNRECOGNIZED
        arg = decode_argument(raw_arg)
        if isinstance(arg, Reply):
            return arg
        return command, method, arg

    def _exception_reply(self, error: BaseException) -> str:
        """DESIGN.md habit 4: the handler turns errors into a 451; never an exception text."""
        try:
            status: str = self.handler.exception_reply(error)
        except Exception:
            LOG.exception("handle_exception_failed")
            return str(replies.LOCAL_ERROR)
        return status

    # --- waiting for a handler --------------------------------------------------------

    def _wait_for(self, work: Awaitable[Any], then: Callable[[Any], None],
                  keep: bool = False) -> None:
        """Run `work` as a task, hold input meanwhile, then pass its result to `then`.
        With `keep`, a client leaving does not cancel it (a queue commit half-way)."""
        self._busy = True
        task = asyncio.ensure_future(work)
        if keep:
            self.connections.keep(task)
        else:
            self._task = task
        task.add_done_callback(lambda done: self._done(done, then))

    def _done(self, task: asyncio.Future[Any], then: Callable[[Any], None]) -> None:
        self._task = None
        self._busy = False
        if self.transport is None or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.push(self._exception_reply(error))
        else:
            then(task.result())
        self._reset_timeout(self.limits.command_timeout)
        self._pump()

    # --- commands ---------------------------------------------------------------------

    def _helo_needed(self) -> bool:
        assert self.session is not None
        if not self.session.host_name:
            self.push("503 Error: send HELO first")
            return True
        return False

    def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            self.push("501 Syntax: HELO hostname")
            return
        assert self.session is not None
        self.envelope = Envelope()
        self.session.extended_smtp = False
        self.push(self.handler.handle_HELO(self, self.session, self.envelope, hostname))

    def smtp_EHLO(self, hostname: str | None) -> None:
        """RFC 5321 4.1.1.1 and the extensions we implement (no AUTH; PIPELINING, which is
        safe because commands are answered in order)."""
        if not hostname:
            self.push(str(replies.BAD_ARGUMENT))
            return
        assert self.session is not None
        self.envelope = Envelope()  # RFC 5321 4.1.4: EHLO resets
        self.session.extended_smtp = True
        keywords = ["PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME",
                    "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self._tls:
            keywords.append("STARTTLS")
        lines = [f"250-{self.hostname}"] + [f"250-{k}" for k in keywords[:-1]]
        lines.append(f"250 {keywords[-1]}")
        self._send(self.handler.handle_EHLO(self, self.session, self.envelope, hostname,
                                            lines))

    def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM (RFC 5321 4.1.1.2) with the SIZE (RFC 1870) and BODY (RFC 6152)
        parameters; SIZE over the limit is 552 5.3.4 (RFC 1870 6.1)."""
        if self._helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        size = declared_size(arg)
        if (size is not None and size > self.limits.max_message_size
                and self.session.extended_smtp and self.envelope.mail_from is None):
            self.push(str(replies.SIZE_EXCEEDED))
            return
        syntax = self._syntax("MAIL FROM: <address>")
        parsed = self._envelope_path("FROM:", arg, syntax)
        if parsed is None:
            return
        if self.envelope.mail_from:
            self.push("503 Error: nested MAIL command")
            return
        address, options = parsed
        problem = _mail_parameters(options, self.limits.max_message_size)
        if problem is not None:
            self.push(syntax if problem is _SYNTAX_ERROR else problem)
            return
        self.push(self.handler.handle_MAIL(self, self.session, self.envelope, address,
                                           options))

    def smtp_RCPT(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if not self.envelope.mail_from:
            self.push("503 Error: need MAIL command")
            return
        syntax = self._syntax("RCPT TO: <address>")
        path = self._envelope_path("TO:", arg, syntax)
        if path is None:
            return
        address, options = path
        parsed = _parameters(options)
        if parsed is None:
            self.push(syntax)
            return
        if parsed:  # we implement no RCPT parameter (no DSN extension)
            self.push("555 RCPT TO parameters not recognized or not implemented")
            return
        self._wait_for(self.handler.handle_RCPT(self, self.session, self.envelope, address,
                                                options), self.push)

    def _syntax(self, usage: str) -> str:
        assert self.session is not None
        extended = " [SP <mail-parameters>]" if self.session.extended_smtp else ""
        return f"501 Syntax: {usage}{extended}"

    def _envelope_path(self, keyword: str, arg: str | None,
                       syntax: str) -> tuple[str, list[str]] | None:
        """MAIL's and RCPT's `KEYWORD:<path> [params]` -> (mailbox, upper-cased params),
        or None once the reply refusing it is sent (aiosmtpd's replies)."""
        assert self.session is not None
        path = _after_keyword(keyword, arg)
        if path is None:
            self.push(syntax)
            return None
        address, params = split_path(path)
        if address is None:
            self.push("553 5.1.3 Error: malformed address")
            return None
        if not address or (params and not self.session.extended_smtp):
            self.push(syntax)
            return None
        return address, (params or "").upper().split()

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self.push("501 Syntax: RSET")
            return
        self.envelope = Envelope()
        self.push("250 OK")

    def smtp_NOOP(self, arg: str | None) -> None:
        self.push("250 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self.push("501 Syntax: QUIT")
            return
        # The client is leaving: free its slot now, not when the close completes, or a
        # client that reconnects at once (a new connection per message, at exactly the
        # per-client cap) would race its own departing session and get 421.
        self.connections.release(self, self._client)
        self.push("221 Bye")
        self._close()

    def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self.push("501 Syntax: VRFY <address>")
        elif split_path(arg)[0] is None:
            self.push("502 Could not VRFY " + arg)
        else:
            # RFC 5321 3.5.3: 252, neither confirmed nor denied (no address harvesting).
            self.push("252 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str | None) -> None:
        self.push(str(replies.NOT_IMPLEMENTED))

    def smtp_HELP(self, arg: str | None) -> None:
        offered = {k: v for k, v in _SYNTAX.items()
                   if k != "STARTTLS" or (self.tls_context is not None and not self._tls)}
        if arg and arg.upper() in offered:
            self.push("250 Syntax: " + offered[arg.upper()])
            return
        self.push(f"{501 if arg else 250} Supported commands: {' '.join(sorted(offered))}")

    def smtp_STARTTLS(self, arg: str | None) -> None:
        """RFC 3207. Whatever the client sent after the command, before the handshake, is
        discarded (CVE-2024-34083: never executed under TLS), and the session starts over."""
        if arg:
            self.push("501 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.transport is None:
            self.push("454 TLS not available")
            return
        if self._tls:
            self.push(str(replies.BAD_SEQUENCE))
            return
        self.push("220 Ready to start TLS")
        self._wait_for(self._handshake(self.transport, self.tls_context), self._tls_started)

    async def _handshake(self, transport: asyncio.Transport,
                         context: ssl.SSLContext) -> asyncio.Transport | None:
        # Plaintext that came with or after the command is dropped here, just before the
        # TLS layer takes the transport over (synchronously, within start_tls); from then
        # on, data reaches us only decrypted.
        self._buf.clear()
        try:
            return await self.loop.start_tls(transport, self, context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            LOG.info("tls_failed", client=self._client, error=type(exc).__name__)
            return None

    def _tls_started(self, transport: asyncio.Transport | None) -> None:
        if transport is None:  # the handshake failed: nothing more can be said in clear
            self._close()
            return
        # RFC 3207 4.2: forget everything learnt before TLS.
        self._tls = True
        self.transport = transport
        assert self.session is not None
        self.session = SessionInfo(self.session.peer)
        self.session.ssl = transport.get_extra_info("ssl_object")
        self.envelope = Envelope()

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            self.push(str(replies.BAD_SEQUENCE))
            return
        if not self.envelope.rcpt_tos:
            self.push(str(replies.NO_VALID_RECIPIENTS))
            return
        if arg:
            self.push(str(replies.BAD_ARGUMENT))
            return
        self.push(replies.START_DATA)
        self._reset_timeout(self.limits.data_timeout)
        self._body = BodyReader(self.limits.max_message_size, self.limits.max_line_length)

    def _feed_body(self, data: bytes) -> None:
        assert self._body is not None
        done = self._body.feed(data)
        if done is None:
            return
        body, rest = done
        self._body = None
        self._buf[:0] = rest
        self._reset_timeout(self.limits.command_timeout)
        envelope, self.envelope = self.envelope, Envelope()
        if isinstance(body, Reply):
            LOG.info("data_refused", client=self._client, reply=str(body))
            self.connections.count_refusal(body)
            self.push(str(body))
            return
        assert envelope is not None
        envelope.content = envelope.original_content = body
        # A client leaving after the dot must not cancel the queue commit half-way (the
        # message would sit leased, unannounced to delivery): the task is kept apart.
        self._wait_for(self.handler.handle_DATA(self, self.session, envelope), self.push,
                       keep=True)


_TOO_LONG = b"\x00too long"  # a sentinel: no real line holds a NUL and gets this far
_SYNTAX_ERROR = "syntax"
_COMMANDS: dict[str, Callable[[ForwarderSMTP, str | None], None]] = {
    name[5:]: method for name, method in vars(ForwarderSMTP).items()
    if name.startswith("smtp_")
}


def _after_keyword(keyword: str, arg: str | None) -> str | None:
    """`FROM:<a>` -> `<a>`; None if the keyword is missing."""
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def _parameters(options: list[str]) -> dict[str, str | bool] | None:
    """RFC 5321 4.1.2 esmtp-param list as a dict; None if one is malformed."""
    result: dict[str, str | bool] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        result[key] = value if eq else True
    return result


def _mail_parameters(options: list[str], max_size: int) -> str | None:
    """What is wrong with MAIL FROM's parameters (as aiosmtpd answered), or None."""
    params = _parameters(options)
    if params is None:
        return _SYNTAX_ERROR
    if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
        return "501 Error: BODY can only be one of 7BIT, 8BITMIME"
    smtputf8 = params.pop("SMTPUTF8", False)
    if not isinstance(smtputf8, bool):
        return "501 Error: SMTPUTF8 takes no arguments"
    if smtputf8:
        return "501 Error: SMTPUTF8 disabled"
    size = params.pop("SIZE", None)
    if size:
        if isinstance(size, bool) or not size.isdigit():
            return _SYNTAX_ERROR
        if int(size) > max_size:
            return "552 Error: message size exceeds fixed maximum message size"
    if params:
        return "555 MAIL FROM parameters not recognized or not implemented"
    return None
