"""Spool files: the bodies too big to keep in memory or in a queue row.

A body past the session's `spill_at` octets is written, as it arrives and in its wire form
(CRLF, dot-stuffed, as the client sent it), to `spool/incoming/<pid>.<n>`; when its
message is queued, the file is fsync'd and renamed to `spool/<queue id>`, and the spool
directory fsync'd, before the queue row that names it is committed: the `250` still comes
only once everything is on disk (Postfix's cleanup writes its queue file the same way,
while receiving). The row keeps our own header fields (`messages.body`) and a flag
(`messages.spooled`); delivery sends those fields, then the file as it is.

Leftovers are found by the sweep: an incoming file whose process is gone or that is older
than any transfer can take, a spool file no row names (a crash between the rename and the
commit, or after the commit that deleted its row). Files younger than `ORPHAN_AGE` are
left alone: another process may be about to commit the row that names them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from forwarder.smtpbody import unstuff

# A spool file no row names is removed once it is this old (seconds): longer than any
# commit can take after its rename (busy_timeout is seconds).
ORPHAN_AGE = 3600.0
CHUNK = 1024 * 1024
_COUNTER = itertools.count()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFile:
    """A body being received (`smtpbody.Spill`): written as it arrives, fsync'd later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write(self, data: bytes | bytearray) -> None:
        if self._fd is None:
            raise OSError(9, "spool file closed", str(self.path))  # EBADF
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Spool:
    """The spool directory of one queue (`<state dir>/spool`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"

    def ensure(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)

    def open_incoming(self) -> SpoolFile:
        """A new file for a body being received (on the event loop: an open(2))."""
        try:
            return SpoolFile(self.incoming / f"{os.getpid()}.{next(_COUNTER)}")
        except FileNotFoundError:
            self.ensure()  # removed under us (an administrator's cleanup)
            return SpoolFile(self.incoming / f"{os.getpid()}.{next(_COUNTER)}")

    def path(self, queue_id: str) -> Path:
        return self.root / queue_id

    def commit(self, incoming: Path, queue_id: str) -> Path:
        """Make a received body durable under its queue id (in a worker thread): fsync the
        file, rename it into the spool, fsync the spool directory. Raises OSError."""
        fd = os.open(incoming, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        target = self.path(queue_id)
        os.rename(incoming, target)
        _fsync_dir(self.root)
        return target

    def remove(self, queue_ids: Iterable[str]) -> None:
        for queue_id in queue_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(queue_id))

    def sweep(self, named: set[str], now: float | None = None) -> int:
        """Remove leftovers (module docstring); `named`: the ids of spooled rows. Returns
        how many files went."""
        now = time.time() if now is None else now
        removed = 0
        for entry in _entries(self.root):
            if entry.is_file() and entry.name not in named and _age(entry, now) > ORPHAN_AGE:
                removed += _unlink(entry.path)
        for entry in _entries(self.incoming):
            pid = entry.name.partition(".")[0]
            if not _alive(pid) or _age(entry, now) > ORPHAN_AGE:
                removed += _unlink(entry.path)
        return removed


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as found:
            return list(found)
    except FileNotFoundError:
        return []


def _age(entry: os.DirEntry[str], now: float) -> float:
    try:
        return now - entry.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_head(path: Path, octets: int) -> bytes:
    """The first `octets` of a spool file (in a worker thread)."""
    with open(path, "rb") as fh:
        return fh.read(octets)


def read_chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    """A spool file in chunks (each `next` in a worker thread)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def read_unstuffed(path: Path) -> bytes:
    """A whole spool file, unstuffed (in a worker thread, for the checks that read whole
    messages; the caller bounds how many are in memory at once)."""
    with open(path, "rb") as fh:
        return unstuff(fh.read())
