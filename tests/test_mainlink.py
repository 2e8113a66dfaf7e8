"""An acceptor's wake-ups of the main process (forwarder/workers.py, MainLink): the first
after a quiet spell goes at once, the ones that follow within WAKE_SPACING ride on one
datagram at the end of it, so the main process takes a spell's messages together. Over a
real socket pair; the event loop's clock is the test's (no sleeping)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from forwarder.workers import WAKE, WAKE_SPACING, MainLink, wake_wait
from tests.conftest import pending_datagrams


def test_wake_wait() -> None:
    assert wake_wait(100.0, float("-inf")) == 0.0  # never woken: at once
    assert wake_wait(100.0, 99.0) == 0.0  # a quiet spell: at once
    assert wake_wait(100.0, 99.99) == pytest.approx(WAKE_SPACING - 0.01)
    assert wake_wait(100.0, 100.0) == pytest.approx(WAKE_SPACING)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_wakes_within_the_spacing_ride_on_one(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    link = MainLink(ours.detach(), on_lost=lambda: None)
    try:
        link.wake()
        await _turns()
        assert pending_datagrams(theirs) == [WAKE]  # the first: at once
        now[0] += WAKE_SPACING / 4
        for _ in range(5):  # five commits in the same spell
            link.wake()
            await _turns()
        assert pending_datagrams(theirs) == []
        now[0] += WAKE_SPACING  # the spell is over: one wake for all five
        await _turns()
        assert pending_datagrams(theirs) == [WAKE]
        now[0] += 10 * WAKE_SPACING  # quiet; the next goes at once again
        link.wake()
        await _turns()
        assert pending_datagrams(theirs) == [WAKE]
    finally:
        link.close()
