"""The PostgreSQL directory's schema (several nodes: docs/cluster.md), and its migrations.

The same tables as the SQLite directory (forwarder/directory/schema.py), so that one SQL
code base serves both (forwarder/directory/pgconn.py), and what several nodes share besides:
the SRS long-sender keys, the SRS and token secrets, and the change log the nodes' local
copies replay (forwarder/directory/replica.py).

The change log: every insert, update or delete of an account, a target, a secret or a
long sender's SRS key adds
a row with the next `version` (a bigserial), and wakes the nodes with NOTIFY. The trigger
takes the directory's write lock first (pgconn.WRITE_LOCK), so writers commit one at a
time and in the order of their versions: a node that has seen version N has seen every
version below it, and replaying "everything after my last version" misses nothing.

Migrations are versioned (`schema_version`) and run once, by whichever node or admin
command gets there first, under a transaction-scoped advisory lock (pgconn.MIGRATE_LOCK).
"""

from __future__ import annotations

from forwarder.directory.model import DirectoryError
from forwarder.directory.pgconn import MIGRATE_LOCK, WRITE_LOCK, PgConnection

NOTIFY_CHANNEL = "forwarder_directory"

MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE accounts (
        address    text COLLATE "C" PRIMARY KEY,
        state      text NOT NULL CHECK (state IN ('active', 'deleted')),
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL
    );
    CREATE TABLE targets (
        id            bigint PRIMARY KEY,
        address       text COLLATE "C" NOT NULL
                      REFERENCES accounts (address) ON DELETE CASCADE,
        position      integer NOT NULL,
        target        text COLLATE "C" NOT NULL,
        state         text NOT NULL
                      CHECK (state IN ('pending', 'confirmed', 'refused', 'off', 'failing')),
        why           text NOT NULL,
        declared_at   double precision NOT NULL,
        changed_at    double precision NOT NULL,
        confirmed     integer NOT NULL DEFAULT 0,
        failures      integer NOT NULL DEFAULT 0,
        first_failure double precision,
        last_failure  double precision,
        last_error    text,
        last_success  double precision,
        notice_due    double precision,
        UNIQUE (address, target)
    );
    CREATE INDEX targets_rcpt ON targets (address, position);
    CREATE INDEX targets_notice_due ON targets (notice_due) WHERE notice_due IS NOT NULL;

    -- Append-only, enforced here: no DELETE, and no UPDATE but a purge's erasure of the
    -- personal data of an entry (GDPR art. 17; who did what and when stays).
    CREATE TABLE audit (
        id      bigserial PRIMARY KEY,
        at      double precision NOT NULL,
        actor   text NOT NULL,
        action  text NOT NULL,
        address text COLLATE "C" NOT NULL,
        old     text,
        new     text
    );
    CREATE INDEX audit_address ON audit (address);
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.at = OLD.at
           AND NEW.actor = OLD.actor AND NEW.action = OLD.action
           AND NEW.address = '(purged)' AND NEW.old IS NULL AND NEW.new IS NULL THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'audit is append-only';
    END $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

    CREATE TABLE sender_stats (
        domain       text NOT NULL,
        day          integer NOT NULL,
        dkim_aligned integer NOT NULL DEFAULT 0,
        spf_only     integer NOT NULL DEFAULT 0,
        unaligned    integer NOT NULL DEFAULT 0,
        policy       text NOT NULL DEFAULT '',
        PRIMARY KEY (domain, day)
    );

    -- SRS senders too long for an SRS0 local part (forwarder/srsstore.py), for every node.
    CREATE TABLE srs_keys (
        key       text PRIMARY KEY,
        sender    text NOT NULL UNIQUE,
        stored_at double precision NOT NULL
    );
    -- The SRS and token secrets: per kind, position 0 signs, every one verifies.
    CREATE TABLE secrets (
        kind     text NOT NULL CHECK (kind IN ('srs', 'token')),
        position integer NOT NULL,
        secret   text NOT NULL,
        PRIMARY KEY (kind, position)
    );

    -- The change log the nodes' copies replay; `pruned_through`: versions up to it have
    -- been removed, and a copy older than that starts again from a full copy.
    CREATE TABLE changes (
        version bigserial PRIMARY KEY,
        tbl     text NOT NULL,
        key     text NOT NULL,
        at      timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE meta (
        name  text PRIMARY KEY,
        value text NOT NULL
    );
    INSERT INTO meta VALUES ('directory_id', md5(random()::text || clock_timestamp()::text)),
                            ('pruned_through', '0');
    CREATE FUNCTION log_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        row_key text;
    BEGIN
        -- `last_success` alone (refreshed for thousands of targets a minute) is never read
        -- from a node's copy: not worth a change each.
        IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'targets' THEN
            IF (to_jsonb(OLD) - 'last_success') = (to_jsonb(NEW) - 'last_success') THEN
                RETURN NULL;
            END IF;
        END IF;
        -- Nor a long sender's key stored again (its time refreshed, at every message).
        IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'srs_keys' THEN
            IF OLD.key = NEW.key AND OLD.sender = NEW.sender THEN
                RETURN NULL;
            END IF;
        END IF;
        PERFORM pg_advisory_xact_lock({WRITE_LOCK});
        IF TG_TABLE_NAME = 'accounts' THEN
            row_key := CASE WHEN TG_OP = 'DELETE' THEN OLD.address ELSE NEW.address END;
        ELSIF TG_TABLE_NAME = 'targets' THEN
            row_key := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
        ELSIF TG_TABLE_NAME = 'srs_keys' THEN
            row_key := CASE WHEN TG_OP = 'DELETE' THEN OLD.key ELSE NEW.key END;
        ELSE
            row_key := CASE WHEN TG_OP = 'DELETE' THEN OLD.kind ELSE NEW.kind END;
        END IF;
        INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, row_key);
        -- A row whose key changed (no command does that) is gone under its old key.
        IF TG_OP = 'UPDATE' THEN
            IF TG_TABLE_NAME = 'accounts' THEN
                IF OLD.address <> NEW.address THEN
                    INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, OLD.address);
                END IF;
            ELSIF TG_TABLE_NAME = 'targets' THEN
                IF OLD.id <> NEW.id THEN
                    INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, OLD.id);
                END IF;
            END IF;
        END IF;
        RETURN NULL;
    END $$;
    CREATE FUNCTION notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER accounts_log AFTER INSERT OR UPDATE OR DELETE ON accounts
        FOR EACH ROW EXECUTE FUNCTION log_change();
    CREATE TRIGGER targets_log AFTER INSERT OR UPDATE OR DELETE ON targets
        FOR EACH ROW EXECUTE FUNCTION log_change();
    CREATE TRIGGER secrets_log AFTER INSERT OR UPDATE OR DELETE ON secrets
        FOR EACH ROW EXECUTE FUNCTION log_change();
    CREATE TRIGGER srs_keys_log AFTER INSERT OR UPDATE OR DELETE ON srs_keys
        FOR EACH ROW EXECUTE FUNCTION log_change();
    CREATE TRIGGER srs_keys_notify AFTER INSERT OR DELETE ON srs_keys
        FOR EACH STATEMENT EXECUTE FUNCTION notify_change();
    CREATE TRIGGER accounts_notify AFTER INSERT OR UPDATE OR DELETE ON accounts
        FOR EACH STATEMENT EXECUTE FUNCTION notify_change();
    CREATE TRIGGER targets_notify AFTER INSERT OR UPDATE OR DELETE ON targets
        FOR EACH STATEMENT EXECUTE FUNCTION notify_change();
    CREATE TRIGGER secrets_notify AFTER INSERT OR UPDATE OR DELETE ON secrets
        FOR EACH STATEMENT EXECUTE FUNCTION notify_change();
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: PgConnection) -> int:
    exists = conn.execute("SELECT to_regclass('schema_version')").fetchone()[0]
    if exists is None:
        return 0
    return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])


def migrate(conn: PgConnection) -> None:
    """Bring the database to SCHEMA_VERSION: each missing step in one transaction, under
    the migration lock, the version read again once the lock is held (another node or
    admin command may have migrated meanwhile)."""
    if schema_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        if conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 0:
            conn.execute("INSERT INTO schema_version VALUES (0)")
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise DirectoryError(f"PostgreSQL directory schema version {version} is newer "
                                 f"than this program ({SCHEMA_VERSION})")
        for step in MIGRATIONS[version:]:
            conn.execute(step)
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken:
            conn.execute("ROLLBACK")
        raise


def open_directory_db(url: str, password: str = "") -> PgConnection:
    """A migrated connection to the PostgreSQL directory."""
    conn = PgConnection.open(url, password)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn
