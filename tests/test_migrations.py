"""The one migration helper of both databases (forwarder/migrations.py), on real files."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from forwarder import directory, migrations
from forwarder.directory import Directory, DirectoryError
from forwarder.migrations import migrate, schema_version, split_statements
from forwarder.queue import QUEUE_SCHEMA_VERSION, QueueError, open_queue_db
from forwarder.queue.schema import SCHEMA

STEPS = (
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);",
    # A trigger's body has statements of its own, each ending with ';'.
    """
    -- Keep a log of deleted notes; refuse to delete the pinned one.
    CREATE TABLE deleted (id INTEGER, text TEXT);
    CREATE TRIGGER notes_deleted BEFORE DELETE ON notes
    BEGIN
        SELECT RAISE(ABORT, 'pinned; keep it') WHERE OLD.text = 'pinned';
        INSERT INTO deleted VALUES (OLD.id, OLD.text);
    END;
    """,
)


class Refused(Exception):
    pass


def connect(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def test_split_keeps_trigger_bodies_whole() -> None:
    statements = split_statements(STEPS[1])
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    assert split_statements("  \n-- nothing\n") == ["-- nothing"]


def test_a_trigger_with_semicolons_migrates_and_works(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db")
    migrate(conn, STEPS, "test", Refused)
    assert schema_version(conn) == 2
    conn.execute("INSERT INTO notes (text) VALUES ('pinned'), ('old')")
    conn.execute("DELETE FROM notes WHERE text = 'old'")
    assert conn.execute("SELECT text FROM deleted").fetchall() == [("old",)]
    with pytest.raises(sqlite3.IntegrityError, match="pinned; keep it"):
        conn.execute("DELETE FROM notes")


def test_a_failing_step_leaves_the_previous_version(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db")
    broken = (STEPS[0], "CREATE TABLE half (x); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        migrate(conn, broken, "test", Refused)
    assert schema_version(conn) == 1
    assert not conn.in_transaction
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert "notes" in tables and "half" not in tables


def test_a_newer_file_is_refused_untouched(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db")
    migrate(conn, STEPS, "test", Refused)
    with pytest.raises(Refused, match="test schema version 2 is newer than this program"):
        migrate(conn, STEPS[:1], "test", Refused)
    assert schema_version(conn) == 2


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    holder = connect(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_two_connections_racing_to_migrate(tmp_path: Path) -> None:
    """Both read version 0, then queue for the write lock; the loser must find the work
    done (the version re-read under the lock), not apply the steps a second time, which
    would fail on `CREATE TABLE accounts` ("already exists")."""
    path = tmp_path / "directory.sqlite3"
    connect(path).close()  # WAL from the start: readers never wait for the writer
    waiting = threading.Semaphore(0)
    errors: list[BaseException] = []

    def asking_for_the_lock(sql: str) -> None:
        if sql == "BEGIN IMMEDIATE":
            waiting.release()

    def racer() -> None:
        conn = connect(path)
        # Tell the test when this racer, having read the version, asks for the lock.
        conn.set_trace_callback(asking_for_the_lock)
        try:
            migrate(conn, directory.MIGRATIONS, "directory", DirectoryError)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    with write_lock_held(path):
        racers = [threading.Thread(target=racer) for _ in range(2)]
        for thread in racers:
            thread.start()
        for _ in racers:  # both have read version 0 and wait for the lock
            assert waiting.acquire(timeout=10)
    for thread in racers:
        thread.join(timeout=30)
    assert errors == []
    assert Directory(path, actor="test").conn.execute(
        "PRAGMA user_version").fetchone()[0] == directory.SCHEMA_VERSION


def test_both_databases_use_it(tmp_path: Path) -> None:
    """The directory and the queue migrate through the helper, with their own errors."""
    queue = open_queue_db(tmp_path / "queue.sqlite3")
    queue.execute(f"PRAGMA user_version = {QUEUE_SCHEMA_VERSION + 1}")
    queue.close()
    with pytest.raises(QueueError, match="queue schema version"):
        open_queue_db(tmp_path / "queue.sqlite3")
    problems = migrations.inspect_database(tmp_path / "queue.sqlite3", QUEUE_SCHEMA_VERSION)
    assert ["newer" in p for p in problems] == [True]
    Directory(tmp_path / "directory.sqlite3", actor="test").conn.execute(
        "PRAGMA user_version = 99")
    with pytest.raises(DirectoryError, match="directory schema version 99"):
        Directory(tmp_path / "directory.sqlite3", actor="test")


def test_queue_v3_to_v4_drops_the_state_column_keeping_rows(tmp_path: Path) -> None:
    """A queue written by the previous version (schema 3, with the never-used `failed`
    state) keeps its messages and recipients."""
    path = tmp_path / "queue.sqlite3"
    conn = connect(path)
    migrate(conn, SCHEMA[:3], "queue", QueueError)
    conn.execute("INSERT INTO messages (id, sender, arrived_at, size, body)"
                 " VALUES ('M1', 'a@b.example', 1.0, 3, x'616263')")
    conn.execute("INSERT INTO recipients (message_id, orig_rcpt, rcpt, route, attempts,"
                 " next_attempt) VALUES ('M1', 'g@ours', 'g@perso.example', 'redirect', 2, 9)")
    conn.close()
    conn = open_queue_db(path)
    assert schema_version(conn) == QUEUE_SCHEMA_VERSION
    columns = [row[1] for row in conn.execute("PRAGMA table_info(recipients)")]
    assert "state" not in columns
    assert conn.execute("SELECT message_id, rcpt, attempts, next_attempt FROM recipients"
                        ).fetchall() == [("M1", "g@perso.example", 2, 9.0)]
    plan = " ".join(row[3] for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM recipients WHERE next_attempt <= 10"))
    assert "recipients_due" in plan
