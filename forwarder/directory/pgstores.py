"""What several nodes share in PostgreSQL besides accounts and targets: the SRS and token
secrets (`PgSecrets`), and the SRS long-sender keys (`PgKeyStore`, srsstore.KeyStore), so
that any node reverses any node's SRS address and checks any node's tokens.

The daemon reads the secrets from its copy (`ReplicaSecrets`: copied with the directory,
forwarder/directory/replica.py), never from the network; the keys of long senders are
copied too, and asked of PostgreSQL only when a bounce names one not copied yet (made on
another node in the last few milliseconds).
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from forwarder.directory.pgconn import PgConnection
from forwarder.directory.pgschema import open_directory_db
from forwarder.directory.replica import read_secrets, read_srs_key
from forwarder.srs import new_key
from forwarder.srsstore import ThreadKeyStore

T = TypeVar("T")


def _new_secret() -> str:
    return _secrets.token_urlsafe(32)


class PgSecrets:
    """The secrets of one kind ('srs' or 'token') in PostgreSQL, position 0 signing."""

    def __init__(self, conn: PgConnection, kind: str) -> None:
        self.conn = conn
        self.kind = kind

    def ensure(self) -> bool:
        """One random secret if there are none; True if it was created."""
        self.conn.execute("BEGIN IMMEDIATE")  # the write lock: two nodes starting at once
        try:
            if self.conn.execute("SELECT 1 FROM secrets WHERE kind = ?",
                                 (self.kind,)).fetchone():
                self.conn.execute("COMMIT")
                return False
            self.conn.execute("INSERT INTO secrets VALUES (?, 0, ?)",
                              (self.kind, _new_secret()))
            self.conn.execute("COMMIT")
            return True
        except BaseException:
            if not self.conn.broken:
                self.conn.execute("ROLLBACK")
            raise

    def short_hashes_until(self, fresh: bool, today: int, record: bool = True) -> int | None:
        """Never: secrets in PostgreSQL were made by a release that signs long hashes."""
        return None

    def load(self) -> list[bytes]:
        rows = self.conn.execute("SELECT secret FROM secrets WHERE kind = ?"
                                 " ORDER BY position", (self.kind,)).fetchall()
        if not rows:
            raise ValueError(f"no {self.kind} secret in the PostgreSQL directory")
        return [row[0].encode("ascii") for row in rows]

    def rotate(self) -> int:
        """A new signing secret first, the others kept; return how many there are."""
        if self.ensure():
            return 1
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            old = self.load()
            self.conn.execute("DELETE FROM secrets WHERE kind = ?", (self.kind,))
            self.conn.executemany(
                "INSERT INTO secrets VALUES (?, ?, ?)",
                [(self.kind, i, s.decode("ascii"))
                 for i, s in enumerate([_new_secret().encode("ascii"), *old])])
            self.conn.execute("COMMIT")
        except BaseException:
            if not self.conn.broken:
                self.conn.execute("ROLLBACK")
            raise
        return len(old) + 1


@dataclass(frozen=True)
class ReplicaSecrets:
    """srsstore.SecretsSource on the node's copy: created in PostgreSQL when the node
    starts (forwarder/directory/cluster.py), copied like the rest of the directory."""

    path: Path
    kind: str

    def ensure(self) -> bool:
        return False

    def load(self) -> list[bytes]:
        return read_secrets(self.path, self.kind)

    def short_hashes_until(self, fresh: bool, today: int, record: bool = True) -> int | None:
        """Never: secrets in PostgreSQL were made by a release that signs long hashes."""
        return None


class PgKeys:
    """The long-sender keys on one PostgreSQL connection (synchronous)."""

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn

    def put(self, sender: str, now: float) -> str:
        row = self.conn.execute(
            "INSERT INTO srs_keys (key, sender, stored_at) VALUES (?, ?, ?)"
            " ON CONFLICT (sender) DO UPDATE SET stored_at = excluded.stored_at"
            " RETURNING key", (new_key(), sender, now)).fetchone()
        return str(row[0])

    def get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT sender FROM srs_keys WHERE key = ?",
                                (key.upper(),)).fetchone()
        return None if row is None else str(row[0])

    def purge(self, before: float) -> int:
        return self.conn.execute("DELETE FROM srs_keys WHERE stored_at < ?",
                                 (before,)).rowcount

    def close(self) -> None:
        self.conn.close()


class PgKeyStore(ThreadKeyStore[PgKeys]):
    """srsstore.KeyStore on PostgreSQL, from a thread of its own (`ThreadKeyStore`); a
    broken connection is opened again on the next call. Errors are OSErrors
    (pgconn.DirectoryUnavailable): the caller defers, never a 5xx."""

    def __init__(self, url: str, password: str, replica: Path | None = None) -> None:
        super().__init__()
        self.url = url
        self.password = password
        # The node's copy: a key already copied there is read without the network.
        self.replica = replica

    def _open(self) -> PgKeys:
        return PgKeys(open_directory_db(self.url, self.password))

    def _call(self, fn: Callable[[PgKeys], T]) -> T:
        try:
            return super()._call(fn)
        except Exception:
            if self._keys is not None and self._keys.conn.broken:
                self._forget()
            raise

    async def get(self, key: str) -> str | None:
        if self.replica is not None:
            found = await self._in_thread(read_srs_key, self.replica, key)
            if found is not None:
                return found
        # Made moments ago on another node and not copied yet (or no copy): ask PostgreSQL.
        return await super().get(key)
