"""`forwarder lookup ADDRESS`: what mail to an address would get now, and why (the same
decision as the daemon's RCPT, read-only)."""

from __future__ import annotations

import argparse
import sqlite3
import time
from typing import Any

from forwarder import replies
from forwarder.cli_common import add_command, emit, one_line, open_directory
from forwarder.cli_ops import srs_reverse
from forwarder.cli_targets import target_doc, target_lines
from forwarder.config import Settings
from forwarder.directory import AccountRow, Directory, token_secrets_path
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
    decide_account,
)
from forwarder.srs import SrsError
from forwarder.srsstore import load_secrets
from forwarder.tokens import TokenError, check_token, parse_token

Found = tuple[Verdict, AccountRow | None, str | None]


def _srs(settings: Settings, address: str) -> Found:
    try:
        original = srs_reverse(settings, address)
    except SrsError as exc:
        return Refuse(replies.RCPT_BAD_SRS, "srs_invalid"), None, exc.reason.value
    except (OSError, ValueError, sqlite3.Error) as exc:
        return Refuse(replies.RCPT_TEMPFAIL, "srs_store_unavailable"), None, str(exc)
    return Accept(Route.SRS_RETURN, original, "srs_return"), None, None


def _token(directory: Directory, settings: Settings, check: NeedsTokenCheck) -> Found:
    """As the daemon checks a confirm+ or refuse+ address; a missing secrets file means
    no token of ours can verify (the daemon would start with a fresh secret)."""
    path = token_secrets_path(settings.state_dir)
    try:
        claim = parse_token(check.kind, check.token)
        binding = directory.binding(claim.target_id)
        if settings.directory_url:
            secrets = directory.token_secrets()
        else:
            secrets = load_secrets(path, "token") if path.exists() else []
        check_token(claim, binding, secrets, time.time())
    except TokenError as exc:
        return Refuse(replies.RCPT_BAD_TOKEN, "token_invalid"), None, exc.reason.value
    assert binding is not None
    row = directory.get(binding.account)
    verdict = Consume(check.kind, claim.target_id, binding.account, binding.target,
                      check.kind.value)
    return verdict, row, f"a message here would {check.kind.value} {binding.target} " \
                         f"for {binding.account}"


def _verdict(address: str, settings: Settings) -> Found:
    """What the daemon's RCPT handler would decide now (front.py), with the account row
    and a detail for the admin."""
    first = classify_recipient(address, settings.domains, settings.postmaster,
                               settings.effective_srs_domain)
    if isinstance(first, NeedsSrsCheck):
        return _srs(settings, str(first.address))
    if not isinstance(first, NeedsLookup | NeedsTokenCheck):
        return first, None, None
    try:
        directory = open_directory(settings)
        try:
            if isinstance(first, NeedsTokenCheck):
                return _token(directory, settings, first)
            row = directory.get(first.address.key)
        finally:
            directory.close()
    except (sqlite3.Error, OSError) as exc:
        return Refuse(replies.RCPT_TEMPFAIL, "directory_unavailable"), None, str(exc)
    account = None if row is None else row.account
    return decide_account(account, settings.domains, settings.mailbox_host is not None), \
        row, None


def _next_hop(verdict: Accept, settings: Settings) -> str:
    """Where delivery would connect (delivery.MailRouter), without resolving anything."""
    if verdict.route is Route.MAILBOX:
        return f"mailbox host {settings.mailbox_host}"
    if settings.smarthost is not None:
        return f"smarthost {settings.smarthost}"
    return "MX of " + ", ".join(sorted({t.rpartition("@")[2] for t in verdict.targets}))


def cmd_lookup(args: argparse.Namespace, settings: Settings) -> int:
    verdict, row, detail = _verdict(args.address, settings)
    doc: dict[str, Any] = {
        "address": args.address, "reason": verdict.reason, "detail": detail,
        "account": None if row is None else
        {"address": row.address, "state": row.state.value,
         "targets": [target_doc(t) for t in row.targets]},
        "route": None, "target": None, "targets": [], "next_hop": None}
    if isinstance(verdict, Refuse):
        kind = "deferred" if verdict.reply.is_temporary else "refused"
        doc.update(verdict=kind, reply=verdict.reply.at(args.address))
    elif isinstance(verdict, Consume):
        doc.update(verdict="consumed", reply=str(replies.RCPT_OK))
    else:
        doc.update(verdict="accepted", reply=str(replies.RCPT_OK), route=verdict.route.value,
                   target=verdict.target, targets=list(verdict.targets),
                   next_hop=_next_hop(verdict, settings))
    text = _lookup_text(doc)
    if row is not None:
        text += "\n" + "\n".join(target_lines(row)) if row.targets else ""
    emit(args, doc, text)
    return 0


def lookup_summary(address: str, settings: Settings) -> dict[str, Any]:
    """What mail to `address` gets now, in short (`forwarder history`'s first line)."""
    verdict, _, _ = _verdict(address, settings)
    if isinstance(verdict, Refuse):
        return {"verdict": "deferred" if verdict.reply.is_temporary else "refused",
                "reason": verdict.reason, "reply": verdict.reply.at(address), "route": None,
                "target": None, "targets": []}
    if isinstance(verdict, Consume):
        return {"verdict": "consumed", "reason": verdict.reason,
                "reply": str(replies.RCPT_OK), "route": None, "target": None, "targets": []}
    return {"verdict": "accepted", "reason": verdict.reason, "reply": str(replies.RCPT_OK),
            "route": verdict.route.value, "target": verdict.target,
            "targets": list(verdict.targets)}


def _lookup_text(doc: dict[str, Any]) -> str:
    lines = [f"{one_line(doc['address'])}: {doc['verdict']} ({doc['reason']})",
             f"reply: {doc['reply']}"]
    if doc["account"] is not None:
        account = doc["account"]
        count = len(account["targets"])
        lines.append(f"account: {account['address']} {account['state']}, "
                     f"{count or 'no'} target(s)")
    if doc["detail"]:
        lines.append(f"detail: {one_line(doc['detail'])}")
    if doc["route"]:
        srs = " (SRS reverse of the address)" if doc["route"] == Route.SRS_RETURN else ""
        lines.append(f"route: {doc['route']} -> {', '.join(doc['targets'])}{srs} via "
                     f"{doc['next_hop']}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = add_command(sub, "lookup", cmd_lookup,
                    "what mail to ADDRESS would get now, and why (any address)",
                    "forwarder lookup marie.curie@sigma-clermont.fr", json_flag=True)
    p.add_argument("address")
    # The same overrides as `serve`, to ask what a daemon started with them would say.
    p.add_argument("--smarthost", metavar="HOST:PORT", help="as for serve")
    p.add_argument("--mailbox-host", metavar="HOST:PORT", help="as for serve")
