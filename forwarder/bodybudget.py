"""Big bodies at the front: the inbound checks on a message that may be in a spool file,
how much of such bodies they may read back into memory at once, and a changed message
written back to a spool file.

A body past the spill threshold lives in a spool file from the moment it arrives
(forwarder/smtpbody.py); only the checks that read whole messages (DKIM, rspamd) need it
in memory, and the budget bounds how many such bodies are held at once whatever clients
send (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from forwarder.checks import Checked, Checks, Inbound
from forwarder.queue import Body, SpooledBody
from forwarder.queue.spool import Spool, read_unstuffed
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


class ContentChecks:
    """The inbound checks on a message whose body may be in a spool file. A spilled one is
    read back into memory only if a check reads whole messages (DKIM, rspamd), within the
    budget of such bodies held at once; the rate limits alone read only its head."""

    def __init__(self, checks: Checks | None, spool: Spool | None, budget: ByteBudget) -> None:
        self.checks = checks
        self.spool = spool
        self.budget = budget

    async def evaluate(self, inbound: Callable[[bytes], Inbound],
                       content: bytes | Spilled) -> tuple[Checked, bytes | Spilled]:
        """The checks' result, and the message as it is to be queued (with forged fields
        removed, if the checks removed any)."""
        assert self.checks is not None
        if not isinstance(content, Spilled) or not self.checks.reads_content:
            text = content if isinstance(content, bytes) else content.head
            result = await self.checks.evaluate(inbound(text))
            return result, content if isinstance(content, Spilled) else result.content
        async with self.budget.hold(content.size):
            text = await asyncio.to_thread(read_unstuffed, content.spill.path)
            result = await self.checks.evaluate(inbound(text))
            kept: bytes | Spilled = content
            if result.decision.reply is None and result.content != text:
                assert self.spool is not None
                kept = await asyncio.to_thread(respool, self.spool, result.content)
        return result, kept


def head_of(content: bytes | Spilled) -> bytes:
    """What a received message's header checks read: all of it in memory, else its head."""
    return content.head if isinstance(content, Spilled) else content


def queued_body(ours: bytes, content: bytes | Spilled) -> Body:
    """The body to queue: our header fields on top of what was received (in memory, or
    in the received spool file)."""
    if isinstance(content, bytes):
        return ours + content
    return SpooledBody(ours, content.spill.path, len(ours) + content.size, ours + content.head)
