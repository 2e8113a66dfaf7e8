"""The forwarder's own throughput benchmark: scenarios (a) to (d) of docs/performance.md.

Each scenario builds a state directory with N graduates (the project's own schema), starts
the daemon (`forwarder serve`) relaying to Postfix's `smtp-sink`, drives a load with
Postfix's `smtp-source` and with our asyncio latency client, and prints the accept rate,
the end-to-end rate (until the sink has every message), p50/p99 latency from the final dot
to the 250, and the daemon's peak RSS (VmHWM). Everything stays on 127.0.0.1.

    .venv/bin/python bench/run.py a                # the compare.sh load
    .venv/bin/python bench/run.py b --idle 1000    # idle connections plus a load
    .venv/bin/python bench/run.py c                # 10,000 vs 1,000,000 graduates
    .venv/bin/python bench/run.py d --backlog 100000
    .venv/bin/python bench/run.py all

`--forwarder CMD` runs another build of the daemon (e.g. a patched tree through a wrapper
script); `--keep` leaves the work directory for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "sigma-clermont.fr"
SENDER = "noreply@jobteaser.com"
HOST = "127.0.0.1"  # loopback only, always
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_FORWARDER = str(Path(sys.executable).with_name("forwarder"))


# --- set-up ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def build_directory(state_dir: Path, n: int) -> float:
    """N graduates `i.nom@DOMAIN` (deleted, with one confirmed target), in the daemon's own
    schema. Bulk-inserted (no audit rows, no notices): `account import` of a million rows
    is an admin test, not this benchmark's. Returns the seconds it took."""
    from forwarder.directory.schema import connect

    t0 = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(state_dir / "directory.sqlite3")
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO accounts VALUES (?, 'deleted', ?, ?)",
                     ((f"{i}.nom@{DOMAIN}", now, now) for i in range(1, n + 1)))
    conn.executemany(
        "INSERT INTO targets (address, position, target, state, why, declared_at, changed_at,"
        " confirmed) VALUES (?, 0, ?, 'confirmed', 'bench', ?, ?, 1)",
        ((f"{i}.nom@{DOMAIN}", f"perso{i}@example.org", now, now) for i in range(1, n + 1)))
    conn.execute("COMMIT")
    conn.close()
    return time.monotonic() - t0


def write_config(path: Path, max_connections: int, per_client: int) -> Path:
    path.write_text(
        "# written by bench/run.py\n[limits]\n"
        f"max_connections = {max_connections}\nmax_connections_per_client = {per_client}\n")
    return path


@dataclass
class Sink:
    """Postfix's smtp-sink; `delivered()` reads its running counter."""

    port: int
    out: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fh = open(self.out, "ab")  # noqa: SIM115 - the child owns it
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        self.proc = subprocess.Popen([*cmd, f"{HOST}:{self.port}", "1000"], stdout=fh,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port)

    def delivered(self) -> int:
        try:
            text = self.out.read_bytes().replace(b"\r", b"\n")
        except FileNotFoundError:
            return 0
        found = re.findall(rb"mesg=(\d+)", text)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


@dataclass
class Daemon:
    forwarder: list[str]
    state_dir: Path
    port: int
    sink_port: int
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> list[str]:
        extra = ["--config", str(self.config)] if self.config else []
        return [*self.forwarder, *args, *extra, "--state-dir", str(self.state_dir)]

    def start(self) -> None:
        log = open(self.state_dir.parent / "forwarder.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cli("serve", "--listen", f"{HOST}:{self.port}",
                     "--smarthost", f"{HOST}:{self.sink_port}"),
            stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self, key: str) -> int:
        """VmHWM / VmRSS of the daemon, in KiB."""
        return proc_status(self.pid, key)

    def cpu_seconds(self) -> float:
        return proc_stat(self.pid)[0]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status figure (VmHWM, VmRSS: in KiB), 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def proc_stat(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and minor page faults of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 2) as s:
            # Read the greeting and say QUIT, so this probe's session is over (and not
            # counted against the per-client cap) before the load starts.
            s.recv(512)
            s.sendall(b"QUIT\r\n")
            s.recv(512)
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port}")


