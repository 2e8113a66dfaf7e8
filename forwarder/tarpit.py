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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """Networks from "192.0.2.0/24", "2001:db8::/32" or single addresses; ValueError."""
    return tuple(ipaddress.ip_network(text.strip(), strict=False) for text in texts)


class ErrorLedger:
    """Recent errors per client address, leaking one per LEAK_SECONDS."""

    def __init__(self, now: Callable[[], float], exempt: Iterable[str] = ()) -> None:
        self._now = now
        self._levels: dict[str, tuple[float, float]] = {}  # key -> (level, when)
        self.exempt = parse_networks(exempt)

    def _exempt(self, client: str) -> bool:
        if not self.exempt:
            return False
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in network for network in self.exempt)

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
