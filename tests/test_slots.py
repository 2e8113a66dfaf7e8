"""Delivery slots (forwarder/slots.py), without sockets: windows per destination, the
shared MX total, FIFO hand-over, and the dead-destination rule on an injected clock."""

from __future__ import annotations

import asyncio

from forwarder.clock import FakeClock
from forwarder.config import DeliverySettings
from forwarder.slots import Site, SiteKind, Slots, Verdict

SLOW = Site(SiteKind.MX, "slow.example")
OTHER = Site(SiteKind.MX, "other.example")
MAILBOX = Site(SiteKind.MAILBOX, "mail.school.example:25")


def slots(clock: FakeClock, suspended: list[int] | None = None, **delivery: float) -> Slots:
    settings = DeliverySettings(**{"concurrency": 8, "per_destination": 10,  # type: ignore[arg-type]
                                   "destination_share": 0.25, **delivery})
    return Slots(settings, clock.now, None if suspended is None else suspended.append)


def test_caps() -> None:
    s = slots(FakeClock())
    assert s.cap(SLOW) == 2  # a quarter of 8
    assert s.cap(MAILBOX) == 10  # its own, outside the total
    assert slots(FakeClock(), concurrency=100).cap(SLOW) == 10  # per_destination bounds it
    assert slots(FakeClock(), concurrency=2).cap(SLOW) == 1  # never none


async def test_a_destination_waits_in_order_for_its_own_slots() -> None:
    s = slots(FakeClock())
    assert s.try_acquire(SLOW) and s.try_acquire(SLOW)
    assert s.try_acquire(SLOW) is None
    first = asyncio.ensure_future(s.wait(SLOW))
    second = asyncio.ensure_future(s.wait(SLOW))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert s.try_acquire(OTHER)  # another destination is not held back
    s.release(SLOW, Verdict.ANSWERED)
    assert await first and not second.done()  # handed over, first come first served
    s.release(SLOW, Verdict.ANSWERED)
    assert await second


async def test_the_mx_total_is_shared_and_fixed_hosts_are_apart() -> None:
    s = slots(FakeClock(), concurrency=4, destination_share=0.5)
    assert s.try_acquire(SLOW) and s.try_acquire(SLOW)
    assert s.try_acquire(OTHER) and s.try_acquire(OTHER)
    third = Site(SiteKind.MX, "third.example")
    assert s.try_acquire(third) is None  # the total of 4 is taken
    waiting = asyncio.ensure_future(s.wait(third))
    assert all(s.try_acquire(MAILBOX) for _ in range(10))  # own slots, outside the total
    await asyncio.sleep(0)
    assert not waiting.done()
    s.release(SLOW, Verdict.ANSWERED)
    assert await waiting


async def test_failures_halve_the_window_then_suspend() -> None:
    clock = FakeClock()
    suspended: list[int] = []
    s = slots(clock, suspended, concurrency=16, dead_destination_time=300.0)
    assert s.window(SLOW) == 4
    for _ in range(4):
        assert s.try_acquire(SLOW)
    waiting = asyncio.ensure_future(s.wait(SLOW))
    s.release(SLOW, Verdict.UNREACHABLE, "connect to mx: timed out")
    assert s.window(SLOW) == 2 and s.suspended(SLOW) is None
    s.release(SLOW, Verdict.UNREACHABLE, "connect to mx: timed out")
    assert s.window(SLOW) == 1
    s.release(SLOW, Verdict.UNREACHABLE, "connect to mx: timed out")
    assert s.suspended(SLOW) == "connect to mx: timed out" and suspended == [1]
    assert await waiting is False  # told at once, to defer without connecting
    assert s.try_acquire(SLOW) is False
    s.release(SLOW, Verdict.UNREACHABLE, "late")  # the last session's end changes nothing
    clock.advance(300)
    assert s.try_acquire(SLOW) is True  # one probe session
    assert s.try_acquire(SLOW) is None
    s.release(SLOW, Verdict.ANSWERED)
    assert s.window(SLOW) == 2  # each answer widens it again, up to the cap


async def test_a_cancelled_waiter_gives_its_slot_on() -> None:
    s = slots(FakeClock())
    assert s.try_acquire(SLOW) and s.try_acquire(SLOW)
    gone = asyncio.ensure_future(s.wait(SLOW))
    kept = asyncio.ensure_future(s.wait(SLOW))
    await asyncio.sleep(0)
    gone.cancel()
    s.release(SLOW, Verdict.ANSWERED)
    assert await kept
    assert s.busy(SLOW) == 2


def test_an_idle_destination_is_forgotten() -> None:
    s = slots(FakeClock())
    assert s.try_acquire(SLOW)
    s.release(SLOW, Verdict.ANSWERED)
    assert SLOW not in s._states  # a domain seen once costs nothing afterwards