def wait_delivered(sink: Sink, target: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while sink.delivered() < target and time.monotonic() < deadline:
        time.sleep(0.02)
    return time.monotonic()


# --- load: smtp-source and the latency client ----------------------------------------


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    """The compare.sh load; returns the seconds smtp-source ran."""
    t0 = time.monotonic()
    subprocess.run(["smtp-source", "-N", "-s", str(sessions), "-m", str(messages),
                    "-l", str(size), "-t", f".nom@{DOMAIN}", "-f", SENDER, f"{HOST}:{port}"],
                   check=True)
    return time.monotonic() - t0


@dataclass
class Latencies:
    dot: list[float] = field(default_factory=list)  # final dot -> 250
    rcpt: list[float] = field(default_factory=list)  # RCPT -> its reply
    errors: int = 0


class Client:
    """A minimal SMTP client on asyncio streams: one message per connection, like
    smtp-source, timing the RCPT verdict and the wait from the final dot to the 250."""

    def __init__(self, port: int, body: bytes, directory_n: int, rng: random.Random) -> None:
        self.port = port
        self.body = body
        self.directory_n = directory_n
        self.rng = rng

    async def one(self, lat: Latencies) -> bool:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            await _reply(reader, "220")
            writer.write(b"EHLO bench.localdomain\r\n")
            await _reply(reader, "250")
            writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
            await _reply(reader, "250")
            rcpt = f"{self.rng.randint(1, self.directory_n)}.nom@{DOMAIN}"
            t0 = time.perf_counter()
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            await _reply(reader, "250")
            lat.rcpt.append(time.perf_counter() - t0)
            writer.write(b"DATA\r\n")
            await _reply(reader, "354")
            writer.write(self.body)
            t0 = time.perf_counter()
            writer.write(b".\r\n")
            await _reply(reader, "250")
            lat.dot.append(time.perf_counter() - t0)
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await reader.read()
            return True
        except (OSError, SmtpReplyError, asyncio.IncompleteReadError):
            lat.errors += 1
            return False
        finally:
            writer.close()


class SmtpReplyError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader, code: str) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code.encode()):
            raise SmtpReplyError(line.decode("ascii", "replace").strip() or "connection closed")
        if line[3:4] != b"-":
            return


def make_body(size: int) -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <graduate@{DOMAIN}>\r\nSubject: bench\r\n\r\n".encode()
    line = b"X" * 78 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


async def latency_load(port: int, messages: int, sessions: int, size: int,
                       directory_n: int) -> tuple[Latencies, float]:
    lat = Latencies()
    client = Client(port, make_body(size), directory_n, random.Random(42))
    left = messages

    async def session() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.one(lat)

    t0 = time.monotonic()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return lat, time.monotonic() - t0


async def hold_idle(port: int, count: int, ready: asyncio.Event, done: asyncio.Event) -> int:
    """Open `count` connections that greet and then sit idle until `done`."""
    conns: list[asyncio.StreamWriter] = []
    opened = 0
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(HOST, port)
            conns.append(writer)
            with contextlib.suppress(SmtpReplyError):
                await _reply(reader, "220")
                writer.write(b"EHLO idle.localdomain\r\n")
                await _reply(reader, "250")
                opened += 1
        ready.set()
        await done.wait()
    finally:
        ready.set()
        for w in conns:
            w.close()
    return opened


async def rcpt_probe(port: int, count: int, directory_n: int) -> list[float]:
    """The RCPT verdict with no other load: one session, `count` RCPTs at random over the
    directory (an RSET every 50, under the 100-recipient limit)."""
    rng = random.Random(7)
    times: list[float] = []
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await _reply(reader, "220")
        writer.write(b"EHLO probe.localdomain\r\n")
        await _reply(reader, "250")
        for i in range(count):
            if i % 50 == 0:
                writer.write(b"RSET\r\n" if i else b"")
                if i:
                    await _reply(reader, "250")
                writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
                await _reply(reader, "250")
            t0 = time.perf_counter()
            writer.write(f"RCPT TO:<{rng.randint(1, directory_n)}.nom@{DOMAIN}>\r\n".encode())
            await _reply(reader, "250")
            times.append(time.perf_counter() - t0)
        writer.write(b"QUIT\r\n")
    finally:
        writer.close()
    return times


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float], q: float) -> str:
    return f"{1000 * pct(values, q):.1f}"


