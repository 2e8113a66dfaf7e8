"""Delivery slots per destination, so that slow destinations cannot block the others, and
dead-destination throttling in the manner of Postfix's queue manager.

A destination ("site") is where a group of recipients goes: the school's mailbox host, the
smarthost, or a recipient domain delivered by MX. Each holds at most a number of SMTP
sessions at once (its window):

- an MX destination at most `destination_share` of `concurrency` (and at most
  `per_destination`), and all MX destinations together at most `concurrency`: two or three
  tarpits that accept TCP and never answer hold a bounded part of the slots, and the rest
  keeps flowing (head-of-line blocking, measured in tests/test_hol.py);
- the mailbox host and the smarthost `per_destination` each, of their own, outside
  `concurrency`: enrolled students' mail never waits behind the graduates' providers.

Feedback, as Postfix's "dead destination" rule: an attempt that could not talk to the
destination (connection refused or timed out, no greeting, a stall after the final dot)
halves its window; a failure at a window of one suspends it for `dead_destination_time`,
during which its mail is deferred at once without connecting. Then one probe session is
allowed, and each attempt that got an answer widens the window by one, up to its cap.

Waiting is first come, first served per destination, and a slot freed is handed to the
next waiter directly (no herd of wakeups). The clock is injected (suspensions are tested
by moving a FakeClock).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from forwarder import log
from forwarder.config import DeliverySettings

LOG = log.get("forwarder.delivery")


class SiteKind(enum.Enum):
    MAILBOX = "mailbox"  # the school's mailbox host: slots of its own
    SMARTHOST = "smarthost"  # the relay for everything forwarded: slots of its own
    MX = "mx"  # a recipient domain, delivered by MX: shares `concurrency`


@dataclass(frozen=True)
class Site:
    kind: SiteKind
    name: str  # the host (mailbox host, smarthost) or the recipient domain (MX)

    def __str__(self) -> str:
        return self.name if self.kind is SiteKind.MX else f"{self.kind.value} {self.name}"


class Verdict(enum.Enum):
    """What an attempt tells about its destination."""

    ANSWERED = "answered"  # the server spoke (whatever it said)
    UNREACHABLE = "unreachable"  # no answer: refused, timed out, stalled
    NONE = "none"  # nothing learnt (a local refusal, a TLS policy failure)


@dataclass
class _State:
    site: Site
    cap: int
    window: int
    busy: int = 0
    failures: int = 0
    suspended_until: float = 0.0
    last_error: str = ""
    waiters: deque[asyncio.Future[bool]] = field(default_factory=deque)


class Slots:
    """Per-destination windows and the shared MX total (module docstring)."""

    def __init__(self, settings: DeliverySettings, now: Callable[[], float],
                 on_suspend: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self._now = now
        self._on_suspend = on_suspend
        self._states: dict[Site, _State] = {}
        self._mx_busy = 0
        # MX destinations with waiters that only the shared total holds back, in order.
        self._blocked: dict[Site, None] = {}

    def cap(self, site: Site) -> int:
        s = self.settings
        if site.kind is not SiteKind.MX:
            return max(1, s.per_destination)
        share = int(s.concurrency * s.destination_share)
        return max(1, min(s.per_destination, share, s.concurrency))

    def _state(self, site: Site) -> _State:
        state = self._states.get(site)
        if state is None:
            cap = self.cap(site)
            state = self._states[site] = _State(site, cap, cap)
        return state

    # --- what others may ask -----------------------------------------------------------

    def suspended(self, site: Site) -> str | None:
        """Why `site` is suspended now (its last error), or None."""
        state = self._states.get(site)
        if state is None or not self._is_suspended(state):
            return None
        return state.last_error or "destination not responding"

    def busy(self, site: Site) -> int:
        state = self._states.get(site)
        return 0 if state is None else state.busy

    def window(self, site: Site) -> int:
        return self._state(site).window

    @property
    def suspended_count(self) -> int:
        return sum(1 for s in self._states.values() if self._is_suspended(s))

    def _is_suspended(self, state: _State) -> bool:
        if not state.suspended_until:
            return False
        if self._now() < state.suspended_until:
            return True
        # The suspension is over: one probe session at a time, to begin with.
        state.suspended_until = 0.0
        state.window = 1
        return False

    # --- taking and giving back ----------------------------------------------------------

    def try_acquire(self, site: Site) -> bool | None:
        """Take a slot now if one is free and nobody waits: True; the site is suspended:
        False; else None (the caller must `wait`)."""
        state = self._state(site)
        if self._is_suspended(state):
            return False
        if not state.waiters and self._free(state):
            self._take(state)
            return True
        return None

    async def wait(self, site: Site) -> bool:
        """Wait for a slot: True once it is ours, False if the site got suspended."""
        state = self._state(site)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        state.waiters.append(future)
        self._dispatch(state)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self.release(site, Verdict.NONE)  # handed over as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    state.waiters.remove(future)
            raise

    async def acquire(self, site: Site) -> bool:
        taken = self.try_acquire(site)
        return taken if taken is not None else await self.wait(site)

    def release(self, site: Site, verdict: Verdict, error: str = "") -> None:
        """Give a slot back, with what the attempt taught about the site."""
        state = self._state(site)
        state.busy -= 1
        if site.kind is SiteKind.MX:
            self._mx_busy -= 1
        if verdict is Verdict.ANSWERED:
            state.failures = 0
            state.window = min(state.cap, state.window + 1)
        elif verdict is Verdict.UNREACHABLE:
            self._failed(state, error)
        self._dispatch(state)
        if site.kind is SiteKind.MX:
            self._dispatch_blocked()
        if (not state.busy and not state.waiters and not state.failures
                and state.window == state.cap and not state.suspended_until):
            # Nothing to remember: a recipient domain seen once costs nothing afterwards.
            del self._states[site]
            self._blocked.pop(site, None)

    def _failed(self, state: _State, error: str) -> None:
        state.failures += 1
        state.last_error = error
        if self._is_suspended(state):
            return
        if state.window > 1:
            state.window = max(1, state.window // 2)
            return
        state.suspended_until = self._now() + self.settings.dead_destination_time
        LOG.warning("destination_suspended", destination=str(state.site),
                    seconds=self.settings.dead_destination_time, failures=state.failures,
                    reason=error[:200])
        if self._on_suspend is not None:
            self._on_suspend(self.suspended_count)

    def _free(self, state: _State) -> bool:
        if state.busy >= state.window:
            return False
        return state.site.kind is not SiteKind.MX or self._mx_busy < self.settings.concurrency

    def _take(self, state: _State) -> None:
        state.busy += 1
        if state.site.kind is SiteKind.MX:
            self._mx_busy += 1

    def _dispatch(self, state: _State) -> None:
        """Hand free slots to the site's waiters in order; all of them learn of a
        suspension at once."""
        waiters = state.waiters
        suspended = self._is_suspended(state)
        while waiters:
            head = waiters[0]
            if head.done():
                waiters.popleft()
                continue
            if suspended:
                waiters.popleft().set_result(False)
                continue
            if not self._free(state):
                break
            waiters.popleft()
            self._take(state)
            head.set_result(True)
        if waiters and state.site.kind is SiteKind.MX and state.busy < state.window:
            self._blocked[state.site] = None  # only the shared total holds it back

    def _dispatch_blocked(self) -> None:
        while self._blocked and self._mx_busy < self.settings.concurrency:
            site = next(iter(self._blocked))
            del self._blocked[site]
            self._dispatch(self._states[site])
