"""A forwarder node on PostgreSQL for the benchmarks (docs/cluster.md, docs/performance.md):
a throwaway PostgreSQL on loopback (tests/pgcluster.py, durable: fsync on) and the
configuration that points a node at it.

    .venv/bin/python bench/pgnode.py up /tmp/pgnode      # start it; writes node.toml
    PGNODE=/tmp/pgnode FORWARDER=$PWD/bench/pg-forwarder.sh \\
        flock /tmp/bench.lock bash /work/shared/bench/compare.sh 3000 20 2000 3
    .venv/bin/python bench/pgnode.py down /tmp/pgnode

`seed STATE_DIR` copies the accounts and targets of STATE_DIR/directory.sqlite3 (what
bench/run.py builds) into an empty PostgreSQL directory, so that bench/run.py can drive a
node on PostgreSQL too (bench/pg-forwarder.sh does it before `serve`).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forwarder.config import load_settings
from forwarder.directory.pgschema import open_directory_db
from forwarder.directory.replica import TARGET_FIELDS
from tests.pgcluster import PASSWORD, PgCluster, pg_bin


def up(where: Path) -> None:
    bindir = pg_bin()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
    cluster = PgCluster(bindir, durable=True)
    cluster.init()
    cluster.start()
    url = cluster.create_database("forwarder")
    where.mkdir(parents=True, exist_ok=True)
    (where / "cluster.json").write_text(json.dumps({"root": str(cluster.root),
                                                    "bindir": str(bindir),
                                                    "port": cluster.port}))
    config = where / "node.toml"
    config.write_text(f'directory_url = "{url}"\ndirectory_password = "{PASSWORD}"\n')
    config.chmod(0o600)
    print(config)


def down(where: Path) -> None:
    info = json.loads((where / "cluster.json").read_text())
    cluster = PgCluster.__new__(PgCluster)
    cluster.bindir, cluster.root = Path(info["bindir"]), Path(info["root"])
    cluster.data, cluster.port = cluster.root / "data", info["port"]
    cluster.as_user = ["runuser", "-u", "postgres", "--"] if cluster.root.owner() == \
        "postgres" else []
    cluster.destroy()


def seed(state_dir: Path, config: Path) -> None:
    source = state_dir / "directory.sqlite3"
    if not source.exists():
        return
    settings = load_settings(config)
    pg = open_directory_db(settings.directory_url, settings.directory_password)
    try:
        if pg.execute("SELECT count(*) FROM accounts").fetchone()[0]:
            return
        lite = sqlite3.connect(source)
        pg.execute("BEGIN IMMEDIATE")
        pg.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?)",
                       lite.execute("SELECT address, state, created_at, updated_at"
                                    " FROM accounts").fetchall())
        pg.executemany(f"INSERT INTO targets ({TARGET_FIELDS}) VALUES "
                       f"({', '.join('?' * 15)})",
                       lite.execute(f"SELECT {TARGET_FIELDS} FROM targets").fetchall())
        pg.execute("COMMIT")
        lite.close()
    finally:
        pg.close()


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    if command == "up":
        up(where)
    elif command == "down":
        down(where)
    elif command == "seed":
        seed(where, Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