# --- scenarios ------------------------------------------------------------------------


@dataclass
class Env:
    args: argparse.Namespace
    work: Path

    @contextlib.contextmanager
    def daemon(self, name: str, directory_n: int, config: Path | None = None,
               start_sink: bool = True) -> Iterator[tuple[Daemon, Sink]]:
        root = self.work / name
        root.mkdir(parents=True, exist_ok=True)
        cache = self.work / f"directory-{directory_n}.sqlite3"
        if not cache.exists():
            tmp = self.work / f"build-{directory_n}"
            took = build_directory(tmp, directory_n)
            print(f"  built a directory of {directory_n:,} graduates in {took:.1f} s")
            shutil.move(tmp / "directory.sqlite3", cache)
            shutil.rmtree(tmp)
        (root / "state").mkdir(exist_ok=True)
        shutil.copy(cache, root / "state" / "directory.sqlite3")
        sink = Sink(free_port(), root / "sink.out")
        daemon = Daemon(shlex.split(self.args.forwarder), root / "state", free_port(),
                        sink.port, config)
        try:
            if start_sink:
                sink.start()
            daemon.start()
            yield daemon, sink
        finally:
            daemon.stop()
            sink.stop()


def report(label: str, **figures: object) -> None:
    print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)


def load_round(env: Env, daemon: Daemon, sink: Sink, directory_n: int, label: str) -> None:
    """smtp-source for the rates, then our client for the latencies, same shape."""
    a = env.args
    before = sink.delivered()
    cpu0 = daemon.cpu_seconds()
    t0 = time.monotonic()
    took = smtp_source(daemon.port, a.messages, a.sessions, a.size)
    t_end = wait_delivered(sink, before + a.messages, 600)
    delivered = sink.delivered() - before
    e2e = a.messages / (t_end - t0) if delivered >= a.messages else 0.0
    cpu = (daemon.cpu_seconds() - cpu0) / a.messages * 1000
    report(f"{label} smtp-source", accept=f"{a.messages / took:.0f} msg/s",
           end_to_end=f"{e2e:.0f} msg/s", delivered=delivered, cpu=f"{cpu:.2f} ms/msg")
    before = sink.delivered()
    lat, took = asyncio.run(latency_load(daemon.port, a.latency_messages, a.sessions, a.size,
                                         directory_n))
    wait_delivered(sink, before + len(lat.dot), 600)
    report(f"{label} latency client", accept=f"{len(lat.dot) / took:.0f} msg/s",
           dot_to_250_p50=f"{ms(lat.dot, .5)} ms", p99=f"{ms(lat.dot, .99)} ms",
           rcpt_p50=f"{ms(lat.rcpt, .5)} ms", rcpt_p99=f"{ms(lat.rcpt, .99)} ms",
           errors=lat.errors)
    report(f"{label} daemon", peak_rss=f"{daemon.status('VmHWM') / 1024:.1f} MiB")


def scenario_a(env: Env) -> None:
    a = env.args
    print(f"(a) compare.sh load: {a.messages} messages, {a.sessions} sessions, {a.size}-byte "
          f"bodies, new connection per message, {a.directory:,} graduates", flush=True)
    with env.daemon("a", a.directory) as (daemon, sink):
        for r in range(1, a.rounds + 1):
            load_round(env, daemon, sink, a.directory, f"round {r}")


