"""The queue's SQL: operations the writer runs inside a batch transaction, and reads.

Work on a recipient is leased: the lease is written with the batch that hands the recipient
to a delivery worker, so a crash leaves a visible lease that start-up recovers (`recover`).
Whom a crash is blamed on is decided by `policy.blame` (the rule and its reasons are
there); these operations read what they know about each message, ask the policy, and
write its verdict. The scanner hands suspects out through a lane of their own, one message
at a time in the whole daemon (lease value ISOLATED), never with the ordinary mail.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from forwarder.dsnparams import DsnRequest, RecipientDsn
from forwarder.policy import BLAME, Charge, Ending, Lane, Outcome, Route, Suspicion, blame
from forwarder.queue.model import (
    Body,
    Job,
    MessageFlags,
    NewMessage,
    RecipientJob,
    Result,
    SpooledBody,
    body_size,
)
from forwarder.queue.schema import ISOLATED, LEASED
from forwarder.queue.writer import Op

# How long a lease keeps a recipient away from the scanner (its next_attempt): longer than
# an attempt at one address normally takes (connect 30 s + data 600 s). What keeps a slow
# delivery from starting twice is that the scanner skips the recipients still in flight in
# this process (Dispatcher.in_flight), whatever their lease says.
LEASE_SECONDS = 3600.0

# Outcomes after which a recipient leaves the queue (a failure's DSN is queued with it).
_FINAL = (Outcome.DELIVERED, Outcome.FAILED)


def insert_message(msg: NewMessage, leased: bool) -> Op:
    """Insert a message; its recipients are leased to this process (which delivers them
    from memory) or, if not `leased`, left due at once for the scanner."""
    lease, next_attempt = ((LEASED, msg.arrived_at + LEASE_SECONDS) if leased
                           else (0, msg.arrived_at))

    flags = msg.flags
    body = msg.body
    stored, spooled = (body, 0) if isinstance(body, bytes) else (body.prefix, 1)

    def op(conn: sqlite3.Connection) -> list[int]:
        conn.execute(
            "INSERT INTO messages (id, sender, arrived_at, size, client, body, ret, envid,"
            " smtputf8, eight_bit, spooled) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (msg.id, msg.sender, msg.arrived_at, body_size(body), msg.client, stored,
             flags.dsn.ret, flags.dsn.envid, int(flags.smtputf8), int(flags.eight_bit),
             spooled),
        )
        ids = []
        for r in msg.recipients:
            cursor = conn.execute(
                "INSERT INTO recipients (message_id, orig_rcpt, rcpt, route, leased,"
                " next_attempt, notify, orcpt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.id, r.orig_rcpt, r.rcpt, r.route.value, lease, next_attempt,
                 r.dsn.notify, r.dsn.orcpt),
            )
            ids.append(int(cursor.lastrowid or 0))
        return ids

    return op


def apply_blame(conn: sqlite3.Connection, message_id: str, lane: Lane,
                ending: Ending) -> tuple[Suspicion, Suspicion] | None:
    """Write `policy.blame`'s verdict on a message; (before, after), or None if nothing
    changed (a charge that keeps the count needs no read) or the message is gone."""
    if BLAME[(lane, ending)] is Charge.KEEP:
        return None
    row = conn.execute("SELECT crashes, held FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    if row is None:  # deleted by an administrator meanwhile
        return None
    before = Suspicion(row[0], bool(row[1]))
    after = blame(lane, ending, before)
    if after != before:
        conn.execute("UPDATE messages SET crashes = ?, held = ? WHERE id = ?",
                     (after.crashes, int(after.held), message_id))
    return before, after


def record(results: Sequence[Result], new_messages: Sequence[NewMessage],
           completed: Sequence[tuple[str, Lane]], spooled: list[str] | None = None) -> Op:
    """Outcomes and the DSNs they cause, in one transaction: a failed recipient leaves the
    queue in the same commit that queues its bounce, so a crash can lose neither. The
    `completed` messages' attempts ended normally, in the lane given (crash blame)."""

    def op(conn: sqlite3.Connection) -> tuple[list[str], list[list[int]]]:
        if spooled is not None:
            spooled.clear()  # a transaction that failed and is tried again starts afresh
        for message_id, lane in completed:
            apply_blame(conn, message_id, lane, Ending.COMPLETED)
        touched: set[str] = set()
        for r in results:
            touched.add(r.message_id)
            if r.outcome in _FINAL:
                conn.execute("DELETE FROM recipients WHERE id = ?", (r.recipient_id,))
                continue
            conn.execute(
                "UPDATE recipients SET leased = 0, attempts = attempts + 1,"
                " next_attempt = ?, last_attempt = ?, last_error = ?, dsn_status = ?,"
                " remote_mta = ?, warned = max(warned, ?) WHERE id = ?",
                (r.retry_at if r.retry_at is not None else r.attempted_at, r.attempted_at,
                 r.error, r.dsn_status, r.remote_mta, int(r.warned), r.recipient_id),
            )
        new_ids = [insert_message(m, leased=True)(conn) for m in new_messages]
        return _finished_messages(conn, touched, spooled), new_ids

    return op


