"""Turning failed or delayed recipients into a DSN queued for the original sender.

The DSN (RFC 3464, built by dsn.py) goes from the null sender to the envelope sender,
through the same queue as any mail. Never one for a null sender, never one for a bounce.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from forwarder.config import Settings
from forwarder.dsn import Action, RecipientStatus, build_dsn, is_bounce, is_null_sender
from forwarder.dsnparams import RecipientDsn
from forwarder.policy import Route
from forwarder.queue import (
    Job,
    MessageFlags,
    NewMessage,
    NewRecipient,
    RecipientJob,
    Result,
    new_queue_id,
)

__all__ = ["Action", "make_dsn", "should_report"]
# Our own DSNs ask for no DSN about themselves (RFC 3461 5.2.2: never a DSN of a DSN).
_NEVER = RecipientDsn(notify="NEVER")
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "relayed": "2.0.0"}


# The Content-Type field and its continuation lines (RFC 5322 2.2.3 folding).
_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                           re.IGNORECASE | re.MULTILINE)


def _header_block(head: bytes) -> bytes:
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[: end + 4]


def should_report(sender: str, head: bytes) -> bool:
    """Whether a failure of this message is reported, from its first octets (`head`): only
    its Content-Type is read (is it a DSN itself?), not every header field, so the cost
    does not grow with the header section."""
    if is_null_sender(sender):
        return False
    found = _CONTENT_TYPE.search(_header_block(head))
    fields = [] if found is None else [
        ("Content-Type", " ".join(found[1].decode("ascii", "replace").split()))]
    return not is_bounce(sender, fields)


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _status(rcpt: RecipientJob, result: Result, action: Action,
            retry_until: datetime | None) -> RecipientStatus:
    relay = result.remote_mta
    return RecipientStatus(
        final_recipient=rcpt.rcpt,
        original_recipient=rcpt.orig_rcpt,
        orcpt=rcpt.dsn.orcpt,
        action=action,
        status=result.dsn_status or _DEFAULT_STATUS[action],
        remote_mta=relay.split("[", 1)[0] if relay else None,
        diagnostic_code=result.error,
        last_attempt_date=_when(result.attempted_at),
        will_retry_until=retry_until,
    )


def report_to(settings: Settings, job: Job) -> tuple[str, Route]:
    """Where a DSN about `job` goes: the original sender, except for our own notices to
    redirect targets, whose DSNs go to the admin address (`postmaster`), so that the
    school hears of a target that bounced (their route tells them apart)."""
    if job.recipients and all(r.route is Route.NOTICE for r in job.recipients):
        return settings.postmaster or job.sender, Route.NOTICE_BOUNCE
    return job.sender, Route.BOUNCE


def make_dsn(
    settings: Settings, job: Job, body: bytes, action: Action,
    chosen: Sequence[tuple[RecipientJob, Result]], now: float,
) -> NewMessage:
    """The DSN, queued from the null sender to the original sender, honouring the
    sender's RET and ENVID (RFC 3461 4.3, 4.4). `body`: the message's first octets (its
    header section or a bounded prefix of it), or the whole message when RET=FULL asks
    for it and it is small enough to be returned (`dsn.MAX_RETURNED_MESSAGE`)."""
    until = (_when(job.arrived_at + settings.delivery.queue_lifetime)
             if action == "delayed" else None)
    dsn = build_dsn(
        reporting_mta=settings.hostname,
        original_sender=job.sender,
        arrival_date=_when(job.arrived_at),
        original_message=body,
        recipients=[_status(rcpt, result, action, until) for rcpt, result in chosen],
        from_address=f"MAILER-DAEMON@{settings.hostname}",
        message_id_domain=settings.hostname,
        now=_when(now),
        envid=job.flags.dsn.envid,
        return_full=job.flags.dsn.ret == "FULL",
    )
    to, route = report_to(settings, job)
    utf8 = not to.isascii()  # RFC 6531: to a UTF-8 address only with SMTPUTF8
    flags = MessageFlags(smtputf8=utf8, eight_bit=not dsn.isascii())
    return NewMessage(new_queue_id(now), "", now, "", dsn,
                      (NewRecipient(to, to, route, _NEVER),), flags)
