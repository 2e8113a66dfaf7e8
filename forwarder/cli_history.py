"""`forwarder history` and `forwarder send-test`: what became of the mail to one address.

Both read the delivery history the daemon keeps in its queue file (forwarder/history/), so
they answer while it runs, from this node's mail only. `send-test` sends a real message
through the daemon's own SMTP listener on loopback, as a client would, and waits for the
outcome in the history (forwarder/sendtest.py).
"""

from __future__ import annotations

import argparse
import re
import smtplib
import sys
import time
from datetime import datetime
from typing import Any

from forwarder import sendtest
from forwarder.cli_common import CliError, add_command, address_key, emit, one_line
from forwarder.cli_lookup import lookup_summary
from forwarder.cli_status import read_status
from forwarder.config import Settings
from forwarder.control import STATUS_SOCKET
from forwarder.history import reader, store, view
from forwarder.history.store import HistoryUnavailable, MessageView

EXAMPLE = "marie.curie@sigma-clermont.fr"
POLL = 0.2
SMTP_TIMEOUT = 30.0
_SINCE = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_time(text: str, now: float) -> float:
    """`30m`, `12h`, `2d`, `1w` before now, or a local date or date-time in ISO 8601."""
    match = _SINCE.fullmatch(text.strip())
    if match:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).astimezone().timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 30m, 12h, 2d, 1w or a date such as 2026-12-01") from None


def our_address(text: str, settings: Settings) -> str:
    """The directory key of an address of ours (role accounts included), or CliError."""
    return address_key(text, settings, roles=True)


def _matches(m: MessageView | store.RefusalView | store.ReplyView, wanted: str | None) -> bool:
    """`--from`: an envelope sender (with '@'), or a domain matching the envelope sender's
    or the From: field's, subdomains included."""
    if wanted is None:
        return True
    wanted = wanted.lower().strip()
    sender = m.sender.lower()
    if "@" in wanted:
        return sender == wanted
    domains = [sender.rpartition("@")[2]]
    if isinstance(m, MessageView) and m.from_domain:
        domains.append(m.from_domain)
    return any(d == wanted or d.endswith("." + wanted) for d in domains)


def _read(settings: Settings, address: str, since: float) -> reader.Found:
    try:
        conn = store.open_reader(settings.queue_path, settings.busy_timeout)
    except HistoryUnavailable as exc:
        raise CliError(str(exc)) from exc
    try:
        return reader.read_address(conn, address, since, settings.history.subjects)
    finally:
        conn.close()


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    address = our_address(args.address, settings)
    now = time.time()
    since = args.since or 0.0
    messages, refusals, replies = _read(settings, address, since)
    messages = [m for m in messages if _matches(m, args.sender)]
    refusals = [r for r in refusals if _matches(r, args.sender)]
    replies = [r for r in replies if _matches(r, args.sender)]
    summary = lookup_summary(address, settings)
    retention = settings.history.retention_days
    doc = {"address": address, "node": settings.hostname, "now": summary,
           "since": view.iso(since) if since else None, "retention_days": retention,
           "messages": [view.message_doc(m) for m in messages],
           "refusals": [view.refusal_doc(r) for r in refusals],
           "replies": [view.reply_doc(r) for r in replies]}
    kept = (f"kept {retention:g} days" if retention > 0
            else "not kept (history retention_days = 0)")
    text = [f"{address}: now {summary['verdict']}, {summary['reply']}"
            + (f" ({summary['route']} to {', '.join(summary['targets'])})"
               if summary["targets"] else ""),
            *view.lines(messages, refusals, replies, now),
            f"-- {len(messages)} message(s), {len(refusals)} refusal(s) at RCPT"
            + (f", {len(replies)} reply(ies) to notices" if replies else "")
            + (f" since {view.when(since, now)}" if since else "")
            + f"; history {kept}, on this node ({settings.hostname}) only"]
    emit(args, doc, "\n".join(text))
    return 0


# --- send-test --------------------------------------------------------------------------


def _listener(settings: Settings) -> tuple[str, int]:
    """Where the running daemon takes SMTP, from its status socket (the bound port, even
    when the configuration says 0), as a loopback address."""
    doc = read_status(settings.state_dir / STATUS_SOCKET)
    smtp = (doc.get("listening") or {}).get("smtp") or []
    if not smtp:
        raise CliError("the daemon reports no SMTP listener")
    host, _, port = str(smtp[0]).rpartition(":")
    host = host.strip("[]")
    loopback = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    return loopback.get(host, host), int(port)


def _key(settings: Settings) -> bytes:
    path = sendtest.key_path(settings.state_dir)
    try:
        return sendtest.read_key(path)
    except PermissionError as exc:
        raise CliError(f"{path}: permission denied (run as root, as the service user or as "
                       "a member of its group)") from exc
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: cannot read the send-test key ({exc}); it is created "
                       "when the daemon starts") from exc


