"""`PgDirectory`: the PostgreSQL backend of `AdminDirectory`, for the `forwarder` command
on a node of several (docs/cluster.md).

The SQLite `Directory`'s code on a PostgreSQL connection (forwarder/directory/pgconn.py):
the same commands, transactions, audit entries and output; only the token secrets live
in the database instead of a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from forwarder.directory.admin import Directory
from forwarder.directory.pgschema import open_directory_db
from forwarder.directory.pgstores import PgSecrets


class PgDirectory(Directory):
    def __init__(self, url: str, password: str = "", actor: str | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.pg = open_directory_db(url, password)
        super().__init__(Path("postgresql"), actor=actor, now=now, conn=self.pg)

    def token_secrets(self) -> list[bytes]:
        secrets = PgSecrets(self.pg, "token")
        secrets.ensure()
        return secrets.load()

    def rotate_token_secrets(self) -> int:
        return PgSecrets(self.pg, "token").rotate()
