"""The SMTP server session as a pure state machine: bytes in, events and replies out.

Sans-IO, in the manner of h11: `receive(data)` takes what the client sent, `next_event()`
parses as far as it can and either answers by itself (NOOP, RSET, HELP, VRFY, every syntax
and sequence error) or returns an event the handler must decide (HELO/EHLO, MAIL, RCPT, a
complete message, STARTTLS, the end of the session); the adapter (forwarder/smtpserver.py)
runs the handler and gives its answer back with `reply()`. Replies wait in an output
buffer that the adapter writes with `data_to_send()`. Nothing here does I/O, knows about
asyncio or reads a clock: deadlines are the adapter's.

What a hostile peer gets (docs/security.md):
- lines end only at CRLF, commands and text alike (RFC 5321 2.3.8); DATA ends only at a
  real CRLF.CRLF, and a bare CR or LF, or a NUL, anywhere in the body refuses the whole
  message (SMTP smuggling), after reading on to that real end so nothing is taken as a
  command (forwarder/smtpbody.py);
- command lines of 512 octets, text lines of 1000 (RFC 5321 4.5.3.1); message size checked
  at MAIL (`SIZE=`, RFC 1870) and while the body streams in, without keeping the excess;
- control characters in an argument are a `501`, and every reply carries an enhanced status
  code (RFC 2034), except the greeting and the replies to HELO and EHLO;
- a session that keeps sending garbage is closed with `421 4.7.0`, and so is one that
  collects `max_errors` errors (every 5xx we answer: refused recipients, bad commands, and
  NOOP, RSET, VRFY, EXPN or HELP past `max_junk_commands`), as Postfix's
  smtpd_hard_error_limit and smtpd_junk_command_limit do; an accepted message forgives
  both counts. Each error is reported as `ErrorCounted`, so the adapter can hold its
  reply back (the tarpit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from forwarder import replies, xforward
from forwarder.replies import Reply
from forwarder.smtpbody import TOO_LONG, BodyReader, CommandLines, SpillFactory
from forwarder.smtpevents import (
    Closing,
    Envelope,
    ErrorCount,
    ErrorCounted,
    Event,
    Hello,
    MailFrom,
    MessageReceived,
    MessageRefused,
    RcptTo,
    SessionInfo,
    SessionLimits,
    StartTls,
    TlsInfo,
)
from forwarder.smtpsyntax import (
    SIZE_EXTENSION_OCTETS,
    decode_argument,
    envelope_path,
    help_text,
    mail_parameters_fault,
    rcpt_parameters_fault,
    render_reply,
    split_command,
    split_path,
)

T = TypeVar("T")

# EHLO's keywords after SIZE: RFC 6152, RFC 2034, RFC 3461, RFC 6531.
_EXTENSIONS = ("8BITMIME", "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8")
# Replies to HELO and EHLO and the greeting carry no enhanced code (RFC 2034 4).
_NO_ENHANCED = frozenset({None, "HELO", "EHLO"})


@functools.lru_cache(maxsize=128)
def _line(reply: Reply) -> bytes:
    return str(reply).encode("ascii") + b"\r\n"


class Session(Generic[T]):
    """One SMTP session's protocol state (see the module docstring)."""

    def __init__(self, hostname: str, limits: SessionLimits, info: SessionInfo,
                 tls_offered: bool = False, spill: SpillFactory | None = None) -> None:
        self.hostname = hostname
        # Where a body past `limits.spill_at` octets goes (the adapter's spool files);
        # None: kept in memory (the tables of tests/test_session.py).
        self.spill = spill
        self.limits = limits
        self.info = info
        self.envelope: Envelope[T] = Envelope()
        self.tls_offered = tls_offered
        self.closed = False
        # A command or a body was completed since the adapter last cleared this: the
        # adapter moves the session's deadline then.
        self.progressed = False
        # The longest line read whole: a text line or a MAIL command with its SIZE
        # parameter; anything longer is skipped to its CRLF and refused.
        self._lines = CommandLines(max(limits.max_line_length + 1,
                                       limits.max_command_line + SIZE_EXTENSION_OCTETS))
        self._in = bytearray()
        self._out = bytearray()
        self._body: BodyReader | None = None
        self._current: str | None = None  # the command being answered
        self.count = ErrorCount(limits)
        self._tls = False
        self._hello: str | None = None  # the HELO/EHLO argument awaiting the handler

    # --- input and output -------------------------------------------------------------

    def greet(self) -> None:
        self._out += render_reply(f"220 {self.hostname} ESMTP forwarder", False)

    def receive(self, data: bytes) -> None:
        self._in += data

    @property
    def buffered(self) -> int:
        """Input octets not yet consumed (for the adapter's flow control)."""
        return len(self._in)

    def abandon(self) -> None:
        """The connection is gone: a body being read is forgotten (its spool file too)."""
        if self._body is not None:
            self._body.discard()
            self._body = None

    def discard_input(self) -> None:
        """STARTTLS: whatever came with or after the command is never executed
        (CVE-2024-34083)."""
        self._in.clear()

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, status: str) -> None:
        """The handler's answer to the event just returned (a reply line)."""
        if self._current == "DATA":  # it has judged the message: XFORWARD's time is over
            self.info.forwarded = None
        self._out += render_reply(status, self._current not in _NO_ENHANCED)
        if status[:1] == "5":
            self.count.error()
        elif self._current == "DATA" and status[:3] == "250":
            self.count.forgive()

    def reply_lines(self, statuses: list[str]) -> None:
        """The handler's answer to HELO or EHLO, one or several lines."""
        for status in statuses:
            self._out += render_reply(status, False)
        if statuses and statuses[-1][:3] == "250":
            self.info.host_name = self._hello

    def say(self, reply: Reply) -> None:
        self._out += _line(reply)
        if reply.code >= 500:
            self.count.error()

    def say_text(self, status: str) -> None:
        """A reply built here (HELP's text, VRFY's echo), without an enhanced code."""
        self._out += render_reply(status, False)

    def close_with(self, reply: Reply) -> None:
        """The adapter ends the session (a deadline, a shutdown): a last reply."""
        self.say(reply)
        self.closed = True

    # --- state the adapter asks about -------------------------------------------------

    @property
    def current(self) -> str | None:
        """The command being answered (DATA while a body is read), for logs."""
        return "DATA" if self._body is not None else self._current

    @property
    def in_body(self) -> bool:
        return self._body is not None

    @property
    def offers_starttls(self) -> bool:
        return self.tls_offered and not self._tls

    @property
    def between_transactions(self) -> bool:
        return self.envelope.mail_from is None and self._body is None

    def tls_started(self, tls: TlsInfo) -> None:
        """RFC 3207 4.2: forget everything learnt before TLS."""
        self._tls = True
        self.info = SessionInfo(self.info.peer, self.info.client, tls=tls,
                                xforward_allowed=self.info.xforward_allowed)
        self.envelope = Envelope()

    # --- parsing ------------------------------------------------------------------------

    def next_event(self) -> Event[T] | None:
        """Consume input up to the next event (None: more input is needed, or closed)."""
        while not self.closed:
            if self.count.unreported:
                return self._report_error()
            if self._body is not None:
                if not self._in:
                    return None
                event = self._feed_body()
            else:
                line = self._lines.next_line(self._in)
                if line is None:
                    return None
                self.progressed = True
                self._current = None
                event = (self._refuse(replies.COMMAND_TOO_LONG) if line is TOO_LONG
                         else self._command(line))
            if event is not None:
                return event
        return None

    def _command(self, line: bytes) -> Event[T] | None:
        split = split_command(line)
        if isinstance(split, Reply):
            return self._refuse(split)
        command, raw_arg = split
        limit = self.limits.max_command_line
        if command == "MAIL" and self.info.extended_smtp:
            limit += SIZE_EXTENSION_OCTETS
        if len(line) + 2 > limit:
            return self._refuse(replies.COMMAND_TOO_LONG)
        method = _COMMANDS.get(command)
        if method is None:
            return self._refuse(replies.COMMAND_UNRECOGNIZED)
        arg = decode_argument(raw_arg, utf8=command in ("MAIL", "RCPT"))  # RFC 6531 3.3
        if isinstance(arg, Reply):
            return self._refuse(arg)
        self._current = command
        return method(self, arg)

    def _report_error(self) -> Event[T]:
        errors = self.count.report()
        if self.count.too_many:
            self.close_with(replies.TOO_MANY_ERRORS)  # written once the adapter lets go
        return ErrorCounted(errors)

    def _refuse(self, reply: Reply) -> Event[T] | None:
        if self.count.bad_command():
            self.close_with(replies.TOO_MANY_ERRORS)
            return Closing(quit=False)
        self.say(reply)
        return None

    def _feed_body(self) -> Event[T] | None:
        assert self._body is not None
        done = self._body.feed(self._in)
        self._in.clear()
        if done is None:
            return None
        body, rest = done
        self._body = None
        self._in[:0] = rest
        self.progressed = True
        envelope, self.envelope = self.envelope, Envelope()
        self._current = "DATA"
        if isinstance(body, Reply):
            self.info.forwarded = None  # XFORWARD holds for one transaction
            self.say(body)
            return MessageRefused(body)
        envelope.content = body
        return MessageReceived(envelope)

    # --- commands -----------------------------------------------------------------------

    def _helo_needed(self) -> bool:
        if not self.info.host_name:
            self.say(replies.HELO_NEEDED)
            return True
        return False

    def smtp_HELO(self, hostname: str | None) -> Event[T] | None:
        if not hostname:
            self.say(replies.HELO_SYNTAX)
            return None
        self.envelope = Envelope()
        self.info.extended_smtp = False
        self._hello = hostname
        return Hello(hostname, [])

    def smtp_EHLO(self, hostname: str | None) -> Event[T] | None:
        if not hostname:
            self.say(replies.BAD_ARGUMENT)
            return None
        self.envelope = Envelope()  # RFC 5321 4.1.4: EHLO resets
        self.info.extended_smtp = True
        self._hello = hostname
        return Hello(hostname, _ehlo_lines(self.hostname, self.limits, self.offers_starttls,
                                           self.info.xforward_allowed))

    def smtp_MAIL(self, arg: str | None) -> Event[T] | None:
        """MAIL FROM (RFC 5321 4.1.1.2); parameters: smtpsyntax.mail_parameters_fault."""
        if self._helo_needed():
            return None
        syntax = replies.MAIL_SYNTAX_ESMTP if self.info.extended_smtp else replies.MAIL_SYNTAX
        parsed = self._envelope_path("FROM:", arg, syntax)
        if parsed is None:
            return None
        if self.envelope.mail_from:
            self.say(replies.NESTED_MAIL)
            return None
        address, params = parsed
        problem = mail_parameters_fault(params, self.limits.max_message_size, address)
        if problem is not None:
            self.say(problem)
            return None
        self.envelope.smtp_utf8 = "SMTPUTF8" in params
        return MailFrom(address, _options(params))

    def smtp_RCPT(self, arg: str | None) -> Event[T] | None:
        if self._helo_needed():
            return None
        if not self.envelope.mail_from:
            self.say(replies.NEED_MAIL)
            return None
        syntax = replies.RCPT_SYNTAX_ESMTP if self.info.extended_smtp else replies.RCPT_SYNTAX
        parsed = self._envelope_path("TO:", arg, syntax)
        if parsed is None:
            return None
        address, params = parsed
        problem = rcpt_parameters_fault(params, address, self.envelope.smtp_utf8)
        if problem is not None:
            self.say(problem)
            return None
        return RcptTo(address, _options(params) if params else [])

    def _envelope_path(self, keyword: str, arg: str | None,
                       syntax: Reply) -> tuple[str, dict[str, str | bool]] | None:
        """MAIL's and RCPT's `KEYWORD:<path> [params]`, or None once refused."""
        parsed = envelope_path(keyword, arg, self.info.extended_smtp, syntax)
        if isinstance(parsed, Reply):
            self.say(parsed)
            return None
        return parsed

    def smtp_DATA(self, arg: str | None) -> Event[T] | None:
        if self._helo_needed():
            return None
        if self.envelope.mail_from is None:
            self.say(replies.BAD_SEQUENCE)
        elif not self.envelope.rcpt_tos:
            self.say(replies.NO_VALID_RECIPIENTS)
        elif arg:
            self.say(replies.BAD_ARGUMENT)
        else:
            self.say(replies.START_DATA)
            self._body = BodyReader(self.limits.max_message_size, self.limits.max_line_length,
                                    self.spill, self.limits.spill_at)
        return None

    def smtp_QUIT(self, arg: str | None) -> Event[T] | None:
        if arg:
            self.say(replies.QUIT_SYNTAX)
            return None
        self.close_with(replies.BYE)
        return Closing(quit=True)

    def smtp_STARTTLS(self, arg: str | None) -> Event[T] | None:
        """RFC 3207. Whatever the client sent after the command, before the handshake, is
        discarded (CVE-2024-34083: never executed under TLS), and the session starts over."""
        if arg:
            self.say(replies.STARTTLS_SYNTAX)
        elif not self.tls_offered:
            self.say(replies.TLS_NOT_AVAILABLE)
        elif self._tls:
            self.say(replies.BAD_SEQUENCE)
        else:
            self.say(replies.TLS_READY)
            return StartTls()
        return None


