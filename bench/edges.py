"""The edges of the load, side by side with Postfix: big bodies, many sessions, one session.

Runs `compare.sh` (Postfix and the forwarder fed the same smtp-source load, interleaved
rounds, medians) at each point of the table in docs/performance.md ("The edges"), under
`flock /tmp/bench.lock` as every compare.sh run must be, and prints the table with the
ratios. Then, unless `--no-latency`, the 250's latency (final dot -> 250, p50/p99) for both
MTAs: one sequential client, then an open-loop load (a new connection per message, arrivals
at a fixed pace) at 50 % and 90 % of Postfix's 2 KB x 20 end-to-end rate, the same offered
load for both. Needs root (compare.sh configures the system Postfix).

    .venv/bin/python bench/edges.py                     # the whole table, ~10-15 minutes
    .venv/bin/python bench/edges.py --points 2k1,2k200 --rounds 5
    .venv/bin/python bench/edges.py --points none --capacity 450    # latency only

The forwarder runs with `[targets] notice_interval` at a day: compare.sh's import owes
50,000 notices, and one a second would otherwise land in the sink's count (a 30 s round
at 5 MB would count 30 notices as messages). Each run's forwarder log is checked for a
recipient delivered twice (`duplicates`).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DEFAULT_FORWARDER, Client, Latencies, Sink, make_body, ms, wait_port

COMPARE = "/work/shared/bench/compare.sh"
LOCK = "/tmp/bench.lock"
PF_PORT, PF_SINK, FW_PORT, FW_SINK = 2525, 2626, 2527, 2628
DIRECTORY_N = 50_000


@dataclass(frozen=True)
class Point:
    name: str
    messages: int
    sessions: int
    size: int


# Message counts chosen so that a round takes a few seconds on each side at the rates of
# docs/performance.md: the whole table, three rounds each, in about ten minutes.
POINTS = {
    "2k20": Point("2 KB, 20 sessions", 3000, 20, 2000),
    "100k20": Point("100 KB, 20 sessions", 1000, 20, 100_000),
    "5m20": Point("5 MB, 20 sessions", 100, 20, 5_000_000),
    "2k1": Point("2 KB, 1 session", 600, 1, 2000),
    "2k200": Point("2 KB, 200 sessions", 3000, 200, 2000),
}


@dataclass
class Outcome:
    point: Point
    output: str
    pf_e2e: float = 0.0
    fw_e2e: float = 0.0
    accept: float = 0.0
    e2e: float = 0.0
    load: str = ""
    duplicates: int = 0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def write_config(path: Path, sessions: int) -> Path:
    path.write_text(
        "# written by bench/edges.py: compare.sh's limits, and no notices during the load\n"
        f"[limits]\nmax_connections = {sessions + 500}\n"
        f"max_connections_per_client = {sessions + 100}\n"
        "[targets]\nnotice_interval = 86400\n")
    return path


def run_point(point: Point, rounds: int, forwarder: str, config: Path) -> Outcome:
    before = set(Path("/tmp").glob("compare.*"))
    env = dict(os.environ, FORWARDER=forwarder, FORWARDER_CONFIG=str(config))
    load0 = loadavg()
    proc = subprocess.run(
        ["flock", LOCK, "bash", COMPARE, str(point.messages), str(point.sessions),
         str(point.size), str(rounds)],
        env=env, capture_output=True, text=True, check=False)
    out = Outcome(point, (proc.stdout + proc.stderr).rstrip(), load=f"{load0} -> {loadavg()}")
    for line in proc.stdout.splitlines():
        if m := re.match(r"median end-to-end\s+postfix (\d+)\s+forwarder (\d+)", line):
            out.pf_e2e, out.fw_e2e = float(m[1]), float(m[2])
        if m := re.match(r"ratio forwarder/postfix: accept ([\d.]+)\s+end-to-end ([\d.]+)", line):
            out.accept, out.e2e = float(m[1]), float(m[2])
    made = sorted(set(Path("/tmp").glob("compare.*")) - before)
    if made:
        out.duplicates = duplicates(made[-1] / "forwarder.log")
    return out


def duplicates(log: Path) -> int:
    """Recipients (queue id, address) the forwarder's log shows delivered more than once."""
    seen: Counter[tuple[str, str]] = Counter()
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        if '"delivery"' not in line or '"delivered"' not in line:
            continue
        event = json.loads(line)
        seen[(event["queue_id"], event["to"])] += 1
    return sum(n - 1 for n in seen.values() if n > 1)


def print_table(outcomes: list[Outcome]) -> None:
    print("\n| load | messages | Postfix e2e msg/s | forwarder e2e msg/s | accept ratio "
          "| end-to-end ratio | duplicates | load average (before -> after) |")
    print("|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        p = o.point
        print(f"| {p.name} | {p.messages} | {o.pf_e2e:.0f} | {o.fw_e2e:.0f} | {o.accept:.2f}x "
              f"| **{o.e2e:.2f}x** | {o.duplicates} | {o.load} |")
    print("(medians of interleaved rounds; the machine is shared with other work: "
          "the load average is printed beside each point)", flush=True)


# --- the 250's latency ------------------------------------------------------------------


@contextmanager
def bench_lock() -> Iterator[None]:
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # the same lock as flock(1) in compare.sh's callers
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def postfix_ready() -> str | None:
    """compare.sh leaves Postfix configured (relaying to its sink, the directory in SQLite):
    the latency runs start it again as it was. None, or why it cannot be used."""
    relay = subprocess.run(["postconf", "-h", "relayhost"], capture_output=True, text=True)
    if relay.stdout.strip() != f"[127.0.0.1]:{PF_SINK}":
        return "Postfix is not configured by compare.sh: run at least one point first"
    cf = Path("/etc/postfix/compare-virtual.cf").read_text()
    db = re.search(r"dbpath = (\S+)", cf)
    if db is None or not Path(db[1]).exists():
        return "compare.sh's Postfix directory is gone: run at least one point first"
    return None


async def paced(port: int, rate: float, seconds: float, body: bytes) -> Latencies:
    """Open loop: a new connection per message every 1/rate s, whatever the replies."""
    lat = Latencies()
    client = Client(port, body, DIRECTORY_N, random.Random(11))
    tasks: list[asyncio.Task[bool]] = []
    t0 = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.one(lat)))
    await asyncio.gather(*tasks)
    return lat


async def sequential(port: int, messages: int, body: bytes) -> tuple[Latencies, float]:
    lat = Latencies()
    client = Client(port, body, DIRECTORY_N, random.Random(7))
    t0 = time.monotonic()
    for _ in range(messages):
        await client.one(lat)
    return lat, time.monotonic() - t0


def latency_line(name: str, label: str, lat: Latencies, extra: str = "") -> None:
    print(f"| {label} | {name} | {ms(lat.dot, .5)} | {ms(lat.dot, .99)} | "
          f"{ms(lat.rcpt, .5)} | {lat.errors} | {extra}{loadavg()} |", flush=True)


def latencies(forwarder: str, config: Path, capacity: float, args: argparse.Namespace) -> None:
    why = postfix_ready()
    if why is not None:
        print(f"latency: {why}", file=sys.stderr)
        return
    work = Path(tempfile.mkdtemp(prefix="edges-latency."))
    with bench_lock():
        procs, sinks = start_both(forwarder, config, work)
        try:
            measure_latencies(capacity, args, lambda: settle(sinks))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
            subprocess.run(["postfix", "stop"], capture_output=True)


