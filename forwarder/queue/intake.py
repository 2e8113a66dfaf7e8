"""The front's one door into the queue: `await intake.accept(message)`.

`accept` returns once the message is committed and fsync'd (the `250` may then be sent),
or raises `QueueError` (its `no_space` tells `452` from `451`); whoever delivers it is told
in the next turn of the event loop, so that a delivery's first step runs after the session
has written its `250`, not before (it delayed the reply by some 150 us of Python:
docs/performance.md, "One session"). Which of two kinds the front holds is decided once,
when the process starts (forwarder/daemon.py):

- `DirectIntake`, in the process that delivers (the only process, or the main one): the
  recipients are leased to this process in the commit itself, and the job goes straight to
  delivery with the bytes still in memory;
- `ScannerIntake`, in an acceptor process (forwarder/workers.py): the recipients are left
  due at once, and the main process is told that work is due; its scanner leases them like
  any retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from forwarder.queue.facade import Queue
from forwarder.queue.model import Job, NewMessage, SpooledBody
from forwarder.queue.writer import Op


class Intake(Protocol):
    async def accept(self, message: NewMessage) -> str:
        """Commit, fsync and pass on `message`; return its queue id. Raises QueueError."""
        ...


# What else to write about an accepted message, in the same transaction (the history,
# forwarder/history/); None: nothing.
Journal = Callable[[NewMessage], Op | None]


def _no_journal(message: NewMessage) -> Op | None:
    return None


@dataclass(frozen=True)
class DirectIntake:
    """This process delivers: lease in the commit, hand the job to delivery."""

    queue: Queue
    deliver: Callable[[Job], None]
    journal: Journal = _no_journal

    async def accept(self, message: NewMessage) -> str:
        ids = await self.queue.enqueue(message, leased=True, also=self.journal(message))
        body = message.body
        if isinstance(body, SpooledBody):  # now under its queue id
            message = replace(message, body=replace(body, path=self.queue.spool.path(message.id)))
        asyncio.get_running_loop().call_soon(self.deliver, Job.fresh(message, ids))
        return message.id


@dataclass(frozen=True)
class ScannerIntake:
    """Another process delivers: leave the rows to its scanner, and wake it."""

    queue: Queue
    wake: Callable[[], None]
    journal: Journal = _no_journal

    async def accept(self, message: NewMessage) -> str:
        await self.queue.enqueue(message, leased=False, also=self.journal(message))
        asyncio.get_running_loop().call_soon(self.wake)
        return message.id
