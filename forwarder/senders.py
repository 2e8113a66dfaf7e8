"""The "survives forwarding" counts per sender domain, kept in memory between flushes.

Each message the checks evaluate adds one to its From domain's count for the day: passed
DMARC through an aligned DKIM signature (survives forwarding), through SPF only (fails DMARC
at the graduate's provider after any forwarding), or neither. Writing that to the directory
once per message would add a write transaction to every message; instead the counts add up
here and `flush` writes them all in one transaction every `report_interval` (each process,
acceptors included, flushes its own; the database adds them). A flush that fails keeps its
counts for the next one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from forwarder import log
from forwarder.checkpolicy import Survival

LOG = log.get("forwarder.checks")
# Distinct (domain, day) pairs held between flushes; past it, new domains wait for the next
# flush to be counted (spam from random domains must not grow memory without bound).
MAX_PENDING = 50_000
SECONDS_A_DAY = 86400


@dataclass
class SenderCount:
    """One row of the report's table: a From domain on one day (UTC days since 1970)."""

    domain: str
    day: int
    dkim_aligned: int = 0
    spf_only: int = 0
    unaligned: int = 0
    policy: str = ""  # the domain's DMARC policy as last seen ("" if it has none)

    def add(self, other: SenderCount) -> None:
        self.dkim_aligned += other.dkim_aligned
        self.spf_only += other.spf_only
        self.unaligned += other.unaligned
        self.policy = other.policy or self.policy


Writer = Callable[[list[SenderCount]], Awaitable[None]]


class SenderTally:
    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self._pending: dict[tuple[str, int], SenderCount] = {}
        self.dropped = 0

    def record(self, domain: str, survival: Survival, policy: str) -> None:
        key = (domain, int(self.now() // SECONDS_A_DAY))
        count = self._pending.get(key)
        if count is None:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            count = self._pending[key] = SenderCount(domain, key[1])
        if survival is Survival.DKIM:
            count.dkim_aligned += 1
        elif survival is Survival.SPF_ONLY:
            count.spf_only += 1
        else:
            count.unaligned += 1
        count.policy = policy

    def drain(self) -> list[SenderCount]:
        rows = list(self._pending.values())
        self._pending = {}
        return rows

    def restore(self, rows: list[SenderCount]) -> None:
        """Put back counts whose flush failed, adding what came in meanwhile."""
        for row in rows:
            key = (row.domain, row.day)
            newer = self._pending.get(key)
            if newer is not None:
                row.add(newer)
            self._pending[key] = row

    async def flush(self, write: Writer) -> int:
        """Write what was counted since the last flush; return how many rows."""
        rows = self.drain()
        if not rows:
            return 0
        try:
            await write(rows)
        except Exception as exc:  # a locked or unwritable directory: try again next time
            self.restore(rows)
            LOG.error("sender_stats_flush_failed", error=type(exc).__name__, detail=str(exc),
                      rows=len(rows))
            return 0
        return len(rows)
