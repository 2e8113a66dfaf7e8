"""What the SQLite directory's writers share: reading rows into objects, the audit entry,
the transaction, and the SQL that applies a target's state change."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from forwarder.directory.model import AccountRow, DirectoryError, TargetRow
from forwarder.policy import AccountState
from forwarder.targets import Change, Health, TargetState

if TYPE_CHECKING:
    from forwarder.directory.pgconn import PgConnection

    # A directory connection: SQLite's, or PostgreSQL's speaking the same subset
    # (forwarder/directory/pgconn.py); the SQL here is written in what both understand.
    Db: TypeAlias = sqlite3.Connection | PgConnection

TARGET_COLUMNS = ("id, target, state, why, declared_at, changed_at, confirmed, failures,"
                  " first_failure, last_failure, last_success, last_error")


def day(ts: float) -> str:
    """A date as admins read it in a target's `why`."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def target_row(row: tuple[Any, ...]) -> TargetRow:
    return TargetRow(row[0], row[1], TargetState(row[2]), row[3], row[4], row[5],
                     bool(row[6]), Health(row[7], row[8], row[9], row[10]), row[11])


def load_account(conn: Db, address: str) -> AccountRow | None:
    row = conn.execute("SELECT address, state, created_at, updated_at FROM accounts"
                       " WHERE address = ?", (address,)).fetchone()
    if row is None:
        return None
    targets = conn.execute(f"SELECT {TARGET_COLUMNS} FROM targets WHERE address = ?"
                           " ORDER BY position", (address,)).fetchall()
    return AccountRow(row[0], AccountState(row[1]), row[2], row[3],
                      tuple(target_row(t) for t in targets))


def require_account(conn: Db, address: str) -> AccountRow:
    row = load_account(conn, address)
    if row is None:
        raise DirectoryError(f"{address}: no such account")
    return row


def account_doc(state: str, targets: Iterable[str]) -> dict[str, Any]:
    """An account's values in the audit: its state and its targets, in order."""
    return {"state": state, "targets": list(targets)}


def target_doc(target: str, state: TargetState | None, **extra: Any) -> dict[str, Any]:
    """A target's values in the audit."""
    return {"target": target, "state": None if state is None else state.value, **extra}


def dumps(doc: dict[str, Any] | None) -> str | None:
    return None if doc is None else json.dumps(doc)


def audit(conn: Db, at: float, actor: str, action: str, address: str,
          old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
    conn.execute(
        "INSERT INTO audit (at, actor, action, address, old, new) VALUES (?, ?, ?, ?, ?, ?)",
        (at, actor, action, address, dumps(old), dumps(new)))


def apply_change(conn: Db, row: TargetRow, change: Change, why: str,
                 now: float, notice_due: float | None = None) -> None:
    """Write a target's new state (targets.transition's verdict). A new declaration
    restarts its binding (tokens signed before it no longer verify) and owes a notice
    from `notice_due` on."""
    failures = "failures = 0, first_failure = NULL, last_failure = NULL, last_error = NULL," \
        if change.clear_failures else ""
    declared = ", declared_at = ?, notice_due = ?" if change.notice else ""
    extra = (now, now if notice_due is None else notice_due) if change.notice else ()
    conn.execute(
        f"UPDATE targets SET {failures} state = ?, confirmed = ?, why = ?,"
        f" changed_at = ?{declared} WHERE id = ?",
        (change.state.value, int(change.confirmed), why, now, *extra, row.id))


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, conn: Db) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
