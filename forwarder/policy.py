"""Pure decisions: recipient verdicts, target selection, retry schedule, outcome of a
destination's reply, crash blame. (The targets' own rules, the dead-target rule among them,
are in targets.py; tokens in tokens.py.)

No I/O here (no asyncio, no sqlite, no sockets), in the manner of h11's `_state.py`:
every rule is a table or a small function, tested without an event loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from forwarder import replies
from forwarder.addresses import Address, AddressError, is_own_domain, parse_address
from forwarder.replies import Reply
from forwarder.srs import is_srs_local
from forwarder.targets import TargetState, TargetView
from forwarder.tokens import TokenKind, split_local

# RFC 5321 4.5.1: postmaster must be accepted; RFC 2142 adds abuse.
ROLE_ACCOUNTS = frozenset({"postmaster", "abuse"})


class Route(enum.StrEnum):
    """Where an accepted recipient's copy goes. Also the metrics' destination class."""

    MAILBOX = "mailbox"  # active account: the school's mailbox host, sender unchanged
    REDIRECT = "redirect"  # deleted account with a redirect: forwarded with SRS
    POSTMASTER = "postmaster"  # role account: the configured postmaster address
    SRS_RETURN = "srs_return"  # a bounce to one of our SRS addresses: back to the sender
    BOUNCE = "bounce"  # a DSN we generated, sent to the original sender
    NOTICE = "notice"  # a notice of ours to a redirect target (targets.py)
    NOTICE_BOUNCE = "notice_bounce"  # a DSN about a notice, sent to the admin address


# Routes whose outcome is recorded against the target (the dead-target rule): forwarded
# mail and our own notices, which fail at a dead mailbox just the same.
WATCHED_ROUTES = frozenset({Route.REDIRECT, Route.NOTICE})


class AccountState(enum.StrEnum):
    ACTIVE = "active"
    DELETED = "deleted"


@dataclass(frozen=True)
class Account:
    """An account as RCPT sees it: its state and its targets, in their declared order."""

    address: str
    state: AccountState
    targets: tuple[TargetView, ...] = ()


@dataclass(frozen=True)
class Accept:
    route: Route
    target: str  # the envelope recipient the copy is sent to
    reason: str
    # Further copies of the same message (a graduate's other targets), same route.
    more_targets: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target, *self.more_targets)


@dataclass(frozen=True)
class Refuse:
    reply: Reply
    reason: str


@dataclass(frozen=True)
class Consume:
    """A valid confirm+ or refuse+ address: the message is taken (250) and consumed once
    complete, never queued nor forwarded."""

    kind: TokenKind
    target_id: int
    account: str
    target: str
    reason: str  # "confirm" or "refuse"


Verdict = Accept | Refuse | Consume


@dataclass(frozen=True)
class NeedsLookup:
    """The address is in our domains and not a role account: ask the directory."""

    address: Address


@dataclass(frozen=True)
class NeedsSrsCheck:
    """An SRS address in our SRS domain: a bounce of mail we forwarded, to be verified."""

    address: Address


@dataclass(frozen=True)
class NeedsTokenCheck:
    """A confirm+ or refuse+ address in our domains: a reply to a notice, to be verified
    (tokens.py) like an SRS address."""

    kind: TokenKind
    token: str


def classify_recipient(
    text: str, domains: tuple[str, ...], postmaster: str | None, srs_domain: str | None = None
) -> Verdict | NeedsLookup | NeedsSrsCheck | NeedsTokenCheck:
    """First step of the RCPT verdict, before any directory access."""
    if text.lower() == "postmaster":
        # RFC 5321 4.1.1.3: "RCPT TO:<Postmaster>" without a domain must be accepted.
        return _postmaster(postmaster)
    try:
        address = parse_address(text)
    except AddressError:
        return Refuse(replies.RCPT_BAD_SYNTAX, "bad_syntax")
    if srs_domain is not None and address.domain == srs_domain and is_srs_local(address.local):
        return NeedsSrsCheck(address)
    if not is_own_domain(address.domain, domains):
        # Never an open relay: only our domains are accepted (PRODUCT.md).
        return Refuse(replies.RCPT_RELAY_DENIED, "relay_denied")
    if address.local.lower() in ROLE_ACCOUNTS:
        return _postmaster(postmaster)
    token = split_local(address.local)
    if token is not None:
        return NeedsTokenCheck(*token)
    return NeedsLookup(address)


def is_reserved_local(local: str) -> bool:
    """Local parts no account may have: role accounts and the notices' reply addresses."""
    return local.lower() in ROLE_ACCOUNTS or split_local(local) is not None


def _postmaster(postmaster: str | None) -> Verdict:
    if postmaster is None:
        return Refuse(replies.RCPT_NOT_CONFIGURED, "postmaster_unset")
    return Accept(Route.POSTMASTER, postmaster, "postmaster")


