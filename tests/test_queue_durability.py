"""Which queue commits are fsync'd: a new message always, before its 250; an outcome or a
lease on its own is written to the WAL without an fsync (made durable by the next fsync'd
commit), since losing one with the machine costs a second delivery, never a lost message."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from forwarder.queue.writer import DbThread, GroupCommitter


def synchronous(conn: sqlite3.Connection) -> int:
    """SQLite's setting for the transaction under way: 1 NORMAL, 2 FULL (fsync at commit)."""
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def committer(path: Path) -> tuple[DbThread, GroupCommitter, asyncio.Task[None]]:
    db = DbThread(path, 5.0, "test-writer", polls_locks=True)
    group = GroupCommitter(db)
    return db, group, asyncio.create_task(group.run())


async def test_only_durable_operations_are_fsynced(tmp_path: Path) -> None:
    db, group, task = await committer(tmp_path / "queue.sqlite3")
    try:
        assert await group.submit(synchronous, durable=False) == 1
        assert await group.submit(synchronous) == 2
        assert await group.submit(synchronous, durable=False) == 1
    finally:
        group.close()
        await task
        await db.close()


async def test_a_batch_with_one_durable_operation_is_fsynced_whole(tmp_path: Path) -> None:
    db, group, task = await committer(tmp_path / "queue.sqlite3")
    try:
        # Submitted in one turn of the loop: one batch, one transaction, one fsync.
        futures = [group.submit(synchronous, durable=False), group.submit(synchronous),
                   group.submit(synchronous, durable=False)]
        assert await asyncio.gather(*futures) == [2, 2, 2]
    finally:
        group.close()
        await task
        await db.close()
