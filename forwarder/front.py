"""The SMTP front: the session's handler, turning SMTP events into policy calls and replies.

Every recipient is decided at RCPT time (no backscatter), and `250` after DATA is sent only
once the queue has committed and fsync'd the message. Any unexpected error becomes a
`451 4.3.0` through `exception_reply`: no exception text reaches the client and no
transient fault ever becomes a 5xx (DESIGN.md habit 4).
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from forwarder import log, replies
from forwarder.addresses import AddressError, has_control_chars, parse_sender
from forwarder.bodybudget import BODIES_IN_MEMORY, ByteBudget, ContentChecks, head_of, queued_body
from forwarder.checkpolicy import separate_transaction
from forwarder.checks import Checks, Inbound
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.directory import DaemonDirectory
from forwarder.directory.model import DirectoryStale
from forwarder.dsnparams import DsnRequest, RecipientDsn, mail_dsn, options_dict, rcpt_dsn
from forwarder.history.recorder import HistoryRecorder
from forwarder.metrics import Metrics
from forwarder.policy import (
    Accept,
    Consume,
    NeedsLookup,
    NeedsSrsCheck,
    NeedsTokenCheck,
    Refuse,
    Route,
    Verdict,
    classify_recipient,
    count_received_headers,
    decide_account,
    is_automatic,
)
from forwarder.queue import (
    PLAIN,
    Intake,
    MessageFlags,
    NewMessage,
    NewRecipient,
    QueueError,
    body_size,
    new_queue_id,
)
from forwarder.queue.spool import Spool
from forwarder.returnpath import ReturnPath
from forwarder.smtpbody import Spilled
from forwarder.smtpevents import Envelope, SessionInfo, TlsInfo
from forwarder.srs import SrsError
from forwarder.tokens import TokenError, check_token, parse_token

LOG = log.get("forwarder.smtp")
NO_RECIPIENT_DSN = RecipientDsn()
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


@dataclass(frozen=True)
class Accepted:
    """An accepted RCPT: what the client said, and where the copies go (or, for a
    confirm+ or refuse+ address, what the message does once complete)."""

    orig_rcpt: str
    verdict: Accept | Consume
    dsn: RecipientDsn = NO_RECIPIENT_DSN


@functools.lru_cache(maxsize=4)
def _date_field(second: int) -> str:
    """RFC 5322 3.3 date-time, computed once per second rather than once per message."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def protocol_name(esmtp: bool, tls: bool, smtputf8: bool) -> str:
    """The `with` of our Received field: RFC 3848 (ESMTP, ESMTPS; no AUTH here, so never
    ESMTPA/ESMTPSA) and RFC 6531 3.7.3 (UTF8SMTP, UTF8SMTPS for SMTPUTF8 transactions)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + "S" if tls else base


def address_literal(ip: str) -> str:
    """The client's address as RFC 5321 4.1.3 writes it: `[192.0.2.1]`, `[IPv6:2001:db8::1]`."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def received_header(
    helo: str | None, peer_ip: str, hostname: str, queue_id: str, rcpt: str | None,
    esmtp: bool, now: float, tls: TlsInfo | None = None, smtputf8: bool = False,
) -> bytes:
    """Our trace field (RFC 5321 4.4). Client-supplied text is reduced to a safe alphabet,
    so a HELO name can never start a new header line or break the field's syntax."""
    helo_text = _HELO_SAFE.sub("?", helo or "unknown")[:255]
    ip = address_literal(_HELO_SAFE.sub("?", peer_ip))
    lines = [f"Received: from {helo_text} ({ip})"]
    if tls is not None:  # as Postfix writes it, so the hop's encryption is on record
        lines.append(f"\t(using {_HELO_SAFE.sub('?', tls.version)} with cipher "
                     f"{_HELO_SAFE.sub('?', tls.cipher)})")
    protocol = protocol_name(esmtp, tls is not None, smtputf8)
    lines.append(f"\tby {hostname} (forwarder) with {protocol} id {queue_id}")
    date = _date_field(int(now))
    if rcpt is not None:
        lines.append(f"\tfor <{_HELO_SAFE.sub('?', rcpt) if has_control_chars(rcpt) else rcpt}>;"
                     f" {date}")
    else:
        lines[-1] += f"; {date}"
    # A UTF-8 recipient stays UTF-8 in an SMTPUTF8 message (RFC 6532); elsewhere, "?".
    return ("\r\n".join(lines) + "\r\n").encode(
        "utf-8" if smtputf8 else "ascii", "replace")


