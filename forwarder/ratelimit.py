"""Token buckets in memory: messages per client address and per recipient of ours.

A bucket holds at most `capacity` tokens and refills at `capacity` per `period`; a message
takes one token from its client's bucket and one from each recipient's, or, if any of them
is empty, takes none and is deferred (`451 4.7.0`). A full bucket is the same as no bucket,
so buckets that have refilled are dropped when the table grows: memory follows the number
of clients and recipients seen within a period, bounded by `max_keys`.

The limits are per process (docs/admin.md: with N acceptor processes, a client that spreads
its connections over them can send up to N times the limit). Time is injected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from forwarder.addresses import in_networks, parse_networks
from forwarder.config import RateLimits

MAX_KEYS = 100_000


class Buckets:
    """One family of buckets (per client, or per recipient) with a common size and rate."""

    def __init__(self, capacity: int, period: float, now: Callable[[], float],
                 max_keys: int = MAX_KEYS) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period  # tokens a second
        self.now = now
        self.max_keys = max_keys
        # key -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def tokens(self, key: str) -> float:
        """The tokens `key` has now."""
        entry = self._buckets.get(key)
        if entry is None:
            return self.capacity
        tokens, then = entry
        return min(self.capacity, tokens + (self.now() - then) * self.rate)

    def take(self, key: str) -> None:
        """Take a token (the caller checked there is one)."""
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune()
        self._buckets[key] = (self.tokens(key) - 1.0, self.now())

    def _prune(self) -> None:
        """Forget the buckets that are full again; if none is, the oldest half."""
        now = self.now()
        full = [k for k, (tokens, then) in self._buckets.items()
                if tokens + (now - then) * self.rate >= self.capacity]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            for key in list(self._buckets)[: self.max_keys // 2]:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Refusal:
    scope: str  # "client" or "recipient"
    key: str


class RateLimiter:
    """The per-client (per minute) and per-recipient (per hour) limits of one process."""

    def __init__(self, limits: RateLimits, now: Callable[[], float]) -> None:
        self.clients = Buckets(limits.client_per_minute, 60.0, now)
        self.recipients = Buckets(limits.recipient_per_hour, 3600.0, now)
        self.exempt = parse_networks(limits.exempt)
        self._exempt_cache: dict[str, bool] = {}

    @property
    def enabled(self) -> bool:
        return self.clients.enabled or self.recipients.enabled

    def is_exempt(self, client: str) -> bool:
        """Whether the per-client limit spares this address (cached: one parse a client)."""
        known = self._exempt_cache.get(client)
        if known is None:
            known = in_networks(client, self.exempt)
            if len(self._exempt_cache) >= MAX_KEYS:
                self._exempt_cache.clear()
            self._exempt_cache[client] = known
        return known

    def admit(self, client: str, recipients: Sequence[str]) -> Refusal | None:
        """Take a token for the message from each bucket it concerns, or none at all and
        say which bucket was empty."""
        checks: list[tuple[Buckets, str, str]] = []
        if self.clients.enabled and not self.is_exempt(client):
            checks.append((self.clients, "client", client))
        if self.recipients.enabled:
            checks.extend((self.recipients, "recipient", r) for r in _distinct(recipients))
        for buckets, scope, key in checks:
            if buckets.tokens(key) < 1.0:
                return Refusal(scope, key)
        for buckets, _, key in checks:
            buckets.take(key)
        return None


def _distinct(keys: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(k.lower() for k in keys))
