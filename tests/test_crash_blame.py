"""Which message a crash is blamed on (policy.blame, applied by forwarder/queue/ops.py):
a process killed from outside is nobody's fault; one that dies of a fault of its own with
hundreds of messages in delivery must not quarantine them all; a message that brings the
daemon down on its own must still end up held, and a held message still leaves as a
bounce at the end of its lifetime.

The queue is a real SQLite file; a crash is what it leaves behind (leases in the file, no
clean stop), and start-up is `Queue.recover`, as in `forwarder serve`, told whether the
process left a fault report (forwarder/faults.py). The rule itself, with no I/O, is tested
by a table in tests/test_policy.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.faults import FAULT_FILE
from forwarder.policy import MAX_CRASHES, Lane, Outcome, Route
from forwarder.queue import (
    Job,
    NewMessage,
    NewRecipient,
    Queue,
    Result,
    new_queue_id,
)
from tests.conftest import DOMAIN, DaemonFactory, Sink, scan_due, simple_message, until

NOW = 1_700_000_000.0
# What Python's faulthandler writes when the process dies of a fatal signal.
FAULT_REPORT = ("Fatal Python error: Segmentation fault\n\n"
                "Current thread 0x00007f (most recent call first):\n")


def new_message(n: int, now: float = NOW) -> NewMessage:
    return NewMessage(new_queue_id(now + n), "noreply@jobteaser.com", now + n, "192.0.2.1",
                      simple_message(msgid=f"<{n}@jobteaser.test>"),
                      (NewRecipient(f"g{n}@{DOMAIN}", f"g{n}@perso.example", Route.REDIRECT),))


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    q = Queue(tmp_path / "queue.sqlite3")
    await q.open()
    yield q
    await q.close()


def crashes(q: Queue) -> dict[str, tuple[int, int]]:
    """message id -> (crashes, held), read by another connection as an admin would."""
    with sqlite3.connect(q.path) as conn:
        return {mid: (c, h) for mid, c, h in conn.execute(
            "SELECT id, crashes, held FROM messages")}


async def in_delivery(q: Queue, count: int, now: float = NOW) -> list[str]:
    """`count` messages accepted and handed to delivery (leased), as the front does."""
    ids = []
    for n in range(count):
        message = new_message(n, now)
        await q.enqueue(message, leased=True)
        ids.append(message.id)
    return ids


async def test_a_kill_from_outside_is_nobodys_fault(queue: Queue) -> None:
    """SIGKILL, the OOM killer: no fault report, so nothing is charged, whatever lane the
    messages were in, however many times (before, a burst of kills held a suspect)."""
    ids = await in_delivery(queue, 5)
    assert await queue.recover(NOW) == (5, 0)
    assert set(crashes(queue).values()) == {(0, 0)}
    assert len(await queue.lease_due(NOW, 100, frozenset())) == 5
    await queue.recover(NOW, faulted=True)  # one real fault: suspects
    for _ in range(2 * MAX_CRASHES):
        (job,) = await queue.lease_due(NOW, 0, frozenset(), lane_free=True)
        assert job.isolated
        await queue.recover(NOW)  # killed with it alone in the lane, again and again
    assert set(crashes(queue).values()) == {(1, 0)}
    assert sorted(crashes(queue)) == sorted(ids)


async def test_messages_in_flight_at_a_crash_are_suspected_not_charged_again(
        queue: Queue) -> None:
    ids = await in_delivery(queue, 5)
    assert await queue.recover(NOW, faulted=True) == (5, 0)
    assert set(crashes(queue).values()) == {(1, 0)}
    # Restart after restart, each killed right after its first scan: a suspect is never
    # handed out with the ordinary mail, so it is not charged again (before, all five were
    # leased again at each start and held at the third kill).
    for _ in range(MAX_CRASHES + 2):
        assert await queue.lease_due(NOW, 100, frozenset()) == []
        await queue.recover(NOW, faulted=True)
    assert set(crashes(queue).values()) == {(1, 0)}
    assert sorted(crashes(queue)) == sorted(ids)


async def test_suspects_leave_one_at_a_time_and_never_with_ordinary_mail(
        queue: Queue) -> None:
    suspects = await in_delivery(queue, 3)
    await queue.recover(NOW, faulted=True)
    fresh = new_message(10)
    await queue.enqueue(fresh, leased=False)  # an acceptor's: due now, unsuspected
    ordinary = await queue.lease_due(NOW + 20, 100, frozenset())
    assert [j.message_id for j in ordinary] == [fresh.id]
    assert not ordinary[0].isolated
    lane = await queue.lease_due(NOW + 20, 100, frozenset(), lane_free=True)
    assert [(j.message_id, j.isolated) for j in lane] == [(suspects[0], True)]  # the oldest
    # The lane is busy: the other suspects wait.
    assert await queue.lease_due(NOW + 20, 100, frozenset()) == []


async def test_a_message_that_crashes_the_daemon_alone_is_held(queue: Queue) -> None:
    (poison, *others) = await in_delivery(queue, 4)
    await queue.recover(NOW, faulted=True)
    for n in range(2, MAX_CRASHES + 1):
        (job,) = await queue.lease_due(NOW, 0, frozenset(), lane_free=True)
        assert job.message_id == poison and job.isolated
        await queue.recover(NOW, faulted=True)  # died of a fault with it alone in the lane
        assert crashes(queue)[poison] == (n, int(n >= MAX_CRASHES))
    assert all(crashes(queue)[mid] == (1, 0) for mid in others)
    # Held: the lane moves on to the next suspect.
    (job,) = await queue.lease_due(NOW, 0, frozenset(), lane_free=True)
    assert job.message_id == others[0]


async def test_a_completed_lone_attempt_clears_the_suspicion(queue: Queue) -> None:
    (suspect,) = await in_delivery(queue, 1)
    await queue.recover(NOW, faulted=True)
    (job,) = await queue.lease_due(NOW, 0, frozenset(), lane_free=True)
    await queue.record([_deferred(job)], completed=[(suspect, Lane.ALONE)])
    assert crashes(queue)[suspect] == (0, 0)
    # Back with the ordinary mail when it is due again.
    (again,) = await queue.lease_due(NOW + 120, 10, frozenset())
    assert again.message_id == suspect and not again.isolated


def _deferred(job: Job) -> Result:
    (rcpt,) = job.recipients
    return Result(rcpt.id, job.message_id, Outcome.DEFERRED, NOW, NOW + 60, "451 4.3.0 later")


async def test_the_daemon_tries_suspects_alone_then_delivers_them_all(
    start_daemon: DaemonFactory, sink: Sink, state_dir: Path, clock: FakeClock,
) -> None:
    """A daemon that died of a fault (its report in the state directory) left three
    messages in delivery. The restarted daemon tries them one at a time (the sink holds
    the first: the others wait), then delivers all three."""
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    left = Queue(state_dir / "queue.sqlite3")
    await left.open()
    ids = await in_delivery(left, 3, clock.now() - 10)
    await left.close()
    await asyncio.to_thread((state_dir / FAULT_FILE).write_text, FAULT_REPORT)
    sink.handler.hang = True
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    assert set(crashes(d.queue).values()) == {(1, 0)}
    await until(lambda: sink.connections == 1 and len(d.dispatcher.in_flight) == 1)
    with sqlite3.connect(d.queue.path) as conn:
        assert conn.execute("SELECT message_id, leased FROM recipients WHERE leased != 0"
                            ).fetchall() == [(ids[0], 2)]
    assert await d.dispatcher.scan() == 0  # the lane stays one message wide meanwhile
    sink.handler.hang = False
    for proto in list(sink.sessions):  # the destination drops the stuck transaction
        if proto.transport is not None:
            proto.transport.close()
    await sink.wait_for(2)  # the two others, each alone in its turn
    # The first one's lone attempt completed (deferred): no longer a suspect, it is
    # retried with the ordinary mail.
    await until(lambda: crashes(d.queue) == {ids[0]: (0, 0)})
    clock.advance(3600)
    assert await scan_due(d) == 1
    await sink.wait_for(3)


async def test_a_killed_daemon_blames_nobody_and_delivers_at_once(
    start_daemon: DaemonFactory, sink: Sink, state_dir: Path, clock: FakeClock,
) -> None:
    """No fault report: the last run was killed from outside. Its messages in delivery
    are not suspected; they go out with the ordinary mail, all at once."""
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    left = Queue(state_dir / "queue.sqlite3")
    await left.open()
    await in_delivery(left, 3, clock.now() - 10)
    await left.close()
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    assert set(crashes(d.queue).values()) == {(0, 0)}
    await sink.wait_for(3)


async def test_a_fault_report_is_acted_on_once(
    start_daemon: DaemonFactory, state_dir: Path, clock: FakeClock,
) -> None:
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    left = Queue(state_dir / "queue.sqlite3")
    await left.open()
    await in_delivery(left, 1, clock.now() - 10)
    await left.close()
    report = state_dir / FAULT_FILE
    await asyncio.to_thread(report.write_text, FAULT_REPORT)
    d = await start_daemon()
    assert set(crashes(d.queue).values()) == {(1, 0)}
    assert await asyncio.to_thread(report.read_text) == ""


async def test_a_held_message_bounces_at_the_end_of_its_lifetime(
    start_daemon: DaemonFactory, sink: Sink, state_dir: Path, clock: FakeClock,
) -> None:
    """Held after crashing the daemon: never tried again, but at the end of the queue
    lifetime it leaves the queue, its sender told by a DSN like for any message that could
    not be delivered in time (before, it stayed held for ever)."""
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    left = Queue(state_dir / "queue.sqlite3")
    await left.open()
    (poison,) = await in_delivery(left, 1, clock.now())
    await left.recover(clock.now(), faulted=True)
    for _ in range(MAX_CRASHES - 1):
        assert await left.lease_due(clock.now(), 0, frozenset(), lane_free=True)
        await left.recover(clock.now(), faulted=True)
    await left.close()
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    assert crashes(d.queue)[poison] == (MAX_CRASHES, 1)
    clock.advance(d.settings.delivery.queue_lifetime - 60)
    await scan_due(d)
    assert crashes(d.queue) == {poison: (MAX_CRASHES, 1)}  # not yet
    clock.advance(120)
    await scan_due(d)
    (dsn,) = await sink.wait_for(1)
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["noreply@jobteaser.com"]
    assert b"Status: 4.4.7" in dsn.content and b"held (quarantined)" in dsn.content
    await until(lambda: poison not in crashes(d.queue))
