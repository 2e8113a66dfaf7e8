"""`forwarder check` on a node of several (docs/cluster.md): PostgreSQL reachable and
migrated, and how old this node's copy of the directory is."""

from __future__ import annotations

import stat
import time

from forwarder.config import Settings
from forwarder.directory.pgschema import SCHEMA_VERSION, open_directory_db, schema_version
from forwarder.directory.replica import read_synced_at, replica_path


def cluster_problems(settings: Settings, notes: list[str]) -> tuple[list[str], float | None]:
    """Problems, and the copy's staleness in seconds (None: never synchronised)."""
    problems = _config_file_problems(settings)
    try:
        conn = open_directory_db(settings.directory_url, settings.directory_password)
        try:
            version = schema_version(conn)
        finally:
            conn.close()
        notes.append(f"PostgreSQL directory reachable, schema version {version} "
                     f"(this program: {SCHEMA_VERSION})")
    except OSError as exc:
        problems.append(f"directory_url: {exc}; this node answers from its copy for "
                        f"{settings.directory_max_staleness:g} s, then 451")
    synced = read_synced_at(replica_path(settings.state_dir), settings.busy_timeout)
    if synced is None:
        notes.append(f"{replica_path(settings.state_dir)}: no copy of the directory yet "
                     "(the daemon makes it at its first start)")
        return problems, None
    staleness = max(0.0, time.time() - synced)
    text = (f"this node's copy of the directory was synchronised {staleness:.0f} s ago "
            f"(directory_max_staleness {settings.directory_max_staleness:g} s)")
    if staleness > settings.directory_max_staleness:
        problems.append(text + ": RCPT answers 451 4.3.0 until PostgreSQL is back")
    else:
        notes.append(text)
    return problems, staleness


def _config_file_problems(settings: Settings) -> list[str]:
    path = settings.config_file
    if not settings.directory_password or path is None:
        return []
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return []
    if mode & 0o077:
        return [f"{path}: mode {mode:04o} lets other users read directory_password; "
                "chmod 600 (or use $PGPASSWORD, ~/.pgpass or a service file)"]
    return []