def crashed(message_id: str, lane: Lane, recipient_ids: Sequence[int], retry_at: float) -> Op:
    """A worker raised on this message: blame it, retry later; True if it is now held."""

    def op(conn: sqlite3.Connection) -> bool:
        conn.executemany(
            "UPDATE recipients SET leased = 0, next_attempt = ? WHERE id = ?",
            [(retry_at, rid) for rid in recipient_ids])
        verdict = apply_blame(conn, message_id, lane, Ending.RAISED)
        return verdict is not None and verdict[1].held

    return op


def _finished_messages(conn: sqlite3.Connection, ids: Iterable[str],
                       spooled: list[str] | None) -> list[str]:
    """Delete messages with nothing left to try; return their ids, and add those whose
    body is in a spool file to `spooled` (the file goes once the commit is done)."""
    done = []
    for message_id in ids:
        left = conn.execute("SELECT 1 FROM recipients WHERE message_id = ? LIMIT 1",
                            (message_id,)).fetchone()
        if left is None:
            row = conn.execute("DELETE FROM messages WHERE id = ? RETURNING spooled",
                               (message_id,)).fetchone()
            done.append(message_id)
            if row is not None and row[0] and spooled is not None:
                spooled.append(message_id)
    return done


_DUE_COLUMNS = ("SELECT r.id, r.message_id, r.orig_rcpt, r.rcpt, r.route, r.attempts,"
                " r.warned, r.notify, r.orcpt, m.sender, m.arrived_at, m.ret, m.envid,"
                " m.smtputf8, m.eight_bit, m.size, m.client"
                " FROM recipients r JOIN messages m ON m.id = r.message_id")


