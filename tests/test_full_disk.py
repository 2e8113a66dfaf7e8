"""A full disk, on a real small filesystem (a tmpfs; needs root, as CI is): a delivery whose
outcome cannot be written is neither sent again nor taken for a crash, the daemon starts
and `forwarder queue delete` works on a full disk (the space reserve,
forwarder/queue/reserve.py), and new mail is refused with `452 4.3.1` until the space is
back.

Before: 80 of 86 such deliveries went out again and were counted as crashes (held after
3), a restart on the full disk failed, and `queue delete` could not free anything.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from forwarder.clock import FakeClock
from forwarder.config import HostPort, Limits
from forwarder.daemon import Daemon
from tests.conftest import NoticedDirectory, Sink, make_settings, simple_message, smtp_send, until
from tests.test_hostile import GRAD, forwarding
from tests.test_storage_faults import _fill, small_fs

__all__ = ["small_fs"]  # the fixture, used by name below

MIB = 1024 * 1024
BIG = simple_message() + (b"y" * 998 + b"\r\n") * 600  # ~600 kB: a spool file

Starter = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def daemon_on(clock: FakeClock, sink: Sink) -> AsyncIterator[Starter]:
    started: list[Daemon] = []

    async def start(state_dir: Path, reserve: int) -> Daemon:
        d = Daemon(make_settings(state_dir, smarthost=HostPort("127.0.0.1", sink.port),
                                 limits=Limits(disk_reserve=reserve)), clock=clock)
        await d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        await d.stop()


def rows(state: Path, sql: str) -> list[Any]:
    with sqlite3.connect(state / "queue.sqlite3") as conn:
        return conn.execute(sql).fetchall()


async def truncate_wal(d: Daemon) -> None:
    """The next commit must grow the write-ahead log: on a full disk, it cannot."""
    await d.queue._writer_db.run(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))


def gate(sink: Sink) -> asyncio.Event:
    """Hold every DATA at the sink until the event is set (then accept it)."""
    opened = asyncio.Event()
    accept = sink.handler.handle_DATA

    async def gated(server: Any, session: Any, envelope: Any) -> str:
        await opened.wait()
        return await accept(server, session, envelope)

    sink.handler.handle_DATA = gated  # type: ignore[method-assign]
    return opened


async def test_an_outcome_that_cannot_be_written_is_kept_and_written_later(
    small_fs: Path, daemon_on: Starter, sink: Sink,
) -> None:
    """No reserve here: the outcomes themselves wait in memory. The destination accepted
    each message once; they stay in delivery, are not charged as crashes, and leave the
    queue once the space is back, each delivered exactly once."""
    state = small_fs / "state"
    forwarding(NoticedDirectory(state / "directory.sqlite3", actor="test"))
    d = await daemon_on(state, 0)
    opened = gate(sink)
    for n in range(5):
        _, data = await smtp_send(d.port, "a@sender.example", [GRAD],
                                  simple_message(msgid=f"<{n}@full.test>"))
        assert data is not None and data[0] == 250
    await until(lambda: sink.connections >= 1 and len(d.dispatcher.in_flight) == 5)
    await truncate_wal(d)
    _fill(small_fs / "filler")
    opened.set()
    await sink.wait_for(5)
    await until(lambda: len(d.dispatcher.unwritten) == 5)
    assert rows(state, "SELECT count(*), max(crashes) FROM messages") == [(5, 0)]
    assert await d.dispatcher.scan() == 0  # nothing new is tried meanwhile
    await asyncio.to_thread((small_fs / "filler").unlink)
    await until(lambda: rows(state, "SELECT count(*) FROM messages") == [(0,)], timeout=30)
    assert len(sink.messages) == 5  # once each
    assert not d.dispatcher.unwritten


async def test_the_reserve_settles_outcomes_then_new_mail_waits_for_space(
    small_fs: Path, daemon_on: Starter, sink: Sink,
) -> None:
    """With the reserve (2 MiB here): the outcomes are written at once, the reserve given
    back for them; new mail then gets 452 4.3.1 at MAIL until the reserve can be remade."""
    state = small_fs / "state"
    forwarding(NoticedDirectory(state / "directory.sqlite3", actor="test"))
    d = await daemon_on(state, 2 * MIB)
    opened = gate(sink)
    for n in range(3):
        await smtp_send(d.port, "a@sender.example", [GRAD],
                        simple_message(msgid=f"<{n}@full.test>"))
    await until(lambda: len(d.dispatcher.in_flight) == 3)
    await truncate_wal(d)
    _fill(small_fs / "filler")
    opened.set()
    await until(lambda: rows(state, "SELECT count(*) FROM messages") == [(0,)])
    assert len(sink.messages) == 3 and not (state / "space-reserve").exists()
    await until(lambda: d.front is not None and d.front.space_short, timeout=15)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp_send(d.port, "a@sender.example", [GRAD], simple_message())
    assert (refused.value.code, refused.value.message[:5]) == (452, "4.3.1")
    await asyncio.to_thread((small_fs / "filler").unlink)
    await until(lambda: d.front is not None and not d.front.space_short, timeout=15)
    assert (state / "space-reserve").stat().st_size == 2 * MIB
    _, data = await smtp_send(d.port, "a@sender.example", [GRAD], simple_message())
    assert data is not None and data[0] == 250


async def test_start_and_queue_delete_on_a_full_disk(
    small_fs: Path, daemon_on: Starter, sink: Sink, clock: FakeClock,
) -> None:
    state = small_fs / "state"
    forwarding(NoticedDirectory(state / "directory.sqlite3", actor="test"))
    sink.handler.data_reply = "451 4.3.0 later"
    first = await daemon_on(state, 2 * MIB)
    _, data = await smtp_send(first.port, "a@sender.example", [GRAD], BIG)
    assert data is not None and data[0] == 250
    queue_id = data[1].split()[-1]
    await until(lambda: not first.dispatcher.in_flight)
    await truncate_wal(first)
    await first.stop()
    _fill(small_fs / "filler")
    # It starts (the reserve makes room for the queue's recovery), and refuses new mail.
    d = await asyncio.wait_for(daemon_on(state, 2 * MIB), 20)
    assert d.front is not None and d.front.space_short
    deleted = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "forwarder.cli", "queue", "delete", queue_id,
                         "--yes", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False)
    assert deleted.returncode == 0, deleted.stderr
    assert rows(state, "SELECT count(*) FROM messages") == [(0,)]
    assert not (state / "spool" / queue_id).exists()
