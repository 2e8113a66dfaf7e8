"""The history's SQL, on the queue's file (schema: forwarder/queue/schema.py, version 6).

Writes are operations run inside the queue's group-committed transactions, so the history
costs no fsync of its own and always agrees with the queue: each delivery attempt is one
row, appended in the transaction that records its outcome (a message delivered at once
costs one row); the checks at receipt, when there are any, one row in the transaction that
queues the message. A message not tried yet is in the queue's own rows, which the reads
join in. Reads are for the CLI, on a read-only connection of its own (WAL: the daemon
goes on writing meanwhile), in one snapshot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwarder.queue import QUEUE_SCHEMA_VERSION, open_queue_db

HISTORY_SCHEMA_VERSION = 6
PURGE_CHUNK = 2000
QUEUED = "queued"  # a target's outcome before its first attempt


class HistoryUnavailable(Exception):
    """No history to read here; the message says why, for the admin."""


# A delivery attempt's row, in this order: the message, the target, the attempt.
TRY_COLUMNS = ("received_at", "queue_id", "address", "target", "route", "client", "sender",
               "from_domain", "message_id", "subject", "notice", "size", "test", "at", "relay",
               "tls", "reply", "outcome", "next_attempt", "dsn_id")
_INSERT_TRY = (f"INSERT INTO history ({', '.join(TRY_COLUMNS)})"
               f" VALUES ({', '.join('?' * len(TRY_COLUMNS))})")


# The usual row (delivered, no subject kept, no DSN) without its four NULLs: the sqlite3
# module binds None through its adaptation protocol, some 3000 instructions each, a third
# of what the row's insert cost (callgrind, bench/history_cost.py).
_OPTIONAL = {TRY_COLUMNS.index(name)
             for name in ("subject", "notice", "next_attempt", "dsn_id")}
_USUAL = [n for n in range(len(TRY_COLUMNS)) if n not in _OPTIONAL]
_INSERT_USUAL = (f"INSERT INTO history ({', '.join(TRY_COLUMNS[n] for n in _USUAL)})"
                 f" VALUES ({', '.join('?' * len(_USUAL))})")
_SUBJECT, _NOTICE, _NEXT, _DSN = sorted(_OPTIONAL)
# record_tries cuts the usual row out of a full one with two slices.
assert (_SUBJECT + 1, len(TRY_COLUMNS) - 2, len(TRY_COLUMNS) - 1) == (_NOTICE, _NEXT, _DSN)


def record_tries(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append a delivery round's attempts (rows of TRY_COLUMNS)."""
    for row in rows:  # one or two: execute() costs less than executemany() here
        if (row[_SUBJECT] is None and row[_NOTICE] is None and row[_NEXT] is None
                and row[_DSN] is None):
            conn.execute(_INSERT_USUAL, row[:_SUBJECT] + row[_NOTICE + 1:_NEXT])
        else:
            conn.execute(_INSERT_TRY, row)


def insert_checks(conn: sqlite3.Connection, received_at: float, queue_id: str,
                  checks: str) -> None:
    conn.execute("INSERT OR REPLACE INTO history_checks (received_at, queue_id, checks)"
                 " VALUES (?, ?, ?)", (received_at, queue_id, checks))


def insert_refusal(conn: sqlite3.Connection, at: float, address: str, client: str,
                   sender: str, reply: str) -> None:
    conn.execute("INSERT INTO history_refusals (at, address, client, sender, reply)"
                 " VALUES (?, ?, ?, ?, ?)", (at, address, client, sender, reply))


