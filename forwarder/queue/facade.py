"""`Queue`: the daemon's handle on the queue, group-committed writes and a separate reader."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forwarder.policy import Ending, Lane
from forwarder.queue import ops
from forwarder.queue.model import Body, Job, NewMessage, QueueError, Result, SpooledBody
from forwarder.queue.reserve import RESERVE_FILE, SpaceReserve
from forwarder.queue.spool import Spool
from forwarder.queue.writer import (
    DbThread,
    GroupCommitter,
    Op,
    checkpoints,
    is_no_space,
    sync_wal,
)


class Queue:
    """The daemon's handle on the queue: group-committed writes, a separate reader."""

    def __init__(self, path: Path, busy_timeout: float = 5.0, reserve: int = 0) -> None:
        self.path = path
        # Space kept back for the writes that settle mail (forwarder/queue/reserve.py).
        self.reserve = SpaceReserve(path.parent / RESERVE_FILE, reserve)
        self.reserve_released = 0  # times it was given back (the daemon notices)
        self._writer_db = DbThread(path, busy_timeout, "queue-writer", polls_locks=True)
        self._reader_db = DbThread(path, busy_timeout, "queue-reader")
        self._checkpoint_db = DbThread(path, busy_timeout, "queue-checkpoint")
        self._committer = GroupCommitter(self._writer_db)
        self._checkpoints: asyncio.Task[None] | None = None
        # Bodies too big for a row (forwarder/queue/spool.py), beside the queue file.
        self.spool = Spool(path.parent / "spool")

    async def open(self) -> None:
        await self._writer_db.run(lambda conn: None)  # create and migrate first
        await asyncio.to_thread(self.spool.ensure)
        self._checkpoints = asyncio.create_task(
            checkpoints(self._checkpoint_db, self._committer), name="queue-checkpoint")

    async def close(self) -> None:
        self._committer.close()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        await self._committer.drained()
        await self._writer_db.close()
        await self._reader_db.close()
        await self._checkpoint_db.close()

    @property
    def committing(self) -> int:
        """Operations in the commit under way (for STATUS-like views and tests)."""
        return self._committer.committing

    async def _write(self, op: Op, durable: bool = True) -> Any:
        return await self._committer.submit(op, durable)

    async def _settle(self, op: Op, durable: bool = True) -> Any:
        """A write that settles mail (an outcome, a lease, the recovery): on a full disk the
        reserve is given back to the filesystem and the write tried once more. New mail
        (`enqueue`) never comes here."""
        try:
            return await self._write(op, durable)
        except QueueError as exc:
            if not exc.no_space or self.reserve.size <= 0:
                raise
        # Given back now, or a moment ago for another write of the same batch.
        if await asyncio.to_thread(self.reserve.release):
            self.reserve_released += 1
        return await self._write(op, durable)

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
        if isinstance(message.body, SpooledBody):
            message = await self._spool(message, message.body)
        try:
            ids: list[int] = await self._write(_with(also, ops.insert_message(message, leased)))
        except BaseException:
            if isinstance(message.body, SpooledBody):
                await asyncio.to_thread(self.spool.remove, [message.id])
            raise
        return ids

    async def _spool(self, message: NewMessage, body: SpooledBody) -> NewMessage:
        """The received file made durable under the message's id, before its row."""
        try:
            path = await asyncio.to_thread(self.spool.commit, body.path, message.id)
        except OSError as exc:
            raise QueueError(f"spool write failed: {exc.strerror}", is_no_space(exc)) from exc
        return dataclasses.replace(message, body=dataclasses.replace(body, path=path))

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
        spooled: list[str] = []
        done: tuple[list[str], list[list[int]]] = await self._settle(
            _with(also, ops.record(results, new_messages, completed, spooled)),
            durable=bool(new_messages))
        if spooled:  # their rows are gone: the files go too
            if not new_messages:
                # Not before the deletion of their rows is durable: lost with the machine,
                # it would bring back rows whose bytes are gone.
                await self._writer_db.run(sync_wal)
            await asyncio.to_thread(self.spool.remove, spooled)
        return done

    async def crashed(self, job: Job, retry_at: float) -> bool:
        """Record that a worker raised on `job`; True if its message is now held."""
        held: bool = await self._settle(ops.crashed(
            job.message_id, job.lane, [r.id for r in job.recipients], retry_at))
        return held

    async def lease_due(self, now: float, limit: int, exclude: frozenset[int],
                        lane_free: bool = False) -> list[Job]:
        # A lease lost with the machine leaves its recipients due: not fsync'd.
        jobs: list[Job] = await self._settle(ops.lease_due(now, limit, exclude, lane_free),
                                             durable=False)
        return jobs

    async def recover(self, now: float, faulted: bool = False) -> tuple[int, int]:
        """Start-up: (recipients whose lease the last run left, messages held because of
        it). `faulted`: that run died of a fault of its own (forwarder/faults.py), not of
        a kill from outside, which is nobody's fault."""
        ending = Ending.FAULTED if faulted else Ending.KILLED
        result: tuple[int, int] = await self._settle(ops.recover(now, ending))
        return result

    async def lease_expired_held(self, now: float, lifetime: float) -> list[Job]:
        jobs: list[Job] = await self._settle(ops.lease_expired_held(now, lifetime))
        return jobs

    async def release_leases(self, recipient_ids: Sequence[int], now: float) -> None:
        """Clean stop: interrupted deliveries are due again at once, and not counted as
        crashes (only leases found at start-up are)."""
        if recipient_ids:
            await self._settle(ops.release(list(recipient_ids), now))

    async def load_body(self, message_id: str) -> Body | None:
        return await self._reader_db.run(ops.load_body, message_id, self.spool.root)

    async def sweep_spool(self) -> int:
        """Remove spool files that no row names any more (forwarder/queue/spool.py)."""
        named = await self._reader_db.run(ops.spooled_ids)
        return await asyncio.to_thread(self.spool.sweep, named)

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
