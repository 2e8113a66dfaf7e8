"""`Directory`: the SQLite backend of `AdminDirectory`, for the `forwarder` command.

Admin commands run outside any event loop and use the stdlib `sqlite3` directly. Every
write is one transaction holding its audit entries (who: the invoking OS user, when, what,
old and new values), so the trail cannot miss a change.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwarder.directory import imports
from forwarder.directory.model import (
    ADMIN_NOTICE_GRACE,
    AccountRow,
    Declared,
    DirectoryError,
    Imported,
    ImportPlan,
    ImportRow,
    TargetRow,
    Written,
)
from forwarder.directory.rows import (
    TARGET_COLUMNS,
    Transaction,
    account_doc,
    apply_change,
    audit,
    day,
    load_account,
    require_account,
    target_doc,
    target_row,
)
from forwarder.directory.schema import PURGED, connect
from forwarder.directory.secrets import (
    load_token_secrets,
    rotate_token_secrets,
    token_secrets_path,
)
from forwarder.policy import AccountState
from forwarder.senders import SenderCount
from forwarder.targets import MAX_TARGETS, Event, TargetState, transition
from forwarder.tokens import Binding

if TYPE_CHECKING:
    from forwarder.directory.rows import Db


def invoking_user() -> str:
    """Who runs the admin command: the sudo caller if any, else the OS user."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def check_target_list(address: str, targets: Sequence[str]) -> None:
    if isinstance(targets, str):  # a str is a Sequence[str] too: one letter per target
        raise TypeError("targets must be a list of addresses, not one string")
    if len(targets) > MAX_TARGETS:
        raise DirectoryError(f"{address}: {len(targets)} targets given; at most "
                             f"{MAX_TARGETS} are allowed")
    seen: set[str] = set()
    for target in targets:
        if target in seen:
            raise DirectoryError(f"{address}: target {target} given twice")
        seen.add(target)


