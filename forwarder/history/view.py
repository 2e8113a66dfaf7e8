"""The history as the help desk reads it: lines to read aloud, and the same as JSON.

Times are local, with the date ("03 Dec 10:02"; the year too when it is not this year's);
in JSON, ISO 8601 with the local offset. Pure: no database, no clock (`now` is passed).
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo
from typing import Any

from forwarder.history.store import (
    QUEUED,
    AttemptView,
    MessageView,
    RefusalView,
    ReplyView,
    TargetView,
)

INDENT = "    "
# Our notices to a graduate's targets (forwarder/notices.py), as the help desk names them.
NOTICES = {"confirm": "confirmation notice (asks the target to confirm or refuse)",
           "failing": "notice that another target is failing"}
# What strangers wrote (a Message-ID, a domain, a reply) is stored as it came, cut to size;
# a control character is shown as "?" so it never reaches the help desk's terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(line: str) -> str:
    return _CONTROL.sub("?", line)


def local(ts: float, tz: tzinfo | None = None) -> datetime:
    return datetime.fromtimestamp(ts, tz).astimezone(tz)


def when(ts: float, now: float, tz: tzinfo | None = None) -> str:
    """`03 Dec 10:02`, with the year if it is not the current one."""
    moment = local(ts, tz)
    year = "" if moment.year == local(now, tz).year else f" {moment.year}"
    return f"{moment.day:02d} {moment.strftime('%b')}{year} {moment:%H:%M}"


def clock_time(ts: float, day_of: float, now: float, tz: tzinfo | None = None) -> str:
    """`10:02:04` on the day of `day_of`, else the date too."""
    moment, base = local(ts, tz), local(day_of, tz)
    if moment.date() == base.date():
        return f"{moment:%H:%M:%S}"
    return f"{when(ts, now, tz)}:{moment:%S}"


def iso(ts: float | None, tz: tzinfo | None = None) -> str | None:
    return None if ts is None else local(ts, tz).isoformat(timespec="seconds")


def split_reply(diagnostic: str | None) -> tuple[str | None, str | None]:
    """(the remote SMTP reply, or our own reason when there was none), from the RFC 3464
    diagnostic form delivery records: `smtp; 250 2.0.0 Ok` or `x-local; connect to ...`."""
    if not diagnostic:
        return None, None
    kind, _, text = diagnostic.partition("; ")
    return (text, None) if kind == "smtp" else (None, text or diagnostic)


def _host(relay: str | None) -> str:
    return relay.split("[", 1)[0] if relay else "no relay"


def _tls(tls: str | None) -> str:
    return "TLS not known" if tls is None else "TLS" if tls else "no TLS"


def _attempt(a: AttemptView) -> str:
    reply, error = split_reply(a.reply)
    if reply is None:
        return f"via {_host(a.relay)}, no reply: {error}"
    return f"via {_host(a.relay)}, {_tls(a.tls)}, {reply}"


def _target(t: TargetView, m: MessageView, now: float, tz: tzinfo | None) -> str:
    last = t.attempts[-1] if t.attempts else None
    at = "" if last is None else clock_time(last.at, m.received_at, now, tz) + " "
    tries = f" (attempt {len(t.attempts)})" if len(t.attempts) > 1 else ""
    if t.outcome == "delivered" and last is not None:
        return f"delivered {at}to {t.target} {_attempt(last)}{tries}"
    if t.outcome == "failed" and last is not None:
        to = "the admin address" if m.notice else m.sender  # a notice's DSN: bounces.py
        dsn = (f"; bounced: DSN {t.dsn_id} to {to}" if t.dsn_id
               else "; no DSN (test message)" if m.test else "; no DSN sent")
        return f"not delivered {at}to {t.target} {_attempt(last)}{tries}{dsn}"
    text = (f"queued for {t.target}, not tried yet" if last is None
            else f"deferred {at}for {t.target} {_attempt(last)}{tries}")
    return text + _standing(t, m, now, tz)


def _standing(t: TargetView, m: MessageView, now: float, tz: tzinfo | None) -> str:
    if t.in_queue is False:
        return "; no longer in the queue (deleted by an administrator)"
    if t.in_delivery:
        return "; being delivered now"
    held = "; held by an administrator" if t.held else ""
    if t.next_attempt is None:
        return held
    return f"{held}; next attempt {clock_time(t.next_attempt, m.received_at, now, tz)}"


def _checks(checks: dict[str, Any]) -> str:
    return ", checks " + " ".join(f"{k}={v}" for k, v in sorted(checks.items())) \
        if checks else ""


def message_lines(m: MessageView, now: float, tz: tzinfo | None = None) -> list[str]:
    """One line per target (the first carries the message), then each earlier attempt."""
    head = _notice_head(m, now, tz) if m.notice else _message_head(m, now, tz)
    lines: list[str] = []
    for number, t in enumerate(m.targets):
        lines.append(f"{head}; {_target(t, m, now, tz)}" if number == 0
                     else f"{INDENT}and {_target(t, m, now, tz)}")
        lines += [f"{INDENT}earlier: {a.outcome} {clock_time(a.at, m.received_at, now, tz)} "
                  f"for {t.target} {_attempt(a)}" for a in t.attempts[:-1]]
    return [printable(line) for line in lines]


def _notice_head(m: MessageView, now: float, tz: tzinfo | None) -> str:
    return (f"{when(m.received_at, now, tz)} {NOTICES.get(m.notice or '', 'notice')} from "
            f"{m.sender}, queue id {m.queue_id}")


def _message_head(m: MessageView, now: float, tz: tzinfo | None) -> str:
    sender_domain = m.sender.rpartition("@")[2].lower()
    shown_from = (f" (From: {m.from_domain})" if m.from_domain
                  and m.from_domain != sender_domain else "")
    subject = f"'{m.subject}'" if m.subject is not None else "subject not stored"
    return (f"{when(m.received_at, now, tz)} {'TEST ' if m.test else ''}from "
            f"{m.sender or '<>'}{shown_from}, {subject}, {max(1, round(m.size / 1024))} KB, "
            f"{m.message_id or 'no Message-ID'}, queue id {m.queue_id}{_checks(m.checks)}")


def refusal_line(r: RefusalView, now: float, tz: tzinfo | None = None) -> str:
    return printable(f"{when(r.at, now, tz)} refused at RCPT: mail from {r.sender or '<>'} "
                     f"(client {r.client}) got {r.reply}")


def reply_line(r: ReplyView, now: float, tz: tzinfo | None = None) -> str:
    """A message to a notice's confirm+ or refuse+ address, and what it did."""
    by = f"a message from {r.sender or '<>'} (client {r.client}) to its {r.kind}+ address"
    if r.result.startswith("ignored"):
        return printable(f"{when(r.at, now, tz)} target {r.target}: {by} {r.result}")
    return printable(f"{when(r.at, now, tz)} target {r.target} {r.result} by {by}")


