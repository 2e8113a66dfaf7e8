"""Crash safety: inject mail while SIGKILLing the daemon, then count what reached the sink.

PRODUCT.md: a `250` after DATA means the message is committed and fsync'd, and a crash never
loses it (it may deliver it twice). This script checks that promise on the real program:

1. a state directory with a few graduates (`forwarder account add`), a config relaying
   their mail to a sink in this process (an aiosmtpd server on 127.0.0.1);
2. `forwarder serve` as a subprocess, and `--clients` concurrent SMTP clients injecting
   messages, each with its own Message-ID, until `--messages` of them got a 250;
3. meanwhile, `--kills` times at random moments of the injection, SIGKILL and restart;
4. once injection ends, wait for the queue to drain, then match Message-IDs at the sink.

It prints (and with `--json` emits) sent (connections refused while the daemon was down
are not counted), no_250 (cut off or refused), accepted (250s), delivered, lost (accepted but
never delivered: must be 0), duplicated (delivered more than once), kills, held (left in
the queue, quarantined: must be 0 too, as no message here is poison) and exits 1 if anything
was lost or held. Everything stays on 127.0.0.1.

    .venv/bin/python bench/crash_test.py                         # 3000 messages, 20 kills
    .venv/bin/python bench/crash_test.py --messages 300 --kills 4  # the CI form (pytest)
    .venv/bin/python bench/crash_test.py --messages 300 --burst 4  # a burst, by events

A burst is driven by events, not counts: once `--burst-after` messages got their 250, the
next message the sink sees (the victim) is held mid-DATA, and the daemon is killed while
it is delivering it; after each restart, the daemon is killed again the moment the victim
reaches the sink again (or the moment it is held in the queue, if the daemon holds it:
then it will never come back). So every kill lands while the victim is in delivery, alone
in the suspect lane if the daemon suspects it: before a kill from outside was known to be
nobody's fault, that held it every time, at the third kill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP

DOMAIN = "sigma-clermont.fr"
GRADUATES = [f"graduate{i}@{DOMAIN}" for i in range(3)]
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


@dataclass
class SinkHandler:
    """Counts deliveries by Message-ID; in a burst, holds the victim's DATA unanswered."""

    seen: Counter[str] = field(default_factory=Counter)
    hunting: bool = False  # the next message seen becomes the victim
    victim: str | None = None
    victim_here: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        match = MESSAGE_ID.search(envelope.original_content)
        msgid = match[1].decode() if match else None
        if self.hunting and msgid is not None and not self.released.is_set():
            self.victim = self.victim or msgid
            if msgid == self.victim:
                self.victim_here.set()
                await self.released.wait()  # the daemon is killed meanwhile
                return "421 4.3.0 try again"
        if msgid is not None:
            self.seen[msgid] += 1
        return "250 2.0.0 stored"


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    port: int
    sink_port: int
    accepted: set[str] = field(default_factory=set)
    attempts: int = 0
    refused: int = 0  # connection refused while the daemon was down
    failed: int = 0  # any other failure: no 250
    kills: int = 0
    victim_held: bool = False
    proc: subprocess.Popen[bytes] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def forwarder_cmd() -> list[str]:
    return [sys.executable, "-m", "forwarder.cli"]


def prepare(work: Path, port: int, sink_port: int) -> Path:
    state = work / "state"
    config = work / "forwarder.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\ndomains = ["{DOMAIN}"]\nhostname = "crash.test"\n'
        f'state_dir = "{state}"\nmailbox_host = "127.0.0.1:{sink_port}"\n'
        'log_level = "warning"\n\n[delivery]\nfirst_retry = 1\nmax_retry = 2\n'
        "poll_interval = 0.2\n")
    for address in GRADUATES:
        subprocess.run([*forwarder_cmd(), "account", "add", address, "--config", str(config)],
                       check=True, stdout=subprocess.DEVNULL)
    return config


