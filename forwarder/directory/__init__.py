"""The directory of addresses: accounts, their redirect targets, the audit trail.

| module | holds |
|---|---|
| `model.py` | the interface: `AdminDirectory`, `DaemonDirectory`, and what they take and give |
| `schema.py` | the SQLite file: schema, migrations, `connect` |
| `rows.py` | the SQLite writers' shared parts: rows into objects, audit entries |
| `admin.py` | `Directory`: the SQLite `AdminDirectory` (the `forwarder` command) |
| `imports.py` | the term-time import's SQL, and replacing an account's targets |
| `upkeep.py` | the daemon's writes (tokens consumed, failures and successes) |
| `daemon.py` | `SqliteDaemonDirectory`: the SQLite `DaemonDirectory` |
| `secrets.py` | the token secrets file |

Another backend (PostgreSQL, for several nodes) implements the two interfaces of
`model.py` with the semantics written there. The names below are the package's public
face; import them from `forwarder.directory`.
"""

from forwarder.directory.admin import Directory, invoking_user
from forwarder.directory.daemon import SqliteDaemonDirectory
from forwarder.directory.model import (
    AccountRow,
    AdminDirectory,
    DaemonDirectory,
    Declared,
    DirectoryError,
    Imported,
    ImportPlan,
    ImportReport,
    ImportRow,
    StateChange,
    TargetResult,
    TargetRow,
    TokenUse,
    Written,
)
from forwarder.directory.schema import (
    MIGRATIONS,
    PURGED,
    SCHEMA_VERSION,
    count_active,
)
from forwarder.directory.secrets import token_secrets_path, token_secrets_problems

__all__ = [
    "MIGRATIONS",
    "PURGED",
    "SCHEMA_VERSION",
    "AccountRow",
    "AdminDirectory",
    "DaemonDirectory",
    "Declared",
    "Directory",
    "DirectoryError",
    "ImportPlan",
    "ImportReport",
    "ImportRow",
    "Imported",
    "SqliteDaemonDirectory",
    "StateChange",
    "TargetResult",
    "TargetRow",
    "TokenUse",
    "Written",
    "count_active",
    "invoking_user",
    "token_secrets_path",
    "token_secrets_problems",
]
