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
import functools
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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
    """One sqlite3 connection owned by one thread; coroutines run functions on it.

    A thread of its own fed by a SimpleQueue, each result posted back to the loop with one
    `call_soon_threadsafe`, rather than a ThreadPoolExecutor and `run_in_executor`: with
    one session at a time the executor's round trip cost 180-230 us beyond the work, this
    one 60-70 (docs/performance.md, "One session"). The executor's wrapped futures and
    its bookkeeping after the work hold the GIL while the other thread, just woken, wants
    it, and on this kind of machine every such wait is a wake-up of an idle CPU."""

    def __init__(self, path: Path, busy_timeout: float, name: str,
                 polls_locks: bool = False) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        # A daemon thread: a process that dies without close() must not wait for it.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._closed = False
        self._path = path
        self.busy_timeout = busy_timeout
        self._polls_locks = polls_locks
        self._conn: sqlite3.Connection | None = None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def post(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
        """Run `fn(connection, *args)` on the thread, then `done(result, error)` on the
        running loop (`error` None on success). Raises QueueError once closed."""
        if self._closed:
            raise QueueError("queue is shutting down")
        if not self._thread.is_alive():
            self._thread.start()
        self._jobs.put((fn, args, asyncio.get_running_loop(), done))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.post(fn, args, functools.partial(_resolve, future))
        return await future

    def _ensure(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_queue_db(self._path, self.busy_timeout)
            if self._polls_locks:  # apply_batch waits for the lock itself
                self._conn.execute("PRAGMA busy_timeout = 0")
                self._conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
        return self._conn

    def _serve(self) -> None:
        while True:
            fn, args, loop, done = self._jobs.get()
            result: Any = None
            error: BaseException | None = None
            try:
                if fn is None:  # close: the last job
                    self._close_connection()
                else:
                    result = fn(self._ensure(), *args)
            except BaseException as exc:  # the caller's to handle, on its loop
                error = exc
            # The last thing before waiting for the next job: the loop, woken by this,
            # then finds the GIL free.
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(done, result, error)
            if fn is None:
                return
            del fn, args, result, error

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Close the connection on its thread, after the jobs already posted; the thread
        then ends. Later calls to `run` raise QueueError."""
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.put((None, (), loop, functools.partial(_resolve, future)))
        await future


# A job for a DbThread: the function (None: close), its arguments, the loop to answer on,
# what to call there with the result.
Done = Callable[[Any, BaseException | None], None]
_Job = tuple[Callable[..., Any] | None, tuple[Any, ...], asyncio.AbstractEventLoop, Done]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its waiter was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


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
    """Collects write operations; commits everything pending in one transaction.

    Driven by callbacks, with no task of its own: the first operation submitted while no
    transaction is under way is posted to the writer thread at once, from `submit`, and
    the thread's answer resolves the futures and starts the next transaction with all that
    piled up meanwhile. A task woken by an event cost a turn of the loop (and its GIL)
    before each commit (docs/performance.md, "One session")."""

    db: DbThread
    pending: list[Pending] = field(default_factory=list)
    closing: bool = False
    committing: int = 0  # operations in the transaction under way (or waiting for the lock)
    commits: int = 0  # transactions committed so far
    # The operations of a batch that failed, each retried in a transaction of its own.
    _alone: deque[Pending] = field(default_factory=deque)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

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
        if not self.committing:
            self._next()
        return future

    def _next(self) -> None:
        """Start the next transaction, if there is anything to commit."""
        if self._alone:
            batch = [self._alone.popleft()]
        elif self.pending:
            batch = self.pending[:MAX_BATCH]
            del self.pending[:MAX_BATCH]
        else:
            self._idle.set()
            return
        self._idle.clear()
        self.committing = len(batch)
        self.db.post(apply_batch, ([op for op, _, _ in batch], self.db.busy_timeout,
                                   any(d for _, _, d in batch)),
                     functools.partial(self._committed, batch))

    def _committed(self, batch: list[Pending], results: Any,
                   error: BaseException | None) -> None:
        self.committing = 0
        if error is None:
            self.commits += 1
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        elif len(batch) > 1 and isinstance(error, Exception):
            # One bad operation must not fail its neighbours: retry each on its own.
            self._alone.extend(batch)
        else:
            for _, future, _ in batch:
                _fail(future, error)
        self._next()

    def close(self) -> None:
        """Refuse new operations (those already submitted are still committed)."""
        self.closing = True

    async def drained(self) -> None:
        """Return once every operation submitted so far is committed (or failed)."""
        if self.committing or self.pending or self._alone:
            await self._idle.wait()


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


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        code = getattr(exc, "sqlite_errorname", None)
        error = QueueError(f"queue commit failed: {type(exc).__name__}"
                           + (f" {code}: {exc}" if code else ""), is_no_space(exc))
        error.__cause__ = exc
        future.set_exception(error)
