"""When an SMTP connection's socket is read: the adapter's flow control (smtpserver.py).

Two reasons stop reading, each resumed on its own, and reading resumes only when neither
holds: input backed up past _HIGH_WATER octets (a handler working, a client not reading
our replies), and a burst of big reads in one turn of the event loop.
"""

from __future__ import annotations

import asyncio

# Past this much input held (a command waiting, replies backed up), stop reading.
HIGH_WATER = 65536
# Reads of at least this size count towards a burst (below: command traffic, never close
# to one), and a burst past BURST octets in one turn of the event loop yields the loop.
BIG_READ = 65536
BURST = 512 * 1024


class ReadGate:
    """Pauses and resumes reading one connection's transport (module docstring)."""

    __slots__ = ("_burst", "_yielding", "loop", "paused", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None  # set by the adapter, then None
        self.paused = False  # input backed up past HIGH_WATER
        self._burst = 0  # octets of big reads in this turn of the event loop
        self._yielding = False  # reading paused until the next turn (`count_burst`)

    def count_burst(self, octets: int) -> None:
        """uvloop (libuv) reads a busy socket up to 32 times in one turn of the event loop,
        each read handing us up to 256 KiB: a client streaming a big body would hold the
        loop for tens of milliseconds, every other session waiting. Past BURST octets in
        one turn, this connection stops reading until the next turn."""
        if self._burst == 0:
            self.loop.call_soon(self._burst_over)
        self._burst += octets
        if self._burst > BURST and not self._yielding and self.transport is not None:
            self._yielding = True
            self.transport.pause_reading()

    def _burst_over(self) -> None:
        self._burst = 0
        if self._yielding:
            self._yielding = False
            if not self.paused and self.transport is not None:
                self.transport.resume_reading()

    def flow(self, buffered: int) -> None:
        """Input waits while a handler works or the client is not reading our replies:
        past HIGH_WATER octets of it (`buffered`), stop reading the socket (TCP then holds
        the client back), so a flood of pipelined commands costs bounded memory."""
        if self.transport is None:
            return
        if not self.paused and buffered > HIGH_WATER:
            self.paused = True
            self.transport.pause_reading()
        elif self.paused and buffered <= HIGH_WATER // 2:
            self.paused = False
            if not self._yielding:
                self.transport.resume_reading()