class Directory:
    """The directory for admin commands and tests (synchronous)."""

    def __init__(
        self,
        path: Path,
        busy_timeout: float = 5.0,
        actor: str | None = None,
        now: Callable[[], float] = time.time,
        conn: Db | None = None,
    ) -> None:
        self.path = path
        # The SQLite file at `path`, or a connection to another backend's database.
        self.conn: Db = conn if conn is not None else connect(path, busy_timeout)
        self.actor = actor or invoking_user()
        self.now = now

    def close(self) -> None:
        self.conn.close()

    # --- reads ---------------------------------------------------------------------------

    def get(self, address: str) -> AccountRow | None:
        return load_account(self.conn, address)

    def require(self, address: str) -> AccountRow:
        return require_account(self.conn, address)

    def accounts(self, state: AccountState | None = None, with_targets: bool | None = None,
                 target_state: TargetState | None = None) -> Iterator[AccountRow]:
        """Accounts in address order; `target_state`: those with a target in that state."""
        where: list[str] = []
        args: list[str] = []
        if state is not None:
            where.append("a.state = ?")
            args.append(state.value)
        exists = "EXISTS (SELECT 1 FROM targets t WHERE t.address = a.address{})"
        if with_targets is not None:
            where.append(("" if with_targets else "NOT ") + exists.format(""))
        if target_state is not None:
            where.append(exists.format(" AND t.state = ?"))
            args.append(target_state.value)
        sql = "SELECT a.address, a.state, a.created_at, a.updated_at FROM accounts a"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.conn.execute(sql + " ORDER BY a.address", args).fetchall()
        targets: dict[str, list[TargetRow]] = {}
        for row in self.conn.execute(f"SELECT address, {TARGET_COLUMNS} FROM targets"
                                     " ORDER BY address, position"):
            targets.setdefault(row[0], []).append(target_row(row[1:]))
        for address, account_state, created, updated in rows:
            yield AccountRow(address, AccountState(account_state), created, updated,
                             tuple(targets.get(address, ())))

    def binding(self, target_id: int) -> Binding | None:
        row = self.conn.execute("SELECT address, target, declared_at FROM targets"
                                " WHERE id = ?", (target_id,)).fetchone()
        return None if row is None else Binding(row[0], row[1], row[2])

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

    # --- writes: each one a transaction with its audit entry ---------------------------

    def add(self, address: str, targets: Sequence[str] = ()) -> Written:
        check_target_list(address, targets)
        with Transaction(self.conn):
            old = self.get(address)
            if old is not None:
                raise DirectoryError(f"{address}: account already exists ({old.state.value})")
            now = self.now()
            self.conn.execute("INSERT INTO accounts (address, state, created_at, updated_at)"
                              " VALUES (?, 'active', ?, ?)", (address, now, now))
            declared = self._replace_targets(address, (), targets, now)
            audit(self.conn, now, self.actor, "add", address, None,
                  account_doc("active", targets))
        return Written(self.require(address), declared)

    def set_targets(self, address: str, targets: Sequence[str]) -> Written:
        """Declare, change (or with none withdraw) the targets; no-op if unchanged."""
        check_target_list(address, targets)
        with Transaction(self.conn):
            old = self.require(address)
            before = [t.target for t in old.targets]
            if before == list(targets):
                return Written(old)
            now = self.now()
            declared = self._replace_targets(address, old.targets, targets, now)
            self._touch(address, now)
            audit(self.conn, now, self.actor, "redirect" if targets else "unredirect",
                  address, account_doc(old.state.value, before),
                  account_doc(old.state.value, targets))
        return Written(self.require(address), declared)

    def switch_target(self, address: str, target: str, on: bool) -> Written:
        """An admin switches one target on (the school declares it again: a refused or
        failing target comes back pending, with a new notice) or off."""
        with Transaction(self.conn):
            account = self.require(address)
            row = account.target(target)
            if row is None:
                declared = ", ".join(t.target for t in account.targets) or "none"
                raise DirectoryError(f"{address}: {target} is not one of its targets "
                                     f"({declared})")
            change = transition(row.state, row.confirmed, Event.ON if on else Event.OFF)
            if not change.changes(row.state, row.confirmed):
                return Written(account)
            now = self.now()
            verb = "declared again" if change.notice else f"switched {'on' if on else 'off'}"
            apply_change(self.conn, row, change, f"{verb} by {self.actor} on {day(now)}", now,
                         now + ADMIN_NOTICE_GRACE)
            self._touch(address, now)
            audit(self.conn, now, self.actor, "on" if on else "off", address,
                  target_doc(target, row.state), target_doc(target, change.state))
            notices = (Declared(row.id, address, target, now),) if change.notice else ()
        return Written(self.require(address), notices)

    def delete(self, address: str) -> Written:
        """The school account is deleted: the targets are kept (PRODUCT.md lifecycle)."""
        with Transaction(self.conn):
            old = self.require(address)
            if old.state is AccountState.DELETED:
                raise DirectoryError(f"{address}: account is already deleted")
            now = self.now()
            self.conn.execute("UPDATE accounts SET state = 'deleted', updated_at = ?"
                              " WHERE address = ?", (now, address))
            targets = [t.target for t in old.targets]
            audit(self.conn, now, self.actor, "delete", address,
                  account_doc(old.state.value, targets), account_doc("deleted", targets))
        return Written(self.require(address))

    def purge(self, address: str) -> None:
        """Erase the row, its targets and the personal data of its audit entries (GDPR
        right to erasure). The entries themselves stay (who changed something, when,
        what kind of change), so the trail still shows that an erasure happened, but no
        longer of whom."""
        with Transaction(self.conn):
            self.require(address)
            self.conn.execute("DELETE FROM accounts WHERE address = ?", (address,))
            self.conn.execute(
                "UPDATE audit SET address = ?, old = NULL, new = NULL WHERE address = ?",
                (PURGED, address),
            )
            audit(self.conn, self.now(), self.actor, "purge", PURGED, None, None)

    # --- import --------------------------------------------------------------------------

    def plan_import(self, rows: Sequence[ImportRow]) -> ImportPlan:
        return imports.plan(self.conn, rows)

    def import_rows(
        self,
        rows: Sequence[ImportRow],
        dry_run: bool = False,
        verify: Callable[[ImportPlan], None] | None = None,
    ) -> Imported:
        """Apply every row in one transaction (all-or-nothing); report what changed and
        the targets declared. The plan is recomputed under the write lock, so a change
        made by another admin since a dry run is counted right; `verify` may refuse the
        plan (by raising)."""
        if dry_run:
            plan = self.plan_import(rows)
            if verify is not None:
                verify(plan)
            return Imported(plan.report)
        with Transaction(self.conn):
            plan = self.plan_import(rows)
            if verify is not None:
                verify(plan)
            declared = imports.write(self.conn, plan, self.actor, self.now())
        return Imported(plan.report, tuple(declared))

    def notices_sent(self, target_ids: Sequence[int]) -> None:
        with Transaction(self.conn):
            self.conn.executemany("UPDATE targets SET notice_due = NULL WHERE id = ?",
                                  [(target_id,) for target_id in target_ids])

    # --- token secrets -------------------------------------------------------------------

    def token_secrets(self) -> list[bytes]:
        return load_token_secrets(token_secrets_path(self.path.parent))

    def rotate_token_secrets(self) -> int:
        return rotate_token_secrets(token_secrets_path(self.path.parent))

    # --- helpers -------------------------------------------------------------------------

    def _touch(self, address: str, now: float) -> None:
        self.conn.execute("UPDATE accounts SET updated_at = ? WHERE address = ?",
                          (now, address))

    def _replace_targets(self, address: str, old: Sequence[TargetRow],
                         targets: Sequence[str], now: float) -> tuple[Declared, ...]:
        return imports.replace_targets(self.conn, address, old, targets, now,
                                       f"declared by {self.actor} on {day(now)}",
                                       now + ADMIN_NOTICE_GRACE)

