"""The SQLite directory of addresses: schema and migrations, admin writes, daemon reads.

The directory is its own file (DESIGN.md: a bulk import never stalls the queue). It runs in
WAL mode so the daemon's reads never wait for an admin's write transaction, and the daemon
reads it on every RCPT with no cache, so an admin change applies to the next RCPT.

Admin commands run outside any event loop and use the stdlib `sqlite3` directly; the
daemon uses aiosqlite so that a lookup never blocks the loop.
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from forwarder import migrations
from forwarder.policy import Account, AccountState
from forwarder.senders import SenderCount

# Each entry upgrades the schema from version N to N+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE accounts (
        address    TEXT PRIMARY KEY,          -- local part lower-cased, '@', domain
        state      TEXT NOT NULL CHECK (state IN ('active', 'deleted')),
        redirect   TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    -- Append-only audit trail: triggers forbid UPDATE of history except the purge's
    -- erasure of personal data, and forbid DELETE altogether.
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        address TEXT NOT NULL,
        old     TEXT,
        new     TEXT
    );
    CREATE INDEX audit_address ON audit (address);
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    """
    -- The only change allowed to a past entry is a purge's erasure of personal data
    -- (GDPR art. 17): the address and values go, who did what and when stays.
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        WHEN NOT (NEW.id = OLD.id AND NEW.at = OLD.at AND NEW.actor = OLD.actor
                  AND NEW.action = OLD.action AND NEW.address = '(purged)'
                  AND NEW.old IS NULL AND NEW.new IS NULL)
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    """
    -- Per From domain and UTC day: how its mail passed DMARC (forwarder/senders.py), for
    -- `forwarder report senders`. Counts only: no addresses, nothing about a person.
    CREATE TABLE sender_stats (
        domain       TEXT NOT NULL,
        day          INTEGER NOT NULL,           -- days since 1970-01-01, UTC
        dkim_aligned INTEGER NOT NULL DEFAULT 0, -- DMARC passed through aligned DKIM
        spf_only     INTEGER NOT NULL DEFAULT 0, -- passed through SPF alone
        unaligned    INTEGER NOT NULL DEFAULT 0, -- neither
        policy       TEXT NOT NULL DEFAULT '',   -- the domain's DMARC p= as last seen
        PRIMARY KEY (domain, day)
    ) WITHOUT ROWID;
    """,
)
PURGED = "(purged)"
SCHEMA_VERSION = len(MIGRATIONS)


class DirectoryError(Exception):
    """A refused admin operation; the message is the one-line reason shown to the admin."""


