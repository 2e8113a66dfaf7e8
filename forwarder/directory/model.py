"""The directory's interface: what goes in and comes out, and the two faces of a backend.

Every read and write of the directory (accounts, targets and their states, the failure
and success record, token secrets, the audit trail) goes through one of two interfaces,
so that another backend (PostgreSQL, for several nodes) can stand in for SQLite:

- `AdminDirectory`, synchronous, for the `forwarder` command;
- `DaemonDirectory`, asynchronous, for the daemon: RCPT's lookup (one indexed read giving
  the account and its targets) and the few writes the daemon makes (a confirm+ or refuse+
  message consumed, a target's failures and successes, a target turning `failing`, the
  sender report's counts).

What a backend must guarantee, whatever its engine:

- each write is one transaction holding its audit entries (who, when, what, old and new
  values), so the trail cannot miss a change; an import is one transaction, all or
  nothing;
- the audit is append-only, enforced by the database itself (SQLite: triggers); the only
  change allowed to a past entry is a purge's erasure of the address and values;
- a change committed by an admin applies to the next RCPT (no cache in the daemon);
- a target's id is stable while the target exists, and `binding` returns what a token
  was signed over (forwarder/tokens.py);
- token secrets: a list, the first one signs, every one verifies; created on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from forwarder.policy import Account, AccountState, Consume
from forwarder.senders import SenderCount
from forwarder.targets import DeadRule, Health, TargetState, TargetView
from forwarder.tokens import Binding

# A notice owed by an admin command's declaration: the command queues it itself at once
# (forwarder/notices.py) and says so; should it fail, the daemon sends it after this long.
ADMIN_NOTICE_GRACE = 300.0
# The daemon claims owed notices for this long while it queues them (a crash in between:
# they are owed again after it).
NOTICE_LEASE = 600.0


class DirectoryError(Exception):
    """A refused admin operation; the message is the one-line reason shown to the admin."""


class DirectoryStale(OSError):
    """A node's copy of a shared directory has not been synchronised for longer than its
    bound (directory_max_staleness): it vouches for no one (RCPT answers 451)."""


@dataclass(frozen=True)
class TargetRow:
    """One redirect target as the directory holds it."""

    id: int
    target: str
    state: TargetState
    why: str
    declared_at: float
    changed_at: float
    confirmed: bool = False
    health: Health = field(default_factory=Health)
    last_error: str | None = None

    @property
    def view(self) -> TargetView:
        return TargetView(self.target, self.state)


@dataclass(frozen=True)
class AccountRow:
    address: str
    state: AccountState
    created_at: float
    updated_at: float
    targets: tuple[TargetRow, ...] = ()

    @property
    def account(self) -> Account:
        return Account(self.address, self.state, tuple(t.view for t in self.targets))

    def target(self, address: str) -> TargetRow | None:
        for row in self.targets:
            if row.target == address:
                return row
        return None


@dataclass(frozen=True)
class Declared:
    """A target that was just declared (or declared again): its notice is owed."""

    target_id: int
    account: str
    target: str
    declared_at: float

    @property
    def binding(self) -> Binding:
        return Binding(self.account, self.target, self.declared_at)


@dataclass(frozen=True)
class Written:
    """An admin write's result: the account as it is now, and the notices it owes."""

    row: AccountRow
    declared: tuple[Declared, ...] = ()


@dataclass
class ImportReport:
    added: int = 0
    changed: int = 0
    deleted: int = 0  # active -> deleted: graduations
    unchanged: int = 0
    declared: int = 0  # targets declared (each owes a notice)


@dataclass(frozen=True)
class ImportRow:
    line: int
    address: str
    targets: tuple[str, ...]
    state: AccountState


@dataclass
class ImportPlan:
    """What an import would do against the directory as it is now."""

    report: ImportReport
    # (row, old state and targets or None when new) for every row that changes something
    writes: list[tuple[ImportRow, tuple[str, tuple[str, ...]] | None]]

    def declared(self) -> list[tuple[int, str]]:
        """(line, target) of each target this import declares: the ones to validate and
        to send a notice to (PRODUCT.md: a target is validated when declared, and one kept
        by value keeps its state)."""
        found = []
        for row, old in self.writes:
            before = set() if old is None else set(old[1])
            found += [(row.line, t) for t in row.targets if t not in before]
        return found

    def new_targets(self) -> set[str]:
        return {target for _, target in self.declared()}


@dataclass(frozen=True)
class Imported:
    report: ImportReport
    declared: tuple[Declared, ...] = ()


