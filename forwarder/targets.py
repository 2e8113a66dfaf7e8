"""Redirect targets, pure: their states, how events move them, and the dead-target rule.

A deleted account's mail goes to every target that is on (`pending` or `confirmed`). The
other states say why a target gets nothing: its owner refused it (`refused`), an admin
switched it off (`off`), or its mailbox has kept failing (`failing`). PRODUCT.md, "Redirect
targets: several, confirmed, watched", is the contract; this module is its rules, as tables
and small functions with the time passed in, in the manner of policy.py (no I/O here).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# PRODUCT.md: "A graduate may declare up to 5 targets".
MAX_TARGETS = 5


class TargetState(enum.StrEnum):
    PENDING = "pending"  # declared, not yet confirmed: mail goes there meanwhile
    CONFIRMED = "confirmed"  # its owner replied to the notice
    REFUSED = "refused"  # its owner said "not me": nothing more goes there
    OFF = "off"  # switched off by an admin
    FAILING = "failing"  # its mailbox keeps failing permanently (the dead-target rule)


# The states in which a target gets mail.
ON_STATES = frozenset({TargetState.PENDING, TargetState.CONFIRMED})


@dataclass(frozen=True)
class TargetView:
    """What RCPT needs to know of one target: where, and whether it is on."""

    target: str
    state: TargetState

    @property
    def on(self) -> bool:
        return self.state in ON_STATES


class Event(enum.Enum):
    """What can happen to a target that is already declared."""

    ON = "on"  # an admin switches it on: the school declares it again
    OFF = "off"  # an admin switches it off
    CONFIRM = "confirm"  # a message to its confirm+ address
    REFUSE = "refuse"  # a message to its refuse+ address
    DEAD = "dead"  # the dead-target rule fired
    ALIVE = "alive"  # a delivery to it succeeded


class Restore(enum.Enum):
    """Back on: `confirmed` if its owner had confirmed it, else `pending`."""

    ON = "restore"


_P, _C, _R, _O, _F = (TargetState.PENDING, TargetState.CONFIRMED, TargetState.REFUSED,
                      TargetState.OFF, TargetState.FAILING)

# (state, event) -> the state after. Rules behind the table:
# - a refusal is final: only the school's side (ON, a new declaration) brings the target
#   back, as `pending` with a new notice; the owner's own confirm token does not;
# - ON re-declares whatever is not on (refused, failing) and resends the notice to a
#   pending target; a target only switched off comes back as it was;
# - a confirmation while off or failing is remembered for when the target comes back;
# - the dead-target rule and a success only move targets that get mail.
TRANSITIONS: dict[tuple[TargetState, Event], TargetState | Restore] = {
    (_P, Event.ON): _P, (_C, Event.ON): _C, (_R, Event.ON): _P, (_O, Event.ON): Restore.ON,
    (_F, Event.ON): _P,
    (_P, Event.OFF): _O, (_C, Event.OFF): _O, (_R, Event.OFF): _R, (_O, Event.OFF): _O,
    (_F, Event.OFF): _O,
    (_P, Event.CONFIRM): _C, (_C, Event.CONFIRM): _C, (_R, Event.CONFIRM): _R,
    (_O, Event.CONFIRM): _O, (_F, Event.CONFIRM): _F,
    (_P, Event.REFUSE): _R, (_C, Event.REFUSE): _R, (_R, Event.REFUSE): _R,
    (_O, Event.REFUSE): _R, (_F, Event.REFUSE): _R,
    (_P, Event.DEAD): _F, (_C, Event.DEAD): _F, (_R, Event.DEAD): _R, (_O, Event.DEAD): _O,
    (_F, Event.DEAD): _F,
    (_P, Event.ALIVE): _P, (_C, Event.ALIVE): _C, (_R, Event.ALIVE): _R,
    (_O, Event.ALIVE): _O, (_F, Event.ALIVE): Restore.ON,
}  # fmt: skip


@dataclass(frozen=True)
class Change:
    """The outcome of an event: the new state, whether the owner's confirmation is still
    on record, whether a new notice goes out, whether the failures on record are cleared."""

    state: TargetState
    confirmed: bool
    notice: bool
    clear_failures: bool

    def changes(self, state: TargetState, confirmed: bool) -> bool:
        return (self.state, self.confirmed) != (state, confirmed) or self.notice \
            or self.clear_failures


def transition(state: TargetState, confirmed: bool, event: Event) -> Change:
    """Apply `event` to a target in `state` (`confirmed`: its owner confirmed it once and
    has not refused it since)."""
    after = TRANSITIONS[(state, event)]
    if isinstance(after, Restore):
        after = _C if confirmed else _P
    if event is Event.REFUSE:
        confirmed = False
    elif event is Event.CONFIRM and after is not _R:
        confirmed = True
    # A new declaration (ON that ends pending) asks the owner again.
    notice = event is Event.ON and after is _P
    if notice:
        confirmed = False
    clear = event is Event.ALIVE or (event is Event.ON and state is not after) or notice
    return Change(after, confirmed, notice, clear)


# --- The dead-target rule --------------------------------------------------------------


@dataclass(frozen=True)
class DeadRule:
    """PRODUCT.md defaults: 5 mailbox failures over at least 30 days, no success between."""

    max_failures: int = 5
    span: float = 30 * 86400.0


@dataclass(frozen=True)
class Health:
    """A target's delivery record: the mailbox failures since its last success."""

    failures: int = 0
    first_failure: float | None = None
    last_failure: float | None = None
    last_success: float | None = None


def counts_against(status: str | None) -> bool:
    """Whether a permanent failure with this RFC 3463 status is about the mailbox itself:
    5.1.x (bad mailbox or destination address, RFC 3463 3.2) and 5.2.1 (mailbox disabled,
    3.3). Never 5.7.x (policy: spam, DMARC, a blocklist), content refusals (5.6.x) or
    anything else, which say nothing about whether the mailbox still exists."""
    if not status:
        return False
    parts = status.split(".")
    if len(parts) != 3 or parts[0] != "5":
        return False
    return parts[1] == "1" or (parts[1], parts[2]) == ("2", "1")


def after_failure(health: Health, when: float) -> Health:
    """One more mailbox failure at `when`. A failure older than the last success (results
    are recorded in the order attempts end, not start) does not count."""
    if health.last_success is not None and when < health.last_success:
        return health
    first = health.first_failure if health.failures else when
    return Health(health.failures + 1, first, when, health.last_success)


def after_success(health: Health, when: float) -> Health:
    """A delivery succeeded at `when`: the failures before it no longer count."""
    if health.last_failure is not None and when < health.last_failure:
        # An older success recorded late: it is no news about the failures after it.
        latest = max(health.last_success or when, when)
        return Health(health.failures, health.first_failure, health.last_failure, latest)
    return Health(0, None, None, max(health.last_success or when, when))


def is_dead(health: Health, rule: DeadRule) -> bool:
    """N failures spanning at least D days, with no success in between."""
    if health.failures < rule.max_failures or health.first_failure is None:
        return False
    last = health.last_failure if health.last_failure is not None else health.first_failure
    return last - health.first_failure >= rule.span
