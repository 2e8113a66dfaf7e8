"""A spooled body sent by the kernel: sendfile(2) from the spool file to the socket.

A spool file already holds the message in its wire form (CRLF, dot-stuffed: see
forwarder/queue/spool.py), so on a plain TCP connection nothing in it needs our eyes on
the way out. sendfile(2) hands the file's cached pages to the socket: no read into a
buffer of ours, no copy from it into the socket, no worker thread per piece. Measured on
200 x 5 MB relayed at 20 sessions, that was a third of the main process's CPU a message
(docs/performance.md, "The edges").

It only applies where the bytes go out as they are: not over TLS (the transport encrypts
what we write), and only while the transport holds nothing unsent (we write around it, so
anything it still held would come out after our bytes). After a 354 both hold: the reply
means the server read our DATA, and nothing was written since. The socket is written
through a duplicate descriptor, so the event loop can wait for it to take more
(`add_writer`) without taking it for the transport's own. Each sendfile(2) moves at most
`STEP` octets, so no call runs long on the event loop, whatever the message's size.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

# Octets one sendfile(2) call may move: a bound on one call's time on the event loop.
STEP = 1024 * 1024


def plain_socket(transport: Any) -> int | None:
    """The descriptor of `transport`'s socket if we may write to it directly: a plain TCP
    connection (no TLS layer) whose transport holds nothing unsent; None otherwise."""
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_write_buffer_size():
        return None
    sock = transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


async def send(fd: int, prefix: bytes, file_fd: int, size: int) -> None:
    """`prefix`, then the first `size` octets of the file open as `file_fd`, to the socket
    `fd` (see `plain_socket`), as the socket takes them. Raises OSError (ConnectionError
    when the peer went away); the caller bounds the time."""
    loop = asyncio.get_running_loop()
    own = os.dup(fd)  # the loop refuses to watch a descriptor a transport owns
    try:
        view = memoryview(prefix)
        while view:
            try:
                view = view[os.write(own, view):]
            except BlockingIOError:
                await _writable(loop, own)
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(own, file_fd, offset, min(size - offset, STEP))
            except BlockingIOError:
                await _writable(loop, own)
                continue
            if sent == 0:  # the file is shorter than it was: never send a cut message
                raise OSError(5, "spool file shorter than expected")  # EIO
            offset += sent
    finally:
        os.close(own)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    waiter = loop.create_future()
    loop.add_writer(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
