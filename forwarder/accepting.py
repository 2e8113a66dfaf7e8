"""Where a process takes SMTP connections: its server on the listening socket.

The main process delivers every message (forwarder/workers.py). Once an acceptor serves
the socket, new connections are the acceptors': when the main process kept a share of
them, its loop, which also delivers everything, was the first to saturate at 200 sessions
(docs/performance.md, "Many sessions: who accepts"). With none left (all died, being
started again) the main process accepts until one is back. Sessions already open go on to
their end either way.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from forwarder import log

LOG = log.get("forwarder.accepting")


class Accepting:
    """This process's SMTP server on `listener`, which it can stop and start again. With
    `shared` (the main process of several), it serves a copy of the socket (dup): closing
    the server closes the copy, and the socket stays open for acceptors started later."""

    def __init__(self, listener: socket.socket, backlog: int,
                 protocol: Callable[[], asyncio.Protocol], shared: bool) -> None:
        self.listener = listener
        self.backlog = backlog
        self.protocol = protocol
        self.shared = shared
        self.server: asyncio.Server | None = None
        self.closed = False
        self._resuming: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = self.listener.dup() if self.shared else self.listener
        # create_server calls listen() again with its own default of 100 unless told: every
        # process passes the configured backlog, or the last one to start would reset it.
        self.server = await asyncio.get_running_loop().create_server(
            self.protocol, sock=sock, backlog=self.backlog)

    def acceptors_serving(self, count: int) -> None:
        """`count` acceptors now serve the socket: stop taking connections here if there
        is one, start again if there is none."""
        if self.closed:
            return
        if count > 0 and self.server is not None:
            self.server.close()
            self.server = None
            LOG.info("main_accepting", accepting=False, acceptors=count)
        elif count == 0 and self.server is None and not self._resuming:
            task = asyncio.create_task(self._resume())
            self._resuming.add(task)
            task.add_done_callback(self._resuming.discard)

    async def _resume(self) -> None:
        await self.start()
        if self.closed:  # stopped meanwhile
            self.close()
            return
        LOG.warning("main_accepting", accepting=True, acceptors=0)

    def close(self) -> None:
        self.closed = True
        if self.server is not None:
            self.server.close()
            self.server = None
