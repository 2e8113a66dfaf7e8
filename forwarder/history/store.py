"""The history's SQL, on the queue's file (schema: forwarder/queue/schema.py, version 5).

Writes are operations run inside the queue's group-committed transactions: an arrival with
the message's own insert, an attempt with the `record` of its outcome, so the history costs
no fsync of its own and always agrees with the queue. Reads are for the CLI, on a read-only
connection of its own (WAL: the daemon goes on writing meanwhile).

Attempts are stored per target as a JSON array of `[at, relay, tls, reply]`, `tls` being
true, false or null (not known).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwarder.queue import QUEUE_SCHEMA_VERSION, open_queue_db

# Outcomes of a target row: `queued` until its first attempt; `deferred` (waiting for the
# next one), `delivered` and `failed` as delivery decided (policy.Outcome).
QUEUED = "queued"
HISTORY_SCHEMA_VERSION = 5
PURGE_CHUNK = 2000


class HistoryUnavailable(Exception):
    """No history to read here; the message says why, for the admin."""


@dataclass(frozen=True)
class Arrival:
    """One message as received, with the target rows it gets (target, route, address)."""

    queue_id: str
    received_at: float
    client: str
    sender: str
    from_domain: str | None
    message_id: str | None
    subject: str | None
    size: int
    checks: str | None  # JSON
    test: bool
    targets: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Try:
    """One attempt at one target row, and the outcome it left."""

    received_at: float
    queue_id: str
    target: str
    route: str
    at: float
    relay: str | None
    tls: bool | None
    reply: str | None
    outcome: str
    next_attempt: float | None
    dsn_id: str | None


def insert_arrival(conn: sqlite3.Connection, a: Arrival) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO history (received_at, queue_id, target, route, address, client,"
        " sender, from_domain, message_id, subject, size, checks, test)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(a.received_at, a.queue_id, target, route, address, a.client, a.sender,
          a.from_domain, a.message_id, a.subject, a.size, a.checks, int(a.test))
         for target, route, address in a.targets])


def record_tries(conn: sqlite3.Connection, tries: Sequence[Try]) -> None:
    """Append each attempt to its row. A row that is not there (a DSN, an SRS return, a
    message older than the retention) is left alone: one primary-key probe."""
    conn.executemany(
        "UPDATE history SET outcome = ?, next_attempt = ?, dsn_id = coalesce(?, dsn_id),"
        " attempts = json_insert(attempts, '$[#]', json_array(?, ?, json(?), ?))"
        " WHERE received_at = ? AND queue_id = ? AND target = ? AND route = ?",
        [(t.outcome, t.next_attempt, t.dsn_id, t.at, t.relay, json.dumps(t.tls), t.reply,
          t.received_at, t.queue_id, t.target, t.route) for t in tries])


def insert_refusal(conn: sqlite3.Connection, at: float, address: str, client: str,
                   sender: str, reply: str) -> None:
    conn.execute("INSERT INTO history_refusals (at, address, client, sender, reply)"
                 " VALUES (?, ?, ?, ?, ?)", (at, address, client, sender, reply))


def purge_before(conn: sqlite3.Connection, cutoff: float, chunk: int = PURGE_CHUNK) -> int:
    """Delete up to about `chunk` rows of each table older than `cutoff`; the number gone.
    In chunks, so one commit of the queue's writer never holds the lock for long."""
    edge = conn.execute("SELECT received_at FROM history WHERE received_at < ?"
                        " ORDER BY received_at LIMIT 1 OFFSET ?", (cutoff, chunk)).fetchone()
    # Up to the chunk's last arrival, included: rows that arrived at the same instant go
    # together, so every call removes something while anything is older than `cutoff`.
    if edge is None:
        gone = conn.execute("DELETE FROM history WHERE received_at < ?", (cutoff,)).rowcount
    else:
        gone = conn.execute("DELETE FROM history WHERE received_at <= ?", edge).rowcount
    gone += conn.execute(
        "DELETE FROM history_refusals WHERE id IN (SELECT id FROM history_refusals"
        " WHERE at < ? ORDER BY at LIMIT ?)", (cutoff, chunk)).rowcount
    return int(gone)


def forget(conn: sqlite3.Connection, address: str) -> int:
    """Erase every row about `address` (GDPR art. 17); how many."""
    gone = conn.execute("DELETE FROM history WHERE address = ?", (address,)).rowcount
    gone += conn.execute("DELETE FROM history_refusals WHERE address = ?", (address,)).rowcount
    return int(gone)


def erase(queue_path: Path, address: str, busy_timeout: float = 5.0) -> int:
    """`forget` on this node's queue file, from the CLI (`account purge`); 0 if there is
    no file. The daemon may run meanwhile: one short write transaction."""
    if not queue_path.exists():
        return 0
    conn = open_queue_db(queue_path, busy_timeout)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            gone = forget(conn, address)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return gone
    finally:
        conn.close()


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptView:
    at: float
    relay: str | None
    tls: bool | None
    reply: str | None


