"""Schema migrations of the daemon's SQLite databases (the directory and the queue).

Each database is a tuple of steps: step N is a script that upgrades the schema from version
N to N+1 (`PRAGMA user_version`). `migrate` applies the missing steps, one transaction per
step, so a crash leaves the file at one version or the next. Several processes may open the
same file at once (the daemon, its acceptor processes, an admin command): the version is
read again under the write lock, and a step another process has just applied is not applied
twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def split_statements(script: str) -> list[str]:
    """The statements of a migration script. A statement ends at a `;` only where
    `sqlite3.complete_statement` agrees: not inside a string, a comment or a trigger's
    body (whose own statements end with `;` too)."""
    statements: list[str] = []
    start = 0
    for end, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start:end + 1]):
            statements.append(script[start:end + 1].strip())
            start = end + 1
    if script[start:].strip():
        statements.append(script[start:].strip())
    return statements


def migrate(conn: sqlite3.Connection, steps: Sequence[str], what: str,
            error: Callable[[str], Exception]) -> None:
    """Bring the database on `conn` (autocommit: isolation_level None) to version
    len(steps). A file newer than this program raises `error(message)`: it was written by
    a later version, whose data this one could misread."""
    newest = len(steps)
    version = schema_version(conn)
    while True:
        if version > newest:
            raise error(f"{what} schema version {version} is newer than this program "
                        f"({newest})")
        if version == newest:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = schema_version(conn)
            if version < newest:
                for statement in split_statements(steps[version]):
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def inspect_database(path: Path, newest: int, busy_timeout: float = 5.0) -> list[str]:
    """Problems with an SQLite file, opened read-only (for `forwarder check`: it must not
    create or migrate anything). A missing file is no problem: it is created at start."""
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True,
                               timeout=busy_timeout)
        try:
            problems = []
            version = schema_version(conn)
            if version > newest:
                problems.append(f"{path}: schema version {version} is newer than this "
                                f"program ({newest})")
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                problems.append(f"{path}: damaged ({result})")
            return problems
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [f"{path}: cannot read: {exc}"]
