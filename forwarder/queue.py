"""The durable queue: SQLite in WAL mode with synchronous=FULL, in its own file.

`250` after DATA is sent only once the message row, its recipients and its exact bytes are
committed and fsync'd (PRODUCT.md, "What accepted promises"). Writes go through one writer
thread that commits whatever has piled up while the previous commit was syncing, in one
transaction (group commit): a lone message is committed at once, and under load one fsync
serves many messages. The thread runs a whole batch as one call, so a batch costs one hop
between the event loop and the database thread, not one per statement.

Work on a recipient is leased: the lease is written with the batch that hands the recipient
to a delivery worker, so a crash leaves a visible lease that start-up recovers. A crash is
charged to a message only when it can be blamed on it (Mailman's switchboard quarantines
the one file a runner was working on; a daemon delivering hundreds at once needs more care):

- messages in delivery when the process died become suspects (crashes = 1). The scanner
  no longer hands a suspect out with the others: it goes through a lane of its own, one
  message at a time in the whole daemon (lease value ISOLATED);
- a process that dies while a suspect is alone in that lane charges that suspect (+1), and
  the messages delivered beside it are only suspected, never charged twice;
- a worker that raises on a message charges it directly (forwarder/delivery.py);
- at MAX_CRASHES the message is held; an attempt that completes (whatever its outcome)
  clears the count, since the message evidently does not bring the daemon down.

So a poison message is held after crashing the daemon twice on its own, and mail that only
happened to be in flight during crashes (an OOM kill under load, an administrator's kill -9
in a loop) is retried, not quarantined.
"""

from __future__ import annotations

import asyncio
import base64
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from forwarder import migrations
from forwarder.policy import Route

T = TypeVar("T")

SCHEMA = (
    """
    CREATE TABLE messages (
        id         TEXT PRIMARY KEY,
        sender     TEXT NOT NULL,           -- '' is the null sender
        arrived_at REAL NOT NULL,
        size       INTEGER NOT NULL,
        client     TEXT NOT NULL DEFAULT '',
        held       INTEGER NOT NULL DEFAULT 0,
        crashes    INTEGER NOT NULL DEFAULT 0,
        body       BLOB NOT NULL
    );
    CREATE TABLE recipients (
        id           INTEGER PRIMARY KEY,
        message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        orig_rcpt    TEXT NOT NULL,
        rcpt         TEXT NOT NULL,
        route        TEXT NOT NULL,
        state        TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'failed')),
        leased       INTEGER NOT NULL DEFAULT 0,
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_attempt REAL,
        last_error   TEXT,
        dsn_status   TEXT,
        remote_mta   TEXT
    );
    CREATE INDEX recipients_due ON recipients (next_attempt) WHERE state = 'queued';
    CREATE INDEX recipients_message ON recipients (message_id);
    """,
    # v2: a delay warning (RFC 3464 Action: delayed) is sent at most once per recipient.
    """
    ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0;
    """,
    # v3: suspects (crashed once, not held) are found without walking the due index.
    """
    CREATE INDEX messages_suspect ON messages (id) WHERE crashes > 0 AND held = 0;
    """,
)
QUEUE_SCHEMA_VERSION = len(SCHEMA)
# A message charged with this many crashes is held (quarantined): suspected once, then
# twice alone in the suspect lane when the process died (or a worker raising on it).
MAX_CRASHES = 3
# recipients.leased: 0 free, LEASED in a normal delivery, ISOLATED alone in the suspect lane.
LEASED = 1
ISOLATED = 2
# How long a lease keeps a recipient away from the scanner; longer than any one attempt
# can take (connect 30 s + data 600 s), so a slow delivery is never started twice.
LEASE_SECONDS = 3600.0
MAX_BATCH = 512


