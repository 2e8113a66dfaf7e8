"""Big bodies at the front: how much of the spilled bodies the inbound checks may read
back into memory at once, and a changed message written back to a spool file.

A body past the spill threshold lives in a spool file from the moment it arrives
(forwarder/smtpbody.py); only the checks that read whole messages (DKIM, rspamd) need it
in memory, and the budget bounds how many such bodies are held at once whatever clients
send (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from forwarder.queue.spool import Spool
from forwarder.smtpbody import HEAD_OCTETS, Spilled, stuffed_pieces

# Octets of spilled bodies the inbound checks may hold in memory at once (docs/security.md).
BODIES_IN_MEMORY = 64 * 1024 * 1024


class ByteBudget:
    """A bound on the octets held at once: past it, the next holder waits its turn (its
    client waits for the reply to its final dot, which RFC 5321 4.5.3.2.6 allows 10
    minutes). One body bigger than the whole budget still passes, alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, octets: int) -> AsyncIterator[None]:
        octets = min(octets, self.limit)
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + octets <= self.limit)
            self.used += octets
        try:
            yield
        finally:
            async with self._freed:
                self.used -= octets
                self._freed.notify_all()


def respool(spool: Spool, content: bytes) -> Spilled:
    """A changed message back into a spool file of its own (call it in a worker thread)."""
    spill = spool.open_incoming()
    try:
        for piece in stuffed_pieces(content):
            spill.write(piece)
        spill.close()
    except BaseException:
        spill.discard()
        raise
    cut = content.rfind(b"\r\n", 0, HEAD_OCTETS) + 2
    return Spilled(spill, len(content), content[:cut], not content.isascii())