def _forwarded_fields(session: SessionInfo) -> dict[str, str]:
    """For logs: the relay's client as XFORWARD gave it (`orig_client`, `orig_helo`)."""
    forwarded = session.forwarded
    if forwarded is None or forwarded.addr is None:
        return {}
    return {"orig_client": forwarded.addr, "orig_helo": forwarded.helo or ""}


def _log_queued(session: SessionInfo, message: NewMessage, checked: dict[str, Any]) -> None:
    """The `queued` log line of a message just committed. The client's TLS always; the
    cipher, 8BITMIME and SMTPUTF8 only when there is one to say (each field costs on
    every message: docs/performance.md). Formatted in the next turn of the loop, after the
    `250` is written: 60-80 us of structlog that delayed every reply ("One session")."""
    tls = session.tls
    extra: dict[str, object] = {} if tls is None else {"cipher": tls.cipher}
    if session.forwarded is not None:
        extra.update(_forwarded_fields(session))
    if message.flags is not PLAIN:
        extra.update(body="8BITMIME" if message.flags.eight_bit else "7BIT",
                     smtputf8=message.flags.smtputf8)
    fields = {"queue_id": message.id, "size": body_size(message.body),
              "client": message.client, "from": message.sender,
              "to": [r.rcpt for r in message.recipients],
              "orig_to": [r.orig_rcpt for r in message.recipients],
              "route": [r.route.value for r in message.recipients],
              "tls": tls.version if tls else "none", **extra, **checked}
    asyncio.get_running_loop().call_soon(_queued_line, fields)


def _queued_line(fields: dict[str, Any]) -> None:
    LOG.info("queued", **fields)


def message_flags(envelope: Envelope[Accepted], content: bytes | Spilled) -> MessageFlags:
    """What delivery must know about the message: the DSN request, SMTPUTF8, and whether
    it has 8-bit octets (what the body is, not what BODY= said: a client that declares
    nothing and sends 8-bit still gets BODY=8BITMIME or a 7-bit conversion onward)."""
    eight_bit = content.eight_bit if isinstance(content, Spilled) else not content.isascii()
    if not envelope.mail_options:
        return PLAIN if not eight_bit else MessageFlags(eight_bit=True)
    dsn = mail_dsn(options_dict(envelope.mail_options))
    return MessageFlags(dsn if isinstance(dsn, DsnRequest) else DsnRequest(),
                        envelope.smtp_utf8, eight_bit)


