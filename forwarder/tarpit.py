"""Errors counted per client address, across its sessions (the tarpit's memory).

A session's own error count (forwarder/session.py) ends with the session; an attacker
reconnects. So each process also keeps, per client address, a count of its recent errors
that leaks away at one error per `LEAK_SECONDS`: a legitimate client making an occasional
mistake never accumulates, a guesser stays at the top. IPv6 clients are counted per /64,
the smallest block one subscriber is usually given. Addresses listed in
`error_limit_exempt` (the school's relay, which passes on its senders' mistakes) are not
counted here; their sessions still are, one by one.

The count is per process: with acceptor processes a client's errors are split between
them (docs/security.md counts with that).

`Tarpit` holds one session's replies back after an error (policy.tarpit_delay), by the
session's count or its address's, whichever is larger.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable

from forwarder import log
from forwarder.addresses import in_networks, parse_networks
from forwarder.policy import tarpit_delay

LOG = log.get("forwarder.smtp")

LEAK_SECONDS = 30.0
# Distinct addresses remembered; past this, the oldest entries are forgotten first.
MAX_CLIENTS = 100_000


def client_key(client: str) -> str:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ErrorLedger:
    """Recent errors per client address, leaking one per LEAK_SECONDS."""

    def __init__(self, now: Callable[[], float], exempt: Iterable[str] = ()) -> None:
        self._now = now
        self._levels: dict[str, tuple[float, float]] = {}  # key -> (level, when)
        self.exempt = parse_networks(exempt)

    def _exempt(self, client: str) -> bool:
        return bool(self.exempt) and in_networks(client, self.exempt)

    def level(self, client: str) -> float:
        entry = self._levels.get(client_key(client))
        if entry is None:
            return 0.0
        level, when = entry
        return max(0.0, level - (self._now() - when) / LEAK_SECONDS)

    def add(self, client: str) -> float:
        """Count one error; return the address's recent errors, this one included (0 for
        an exempt address)."""
        if self._exempt(client):
            return 0.0
        key = client_key(client)
        level = self.level(client) + 1
        self._levels.pop(key, None)  # re-inserted last: the dict stays oldest-first
        self._levels[key] = (level, self._now())
        while len(self._levels) > MAX_CLIENTS:
            del self._levels[next(iter(self._levels))]
        return level

    def __len__(self) -> int:
        return len(self._levels)


class Tarpit:
    """One session's tarpit: while `held` (a timer), its next reply and input wait."""

    __slots__ = ("error_sleep", "held", "ledger", "loop", "max_errors")

    def __init__(self, loop: asyncio.AbstractEventLoop, ledger: ErrorLedger | None,
                 max_errors: int, error_sleep: float) -> None:
        self.loop = loop
        self.ledger = ledger  # per client address, shared by the process's sessions
        self.max_errors = max_errors
        self.error_sleep = error_sleep
        self.held: asyncio.TimerHandle | None = None

    def error(self, client: str, errors: int, resume: Callable[[], None]) -> bool:
        """The session counted its `errors`-th error: hold its reply back, longer with
        each error of the session or of its client address, whichever has more, then call
        `resume`. True: max_errors is reached, the session closes after that wait."""
        recent = self.ledger.add(client) if self.ledger is not None else 0.0
        count = max(errors, round(recent))
        if count >= self.max_errors:
            LOG.info("too_many_errors", client=client, errors=errors,
                     client_errors=round(recent))
        delay = tarpit_delay(count, self.error_sleep)
        if delay > 0:
            self.held = self.loop.call_later(delay, self._over, resume)
        return count >= self.max_errors

    def _over(self, resume: Callable[[], None]) -> None:
        self.held = None
        resume()

    def cancel(self) -> None:
        if self.held is not None:
            self.held.cancel()
        self.held = None