@dataclass
class TargetView:
    target: str
    route: str
    outcome: str
    next_attempt: float | None
    dsn_id: str | None
    attempts: list[AttemptView]
    # Still in the queue (None: the outcome is final), and held by an administrator.
    in_queue: bool | None = None
    held: bool = False
    in_delivery: bool = False


@dataclass
class MessageView:
    queue_id: str
    received_at: float
    address: str
    client: str
    sender: str
    from_domain: str | None
    message_id: str | None
    subject: str | None
    size: int
    checks: dict[str, Any]
    test: bool
    targets: list[TargetView] = field(default_factory=list)


@dataclass(frozen=True)
class RefusalView:
    at: float
    address: str
    client: str
    sender: str
    reply: str


def open_reader(queue_path: Path, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to the queue file, or HistoryUnavailable saying why not."""
    if not queue_path.exists():
        raise HistoryUnavailable(f"{queue_path}: no queue database here, so no history (has "
                                 "the daemon run with this state directory?)")
    conn = sqlite3.connect(queue_path.resolve().as_uri() + "?mode=ro", uri=True,
                           timeout=busy_timeout, isolation_level=None)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version < HISTORY_SCHEMA_VERSION:
        conn.close()
        raise HistoryUnavailable(f"{queue_path}: written by a version without the history "
                                 "(it is added when the daemon next starts)")
    if version > QUEUE_SCHEMA_VERSION:
        conn.close()
        raise HistoryUnavailable(f"{queue_path}: schema version {version} is newer than "
                                 f"this program ({QUEUE_SCHEMA_VERSION})")
    return conn


_MESSAGE_COLUMNS = ("queue_id, received_at, address, client, sender, from_domain, message_id,"
                    " subject, size, checks, test, target, route, outcome, next_attempt,"
                    " dsn_id, attempts")


def _target(row: Sequence[Any]) -> TargetView:
    target, route, outcome, next_attempt, dsn_id, attempts = row
    return TargetView(target, route, outcome, next_attempt, dsn_id,
                      [AttemptView(*a) for a in json.loads(attempts)])


def _messages(rows: Sequence[Sequence[Any]]) -> list[MessageView]:
    found: dict[tuple[str, str], MessageView] = {}
    for row in rows:
        (qid, received, address, client, sender, domain, mid, subject, size, checks,
         test) = row[:11]
        view = found.get((qid, address))
        if view is None:
            view = found[(qid, address)] = MessageView(
                qid, received, address, client, sender, domain, mid, subject, size,
                json.loads(checks) if checks else {}, bool(test))
        view.targets.append(_target(row[11:]))
    return list(found.values())


def _live(conn: sqlite3.Connection, message: MessageView) -> None:
    """Where each unfinished target stands in the queue now: an admin may have retried,
    held or deleted it since the history row was written."""
    held = conn.execute("SELECT held FROM messages WHERE id = ?",
                        (message.queue_id,)).fetchone()
    for t in message.targets:
        if t.outcome not in (QUEUED, "deferred"):
            continue
        row = None if held is None else conn.execute(
            "SELECT next_attempt, leased FROM recipients WHERE message_id = ? AND rcpt = ?"
            " AND route = ?", (message.queue_id, t.target, t.route)).fetchone()
        t.in_queue = row is not None
        if row is not None:
            t.held, t.in_delivery = bool(held[0]), bool(row[1])
            if not row[1]:  # a lease's next_attempt is its expiry, not a plan
                t.next_attempt = row[0]


def read_address(conn: sqlite3.Connection, address: str,
                 since: float) -> tuple[list[MessageView], list[RefusalView]]:
    """Everything kept about `address` since `since`, oldest first; one snapshot."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM history WHERE address = ? AND received_at >= ?"
            " ORDER BY received_at, queue_id", (address, since)).fetchall()
        messages = _messages(rows)
        for message in messages:
            _live(conn, message)
        refusals = [RefusalView(*r) for r in conn.execute(
            "SELECT at, address, client, sender, reply FROM history_refusals"
            " WHERE address = ? AND at >= ? ORDER BY at, id", (address, since))]
    finally:
        conn.execute("COMMIT")
    return messages, refusals


def read_message(conn: sqlite3.Connection, address: str, queue_id: str) -> MessageView | None:
    """One message's rows for `address` (what `send-test` waits on)."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM history WHERE address = ? AND queue_id = ?",
            (address, queue_id)).fetchall()
        messages = _messages(rows)
        for message in messages:
            _live(conn, message)
    finally:
        conn.execute("COMMIT")
    return messages[0] if messages else None
