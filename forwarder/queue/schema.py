"""The queue's file: its schema, its migrations, and how a connection to it is opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from forwarder import migrations
from forwarder.queue.model import QueueError

# Step N upgrades the schema from version N to N+1 (forwarder/migrations.py).
SCHEMA = (
    """
    CREATE TABLE messages (
        id         TEXT PRIMARY KEY,
        sender     TEXT NOT NULL,           -- '' is the null sender
        arrived_at REAL NOT NULL,
        size       INTEGER NOT NULL,
        client     TEXT NOT NULL DEFAULT '',
        held       INTEGER NOT NULL DEFAULT 0,
        crashes    INTEGER NOT NULL DEFAULT 0,
        body       BLOB NOT NULL
    );
    CREATE TABLE recipients (
        id           INTEGER PRIMARY KEY,
        message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        orig_rcpt    TEXT NOT NULL,
        rcpt         TEXT NOT NULL,
        route        TEXT NOT NULL,
        state        TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'failed')),
        leased       INTEGER NOT NULL DEFAULT 0,
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_attempt REAL,
        last_error   TEXT,
        dsn_status   TEXT,
        remote_mta   TEXT
    );
    CREATE INDEX recipients_due ON recipients (next_attempt) WHERE state = 'queued';
    CREATE INDEX recipients_message ON recipients (message_id);
    """,
    # v2: a delay warning (RFC 3464 Action: delayed) is sent at most once per recipient.
    """
    ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0;
    """,
    # v3: suspects (crashed once, not held) are found without walking the due index.
    """
    CREATE INDEX messages_suspect ON messages (id) WHERE crashes > 0 AND held = 0;
    """,
    # v4: a recipient row is always waiting: it leaves the queue when delivered or bounced,
    # so the `state` column (whose 'failed' was never written) goes.
    """
    DROP INDEX recipients_due;
    ALTER TABLE recipients DROP COLUMN state;
    CREATE INDEX recipients_due ON recipients (next_attempt);
    """,
    # v5: the DSN extension's parameters (RFC 3461: RET and ENVID per message, NOTIFY and
    # ORCPT per recipient), SMTPUTF8 (RFC 6531) and whether the body has 8-bit octets.
    """
    ALTER TABLE messages ADD COLUMN ret TEXT;
    ALTER TABLE messages ADD COLUMN envid TEXT;
    ALTER TABLE messages ADD COLUMN smtputf8 INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN eight_bit INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE recipients ADD COLUMN notify TEXT;
    ALTER TABLE recipients ADD COLUMN orcpt TEXT;
    """,
    # v6: the delivery history per address (forwarder/history/), kept beside the queue so
    # that its rows are written in the queue's own transactions (no fsync of its own): a
    # row per delivery attempt, appended with the record of its outcome (the message's
    # facts repeated, so a message delivered at once costs one row); the checks at receipt
    # of a message, when there are any; the refusals at RCPT of our accounts. No bodies;
    # the subject only if configured; our notices to targets, with their kind, and the
    # replies to their confirm+ and refuse+ addresses. Rows leave in `id` order
    # (retention). No index by address: its random inserts dirtied a page per message in
    # every commit (10 us a message, bench/history_cost.py), while a help desk's read scans
    # in well under a second.
    """
    CREATE TABLE history (
        id           INTEGER PRIMARY KEY,
        received_at  REAL NOT NULL,
        queue_id     TEXT NOT NULL,
        address      TEXT NOT NULL,      -- our address the client named (directory key)
        target       TEXT NOT NULL,
        route        TEXT NOT NULL,
        client       TEXT NOT NULL,
        sender       TEXT NOT NULL,      -- '' is the null sender
        from_domain  TEXT,
        message_id   TEXT,
        subject      TEXT,
        notice       TEXT,               -- our notice to a target: 'confirm' or 'failing'
        size         INTEGER NOT NULL,
        test         INTEGER NOT NULL,   -- a forwarder send-test message
        at           REAL NOT NULL,      -- the attempt
        relay        TEXT,
        tls          TEXT,               -- the TLS version ('TLSv1.3'), '' in clear
        reply        TEXT,               -- RFC 3464 diagnostic: 'smtp; 250 ...', 'x-local; ...'
        outcome      TEXT NOT NULL,      -- delivered, deferred, failed
        next_attempt REAL,
        dsn_id       TEXT                -- the DSN that reported a failure
    );
    CREATE TABLE history_checks (
        received_at REAL NOT NULL,
        queue_id    TEXT NOT NULL,
        checks      TEXT NOT NULL,       -- JSON object: verdicts at receipt
        PRIMARY KEY (received_at, queue_id)
    ) WITHOUT ROWID;
    CREATE TABLE history_refusals (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        address TEXT NOT NULL,
        client  TEXT NOT NULL,
        sender  TEXT NOT NULL,
        reply   TEXT NOT NULL
    );
    CREATE INDEX history_refusals_address ON history_refusals (address, at);
    CREATE TABLE history_replies (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        address TEXT NOT NULL,           -- the account the notice was about
        target  TEXT NOT NULL,
        kind    TEXT NOT NULL,           -- confirm, refuse (the address written to)
        client  TEXT NOT NULL,
        sender  TEXT NOT NULL,
        result  TEXT NOT NULL            -- the target's state after, or why it was ignored
    );
    CREATE INDEX history_replies_address ON history_replies (address, at);
    """,
    # v7: a big message's body is in a spool file (forwarder/queue/spool.py); `body` then
    # holds only our own header fields, and the file the rest, dot-stuffed. Held messages
    # are found by age (they bounce at the end of their lifetime).
    """
    ALTER TABLE messages ADD COLUMN spooled INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX messages_spooled ON messages (id) WHERE spooled = 1;
    CREATE INDEX messages_held ON messages (arrived_at) WHERE held = 1;
    """,
)
QUEUE_SCHEMA_VERSION = len(SCHEMA)

# recipients.leased: 0 free, LEASED in a normal delivery, ISOLATED alone in the suspect lane.
LEASED = 1
ISOLATED = 2


def open_queue_db(path: Path, busy_timeout: float = 5.0) -> sqlite3.Connection:
    """Open and migrate the queue database. Durability: WAL + synchronous=FULL; the writer
    lowers it to NORMAL only for a commit that adds no message (writer.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsync'd at every commit, so a 250 survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrations.migrate(conn, SCHEMA, "queue", QueueError)
    return conn
