"""RFC 2920 command pipelining for the outbound client: a group of commands in one
write, their replies read back in order.

aiosmtplib cannot do this itself: its protocol hands one reply to one awaiting command
and drops whatever arrives while no command waits (its defence against pairing a reply
with the wrong command), so a second reply that arrives before the first is taken would
be lost. For the length of a group, `exchange` therefore puts a queue in place of the
protocol's one-reply waiter: every reply the protocol parses goes into it, the replies
still in the protocol's buffer are parsed from there, and nothing is dropped. The
protocol's lock is held for the whole group, so nothing else speaks on the session
meanwhile, and after it the protocol is as aiosmtplib leaves it after a command. Any
failure to read a reply (timeout, lost connection, garbage) closes the session: replies
and commands can no longer be paired.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, SMTPProtocol

__all__ = ["exchange"]

Reply = aiosmtplib.SMTPResponse


class _Replies:
    """Stands in for SMTPProtocol's response waiter (an asyncio.Future) during a group:
    the protocol calls done(), set_result(), set_exception() and exception() on it.
    Never done while the group runs, so the protocol keeps parsing what arrives; every
    reply is kept, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._replies: deque[Reply] = deque()
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None

    def done(self) -> bool:
        return self._error is not None

    def set_result(self, reply: Reply) -> None:
        self._replies.append(reply)
        self._notify()

    def set_exception(self, exc: BaseException) -> None:
        self._error = exc
        self._notify()

    def exception(self) -> BaseException | None:
        return self._error

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def next(self, protocol: SMTPProtocol, wait: float | None) -> Reply:
        """The next reply in order: those the protocol parsed come first (it parses the
        oldest in its buffer), then those still in its buffer."""
        while True:
            if self._replies:
                return self._replies.popleft()
            reply = protocol._read_response_from_buffer()
            if reply is not None:
                return reply
            if self._error is not None:
                raise self._error
            self._wake = self._loop.create_future()
            try:
                async with asyncio.timeout(wait):
                    await self._wake
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response") from exc


async def exchange(client: aiosmtplib.SMTP, commands: Sequence[bytes],
                   wait: float | None) -> tuple[list[Reply], BaseException | None]:
    """Send `commands` (lines without CRLF) in one write and read their replies in order
    (RFC 2920 3.1), each within `wait`. Returns the replies read and, if reading
    stopped early, why; the session is then closed (later replies could no longer be
    paired with their commands). Like aiosmtplib's execute_command, refuses a
    command holding a control character (CR or LF would inject a command) before
    anything is written, and closes the session after a 421 (RFC 5321 3.8)."""
    for command in commands:
        if COMMAND_INJECTION_REGEX.search(command):
            raise ValueError("Command arg contains a prohibited control character")
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    replies: list[Reply] = []
    async with protocol._command_lock:
        queue = _Replies(asyncio.get_running_loop())
        protocol._response_waiter = cast("asyncio.Future[Reply]", queue)
        protocol._response_pending = True
        try:
            protocol.write(b"".join(command + b"\r\n" for command in commands))
            while len(replies) < len(commands):
                replies.append(await queue.next(protocol, wait))
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            return replies, exc
        finally:
            _restore(protocol)
    if any(reply.code == 421 for reply in replies):
        client.close()
    return replies, None


def _restore(protocol: SMTPProtocol) -> None:
    """The protocol as after a command: no reply awaited, a fresh waiter, and nothing
    left over (octets after the last expected reply answer nothing we sent)."""
    protocol._response_pending = False
    del protocol._buffer[:]
    connected = protocol.transport is not None
    protocol._response_waiter = asyncio.get_running_loop().create_future() if connected else None
