"""Several accepting processes on one listening socket, so SMTP parsing uses every core.

One Python process is bound to one core, and under load the daemon is CPU-bound in the
SMTP front (docs/performance.md). The main process delivers, recovers the queue, talks to
systemd and serves /metrics, and starts `acceptors` extra processes that inherit the
listening socket and only accept: the kernel hands each new connection to whichever of
them calls accept() first, so a busy one takes fewer. The main process accepts too, but
only while no acceptor serves the socket (at start-up, and when all have died): when it
kept a share of the connections, its loop, which also delivers everything, was the first
to saturate (docs/performance.md, "Many sessions: who accepts"). An acceptor commits each
message to the same SQLite queue (WAL allows one writer at a time, readers always) and
then tells the main process over a socketpair that
work is due; the main process's scanner leases it like any retry, so what is accepted is
delivered exactly as in a single process, and a crash of either side loses nothing.

Only the daemon's own processes share the socket: the main process binds it once, without
SO_REUSEPORT, so a second daemon started on the same address (another state directory, a
mistaken second unit) fails with "address already in use" instead of silently taking part
of the connections into its own queue. The acceptors inherit that one socket.

An acceptor dies with the main process: it asks the kernel for SIGKILL when its parent
dies (PR_SET_PDEATHSIG), which no busy or stopped event loop can delay, so a restart after
a crash never meets an orphan holding the port. That is a crash of the whole daemon: what
was acknowledged is committed, a session cut before its 250 is retried by its client. The
listening socket is not inherited at exec but handed over the control socketpair
(SCM_RIGHTS) once the acceptor has armed that signal: an acceptor still starting when the
main process dies never held the port. The socketpair is SOCK_SEQPACKET: messages keep
their boundaries, and its end-of-file stops an acceptor gracefully where the signal is not
available.

The connection caps are counted in a table all processes share (forwarder/sharedcounts.py):
slot 0 is the main process's, acceptor i has slot i + 1, and a dead acceptor's slot is
zeroed when it is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from forwarder import log
from forwarder.config import HostPort
from forwarder.metrics import Metrics, resident_memory_bytes
from forwarder.sharedcounts import SharedCounts

LOG = log.get("forwarder.workers")

ARMED = b"a"  # acceptor -> main: it dies with us now; send the listening socket
LISTENER = b"l"  # main -> acceptor: the listening socket, as SCM_RIGHTS
READY = b"r"
WAKE = b"w"
METRICS = b"m"
REPORT_INTERVAL = 1.0
RESPAWN_DELAY = 1.0
START_TIMEOUT = 60.0
REPORTED_PROBLEMS = 10
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StartError(Exception):
    """The daemon cannot start: one line for the log, and exit 1."""


class ListenError(StartError):
    """The listening address cannot be had."""


@dataclass(frozen=True)
class Inherited:
    """What an acceptor process is handed by the main process: fds and its slot as hidden
    `serve` flags, then the listening socket (`listen_fd`, see `join_main`)."""

    control_fd: int
    counts_fd: int
    slot: int
    listen_fd: int | None = None

    def argv(self) -> list[str]:
        return ["--control-fd", str(self.control_fd), "--counts-fd", str(self.counts_fd),
                "--slot", str(self.slot)]

    def joined(self) -> Inherited:
        """The same, with the listening socket the main process hands over (`join_main`)."""
        return replace(self, listen_fd=join_main(self.control_fd))


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
        self, count: int, argv: Sequence[str], listener: socket.socket, counts: SharedCounts,
        on_wake: Callable[[], None], metrics: Metrics, stop_timeout: float,
        on_serving: Callable[[int], None] | None = None,
    ) -> None:
        self.count = count
        # Told how many acceptors serve the socket whenever that changes (one became
        # ready, or one died): the main process accepts only while none does.
        self.on_serving = on_serving
        self.argv = list(argv)
        self.listener = listener
        self.counts = counts
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
        assert self.counts.fd is not None
        given = Inherited(theirs.fileno(), self.counts.fd, index + 1)
        proc = await asyncio.create_subprocess_exec(
            # -P: the working directory is not put on sys.path, so a file there named
            # like one of our modules is never imported in its place.
            sys.executable, "-P", "-m", "forwarder.cli", "serve", *self.argv, *given.argv(),
            pass_fds=(given.control_fd, given.counts_fd))
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
        elif kind == ARMED:
            with contextlib.suppress(OSError):  # gone already: its exit is being watched
                socket.send_fds(child.link, [LISTENER], [self.listener.fileno()])
        elif kind == READY:
            child.ready.set()
            LOG.info("acceptor_ready", index=child.index, pid=child.proc.pid)
            self._serving_changed()
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
        # Its connections died with it: free their places under the caps now.
        self.counts.clear(child.index + 1)
        self.metrics.forget(f"acceptor-{child.index}")
        if self._stopping:
            return
        self._serving_changed()
        # Like Postfix's master(8): a dead worker is replaced, after a pause so a worker
        # that cannot start does not spin.
        LOG.error("acceptor_exited", index=child.index, pid=child.proc.pid, code=code)
        await asyncio.sleep(RESPAWN_DELAY)
        if not self._stopping:
            await self._spawn(child.index)

    @property
    def serving(self) -> int:
        """How many acceptors are ready and alive."""
        return sum(1 for c in self.children.values()
                   if c.ready.is_set() and c.proc.returncode is None)

    def _serving_changed(self) -> None:
        if self.on_serving is not None and not self._stopping:
            self.on_serving(self.serving)

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


# The main process is woken at most this often by an acceptor's commits. Woken for each
# message, at one session it leased, delivered and settled each in transactions of its
# own (1.1-1.7 ms of CPU a message, on the two cores the acceptor needs too); a wake
# every 20 ms hands it the messages of that spell together (0.4-0.7 ms a message), and
# the acceptor's one-session rate was higher in 13 pairs of 15 (docs/performance.md,
# "Waking the main process"). A message then waits at most 20 ms more for delivery.
WAKE_SPACING = 0.02


def wake_wait(now: float, woken_at: float, spacing: float = WAKE_SPACING) -> float:
    """Seconds until the next wake may go: none after a quiet spell, else the rest of
    `spacing` since the last (`woken_at`)."""
    return max(0.0, woken_at + spacing - now)


class MainLink:
    """The acceptor's side: tell the main process we are ready and that work is due, send
    our SMTP counters, and notice when the main process is gone."""

    def __init__(self, fd: int, on_lost: Callable[[], None]) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.on_lost = on_lost
        self._wake_pending = False
        self._woken_at = float("-inf")  # the loop's time of the last wake sent

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
        """Work is due. A wake after a quiet spell goes at once (next turn of the loop);
        one within WAKE_SPACING of the last waits for the end of that spell, and every
        commit meanwhile rides on it."""
        if not self._wake_pending:
            self._wake_pending = True
            loop = asyncio.get_running_loop()
            loop.call_later(wake_wait(loop.time(), self._woken_at), self._flush_wake)

    def _flush_wake(self) -> None:
        self._wake_pending = False
        self._woken_at = asyncio.get_running_loop().time()
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


class ProcessGroup:
    """The daemon's processes as one of them sees them: in the main process, the listening
    socket it binds and the acceptors it starts (if any); in an acceptor, the socket it was
    handed and its link to the main process; in both, the caps table they share."""

    def __init__(self, acceptors: int, argv: Sequence[str] | None,
                 inherited: Inherited | None) -> None:
        self.size = 1 + acceptors if argv is not None and acceptors > 0 else 1
        self.argv = argv
        self.inherited = inherited
        self.counts = (SharedCounts.create(self.size) if inherited is None
                       else SharedCounts.attach(inherited.counts_fd, inherited.slot))
        self.acceptors: Acceptors | None = None
        self.link: MainLink | None = None

    @property
    def is_acceptor(self) -> bool:
        return self.inherited is not None

    def listener(self, where: HostPort) -> socket.socket:
        """The main process binds (a busy address fails here); an acceptor takes the
        socket it was handed."""
        if self.inherited is None:
            return bind_listener(where)
        assert self.inherited.listen_fd is not None  # handed over by Inherited.joined
        return socket.socket(fileno=self.inherited.listen_fd)

    def join_main(self, on_lost: Callable[[], None]) -> MainLink:
        """In an acceptor: the link to the main process, started and reported ready."""
        assert self.inherited is not None
        self.link = MainLink(self.inherited.control_fd, on_lost=on_lost)
        self.link.start()
        self.link.ready()
        return self.link

    def wake_main(self) -> None:
        if self.link is not None:
            self.link.wake()

    async def start_acceptors(self, listener: socket.socket, on_wake: Callable[[], None],
                              metrics: Metrics, stop_timeout: float,
                              on_serving: Callable[[int], None] | None = None) -> None:
        if self.size == 1 or self.argv is None:
            return
        self.acceptors = Acceptors(self.size - 1, self.argv, listener, self.counts, on_wake,
                                   metrics, stop_timeout, on_serving)
        await self.acceptors.start()

    def signal_acceptors(self, sig: int) -> None:
        if self.acceptors is not None:
            self.acceptors.signal_all(sig)

    async def stop_acceptors(self) -> None:
        if self.acceptors is not None:
            await self.acceptors.stop()

    def close(self, metrics: Metrics) -> None:
        """Last at stop: an acceptor's final counters; the caps table's fd (the mapping
        stays for what may still run)."""
        if self.link is not None:
            self.link.report(metrics)
            self.link.close()
        self.counts.close_fd()

    def acceptor_pids(self) -> list[int]:
        if self.acceptors is None:
            return []
        return sorted(child.proc.pid for child in self.acceptors.children.values()
                      if child.proc.returncode is None)


def bind_listener(where: HostPort) -> socket.socket:
    """The daemon's one listening socket, bound but not yet listening (asyncio's
    create_server calls listen() with the configured backlog). Bound first thing at
    start-up, so that a busy address fails before anything else is opened.

    SO_REUSEADDR (as every MTA sets it) lets a restart bind while connections of the
    previous run are in TIME_WAIT; it does not let two sockets listen on one address.
    SO_REUSEPORT would, and is deliberately not set. The acceptors inherit this socket
    (not reopened, so port 0 works)."""
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio does: IPv4 has a listen line of its own
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((where.host, where.port))
    except OSError as exc:
        sock.close()
        raise listen_error(f"listen on {where}", exc,
                           "another mail server, or another forwarder, listens there") from None
    sock.setblocking(False)
    return sock


def listen_error(what: str, exc: OSError, hint: str) -> ListenError:
    """One line for the log: what could not be done, why, and (address in use) by whom."""
    if exc.errno == errno.EADDRINUSE:
        return ListenError(f"cannot {what}: address already in use ({hint})")
    return ListenError(f"cannot {what}: {os.strerror(exc.errno or 0)}")


def join_main(control_fd: int) -> int:
    """In an acceptor, first thing: arrange to die with the main process, then ask it for
    the listening socket; its fd. Raises StartError if the main process is gone."""
    control = socket.socket(fileno=control_fd)
    try:
        die_with_parent(control)
        control.settimeout(START_TIMEOUT)
        control.send(ARMED)
        try:
            message, fds, _, _ = socket.recv_fds(control, 16, 1)
        except OSError as exc:  # TimeoutError included
            raise StartError(f"no listening socket from the main process: {exc}") from None
        if message != LISTENER or len(fds) != 1:
            raise StartError("the main process is gone")  # end of file: it died
        return fds[0]
    finally:
        control.detach()  # the fd stays open for MainLink


def die_with_parent(control: socket.socket) -> None:
    """Be killed when the main process dies (Linux prctl(2) PR_SET_PDEATHSIG), even if that
    happened before this call.

    The control socketpair was made by the main process, so its peer credentials name it:
    a parent pid that is not that one means the main process is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
                      ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:  # not Linux: the socketpair's EOF stops us
        LOG.warning("parent_death_signal_unavailable", error=str(exc))
        return
    creds = control.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if os.getppid() != struct.unpack("3i", creds)[0]:
        raise StartError("the main process is gone")
