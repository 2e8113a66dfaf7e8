"""PostgreSQL connections for the directory, speaking the subset of `sqlite3` that the
directory's SQL code uses (forwarder/directory/rows.py `Db`).

The admin commands and the daemon's writes are the same code on both backends: their SQL
is written in the dialect both engines share (`?` placeholders become psycopg's `%s`
here), and a transaction that SQLite opens with `BEGIN IMMEDIATE` (the write lock, taken
at once) takes PostgreSQL's directory write lock, a transaction-scoped advisory lock
(`pg_advisory_xact_lock`): writers are serialised as on SQLite, so an import's plan made
under the lock is still right when it is written, and the change log's versions are
committed in order (forwarder/directory/pgschema.py).

Every driver error leaves as `DirectoryUnavailable`, an OSError: the daemon's callers
already turn an OSError from the directory into a 451 (never a 5xx), and the command
line into one line and exit status 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg

# pg_advisory_xact_lock keys (any two bigints of our own): directory writes, migrations.
WRITE_LOCK = 0x666F7277_64697231  # "forwdir1"
MIGRATE_LOCK = 0x666F7277_6D696731  # "forwmig1"
CONNECT_TIMEOUT = 5


class DirectoryUnavailable(OSError):
    """PostgreSQL could not be reached or refused the operation; the message says why."""


def is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def connect_kwargs(url: str, password: str) -> dict[str, Any]:
    """psycopg's arguments: the URL (host, port, user, dbname, and a service file's name
    if it names one), the password from the configuration file if it has one (else
    libpq's own: $PGPASSWORD, ~/.pgpass, the service file), never from a command line."""
    kwargs: dict[str, Any] = {"conninfo": url, "connect_timeout": CONNECT_TIMEOUT,
                              "application_name": "forwarder", "autocommit": True,
                              # A server gone without a word (a cut link) is noticed in
                              # about a minute, not after TCP's quarter of an hour.
                              "keepalives": 1, "keepalives_idle": 30,
                              "keepalives_interval": 10, "keepalives_count": 3,
                              "tcp_user_timeout": 60_000}
    if password:
        kwargs["password"] = password
    return kwargs


def _translate(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def _wrapped(exc: psycopg.Error) -> DirectoryUnavailable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DirectoryUnavailable(f"PostgreSQL directory: {detail}")


class PgCursor:
    """A finished statement's rows, read like an sqlite3 cursor's."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PgConnection:
    """One PostgreSQL connection (autocommit: transactions are opened explicitly, as the
    directory code does on SQLite)."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    @classmethod
    def open(cls, url: str, password: str = "") -> PgConnection:
        try:
            return cls(psycopg.connect(**connect_kwargs(url, password)))
        except psycopg.Error as exc:
            raise _wrapped(exc) from exc

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        if sql.strip().upper() == "BEGIN IMMEDIATE":
            self._run("BEGIN", ())
            return self._run("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        # Without parameters psycopg sends the text as it is (a migration's several
        # statements, a literal %).
        return self._run(_translate(sql) if params else sql, params or None)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> PgCursor:
        try:
            with self.raw.cursor() as cur:
                cur.executemany(_translate(sql), list(seq))
                return PgCursor([], cur.rowcount)
        except psycopg.Error as exc:
            raise _wrapped(exc) from exc

    def _run(self, sql: str, params: Sequence[Any] | None) -> PgCursor:
        try:
            with self.raw.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall() if cur.description is not None else []
                return PgCursor(rows, cur.rowcount)
        except psycopg.Error as exc:
            raise _wrapped(exc) from exc

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.raw.close()
