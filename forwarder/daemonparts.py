"""The daemon's parts that hold no state of their own: start-up errors and the state
directory's lock, the resolver and router a configuration asks for, the garbage
collector's and the allocator's tuning, the disk space check, and the queue's recovery
and spool sweep at start."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import gc
import os
import platform
import sqlite3
from collections.abc import Callable
from pathlib import Path

from forwarder import log
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.dns import CachingResolver, MxRouter
from forwarder.faults import FaultRecord
from forwarder.front import Front
from forwarder.queue import Queue
from forwarder.routing import MailRouter

LOG = log.get("forwarder.daemon")


class StateLockError(Exception):
    pass


def start_error(exc: BaseException, settings: Settings) -> str:
    """One line saying why start-up failed, naming the file or address at fault."""
    if isinstance(exc, sqlite3.DatabaseError):
        return f"database in {settings.state_dir}: {exc}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def lock_state_dir(state_dir: Path) -> int:
    """One daemon per state directory: a second one would deliver the same queue twice."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "forwarder.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLockError(f"another forwarder is running on {state_dir}") from None
    return fd


def mail_router(settings: Settings, resolver: CachingResolver | None) -> MailRouter:
    mx = None if resolver is None else MxRouter(resolver, port=settings.delivery.mx_port)
    return MailRouter(settings.mailbox_host, settings.smarthost, mx)


def make_resolver(settings: Settings, clock: Clock) -> CachingResolver | None:
    servers = settings.dns_servers
    try:
        if servers:
            return CachingResolver([s.host for s in servers], port=servers[0].port,
                                   now=clock.now)
        return CachingResolver(use_system_config=True, now=clock.now)
    except Exception as exc:  # no /etc/resolv.conf: MX delivery deferred, not fatal
        LOG.error("dns_unavailable", error=str(exc))
        return None


async def check_space(queue: Queue, front: Front | None, acceptor: bool) -> None:
    """The space reserve (forwarder/queue/reserve.py): the main process remakes it
    when it is missing; while it cannot (or, in an acceptor, while it is missing),
    new mail is refused (`452 4.3.1` at MAIL), so what is queued can still settle."""
    reserve = queue.reserve
    if queue.reserve_released:
        LOG.warning("disk_reserve_used", times=queue.reserve_released)
        queue.reserve_released = 0
    check: Callable[[], bool] = (lambda: reserve.present) if acceptor else reserve.ensure
    present = await asyncio.to_thread(check)
    assert front is not None
    if present == front.space_short:
        front.space_short = not present
        if present:
            LOG.info("disk_space_back", reserve=reserve.size)
        else:
            LOG.error("disk_short", reserve=reserve.size, state_dir=str(reserve.path.parent))


async def recover_queue(queue: Queue, faults: FaultRecord, now: float, record: bool) -> None:
    """Leases the last run left: blamed on their messages only if that run died of a
    fault of its own (forwarder/faults.py), never for a kill from outside. Then the fault
    report is armed for this run (`record`: `forwarder serve`) or cleared."""
    report = await asyncio.to_thread(faults.read)
    if report is not None:
        LOG.warning("previous_run_faulted", report=report)
    recovered, held = await queue.recover(now, faulted=report is not None)
    if recovered or held:
        LOG.warning("queue_recovered", recipients=recovered, held=held,
                    faulted=report is not None)
    await asyncio.to_thread(faults.arm if record else faults.clear)


async def sweep_spool(queue: Queue) -> None:
    """Spool files left by a crash or by a session cut off (forwarder/queue/spool.py)."""
    try:
        removed = await queue.sweep_spool()
    except (OSError, sqlite3.Error) as exc:
        LOG.error("spool_sweep_failed", error=str(exc))
        return
    if removed:
        LOG.warning("spool_swept", files=removed)


# Python's cyclic garbage collector runs a young-generation pass every 700 allocations,
# and under load a message allocates thousands of objects (sessions, futures, tasks), most
# of them freed by reference counting anyway. Collecting every 20,000 allocations, with
# the objects of start-up frozen out of every pass, gave +19 % accepted messages a second
# (docs/performance.md); cyclic garbage just waits a little longer.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# glibc's allocator (mallopt(3)). A body arrives in reads of up to 256 KiB, and the read,
# its copies and the piece being checked are buffers of that size. glibc serves them from
# the heap once its dynamic threshold has risen past them, but gives the top of the heap
# back to the kernel whenever twice that threshold is free, so the next message's buffers
# fault their pages in again: 600-1,500 minor faults a 5 MB message in the acceptor.
# Buffers up to 1 MiB from the heap and up to 8 MiB of free heap kept: 12 faults a
# message, 1.5-3 ms less of the acceptor's CPU a 5 MB message (a sixth or so), the same
# peak RSS (docs/performance.md, "Fourth pass"). Set in the environment, glibc's own
# MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ win.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 1 << 20),
                   (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 8 << 20))


def tune_malloc() -> bool:
    """Whether glibc's allocator was tuned (not elsewhere, nor against the environment).
    Setting either threshold turns glibc's dynamic adjustment off, so both are set."""
    if platform.libc_ver()[0] != "glibc" or any(env in os.environ
                                                for _, env, _ in MALLOC_SETTINGS):
        return False
    try:  # a tuning, never a reason not to start (checked under MemoryDenyWriteExecute)
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        return all(mallopt(param, value) == 1 for param, _, value in MALLOC_SETTINGS)
    except (OSError, AttributeError):
        return False
