"""What a delivered message costs the delivering process, with and without RFC 2920
pipelining (forwarder/smtppipe.py): the outbound client (`Sender`, its connection pool)
sends 2 KB messages over `SESSIONS` concurrent pooled sessions to Postfix's smtp-sink on
loopback, which offers PIPELINING or, with `-p`, does not. Prints messages a second and
this process's CPU per message, the best of several runs each, alternating the two.

    PYTHONPATH=. .venv/bin/python bench/pipeline_cost.py [MESSAGES] [SESSIONS] [RUNS]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from forwarder import log
from forwarder.config import HostPort, Settings
from forwarder.dns import Destination
from forwarder.smtpclient import ConnectionPool, Outgoing, OutRcpt, Sender

BODY = b"Subject: bench\r\n\r\n" + b"x" * 78 + b"\r\n" * 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def deliver(port: int, messages: int, sessions: int) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds for `messages` over `sessions`."""
    settings = Settings(listen=HostPort("127.0.0.1", 0), domains=("bench.test",),
                        hostname="bench.test", state_dir=Path(tempfile.gettempdir()),
                        postmaster="postmaster@bench.test")
    pool = ConnectionPool(settings)
    sender = Sender(settings.delivery, pool)
    dest = Destination("sink.test", "127.0.0.1", port)
    out = Outgoing("noreply@bench.test", (OutRcpt("someone@sink.test"),))
    left = messages

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            result = await sender.send(dest, out, BODY)
            assert result["someone@sink.test"].status == "2.0.0", result

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await pool.close()
    return wall, cpu


def run(pipelining: bool, messages: int, sessions: int) -> tuple[float, float]:
    port = free_port()
    flags = [] if pipelining else ["-p"]
    if os.geteuid() == 0:
        flags += ["-u", "nobody"]  # smtp-sink will not run as root
    sink = subprocess.Popen(["smtp-sink", *flags, f"127.0.0.1:{port}", "1000"])
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        return uvloop.run(deliver(port, messages, sessions))
    finally:
        sink.terminate()
        sink.wait()


def main() -> None:
    log.configure("json", "warning")
    given, defaults = sys.argv[1:4], ["5000", "20", "5"]
    messages, sessions, runs = (int(a) for a in [*given, *defaults[len(given):]])
    best: dict[bool, tuple[float, float]] = {}
    for _ in range(runs):
        for pipelining in (False, True):
            wall, cpu = run(pipelining, messages, sessions)
            old = best.get(pipelining, (wall, cpu))
            best[pipelining] = (min(old[0], wall), min(old[1], cpu))
    for pipelining, (wall, cpu) in best.items():
        label = "pipelined " if pipelining else "lock step "
        print(f"{label}: {messages / wall:7.0f} msg/s, {cpu / messages * 1e6:6.0f} us CPU "
              f"a message ({messages} messages, {sessions} sessions, best of {runs})")


if __name__ == "__main__":
    main()
