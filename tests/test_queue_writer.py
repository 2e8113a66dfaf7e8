"""The queue's writer thread and group commit (forwarder/queue/writer.py): errors reach the
caller and leave the thread serving, a bad operation fails alone, and closing waits for
what was submitted, then ends the thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from forwarder.queue.model import QueueError
from forwarder.queue.writer import DbThread, GroupCommitter, Op
from tests.conftest import until


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM notes").fetchone()[0])


def note(text: str) -> Op:
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (text TEXT NOT NULL)")
        conn.execute("INSERT INTO notes VALUES (?)", (text,))
        return text
    return op


def bad(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO no_such_table VALUES (1)")


async def test_an_error_reaches_the_caller_and_the_thread_goes_on(tmp_path: Path) -> None:
    db = DbThread(tmp_path / "queue.sqlite3", 5.0, "test-db")
    try:
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await db.run(bad)
        assert await db.run(lambda conn, x: x + 1, 41) == 42
    finally:
        await db.close()


async def test_close_waits_for_posted_work_then_ends_the_thread(tmp_path: Path) -> None:
    db = DbThread(tmp_path / "queue.sqlite3", 5.0, "test-db")
    release = threading.Event()
    slow = asyncio.ensure_future(db.run(lambda conn: release.wait(10)))
    await until(lambda: db.alive)
    closing = asyncio.ensure_future(db.close())
    await asyncio.sleep(0)
    with pytest.raises(QueueError):  # closed to new work at once
        await db.run(lambda conn: None)
    release.set()
    assert await slow
    await closing
    await until(lambda: not db.alive)
    await db.close()  # again: nothing to do


async def test_closing_a_thread_never_started(tmp_path: Path) -> None:
    db = DbThread(tmp_path / "queue.sqlite3", 5.0, "test-db")
    await db.close()
    assert not db.alive
    with pytest.raises(QueueError):
        await db.run(lambda conn: None)


async def test_a_bad_operation_fails_alone(tmp_path: Path) -> None:
    db = DbThread(tmp_path / "queue.sqlite3", 5.0, "test-writer", polls_locks=True)
    group = GroupCommitter(db)
    release = threading.Event()
    try:
        first = group.submit(lambda conn: release.wait(10))
        # Submitted while the first commits: one batch, which fails, then each alone.
        batch = [group.submit(note("a")), group.submit(bad), group.submit(note("b"))]
        release.set()
        await first
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert results[0] == "a" and results[2] == "b"
        assert isinstance(results[1], QueueError)
        assert "OperationalError" in str(results[1])
        assert await db.run(count) == 2
    finally:
        release.set()
        group.close()
        await group.drained()
        await db.close()


async def test_a_closed_committer_refuses_new_work_and_drains_the_rest(
        tmp_path: Path) -> None:
    db = DbThread(tmp_path / "queue.sqlite3", 5.0, "test-writer", polls_locks=True)
    group = GroupCommitter(db)
    release = threading.Event()
    first = group.submit(lambda conn: release.wait(10))
    queued = group.submit(note("queued"))
    group.close()
    with pytest.raises(QueueError, match="shutting down"):
        group.submit(note("late"))
    drained = asyncio.ensure_future(group.drained())
    assert group.committing == 1 and group.pending  # the first blocks the thread
    release.set()
    await drained
    assert first.done() and await queued == "queued"
    assert await db.run(count) == 1
    await db.close()
