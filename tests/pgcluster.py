"""A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl (Debian's
postgresql package) on a temporary directory, listening on loopback only.

PostgreSQL refuses to run as root: when the tests run as root (CI does), the server runs
as the `postgres` user (created by the package) through runuser, in a directory it owns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]
PASSWORD = "forwarder-test-password"


def pg_bin() -> Path | None:
    """Where initdb and pg_ctl are, or None (then the tests that need them skip)."""
    for directory in BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    def __init__(self, bindir: Path, durable: bool = False) -> None:
        self.bindir = bindir
        # Tests need no durability (the cluster is thrown away); a benchmark does.
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="forwarder-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.root)

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "forwarder",
                  "--pwfile", str(pwfile), "-A", "scram-sha-256", "-E", "UTF8",
                  "--locale", "C.UTF-8", "--no-sync")
        pwfile.unlink()

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts,
                  "-l", str(self.root / "log"), "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                  "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://forwarder@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), password=PASSWORD, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
