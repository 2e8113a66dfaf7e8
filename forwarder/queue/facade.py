"""`Queue`: the daemon's handle on the queue, group-committed writes and a separate reader."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forwarder.policy import Lane
from forwarder.queue import ops
from forwarder.queue.model import Job, NewMessage, Result
from forwarder.queue.writer import DbThread, GroupCommitter, Op, checkpoints


class Queue:
    """The daemon's handle on the queue: group-committed writes, a separate reader."""

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._writer_db = DbThread(path, busy_timeout, "queue-writer", polls_locks=True)
        self._reader_db = DbThread(path, busy_timeout, "queue-reader")
        self._checkpoint_db = DbThread(path, busy_timeout, "queue-checkpoint")
        self._committer = GroupCommitter(self._writer_db)
        self._task: asyncio.Task[None] | None = None
        self._checkpoints: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._writer_db.run(lambda conn: None)  # create and migrate first
        self._task = asyncio.create_task(self._committer.run(), name="queue-writer")
        self._checkpoints = asyncio.create_task(
            checkpoints(self._checkpoint_db, self._committer), name="queue-checkpoint")

    async def close(self) -> None:
        self._committer.close()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        if self._task is not None:
            await self._task
        await self._writer_db.close()
        await self._reader_db.close()
        await self._checkpoint_db.close()

    @property
    def committing(self) -> int:
        """Operations in the commit under way (for STATUS-like views and tests)."""
        return self._committer.committing

    async def _write(self, op: Op, durable: bool = True) -> Any:
        return await self._committer.submit(op, durable)

    def write_soon(self, op: Op) -> asyncio.Future[Any]:
        """Run `op` in the next group commit, without waiting for it: for writes that ride
        along with the queue's own (the history's RCPT refusals). Raises QueueError while
        the queue shuts down. Not fsync'd on its own (GroupCommitter.submit)."""
        return self._committer.submit(op, durable=False)

    async def write(self, op: Op) -> Any:
        """Run `op` in a group commit and return its result (the history's retention);
        not fsync'd on its own."""
        return await self._committer.submit(op, durable=False)

    async def enqueue(self, message: NewMessage, leased: bool, also: Op | None = None) -> list[int]:
        """Commit and fsync the message; return its recipient ids, leased to this process
        (which delivers them from memory) or, if not `leased`, due at once for the
        scanner. `also` runs in the same transaction, just before (the history: no fsync of
        its own). Raises QueueError."""
        ids: list[int] = await self._write(_with(also, ops.insert_message(message, leased)))
        return ids

    async def record(
        self, results: Sequence[Result], new_messages: Sequence[NewMessage] = (),
        completed: Sequence[tuple[str, Lane]] = (), also: Op | None = None,
    ) -> tuple[list[str], list[list[int]]]:
        """Record outcomes and queue the DSNs they cause; `completed`: the messages whose
        attempt ended normally, and in which lane; `also`, as for `enqueue`. Return the
        ids of messages that left the queue, and the (leased) recipient ids of each new
        message."""
        # An outcome need not be fsync'd on its own (GroupCommitter.submit): lost only if
        # the machine crashes, it costs a second delivery, which PRODUCT.md allows; a
        # commit that queues a DSN is a new message, and is.
        done: tuple[list[str], list[list[int]]] = await self._write(
            _with(also, ops.record(results, new_messages, completed)),
            durable=bool(new_messages))
        return done

    async def crashed(self, job: Job, retry_at: float) -> bool:
        """Record that a worker raised on `job`; True if its message is now held."""
        held: bool = await self._write(ops.crashed(
            job.message_id, job.lane, [r.id for r in job.recipients], retry_at))
        return held

    async def lease_due(self, now: float, limit: int, exclude: frozenset[int],
                        lane_free: bool = False) -> list[Job]:
        # A lease lost with the machine leaves its recipients due: not fsync'd.
        jobs: list[Job] = await self._write(ops.lease_due(now, limit, exclude, lane_free),
                                            durable=False)
        return jobs

    async def recover(self, now: float) -> tuple[int, int]:
        """Start-up: (recipients whose lease a crash left, messages held because of it)."""
        result: tuple[int, int] = await self._write(ops.recover(now))
        return result

    async def release_leases(self, recipient_ids: Sequence[int], now: float) -> None:
        """Clean stop: interrupted deliveries are due again at once, and not counted as
        crashes (only leases found at start-up are)."""
        if recipient_ids:
            await self._write(ops.release(list(recipient_ids), now))

    async def load_body(self, message_id: str) -> bytes | None:
        return await self._reader_db.run(ops.load_body, message_id)

    async def stats(self) -> dict[str, Any]:
        return await self._reader_db.run(ops.stats)


def _with(also: Op | None, op: Op) -> Op:
    """`also`, then `op`, in the same transaction; the result is `op`'s. First, so that
    `also` still sees the rows `op` may delete (the history reads the message's)."""
    if also is None:
        return op

    def both(conn: sqlite3.Connection) -> Any:
        also(conn)
        return op(conn)

    return both