def _ehlo_lines(hostname: str, limits: SessionLimits, starttls: bool,
                xforward_allowed: bool) -> list[str]:
    """EHLO's reply (RFC 5321 4.1.1.1) with the extensions we implement (no AUTH;
    PIPELINING, which is safe because commands are answered in order; DSN, RFC 3461;
    SMTPUTF8, RFC 6531); STARTTLS until TLS is on (RFC 3207), XFORWARD to a trusted relay."""
    keywords = ["PIPELINING", f"SIZE {limits.max_message_size}", *_EXTENSIONS]
    if starttls:
        keywords.append("STARTTLS")
    if xforward_allowed:
        keywords.append(xforward.EHLO_KEYWORD)
    lines = [f"250-{hostname}"] + [f"250-{k}" for k in keywords[:-1]]
    lines.append(f"250 {keywords[-1]}")
    return lines


def _xforward(session: Session[Any], arg: str | None) -> Event[Any] | None:
    """Postfix's XFORWARD (forwarder/xforward.py): only from a trusted relay, never inside
    a transaction; refused attributes leave the earlier ones as they were."""
    info = session.info
    if not info.xforward_allowed:
        return session._refuse(replies.XFORWARD_DENIED)
    if session.envelope.mail_from is not None:
        session.say(replies.XFORWARD_IN_TRANSACTION)
        return None
    forwarded = xforward.update(info.forwarded, arg)
    if isinstance(forwarded, Reply):
        session.say(forwarded)
    else:
        info.forwarded = forwarded
        session.say(replies.XFORWARD_OK)
    return None


