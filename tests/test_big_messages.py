"""Big messages within the limits: bounded memory, and an event loop that never stalls.

A body past `spill_threshold` (256 KiB) goes to a spool file as it arrives, in its wire
form, and is sent from there in chunks after our own header fields; the checks on it run a
piece at a time as it arrives; a DSN returns a bounded prefix of the header section. These
tests run the real `forwarder serve` in a subprocess and read its memory from
/proc/PID/status (every process of the daemon), and measure how long a probe client
sending NOOP every 20 ms waits for each reply while 25 MiB messages arrive, go out and
bounce. The destinations are tests/rawsink.py processes (the aiosmtpd sink would stall the
test's own event loop, which does the measuring).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from forwarder.config import HostPort, Limits
from forwarder.directory import Directory
from forwarder.queue.spool import ORPHAN_AGE
from tests.conftest import DOMAIN, DaemonFactory, Sink, simple_message, smtp_send, until
from tests.test_hostile import RawClient, stuffed
from tests.test_service import Service, config_text

MIB = 1024 * 1024
GRAD = f"marie.curie@{DOMAIN}"
EXTERNAL_POSTMASTER = "it-team@school-it.example"


def processes(pid: int) -> list[int]:
    """The daemon: its main process and its children (the acceptors)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def memory(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status field (VmRSS: now; VmHWM: the peak), in bytes, added up over
    every process of the daemon."""
    total = 0
    for each in processes(pid):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1]) * 1024
    return total


class RawSinkProcess:
    """tests/rawsink.py in a subprocess, answering every message with `reply`."""

    def __init__(self, tmp: Path, reply: str) -> None:
        self.port_file = tmp / f"rawsink-{reply}.port"
        self.reply = reply
        self.proc: asyncio.subprocess.Process | None = None
        self.messages: list[dict[str, int]] = []
        self.port = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("rawsink.py")), str(self.port_file),
            self.reply, stdout=asyncio.subprocess.PIPE)
        await until(self.port_file.exists)
        await until(lambda: bool(self.port_file.read_text()))
        self.port = int(self.port_file.read_text())
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.messages.append(json.loads(line))

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            await self.proc.wait()
            await self._reader


@pytest.fixture
async def raw_sinks(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[RawSinkProcess]]]:
    started: list[RawSinkProcess] = []

    async def start(reply: str) -> RawSinkProcess:
        sink = RawSinkProcess(tmp_path, reply)
        await sink.start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        await sink.stop()


async def serve(tmp_path: Path, extra: str, smarthost: int | None = None) -> Service:
    service = Service(tmp_path, config_text([DOMAIN], smarthost=smarthost, extra=extra))
    await service.start()
    await service.wait_log("listening", timeout=30)
    return service


async def open_data(port: int, rcpt: str, sender: str = "a@sender.example") -> RawClient:
    client = await RawClient.open(port)
    await client.greet()
    assert (await client.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    return client


def spool_octets(state: Path) -> int:
    """Octets in the spool's incoming files now (a file the daemon removes while they are
    counted counts for nothing)."""
    total = 0
    for path in (state / "spool" / "incoming").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size if path.is_file() else 0
    return total


# --- memory ---------------------------------------------------------------------------


async def test_unfinished_big_bodies_do_not_grow_memory(tmp_path: Path) -> None:
    """Ten sessions each send 24 MiB (under the 25 MiB limit) and never the final dot.
    Before, each session kept its body in memory until the DATA deadline: +240 MB (the
    caps allow 500 such sessions: 12 GB). Now each holds at most the spill threshold in
    memory; the rest is in its spool file, which goes when the session does."""
    service = await serve(tmp_path, f'postmaster = "{EXTERNAL_POSTMASTER}"\n')
    assert service.proc is not None
    state = service.state_dir
    try:
        before = memory(service.proc.pid)
        line = b"x" * 998 + b"\r\n"
        chunk = line * 1024  # 1 MiB
        clients = [await open_data(service.port, f"postmaster@{DOMAIN}") for _ in range(10)]
        for _ in range(24):
            for client in clients:
                await client.send(chunk)
        grown = 0

        def read_it_all() -> bool:  # true before and after the change: what it measures
            nonlocal grown
            assert service.proc is not None
            grown = memory(service.proc.pid) - before
            return spool_octets(state) >= 10 * 23 * MIB or grown >= 200 * MIB

        await until(read_it_all, timeout=60)
        print(f"10 unfinished 24 MiB bodies: RSS +{grown / MIB:.1f} MiB, "
              f"{spool_octets(state) / MIB:.0f} MiB in spool files")
        assert grown < 64 * MIB, f"+{grown // MIB} MiB"
        for client in clients:
            client.writer.transport.abort()
        await until(lambda: spool_octets(state) == 0)  # a session cut off leaves nothing
    finally:
        await service.close()


# --- the event loop -------------------------------------------------------------------


class Probe:
    """A client sending NOOP every 20 ms, recording how long each reply took."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.stop = asyncio.Event()

    async def run(self, port: int) -> None:
        client = await RawClient.open(port)
        await client.greet()
        while not self.stop.is_set():
            started = time.monotonic()
            assert await client.cmd("NOOP") == (250, "2.0.0 OK")
            self.waits.append(time.monotonic() - started)
            # Not "sleep then assert": the pace of the probe, the measure is the wait above.
            await asyncio.sleep(0.02)
            if len(self.waits) % 80 == 0:  # 100 junk commands are free: stay within them
                assert (await client.cmd("EHLO probe.test"))[0] == 250
                await client.cmd("RSET")
        await client.close()


