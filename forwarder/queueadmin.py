"""Admin access to the queue (`forwarder queue ...`), like postqueue/postsuper.

These run against the same SQLite file as the daemon, in short transactions; the daemon's
scanner sees a `retry` or `release` on its next pass (at most `poll_interval` later), and
a `hold` keeps it from leasing the message again.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from forwarder.queue import open_queue_db


class QueueAdminError(Exception):
    pass


@dataclass
class RecipientInfo:
    rcpt: str
    orig_rcpt: str
    route: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None


@dataclass
class MessageInfo:
    id: str
    arrived_at: float
    size: int
    sender: str
    held: bool
    recipients: list[RecipientInfo]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class QueueAdmin:
    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.conn = open_queue_db(path, busy_timeout)

    def close(self) -> None:
        self.conn.close()

    def list(self) -> list[MessageInfo]:
        messages: dict[str, MessageInfo] = {}
        for mid, arrived, size, sender, held in self.conn.execute(
            "SELECT id, arrived_at, size, sender, held FROM messages ORDER BY arrived_at"
        ):
            messages[mid] = MessageInfo(mid, arrived, size, sender, bool(held), [])
        for row in self.conn.execute(
            "SELECT message_id, rcpt, orig_rcpt, route, state, attempts, next_attempt,"
            " last_error FROM recipients ORDER BY id"
        ):
            if row[0] in messages:
                messages[row[0]].recipients.append(RecipientInfo(*row[1:]))
        return list(messages.values())

    def show(self, queue_id: str) -> dict[str, Any]:
        info = next((m for m in self.list() if m.id == queue_id), None)
        if info is None:
            raise QueueAdminError(f"{queue_id}: no such message in the queue")
        row = self.conn.execute(
            "SELECT client, crashes, body FROM messages WHERE id = ?", (queue_id,)).fetchone()
        headers = BytesHeaderParser(policy=compat32).parsebytes(bytes(row[2]))
        doc = info.as_dict()
        doc.update(client=row[0], crashes=row[1],
                   headers=[[k, str(v)] for k, v in headers.items()])
        return doc

    def _update(self, sql: str, args: tuple[Any, ...], queue_id: str | None) -> int:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            count = self.conn.execute(sql, args).rowcount
        if queue_id is not None and count == 0:
            raise QueueAdminError(f"{queue_id}: no such message in the queue")
        return count

    def retry(self, queue_id: str | None, now: float) -> int:
        """Make deferred recipients due now (all of them, or one message's)."""
        sql = "UPDATE recipients SET next_attempt = ? WHERE state = 'queued' AND leased = 0"
        if queue_id is None:
            return self._update(sql, (now,), None)
        self._require(queue_id)
        return self._update(sql + " AND message_id = ?", (now, queue_id), None)

    def hold(self, queue_id: str, held: bool) -> None:
        self._update("UPDATE messages SET held = ? WHERE id = ?", (int(held), queue_id),
                     queue_id)

    def delete(self, queue_id: str) -> None:
        self._update("DELETE FROM messages WHERE id = ?", (queue_id,), queue_id)

    def _require(self, queue_id: str) -> None:
        if self.conn.execute("SELECT 1 FROM messages WHERE id = ?", (queue_id,)).fetchone() \
                is None:
            raise QueueAdminError(f"{queue_id}: no such message in the queue")


def is_locked_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