def decide_account(
    account: Account | None, domains: tuple[str, ...], mailbox_configured: bool
) -> Accept | Refuse:
    """The verdict for an address of ours, given its directory row (None: not there)."""
    if account is None:
        return Refuse(replies.RCPT_UNKNOWN, "unknown")
    if account.state is AccountState.ACTIVE:
        if not mailbox_configured:
            # PRODUCT.md: mailbox host unset for an active account -> deferred, never lost.
            return Refuse(replies.RCPT_NOT_CONFIGURED, "mailbox_unset")
        return Accept(Route.MAILBOX, account.address, "mailbox")
    if not account.targets:
        return Refuse(replies.RCPT_CLOSED, "closed")
    return select_targets(account.targets, domains)


def select_targets(targets: tuple[TargetView, ...],
                   domains: tuple[str, ...]) -> Accept | Refuse:
    """A deleted account's mail goes to every target that is on, in declared order; when
    none is, the refusal says why (PRODUCT.md lifecycle table)."""
    on = [t.target for t in targets if t.on]
    # Refused when declared; if one slipped in anyway, refuse rather than loop.
    outside = [t for t in on if not is_own_domain(t.rpartition("@")[2], domains)]
    if outside:
        return Accept(Route.REDIRECT, outside[0], "forward", tuple(outside[1:]))
    if on:
        return Refuse(replies.RCPT_LOOP, "loop")
    if any(t.state is TargetState.FAILING for t in targets):
        return Refuse(replies.RCPT_TARGETS_FAILING, "targets_failing")
    return Refuse(replies.RCPT_TARGETS_OFF, "targets_off")


def needs_srs(route: Route, sender: str, target: str, domains: tuple[str, ...]) -> bool:
    """Rewrite the envelope sender only for copies forwarded out of our domains: not for
    the school mailbox host, not for returned bounces, and never the null sender."""
    if not sender or route not in (Route.REDIRECT, Route.POSTMASTER):
        return False
    return not is_own_domain(target.rpartition("@")[2], domains)


# --- Retry schedule -------------------------------------------------------------------


def retry_delay(attempts: int, first: float, maximum: float) -> float:
    """Postfix's backoff: `first` after the first failure, doubling, capped at `maximum`."""
    if attempts < 1:
        return 0.0
    return float(min(first * (2 ** min(attempts - 1, 32)), maximum))


class Outcome(enum.Enum):
    """What an attempt did for one recipient (also the metrics' `result` label)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


def outcome_of_reply(code: int) -> Outcome:
    """RFC 5321 4.2.1: 2yz done, 4yz transient, 5yz permanent. Anything else: try again."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.FAILED
    return Outcome.DEFERRED


def is_expired(arrived_at: float, now: float, lifetime: float) -> bool:
    return now - arrived_at >= lifetime


# --- Crash blame ---------------------------------------------------------------------
#
# Which message a crash is blamed on. Mailman's switchboard quarantines the one file a
# runner was working on; a daemon delivering hundreds of messages at once needs more care,
# or one OOM kill under load (or an administrator's kill -9 in a loop) would quarantine
# every innocent message that happened to be in flight. So a message is only ever charged
# for a fault raised while processing it: a worker raising on it, or the process dying
# of a fatal fault of its own (a segmentation fault, an abort, systemd's watchdog abort:
# forwarder/faults.py records them). A process killed from outside (SIGKILL, the OOM
# killer, power loss) leaves no such record, and is nobody's fault.
#
# A message in ordinary delivery when the process faulted only becomes a suspect; a
# suspect is tried alone, in a lane of its own (one message at a time in the whole
# daemon), and only a fault while it is alone there, or a worker raising on it, is
# charged to it. An attempt that completes alone, whatever its outcome, clears the count:
# the message evidently does not bring the daemon down. The queue
# (forwarder/queue/ops.py) applies these verdicts to its rows.

# A message charged with this many crashes is held (quarantined): suspected once, then
# twice alone in the suspect lane when the process faulted, or a worker raising on it. A
# held message is not tried again, but still leaves the queue at the end of its lifetime,
# as a bounce to its sender like any other message that could not be delivered.
MAX_CRASHES = 3


class Lane(enum.Enum):
    """Where a message's attempt ran."""

    ORDINARY = "ordinary"  # with the other mail
    ALONE = "alone"  # a suspect, alone in the suspect lane


class Ending(enum.Enum):
    """How a message's attempt ended, as far as anyone knows."""

    COMPLETED = "completed"  # an outcome was recorded (delivered, deferred or failed)
    RAISED = "raised"  # the worker raised on it (a bug, not a delivery failure)
    # Start-up found its lease, and a fault report of the process that held it: it died
    # of a fatal fault of its own while the message was in its hands.
    FAULTED = "faulted"
    # Start-up found its lease and no fault report: killed from outside (SIGKILL, the
    # OOM killer), or the power failed.
    KILLED = "killed"


