"""Session counts shared by the daemon's processes, so that the connection caps
(`max_connections`, `max_connections_per_client`) hold for the daemon as a whole.

The main process creates one shared memory file (memfd) and hands it to each acceptor
process (forwarder/workers.py) with a slot of its own; slot 0 is the main process's. Each
process writes only its own slot, so no lock is needed, and reads every slot to decide.
To admit a session a process first adds it to its own slot, then reads the sums; past a
cap it takes the session back out and refuses. Two processes admitting at the same
instant may therefore both refuse the last place, but both can take it only if the CPU
shows neither the other's addition (a store and a load reordered, nanoseconds): the count
admitted is the configured one, within one per other process at worst.

Per client address the counts form a count-min sketch: two rows of WIDTH counters; an
address adds to one counter in each row, chosen by a keyed hash (BLAKE2b, a random key
each start, so that no client can aim at another's counters), and its count is the
smaller of its two counters. That is never less than the truth, and more only when both
of its counters are shared with other addresses: with 500 addresses connected, one chance
in (500 / WIDTH)**2, about 1 in 17,000, and even then it matters only if those others
hold about a cap's worth of sessions. A client can be refused early, never admitted past
its cap.

A process that dies leaves its counts in its slot: the main process zeroes the slot when
it reaps the process (the kernel has closed that process's connections by then), and the
process that takes the slot over starts from zero.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct

MAGIC = b"fwcount1"
HEADER = struct.Struct("<8sII32s")  # magic, processes, width, hash key
HEADER_SIZE = 64
ROWS = 2
# Counters per row: 256 KiB a row, 512 KiB a process at most (memory is only taken for
# the pages of counters that clients have used).
WIDTH = 1 << 16
TOTAL_SIZE = 8  # one signed 64-bit count of sessions per process
CELL_SIZE = 4  # signed 32-bit counters (a count never exceeds the sessions a process holds)
# The hash gives 64 bits: the low WIDTH bits pick the first row's counter, the high ones
# the second's.
_MASK = WIDTH - 1
_HIGH = 32
MEMO_SIZE = 4096


class CountsError(Exception):
    pass


def table_size(processes: int) -> int:
    return HEADER_SIZE + processes * (TOTAL_SIZE + ROWS * WIDTH * CELL_SIZE)


class SharedCounts:
    """One process's view of the shared table. `admit` and `release` touch only its slot."""

    def __init__(self, buffer: mmap.mmap, slot: int, fd: int | None = None) -> None:
        magic, processes, width, key = HEADER.unpack_from(buffer, 0)
        if magic != MAGIC or width != WIDTH or len(buffer) < table_size(processes):
            raise CountsError("not a session count table of this version")
        if not 0 <= slot < processes:
            raise CountsError(f"slot {slot} out of range (table for {processes} processes)")
        self.fd = fd
        self.slot = slot
        self.processes = processes
        self._buffer = buffer
        self._key = key
        view = memoryview(buffer)
        end = HEADER_SIZE + processes * TOTAL_SIZE
        self._totals = view[HEADER_SIZE:end].cast("q")
        self._cells = view[end:table_size(processes)].cast("i")
        self._cells_offset = end
        self._stride = ROWS * WIDTH  # one process's counters
        self._own = slot * self._stride
        # The hash costs more than the rest of `admit`; clients come back (a relay opens a
        # connection per message), so the last few thousand addresses' counters are kept.
        self._memo: dict[str, tuple[int, int]] = {}

    @classmethod
    def create(cls, processes: int, key: bytes | None = None) -> SharedCounts:
        """The main process's table (slot 0): in a memfd to hand to the acceptors, or, for
        a single process, in anonymous memory. The hash key is random unless given."""
        size = table_size(processes)
        fd: int | None = None
        if processes > 1:
            fd = os.memfd_create("forwarder-sessions")
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        else:
            buffer = mmap.mmap(-1, size)
        HEADER.pack_into(buffer, 0, MAGIC, processes, WIDTH, key or os.urandom(32))
        return cls(buffer, 0, fd)

    @classmethod
    def attach(cls, fd: int, slot: int) -> SharedCounts:
        """An acceptor's view of the table the main process handed it; its slot starts
        from zero (whatever a dead predecessor left is gone)."""
        buffer = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)  # the mapping keeps the memory
        counts = cls(buffer, slot)
        counts.clear(slot)
        return counts

    def cells_of(self, client: str) -> tuple[int, int]:
        """The client's counter in each row (as offsets within a process's slot)."""
        cells = self._memo.get(client)
        if cells is None:
            digest = hashlib.blake2b(client.encode(), key=self._key, digest_size=8).digest()
            n = int.from_bytes(digest, "little")
            cells = n & _MASK, WIDTH + ((n >> _HIGH) & _MASK)
            if len(self._memo) >= MEMO_SIZE:  # many addresses: start again, stay small
                self._memo.clear()
            self._memo[client] = cells
        return cells

    def admit(self, client: str, max_total: int, max_per_client: int) -> tuple[int, int] | None:
        """Count a session for `client` if both caps allow it: its two counters, else
        None (nothing counted)."""
        first, second = self.cells_of(client)
        totals, cells, own, stride = self._totals, self._cells, self._own, self._stride
        totals[self.slot] += 1
        cells[own + first] += 1
        cells[own + second] += 1
        if (sum(totals) > max_total
                or (sum(cells[first::stride]) > max_per_client
                    and sum(cells[second::stride]) > max_per_client)):
            totals[self.slot] -= 1
            cells[own + first] -= 1
            cells[own + second] -= 1
            return None
        return first, second

    def release(self, counted: tuple[int, int]) -> None:
        """Take back a session that `admit` counted."""
        self._totals[self.slot] -= 1
        self._cells[self._own + counted[0]] -= 1
        self._cells[self._own + counted[1]] -= 1

    def total(self) -> int:
        """Sessions open in all processes."""
        return sum(self._totals)

    def count(self, client: str) -> int:
        """Sessions open from `client` in all processes (an upper bound, almost always
        exact: see the module's docstring)."""
        first, second = self.cells_of(client)
        stride = self._stride
        return min(sum(self._cells[first::stride]), sum(self._cells[second::stride]))

    def clear(self, slot: int) -> None:
        """Forget every session of a process that is gone (main process: on reaping it)."""
        self._totals[slot] = 0
        size = self._stride * CELL_SIZE
        start = self._cells_offset + slot * size
        self._buffer[start:start + size] = bytes(size)

    def close_fd(self) -> None:
        """No more processes to hand the table to (the mapping stays usable)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.close_fd()
        self._totals.release()
        self._cells.release()
        self._buffer.close()