def spawn(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([*forwarder_cmd(), "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)


async def start_daemon(run: Run, config: Path) -> None:
    run.proc = spawn(config, run.work / "daemon.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError):
            reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
            greeting = await asyncio.wait_for(reader.readline(), 2)
            writer.close()
            if greeting.startswith(b"220"):
                return
        if run.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {run.proc.returncode}; see daemon.log")
        await asyncio.sleep(0.05)
    raise RuntimeError("daemon did not start within 30 s")


def message(msgid: str, rcpt: str) -> bytes:
    return (f"From: JobTeaser <noreply@jobteaser.com>\r\nTo: {rcpt}\r\n"
            f"Subject: crash test\r\nMessage-ID: <{msgid}>\r\n\r\n"
            f"Reset your password.\r\n.dot line\r\n").encode()


async def client(run: Run, number: int) -> None:
    """Send until enough messages were accepted; every attempt has a new Message-ID, so a
    message that got no 250 (the daemon died under it) is never counted as accepted."""
    rng = random.Random(number)
    while len(run.accepted) < run.args.messages:
        run.attempts += 1
        msgid = f"crash-{number}-{run.attempts}@crash.test"
        rcpt = rng.choice(GRADUATES)
        try:
            await aiosmtplib.send(message(msgid, rcpt), sender="noreply@jobteaser.com",
                                  recipients=[rcpt], hostname="127.0.0.1", port=run.port,
                                  timeout=10, start_tls=False)
        except aiosmtplib.SMTPConnectError:  # the daemon is down: not a message sent
            run.refused += 1
            await asyncio.sleep(0.1)
            continue
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            run.failed += 1
            await asyncio.sleep(0.02)
            continue
        run.accepted.add(msgid)


def kill_points(args: argparse.Namespace, rng: random.Random) -> list[int]:
    """After how many 250s each kill comes: `--at` as given, else `kills` random points."""
    if args.at:
        return sorted(args.at)
    span = range(args.messages // 20, args.messages * 19 // 20)
    return sorted(rng.sample(span, args.kills))


async def killer(run: Run, config: Path, rng: random.Random) -> None:
    """SIGKILL at each kill point of the injection, restarting each time."""
    for threshold in kill_points(run.args, rng):
        while len(run.accepted) < threshold:
            await asyncio.sleep(0.002)
        await asyncio.sleep(rng.uniform(0, 0.05))  # mid-DATA, mid-commit, mid-delivery...
        assert run.proc is not None
        run.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(run.proc.wait)
        run.kills += 1
        await start_daemon(run, config)


async def burst(run: Run, config: Path, handler: SinkHandler) -> None:
    """`--burst` kills, each the moment the victim is being delivered (module docstring)."""
    while len(run.accepted) < run.args.burst_after:
        await asyncio.sleep(0.002)
    handler.hunting = True
    try:
        for _ in range(run.args.burst):
            if not await _victim_in_delivery(run, handler):
                run.victim_held = True
                return
            # Cleared before the kill, not after the restart: the restarted daemon may
            # bring the victim back before this loop comes round again.
            handler.victim_here.clear()
            assert run.proc is not None
            run.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(run.proc.wait)
            run.kills += 1
            await start_daemon(run, config)
    finally:
        handler.released.set()


async def _victim_in_delivery(run: Run, handler: SinkHandler) -> bool:
    """Wait until the victim is at the sink (True), or held in the queue (False)."""
    state = run.work / "state"
    deadline = time.monotonic() + 60
    while not handler.victim_here.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the victim {handler.victim} neither came back nor was held")
        if handler.victim is not None and await asyncio.to_thread(
                held_message, state, handler.victim):
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handler.victim_here.wait(), 0.2)
    return True


def held_message(state: Path, msgid: str) -> bool:
    """Whether the message with this Message-ID is held in the queue."""
    conn = sqlite3.connect(state / "queue.sqlite3")
    try:
        rows = conn.execute("SELECT body FROM messages WHERE held = 1").fetchall()
    finally:
        conn.close()
    return any(f"<{msgid}>".encode() in bytes(body) for (body,) in rows)


def held_messages(state: Path) -> int:
    conn = sqlite3.connect(state / "queue.sqlite3")
    try:
        return int(conn.execute("SELECT count(*) FROM messages WHERE held = 1").fetchone()[0])
    finally:
        conn.close()


async def drain(run: Run, handler: SinkHandler, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(handler.seen[m] for m in run.accepted):
            return
        await asyncio.sleep(0.1)


async def main_async(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    handler = SinkHandler()
    loop = asyncio.get_running_loop()
    sink = await loop.create_server(lambda: SMTP(handler, hostname="sink.test"), "127.0.0.1", 0)
    run = Run(args, work, free_port(), sink.sockets[0].getsockname()[1])
    config = prepare(work, run.port, run.sink_port)
    started = time.monotonic()
    rng = random.Random(args.seed)
    try:
        await start_daemon(run, config)
        kill_task = asyncio.create_task(burst(run, config, handler) if args.burst
                                        else killer(run, config, rng))
        await asyncio.gather(*(client(run, n) for n in range(args.clients)))
        await kill_task
        await drain(run, handler, args.drain_timeout)
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(run.proc.wait, 30)
        sink.close()
    delivered = [m for m in run.accepted if handler.seen[m]]
    return {
        "sent": run.attempts - run.refused, "no_250": run.failed,
        "accepted": len(run.accepted), "delivered": len(delivered),
        "lost": len(run.accepted) - len(delivered),
        "duplicated": sum(1 for m in run.accepted if handler.seen[m] > 1),
        "unacknowledged_delivered": sum(1 for m in handler.seen if m not in run.accepted),
        "kills": run.kills, "held": held_messages(work / "state"),
        "victim": handler.victim, "victim_held": run.victim_held,
        "seconds": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="250s to collect")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--at", type=lambda text: [int(n) for n in text.split(",")],
                        default=None, metavar="N,N,...",
                        help="kill after these numbers of 250s instead (e.g. in a burst)")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="instead: N kills driven by events (module docstring)")
    parser.add_argument("--burst-after", type=int, default=150, metavar="N",
                        help="start the burst after this many 250s")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--work", type=Path, default=None, help="kept after the run")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="crash-test-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {"seed": args.seed, **asyncio.run(main_async(args, work))}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 1 if result["lost"] or result["held"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