def scenario_b(env: Env) -> None:
    a = env.args
    print(f"(b) {a.idle} idle connections, then the (a) load", flush=True)
    # The caps are the daemon's, across its processes: room for the idle connections and
    # the load's sessions (the load and the idle holder both connect from 127.0.0.1).
    config = write_config(env.work / "b.toml", a.idle + 500, a.idle + 100)
    with env.daemon("b", a.directory, config) as (daemon, sink):
        rss0 = daemon.status("VmRSS")

        async def run() -> None:
            ready, done = asyncio.Event(), asyncio.Event()
            holder = asyncio.create_task(hold_idle(daemon.port, a.idle, ready, done))
            await ready.wait()
            await asyncio.sleep(1)
            rss1 = daemon.status("VmRSS")
            report("idle", connections=a.idle, rss_before=f"{rss0 / 1024:.1f} MiB",
                   rss_with_idle=f"{rss1 / 1024:.1f} MiB",
                   per_connection=f"{(rss1 - rss0) / max(1, a.idle):.1f} KiB")
            await asyncio.to_thread(load_round, env, daemon, sink, a.directory, "with idle")
            done.set()
            report("idle", still_open=await holder)

        asyncio.run(run())


def scenario_c(env: Env) -> None:
    a = env.args
    print("(c) directory size: the same load against 10,000 and 1,000,000 graduates "
          "(latency client picks recipients at random over the whole directory)", flush=True)
    for n in (10_000, a.large):
        with env.daemon(f"c{n}", n) as (daemon, sink):
            load_round(env, daemon, sink, n, f"{n:>9,} graduates")
            times = asyncio.run(rcpt_probe(daemon.port, 2000, n))
            report(f"{n:>9,} graduates unloaded RCPT", p50=f"{ms(times, .5)} ms",
                   p99=f"{ms(times, .99)} ms", mean=f"{1000 * sum(times) / len(times):.3f} ms")


def scenario_d(env: Env) -> None:
    a = env.args
    n = a.backlog
    print(f"(d) backlog: {n:,} messages queued while the sink is down, then drained",
          flush=True)
    # smtp-source numbers its recipients 1..n: the directory must hold every one.
    with env.daemon("d", max(a.directory, n), start_sink=False) as (daemon, sink):
        t0 = time.monotonic()
        smtp_source(daemon.port, n, a.sessions, a.size)
        report("queued", messages=n, seconds=f"{time.monotonic() - t0:.0f}",
               rss=f"{daemon.status('VmRSS') / 1024:.1f} MiB",
               queue_db=f"{_du(daemon.state_dir) / 2**20:.0f} MiB")
        sink.start()
        t0 = time.monotonic()
        subprocess.run(daemon.cli("queue", "retry"), check=True, stdout=subprocess.DEVNULL)
        samples: list[int] = []
        last_report = t0
        while sink.delivered() < n and time.monotonic() - t0 < a.drain_timeout:
            time.sleep(0.5)
            samples.append(daemon.status("VmRSS"))
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                report("draining", delivered=sink.delivered(),
                       seconds=f"{last_report - t0:.0f}")
        took = time.monotonic() - t0
        got = sink.delivered()
        report("drained", delivered=got, seconds=f"{took:.0f}", rate=f"{got / took:.0f} msg/s",
               rss_min=f"{min(samples) / 1024:.1f} MiB", rss_max=f"{max(samples) / 1024:.1f} MiB",
               peak_rss=f"{daemon.status('VmHWM') / 1024:.1f} MiB")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


SCENARIOS = {"a": scenario_a, "b": scenario_b, "c": scenario_c, "d": scenario_d}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--forwarder", default=DEFAULT_FORWARDER,
                        help="command that runs the project's CLI (default: the venv's)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000, help="body bytes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--directory", type=int, default=50_000, help="graduates for a, b, d")
    parser.add_argument("--latency-messages", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--drain-timeout", type=float, default=3600)
    parser.add_argument("--work", type=Path, help="work directory (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install postfix", file=sys.stderr)
            return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # idle connections, both ends
    sys.path.insert(0, str(BENCH_DIR.parent))
    work = args.work or Path(tempfile.mkdtemp(prefix="forwarder-bench."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work}; forwarder: {args.forwarder}; "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    try:
        for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
            SCENARIOS[name](Env(args, work))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
