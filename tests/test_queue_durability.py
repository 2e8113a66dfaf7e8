"""Which queue commits are fsync'd: a new message always, before its 250; an outcome or a
lease on its own is written to the WAL without an fsync (made durable by the next fsync'd
commit), since losing one with the machine costs a second delivery, never a lost message;
and the WAL is checkpointed off the commit path."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from forwarder.queue.writer import BACKSTOP_PAGES, DbThread, GroupCommitter, checkpoints
from tests.conftest import until


def synchronous(conn: sqlite3.Connection) -> int:
    """SQLite's setting for the transaction under way: 1 NORMAL, 2 FULL (fsync at commit)."""
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def committer(path: Path) -> tuple[DbThread, GroupCommitter]:
    db = DbThread(path, 5.0, "test-writer", polls_locks=True)
    return db, GroupCommitter(db)


async def stop(db: DbThread, group: GroupCommitter) -> None:
    group.close()
    await group.drained()
    await db.close()


async def test_only_durable_operations_are_fsynced(tmp_path: Path) -> None:
    db, group = await committer(tmp_path / "queue.sqlite3")
    try:
        assert await group.submit(synchronous, durable=False) == 1
        assert await group.submit(synchronous) == 2
        assert await group.submit(synchronous, durable=False) == 1
    finally:
        await stop(db, group)


async def test_a_batch_with_one_durable_operation_is_fsynced_whole(tmp_path: Path) -> None:
    db, group = await committer(tmp_path / "queue.sqlite3")
    release = threading.Event()
    try:
        # The first operation starts a transaction at once; those submitted while it is
        # under way make one batch, one transaction, one fsync.
        first = group.submit(lambda conn: release.wait(10), durable=False)
        futures = [group.submit(synchronous, durable=False), group.submit(synchronous),
                   group.submit(synchronous, durable=False)]
        assert group.committing == 1
        release.set()
        assert await first
        assert await asyncio.gather(*futures) == [2, 2, 2]
        assert group.commits == 2
    finally:
        release.set()
        await stop(db, group)


async def test_the_wal_is_checkpointed_by_its_own_thread(tmp_path: Path) -> None:
    """The commit that crosses SQLite's checkpoint threshold no longer copies the WAL into
    the database before its futures resolve: the checkpoint thread does, shortly after."""
    path = tmp_path / "queue.sqlite3"
    db, group = await committer(path)
    checkpoint_db = DbThread(path, 5.0, "test-checkpoint")
    checkpointer = asyncio.create_task(checkpoints(checkpoint_db, group))

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE bodies (body BLOB)")
        conn.execute("INSERT INTO bodies VALUES (?)", (b"x" * 2_000_000,))

    try:
        await group.submit(insert)
        # 2 MB is some 500 pages: under even SQLite's own 1000-page threshold, so only
        # the checkpoint thread can have copied them into the database file.
        assert path.stat().st_size < 1_000_000
        await until(lambda: path.stat().st_size > 2_000_000)
        assert await db.run(lambda conn: conn.execute(
            "PRAGMA wal_autocheckpoint").fetchone()[0]) == BACKSTOP_PAGES
    finally:
        checkpointer.cancel()
        await asyncio.gather(checkpointer, return_exceptions=True)
        await stop(db, group)
        await checkpoint_db.close()
