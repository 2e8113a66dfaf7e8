"""The term-time import's SQL, and replacing an account's set of targets.

An import compares the whole file with the directory in two reads (no query per row) and
writes every change in one transaction, with `executemany` over the rows that change:
100,000 rows stay well under 10 s (tests/test_import.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from forwarder.directory.model import (
    Declared,
    ImportPlan,
    ImportReport,
    ImportRow,
    TargetRow,
)
from forwarder.directory.rows import load_account
from forwarder.policy import AccountState

if TYPE_CHECKING:
    from forwarder.directory.rows import Db

Current = tuple[str, tuple[str, ...]]  # an account's state and targets, in order


def current(conn: Db) -> dict[str, Current]:
    states = dict(conn.execute("SELECT address, state FROM accounts").fetchall())
    targets: dict[str, list[str]] = {}
    for address, target in conn.execute(
            "SELECT address, target FROM targets ORDER BY address, position"):
        targets.setdefault(address, []).append(target)
    return {address: (state, tuple(targets.get(address, ())))
            for address, state in states.items()}


def plan(conn: Db, rows: Sequence[ImportRow]) -> ImportPlan:
    """Compare the rows with the directory as it is now."""
    now = current(conn)
    report = ImportReport()
    writes: list[tuple[ImportRow, Current | None]] = []
    deleted, active = AccountState.DELETED, AccountState.ACTIVE.value
    for row in rows:
        old = now.get(row.address)
        if old is None:
            report.added += 1
            report.declared += len(row.targets)
        elif old[0] == row.state.value and old[1] == row.targets:
            report.unchanged += 1
            continue
        elif old[0] == active and row.state is deleted:
            report.deleted += 1
        else:
            report.changed += 1
        if old is not None and old[1] != row.targets:
            report.declared += len(set(row.targets) - set(old[1]))
        writes.append((row, old))
    return ImportPlan(report, writes)


def _doc(state: str, targets: tuple[str, ...]) -> str:
    """The audit's account values (rows.account_doc) as JSON, for 100,000 rows at a time:
    written out directly when nothing in them needs escaping (validated addresses are
    printable ASCII without quotes or backslashes), a third of json.dumps's time."""
    listed = '", "'.join(targets)
    if listed.isascii() and listed.isprintable() and '"' not in listed \
            and "\\" not in listed:
        items = '"' + listed + '"' if targets else ""
        return '{"state": "' + state + '", "targets": [' + items + ']}'
    return json.dumps({"state": state, "targets": list(targets)})


def write(conn: Db, plan: ImportPlan, actor: str,
          now: float) -> list[Declared]:
    """Apply the plan (inside the caller's transaction); return the targets declared."""
    conn.executemany(
        "INSERT INTO accounts (address, state, created_at, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (address) DO UPDATE SET state = excluded.state,"
        " updated_at = excluded.updated_at",
        [(row.address, row.state.value, now, now) for row, _ in plan.writes],
    )
    why = f"declared by {actor} (import) on {datetime.fromtimestamp(now, UTC):%Y-%m-%d}"
    declared: list[Declared] = []
    fresh = [row for row, old in plan.writes if old is None and row.targets]
    declared += _insert_new(conn, fresh, now, why)
    for row, old in plan.writes:
        if old is not None and old[1] != row.targets:
            declared += replace_targets(conn, row.address, _rows_of(conn, row.address),
                                        row.targets, now, why, now)
    conn.executemany(
        "INSERT INTO audit (at, actor, action, address, old, new)"
        " VALUES (?, ?, 'import', ?, ?, ?)",
        [(now, actor, row.address, None if old is None else _doc(*old),
          _doc(row.state.value, row.targets)) for row, old in plan.writes],
    )
    return declared


def _next_id(conn: Db) -> int:
    return int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM targets").fetchone()[0])


def _insert_new(conn: Db, rows: Sequence[ImportRow], now: float,
                why: str) -> list[Declared]:
    """Every target of new accounts, in one `executemany`; the ids are given here (under
    the transaction's write lock), as a token needs each one. Their notices are owed at
    once, and the daemon sends them at its own pace."""
    next_id = _next_id(conn)
    values = []
    declared = []
    for row in rows:
        for position, target in enumerate(row.targets):
            values.append((next_id, row.address, position, target, why, now, now, now))
            declared.append(Declared(next_id, row.address, target, now))
            next_id += 1
    conn.executemany(
        "INSERT INTO targets (id, address, position, target, state, why, declared_at,"
        " changed_at, notice_due) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)", values)
    return declared


def _rows_of(conn: Db, address: str) -> list[TargetRow]:
    account = load_account(conn, address)
    return [] if account is None else list(account.targets)


def replace_targets(conn: Db, address: str, old: Sequence[TargetRow],
                    targets: Sequence[str], now: float, why: str,
                    notice_due: float) -> tuple[Declared, ...]:
    """Make `targets` the account's set, in that order: a target kept by value keeps its
    state (and its id: notices already sent stay valid), a new one is `pending` and owes
    a notice from `notice_due` on, a missing one is removed."""
    kept = {row.target: row for row in old}
    conn.executemany("DELETE FROM targets WHERE id = ?",
                     [(row.id,) for row in old if row.target not in targets])
    declared = []
    for position, target in enumerate(targets):
        row = kept.get(target)
        if row is not None:
            conn.execute("UPDATE targets SET position = ? WHERE id = ?", (position, row.id))
            continue
        # The id given here, under the write lock, as SQLite would (max + 1), so that both
        # backends number targets alike and an import's ids never collide with them.
        target_id = _next_id(conn)
        conn.execute(
            "INSERT INTO targets (id, address, position, target, state, why, declared_at,"
            " changed_at, notice_due) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            (target_id, address, position, target, why, now, now, notice_due))
        declared.append(Declared(target_id, address, target, now))
    return tuple(declared)
