"""The daemon's writes to the SQLite directory, synchronous: `SqliteDaemonDirectory` runs
them on a thread of its own (directory/daemon.py), never on the event loop.

They are few: a confirm+ or refuse+ message consumed, a target's mailbox failures and the
successes that matter (targets.py's dead-target rule), and `last_success` kept fresh.
Each is one transaction with its audit entries, like an admin's write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.directory.model import (
    NOTICE_LEASE,
    Declared,
    StateChange,
    TargetResult,
    TokenUse,
)
from forwarder.directory.rows import (
    TARGET_COLUMNS,
    Transaction,
    apply_change,
    audit,
    day,
    target_doc,
    target_row,
)
from forwarder.directory.schema import connect
from forwarder.policy import Consume
from forwarder.senders import SenderCount
from forwarder.targets import (
    DeadRule,
    Event,
    Health,
    TargetState,
    after_failure,
    after_success,
    is_dead,
    transition,
)
from forwarder.tokens import TokenKind

if TYPE_CHECKING:
    from forwarder.directory.rows import Db

_ADD_SENDER_COUNTS = (
    "INSERT INTO sender_stats (domain, day, dkim_aligned, spf_only, unaligned, policy)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (domain, day) DO UPDATE SET"
    " dkim_aligned = sender_stats.dkim_aligned + excluded.dkim_aligned,"
    " spf_only = sender_stats.spf_only + excluded.spf_only,"
    " unaligned = sender_stats.unaligned + excluded.unaligned,"
    " policy = CASE WHEN excluded.policy = '' THEN sender_stats.policy"
    " ELSE excluded.policy END")

# Who the audit names for the daemon's own writes.
DAEMON_ACTOR = "forwarder"
MAIL_ACTOR = "mail"


class Upkeep:
    """One connection to the directory, for the daemon's writes."""

    def __init__(self, conn: Db) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: Path, busy_timeout: float) -> Upkeep:
        return cls(connect(path, busy_timeout))

    def close(self) -> None:
        self.conn.close()

    def consume(self, use: Consume, client: str, sender: str, automatic: bool,
                now: float) -> TokenUse:
        """Apply a confirm+ or refuse+ message; idempotent. Audited with the time, the
        client address and the envelope sender, whether or not anything changed."""
        with Transaction(self.conn):
            found = self.conn.execute(
                f"SELECT {TARGET_COLUMNS} FROM targets WHERE id = ? AND address = ?"
                " AND target = ?", (use.target_id, use.account, use.target)).fetchone()
            if found is None:
                # Removed since RCPT (a purged account leaves nothing, not even here).
                exists = self.conn.execute("SELECT 1 FROM accounts WHERE address = ?",
                                           (use.account,)).fetchone()
                if exists:
                    audit(self.conn, now, MAIL_ACTOR, use.reason, use.account, None,
                          target_doc(use.target, None, client=client, sender=sender,
                                     ignored="no longer declared"))
                return TokenUse(use.account, use.target, None, None, "no longer declared")
            row = target_row(found)
            event = Event.CONFIRM if use.kind is TokenKind.CONFIRM else Event.REFUSE
            change = transition(row.state, row.confirmed, event)
            ignored = None
            if automatic:
                ignored, after = "automatic reply", row.state
            else:
                after = change.state
                if change.changes(row.state, row.confirmed):
                    verb = "confirmed" if event is Event.CONFIRM else "refused"
                    apply_change(self.conn, row, change,
                                 f"{verb} by a message from <{sender}> ({client}) on "
                                 f"{day(now)}", now)
                elif after is row.state:
                    ignored = f"already {after.value}"
            extra = {"client": client, "sender": sender}
            if ignored:
                extra["ignored"] = ignored
            audit(self.conn, now, MAIL_ACTOR, use.reason, use.account,
                  target_doc(row.target, row.state), target_doc(row.target, after, **extra))
        return TokenUse(use.account, use.target, row.state, after, ignored)

    def record(self, results: Sequence[TargetResult], rule: DeadRule) -> list[StateChange]:
        """Record delivery results in order, in one transaction; apply the dead-target
        rule; return the targets that moved."""
        changes = []
        with Transaction(self.conn):
            for result in results:
                change = self._record_one(result, rule)
                if change is not None:
                    changes.append(change)
        return changes

    def _record_one(self, result: TargetResult, rule: DeadRule) -> StateChange | None:
        found = self.conn.execute(
            f"SELECT {TARGET_COLUMNS} FROM targets WHERE address = ? AND target = ?",
            (result.account, result.target)).fetchone()
        if found is None:
            return None
        row = target_row(found)
        if result.delivered:
            health, error = after_success(row.health, result.when), row.last_error
            event = Event.ALIVE if health.failures == 0 else None
        else:
            health, error = after_failure(row.health, result.when), result.error
            event = Event.DEAD if is_dead(health, rule) else None
        if health == row.health and error == row.last_error and event is None:
            return None
        self._write_health(row.id, health, error if health.failures else None)
        if event is None:
            return None
        change = transition(row.state, row.confirmed, event)
        if change.state is row.state:
            return None
        why = self._why(change.state, health, error, result.when)
        apply_change(self.conn, row, change, why, result.when)
        action = "failing" if change.state is TargetState.FAILING else "recovered"
        detail = {"failures": health.failures, "last_error": error} \
            if action == "failing" else {}
        audit(self.conn, result.when, DAEMON_ACTOR, action, result.account,
              target_doc(row.target, row.state), target_doc(row.target, change.state,
                                                            **detail))
        return StateChange(result.account, row.target, row.state, change.state, health,
                           error, self._others_on(result.account, row.target))

    def _write_health(self, target_id: int, health: Health, error: str | None) -> None:
        self.conn.execute(
            "UPDATE targets SET failures = ?, first_failure = ?, last_failure = ?,"
            " last_success = ?, last_error = ? WHERE id = ?",
            (health.failures, health.first_failure, health.last_failure,
             health.last_success, error, target_id))

    @staticmethod
    def _why(state: TargetState, health: Health, error: str | None, when: float) -> str:
        if state is TargetState.FAILING and health.first_failure is not None:
            return (f"{health.failures} mailbox failures from {day(health.first_failure)} to "
                    f"{day(when)} with no delivery between; last: {error or 'unknown'}")
        return f"delivered again on {day(when)}"

    def _others_on(self, account: str, target: str) -> tuple[str, ...]:
        rows = self.conn.execute(
            "SELECT target FROM targets WHERE address = ? AND target != ?"
            " AND state IN ('pending', 'confirmed') ORDER BY position", (account, target))
        return tuple(row[0] for row in rows)

    def claim_notices(self, limit: int, now: float) -> list[Declared]:
        """The `limit` notices owed longest (by the partial index: only those rows are
        read, however many are owed), claimed for NOTICE_LEASE; those of targets no longer
        pending are dropped, so this may claim fewer."""
        with Transaction(self.conn):
            rows = self.conn.execute(
                "SELECT id, address, target, declared_at, state FROM targets"
                " WHERE notice_due <= ? ORDER BY notice_due LIMIT ?", (now, limit)).fetchall()
            self.conn.executemany(
                "UPDATE targets SET notice_due = ? WHERE id = ?",
                [(now + NOTICE_LEASE if row[4] == "pending" else None, row[0]) for row in rows])
        return [Declared(*row[:4]) for row in rows if row[4] == "pending"]

    def notices_sent(self, target_ids: Sequence[int]) -> None:
        with Transaction(self.conn):
            self.conn.executemany("UPDATE targets SET notice_due = NULL WHERE id = ?",
                                  [(target_id,) for target_id in target_ids])

    def record_senders(self, rows: Sequence[SenderCount]) -> None:
        """Add the counts to the sender report (forwarder/senders.py), in one transaction."""
        with Transaction(self.conn):
            self.conn.executemany(_ADD_SENDER_COUNTS, [
                (r.domain, r.day, r.dkim_aligned, r.spf_only, r.unaligned, r.policy)
                for r in rows])

    def target_counts(self) -> dict[TargetState, int]:
        rows = self.conn.execute("SELECT state, count(*) FROM targets GROUP BY state")
        return {TargetState(state): count for state, count in rows}

    def refresh_successes(self, seen: Sequence[tuple[str, str, float]]) -> None:
        """`last_success` for targets with nothing else to record; never moves it back."""
        if not seen:
            return
        with Transaction(self.conn):
            self.conn.executemany(
                "UPDATE targets SET last_success = ? WHERE address = ? AND target = ?"
                " AND coalesce(last_success, 0) < ?",
                [(when, account, target, when) for account, target, when in seen])

