"""The SQLite directory's file: its schema, its migrations, and how it is opened.

The directory is its own file (DESIGN.md: a bulk import never stalls the queue). It runs in
WAL mode so the daemon's reads never wait for an admin's write transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from forwarder import migrations
from forwarder.directory.model import DirectoryError

# Each entry upgrades the schema from version N to N+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE accounts (
        address    TEXT PRIMARY KEY,          -- local part lower-cased, '@', domain
        state      TEXT NOT NULL CHECK (state IN ('active', 'deleted')),
        redirect   TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    -- Append-only audit trail: triggers forbid UPDATE of history except the purge's
    -- erasure of personal data, and forbid DELETE altogether.
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        address TEXT NOT NULL,
        old     TEXT,
        new     TEXT
    );
    CREATE INDEX audit_address ON audit (address);
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    """
    -- The only change allowed to a past entry is a purge's erasure of personal data
    -- (GDPR art. 17): the address and values go, who did what and when stays.
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        WHEN NOT (NEW.id = OLD.id AND NEW.at = OLD.at AND NEW.actor = OLD.actor
                  AND NEW.action = OLD.action AND NEW.address = '(purged)'
                  AND NEW.old IS NULL AND NEW.new IS NULL)
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    """
    -- Per From domain and UTC day: how its mail passed DMARC (forwarder/senders.py), for
    -- `forwarder report senders`. Counts only: no addresses, nothing about a person.
    CREATE TABLE sender_stats (
        domain       TEXT NOT NULL,
        day          INTEGER NOT NULL,           -- days since 1970-01-01, UTC
        dkim_aligned INTEGER NOT NULL DEFAULT 0, -- DMARC passed through aligned DKIM
        spf_only     INTEGER NOT NULL DEFAULT 0, -- passed through SPF alone
        unaligned    INTEGER NOT NULL DEFAULT 0, -- neither
        policy       TEXT NOT NULL DEFAULT '',   -- the domain's DMARC p= as last seen
        PRIMARY KEY (domain, day)
    ) WITHOUT ROWID;
    """,
    """
    -- Several redirect targets per account, each with its state (forwarder/targets.py).
    -- `id` is what a notice's confirm+/refuse+ token names (forwarder/tokens.py);
    -- `confirmed`: its owner confirmed it and has not refused it since; the failure
    -- columns are the dead-target rule's record since the last success; `notice_due`:
    -- a notice is owed from then on (the daemon sends it unless the admin command that
    -- declared the target has, forwarder/notices.py).
    CREATE TABLE targets (
        id            INTEGER PRIMARY KEY,
        address       TEXT NOT NULL REFERENCES accounts (address) ON DELETE CASCADE,
        position      INTEGER NOT NULL,
        target        TEXT NOT NULL,
        state         TEXT NOT NULL
                      CHECK (state IN ('pending', 'confirmed', 'refused', 'off', 'failing')),
        why           TEXT NOT NULL,
        declared_at   REAL NOT NULL,
        changed_at    REAL NOT NULL,
        confirmed     INTEGER NOT NULL DEFAULT 0,
        failures      INTEGER NOT NULL DEFAULT 0,
        first_failure REAL,
        last_failure  REAL,
        last_error    TEXT,
        last_success  REAL,
        notice_due    REAL,
        UNIQUE (address, target)
    );
    -- RCPT reads an account's targets in order from this index alone (no table lookup, no
    -- sort): 10 us a lookup instead of 14 with the UNIQUE index and an ORDER BY.
    CREATE INDEX targets_rcpt ON targets (address, position, target, state);
    CREATE INDEX targets_notice_due ON targets (notice_due) WHERE notice_due IS NOT NULL;
    -- Today's single redirect becomes one confirmed target: it was declared before
    -- confirmation existed. The audit keeps its history and says what became of it.
    INSERT INTO targets (address, position, target, state, why, declared_at, changed_at,
                         confirmed)
        SELECT address, 0, redirect, 'confirmed',
               'declared before confirmation existed (migrated)', updated_at, updated_at, 1
        FROM accounts WHERE redirect IS NOT NULL AND redirect != '';
    INSERT INTO audit (at, actor, action, address, old, new)
        SELECT (julianday('now') - 2440587.5) * 86400.0, 'migration', 'migrate', address,
               json_object('state', state, 'redirect', redirect),
               json_object('state', state, 'targets', json_array(redirect))
        FROM accounts WHERE redirect IS NOT NULL AND redirect != '';
    ALTER TABLE accounts DROP COLUMN redirect;
    """,
)
PURGED = "(purged)"
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the directory; return an autocommit connection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # Admin writes are rare and must survive a crash just as queue writes do.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrations.migrate(conn, MIGRATIONS, "directory", DirectoryError)
    return conn


def count_active(path: Path, busy_timeout: float = 5.0) -> int:
    """Active accounts in the directory, read-only; 0 if there is no directory yet."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=busy_timeout)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
            return 0
        return int(conn.execute(
            "SELECT count(*) FROM accounts WHERE state = 'active'").fetchone()[0])
    finally:
        conn.close()
