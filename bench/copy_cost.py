"""A node's full copy of the PostgreSQL directory: its time and the node's peak memory
(docs/performance.md, "Several nodes"). A throwaway PostgreSQL on loopback
(tests/pgcluster.py) gets N graduates with a target each; a new process then makes the
first copy, as a node starting with an empty state directory does, and reports its peak
RSS (getrusage) against the same process's RSS before the copy.

    .venv/bin/python bench/copy_cost.py 50000 200000
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forwarder.directory.pgschema import open_directory_db
from tests.pgcluster import PASSWORD, PgCluster, pg_bin

DOMAIN = "sigma-clermont.fr"


def seed(url: str, graduates: int) -> None:
    pg = open_directory_db(url, PASSWORD)
    try:
        pg.execute("BEGIN IMMEDIATE")
        pg.execute("INSERT INTO accounts SELECT 'p' || i || '.nom@" + DOMAIN + "',"
                   " 'active', 1.7e9, 1.7e9 FROM generate_series(1, ?) AS i", (graduates,))
        pg.execute("INSERT INTO targets (id, address, position, target, state, why,"
                   " declared_at, changed_at) SELECT i, 'p' || i || '.nom@" + DOMAIN + "',"
                   " 0, 'p' || i || '@gmail.example', 'confirmed', 'import', 1.7e9, 1.7e9"
                   " FROM generate_series(1, ?) AS i", (graduates,))
        pg.execute("COMMIT")
    finally:
        pg.close()


def copy(url: str, state_dir: str) -> None:
    """In the child process: one first copy, then its figures as JSON."""
    from forwarder.clock import SystemClock
    from forwarder.config import Settings
    from forwarder.directory.cluster import Replicator

    settings = Settings(state_dir=Path(state_dir), directory_url=url,
                        directory_password=PASSWORD)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def run() -> float:
        replicator = Replicator(settings, SystemClock())
        conn = await replicator.connect()
        start = time.perf_counter()
        try:
            await replicator.sync(conn)
        finally:
            await conn.close()
            await replicator.close()
        return time.perf_counter() - start

    seconds = asyncio.run(run())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_before_mib": before / 1024,
                      "rss_peak_mib": peak / 1024}))


def main(counts: list[int]) -> None:
    bindir = pg_bin()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
    cluster = PgCluster(bindir)
    cluster.init()
    cluster.start()
    try:
        for graduates in counts:
            url = cluster.create_database(f"copy_{graduates}")
            seed(url, graduates)
            with tempfile.TemporaryDirectory() as state:
                out = subprocess.run([sys.executable, __file__, "--copy", url, state],
                                     check=True, capture_output=True, text=True).stdout
            found = json.loads(out.strip().splitlines()[-1])
            print(f"{graduates:>8} graduates: {found['seconds']:6.1f} s, peak RSS"
                  f" {found['rss_peak_mib']:6.1f} MiB (before the copy"
                  f" {found['rss_before_mib']:.1f} MiB)")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--copy"]:
        copy(sys.argv[2], sys.argv[3])
    else:
        main([int(n) for n in sys.argv[1:]] or [50_000])