@dataclass(frozen=True)
class TokenUse:
    """A confirm+ or refuse+ message consumed: what it did to its target."""

    account: str
    target: str
    before: TargetState | None  # None: the target is no longer declared
    after: TargetState | None
    ignored: str | None = None  # why nothing changed, when nothing did


@dataclass(frozen=True)
class StateChange:
    """A target the delivery side moved (to `failing`, or back from it)."""

    account: str
    target: str
    before: TargetState
    after: TargetState
    health: Health
    last_error: str | None
    others_on: tuple[str, ...]  # the account's targets still on (where to tell the owner)


@dataclass(frozen=True)
class TargetResult:
    """One delivery result about a watched target, for `DaemonDirectory.record`."""

    account: str
    target: str
    when: float
    delivered: bool
    status: str | None = None
    error: str | None = None


class AdminDirectory(Protocol):
    """The directory for the `forwarder` command (synchronous)."""

    def get(self, address: str) -> AccountRow | None: ...

    def require(self, address: str) -> AccountRow: ...

    def accounts(self, state: AccountState | None = None, with_targets: bool | None = None,
                 target_state: TargetState | None = None) -> Iterator[AccountRow]: ...

    def add(self, address: str, targets: Sequence[str] = ()) -> Written: ...

    def set_targets(self, address: str, targets: Sequence[str]) -> Written:
        """Replace the set: new ones `pending` (notice owed), those kept by value keep
        their state, missing ones are removed."""
        ...

    def switch_target(self, address: str, target: str, on: bool) -> Written: ...

    def delete(self, address: str) -> Written: ...

    def purge(self, address: str) -> None: ...

    def history(self, address: str) -> list[dict[str, Any]]: ...

    def sender_report(self, since_day: int) -> list[SenderCount]:
        """Per From domain, the sender counts of the days from `since_day` on, added up."""
        ...

    def plan_import(self, rows: Sequence[ImportRow]) -> ImportPlan: ...

    def import_rows(self, rows: Sequence[ImportRow], dry_run: bool = False,
                    verify: Callable[[ImportPlan], None] | None = None) -> Imported: ...

    def binding(self, target_id: int) -> Binding | None: ...

    def notices_sent(self, target_ids: Sequence[int]) -> None:
        """The notices owed to these targets are in the queue: no longer owed."""
        ...

    def token_secrets(self) -> list[bytes]:
        """The token secrets, the signing one first (created if there are none)."""
        ...

    def rotate_token_secrets(self) -> int:
        """Put a new signing secret first, keep the others; return how many there are."""
        ...

    def close(self) -> None: ...


class DaemonDirectory(Protocol):
    """The directory for the daemon (asynchronous: never blocks the event loop)."""

    async def lookup(self, address: str) -> Account | None:
        """The account and its targets (in order), in one indexed read."""
        ...

    async def binding(self, target_id: int) -> Binding | None: ...

    async def consume(self, use: Consume, client: str, sender: str, automatic: bool,
                      now: float) -> TokenUse:
        """Apply a confirm+ or refuse+ message (idempotent) and audit it with the time,
        the client address and the envelope sender. An automatic message (an
        autoresponder's) is audited and changes nothing."""
        ...

    async def record(self, results: Sequence[TargetResult], rule: DeadRule) -> list[StateChange]:
        """Record delivery results about targets, in order; return the targets that
        became `failing` or came back from it."""
        ...

    async def record_senders(self, rows: Sequence[SenderCount]) -> None:
        """Add to the sender report's counts (forwarder/senders.py), in one transaction."""
        ...

    async def refresh_successes(self, seen: Sequence[tuple[str, str, float]]) -> None:
        """Keep `last_success` fresh for (account, target, when) that had no failures:
        changes no state, written at most about once a day per target."""
        ...

    async def claim_notices(self, limit: int, now: float) -> list[Declared]:
        """Up to `limit` notices owed by now (oldest first) to targets still pending,
        claimed for NOTICE_LEASE seconds (another node or a crash cannot send them
        twice meanwhile); owed notices of targets no longer pending are dropped."""
        ...

    async def notices_sent(self, target_ids: Sequence[int]) -> None: ...

    async def watched(self) -> set[str]:
        """The targets with failures on record or `failing`: a success there matters."""
        ...

    async def target_counts(self) -> dict[TargetState, int]: ...

    def token_secrets(self) -> list[bytes]: ...

    async def close(self) -> None: ...
