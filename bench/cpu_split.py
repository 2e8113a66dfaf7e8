"""Where a message's CPU goes, process by process: the forwarder's main process, its
acceptor processes, smtp-sink and smtp-source, for compare.sh's load at one point
(messages, sessions, body size), each forwarder given run in turn (interleaved pairs, so
machine drift hits all alike). Prints the accept and end-to-end rates and the CPU a
message of each process (`/proc/PID/stat`, and the children's rusage for smtp-source),
with the processes' minor page faults a message, and the daemon's peak resident memory.

    .venv/bin/python bench/cpu_split.py --point 100,20,5000000 --rounds 3 \\
        /path/to/a/.venv/bin/forwarder /path/to/b/.venv/bin/forwarder

docs/performance.md quotes its output ("Fourth pass").
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    DEFAULT_FORWARDER,
    Daemon,
    Sink,
    build_directory,
    free_port,
    proc_stat,
    proc_status,
    smtp_source,
)

DIRECTORY_N = 50_000


def acceptors(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(forwarder: str, work: Path, point: tuple[int, int, int]) -> str:
    messages, sessions, size = point
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    shutil.copy(work / "directory.sqlite3", state / "directory.sqlite3")
    config = work / "bench.toml"
    sink = Sink(free_port(), work / "sink.out")
    daemon = Daemon([forwarder], state, free_port(), sink.port, config)
    sink.start()
    daemon.start()
    try:
        time.sleep(1.0)  # the acceptors are up and the start-up work is done
        groups = {"main": [daemon.pid], "acceptors": acceptors(daemon.pid),
                  "sink": [sink.proc.pid] if sink.proc else []}
        before = {k: [proc_stat(p) for p in v] for k, v in groups.items()}
        delivered0, source0, t0 = sink.delivered(), children_cpu(), time.monotonic()
        took = smtp_source(daemon.port, messages, sessions, size)
        source = children_cpu() - source0
        while sink.delivered() - delivered0 < messages:
            time.sleep(0.01)
        e2e = time.monotonic() - t0
        after = {k: [proc_stat(p) for p in v] for k, v in groups.items()}
        peak = {k: sum(proc_status(p, "VmHWM") for p in groups[k]) / 1024
                for k in ("main", "acceptors")}
    finally:
        daemon.stop()
        sink.stop()
    cells = [f"accept {messages / took:.0f} e2e {messages / e2e:.0f} msg/s"]
    for name in groups:
        cpu = sum(a[0] - b[0] for a, b in zip(after[name], before[name], strict=True))
        faults = sum(a[1] - b[1] for a, b in zip(after[name], before[name], strict=True))
        cells.append(f"{name} {cpu * 1000 / messages:.1f} ms ({faults / messages:.0f} faults)")
    cells.append(f"smtp-source {source * 1000 / messages:.1f} ms")
    cells.append("peak RSS main {main:.0f} MiB, acceptors {acceptors:.0f} MiB".format(**peak))
    return "; ".join(cells)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--point", default="100,20,5000000",
                        help="messages,sessions,body octets (default: 100,20,5000000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("forwarders", nargs="*", default=[DEFAULT_FORWARDER])
    args = parser.parse_args()
    messages, sessions, size = (int(x) for x in args.point.split(","))
    with tempfile.TemporaryDirectory(prefix="cpu-split.") as tmp:
        work = Path(tmp)
        build_directory(work / "build", DIRECTORY_N)
        shutil.move(work / "build" / "directory.sqlite3", work / "directory.sqlite3")
        # Notices off (a day apart), and room for the sessions asked for.
        (work / "bench.toml").write_text(
            "[targets]\nnotice_interval = 86400\n[limits]\n"
            f"max_connections = {sessions + 500}\nmax_connections_per_client = {sessions + 100}\n")
        for round_ in range(1, args.rounds + 1):
            for label, forwarder in zip("ABCDEFGH", args.forwarders, strict=False):
                line = one_run(forwarder, work, (messages, sessions, size))
                print(f"round {round_} {label}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