class Charge(enum.Enum):
    """What an ending does to a message's crash count."""

    KEEP = "keep"  # nothing changes
    SUSPECT = "suspect"  # at least 1: a suspect, tried alone from now on
    CHARGE = "charge"  # one more crash
    CLEAR = "clear"  # back to 0: not a suspect any more


BLAME: dict[tuple[Lane, Ending], Charge] = {
    # Ordinary delivery only ever holds messages that are not suspects: nothing to clear.
    (Lane.ORDINARY, Ending.COMPLETED): Charge.KEEP,
    (Lane.ALONE, Ending.COMPLETED): Charge.CLEAR,
    (Lane.ORDINARY, Ending.RAISED): Charge.CHARGE,
    (Lane.ALONE, Ending.RAISED): Charge.CHARGE,
    # Hundreds of messages may be in flight at a fault: each is only suspected, never
    # charged twice for dying beside the others.
    (Lane.ORDINARY, Ending.FAULTED): Charge.SUSPECT,
    (Lane.ALONE, Ending.FAULTED): Charge.CHARGE,
    # Killed from outside: never the message's fault, wherever it was (before, a burst of
    # kills charged a suspect for kills that landed while it sat alone in its lane, and
    # held it).
    (Lane.ORDINARY, Ending.KILLED): Charge.KEEP,
    (Lane.ALONE, Ending.KILLED): Charge.KEEP,
}


@dataclass(frozen=True)
class Suspicion:
    """A message's standing: its crash count and whether it is held (quarantined)."""

    crashes: int
    held: bool

    @property
    def suspect(self) -> bool:
        """Tried alone in the suspect lane rather than with the other mail."""
        return self.crashes > 0 and not self.held


def blame(lane: Lane, ending: Ending, before: Suspicion) -> Suspicion:
    """A message's standing after an attempt in `lane` ended with `ending`. A count that
    reaches MAX_CRASHES holds the message; only an administrator releases it."""
    charge = BLAME[(lane, ending)]
    if charge is Charge.KEEP:
        return before
    crashes = {
        Charge.SUSPECT: max(before.crashes, 1),
        Charge.CHARGE: before.crashes + 1,
        Charge.CLEAR: 0,
    }[charge]
    return Suspicion(crashes, before.held or crashes >= MAX_CRASHES)


def count_received_headers(message: bytes) -> int:
    """Count `Received:` fields in the header section (RFC 5321 6.3 loop detection)."""
    end = message.find(b"\r\n\r\n")
    header = message if end < 0 else message[: end + 2]
    count = 0
    for line in header.split(b"\r\n"):
        if line[:9].lower() == b"received:":
            count += 1
    return count


# --- Errors: the tarpit -----------------------------------------------------------------
#
# A client that collects errors (refused recipients, bad commands, junk commands past
# their limit) is slowed down, then cut off: that is what makes guessing SRS hashes or
# harvesting the directory slow (docs/security.md has the arithmetic). Postfix's model:
# smtpd_soft_error_limit (10) free errors, then each error's reply is delayed, and at
# smtpd_hard_error_limit (20) `421 4.7.0` and close. Postfix's delay is a flat
# smtpd_error_sleep_time (1 s); here it grows by that much per error past the soft limit,
# up to MAX_ERROR_SLEEP. The count is the session's, or its client address's recent errors
# if more (forwarder/tarpit.py), so reconnecting does not start afresh.

SOFT_ERROR_LIMIT = 10
MAX_ERROR_SLEEP_STEPS = 10  # the delay stops growing after this many steps


def tarpit_delay(errors: int, step: float) -> float:
    """Seconds to hold the reply to the `errors`-th error (`step`: the delay's increment)."""
    if errors <= SOFT_ERROR_LIMIT:
        return 0.0
    return step * min(errors - SOFT_ERROR_LIMIT, MAX_ERROR_SLEEP_STEPS)


# RFC 3834 5 and common practice: headers that mark a message as written by a program.
_AUTOMATIC_PRECEDENCE = (b"bulk", b"junk", b"list", b"auto_reply")
_AUTOMATIC_FIELDS = (b"x-autoreply:", b"x-autorespond:")


def is_automatic(sender: str, message: bytes) -> bool:
    """Whether a message was sent by a program rather than a person: a bounce (null
    sender), `Auto-Submitted` other than `no` (RFC 3834 5), a `Precedence` of bulk, junk,
    list or auto_reply, or an autoresponder's own marks. A vacation reply to a notice
    lands on its confirm+ address (Reply-To) and must not confirm a stranger's mailbox."""
    if not sender:
        return True
    end = message.find(b"\r\n\r\n")
    header = message if end < 0 else message[: end + 2]
    for line in header.split(b"\r\n"):
        lower = line.lower()
        if lower.startswith(b"auto-submitted:"):
            if lower[15:].strip().split(b";")[0].strip() != b"no":
                return True
        elif lower.startswith(b"precedence:"):
            if lower[11:].strip() in _AUTOMATIC_PRECEDENCE:
                return True
        elif lower.startswith(_AUTOMATIC_FIELDS):
            return True
    return False
