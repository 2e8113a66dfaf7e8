"""Moving a node's queue to another node: `forwarder queue export` and `queue import`.

The queue stays local to each node (a shared queue is the mistake Exim's author warns
about): a node's mail waits for that node. When a node is dead for good but its disk is
readable, its queue is moved (docs/cluster.md, "A dead node's queue"):

- `export FILE` runs on the dead node's state directory with no daemon on it (the state
  lock is taken, so a daemon cannot start meanwhile). It writes the queued messages and
  their recipients to FILE, an SQLite file of its own, fsync'd and renamed into place,
  and only then removes them from the queue (unless `--keep`): the mail is in one place
  at a time, and a node brought back later does not deliver it a second time.
- `import FILE` runs on a live node, daemon running or not: every message not already
  there is added in one transaction (all or nothing; importing twice adds nothing), due
  at once, with its recipients' attempts and DSN parameters kept; the file is then marked
  imported, and importing it again is refused (its mail may have left the queue since).
  The history stays with the dead node.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from forwarder.queue import QUEUE_SCHEMA_VERSION
from forwarder.queue.schema import open_queue_db
from forwarder.queueadmin import QueueAdminError


class QueueMoveError(QueueAdminError):
    """A refused export or import; the message is the one-line reason."""


@dataclass(frozen=True)
class Moved:
    messages: int
    recipients: int
    skipped: int = 0  # messages already in the queue (an import run twice)


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_queue(queue_path: Path, target: Path, keep: bool,
                 busy_timeout: float = 5.0) -> Moved:
    """Write the queue's messages to `target` (a new file), then remove them from the
    queue unless `keep`. The caller holds the state directory's lock."""
    if target.exists():
        raise QueueMoveError(f"{target}: already exists; choose a new file")
    if not queue_path.exists():
        raise QueueMoveError(f"{queue_path}: no queue here")
    tmp = target.with_name(f".{target.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    conn = open_queue_db(queue_path, busy_timeout)
    try:
        conn.execute("ATTACH DATABASE ? AS out", (str(tmp),))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE out.messages AS SELECT * FROM main.messages")
            conn.execute("CREATE TABLE out.recipients AS SELECT * FROM main.recipients")
            conn.execute(f"PRAGMA out.user_version = {QUEUE_SCHEMA_VERSION}")
            messages = conn.execute("SELECT count(*) FROM out.messages").fetchone()[0]
            recipients = conn.execute("SELECT count(*) FROM out.recipients").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("DETACH DATABASE out")
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
        if not keep:  # only once the file is durable: the mail is never in no place
            conn.execute("ATTACH DATABASE ? AS done", (str(target),))
            conn.execute("DELETE FROM main.messages WHERE id IN (SELECT id FROM done.messages)")
            conn.execute("DETACH DATABASE done")
    finally:
        conn.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Moved(int(messages), int(recipients))


def import_queue(queue_path: Path, source: Path, now: float,
                 busy_timeout: float = 5.0) -> Moved:
    """Add the messages of an export file to the queue, in one transaction."""
    if not source.is_file():
        raise QueueMoveError(f"{source}: no such file")
    try:
        src = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True)
        version = src.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in src.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise QueueMoveError(f"{source}: not a queue export ({exc})") from exc
    try:
        if not {"messages", "recipients"} <= tables:
            raise QueueMoveError(f"{source}: not a queue export (no messages table)")
        if "imported" in tables:
            at, where = src.execute("SELECT at, queue FROM imported").fetchone()
            raise QueueMoveError(f"{source}: already imported into {where} "
                                 f"({datetime.fromtimestamp(at, UTC):%Y-%m-%d %H:%M} UTC)")
        if version != QUEUE_SCHEMA_VERSION:
            raise QueueMoveError(f"{source}: exported by a forwarder with queue schema "
                                 f"{version}, this one has {QUEUE_SCHEMA_VERSION}; "
                                 "import it with the same version")
        dst = open_queue_db(queue_path, busy_timeout)
        try:
            moved = _copy(src, dst, now)
        finally:
            dst.close()
    finally:
        src.close()
    _mark_imported(source, queue_path, now)
    return moved


def _mark_imported(source: Path, queue_path: Path, now: float) -> None:
    conn = sqlite3.connect(source, isolation_level=None)
    try:
        conn.execute("CREATE TABLE imported (at REAL NOT NULL, queue TEXT NOT NULL)")
        conn.execute("INSERT INTO imported VALUES (?, ?)", (now, str(queue_path.resolve())))
    finally:
        conn.close()


def _copy(src: sqlite3.Connection, dst: sqlite3.Connection, now: float) -> Moved:
    message_cols = [c for c in _columns(src, "main", "messages")
                    if c in _columns(dst, "main", "messages")]
    rcpt_cols = [c for c in _columns(src, "main", "recipients")
                 if c in _columns(dst, "main", "recipients") and c != "id"]
    insert_message = (f"INSERT INTO messages ({', '.join(message_cols)}) VALUES "
                      f"({', '.join('?' * len(message_cols))})")
    insert_rcpt = (f"INSERT INTO recipients ({', '.join(rcpt_cols)}) VALUES "
                   f"({', '.join('?' * len(rcpt_cols))})")
    lease, due = rcpt_cols.index("leased"), rcpt_cols.index("next_attempt")
    moved = Moved(0, 0)
    dst.execute("BEGIN IMMEDIATE")
    try:
        for row in src.execute(f"SELECT {', '.join(message_cols)} FROM messages"):
            queue_id = row[message_cols.index("id")]
            if dst.execute("SELECT 1 FROM messages WHERE id = ?", (queue_id,)).fetchone():
                moved = Moved(moved.messages, moved.recipients, moved.skipped + 1)
                continue
            dst.execute(insert_message, row)
            count = 0
            for rcpt in src.execute(f"SELECT {', '.join(rcpt_cols)} FROM recipients"
                                    " WHERE message_id = ?", (queue_id,)):
                values = list(rcpt)
                # A lease belonged to the dead node's delivery; the mail is due here now.
                values[lease], values[due] = 0, now
                dst.execute(insert_rcpt, values)
                count += 1
            moved = Moved(moved.messages + 1, moved.recipients + count, moved.skipped)
        dst.execute("COMMIT")
    except BaseException:
        dst.execute("ROLLBACK")
        raise
    return moved