def lease_due(now: float, limit: int, exclude: frozenset[int], lane_free: bool) -> Op:
    """Lease up to `limit` due recipients of unsuspected messages and, if the suspect lane
    is free, every due recipient of the suspect that has waited longest (one message).
    The SQL conditions are `Suspicion.suspect` (crashes > 0 and not held), indexed."""

    def op(conn: sqlite3.Connection) -> list[Job]:
        rows = conn.execute(
            f"{_DUE_COLUMNS} WHERE r.next_attempt <= ?"
            " AND m.held = 0 AND m.crashes = 0 ORDER BY r.next_attempt LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        fresh = [row for row in rows if row[0] not in exclude][:limit]
        jobs = _lease_rows(conn, fresh, now, LEASED)
        if lane_free:
            jobs += _lease_rows(conn, _due_suspect(conn, now, exclude), now, ISOLATED)
        return jobs

    return op


def _due_suspect(conn: sqlite3.Connection, now: float,
                 exclude: frozenset[int]) -> list[tuple[Any, ...]]:
    """The due recipients of the oldest suspect that has any. Suspects are few (the partial
    index holds only them), so this costs nothing while there are none, whatever the
    backlog."""
    suspects = conn.execute("SELECT id FROM messages WHERE crashes > 0 AND held = 0"
                            " ORDER BY arrived_at").fetchall()
    for (mid,) in suspects:
        rows = [row for row in conn.execute(
            f"{_DUE_COLUMNS} WHERE r.message_id = ? AND r.next_attempt <= ?",
            (mid, now)) if row[0] not in exclude]
        if rows:
            return rows
    return []


def _lease_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], now: float,
                lease: int) -> list[Job]:
    jobs: dict[str, Job] = {}
    for (rid, mid, orig, rcpt, route, attempts, warned, notify, orcpt, sender, arrived,
         ret, envid, smtputf8, eight_bit, size, client) in rows:
        conn.execute("UPDATE recipients SET leased = ?, next_attempt = ? WHERE id = ?",
                     (lease, now + LEASE_SECONDS, rid))
        job = jobs.get(mid)
        if job is None:
            flags = MessageFlags(DsnRequest(ret, envid), bool(smtputf8), bool(eight_bit))
            job = jobs[mid] = Job(mid, sender, arrived, [], isolated=lease == ISOLATED,
                                  flags=flags, size=size, client=client)
        job.recipients.append(RecipientJob(rid, orig, rcpt, Route(route), attempts,
                                           bool(warned), RecipientDsn(notify, orcpt)))
    return list(jobs.values())


def recover(now: float, ending: Ending) -> Op:
    """Start-up: leases left by the last run become due now, and each message that held
    one is blamed as `policy.blame` says for that run's `ending` (FAULTED: it died of a
    fault of its own; KILLED: it was killed from outside). Returns (recipients recovered,
    messages newly held)."""

    def op(conn: sqlite3.Connection) -> tuple[int, int]:
        # max(): a message with a recipient alone in the lane was in the lane.
        leased = conn.execute("SELECT message_id, max(leased) FROM recipients"
                              " WHERE leased != 0 GROUP BY message_id").fetchall()
        held = 0
        for message_id, lease in leased:
            lane = Lane.ALONE if lease == ISOLATED else Lane.ORDINARY
            verdict = apply_blame(conn, message_id, lane, ending)
            held += verdict is not None and verdict[1].held and not verdict[0].held
        recovered = conn.execute(
            "UPDATE recipients SET leased = 0, next_attempt = ? WHERE leased != 0", (now,)
        ).rowcount
        return recovered, held

    return op


def lease_expired_held(now: float, lifetime: float) -> Op:
    """Held messages at the end of their lifetime, leased for their bounce: a held message
    is never tried again, but it does not stay for ever either."""

    def op(conn: sqlite3.Connection) -> list[Job]:
        rows = conn.execute(
            f"{_DUE_COLUMNS} WHERE m.held = 1 AND m.arrived_at <= ? AND r.leased = 0",
            (now - lifetime,)).fetchall()
        return _lease_rows(conn, rows, now, LEASED)

    return op


def release(ids: list[int], now: float) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany("UPDATE recipients SET leased = 0, next_attempt = ? WHERE id = ?",
                         [(now, rid) for rid in ids])

    return op


def load_body(conn: sqlite3.Connection, message_id: str, spool: Path) -> Body | None:
    """A message's bytes: the row's, or its fields in the row and the rest in `spool`."""
    row = conn.execute("SELECT body, spooled, size FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    if row is None:
        return None
    if not row[1]:
        return bytes(row[0])
    return SpooledBody(bytes(row[0]), spool / message_id, int(row[2]))


def spooled_ids(conn: sqlite3.Connection) -> set[str]:
    return {mid for (mid,) in conn.execute("SELECT id FROM messages WHERE spooled = 1")}


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """Messages, recipients by state (every row is `queued`: a recipient leaves the queue
    when delivered or bounced) and the oldest arrival."""
    recipients = conn.execute("SELECT count(*) FROM recipients").fetchone()[0]
    oldest = conn.execute("SELECT min(arrived_at) FROM messages").fetchone()[0]
    messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    return {"messages": messages, "recipients": {"queued": recipients}, "oldest": oldest}