def insert_reply(conn: sqlite3.Connection, at: float, address: str, target: str, kind: str,
                 client: str, sender: str, result: str) -> None:
    conn.execute("INSERT INTO history_replies (at, address, target, kind, client, sender,"
                 " result) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (at, address, target, kind, client, sender, result))


def _purge_oldest(conn: sqlite3.Connection, table: str, time: str, cutoff: float,
                  chunk: int) -> int:
    """Rows are appended in time order: delete, among the `chunk` oldest, those before
    `cutoff`. A rowid range, so each call reads no more than it deletes."""
    first = conn.execute(f"SELECT min(id) FROM {table}").fetchone()[0]
    if first is None:
        return 0
    return int(conn.execute(f"DELETE FROM {table} WHERE id < ? AND {time} < ?",
                            (first + chunk, cutoff)).rowcount)


def purge_before(conn: sqlite3.Connection, cutoff: float, chunk: int = PURGE_CHUNK) -> int:
    """Delete up to about `chunk` rows of each table older than `cutoff`; the number gone.
    In chunks, so one commit of the queue's writer never holds the lock for long."""
    gone = _purge_oldest(conn, "history", "at", cutoff, chunk)
    gone += _purge_oldest(conn, "history_refusals", "at", cutoff, chunk)
    gone += _purge_oldest(conn, "history_replies", "at", cutoff, chunk)
    edge = conn.execute("SELECT received_at FROM history_checks WHERE received_at < ?"
                        " ORDER BY received_at LIMIT 1 OFFSET ?", (cutoff, chunk)).fetchone()
    # Up to the chunk's last arrival, included, so that rows of one instant go together.
    if edge is None:
        gone += conn.execute("DELETE FROM history_checks WHERE received_at < ?",
                             (cutoff,)).rowcount
    else:
        gone += conn.execute("DELETE FROM history_checks WHERE received_at <= ?",
                             edge).rowcount
    return gone


def forget(conn: sqlite3.Connection, address: str) -> int:
    """Erase every row about `address` (GDPR art. 17); how many."""
    gone = conn.execute(
        "DELETE FROM history_checks WHERE queue_id IN"
        " (SELECT queue_id FROM history WHERE address = ?)", (address,)).rowcount
    gone += conn.execute("DELETE FROM history WHERE address = ?", (address,)).rowcount
    gone += conn.execute("DELETE FROM history_refusals WHERE address = ?", (address,)).rowcount
    gone += conn.execute("DELETE FROM history_replies WHERE address = ?", (address,)).rowcount
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
    tls: str | None  # the TLS version, "" in clear, None not known
    reply: str | None
    outcome: str
    next_attempt: float | None
    dsn_id: str | None


@dataclass
class TargetView:
    target: str
    route: str
    attempts: list[AttemptView] = field(default_factory=list)
    # Where it stands in the queue now: None once its outcome is final (or not known),
    # False if an administrator deleted it; held, being delivered, next attempt.
    in_queue: bool | None = None
    held: bool = False
    in_delivery: bool = False
    queued_next: float | None = None

    @property
    def outcome(self) -> str:
        return self.attempts[-1].outcome if self.attempts else QUEUED

    @property
    def next_attempt(self) -> float | None:
        if self.outcome not in (QUEUED, "deferred"):
            return None
        if self.in_queue:
            return None if self.in_delivery else self.queued_next
        return self.attempts[-1].next_attempt if self.attempts else None

    @property
    def dsn_id(self) -> str | None:
        return self.attempts[-1].dsn_id if self.attempts else None


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
    test: bool
    notice: str | None = None  # one of our notices to a target: 'confirm' or 'failing'
    checks: dict[str, Any] = field(default_factory=dict)
    targets: list[TargetView] = field(default_factory=list)

    def target(self, target: str, route: str) -> TargetView:
        for t in self.targets:
            if (t.target, t.route) == (target, route):
                return t
        self.targets.append(TargetView(target, route))
        return self.targets[-1]


@dataclass(frozen=True)
class RefusalView:
    at: float
    address: str
    client: str
    sender: str
    reply: str


@dataclass(frozen=True)
class ReplyView:
    """A message to a notice's confirm+ or refuse+ address, and what it did."""

    at: float
    address: str
    target: str
    kind: str
    client: str
    sender: str
    result: str


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
