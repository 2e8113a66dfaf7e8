"""What the delivery history costs per message, and what it takes on disk.

Runs the writes the daemon makes for one message, on a real queue file (WAL,
synchronous=FULL) through the queue writer's own `apply_batch`: the queue's insert, then
the record of its delivery (one attempt, delivered), in batches of the size group commit
makes under load; with the history's operations in the same transactions ("on") and
without ("off"), alternately. Prints the CPU time a message for both (the fsyncs are the
same: the history has none of its own), and the history's bytes a message, from SQLite's
`dbstat` (pages of the history tables and their indexes, after the deliveries).

    .venv/bin/python bench/history_cost.py [--messages 20000] [--batch 16] [--rounds 3]

The machine's speed drifts; instructions do not. For a count, run each mode alone under
valgrind and compare the totals of two message counts (the difference is per message):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/history_cost.py --only on --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from forwarder.config import HistorySettings
from forwarder.history.headers import header_section
from forwarder.history.recorder import HistoryRecorder
from forwarder.metrics import Metrics
from forwarder.policy import Outcome, Route
from forwarder.queue import (
    Job,
    NewMessage,
    NewRecipient,
    Queue,
    RecipientJob,
    Result,
    open_queue_db,
)
from forwarder.queue import ops as queue_ops
from forwarder.queue.writer import Op, apply_batch
from forwarder.smtpclient import Attempt
from forwarder.smtppool import TlsUse

# A JobTeaser reset as the queue holds it: our Received field, then the sender's header.
BODY = (b"Received: from client.test ([127.0.0.1])\r\n\tby forwarder.test (forwarder) with "
        b"ESMTP id X\r\n\tfor <n.nom@sigma-clermont.fr>; Thu, 03 Dec 2026 10:02:00 +0000\r\n"
        b"From: JobTeaser <noreply@jobteaser.com>\r\nTo: n.nom@sigma-clermont.fr\r\n"
        b"Subject: =?utf-8?q?R=C3=A9initialisation_de_votre_mot_de_passe?=\r\n"
        b"Message-ID: <0123456789abcdef@mail.jobteaser.com>\r\nDate: Thu, 3 Dec 2026 "
        b"10:02:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        + b"x" * 2000 + b"\r\n")
ATTEMPT = Attempt(Outcome.DELIVERED, "2.0.0", "smtp; 250 2.0.0 Ok: queued as 4XYZ123",
                  "mx.example.org[192.0.2.7]:25",
                  tls=TlsUse("TLSv1.3", "TLS_AES_256_GCM_SHA384", False))
HEAD = header_section(BODY)


class _Clock:
    def now(self) -> float:
        return 1.8e9


def _then(op: Op, also: Op | None) -> Op:
    """What Queue.enqueue and Queue.record submit (forwarder/queue/facade.py)."""
    if also is None:
        return op

    def both(conn: sqlite3.Connection) -> object:
        also(conn)
        return op(conn)

    return both


def _message(n: int) -> NewMessage:
    return NewMessage(f"Q{n:015d}", "noreply@jobteaser.com", 1.8e9 + n * 0.001, "127.0.0.1",
                      BODY, (NewRecipient(f"{n}.nom@sigma-clermont.fr",
                                          f"perso{n}@example.org", Route.REDIRECT),))


def _delivery(history: HistoryRecorder | None, m: NewMessage, rid: int) -> Op:
    r = m.recipients[0]
    job = Job(m.id, m.sender, m.arrived_at, [RecipientJob(rid, r.orig_rcpt, r.rcpt, r.route, 0)],
              m.body)
    result = Result(rid, m.id, Outcome.DELIVERED, m.arrived_at + 0.05, None, ATTEMPT.text,
                    ATTEMPT.status, ATTEMPT.relay)
    also = history.attempted(job, HEAD, [result], {rid: ATTEMPT}, {}) if history else None
    return _then(queue_ops.record([result], [], []), also)


def run(path: Path, on: bool, count: int, batch: int) -> tuple[float, float]:
    """(CPU seconds for `count` messages in and out, the history's bytes on disk)."""
    history = (HistoryRecorder(HistorySettings(), Queue(path), _Clock(), Metrics())
               if on else None)
    conn = open_queue_db(path)
    messages = [_message(n) for n in range(count)]
    cpu = time.process_time()
    ids: list[int] = []
    for start in range(0, count, batch):
        chunk = messages[start:start + batch]
        ops = [_then(queue_ops.insert_message(m, leased=True),
                     history.journal(m) if history else None) for m in chunk]
        for result in apply_batch(conn, ops, 5.0):
            ids += result
    for start in range(0, count, batch):
        apply_batch(conn, [_delivery(history, m, rid) for m, rid in
                           zip(messages[start:start + batch], ids[start:start + batch],
                               strict=True)], 5.0)
    cpu = time.process_time() - cpu
    size = conn.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat"
                        " WHERE name LIKE 'history%'").fetchone()[0]
    conn.close()
    return cpu, float(size)


async def main() -> None:
    parser = argparse.ArgumentParser(description="the delivery history's cost a message")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["on", "off"],
                        help="one run of one mode (to count instructions under callgrind)")
    args = parser.parse_args()
    if args.only:
        with tempfile.TemporaryDirectory() as work:
            run(Path(work) / "queue.sqlite3", args.only == "on", args.messages, args.batch)
        return
    cpu: dict[bool, list[float]] = {False: [], True: []}
    size = 0.0
    with tempfile.TemporaryDirectory() as work:
        for n in range(args.rounds):
            for on in (False, True):
                used, stored = run(Path(work) / f"{n}-{on}.sqlite3", on, args.messages,
                                   args.batch)
                cpu[on].append(used / args.messages * 1e6)
                size = stored if on else size
    off, with_history = statistics.median(cpu[False]), statistics.median(cpu[True])
    print(f"{args.messages} messages, batches of {args.batch}, {args.rounds} rounds (medians)")
    print(f"queue writes, history off: {off:6.1f} us CPU a message")
    print(f"queue writes, history on:  {with_history:6.1f} us CPU a message "
          f"(+{with_history - off:.1f} us)")
    print(f"history on disk: {size / args.messages:.0f} bytes a message (one target, one "
          f"attempt; {size / 2**20:.1f} MiB for {args.messages})")


if __name__ == "__main__":
    asyncio.run(main())
