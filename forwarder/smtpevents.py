"""What the SMTP session and its handler exchange: the session's limits and state as the
handler sees it, the transaction, the handler's interface and the session's events.

Pure data (forwarder/session.py produces and consumes it; forwarder/smtpserver.py carries
it between the session and the handler): no I/O, no asyncio.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeAlias, TypeVar

from forwarder.replies import Reply
from forwarder.smtpbody import Spilled
from forwarder.xforward import Forwarded

T = TypeVar("T")

# Postfix's smtpd_hard_error_limit is 20; garbage gets a shorter rope here.
MAX_BAD_COMMANDS = 10
# Postfix's smtpd_hard_error_limit: errors (refused recipients, bad commands, junk past
# its limit) in one session before `421 4.7.0`.
MAX_ERRORS = 20
# Postfix's smtpd_junk_command_limit: NOOP, RSET, VRFY, EXPN and HELP are free up to this
# many; each one past it counts as an error.
MAX_JUNK_COMMANDS = 100


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_message_size: int
    max_line_length: int  # a text line in DATA, CRLF included (RFC 5321 4.5.3.1.6)
    max_command_line: int  # a command line, CRLF included (RFC 5321 4.5.3.1.4)
    max_bad_commands: int = MAX_BAD_COMMANDS
    max_errors: int = MAX_ERRORS
    max_junk_commands: int = MAX_JUNK_COMMANDS
    # A body past this many octets goes to a spill (a spool file) as it arrives.
    spill_at: int = 256 * 1024


class ErrorCount:
    """A session's errors as Postfix counts them (forwarder/session.py's docstring): lines
    that are no command, 5xx answers, and junk commands past their free allowance."""

    __slots__ = ("bad_commands", "errors", "junk", "limits", "unreported")

    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self.bad_commands = 0
        self.errors = 0  # 5xx answered since the last accepted message
        self.junk = 0  # NOOP, RSET, VRFY, EXPN, HELP since the last accepted message
        self.unreported = False  # an error counted, not yet returned as ErrorCounted

    def error(self) -> None:
        self.errors += 1
        self.unreported = True

    def junk_command(self) -> None:
        """RFC 5321 lets NOOP and RSET be sent at any time; an endless stream of them only
        holds a connection slot, so past the limit each one is an error."""
        self.junk += 1
        if self.junk > self.limits.max_junk_commands:
            self.error()

    def bad_command(self) -> bool:
        """A line that is no command; True: one too many, the session ends."""
        self.bad_commands += 1
        return self.bad_commands >= self.limits.max_bad_commands

    def forgive(self) -> None:
        """A message was accepted: earlier errors are forgiven (Postfix does the same)."""
        self.errors = self.junk = 0

    def report(self) -> int:
        """The count for an `ErrorCounted` event (the error is reported)."""
        self.unreported = False
        return self.errors

    @property
    def too_many(self) -> bool:
        return self.errors >= self.limits.max_errors


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The TLS layer of a session after STARTTLS (RFC 3207)."""

    version: str
    cipher: str


@dataclass(slots=True)
class SessionInfo:
    """What the handler knows about the client (the names aiosmtpd's Session uses)."""

    peer: object  # the transport's peername
    client: str  # the client's address as text
    host_name: str | None = None  # the HELO/EHLO argument, once accepted
    extended_smtp: bool = False  # EHLO rather than HELO
    tls: TlsInfo | None = None
    # XFORWARD: whether this client may send it (a trusted relay), and what it said for
    # the current transaction (forwarder/xforward.py).
    xforward_allowed: bool = False
    forwarded: Forwarded | None = None

    @property
    def origin(self) -> str:
        """The address the mail came from: the relay's client when it said (XFORWARD),
        else ours. The inbound checks and the rate limits judge this one."""
        forwarded = self.forwarded
        if forwarded is not None and forwarded.addr is not None:
            return forwarded.addr
        return self.client

    @property
    def origin_helo(self) -> str:
        """The HELO name that goes with `origin` (never the relay's with its client's
        address: XFORWARD_README, note 4)."""
        forwarded = self.forwarded
        if forwarded is not None and forwarded.addr is not None:
            return forwarded.helo or ""
        return self.host_name or ""


@dataclass(slots=True)
class Envelope(Generic[T]):
    """One transaction (aiosmtpd's names), plus what the handler decided about it: the
    reverse-path as it normalised it, and one `T` per accepted recipient."""

    mail_from: str | None = None  # as the client wrote it; "<>" for the null sender
    mail_options: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    # After the dot, checked: the message unstuffed, or, past `spill_at`, where it went.
    content: bytes | Spilled | None = None
    smtp_utf8: bool = False
    sender: str = ""
    accepted: list[T] = field(default_factory=list)


class Handler(Protocol[T]):
    """The decisions a session asks for, with aiosmtpd's hook names and arguments. Each
    returns the reply text (EHLO: its lines); RCPT and DATA may wait, the others may not.
    `exception_reply` turns an error raised by any hook into a reply (DESIGN.md habit 4)."""

    def handle_HELO(self, server: object, session: SessionInfo, envelope: Envelope[T],
                    hostname: str) -> str: ...

    def handle_EHLO(self, server: object, session: SessionInfo, envelope: Envelope[T],
                    hostname: str, responses: list[str]) -> list[str]: ...

    def handle_MAIL(self, server: object, session: SessionInfo, envelope: Envelope[T],
                    address: str, mail_options: list[str]) -> str: ...

    def handle_RCPT(self, server: object, session: SessionInfo, envelope: Envelope[T],
                    address: str, rcpt_options: list[str]) -> Awaitable[str]: ...

    def handle_DATA(self, server: object, session: SessionInfo,
                    envelope: Envelope[T]) -> Awaitable[str]: ...

    def exception_reply(self, error: BaseException) -> str: ...


# --- events: what the adapter must act on -----------------------------------------------
# (not frozen: a frozen dataclass is built through object.__setattr__, a cost per event)


@dataclass(slots=True)
class Hello:
    """HELO or EHLO: answer with `reply_lines` (EHLO's lines are offered in `lines`)."""

    hostname: str
    lines: list[str]  # EHLO: the reply lines with our extensions; HELO: empty


@dataclass(slots=True)
class MailFrom:
    address: str
    options: list[str]  # upper-cased parameters, as aiosmtpd gives them


@dataclass(slots=True)
class RcptTo:
    address: str
    options: list[str]


@dataclass(slots=True)
class MessageReceived(Generic[T]):
    """The body ended with a real CRLF.CRLF and passed its checks."""

    envelope: Envelope[T]


@dataclass(slots=True)
class MessageRefused:
    """The body ended but was refused (already answered): for logs and counters."""

    reply: Reply


@dataclass(slots=True)
class ErrorCounted:
    """The session counted an error (its reply is in the output, not yet sent): the
    adapter may hold the reply back (the tarpit) or close. `errors`: the session's count
    since its last accepted message (Postfix forgives errors then)."""

    errors: int


@dataclass(slots=True)
class StartTls:
    """The client asked for TLS and was told to go ahead: drop what it sent after the
    command (`discard_input`), then start the handshake."""


@dataclass(slots=True)
class Closing:
    """The session is over (the reply is in the output): write it, then close. `quit`: the
    client said goodbye (its connection slot can be freed at once)."""

    quit: bool


Event: TypeAlias = (
    "Hello | MailFrom | RcptTo | MessageReceived[T] | MessageRefused | ErrorCounted"
    " | StartTls | Closing")