async def send_big(port: int, rcpt: str, kind: str, octets: int) -> str:
    """tests/bigclient.py: the message is built and written by another process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("bigclient.py")), str(port), rcpt, kind,
        str(octets), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode().strip()


async def test_the_event_loop_never_stalls_on_25_mib_messages(
    tmp_path: Path, raw_sinks: Callable[[str], Awaitable[RawSinkProcess]],
) -> None:
    """Three 25 MiB messages of 2-octet lines at once (received, queued, sent), and one
    25 MiB header section that the destination refuses (a DSN is built and sent), while a
    probe sends NOOP every 20 ms: it never waits long (100 ms on a quiet machine). Before, one such
    message stalled the loop 1 to 4.4 s and the bounce 19 to 30 s (longer than systemd's
    watchdog), and memory peaked at 1.6 GB."""
    good = await raw_sinks("250")
    refusing = await raw_sinks("550")
    state = tmp_path / "state"
    Directory(state / "directory.sqlite3", actor="test").add(GRAD)  # to the mailbox host
    service = await serve(tmp_path, f'postmaster = "{EXTERNAL_POSTMASTER}"\nacceptors = 0\n'
                          f'mailbox_host = "127.0.0.1:{refusing.port}"\n',
                          smarthost=good.port)
    assert service.proc is not None
    probe = Probe()
    probing = asyncio.create_task(probe.run(service.port))
    try:
        size = 25 * MIB - 4096  # under the limit
        replies = await asyncio.gather(*(send_big(service.port, f"postmaster@{DOMAIN}",
                                                  "lines", size) for _ in range(3)))
        assert all(reply.startswith("250 2.0.0") for reply in replies), replies
        assert (await send_big(service.port, GRAD, "header", size)).startswith("250 2.0.0")
        # Three messages and the DSN at the good sink, the refused one at the other.
        await until(lambda: len(good.messages) == 4 and len(refusing.messages) == 1,
                    timeout=120)
        assert sorted(m["octets"] for m in good.messages)[-1] > size
        assert sorted(m["octets"] for m in good.messages)[0] < 200_000  # the DSN: bounded
        await until(lambda: not list((state / "spool").glob("[A-Z2-7]*")), timeout=30)
    finally:
        probe.stop.set()
        await probing
        peak = memory(service.proc.pid, "VmHWM")
        await service.close()
    worst = max(probe.waits)
    print(f"probe: {len(probe.waits)} NOOPs, worst wait {worst * 1000:.1f} ms; "
          f"peak RSS {peak / MIB:.0f} MiB")
    # The bound the docs state, 100 ms, is measured on a quiet machine (docs/security.md);
    # on a busy one the scheduler itself preempts the process for that long (157-294 ms
    # seen at load 3-15 with nothing on the loop), so the test allows 500 ms: still two to
    # nine times under the stalls it guards against.
    assert worst < 0.5, f"the probe waited {worst * 1000:.0f} ms"
    assert peak < 256 * MIB, f"peak RSS {peak // MIB} MiB"


# --- the spool itself -------------------------------------------------------------------


BIG = simple_message() + b"..dot line\r\n" + (b"y" * 998 + b"\r\n") * 600  # ~600 kB


async def test_a_spooled_message_goes_out_as_it_came_in(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
) -> None:
    """Past the threshold: the body is in a spool file (not the row) while queued, is
    delivered byte for byte (stuffing undone once, by the destination), and its file goes
    with its last recipient."""
    directory.add(GRAD, ["marie@perso.example"])
    directory.delete(GRAD)
    sink.handler.data_reply = "451 4.3.0 later"
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    _, data = await smtp_send(d.port, "a@sender.example", [GRAD], BIG)
    assert data is not None and data[0] == 250
    queue_id = data[1].split()[-1]
    spooled = state_dir / "spool" / queue_id
    await until(lambda: not d.dispatcher.in_flight)
    with sqlite3.connect(d.settings.queue_path) as conn:
        stored, flag, size = conn.execute(
            "SELECT body, spooled, size FROM messages WHERE id = ?", (queue_id,)).fetchone()
    assert flag == 1 and stored.startswith(b"Received: ") and len(stored) < 1024
    wire = spooled.read_bytes()
    assert wire == stuffed(BIG)[:-3]  # the wire form, without the final dot
    assert size == len(stored) + len(BIG)
    sink.handler.data_reply = None
    d.clock.advance(600)  # type: ignore[attr-defined]
    await d.dispatcher.scan()
    (got,) = await sink.wait_for(1)
    assert got.content == stored + BIG
    await until(lambda: not spooled.exists())


async def test_spool_leftovers_are_swept_at_start(state_dir: Path,
                                                  start_daemon: DaemonFactory) -> None:
    """A crash can leave a received file (its session's process gone) or a spool file
    whose row never committed; start-up removes them, but not a file so young that
    another process may be about to commit its row."""
    incoming = state_dir / "spool" / "incoming"
    await asyncio.to_thread(incoming.mkdir, parents=True)
    dead = incoming / "999999999.1"  # no such process
    dead.write_bytes(b"half a message")
    orphan = state_dir / "spool" / "AAAAAAAAAAAAAAAA"
    orphan.write_bytes(b"never committed")
    old = time.time() - ORPHAN_AGE - 60
    os.utime(orphan, (old, old))
    young = state_dir / "spool" / "BBBBBBBBBBBBBBBB"
    young.write_bytes(b"being committed")
    await start_daemon()
    assert not dead.exists() and not orphan.exists() and young.exists()


async def test_a_session_cut_off_mid_body_leaves_no_file(
    start_daemon: DaemonFactory, state_dir: Path,
) -> None:
    d = await start_daemon(limits=Limits(spill_threshold=4096))
    client = await open_data(d.port, f"postmaster@{DOMAIN}")
    await client.send(b"y" * 998 + b"\r\n" * 1 + (b"z" * 998 + b"\r\n") * 50)
    await until(lambda: any((state_dir / "spool" / "incoming").iterdir()))
    client.writer.transport.abort()
    await until(lambda: not any((state_dir / "spool" / "incoming").iterdir()))


async def test_queue_show_and_delete_of_a_spooled_message(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
) -> None:
    directory.add(GRAD, ["marie@perso.example"])
    directory.delete(GRAD)
    sink.handler.data_reply = "451 4.3.0 later"
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    _, data = await smtp_send(d.port, "a@sender.example", [GRAD], BIG)
    assert data is not None
    queue_id = data[1].split()[-1]
    await until(lambda: not d.dispatcher.in_flight)
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder.cli", "queue", "show", queue_id, "--state-dir",
        str(state_dir), "--json", stdout=asyncio.subprocess.PIPE)
    out, _ = await run.communicate()
    headers = dict(json.loads(out)["headers"])
    assert headers["Subject"] == "hello" and "Received" in headers
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "forwarder.cli", "queue", "delete", queue_id, "--yes",
        "--state-dir", str(state_dir))
    assert await run.wait() == 0
    assert not (state_dir / "spool" / queue_id).exists()