def _submit(where: tuple[str, int], sender: str, address: str, body: bytes) -> str:
    """Send the message as a client would; its queue id, or CliError with the reply."""
    try:
        with smtplib.SMTP(where[0], where[1], local_hostname="localhost",
                          timeout=SMTP_TIMEOUT) as client:
            client.ehlo()
            code, text = client.mail(sender)
            if code != 250:
                raise CliError(f"MAIL FROM refused: {code} {text.decode(errors='replace')}")
            code, text = client.rcpt(address)
            if code != 250:
                raise CliError(f"refused at RCPT: {code} {text.decode(errors='replace')}")
            code, text = client.data(body)
    except (OSError, smtplib.SMTPException) as exc:
        raise CliError(f"cannot send through {where[0]}:{where[1]}: {exc}") from exc
    reply = text.decode(errors="replace")
    if code != 250:
        raise CliError(f"refused after DATA: {code} {reply}")
    return reply.rsplit(" ", 1)[-1]


def _wait(settings: Settings, address: str, queue_id: str, wait: float,
          sent: float) -> MessageView | None:
    deadline = time.monotonic() + wait
    found = None
    while True:
        try:
            conn = store.open_reader(settings.queue_path, settings.busy_timeout)
            try:
                found = reader.read_message(conn, address, queue_id,
                                            settings.history.subjects, since=sent)
            finally:
                conn.close()
        except HistoryUnavailable as exc:
            raise CliError(str(exc)) from exc
        if (found is not None and view.finished(found)) or time.monotonic() >= deadline:
            return found
        time.sleep(POLL)


def _verdict(found: MessageView | None, queue_id: str, wait: float) -> tuple[int, str]:
    if found is None:
        return 1, f"queued as {queue_id}, but the history has no row for it"
    if view.delivered(found):
        return 0, ""
    if not view.finished(found):
        return 1, f"no outcome within {wait:g} s: still queued (queue id {queue_id})"
    bad = [t for t in found.targets if t.outcome != "delivered"]
    reasons = []
    for t in bad:
        last = t.attempts[-1] if t.attempts else None
        reply, error = view.split_reply(last.reply if last else None)
        reasons.append(f"{t.target} {t.outcome}: {reply or error or 'no attempt'}")
    return 1, "not accepted by every target: " + "; ".join(reasons)


def cmd_send_test(args: argparse.Namespace, settings: Settings) -> int:
    address = our_address(args.address, settings)
    if settings.history.retention_days <= 0:
        raise CliError("send-test reads the outcome from the history, which is off "
                       "([history] retention_days = 0)")
    where = _listener(settings)
    sender = f"postmaster@{settings.domains[0]}"
    sent = time.time()
    body, _ = sendtest.build(_key(settings), address, sender, settings.hostname, sent)
    queue_id = _submit(where, sender, address, body)
    # The rows written from now on: the history is read from there, not from its start.
    found = _wait(settings, address, queue_id, args.wait, sent - reader.CLOCK_SLACK)
    code, reason = _verdict(found, queue_id, args.wait)
    lines = [f"test message sent to {address} through {where[0]}:{where[1]}, "
             f"queued as {queue_id}"]
    if found is not None:
        lines += view.message_lines(found, time.time())
    doc: dict[str, Any] = {"address": address, "queue_id": queue_id, "ok": code == 0,
                           "reason": reason or None,
                           "message": None if found is None else view.message_doc(found)}
    emit(args, doc, "\n".join(lines))
    if code:
        print(f"forwarder: {one_line(reason)}", file=sys.stderr)
    return code


def register(sub: Any) -> None:
    p = add_command(sub, "history", cmd_history,
                    "what became of the mail to one address: each message with its "
                    "delivery attempts and outcome, and the senders refused at RCPT",
                    f"forwarder history {EXAMPLE} --since 2d --from jobteaser.com",
                    json_flag=True)
    p.add_argument("address")
    p.add_argument("--since", metavar="WHEN", type=lambda text: since_time(text, time.time()),
                   help="only since then: 30m, 12h, 2d, 1w, or a date (2026-12-01)")
    p.add_argument("--from", dest="sender", metavar="DOMAIN|ADDRESS",
                   help="only mail from this sender address, or domain (envelope or From:)")
    p = add_command(sub, "send-test", cmd_send_test,
                    "send a test message to one address through the running daemon and "
                    "wait for the outcome (exit 0 only if every target accepted it)",
                    f"forwarder send-test {EXAMPLE} --wait 60", json_flag=True)
    p.add_argument("address")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the outcome (default 60)")
