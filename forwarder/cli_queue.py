"""`forwarder queue ...`: what postqueue -p / postqueue -f / postsuper -h -H -d do for Postfix.

They work while the daemon runs, on the same queue file (see queueadmin.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from forwarder.cli_common import CliError, add_command, add_group, duration, emit, iso
from forwarder.config import Settings
from forwarder.queueadmin import MessageInfo, QueueAdmin, RecipientInfo
from forwarder.queuemove import export_queue, import_queue

EXAMPLE_ID = "GEZDGNBVGY3TQOJQ"


def _queue(settings: Settings) -> QueueAdmin:
    if not settings.state_dir.is_dir():
        # Do not create a queue in the wrong place because of a mistyped --state-dir.
        raise CliError(f"no state directory {settings.state_dir} (wrong --state-dir or "
                       "--config?)")
    return QueueAdmin(settings.queue_path, settings.busy_timeout)


def recipient_doc(r: RecipientInfo) -> dict[str, Any]:
    return {"id": r.id, "rcpt": r.rcpt, "orig_rcpt": r.orig_rcpt, "route": r.route,
            # Every recipient in the queue is queued (it leaves once delivered or bounced);
            # the field stays for the scripts that read it.
            "state": "queued", "in_delivery": r.leased, "attempts": r.attempts,
            "next_attempt": iso(r.next_attempt),
            "last_attempt": iso(r.last_attempt), "last_error": r.last_error,
            "dsn_status": r.dsn_status, "remote_mta": r.remote_mta}


def message_doc(m: MessageInfo, now: float) -> dict[str, Any]:
    return {"id": m.id, "arrived_at": iso(m.arrived_at), "age_seconds": int(now - m.arrived_at),
            "size": m.size, "sender": m.sender, "client": m.client, "held": m.held,
            "crashes": m.crashes, "recipients": [recipient_doc(r) for r in m.recipients]}


def _marker(m: MessageInfo) -> str:
    # Postfix's marks: '!' on hold, '*' active (here: an attempt in progress).
    if m.held:
        return "!"
    return "*" if any(r.leased for r in m.recipients) else " "


def _recipient_state(r: RecipientInfo, now: float) -> str:
    tries = f"{r.attempts} attempt(s)"
    if r.leased:
        return f"in delivery, {tries}"
    when = "due now" if r.next_attempt <= now else f"next in {duration(r.next_attempt - now)}"
    return f"deferred, {tries}, {when} ({iso(r.next_attempt)})" if r.attempts else \
        f"queued, {when}"


def _message_lines(m: MessageInfo, now: float) -> list[str]:
    pad = " " * 36
    lines = [f"{m.id}{_marker(m)} {duration(now - m.arrived_at):>7} {m.size:>9}  "
             f"{m.sender or '<>'}"]
    for r in m.recipients:
        lines.append(f"{pad}{r.rcpt}  [{_recipient_state(r, now)}]")
        if r.last_error:
            lines.append(f"{pad}  ({r.last_error})")
    return lines


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    messages = _queue(settings).messages()
    now = time.time()
    total = sum(m.size for m in messages)
    held = sum(m.held for m in messages)
    recipients = sum(len(m.recipients) for m in messages)
    lines = [f"{'-Queue ID-':<17} {'--Age--':>7} {'--Size--':>9}  -Sender/Recipient-"]
    for m in messages:
        lines.extend(_message_lines(m, now))
    summary = (f"-- {(total + 1023) // 1024} Kbytes in {len(messages)} request(s), "
               f"{recipients} recipient(s), {held} held.")
    text = "Mail queue is empty" if not messages else "\n".join([*lines, summary])
    emit(args, {"messages": [message_doc(m, now) for m in messages], "count": len(messages),
                "recipients": recipients, "held": held, "bytes": total}, text)
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    queue = _queue(settings)
    info = queue.get(args.id)
    headers = queue.headers(args.id)
    now = time.time()
    doc = message_doc(info, now)
    doc["headers"] = [[name, value] for name, value in headers]
    lines = [f"id: {info.id}{' (held)' if info.held else ''}",
             f"arrived: {iso(info.arrived_at)} ({duration(now - info.arrived_at)} ago) "
             f"from client {info.client or '-'}",
             f"size: {info.size} bytes; worker crashes: {info.crashes}",
             f"sender: <{info.sender}>"]
    for r in info.recipients:
        lines.append(f"recipient: <{r.rcpt}> (for <{r.orig_rcpt}>, route {r.route}) "
                     f"[{_recipient_state(r, now)}]")
        if r.last_attempt is not None:
            lines.append(f"  last attempt {iso(r.last_attempt)} via {r.remote_mta or '-'}: "
                         f"{r.dsn_status or '-'} {r.last_error or ''}".rstrip())
    lines.append("headers:")
    lines.extend(f"  {name}: {' '.join(value.split())}" for name, value in headers)
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    count = _queue(settings).retry(args.id, time.time())
    emit(args, {"retried": count, "id": args.id},
         f"{count} recipient(s) due now; the daemon tries them within "
         f"{settings.delivery.poll_interval:g} s (held messages stay held)")
    return 0


def cmd_hold(args: argparse.Namespace, settings: Settings) -> int:
    already = _queue(settings).hold(args.id, True)
    emit(args, {"id": args.id, "held": True},
         f"{args.id}: {'already ' if already else ''}held; "
         f"'forwarder queue release {args.id}' lets it go")
    return 0


def cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    already = _queue(settings).hold(args.id, False)
    emit(args, {"id": args.id, "held": False},
         f"{args.id}: {'was not held' if already else 'released'}; "
         f"'forwarder queue retry {args.id}' makes it due now")
    return 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    if not args.yes:
        raise CliError(f"{args.id}: deleting loses the message without a bounce; "
                       "confirm with --yes")
    info = _queue(settings).delete(args.id)
    if any(r.leased for r in info.recipients):
        print(f"forwarder: {args.id} was being delivered; that attempt may still arrive",
              file=sys.stderr)
    emit(args, {"id": args.id, "deleted": True, "recipients": len(info.recipients)},
         f"{args.id}: deleted ({len(info.recipients)} recipient(s), no bounce sent)")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from forwarder.daemonparts import StateLockError, lock_state_dir

    if not settings.queue_path.exists():
        raise CliError(f"no queue in {settings.state_dir} (wrong --state-dir or --config?)")
    try:
        fd = lock_state_dir(settings.state_dir)
    except StateLockError as exc:
        raise CliError(f"{exc}: stop it first (its queue is moved only while no "
                       "daemon delivers it)") from exc
    try:
        moved = export_queue(settings.queue_path, Path(args.file), args.keep,
                             settings.busy_timeout)
    finally:
        os.close(fd)
    where = "kept in this queue too: do not start this node again" if args.keep \
        else "removed from this queue"
    emit(args, {"file": args.file, "messages": moved.messages,
                "recipients": moved.recipients, "kept": args.keep},
         f"{args.file}: {moved.messages} message(s), {moved.recipients} recipient(s) "
         f"exported; {where}. On another node: forwarder queue import {args.file}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    moved = import_queue(settings.queue_path, Path(args.file), time.time(),
                         settings.busy_timeout)
    emit(args, {"file": args.file, "messages": moved.messages,
                "recipients": moved.recipients, "already_here": moved.skipped},
         f"{args.file}: {moved.messages} message(s), {moved.recipients} recipient(s) "
         f"imported, due now ({moved.skipped} already here); the daemon delivers them "
         f"within {settings.delivery.poll_interval:g} s")
    return 0


def register(sub: Any) -> None:
    q = add_group(sub, "queue", "inspect and steer the mail queue (works while the daemon runs)",
                  "forwarder queue list")
    add_command(q, "list", cmd_list, "list queued messages (like postqueue -p); "
                "'!' marks held messages, '*' those in delivery",
                "forwarder queue list --json", json_flag=True)
    p = add_command(q, "show", cmd_show, "show one message: envelope, attempts, headers",
                    f"forwarder queue show {EXAMPLE_ID}", json_flag=True)
    p.add_argument("id", type=str.upper)
    p = add_command(q, "retry", cmd_retry,
                    "make deferred mail due now: all of it, or one message (postqueue -f/-i)",
                    "forwarder queue retry", json_flag=True)
    p.add_argument("id", nargs="?", type=str.upper)
    for name, handler, text in (
        ("hold", cmd_hold, "keep a message from being delivered (postsuper -h)"),
        ("release", cmd_release, "release a held message (postsuper -H)"),
    ):
        p = add_command(q, name, handler, text, f"forwarder queue {name} {EXAMPLE_ID}",
                        json_flag=True)
        p.add_argument("id", type=str.upper)
    p = add_command(q, "delete", cmd_delete,
                    "delete a message from the queue, without a bounce (postsuper -d)",
                    f"forwarder queue delete {EXAMPLE_ID} --yes", json_flag=True)
    p.add_argument("id", type=str.upper)
    p.add_argument("--yes", action="store_true", help="confirm the deletion")
    p = add_command(q, "export", cmd_export,
                    "move a stopped node's queue into FILE (docs/cluster.md); removed "
                    "from this queue once FILE is written, unless --keep",
                    "forwarder queue export /root/mx2-queue.export --state-dir "
                    "/mnt/mx2/var/lib/forwarder", json_flag=True)
    p.add_argument("file")
    p.add_argument("--keep", action="store_true",
                   help="leave the messages in this queue as well")
    p = add_command(q, "import", cmd_import,
                    "add the messages of an export FILE to this node's queue, due now",
                    "forwarder queue import /root/mx2-queue.export", json_flag=True)
    p.add_argument("file")
