"""How long `forwarder account import` takes for a school-sized file: 100,000 rows (a third
active, the rest deleted with one redirect target each, over 303 domains), imported into a
fresh directory, imported again (nothing changes: the idempotent re-run of every term), and
checked with --dry-run. The figure PRODUCT.md asks for: well under 10 s for 100,000 rows.

    PYTHONPATH=. .venv/bin/python bench/import_cost.py [--rows 100000] [--rounds 3]

Wall time of the whole command in this process (parse, plan, write, fsync), the median of
the rounds; run it on a quiet machine (tests never time it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from forwarder.cli import main

DOMAIN = "sigma-clermont.fr"


def school_file(path: Path, rows: int) -> None:
    domains = ["gmail.example", "outlook.example", "orange.example"] + [
        f"d{i}.example" for i in range(300)]
    lines = ["email,redirect,status"] + [
        f"prenom{i}.nom{i}@{DOMAIN},Prenom{i}.Nom{i}@{domains[i % len(domains)]},"
        f"{'active' if i % 3 == 0 else 'deleted'}" for i in range(rows)]
    path.write_text("\r\n".join(lines) + "\r\n")


def timed(*argv: str) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"forwarder {' '.join(argv)}: exit {code}")
    return elapsed


def one_round(rows: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="import-cost-") as tmp:
        csv, state = Path(tmp) / "students.csv", Path(tmp) / "state"
        school_file(csv, rows)
        common = ("--state-dir", str(state), "--no-dns-check")
        fresh = timed("account", "import", str(csv), *common)
        again = timed("account", "import", str(csv), *common)
        dry = timed("account", "import", str(csv), "--dry-run", *common)
        return fresh, again, dry


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = [one_round(args.rows) for _ in range(args.rounds)]
    for name, values in zip(("fresh", "again", "dry run"), zip(*results, strict=True),
                            strict=True):
        print(f"{args.rows} rows, {name:8} median {statistics.median(values):5.2f} s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    run()