class Front:
    """The session's handler (forwarder/session.py `Handler`), with aiosmtpd's hook names and
    arguments. One instance serves every session. HELO, EHLO and MAIL decide at once;
    RCPT (the directory) and DATA (the queue) wait, and are coroutines."""

    def __init__(
        self,
        settings: Settings,
        directory: DaemonDirectory,
        intake: Intake,
        clock: Clock,
        return_path: ReturnPath,
        metrics: Metrics,
        checks: Checks | None = None,
        spool: Spool | None = None,
        history: HistoryRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        # The disk is short (the space reserve is gone, forwarder/queue/reserve.py): new
        # mail is refused at MAIL with 452 4.3.1 until it is back.
        self.space_short = False
        self.directory = directory
        self.intake = intake
        self.clock = clock
        self.return_path = return_path
        self.metrics = metrics
        # The notices' token secrets, the first signing (read again on SIGHUP).
        self.token_secrets = directory.token_secrets()
        self.checks = checks
        # Big bodies read back into memory for the checks, at most this many octets at once.
        self.content_checks = ContentChecks(checks, spool, ByteBudget(BODIES_IN_MEMORY))
        self.history = history  # keeps the refusals of our addresses (forwarder/history/)

    def reload_token_secrets(self) -> None:
        """SIGHUP: a rotation done with `forwarder token rotate` (raises OSError or
        ValueError if the file cannot be read: the reload is then refused)."""
        self.token_secrets = self.directory.token_secrets()

    # --- greeting --------------------------------------------------------------------

    def handle_HELO(self, server: object, session: SessionInfo, envelope: Envelope[Accepted],
                    hostname: str) -> str:
        if has_control_chars(hostname):
            return str(replies.BAD_ARGUMENT)
        return f"250 {self.settings.hostname}"

    def handle_EHLO(self, server: object, session: SessionInfo, envelope: Envelope[Accepted],
                    hostname: str, responses: list[str]) -> list[str]:
        if has_control_chars(hostname):
            return [str(replies.BAD_ARGUMENT)]
        return responses

    # --- envelope --------------------------------------------------------------------

    def handle_MAIL(self, server: object, session: SessionInfo, envelope: Envelope[Accepted],
                    address: str, mail_options: list[str]) -> str:
        if self.space_short:
            # RFC 5321 4.5.3.1.10 / RFC 3463 4.3.1: the client keeps the message and tries
            # later; what is queued keeps the space it needs to be delivered.
            self.metrics.message_refused("no_space")
            return str(replies.QUEUE_FULL)
        try:
            # Parsed once here; DATA queues this normalised form.
            envelope.sender = parse_sender(address)
        except AddressError:
            return str(replies.MAIL_BAD_SYNTAX)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.smtp_utf8 = "SMTPUTF8" in mail_options
        return str(replies.MAIL_OK)

    async def handle_RCPT(self, server: object, session: SessionInfo,
                          envelope: Envelope[Accepted], address: str,
                          rcpt_options: list[str]) -> str:
        accepted = envelope.accepted
        if len(accepted) >= self.settings.limits.max_recipients:
            # RFC 5321 4.5.3.1.10: 452 past the limit; the client sends the rest later.
            return str(replies.RCPT_TOO_MANY)
        verdict = await self._verdict(address)
        if self._needs_own_transaction(accepted, verdict):
            verdict = Refuse(replies.RCPT_SEPARATE_TRANSACTION, "separate_transaction")
        self.metrics.rcpt_verdict(verdict.reason)
        if isinstance(verdict, Refuse):
            LOG.info("rcpt", client=session.client, to=address, verdict="refused",
                     reason=verdict.reason, reply=verdict.reply.code)
            if self.history is not None:
                self.history.refused(address, session.origin, envelope.sender, verdict)
            return verdict.reply.at(address)
        # An accepted recipient is logged once, in the "queued" line (with its route): a
        # line per RCPT as well was a fifth of the logging, itself 10-18 % of the CPU
        # (docs/performance.md). Refusals are logged here, as nothing else records them.
        dsn = rcpt_dsn(options_dict(rcpt_options)) if rcpt_options else NO_RECIPIENT_DSN
        accepted.append(Accepted(address, verdict,
                                 dsn if isinstance(dsn, RecipientDsn) else NO_RECIPIENT_DSN))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RCPT_OK)

    def _needs_own_transaction(self, accepted: list[Accepted], verdict: Verdict) -> bool:
        """With a spam filter, postmaster mail (never refused as spam) and other mail do
        not share a transaction (forwarder/checkpolicy.py)."""
        if (self.checks is None or not self.checks.splits_roles or not accepted
                or not isinstance(verdict, Accept)):
            return False
        first = accepted[0].verdict  # a confirm+/refuse+ one counts as other mail
        return separate_transaction(
            isinstance(first, Accept) and first.route is Route.POSTMASTER,
            verdict.route is Route.POSTMASTER)

    async def _verdict(self, address: str) -> Verdict:
        first = classify_recipient(address, self.settings.domains, self.settings.postmaster,
                                   self.return_path.domain)
        if isinstance(first, NeedsSrsCheck):
            return await self._srs_verdict(str(first.address))
        if isinstance(first, NeedsTokenCheck):
            return await self._token_verdict(address, first)
        if not isinstance(first, NeedsLookup):
            return first
        try:
            account = await self.directory.lookup(first.address.key)
        except DirectoryStale:
            return Refuse(replies.DIRECTORY_STALE, "directory_stale")
        except (sqlite3.Error, OSError) as exc:
            # A locked or unreadable directory defers the mail (PRODUCT.md): never a 5xx.
            LOG.error("directory_unavailable", error=type(exc).__name__, detail=str(exc))
            return Refuse(replies.RCPT_TEMPFAIL, "directory_unavailable")
        return decide_account(account, self.settings.domains,
                              self.settings.mailbox_host is not None)

    async def _srs_verdict(self, address: str) -> Verdict:
        """A bounce to one of our SRS addresses goes back to the original sender, once its
        hash, age and secret check out; anything else is refused, so the return path is
        never an open relay."""
        try:
            original = await self.return_path.reverse(address)
        except SrsError as exc:
            LOG.info("srs_refused", to=address, reason=exc.reason.value)
            return Refuse(replies.RCPT_BAD_SRS, "srs_invalid")
        except (sqlite3.Error, OSError):
            return Refuse(replies.RCPT_TEMPFAIL, "srs_store_unavailable")
        return Accept(Route.SRS_RETURN, original, "srs_return")

    async def _token_verdict(self, address: str, check: NeedsTokenCheck) -> Verdict:
        """A reply to a notice: checked like an SRS address (tokens.py), against the
        directory's record of the target it names. It takes effect only once the message
        is complete (handle_DATA): an RCPT probe (a gateway's recipient verification, a
        callout) must not confirm or refuse anything."""
        try:
            claim = parse_token(check.kind, check.token)
            binding = await self.directory.binding(claim.target_id)
            check_token(claim, binding, self.token_secrets, self.clock.now())
        except TokenError as exc:
            LOG.info("token_refused", to=address, reason=exc.reason.value)
            return Refuse(replies.RCPT_BAD_TOKEN, "token_invalid")
        except DirectoryStale:
            return Refuse(replies.DIRECTORY_STALE, "directory_stale")
        except (sqlite3.Error, OSError) as exc:
            LOG.error("directory_unavailable", error=type(exc).__name__, detail=str(exc))
            return Refuse(replies.RCPT_TEMPFAIL, "directory_unavailable")
        assert binding is not None
        return Consume(check.kind, claim.target_id, binding.account, binding.target,
                       check.kind.value)

    # --- data ------------------------------------------------------------------------

    async def handle_DATA(self, server: object, session: SessionInfo,
                          envelope: Envelope[Accepted]) -> str:
        accepted = envelope.accepted
        content = envelope.content
        if not accepted or content is None:
            return str(replies.NO_VALID_RECIPIENTS)
        try:
            return await self._data(session, envelope, accepted, content)
        finally:
            if isinstance(content, Spilled):
                # Queued: renamed into the spool already; anything else: the file goes.
                content.spill.discard()

    async def _data(self, session: SessionInfo, envelope: Envelope[Accepted],
                    accepted: list[Accepted], content: bytes | Spilled) -> str:
        if count_received_headers(head_of(content)) > self.settings.limits.max_received_headers:
            # RFC 5321 6.3: a message that has passed too many hops is in a loop.
            LOG.warning("refused", client=session.client, reason="too_many_hops")
            self.metrics.message_refused("loop")
            return str(replies.TOO_MANY_HOPS)
        consumed = [a.verdict for a in accepted if isinstance(a.verdict, Consume)]
        if consumed:
            failed = await self._consume(session, envelope.sender, consumed, content)
            if failed is not None:
                return failed
            accepted = [a for a in accepted if isinstance(a.verdict, Accept)]
            if not accepted:
                return str(replies.CONSUMED)
        now = self.clock.now()
        queue_id = new_queue_id(now)
        prefix, checked = b"", dict[str, Any]()
        if self.checks is not None and self.checks.active:
            # Authentication, spam and rate limits, once per message, before the 250.
            result, content = await self.content_checks.evaluate(
                functools.partial(self._inbound, session, envelope, accepted, queue_id), content)
            if result.decision.reply is not None:
                LOG.warning("refused", client=session.client, reason=result.decision.reason,
                            reply=result.decision.reply.code, **{"from": envelope.sender},
                            **result.fields, **_forwarded_fields(session))
                self.metrics.message_refused(result.decision.reason)
                return str(result.decision.reply)
            prefix, checked = result.prefix, result.fields
        message = self._message(session, envelope, accepted, content, queue_id, now, prefix,
                                checked)
        try:
            await self.intake.accept(message)
        except QueueError as exc:
            LOG.error("queue_write_failed", client=session.client, error=str(exc),
                      no_space=exc.no_space)
            self.metrics.message_refused("no_space" if exc.no_space else "queue_error")
            return str(replies.QUEUE_FULL if exc.no_space else replies.QUEUE_UNAVAILABLE)
        self.metrics.message_accepted(content.size if isinstance(content, Spilled)
                                      else len(content))
        _log_queued(session, message, checked)
        return replies.queued(queue_id)

    async def _consume(self, session: SessionInfo, sender: str, uses: list[Consume],
                       content: bytes | Spilled) -> str | None:
        """Apply the confirm+ and refuse+ addresses of a complete message (each once) and
        audit them; the message itself is kept nowhere. None, or a 451 if the directory
        cannot take the write (the client retries; applying again changes nothing)."""
        automatic = is_automatic(sender, head_of(content))
        now = self.clock.now()
        done: set[tuple[int, str]] = set()
        for use in uses:
            if (use.target_id, use.kind.value) in done:
                continue
            done.add((use.target_id, use.kind.value))
            try:
                result = await self.directory.consume(use, session.client, sender,
                                                      automatic, now)
            except (sqlite3.Error, OSError) as exc:
                LOG.error("directory_write_failed", error=type(exc).__name__,
                          detail=str(exc), client=session.client)
                return str(replies.DIRECTORY_WRITE_FAILED)
            LOG.info("token_consumed", client=session.client, **{"from": sender},
                     kind=use.kind.value, account=result.account, target=result.target,
                     state=None if result.after is None else result.after.value,
                     ignored=result.ignored)
            if self.history is not None:
                self.history.replied(use, result, session.origin, sender)
        return None

    def _inbound(self, session: SessionInfo, envelope: Envelope[Accepted],
                 accepted: list[Accepted], queue_id: str, content: bytes) -> Inbound:
        """The message as the inbound checks see it, for the recipients it is queued for
        (a confirm+ or refuse+ one has been consumed already)."""
        # Behind a trusted relay that sent XFORWARD, its client is the one judged.
        return Inbound(queue_id, session.origin, session.origin_helo, envelope.sender,
                       [a.orig_rcpt for a in accepted],
                       all(isinstance(a.verdict, Accept) and a.verdict.route is Route.POSTMASTER
                           for a in accepted),
                       content)

    def _message(
        self, session: SessionInfo, envelope: Envelope[Accepted], accepted: list[Accepted],
        content: bytes | Spilled, queue_id: str, now: float, prefix: bytes = b"",
        checked: dict[str, Any] | None = None,
    ) -> NewMessage:
        seen: set[tuple[str, str]] = set()
        recipients: list[NewRecipient] = []
        for item in accepted:
            verdict = item.verdict
            assert isinstance(verdict, Accept)
            for target in verdict.targets:
                key = (target.lower(), verdict.route.value)
                if key not in seen:
                    seen.add(key)
                    recipients.append(NewRecipient(item.orig_rcpt, target, verdict.route,
                                                   item.dsn))
        single = accepted[0].orig_rcpt if len(accepted) == 1 else None
        header = received_header(session.host_name, session.client, self.settings.hostname,
                                 queue_id, single, session.extended_smtp, now, session.tls,
                                 envelope.smtp_utf8)
        # The checks' fields (Authentication-Results, X-Spam-*) go on top, above our trace
        # field (RFC 8601 5: at the top of the header section).
        # The checks' verdicts go to the delivery history too (forwarder/history/).
        return NewMessage(queue_id, envelope.sender, now, session.client,
                          queued_body(prefix + header, content),
                          tuple(recipients), message_flags(envelope, content), checked or {})

    def exception_reply(self, error: BaseException) -> str:
        LOG.error("session_error", error=type(error).__name__, exc_info=error)
        return str(replies.LOCAL_ERROR)