# NOOP, RSET, VRFY, EXPN and HELP: answered here, each a junk command (ErrorCount).
def _rset(session: Session[Any], arg: str | None) -> Event[Any] | None:
    if arg:
        session.say(replies.RSET_SYNTAX)
        return None
    session.envelope = Envelope()
    session.info.forwarded = None
    session.say(replies.OK)
    session.count.junk_command()
    return None


def _noop(session: Session[Any], arg: str | None) -> Event[Any] | None:
    session.say(replies.OK)
    session.count.junk_command()
    return None


def _vrfy(session: Session[Any], arg: str | None) -> Event[Any] | None:
    if not arg:
        session.say(replies.VRFY_SYNTAX)
    elif split_path(arg)[0] is None:
        session.say_text(f"{replies.VRFY_UNPARSABLE} {arg}")
    else:
        session.say(replies.CANNOT_VRFY)
    session.count.junk_command()
    return None


def _expn(session: Session[Any], arg: str | None) -> Event[Any] | None:
    session.say(replies.NOT_IMPLEMENTED)
    session.count.junk_command()
    return None


def _help(session: Session[Any], arg: str | None) -> Event[Any] | None:
    session.say_text(help_text(arg, session.offers_starttls))
    session.count.junk_command()
    return None


def _options(params: dict[str, str | bool]) -> list[str]:
    """Parameters back in aiosmtpd's form for the handler: `KEY=VALUE` or `KEY`."""
    return [key if value is True else f"{key}={value}" for key, value in params.items()]


_COMMANDS: dict[str, Callable[[Session[Any], str | None], Event[Any] | None]] = {
    name[5:]: method for name, method in vars(Session).items() if name.startswith("smtp_")
} | {"XFORWARD": _xforward, "RSET": _rset, "NOOP": _noop, "VRFY": _vrfy, "EXPN": _expn,
     "HELP": _help}
