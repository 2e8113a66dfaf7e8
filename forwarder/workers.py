"""Several accepting processes on one listening socket, so SMTP parsing uses every core.

One Python process is bound to one core, and under load the daemon is CPU-bound in the
SMTP front (docs/performance.md). The main process keeps everything it always did (it
accepts mail, delivers, recovers the queue, talks to systemd, serves /metrics) and starts
`acceptors` extra processes that inherit the listening socket and only accept: the kernel
hands each new connection to whichever process calls accept() first, so a busy process
takes fewer. An acceptor commits each message to the same SQLite queue (WAL allows one
writer at a time, readers always) and then tells the main process over a socketpair that
work is due; the main process's scanner leases it like any retry, so what is accepted is
delivered exactly as in a single process, and a crash of either side loses nothing.

The socketpair is SOCK_SEQPACKET: messages keep their boundaries, and when the main process
dies (even by SIGKILL) the acceptor reads end-of-file and stops, so no orphan keeps taking
mail on a port nobody delivers from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from forwarder import log
from forwarder.metrics import Metrics, resident_memory_bytes

LOG = log.get("forwarder.workers")

READY = b"r"
WAKE = b"w"
METRICS = b"m"
REPORT_INTERVAL = 1.0
RESPAWN_DELAY = 1.0
START_TIMEOUT = 60.0
REPORTED_PROBLEMS = 10


def _receive(sock: socket.socket, size: int) -> bytes | None:
    """One message from a non-blocking socketpair: None if there is none now, b"" at the
    end (the other process is gone: a reset counts as the end too)."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    link: socket.socket
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Acceptors:
    """The main process's side: starts, watches, signals and stops the acceptors."""

    def __init__(
        self, count: int, argv: Sequence[str], listener: socket.socket,
        on_wake: Callable[[], None], metrics: Metrics, stop_timeout: float,
    ) -> None:
        self.count = count
        self.argv = list(argv)
        self.listener = listener
        self.on_wake = on_wake
        self.metrics = metrics
        self.stop_timeout = stop_timeout
        self.children: dict[int, _Child] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)
        await asyncio.wait_for(
            asyncio.gather(*(c.ready.wait() for c in self.children.values())), START_TIMEOUT)

    async def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (self.listener.fileno(), theirs.fileno())
        proc = await asyncio.create_subprocess_exec(
            # -P: the working directory is not put on sys.path, so a file there named
            # like one of our modules is never imported in its place.
            sys.executable, "-P", "-m", "forwarder.cli", "serve", *self.argv,
            "--listen-fd", str(fds[0]), "--control-fd", str(fds[1]), pass_fds=fds)
        theirs.close()
        ours.setblocking(False)
        child = _Child(index, proc, ours)
        self.children[index] = child
        asyncio.get_running_loop().add_reader(ours.fileno(), self._read, child)
        task = asyncio.create_task(self._watch(child))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        LOG.info("acceptor_started", index=index, pid=proc.pid)

    def _read(self, child: _Child) -> None:
        while (data := _receive(child.link, 65536)) is not None:
            if not data:
                asyncio.get_running_loop().remove_reader(child.link.fileno())
                return
            self._handle(child, data)

    def _handle(self, child: _Child, data: bytes) -> None:
        kind, payload = data[:1], data[1:]
        if kind == WAKE:
            self.on_wake()
        elif kind == READY:
            child.ready.set()
        elif kind == METRICS:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                report = json.loads(payload)
                source = f"acceptor-{child.index}"
                self.metrics.absorb(source, report["totals"], int(report["open"]),
                                    int(report.get("rss", 0)))
                log.remember_problems(report.get("problems", []), source)

    async def _watch(self, child: _Child) -> None:
        code = await child.proc.wait()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(child.link.fileno())
        child.link.close()
        self.metrics.forget(f"acceptor-{child.index}")
        if self._stopping:
            return
        # Like Postfix's master(8): a dead worker is replaced, after a pause so a worker
        # that cannot start does not spin.
        LOG.error("acceptor_exited", index=child.index, pid=child.proc.pid, code=code)
        await asyncio.sleep(RESPAWN_DELAY)
        if not self._stopping:
            await self._spawn(child.index)

    def signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM: each acceptor finishes its transactions in flight, then exits."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [c.proc for c in self.children.values() if c.proc.returncode is None]
        if procs:
            _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                                         timeout=self.stop_timeout + 5)
            if late:
                self.signal_all(signal.SIGKILL)
                await asyncio.gather(*(p.wait() for p in procs))
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


class MainLink:
    """The acceptor's side: tell the main process we are ready and that work is due, send
    our SMTP counters, and notice when the main process is gone."""

    def __init__(self, fd: int, on_lost: Callable[[], None]) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.on_lost = on_lost
        self._wake_pending = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        data = _receive(self.sock, 16)
        if data is not None and not data:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            LOG.error("main_process_gone")
            self.on_lost()

    def _send(self, message: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(message)

    def ready(self) -> None:
        self._send(READY)

    def wake(self) -> None:
        """Work is due; several commits in one loop iteration send one datagram."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._flush_wake)

    def _flush_wake(self) -> None:
        self._wake_pending = False
        self._send(WAKE)

    def report(self, metrics: Metrics) -> None:
        """Counters, open sessions, memory, and the last warnings and errors logged since
        the last report (for `forwarder status`, which the main process answers; a few, so
        the datagram stays well inside what the main process reads at once)."""
        doc = {"totals": metrics.front_totals(), "open": metrics.open_sessions,
               "rss": resident_memory_bytes(),
               "problems": log.drain_problems()[-REPORTED_PROBLEMS:]}
        self._send(METRICS + json.dumps(doc).encode())

    async def report_loop(self, metrics: Metrics) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.report(metrics)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The listener shared with the acceptors (inherited, not reopened, so port 0 works).

    SO_REUSEPORT lets a main process restarted after a crash bind the port while an
    acceptor of the dead one is still finishing its sessions (it stops as soon as it sees
    the main process gone); whatever that acceptor still commits goes to the same queue."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=True)
    sock.setblocking(False)
    return sock
