"""What the account commands share about redirect targets: validating them when declared,
showing them (state and why), and queueing the notices a declaration owes."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from forwarder.addresses import AddressError
from forwarder.cli_common import CliError, iso
from forwarder.config import Settings
from forwarder.directory import AccountRow, AdminDirectory, Declared, TargetRow
from forwarder.directory.model import ADMIN_NOTICE_GRACE
from forwarder.notices import declared_notice, queue_notices
from forwarder.policy import AccountState, Refuse, decide_account
from forwarder.queue import QueueError
from forwarder.redirects import check_domains, check_target, target_domain


def target_doc(row: TargetRow) -> dict[str, Any]:
    health = row.health
    return {"target": row.target, "state": row.state.value, "why": row.why,
            "declared_at": iso(row.declared_at), "changed_at": iso(row.changed_at),
            "failures": health.failures, "first_failure": iso(health.first_failure),
            "last_failure": iso(health.last_failure), "last_error": row.last_error,
            "last_success": iso(health.last_success)}


def account_doc(row: AccountRow) -> dict[str, Any]:
    return {"address": row.address, "state": row.state.value,
            "targets": [target_doc(t) for t in row.targets],
            "created_at": iso(row.created_at), "updated_at": iso(row.updated_at)}


def targets_text(row: AccountRow) -> str:
    """`t1 (confirmed), t2 (pending)`, or `-`: one line per account in a listing."""
    return ", ".join(f"{t.target} ({t.state.value})" for t in row.targets) or "-"


def account_line(row: AccountRow) -> str:
    return f"{row.address}\t{row.state.value}\t{targets_text(row)}"


def target_lines(row: AccountRow) -> list[str]:
    """Each target on a line of its own, with its state and why it is in it."""
    lines = []
    for number, target in enumerate(row.targets, 1):
        lines.append(f"  target {number}: {target.target}  {target.state.value}: {target.why}")
        health = target.health
        if health.failures:
            lines.append(f"    {health.failures} mailbox failure(s) since "
                         f"{iso(health.first_failure)}; last: {target.last_error}")
    return lines


def mail_now(row: AccountRow, settings: Settings) -> str:
    """What mail to the account gets now, in the admin's words (as RCPT would decide)."""
    if row.state is AccountState.ACTIVE:
        return "mail goes to the school mailbox"
    verdict = decide_account(row.account, settings.domains, True)
    if isinstance(verdict, Refuse):
        return f"mail is refused ({verdict.reply.at(row.address)})"
    return "mail is forwarded to " + ", ".join(verdict.targets)


def validated_targets(texts: Sequence[str], args: argparse.Namespace, settings: Settings,
                      known: Sequence[str] = ()) -> list[str]:
    """The targets normalised, or CliError: syntax first, then (unless --no-dns-check)
    DNS, once per domain, for those not already declared (`known`)."""
    targets = []
    for text in texts:
        try:
            targets.append(check_target(text, settings.domains))
        except AddressError as exc:
            raise CliError(f"redirect target {text!r} refused: {exc}") from exc
    if not args.no_dns_check:
        new = [t for t in targets if t not in known]
        problems = check_domains({target_domain(t) for t in new}, settings, args.dns_timeout)
        for target in new:
            found = problems.get(target_domain(target))
            if found is not None:
                verb = "not checked" if found.temporary else "refused"
                raise CliError(f"redirect target {target} {verb}: {found.reason}")
    return targets


def send_notices(settings: Settings, directory: AdminDirectory,
                 declared: Sequence[Declared]) -> int:
    """Queue the notices a declaration owes, for the daemon to deliver; return how many.
    Should the queue refuse them, they stay owed in the directory and the daemon sends
    them itself a few minutes later (ADMIN_NOTICE_GRACE): nothing more to do."""
    if not declared:
        return 0
    now = time.time()
    secret = directory.token_secrets()[0]
    messages = [declared_notice(settings, item, secret, now) for item in declared]
    try:
        queue_notices(settings, messages)
    except (sqlite3.Error, OSError, QueueError) as exc:
        print(f"forwarder: warning: the notice(s) could not be queued now ({exc}); the "
              f"daemon will send them within {ADMIN_NOTICE_GRACE / 60:.0f} minutes",
              file=sys.stderr)
        return 0
    directory.notices_sent([item.target_id for item in declared])
    return len(messages)
