"""Admin access to the queue (`forwarder queue ...`), like postqueue -p / postsuper.

These run against the same SQLite file as the running daemon, in short transactions
(WAL: the daemon keeps reading and writing meanwhile). The daemon's scanner sees a `retry`
or `release` on its next pass (at most `delivery.poll_interval` later); a `hold` keeps it
from leasing the message again, though an attempt already in progress (a leased
recipient, shown as "in delivery") is allowed to finish.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from forwarder.queue.reserve import RESERVE_FILE, SpaceReserve
from forwarder.queue.schema import open_queue_db
from forwarder.queue.spool import Spool, read_head
from forwarder.queue.writer import is_no_space
from forwarder.smtpbody import HEAD_OCTETS, unstuff


class QueueAdminError(Exception):
    pass


@dataclass
class RecipientInfo:
    id: int
    rcpt: str
    orig_rcpt: str
    route: str
    leased: bool  # a delivery attempt is in progress
    attempts: int
    next_attempt: float
    last_attempt: float | None
    last_error: str | None
    dsn_status: str | None
    remote_mta: str | None


@dataclass
class MessageInfo:
    id: str
    arrived_at: float
    size: int
    sender: str
    client: str
    held: bool
    crashes: int
    recipients: list[RecipientInfo]


_MESSAGE_COLUMNS = "id, arrived_at, size, sender, client, held, crashes"
_RECIPIENT_COLUMNS = ("id, rcpt, orig_rcpt, route, leased, attempts, next_attempt,"
                      " last_attempt, last_error, dsn_status, remote_mta")


def _message(row: Any) -> MessageInfo:
    mid, arrived, size, sender, client, held, crashes = row
    return MessageInfo(mid, arrived, size, sender, client, bool(held), crashes, [])


def _recipient(row: Any) -> RecipientInfo:
    rid, rcpt, orig, route, leased, attempts, next_at, last_at, error, dsn, mta = row
    return RecipientInfo(rid, rcpt, orig, route, bool(leased), attempts, next_at,
                         last_at, error, dsn, mta)


class QueueAdmin:
    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.conn = open_queue_db(path, busy_timeout)
        self.spool = Spool(path.parent / "spool")
        self.reserve = SpaceReserve(path.parent / RESERVE_FILE, 0)

    def close(self) -> None:
        self.conn.close()

    def messages(self) -> list[MessageInfo]:
        """Every message, oldest first, with its recipients; one read transaction so the
        listing is consistent while the daemon works."""
        with self._read():
            messages = {m.id: m for m in map(_message, self.conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages ORDER BY arrived_at, id"))}
            for row in self.conn.execute(
                    f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipients ORDER BY id"):
                if row[0] in messages:
                    messages[row[0]].recipients.append(_recipient(row[1:]))
        return list(messages.values())

    def get(self, queue_id: str) -> MessageInfo:
        with self._read():
            row = self.conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (queue_id,)).fetchone()
            if row is None:
                raise QueueAdminError(f"{queue_id}: no such message in the queue")
            info = _message(row)
            info.recipients = [_recipient(r) for r in self.conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ? ORDER BY id",
                (queue_id,))]
        return info

    def headers(self, queue_id: str) -> list[tuple[str, str]]:
        """The header fields as received (the body is never shown: PRODUCT.md, Logs)."""
        row = self.conn.execute(
            "SELECT substr(body, 1, ?), spooled FROM messages WHERE id = ?",
            (HEAD_OCTETS, queue_id)).fetchone()
        if row is None:
            raise QueueAdminError(f"{queue_id}: no such message in the queue")
        head = bytes(row[0])
        if row[1]:  # our fields in the row, the client's message in its spool file
            with contextlib.suppress(FileNotFoundError):
                raw = read_head(self.spool.path(queue_id), HEAD_OCTETS)
                head += unstuff(raw[:raw.rfind(b"\r\n") + 2])
        parsed = BytesHeaderParser(policy=compat32).parsebytes(head[:HEAD_OCTETS])
        return [(name, str(value)) for name, value in parsed.items()]

    def retry(self, queue_id: str | None, now: float) -> int:
        """Make deferred recipients due now (all of them, or one message's); return how
        many. Recipients in delivery are left alone; held messages stay held."""
        sql = "UPDATE recipients SET next_attempt = ? WHERE leased = 0"
        if queue_id is None:
            return self._update(sql, (now,))
        with self._write():
            self._require(queue_id)
            return self.conn.execute(sql + " AND message_id = ?", (now, queue_id)).rowcount

    def hold(self, queue_id: str, held: bool) -> bool:
        """Hold (or release) a message; return whether it was already so."""
        with self._write():
            was = self._require(queue_id).held
            # Releasing also forgives past crashes, so the next crash does not re-hold it
            # at once (policy.blame holds a message at MAX_CRASHES).
            extra = "" if held else ", crashes = 0"
            self.conn.execute(f"UPDATE messages SET held = ?{extra} WHERE id = ?",
                              (int(held), queue_id))
        return was == held

    def delete(self, queue_id: str) -> MessageInfo:
        """Delete a message (recipients go with it: ON DELETE CASCADE); return what it was.
        On a full disk the space reserve is given back to make room for the commit
        (forwarder/queue/reserve.py): deleting is how an administrator frees space."""
        try:
            info = self._delete(queue_id)
        except sqlite3.OperationalError as exc:
            if not is_no_space(exc) or not self.reserve.release():
                raise
            info = self._delete(queue_id)
        self.spool.remove([queue_id])  # after the commit: a crash leaves an orphan, swept
        return info

    def _delete(self, queue_id: str) -> MessageInfo:
        with self._write():
            info = self._require(queue_id)
            info.recipients = [_recipient(r) for r in self.conn.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ?",
                (queue_id,))]
            self.conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,))
        return info

    def _require(self, queue_id: str) -> MessageInfo:
        row = self.conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            raise QueueAdminError(f"{queue_id}: no such message in the queue")
        return _message(row)

    def _update(self, sql: str, args: tuple[object, ...]) -> int:
        with self._write():
            return self.conn.execute(sql, args).rowcount

    def _read(self) -> _Txn:
        return _Txn(self.conn, "BEGIN")

    def _write(self) -> _Txn:
        # IMMEDIATE: take the write lock up front, so a concurrent daemon commit makes us
        # wait (busy_timeout) instead of failing half way.
        return _Txn(self.conn, "BEGIN IMMEDIATE")


class _Txn:
    def __init__(self, conn: sqlite3.Connection, begin: str) -> None:
        self.conn = conn
        self.begin = begin

    def __enter__(self) -> None:
        self.conn.execute(self.begin)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.conn.execute("ROLLBACK")
            return
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            if self.conn.in_transaction:  # the commit itself failed (a full disk)
                self.conn.execute("ROLLBACK")
            raise