def connect(path: Path, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the directory; return an autocommit connection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # Admin writes are rare and must survive a crash just as queue writes do.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrations.migrate(conn, MIGRATIONS, "directory", DirectoryError)
    return conn


def count_active(path: Path, busy_timeout: float = 5.0) -> int:
    """Active accounts in the directory, read-only; 0 if there is no directory yet."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=busy_timeout)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
            return 0
        return int(conn.execute(
            "SELECT count(*) FROM accounts WHERE state = 'active'").fetchone()[0])
    finally:
        conn.close()


def _row_to_account(row: tuple[str, str, str | None]) -> Account:
    return Account(row[0], AccountState(row[1]), row[2])


def invoking_user() -> str:
    """Who runs the admin command: the sudo caller if any, else the OS user."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


@dataclass(frozen=True)
class AccountRow:
    address: str
    state: AccountState
    redirect: str | None
    created_at: float
    updated_at: float

    @property
    def account(self) -> Account:
        return Account(self.address, self.state, self.redirect)


@dataclass
class ImportReport:
    added: int = 0
    changed: int = 0
    deleted: int = 0  # active -> deleted: graduations
    unchanged: int = 0


@dataclass(frozen=True)
class ImportRow:
    line: int
    address: str
    redirect: str | None
    state: AccountState


@dataclass
class ImportPlan:
    """What an import would do against the directory as it is now."""

    report: ImportReport
    # (row, old state and redirect or None when new) for every row that changes something
    writes: list[tuple[ImportRow, tuple[str, str | None] | None]]

    def declared(self) -> list[tuple[int, str]]:
        """(line, target) of each redirect this import declares or changes: the ones to
        validate (PRODUCT.md: a target is validated when declared, not every term again)."""
        return [(row.line, row.redirect) for row, old in self.writes
                if row.redirect and (old is None or old[1] != row.redirect)]

    def new_targets(self) -> set[str]:
        return {target for _, target in self.declared()}


_COLUMNS = "address, state, redirect, created_at, updated_at"


def _account_row(row: tuple[Any, ...]) -> AccountRow:
    return AccountRow(row[0], AccountState(row[1]), row[2], row[3], row[4])


def _values(state: str, redirect: str | None) -> str:
    return json.dumps({"state": state, "redirect": redirect})


class Directory:
    """Admin access to the directory (synchronous; CLI and tests).

    Every write is one transaction holding its audit entries (who: the invoking OS user,
    when, what, old and new values), so the trail cannot miss a change.
    """

    def __init__(
        self,
        path: Path,
        busy_timeout: float = 5.0,
        actor: str | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.conn = connect(path, busy_timeout)
        self.actor = actor or invoking_user()
        self.now = now

    def close(self) -> None:
        self.conn.close()

    def get(self, address: str) -> AccountRow | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM accounts WHERE address = ?", (address,)).fetchone()
        return None if row is None else _account_row(row)

    def require(self, address: str) -> AccountRow:
        row = self.get(address)
        if row is None:
            raise DirectoryError(f"{address}: no such account")
        return row

    def accounts(
        self, state: AccountState | None = None, with_redirect: bool | None = None
    ) -> Iterator[AccountRow]:
        where: list[str] = []
        args: list[str] = []
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        if with_redirect is True:
            where.append("redirect IS NOT NULL")
        elif with_redirect is False:
            where.append("redirect IS NULL")
        sql = f"SELECT {_COLUMNS} FROM accounts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        for row in self.conn.execute(sql + " ORDER BY address", args):
            yield _account_row(row)

    # --- writes: each one a transaction with its audit entry ---------------------------

    def add(self, address: str, redirect: str | None = None) -> AccountRow:
        with self._transaction():
            old = self.get(address)
            if old is not None:
                raise DirectoryError(f"{address}: account already exists ({old.state.value})")
            self._upsert(address, AccountState.ACTIVE, redirect, None, "add")
        return self.require(address)

    def set_redirect(self, address: str, redirect: str | None) -> AccountRow:
        """Declare, change (or with None withdraw) the redirect; no-op if unchanged."""
        with self._transaction():
            old = self.require(address)
            if old.redirect != redirect:
                action = "redirect" if redirect else "unredirect"
                self._upsert(address, old.state, redirect, old, action)
        return self.require(address)

    def delete(self, address: str) -> AccountRow:
        """The school account is deleted: the redirect is kept (PRODUCT.md lifecycle)."""
        with self._transaction():
            old = self.require(address)
            if old.state is AccountState.DELETED:
                raise DirectoryError(f"{address}: account is already deleted")
            self._upsert(address, AccountState.DELETED, old.redirect, old, "delete")
        return self.require(address)

    def purge(self, address: str) -> None:
        """Erase the row and the personal data of its audit entries (GDPR right to erasure).

        The entries themselves stay (who changed something, when, what kind of change),
        so the trail still shows that an erasure happened, but no longer of whom.
        """
        with self._transaction():
            self.require(address)
            self.conn.execute("DELETE FROM accounts WHERE address = ?", (address,))
            self.conn.execute(
                "UPDATE audit SET address = ?, old = NULL, new = NULL WHERE address = ?",
                (PURGED, address),
            )
            self._audit("purge", PURGED, None, None)

    def history(self, address: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT at, actor, action, old, new FROM audit WHERE address = ? ORDER BY id",
            (address,),
        )
        return [
            {"at": at, "actor": actor, "action": action,
             "old": json.loads(old) if old else None, "new": json.loads(new) if new else None}
            for at, actor, action, old, new in rows
        ]

    def sender_report(self, since_day: int) -> list[SenderCount]:
        """Per From domain, the counts of the days from `since_day` on, added up; the
        policy is the one seen last. Unordered: the report decides what is worst."""
        rows = self.conn.execute(
            "SELECT domain, sum(dkim_aligned), sum(spf_only), sum(unaligned),"
            " (SELECT policy FROM sender_stats AS last WHERE last.domain = s.domain"
            "  ORDER BY day DESC LIMIT 1)"
            " FROM sender_stats AS s WHERE day >= ? GROUP BY domain", (since_day,))
        return [SenderCount(domain, since_day, dkim, spf, none, policy or "")
                for domain, dkim, spf, none, policy in rows]

    # --- import --------------------------------------------------------------------------

    def plan_import(self, rows: Iterable[ImportRow]) -> ImportPlan:
        """Compare the rows with the directory in one read (no query per row)."""
        current: dict[str, tuple[str, str | None]] = {
            address: (state, redirect) for address, state, redirect
            in self.conn.execute("SELECT address, state, redirect FROM accounts")}
        report = ImportReport()
        writes: list[tuple[ImportRow, tuple[str, str | None] | None]] = []
        for row in rows:
            old = current.get(row.address)
            if old is None:
                report.added += 1
            elif old == (row.state.value, row.redirect):
                report.unchanged += 1
                continue
            elif old[0] == AccountState.ACTIVE.value and row.state is AccountState.DELETED:
                report.deleted += 1
            else:
                report.changed += 1
            writes.append((row, old))
        return ImportPlan(report, writes)

    def import_rows(
        self,
        rows: Sequence[ImportRow],
        dry_run: bool = False,
        verify: Callable[[ImportPlan], None] | None = None,
    ) -> ImportReport:
        """Apply every row in one transaction (all-or-nothing); report what changed.

        The plan is recomputed under the write lock, so a change made by another admin
        since a dry run is counted right; `verify` may refuse the plan (by raising).
        """
        if dry_run:
            plan = self.plan_import(rows)
            if verify is not None:
                verify(plan)
            return plan.report
        with self._transaction():
            plan = self.plan_import(rows)
            if verify is not None:
                verify(plan)
            self._write_plan(plan)
        return plan.report

    def _write_plan(self, plan: ImportPlan) -> None:
        now = self.now()
        self.conn.executemany(
            "INSERT INTO accounts (address, state, redirect, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET"
            " state = excluded.state, redirect = excluded.redirect,"
            " updated_at = excluded.updated_at",
            [(row.address, row.state.value, row.redirect, now, now) for row, _ in plan.writes],
        )
        self.conn.executemany(
            "INSERT INTO audit (at, actor, action, address, old, new)"
            " VALUES (?, ?, 'import', ?, ?, ?)",
            [(now, self.actor, row.address, None if old is None else _values(*old),
              _values(row.state.value, row.redirect)) for row, old in plan.writes],
        )

    # --- helpers -------------------------------------------------------------------------

    def _upsert(
        self,
        address: str,
        state: AccountState,
        redirect: str | None,
        old: AccountRow | None,
        action: str,
    ) -> None:
        now = self.now()
        self.conn.execute(
            "INSERT INTO accounts (address, state, redirect, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET"
            " state = excluded.state, redirect = excluded.redirect,"
            " updated_at = excluded.updated_at",
            (address, state.value, redirect, now, now),
        )
        old_doc = None if old is None else {"state": old.state.value, "redirect": old.redirect}
        self._audit(action, address, old_doc, {"state": state.value, "redirect": redirect})

    def _audit(
        self, action: str, address: str, old: dict[str, Any] | None,
        new: dict[str, Any] | None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO audit (at, actor, action, address, old, new) VALUES (?, ?, ?, ?, ?, ?)",
            (self.now(), self.actor, action, address,
             None if old is None else json.dumps(old), None if new is None else json.dumps(new)),
        )

    def _transaction(self, commit: bool = True) -> _Transaction:
        return _Transaction(self.conn, commit)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error or when `commit` is false."""

    def __init__(self, conn: sqlite3.Connection, commit: bool) -> None:
        self.conn = conn
        self.commit = commit

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None and self.commit else "ROLLBACK")


_ADD_SENDER_COUNTS = (
    "INSERT INTO sender_stats (domain, day, dkim_aligned, spf_only, unaligned, policy)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (domain, day) DO UPDATE SET"
    " dkim_aligned = dkim_aligned + excluded.dkim_aligned,"
    " spf_only = spf_only + excluded.spf_only,"
    " unaligned = unaligned + excluded.unaligned,"
    " policy = CASE WHEN excluded.policy = '' THEN policy ELSE excluded.policy END")


class DirectoryReader:
    """The daemon's view: one point lookup per RCPT through aiosqlite's thread. Its one
    write is the sender counts, added in one transaction now and then (record_senders),
    on a connection of its own so the lookups' connection stays read-only."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, busy_timeout: float) -> None:
        self._conn = conn
        self._path = path
        self._busy_timeout = busy_timeout
        self._writer: aiosqlite.Connection | None = None

    @classmethod
    async def open(cls, path: Path, busy_timeout: float) -> DirectoryReader:
        connect(path, busy_timeout).close()  # create and migrate before serving
        conn = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
        await conn.execute("PRAGMA query_only=ON")
        return cls(conn, path, busy_timeout)

    async def record_senders(self, rows: Sequence[SenderCount]) -> None:
        """Add the counts to the sender report, all in one transaction."""
        if self._writer is None:
            self._writer = await aiosqlite.connect(self._path, timeout=self._busy_timeout,
                                                   isolation_level=None)
        writer = self._writer
        await writer.execute("BEGIN IMMEDIATE")
        try:
            await writer.executemany(_ADD_SENDER_COUNTS, [
                (r.domain, r.day, r.dkim_aligned, r.spf_only, r.unaligned, r.policy)
                for r in rows])
            await writer.execute("COMMIT")
        except BaseException:
            await writer.execute("ROLLBACK")
            raise

    async def lookup(self, address: str) -> Account | None:
        # One hop to aiosqlite's thread (execute, fetch and close there), not three.
        rows = await self._conn.execute_fetchall(
            "SELECT address, state, redirect FROM accounts WHERE address = ?", (address,))
        for row in rows:
            return _row_to_account((row[0], row[1], row[2]))
        return None

    async def close(self) -> None:
        await self._conn.close()
        if self._writer is not None:
            await self._writer.close()
