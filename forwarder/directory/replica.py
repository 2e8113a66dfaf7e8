"""A node's local copy of the PostgreSQL directory (several nodes: docs/cluster.md).

RCPT never waits on the network: each node answers from an SQLite file of its own with the
directory's schema (forwarder/directory/schema.py), the "replica", read exactly as the
embedded directory is. The copy is kept current from PostgreSQL's change log
(forwarder/directory/pgschema.py): `fetch` reads, in one REPEATABLE READ snapshot, what
changed since the copy's version (the current rows of the accounts, targets and secrets
named by the log), and `ReplicaFile.apply` writes it in one SQLite transaction together
with the new version. A copy from another directory (its id differs), one older than the
pruned part of the log, one ahead of it (a directory restored from a backup) or one more
than REPLAY_MAX versions behind is replaced by a full copy, read in the same snapshot.
A full copy is streamed: a server-side cursor hands COPY_CHUNK rows at a time to the
copy's open transaction (`ReplicaFile.begin_full`, `insert`, `finish_full`), so that a node
holds a chunk in memory, not the directory (a million graduates would be gigabytes of
rows), and readers see the old copy, whole, until the new one commits.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from forwarder.directory.rows import Transaction
from forwarder.directory.schema import connect

REPLICA_FILE = "directory-replica.sqlite3"
TARGET_FIELDS = ("id, address, position, target, state, why, declared_at, changed_at,"
                 " confirmed, failures, first_failure, last_failure, last_error,"
                 " last_success, notice_due")
_REPLICA_TABLES = (
    "CREATE TABLE IF NOT EXISTS replica_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replica_secrets (kind TEXT NOT NULL, position INTEGER"
    " NOT NULL, secret TEXT NOT NULL, PRIMARY KEY (kind, position))",
    # The SRS long-sender keys, so that a bounce to one is reversed without the network.
    "CREATE TABLE IF NOT EXISTS replica_srs_keys (key TEXT PRIMARY KEY, sender TEXT NOT NULL)"
    " WITHOUT ROWID",
)


# Rows a full copy moves at a time from PostgreSQL into the copy's transaction: what it
# holds in memory, whatever the directory's size.
COPY_CHUNK = 2_000
# A copy further behind than this many versions is made again in full (streamed) rather
# than replayed: a replay reads every changed row in one piece.
REPLAY_MAX = 20_000
# What a full copy streams, in this order (a target's account before the target).
FULL_COPY = {
    "accounts": "SELECT address, state, created_at, updated_at FROM accounts",
    "targets": f"SELECT {TARGET_FIELDS} FROM targets",
    "srs_keys": "SELECT key, sender FROM srs_keys",
}
_INSERT = {
    "accounts": "INSERT INTO accounts (address, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET"
                " state = excluded.state, created_at = excluded.created_at,"
                " updated_at = excluded.updated_at",
    "targets": f"INSERT INTO targets ({TARGET_FIELDS}) VALUES ({', '.join('?' * 15)})",
    "srs_keys": "INSERT INTO replica_srs_keys VALUES (?, ?)",
}


def replica_path(state_dir: Path) -> Path:
    return state_dir / REPLICA_FILE


@dataclass(frozen=True)
class ReplicaState:
    directory_id: str
    version: int
    synced_at: float | None  # the clock's time of the last successful sync; None: never


@dataclass
class Batch:
    """What changed since a version, as read in one snapshot of PostgreSQL. A full copy's
    rows are not in it: they are streamed (`chunks`) within the same snapshot."""

    directory_id: str
    version: int
    full: bool = False
    accounts: list[tuple[Any, ...]] = field(default_factory=list)
    gone_accounts: list[str] = field(default_factory=list)
    targets: list[tuple[Any, ...]] = field(default_factory=list)
    changed_targets: list[int] = field(default_factory=list)
    secrets: dict[str, list[str]] | None = None  # kind -> secrets in order, if changed
    srs_keys: list[tuple[Any, ...]] = field(default_factory=list)  # (key, sender)
    changed_srs_keys: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.full or self.accounts or self.gone_accounts or self.changed_targets
                    or self.secrets is not None or self.changed_srs_keys)


@contextlib.asynccontextmanager
async def snapshot(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """One consistent view of the directory for what is read within (the connection
    autocommits otherwise)."""
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield
    finally:
        await conn.execute("ROLLBACK")


async def chunks(conn: psycopg.AsyncConnection[Any],
                 table: str) -> AsyncGenerator[list[tuple[Any, ...]], None]:
    """Every row of one of FULL_COPY's tables, COPY_CHUNK at a time, through a cursor on
    the server (within a `snapshot`: the cursor lives in its transaction)."""
    async with conn.cursor(name=f"full_copy_{table}") as cur:
        await cur.execute(FULL_COPY[table])
        while rows := await cur.fetchmany(COPY_CHUNK):
            yield rows


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str,
                params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql, params or None)
    return await cur.fetchall()


async def fetch(conn: psycopg.AsyncConnection[Any], have: ReplicaState) -> Batch:
    """What the copy at `have` lacks (within a `snapshot`)."""
    meta = dict(await _rows(conn, "SELECT name, value FROM meta"))
    directory_id, pruned = meta["directory_id"], int(meta["pruned_through"])
    # The newest version committed; a log pruned empty still has its versions behind it.
    top = max(pruned, int((await _rows(conn, "SELECT coalesce(max(version), 0)"
                                             " FROM changes"))[0][0]))
    batch = Batch(directory_id, top)
    if (directory_id != have.directory_id or have.version < pruned or have.version > top
            or top - have.version > REPLAY_MAX):
        batch.full = True
        batch.secrets = await _secrets(conn)
        return batch
    if top == have.version:
        return batch
    keys = await _rows(conn, "SELECT DISTINCT tbl, key FROM changes WHERE version > %s",
                       (have.version,))
    addresses = [key for tbl, key in keys if tbl == "accounts"]
    batch.changed_targets = [int(key) for tbl, key in keys if tbl == "targets"]
    if addresses:
        batch.accounts = await _rows(
            conn, "SELECT address, state, created_at, updated_at FROM accounts"
                  " WHERE address = ANY(%s)", (addresses,))
        found = {row[0] for row in batch.accounts}
        batch.gone_accounts = [a for a in addresses if a not in found]
    if batch.changed_targets:
        batch.targets = await _rows(conn, f"SELECT {TARGET_FIELDS} FROM targets"
                                          " WHERE id = ANY(%s)", (batch.changed_targets,))
    if any(tbl == "secrets" for tbl, _ in keys):
        batch.secrets = await _secrets(conn)
    batch.changed_srs_keys = [key for tbl, key in keys if tbl == "srs_keys"]
    if batch.changed_srs_keys:
        batch.srs_keys = await _rows(conn, "SELECT key, sender FROM srs_keys"
                                           " WHERE key = ANY(%s)", (batch.changed_srs_keys,))
    return batch


async def prune_log(conn: psycopg.AsyncConnection[Any], keep: float) -> int:
    """Remove the change log's entries older than `keep` seconds, and move
    `pruned_through` past them: a copy older than that is then made again in full. Every
    node may do it, at any time: the deletion and the monotonic move are one statement."""
    cur = await conn.execute(
        "WITH gone AS (DELETE FROM changes WHERE at < now() - make_interval(secs => %s)"
        " RETURNING version) UPDATE meta SET value = greatest(value::bigint,"
        " (SELECT coalesce(max(version), 0) FROM gone))::text WHERE name = 'pruned_through'"
        " RETURNING (SELECT count(*) FROM gone)", (keep,))
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def _secrets(conn: psycopg.AsyncConnection[Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"srs": [], "token": []}
    for kind, secret in await _rows(conn, "SELECT kind, secret FROM secrets"
                                          " ORDER BY kind, position"):
        found.setdefault(kind, []).append(secret)
    return found


class ReplicaFile:
    """The copy, synchronously (used from one thread: the replicator's)."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.conn = connect(path, busy_timeout)
        for statement in _REPLICA_TABLES:
            self.conn.execute(statement)

    def close(self) -> None:
        self.conn.close()

    def state(self) -> ReplicaState:
        return read_state(self.conn)

    def mark_synced(self, synced_at: float) -> None:
        self.conn.execute("INSERT OR REPLACE INTO replica_meta VALUES ('synced_at', ?)",
                          (repr(synced_at),))

    def apply(self, batch: Batch, synced_at: float) -> None:
        """Write a replayed batch and its version in one transaction."""
        with Transaction(self.conn):
            self.conn.executemany(_INSERT["accounts"], batch.accounts)
            # Every changed target out first, then the current ones in: a target that
            # moved to another id never meets its old row in the (address, target) index.
            self.conn.executemany("DELETE FROM targets WHERE id = ?",
                                  [(i,) for i in batch.changed_targets])
            self.conn.executemany(_INSERT["targets"], batch.targets)
            self.conn.executemany("DELETE FROM accounts WHERE address = ?",
                                  [(a,) for a in batch.gone_accounts])
            self.conn.executemany("DELETE FROM replica_srs_keys WHERE key = ?",
                                  [(k,) for k in batch.changed_srs_keys])
            self.conn.executemany(_INSERT["srs_keys"], batch.srs_keys)
            self._write_version(batch, synced_at)

    def begin_full(self) -> None:
        """A full copy starts: one transaction, in which the old rows go and the new ones
        come a chunk at a time (`insert`). Readers see the old copy until `finish_full`;
        SQLite spills what does not fit its page cache to the WAL, not to memory."""
        self.conn.execute("BEGIN IMMEDIATE")
        for table in ("targets", "accounts", "replica_srs_keys"):
            self.conn.execute(f"DELETE FROM {table}")

    def insert(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(_INSERT[table], rows)

    def finish_full(self, batch: Batch, synced_at: float) -> None:
        self._write_version(batch, synced_at)
        self.conn.execute("COMMIT")

    def abort(self) -> None:
        """A full copy cut short (PostgreSQL went away): the old copy stays, whole."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _write_version(self, batch: Batch, synced_at: float) -> None:
        if batch.secrets is not None:
            self._write_secrets(batch.secrets)
            self.conn.execute("INSERT OR REPLACE INTO replica_meta"
                              " VALUES ('secrets_version', ?)", (str(batch.version),))
        self.conn.executemany(
            "INSERT OR REPLACE INTO replica_meta VALUES (?, ?)",
            [("directory_id", batch.directory_id), ("version", str(batch.version)),
             ("synced_at", repr(synced_at))])

    def _write_secrets(self, secrets: dict[str, list[str]]) -> None:
        self.conn.execute("DELETE FROM replica_secrets")
        self.conn.executemany(
            "INSERT INTO replica_secrets VALUES (?, ?, ?)",
            [(kind, i, secret) for kind, found in secrets.items()
             for i, secret in enumerate(found)])


def read_state(conn: sqlite3.Connection) -> ReplicaState:
    try:
        meta = dict(conn.execute("SELECT name, value FROM replica_meta").fetchall())
    except sqlite3.OperationalError:  # no such table: never synchronised
        meta = {}
    synced = meta.get("synced_at")
    return ReplicaState(meta.get("directory_id", ""), int(meta.get("version", "0")),
                        None if synced is None else float(synced))


def read_secrets(path: Path, kind: str, busy_timeout: float = 5.0) -> list[bytes]:
    """The copy's secrets of one kind, the signing one first (read-only)."""
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True,
                           timeout=busy_timeout)
    try:
        rows = conn.execute("SELECT secret FROM replica_secrets WHERE kind = ?"
                            " ORDER BY position", (kind,)).fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        conn.close()
    if not rows:
        raise ValueError(f"{path}: no {kind} secret copied from the PostgreSQL directory yet")
    return [row[0].encode("ascii") for row in rows]


def read_synced_at(path: Path, busy_timeout: float = 5.0) -> float | None:
    """When the copy was last synchronised (for `forwarder check` and acceptors)."""
    if not path.exists():
        return None
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True,
                           timeout=busy_timeout)
    try:
        return read_state(conn).synced_at
    finally:
        conn.close()


def read_srs_key(path: Path, key: str) -> str | None:
    """The long sender stored under `key` in the copy, or None (read-only)."""
    if not path.exists():
        return None
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute("SELECT sender FROM replica_srs_keys WHERE key = ?",
                           (key.upper(),)).fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        conn.close()
    return None if row is None else str(row[0])
