"""Free space kept back for the writes that must never fail for lack of it.

On a full disk, SQLite still needs a few free pages to commit anything, even a delete
(its write-ahead log grows), and a daemon that cannot record a delivery's outcome sends
the message again. So the state directory holds a preallocated file (`space-reserve`,
`limits.disk_reserve` octets, 8 MiB by default) that is given back to the filesystem
when a write that frees or settles mail fails for lack of space: a delivery's outcome,
the recovery at start-up, `forwarder queue delete`. New mail never uses it: while the
reserve is gone (given back and not yet remade, for lack of space), the daemon answers
MAIL with `452 4.3.1`, as Postfix does below its queue_minfree, and remakes the reserve as
soon as the space is there again.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

RESERVE_FILE = "space-reserve"


class SpaceReserve:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def present(self) -> bool:
        """Whether the reserve is in place (always, when none is configured)."""
        if self.size <= 0:
            return True
        try:
            return self.path.stat().st_size >= self.size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Make the reserve if it is missing; False if there is not the space for it."""
        if self.present:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        try:
            os.posix_fallocate(fd, 0, self.size)  # blocks allocated, nothing written
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.release()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        os.close(fd)
        return True

    def release(self) -> bool:
        """Give the reserve back to the filesystem; True if there was one."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return True