def start_both(forwarder: str, config: Path,
               work: Path) -> tuple[list[subprocess.Popen[bytes]], list[Sink]]:
    subprocess.run(["postfix", "start"], capture_output=True)
    sinks = [Sink(PF_SINK, work / "pf-sink.out"), Sink(FW_SINK, work / "fw-sink.out")]
    for s in sinks:
        s.start()
    csv = work / "directory.csv"
    csv.write_text("email,redirect,status\n" + "".join(
        f"{i}.nom@sigma-clermont.fr,perso{i}@example.org,deleted\n"
        for i in range(1, DIRECTORY_N + 1)))
    state = work / "fw"
    subprocess.run([*forwarder.split(), "account", "import", "--no-dns-check", "--state-dir",
                    str(state), str(csv)], check=True, capture_output=True)
    daemon = subprocess.Popen(
        [*forwarder.split(), "serve", "--config", str(config), "--state-dir", str(state),
         "--listen", f"127.0.0.1:{FW_PORT}", "--smarthost", f"127.0.0.1:{FW_SINK}"],
        stdout=open(work / "forwarder.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_port(FW_PORT)
    wait_port(PF_PORT)
    return [daemon, *(s.proc for s in sinks if s.proc is not None)], sinks


def settle(sinks: list[Sink], quiet: float = 1.0, limit: float = 120.0) -> None:
    """Wait until neither MTA is still delivering what the last load left queued (both
    sinks' counts unchanged for `quiet` s): otherwise the next load is measured while the
    other MTA drains its queue on the same two cores."""
    counts, since, deadline = [-1], time.monotonic(), time.monotonic() + limit
    while time.monotonic() < deadline:
        now = [s.delivered() for s in sinks]
        if now != counts:
            counts, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


def measure_latencies(capacity: float, args: argparse.Namespace,
                      drained: Callable[[], None]) -> None:
    body = make_body(2000)
    print("\n| load | MTA | dot -> 250 p50 ms | p99 ms | RCPT p50 ms | errors | load average |")
    print("|---|---|---|---|---|---|---|")
    for name, port in (("Postfix", PF_PORT), ("forwarder", FW_PORT)):
        drained()
        lat, took = asyncio.run(sequential(port, args.latency_messages, body))
        latency_line(name, "one sequential client", lat,
                     f"{len(lat.dot) / took:.0f} msg/s; ")
    for share in (0.5, 0.9):
        rate = share * capacity
        for name, port in (("Postfix", PF_PORT), ("forwarder", FW_PORT)):
            drained()
            lat = asyncio.run(paced(port, rate, args.latency_seconds, body))
            latency_line(name, f"{share:.0%} of {capacity:.0f} msg/s ({rate:.0f} msg/s)", lat)
    print("(the machine is shared with other work: the load average is beside each line)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(POINTS),
                        help=f"comma-separated, of {', '.join(POINTS)}; or none")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forwarder", default=DEFAULT_FORWARDER)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--capacity", type=float,
                        help="Postfix's rate for the latency loads (default: its 2k20 figure)")
    parser.add_argument("--latency-messages", type=int, default=300)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("compare.sh configures the system Postfix: run as root", file=sys.stderr)
        return 2
    names = [] if args.points == "none" else args.points.split(",")
    config = write_config(Path(tempfile.mkdtemp(prefix="edges.")) / "edges.toml", 200)
    print(f"forwarder: {args.forwarder}; {time.strftime('%Y-%m-%d %H:%M:%S')}; "
          f"load average {loadavg()}", flush=True)
    outcomes = []
    for name in names:
        out = run_point(POINTS[name], args.rounds, args.forwarder, config)
        print(f"\n== {out.point.name}\n{out.output}", flush=True)
        outcomes.append(out)
    if outcomes:
        print_table(outcomes)
    home = [o for o in outcomes if o.point == POINTS["2k20"] and o.pf_e2e]
    capacity = args.capacity or (home[0].pf_e2e if home else 0)
    if not args.no_latency:
        if capacity:
            latencies(args.forwarder, config, capacity, args)
        else:
            print("latency: give --capacity or include the 2k20 point", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
