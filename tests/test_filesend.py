"""sendfile(2) of a spool file to a plain TCP connection (forwarder/filesend.py).

Real sockets on loopback, a real file, both event loops the daemon may run on (asyncio's
and uvloop's): the bytes arrive whole and in order around what the transport writes, a
reader that stops reading makes the sender wait (not spin, not drop), a peer that goes
away is an error (not a hang), and TLS or unsent transport data rule the shortcut out.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from forwarder import filesend
from tests.test_mx_delivery import self_signed

Runner = Callable[[Awaitable[Any]], Any]
RUNNERS = [pytest.param(asyncio.run, id="asyncio"), pytest.param(uvloop.run, id="uvloop")]

# 6 MB of lines, some starting with a (stuffed) dot, as a spool file holds them.
CONTENT = b"".join(b"..%06d stuffed\r\n" % n if n % 7 == 0 else b"line %06d of the body\r\n" % n
                   for n in range(260_000))


class Receiver(asyncio.Protocol):
    """The far end: keeps what arrives; reads only once `reading` is set."""

    def __init__(self) -> None:
        self.got = bytearray()
        # uvloop's transports implement the interface without deriving from asyncio's.
        self.transport: Any = None
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def _pair(ssl_context: ssl.SSLContext | None = None,
                client_ssl: ssl.SSLContext | None = None) -> tuple[Any, Receiver, asyncio.Server]:
    loop = asyncio.get_running_loop()
    receiver = Receiver()
    server = await loop.create_server(lambda: receiver, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                                ssl=client_ssl)
    return transport, receiver, server


async def _connected(receiver: Receiver) -> None:
    for _ in range(500):
        if receiver.transport is not None:
            return
        await asyncio.sleep(0.01)


async def _plain_pair() -> tuple[Any, asyncio.Server, int]:
    """A plain connection, and its socket's descriptor."""
    transport, _, server = await _pair()
    fd = filesend.plain_socket(transport)
    assert fd is not None
    return transport, server, fd


async def _stalled_pair() -> tuple[Any, Receiver, asyncio.Server, int]:
    """A plain connection whose far end does not read (yet), and its socket's descriptor."""
    transport, receiver, server = await _pair()
    await _connected(receiver)
    assert receiver.transport is not None
    receiver.transport.pause_reading()
    fd = filesend.plain_socket(transport)
    assert fd is not None
    return transport, receiver, server, fd


async def _close(transport: Any, server: asyncio.Server, abort: bool = False,
                 receiver: Receiver | None = None) -> None:
    """Everything closed before the loop is (uvloop refuses to close with handles open)."""
    transport.abort() if abort else transport.close()
    if receiver is not None and receiver.transport is not None:
        receiver.transport.abort()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.05)


@pytest.mark.parametrize("run", RUNNERS)
def test_the_file_arrives_whole_and_in_order_past_a_reader_that_stops(
        run: Runner, tmp_path: Path) -> None:
    """The reader stops reading until the sender has had to wait for the socket (its
    buffers full: sendfile(2) said EAGAIN); then it reads. What arrives is the prefix,
    the file's first `size` octets, then what the transport writes after: in that order."""
    path = tmp_path / "spooled"
    path.write_bytes(CONTENT + b"not to be sent")

    async def main(file_fd: int) -> bytes:
        transport, receiver, server, fd = await _stalled_pair()
        waits = 0
        real = filesend._writable

        async def counted(loop: asyncio.AbstractEventLoop, own: int) -> None:
            nonlocal waits
            waits += 1
            if waits == 1:
                receiver.transport.resume_reading()
            await real(loop, own)

        filesend._writable = counted  # type: ignore[assignment]
        try:
            await filesend.send(fd, b"Received: by us\r\n", file_fd, len(CONTENT))
        finally:
            filesend._writable = real
        assert waits >= 1  # the socket was full at least once: the sender waited
        transport.write(b".\r\n")
        expected = len(CONTENT) + len(b"Received: by us\r\n") + 3
        for _ in range(500):
            if len(receiver.got) >= expected:
                break
            await asyncio.sleep(0.01)
        await _close(transport, server)
        return bytes(receiver.got)

    with open(path, "rb") as fh:
        got = run(main(fh.fileno()))
    assert got == b"Received: by us\r\n" + CONTENT + b".\r\n"


@pytest.mark.parametrize("run", RUNNERS)
def test_a_peer_that_goes_away_is_an_error_not_a_hang(run: Runner, tmp_path: Path) -> None:
    path = tmp_path / "spooled"
    path.write_bytes(CONTENT * 4)  # more than loopback's buffers hold

    async def main(file_fd: int) -> None:
        transport, receiver, server, fd = await _stalled_pair()
        sending = asyncio.ensure_future(filesend.send(fd, b"", file_fd, len(CONTENT) * 4))
        await asyncio.sleep(0.2)
        assert not sending.done()  # waiting for the reader
        receiver.transport.abort()  # a reset, as a crashed server's kernel sends
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(sending, 10)
        await _close(transport, server)

    with open(path, "rb") as fh:
        run(main(fh.fileno()))


@pytest.mark.parametrize("run", RUNNERS)
def test_a_file_shorter_than_said_is_never_sent_cut(run: Runner, tmp_path: Path) -> None:
    path = tmp_path / "spooled"
    path.write_bytes(b"line\r\n" * 10)

    async def main(file_fd: int) -> None:
        transport, server, fd = await _plain_pair()
        with pytest.raises(OSError, match="shorter"):
            await filesend.send(fd, b"", file_fd, 1000)
        await _close(transport, server)

    with open(path, "rb") as fh:
        run(main(fh.fileno()))


@pytest.mark.parametrize("run", RUNNERS)
def test_no_shortcut_over_tls_or_past_unsent_data(run: Runner, tmp_path: Path) -> None:
    """Over TLS the transport must encrypt what goes out; with bytes still in the
    transport, ours would overtake them. Either way `plain_socket` says no."""
    server_ctx = self_signed(tmp_path)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    async def main() -> None:
        transport, tls_receiver, server = await _pair(server_ctx, client_ctx)
        assert filesend.plain_socket(transport) is None
        await _close(transport, server, receiver=tls_receiver)
        transport, receiver, server = await _pair()
        await _connected(receiver)
        assert receiver.transport is not None
        receiver.transport.pause_reading()
        assert filesend.plain_socket(transport) is not None
        for _ in range(200):  # fill the kernel's buffers, then the transport's own
            transport.write(b"x" * 65536)
            if transport.get_write_buffer_size():
                break
        assert transport.get_write_buffer_size() > 0
        assert filesend.plain_socket(transport) is None
        await _close(transport, server, abort=True, receiver=receiver)

    run(main())


def test_the_duplicate_descriptor_is_closed(tmp_path: Path) -> None:
    """One descriptor per message would run the daemon out of them in a day."""
    path = tmp_path / "spooled"
    path.write_bytes(b"line\r\n" * 1000)

    async def main(file_fd: int) -> None:
        transport, server, fd = await _plain_pair()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            await filesend.send(fd, b"", file_fd, 6000)
        assert len(os.listdir("/proc/self/fd")) == before
        await _close(transport, server)

    with open(path, "rb") as fh:
        uvloop.run(main(fh.fileno()))
