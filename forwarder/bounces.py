"""Turning failed or delayed recipients into a DSN queued for the original sender.

The DSN (RFC 3464, built by dsn.py) goes from the null sender to the envelope sender,
through the same queue as any mail. Never one for a null sender, never one for a bounce.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Literal

from forwarder.config import Settings
from forwarder.dsn import RecipientStatus, build_dsn, is_bounce
from forwarder.policy import Route
from forwarder.queue import Job, NewMessage, NewRecipient, RecipientJob, Result, new_queue_id


def _header_block(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 4]


def should_report(sender: str, body: bytes) -> bool:
    headers = BytesHeaderParser(policy=compat32).parsebytes(_header_block(body))
    return not is_bounce(sender, headers)


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _status(rcpt: RecipientJob, result: Result, action: Literal["failed", "delayed"],
            retry_until: datetime | None) -> RecipientStatus:
    relay = result.remote_mta
    return RecipientStatus(
        final_recipient=rcpt.rcpt,
        original_recipient=rcpt.orig_rcpt,
        action=action,
        status=result.dsn_status or ("5.0.0" if action == "failed" else "4.0.0"),
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
    settings: Settings, job: Job, body: bytes, action: Literal["failed", "delayed"],
    chosen: Sequence[tuple[RecipientJob, Result]], now: float,
) -> NewMessage:
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
    )
    to, route = report_to(settings, job)
    return NewMessage(new_queue_id(now), "", now, "", dsn, (NewRecipient(to, to, route),))
