"""The asyncio adapter of the SMTP session: moves bytes, runs the handler, keeps deadlines.

The protocol rules are in forwarder/session.py, which does no I/O. This class only feeds it
what the socket delivers, acts on its events (calls the handler, starts TLS, closes),
writes its replies, holds input while the handler works or the client does not read, and
keeps the session's deadline. Answering as bytes arrive, on asyncio's Protocol interface,
costs about half the CPU of aiosmtpd's stream-based session (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from forwarder import log, replies
from forwarder.config import Settings
from forwarder.connections import Connections
from forwarder.readgate import BIG_READ, HIGH_WATER, ReadGate
from forwarder.replies import Reply
from forwarder.session import Session
from forwarder.smtpbody import SpillFactory
from forwarder.smtpevents import (
    Closing,
    ErrorCounted,
    Handler,
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
from forwarder.tarpit import ErrorLedger, Tarpit
from forwarder.xforward import trusted

LOG = log.get("forwarder.smtp")
T = TypeVar("T")

# A closed session that will not read our last reply is cut off after this long.
ABORT_GRACE = 5.0


def _stream(transport: object) -> asyncio.Transport | None:
    """The transport as a stream we can write to and abort. Duck-typed, not isinstance:
    uvloop's transports implement the interface without deriving from asyncio's classes."""
    if all(hasattr(transport, name) for name in ("write", "close", "abort")):
        return cast(asyncio.Transport, transport)
    return None


def _tls_info(transport: asyncio.Transport) -> TlsInfo:
    ssl_object = transport.get_extra_info("ssl_object")
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return TlsInfo(ssl_object.version() if ssl_object is not None else "unknown",
                   cipher[0] if cipher else "unknown")


def session_limits(settings: Settings) -> SessionLimits:
    limits = settings.limits
    return SessionLimits(limits.max_message_size, limits.max_line_length,
                         limits.max_command_line, max_errors=limits.max_errors,
                         max_junk_commands=limits.max_junk_commands,
                         spill_at=limits.spill_threshold)


def _exception_reply(handler: Handler[Any], error: BaseException) -> str:
    """DESIGN.md habit 4: the handler turns errors into a 451, never an exception text;
    if even that fails, or gives no text, the answer is still a 451."""
    try:
        status = handler.exception_reply(error)
    except Exception:
        LOG.exception("exception_reply_failed")
        return str(replies.LOCAL_ERROR)
    return status if isinstance(status, str) else _bad_reply(status)


def _bad_reply(value: object) -> str:
    LOG.error("handler_reply_invalid", type=type(value).__name__)
    return str(replies.LOCAL_ERROR)


def _new_session(settings: Settings, peer: object, client: str, tls_offered: bool,
                 spill: SpillFactory | None) -> Session[Any]:
    info = SessionInfo(peer, client, xforward_allowed=trusted(client, settings.xforward_hosts))
    return Session(settings.hostname, session_limits(settings), info, tls_offered, spill)


class Deadline:
    """One session's deadline. One timer, moved lazily: a timer that fires before the
    current deadline re-arms itself for what is left, so a command costs a clock read, not
    a cancelled timer and a new one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self.loop = loop
        self.expired: Callable[[], None] | None = expired
        self._when = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def move(self, duration: float) -> None:
        self._when = self.loop.time() + duration
        timer = self._timer
        if timer is None or timer.cancelled() or timer.when() > self._when:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(self._when, self._fire)

    def _fire(self) -> None:
        if self.loop.time() < self._when:  # moved since the timer was set
            self._timer = self.loop.call_at(self._when, self._fire)
        elif self.expired is not None:
            self.expired()

    def cancel(self) -> None:
        """The session is over; the reference to it is dropped (no cycle to collect)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self.expired = None


class SmtpProtocol(asyncio.Protocol, Generic[T]):
    """One SMTP connection: the session's bytes, events and deadline (module docstring)."""

    def __init__(self, handler: Handler[T], settings: Settings,
                 connections: Connections, errors: ErrorLedger | None = None,
                 spill: SpillFactory | None = None) -> None:
        self.handler = handler
        self.spill = spill  # where big bodies go as they arrive (spool files)
        self.settings = settings
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        # An error's reply held back; `errors`: per client address, for all sessions.
        self._tarpit = Tarpit(self.loop, errors, settings.limits.max_errors,
                              settings.limits.error_sleep)
        self.transport: asyncio.Transport | None = None
        self.session: Session[T] | None = None
        self._client = "unknown"
        self._admitted = False
        self._busy = False  # a handler or the handshake is working: input waits
        self._reading = ReadGate(self.loop)  # flow control: high water and bursts
        self._write_paused = False
        self._task: asyncio.Future[Any] | None = None
        self._deadline = Deadline(self.loop, self._timed_out)
        self._lifetime: asyncio.TimerHandle | None = None  # the whole session's deadline
        self._expired = False

    # --- connection life --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = _stream(transport)
        if stream is None:  # not a stream transport: nothing to speak SMTP over
            return
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        limits = self.settings.limits
        refusal = self.connections.admit(self, self._client, limits)
        if refusal is not None:
            LOG.warning("connection_refused", client=self._client, reply=refusal.code,
                        reason=refusal.enhanced)
            stream.write(f"{refusal}\r\n".encode("ascii"))
            stream.close()
            return
        self._admitted = True
        self.transport = self._reading.transport = stream
        self.session = _new_session(self.settings, peer, self._client,
                                    self.connections.tls_context is not None, self.spill)
        self._deadline.move(limits.command_timeout)
        self._lifetime = self.loop.call_later(limits.session_timeout, self._session_expired)
        self.session.greet()
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            return
        self.session.receive(data)
        self._pump()
        if len(data) >= BIG_READ:
            self._reading.count_burst(len(data))

    def eof_received(self) -> bool:
        """The client closed its side: close ours (a commit in flight still completes)."""
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self.connections.release(self, self._client)
        self._deadline.cancel()
        self._tarpit.cancel()
        if self._lifetime is not None:
            self._lifetime.cancel()
        self._lifetime = None
        if self.session is not None:
            self.session.abandon()  # a body cut off half way: its spool file goes
        # A lookup or handshake in flight is abandoned; a queue commit is not (it runs on
        # its own, held by Connections, and its result is only not sent).
        if self._task is not None and not self._task.done():
            self._task.cancel()
        # Break the reference cycles (transport, timer, task) so that reference counting
        # frees the session now rather than the cyclic garbage collector.
        self.transport = self._reading.transport = None
        self.session = None
        self._task = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    # --- the event loop of one session ------------------------------------------------

    def _pump(self) -> None:
        """Answer every complete command buffered, until one has to wait."""
        session = self.session
        transport = self.transport
        if session is None or transport is None:
            return
        tarpit = self._tarpit
        while (not self._busy and tarpit.held is None and not self._write_paused
               and not transport.is_closing()):
            if (self.connections.closing or self._expired) and session.between_transactions:
                session.close_with(replies.SHUTTING_DOWN if self.connections.closing
                                   else replies.SESSION_TOO_LONG)
                self._flush()
                self._close()
                return
            event = session.next_event()
            if event is None:
                break
            _DISPATCH[type(event)](self, event)
        if session.progressed and not self._busy:
            session.progressed = False
            limits = self.settings.limits
            self._deadline.move(limits.data_timeout if session.in_body
                                else limits.command_timeout)
        if tarpit.held is not None:
            return  # the reply waits; input waits with it
        out = session.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
            if session.closed:  # the last reply (421) is out
                self._close()
        if self._reading.paused or session.buffered > HIGH_WATER:
            self._reading.flow(session.buffered)

    def _flush(self) -> None:
        if self.session is not None and self.transport is not None:
            out = self.session.data_to_send()
            if out:
                self.transport.write(out)

    # --- events -----------------------------------------------------------------------

    def _on_hello(self, event: Hello) -> None:
        session = self.session
        assert session is not None
        try:
            if event.lines:
                lines = self.handler.handle_EHLO(self, session.info, session.envelope,
                                                 event.hostname, event.lines)
            else:
                lines = [self.handler.handle_HELO(self, session.info, session.envelope,
                                                  event.hostname)]
        except Exception as error:
            lines = [_exception_reply(self.handler, error)]
        session.reply_lines(lines)

    def _on_mail(self, event: MailFrom) -> None:
        session = self.session
        assert session is not None
        try:
            reply = self.handler.handle_MAIL(self, session.info, session.envelope,
                                             event.address, event.options)
        except Exception as error:
            reply = _exception_reply(self.handler, error)
        session.reply(reply)

    def _on_rcpt(self, event: RcptTo) -> None:
        session = self.session
        assert session is not None
        self._wait_for(self.handler.handle_RCPT(self, session.info, session.envelope,
                                                event.address, event.options))

    def _on_message(self, event: MessageReceived[T]) -> None:
        session = self.session
        assert session is not None
        # A client leaving after the dot must not cancel the queue commit half-way (the
        # message would sit leased, unannounced to delivery): the task is kept apart.
        self._wait_for(self.handler.handle_DATA(self, session.info, event.envelope),
                       keep=True)

    def _on_refused(self, event: MessageRefused) -> None:
        LOG.info("data_refused", client=self._client, reply=str(event.reply))
        self.connections.count_refusal(event.reply)

    def _on_error(self, event: ErrorCounted) -> None:
        """The tarpit (forwarder/tarpit.py): the reply to an error is held back; at
        max_errors the session is closed after that wait."""
        session = self._session()
        if self._tarpit.error(self._client, event.errors, self._pump) and not session.closed:
            session.close_with(replies.TOO_MANY_ERRORS)

    def _on_starttls(self, event: StartTls) -> None:
        assert self.transport is not None and self.connections.tls_context is not None
        self._flush()  # the 220 goes out in clear, before the handshake
        self._wait_for(self._handshake(self.transport, self.connections.tls_context),
                       self._tls_started)

    def _on_closing(self, event: Closing) -> None:
        if event.quit:
            # The client is leaving: free its slot now, not when the close completes, or a
            # client that reconnects at once (a new connection per message, at exactly
            # the per-client cap) would race its own departing session and get 421.
            self.connections.release(self, self._client)
        self._flush()
        self._close()

    def _session(self) -> Session[T]:
        assert self.session is not None
        return self.session

    # --- waiting for a handler --------------------------------------------------------

    def _wait_for(self, work: Awaitable[Any],
                  then: Callable[[Any], None] | None = None, keep: bool = False) -> None:
        """Run `work` as a task, hold input meanwhile, then pass its result to `then` (by
        default: the reply). With `keep`, a client leaving does not cancel it."""
        self._busy = True
        task = asyncio.ensure_future(self._answer(work, then))
        if keep:
            self.connections.keep(task)
        else:
            self._task = task

    async def _answer(self, work: Awaitable[Any], then: Callable[[Any], None] | None) -> None:
        """`work`, then its answer, in the same step of the task: answered from a done
        callback, every RCPT and DATA waited one more turn of the event loop for its reply
        (docs/performance.md, "One session"). A cancelled task (the client left) ends
        here, unanswered."""
        try:
            result = await work
        except Exception as error:  # the handler's bug or fault: a 451, never its text
            failed = _exception_reply(self.handler, error)
            self._done(lambda session: session.reply(failed))
            return
        if then is not None:
            self._done(lambda session: then(result))
        else:
            reply = result if isinstance(result, str) else _bad_reply(result)
            self._done(lambda session: session.reply(reply))

    def _done(self, answer: Callable[[Session[T]], None]) -> None:
        self._task = None
        self._busy = False
        session = self.session
        if session is None or self.transport is None:
            return
        answer(session)
        session.progressed = True
        self._pump()

    # --- STARTTLS ---------------------------------------------------------------------

    async def _handshake(self, transport: asyncio.Transport,
                         context: ssl.SSLContext) -> asyncio.Transport | None:
        # Plaintext that came with or after the command is dropped here, just before the
        # TLS layer takes the transport over (synchronously, within start_tls); from then
        # on, data reaches us only decrypted.
        self._session().discard_input()
        try:
            return await self.loop.start_tls(transport, self, context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            LOG.info("tls_failed", client=self._client, error=type(exc).__name__)
            return None

    def _tls_started(self, transport: asyncio.Transport | None) -> None:
        if transport is None:  # the handshake failed: nothing more can be said in clear
            self._close()
            return
        self.transport = self._reading.transport = transport
        self._session().tls_started(_tls_info(transport))

    # --- deadlines and closing --------------------------------------------------------

    def _timed_out(self) -> None:
        """The command or DATA deadline passed (RFC 5321 4.5.3.2): say so and close."""
        if self.transport is None:
            return
        LOG.info("session_timeout", client=self._client,
                 command=self.session.current if self.session is not None else None)
        self._say_and_close(replies.TIMEOUT)

    def _say_and_close(self, reply: Reply) -> None:
        transport = self.transport
        if transport is None or self.session is None:
            return
        self.session.close_with(reply)
        self._flush()
        transport.close()
        # close() waits to flush; a peer that never reads must not keep the socket.
        self.loop.call_later(ABORT_GRACE, transport.abort)

    def _session_expired(self) -> None:
        """The session lived `session_timeout`: it ends at its next command outside a
        transaction (now, if it is waiting for one), so no client holds a slot for ever."""
        self._lifetime = None
        self._expired = True
        session = self.session
        if (session is not None and not self._busy and self._tarpit.held is None
                and session.between_transactions):
            LOG.info("session_too_long", client=self._client)
            self._say_and_close(replies.SESSION_TOO_LONG)

    def close_if_idle(self) -> None:
        """Shutdown: a session waiting for a command outside a transaction leaves now."""
        session = self.session
        if (session is not None and self.transport is not None and not self._busy
                and session.between_transactions):
            self._say_and_close(replies.SHUTTING_DOWN)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


_DISPATCH: dict[type[Any], Callable[[SmtpProtocol[Any], Any], None]] = {
    Hello: SmtpProtocol._on_hello,
    MailFrom: SmtpProtocol._on_mail,
    RcptTo: SmtpProtocol._on_rcpt,
    MessageReceived: SmtpProtocol._on_message,
    MessageRefused: SmtpProtocol._on_refused,
    ErrorCounted: SmtpProtocol._on_error,
    StartTls: SmtpProtocol._on_starttls,
    Closing: SmtpProtocol._on_closing,
}
