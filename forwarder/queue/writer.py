"""The queue's writer: one thread, one connection, and group commit.

`250` after DATA is sent only once the message row, its recipients and its exact bytes are
committed and fsync'd (PRODUCT.md, "What accepted promises"). Writes go through one writer
thread that commits whatever has piled up while the previous commit was syncing, in one
transaction (group commit): a lone message is committed at once, and under load one fsync
serves many messages. The thread runs a whole batch as one call, so a batch costs one hop
between the event loop and the database thread, not one per statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from forwarder.queue.model import QueueError
from forwarder.queue.schema import open_queue_db

T = TypeVar("T")

# An operation: run in the writer thread, inside the batch's transaction.
Op = Callable[[sqlite3.Connection], Any]

MAX_BATCH = 512
# The WAL is copied into the database (checkpointed) by a thread of its own, this often
# while commits come in, not by the commit that crosses SQLite's 1000-page threshold: that
# commit's messages waited for the checkpoint's writes and two fsyncs before their 250
# (docs/performance.md, "The edges"). SQLite's own checkpoint stays as a backstop, far
# higher, in case the checkpoint thread falls behind.
CHECKPOINT_INTERVAL = 0.2
BACKSTOP_PAGES = 20_000
# Waiting for another process's write lock: first and longest pause between two tries.
LOCK_POLL_FIRST = 0.0001
LOCK_POLL_MAX = 0.002


def is_no_space(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or (isinstance(exc, OSError) and exc.errno == 28)


class DbThread:
    """One sqlite3 connection owned by one thread; coroutines run functions on it."""

    def __init__(self, path: Path, busy_timeout: float, name: str,
                 polls_locks: bool = False) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._path = path
        self.busy_timeout = busy_timeout
        self._polls_locks = polls_locks
        self._conn: sqlite3.Connection | None = None

    def _ensure(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_queue_db(self._path, self.busy_timeout)
            if self._polls_locks:  # apply_batch waits for the lock itself
                self._conn.execute("PRAGMA busy_timeout = 0")
                self._conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
        return self._conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._ensure(), *args)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)


def _is_busy(exc: BaseException) -> bool:
    """A lock another connection holds, or a race on the WAL's shared index that SQLite
    gave up retrying (SQLITE_PROTOCOL): both pass, so both are waited out."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_PROTOCOL)


def apply_batch(conn: sqlite3.Connection, ops: Sequence[Op], busy_timeout: float,
                durable: bool = True) -> list[Any]:
    """Run `ops` in one transaction, waiting up to `busy_timeout` for the write lock;
    fsync'd at commit if `durable` (see `GroupCommitter.submit`).

    An acceptor process and the main process write the same queue. SQLite's own busy
    handler sleeps 1, 2, 5, 10, 15, 20, 25 ms between tries: under load the acceptor's
    writer slept most of the time (strace: hundreds of 1-25 ms sleeps in 5 s) while its
    sessions waited for their 250. Polling from 0.1 ms up to 2 ms takes the lock within a
    fraction of a millisecond of its release (docs/performance.md). Only the lock wait
    changes: a durable commit is as durable as before (synchronous=FULL)."""
    deadline = time.monotonic() + busy_timeout
    pause = LOCK_POLL_FIRST
    while True:
        try:
            _set_synchronous(conn, durable)
            return _transaction(conn, ops)
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, LOCK_POLL_MAX)


def _set_synchronous(conn: sqlite3.Connection, durable: bool) -> None:
    # Outside a transaction, as SQLite reads it when the transaction starts.
    conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")


def _transaction(conn: sqlite3.Connection, ops: Sequence[Op]) -> list[Any]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [op(conn) for op in ops]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


# An operation waiting for its commit: the operation, its result, whether it is durable.
Pending = tuple[Op, "asyncio.Future[Any]", bool]


@dataclass
class GroupCommitter:
    """Collects write operations; commits everything pending in one transaction."""

    db: DbThread
    pending: list[Pending] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    committing: int = 0  # operations in the transaction under way (or waiting for the lock)
    commits: int = 0  # transactions committed so far

    def submit(self, op: Op, durable: bool = True) -> asyncio.Future[Any]:
        """Queue `op` for the next commit. `durable`: fsync'd before the future resolves
        (synchronous=FULL), as a new message must be before its 250. Otherwise the commit
        is written to the WAL without an fsync (synchronous=NORMAL): it survives a crash of
        the process, as the kernel holds the write, and is made durable by the next
        fsync'd commit or checkpoint; only a crash of the machine can lose it. A batch is
        fsync'd if any of its operations is durable."""
        if self.closing:
            raise QueueError("queue is shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((op, future, durable))
        self.wakeup.set()
        return future

    async def run(self) -> None:
        while not (self.closing and not self.pending):
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch = self.pending[:MAX_BATCH]
                del self.pending[:MAX_BATCH]
                await self._commit(batch)

    async def _commit(self, batch: list[Pending]) -> None:
        self.committing = len(batch)
        try:
            results = await self.db.run(apply_batch, [op for op, _, _ in batch],
                                        self.db.busy_timeout, any(d for _, _, d in batch))
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0][1], exc)
                return
            # One bad operation must not fail its neighbours: retry each on its own.
            for pending in batch:
                await self._commit([pending])
            return
        finally:
            self.committing = 0
        self.commits += 1
        for (_, future, _), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def close(self) -> None:
        self.closing = True
        self.wakeup.set()


async def checkpoints(db: DbThread, committer: GroupCommitter) -> None:
    """Checkpoint the WAL on `db` (a connection of its own) every CHECKPOINT_INTERVAL
    while commits come in. PASSIVE: it copies what no reader still needs and never waits
    for a lock, so neither the writers nor the readers of any process wait for it."""
    seen = committer.commits
    while not committer.closing:
        await asyncio.sleep(CHECKPOINT_INTERVAL)
        if committer.commits != seen:
            seen = committer.commits
            # On an error, the next one or SQLite's backstop catches up.
            with contextlib.suppress(sqlite3.Error):
                await db.run(_checkpoint)


def sync_wal(conn: sqlite3.Connection) -> None:
    """Make every commit so far durable, fsync'd or not: fsync the WAL file (a commit
    already checkpointed is in the database file, which the checkpoint fsync'd before the
    WAL could be reused)."""
    name = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        fd = os.open(f"{name}-wal", os.O_RDONLY)
    except FileNotFoundError:  # no WAL: everything is in the database file
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        code = getattr(exc, "sqlite_errorname", None)
        error = QueueError(f"queue commit failed: {type(exc).__name__}"
                           + (f" {code}: {exc}" if code else ""), is_no_space(exc))
        error.__cause__ = exc
        future.set_exception(error)