def lines(messages: list[MessageView], refusals: list[RefusalView], replies: list[ReplyView],
          now: float, tz: tzinfo | None = None) -> list[str]:
    """Messages, refusals and replies to notices in the order they happened."""
    events: list[tuple[float, list[str]]] = [(m.received_at, message_lines(m, now, tz))
                                             for m in messages]
    events += [(r.at, [refusal_line(r, now, tz)]) for r in refusals]
    events += [(r.at, [reply_line(r, now, tz)]) for r in replies]
    events.sort(key=lambda event: event[0])
    return [line for _, block in events for line in block]


def finished(m: MessageView) -> bool:
    """Every target has its outcome for now: delivered, refused, or deferred to later."""
    return all(t.outcome != QUEUED and not t.in_delivery for t in m.targets)


def delivered(m: MessageView) -> bool:
    return bool(m.targets) and all(t.outcome == "delivered" for t in m.targets)


# --- JSON --------------------------------------------------------------------------------


def _attempt_doc(a: AttemptView, tz: tzinfo | None) -> dict[str, Any]:
    reply, error = split_reply(a.reply)
    return {"at": iso(a.at, tz), "relay": a.relay, "tls": None if a.tls is None else bool(a.tls),
            "tls_version": a.tls or None, "reply": reply, "error": error, "outcome": a.outcome}


def target_doc(t: TargetView, tz: tzinfo | None = None) -> dict[str, Any]:
    return {"target": t.target, "route": t.route, "outcome": t.outcome,
            "next_attempt": iso(t.next_attempt, tz), "dsn_queue_id": t.dsn_id,
            "in_queue": t.in_queue, "held": t.held, "in_delivery": t.in_delivery,
            "attempts": [_attempt_doc(a, tz) for a in t.attempts]}


def message_doc(m: MessageView, tz: tzinfo | None = None) -> dict[str, Any]:
    return {"queue_id": m.queue_id, "received_at": iso(m.received_at, tz), "address": m.address,
            "client": m.client, "sender": m.sender, "from_domain": m.from_domain,
            "message_id": m.message_id, "subject": m.subject, "size": m.size,
            "checks": m.checks, "test": m.test, "notice": m.notice,
            "targets": [target_doc(t, tz) for t in m.targets]}


def refusal_doc(r: RefusalView, tz: tzinfo | None = None) -> dict[str, Any]:
    return {"at": iso(r.at, tz), "address": r.address, "client": r.client, "sender": r.sender,
            "reply": r.reply}


def reply_doc(r: ReplyView, tz: tzinfo | None = None) -> dict[str, Any]:
    return {"at": iso(r.at, tz), "address": r.address, "target": r.target, "kind": r.kind,
            "client": r.client, "sender": r.sender, "result": r.result}