class QueueError(Exception):
    """The queue could not commit; `no_space` tells a full disk (452) from the rest (451)."""

    def __init__(self, message: str, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


# Queue ids need to be unique, not secret: a generator seeded from os.urandom once per
# process (each acceptor is a fresh interpreter) spares a getrandom() call per message.
_ID_RANDOM = random.Random()


def new_queue_id(now: float) -> str:
    """16 base32 characters: 40 bits of milliseconds (sortable by time) + 40 random bits."""
    raw = ((int(now * 1000) & (2**40 - 1)) << 40) | _ID_RANDOM.getrandbits(40)
    return base64.b32encode(raw.to_bytes(10, "big")).decode("ascii")


@dataclass(frozen=True)
class NewRecipient:
    orig_rcpt: str
    rcpt: str
    route: Route


@dataclass(frozen=True)
class NewMessage:
    id: str
    sender: str
    arrived_at: float
    client: str
    body: bytes
    recipients: tuple[NewRecipient, ...]


@dataclass
class RecipientJob:
    id: int
    orig_rcpt: str
    rcpt: str
    route: Route
    attempts: int
    warned: bool = False


@dataclass
class Job:
    """A message and the recipients a worker must try now."""

    message_id: str
    sender: str
    arrived_at: float
    recipients: list[RecipientJob]
    body: bytes | None = None
    isolated: bool = False  # a suspect, alone in the lane: a crash now is charged to it


@dataclass(frozen=True)
class Result:
    """What happened to one recipient; `retry_at` None with outcome deferred is impossible."""

    recipient_id: int
    message_id: str
    outcome: str  # "delivered" | "deferred" | "failed"
    attempted_at: float
    retry_at: float | None = None
    error: str | None = None
    dsn_status: str | None = None
    remote_mta: str | None = None
    warned: bool = False  # a delay warning was sent with this result


def open_queue_db(path: Path, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """Open and migrate the queue database. Durability: WAL + synchronous=FULL, never less."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsync'd at every commit, so a 250 survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrations.migrate(conn, SCHEMA, "queue", QueueError)
    return conn


def _is_no_space(exc: BaseException) -> bool:
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
            if self._polls_locks:  # _apply_batch waits for the lock itself
                self._conn.execute("PRAGMA busy_timeout = 0")
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


Op = Callable[[sqlite3.Connection], Any]


# Waiting for another process's write lock: first and longest pause between two tries.
LOCK_POLL_FIRST = 0.0001
LOCK_POLL_MAX = 0.002


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def _apply_batch(conn: sqlite3.Connection, ops: Sequence[Op], busy_timeout: float) -> list[Any]:
    """Run `ops` in one transaction, waiting up to `busy_timeout` for the write lock.

    An acceptor process and the main process write the same queue. SQLite's own busy
    handler sleeps 1, 2, 5, 10, 15, 20, 25 ms between tries: under load the acceptor's
    writer slept most of the time (strace: hundreds of 1-25 ms sleeps in 5 s) while its
    sessions waited for their 250. Polling from 0.1 ms up to 2 ms takes the lock within a
    fraction of a millisecond of its release (docs/performance.md). Only the lock wait
    changes: the commit is as durable as before (synchronous=FULL)."""
    deadline = time.monotonic() + busy_timeout
    pause = LOCK_POLL_FIRST
    while True:
        try:
            return _transaction(conn, ops)
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, LOCK_POLL_MAX)


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


@dataclass
class _GroupCommitter:
    """Collects write operations; commits everything pending in one transaction."""

    db: DbThread
    pending: list[tuple[Op, asyncio.Future[Any]]] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    committing: int = 0  # operations in the transaction under way (or waiting for the lock)

    def submit(self, op: Op) -> asyncio.Future[Any]:
        if self.closing:
            raise QueueError("queue is shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((op, future))
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

    async def _commit(self, batch: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        self.committing = len(batch)
        try:
            results = await self.db.run(_apply_batch, [op for op, _ in batch],
                                        self.db.busy_timeout)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0][1], exc)
                return
            # One bad operation must not fail its neighbours: retry each on its own.
            for op, future in batch:
                await self._commit([(op, future)])
            return
        finally:
            self.committing = 0
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def close(self) -> None:
        self.closing = True
        self.wakeup.set()


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        error = QueueError(f"queue commit failed: {type(exc).__name__}", _is_no_space(exc))
        error.__cause__ = exc
        future.set_exception(error)


# --- operations, run in the writer thread inside a batch transaction -------------------


def _insert_message(msg: NewMessage, lease_until: float | None) -> Op:
    """Insert a message; its recipients are leased to this process until `lease_until`,
    or, with None, left for the scanner (another process delivers them)."""
    leased, next_attempt = ((0, msg.arrived_at) if lease_until is None
                            else (LEASED, lease_until))

    def op(conn: sqlite3.Connection) -> list[int]:
        conn.execute(
            "INSERT INTO messages (id, sender, arrived_at, size, client, body)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (msg.id, msg.sender, msg.arrived_at, len(msg.body), msg.client, msg.body),
        )
        ids = []
        for r in msg.recipients:
            cursor = conn.execute(
                "INSERT INTO recipients (message_id, orig_rcpt, rcpt, route, leased,"
                " next_attempt) VALUES (?, ?, ?, ?, ?, ?)",
                (msg.id, r.orig_rcpt, r.rcpt, r.route.value, leased, next_attempt),
            )
            ids.append(int(cursor.lastrowid or 0))
        return ids

    return op


def _record(results: Sequence[Result], new_messages: Sequence[NewMessage], now: float,
            cleared: Sequence[str]) -> Op:
    """Outcomes and the DSNs they cause, in one transaction: a failed recipient leaves the
    queue in the same commit that queues its bounce, so a crash can lose neither. The
    `cleared` messages (suspects whose lone attempt completed) are suspects no more."""

    def op(conn: sqlite3.Connection) -> tuple[list[str], list[list[int]]]:
        conn.executemany("UPDATE messages SET crashes = 0 WHERE id = ?",
                         [(mid,) for mid in cleared])
        touched: set[str] = set()
        for r in results:
            touched.add(r.message_id)
            if r.outcome in ("delivered", "failed"):
                conn.execute("DELETE FROM recipients WHERE id = ?", (r.recipient_id,))
                continue
            conn.execute(
                "UPDATE recipients SET leased = 0, attempts = attempts + 1,"
                " next_attempt = ?, last_attempt = ?, last_error = ?, dsn_status = ?,"
                " remote_mta = ?, warned = max(warned, ?) WHERE id = ?",
                (r.retry_at if r.retry_at is not None else r.attempted_at, r.attempted_at,
                 r.error, r.dsn_status, r.remote_mta, int(r.warned), r.recipient_id),
            )
        new_ids = [_insert_message(m, now + LEASE_SECONDS)(conn) for m in new_messages]
        return _finished_messages(conn, touched), new_ids

    return op


def _crashed(message_id: str, recipient_ids: Sequence[int], retry_at: float) -> Op:
    """A worker raised on this message: count it, retry later, hold it past MAX_CRASHES."""

    def op(conn: sqlite3.Connection) -> bool:
        conn.executemany(
            "UPDATE recipients SET leased = 0, next_attempt = ? WHERE id = ?",
            [(retry_at, rid) for rid in recipient_ids])
        conn.execute("UPDATE messages SET crashes = crashes + 1 WHERE id = ?", (message_id,))
        return bool(conn.execute(
            "UPDATE messages SET held = 1 WHERE id = ? AND crashes >= ?",
            (message_id, MAX_CRASHES)).rowcount)

    return op


def _finished_messages(conn: sqlite3.Connection, ids: Iterable[str]) -> list[str]:
    """Delete messages with nothing left to try; return their ids."""
    done = []
    for message_id in ids:
        left = conn.execute(
            "SELECT 1 FROM recipients WHERE message_id = ? AND state = 'queued' LIMIT 1",
            (message_id,),
        ).fetchone()
        if left is None:
            conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            done.append(message_id)
    return done


_DUE_COLUMNS = ("SELECT r.id, r.message_id, r.orig_rcpt, r.rcpt, r.route, r.attempts,"
                " r.warned, m.sender, m.arrived_at"
                " FROM recipients r JOIN messages m ON m.id = r.message_id")


def _lease_due(now: float, limit: int, exclude: frozenset[int], lane_free: bool) -> Op:
    """Lease up to `limit` due recipients of unsuspected messages and, if the suspect lane
    is free, every due recipient of the suspect that has waited longest (one message)."""

    def op(conn: sqlite3.Connection) -> list[Job]:
        rows = conn.execute(
            f"{_DUE_COLUMNS} WHERE r.state = 'queued' AND r.next_attempt <= ?"
            " AND m.held = 0 AND m.crashes = 0 ORDER BY r.next_attempt LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        fresh = [row for row in rows if row[0] not in exclude][:limit]
        jobs = _lease_rows(conn, fresh, now, LEASED)
        if lane_free:
            jobs += _lease_rows(conn, _due_suspect(conn, now, exclude), now, ISOLATED)
        return jobs

    return op


def _due_suspect(conn: sqlite3.Connection, now: float,
                 exclude: frozenset[int]) -> list[tuple[Any, ...]]:
    """The due recipients of the oldest suspect that has any. Suspects are few (the partial
    index holds only them), so this costs nothing while there are none, whatever the
    backlog."""
    suspects = conn.execute("SELECT id FROM messages WHERE crashes > 0 AND held = 0"
                            " ORDER BY arrived_at").fetchall()
    for (mid,) in suspects:
        rows = [row for row in conn.execute(
            f"{_DUE_COLUMNS} WHERE r.message_id = ? AND r.state = 'queued'"
            " AND r.next_attempt <= ?", (mid, now)) if row[0] not in exclude]
        if rows:
            return rows
    return []


def _lease_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], now: float,
                lease: int) -> list[Job]:
    jobs: dict[str, Job] = {}
    for rid, mid, orig, rcpt, route, attempts, warned, sender, arrived in rows:
        conn.execute("UPDATE recipients SET leased = ?, next_attempt = ? WHERE id = ?",
                     (lease, now + LEASE_SECONDS, rid))
        job = jobs.setdefault(mid, Job(mid, sender, arrived, [], isolated=lease == ISOLATED))
        job.recipients.append(
            RecipientJob(rid, orig, rcpt, Route(route), attempts, bool(warned)))
    return list(jobs.values())


def _recover(now: float) -> Op:
    """Start-up: leases left by a crash become due now. The suspect that was alone in the
    lane is charged; the messages in ordinary delivery become suspects (module docstring)."""

    def op(conn: sqlite3.Connection) -> tuple[int, int]:
        conn.execute(
            "UPDATE messages SET crashes = crashes + 1 WHERE id IN"
            " (SELECT message_id FROM recipients WHERE leased = ?)", (ISOLATED,))
        conn.execute(
            "UPDATE messages SET crashes = 1 WHERE crashes = 0 AND id IN"
            " (SELECT message_id FROM recipients WHERE leased = ?)", (LEASED,))
        held = conn.execute(
            "UPDATE messages SET held = 1 WHERE crashes >= ? AND held = 0", (MAX_CRASHES,)
        ).rowcount
        recovered = conn.execute(
            "UPDATE recipients SET leased = 0, next_attempt = ? WHERE leased != 0", (now,)
        ).rowcount
        return recovered, held

    return op


def _release(ids: list[int], now: float) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany("UPDATE recipients SET leased = 0, next_attempt = ? WHERE id = ?",
                         [(now, rid) for rid in ids])

    return op


def _load_body(conn: sqlite3.Connection, message_id: str) -> bytes | None:
    row = conn.execute("SELECT body FROM messages WHERE id = ?", (message_id,)).fetchone()
    return None if row is None else bytes(row[0])


def _stats(conn: sqlite3.Connection) -> dict[str, Any]:
    counts = dict(conn.execute(
        "SELECT state, count(*) FROM recipients GROUP BY state").fetchall())
    oldest = conn.execute("SELECT min(arrived_at) FROM messages").fetchone()[0]
    messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    return {"messages": messages, "recipients": counts, "oldest": oldest}


class Queue:
    """The daemon's handle on the queue: group-committed writes, a separate reader."""

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._writer_db = DbThread(path, busy_timeout, "queue-writer", polls_locks=True)
        self._reader_db = DbThread(path, busy_timeout, "queue-reader")
        self._committer = _GroupCommitter(self._writer_db)
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._writer_db.run(lambda conn: None)  # create and migrate first
        self._task = asyncio.create_task(self._committer.run(), name="queue-writer")

    async def close(self) -> None:
        self._committer.close()
        if self._task is not None:
            await self._task
        await self._writer_db.close()
        await self._reader_db.close()

    @property
    def committing(self) -> int:
        """Operations in the commit under way (for STATUS-like views and tests)."""
        return self._committer.committing

    async def _write(self, op: Op) -> Any:
        return await self._committer.submit(op)

    async def enqueue(self, message: NewMessage, lease_until: float | None) -> list[int]:
        """Commit and fsync the message; return its recipient ids (leased to the caller
        until `lease_until`, or due at once for the scanner with None)."""
        ids: list[int] = await self._write(_insert_message(message, lease_until))
        return ids

    async def record(
        self, results: Sequence[Result], new_messages: Sequence[NewMessage] = (),
        now: float = 0.0, cleared: Sequence[str] = (),
    ) -> tuple[list[str], list[list[int]]]:
        """Record outcomes and queue the DSNs they cause; return the ids of messages that
        left the queue, and the (leased) recipient ids of each new message."""
        done: tuple[list[str], list[list[int]]] = await self._write(
            _record(results, new_messages, now, cleared))
        return done

    async def crashed(self, message_id: str, recipient_ids: Sequence[int],
                      retry_at: float) -> bool:
        """Record a worker crash; True if the message is now held (quarantined)."""
        held: bool = await self._write(_crashed(message_id, recipient_ids, retry_at))
        return held

    async def lease_due(self, now: float, limit: int, exclude: frozenset[int],
                        lane_free: bool = False) -> list[Job]:
        jobs: list[Job] = await self._write(_lease_due(now, limit, exclude, lane_free))
        return jobs

    async def recover(self, now: float) -> tuple[int, int]:
        result: tuple[int, int] = await self._write(_recover(now))
        return result

    async def release_leases(self, recipient_ids: Sequence[int], now: float) -> None:
        """Clean stop: interrupted deliveries are due again at once, and not counted as
        crashes (only leases found at start-up are)."""
        if recipient_ids:
            await self._write(_release(list(recipient_ids), now))

    async def load_body(self, message_id: str) -> bytes | None:
        return await self._reader_db.run(_load_body, message_id)

    async def stats(self) -> dict[str, Any]:
        return await self._reader_db.run(_stats)
