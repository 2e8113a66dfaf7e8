"""The core path end to end: RCPT verdicts, durable queue, relay to a real SMTP sink."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.directory import Directory
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Sink,
    held_by_another_process,
    refused_port,
    scan_due,
    simple_message,
    smtp_send,
    until,
)

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@perso.example"


def queue_rows(state_dir: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(state_dir / "queue.sqlite3")
    try:
        return conn.execute("SELECT rcpt, attempts FROM recipients").fetchall()
    finally:
        conn.close()


async def test_redirect_is_forwarded_with_bytes_unchanged(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    body = simple_message()
    rcpts, data = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], body)
    assert rcpts[GRAD][0] == 250 and rcpts[GRAD][1].startswith("2.1.5")
    assert data is not None and data[0] == 250 and "queued as" in data[1]
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == [TARGET]
    # The forwarded bytes are the received bytes with one Received: header prepended.
    assert got.content.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert got.content.endswith(body)
    header = got.content[: len(got.content) - len(body)]
    assert header.count(b"\r\nReceived:") == 0 and header.count(b"Received:") == 1
    assert b"for <jean.dupont@sigma-clermont.fr>" in header


async def test_active_account_goes_to_mailbox_host(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    directory.add(GRAD, [TARGET])  # active: the redirect is not used yet
    d = await start_daemon(mailbox_host=HostPort("127.0.0.1", sink.port))
    rcpts, _ = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD.upper()],
                                  simple_message())
    assert rcpts[GRAD.upper()][0] == 250
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == [GRAD]
    assert got.mail_from == "noreply@jobteaser.com"


@pytest.mark.parametrize(
    ("rcpt", "code", "enhanced", "text"),
    [
        (f"closed.student@{DOMAIN}", 550, "5.1.1",
         "address closed, no forwarding address declared / "
         "adresse fermee, aucune redirection declaree"),
        (f"nobody@{DOMAIN}", 550, "5.1.1", "user unknown"),
        ("victim@other.example", 554, "5.7.1", "relay access denied"),
        (f"x%other.example@{DOMAIN}", 553, "5.1.3", "bad recipient address syntax"),
        (f"active.nomailbox@{DOMAIN}", 451, "4.3.0", "destination not configured"),
        (f"loop.student@{DOMAIN}", 550, "5.4.6", "forwarding loop"),
    ],
)
async def test_refused_recipients(
    start_daemon: DaemonFactory, directory: Directory, rcpt: str, code: int, enhanced: str,
    text: str,
) -> None:
    directory.add(f"closed.student@{DOMAIN}")
    directory.delete(f"closed.student@{DOMAIN}")
    directory.add(f"active.nomailbox@{DOMAIN}")
    # A redirect into our own domain cannot be declared through the CLI; write it raw.
    directory.add(f"loop.student@{DOMAIN}")
    directory.delete(f"loop.student@{DOMAIN}")
    directory.conn.execute(
        "INSERT INTO targets (address, position, target, state, why, declared_at, changed_at)"
        " VALUES (?, 0, ?, 'confirmed', 'written raw', 0, 0)",
        (f"loop.student@{DOMAIN}", f"other@{DOMAIN}"))
    d = await start_daemon()
    rcpts, data = await smtp_send(d.port, "noreply@jobteaser.com", [rcpt], simple_message())
    got_code, message = rcpts[rcpt]
    assert got_code == code
    assert message.startswith(f"{enhanced} <{rcpt}>: {text}")
    assert data is None
    assert queue_rows(d.settings.state_dir) == []


async def test_postmaster_and_abuse_go_to_configured_address(
    start_daemon: DaemonFactory, sink: Sink
) -> None:
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    rcpts, _ = await smtp_send(d.port, "someone@outside.example",
                               [f"postmaster@{DOMAIN}", f"Abuse@{DOMAIN}"], simple_message())
    assert all(code == 250 for code, _ in rcpts.values())
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == ["it-team@school-it.example"]  # one copy for both role accounts


async def test_redirect_changed_with_cli_applies_to_next_message(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    await sink.wait_for(1)
    from forwarder.cli import main

    assert main(["account", "redirect", GRAD, "new.address@elsewhere.example",
                 "--state-dir", str(d.settings.state_dir), "--no-dns-check"]) == 0
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    messages = await sink.wait_for(2)
    assert messages[1].rcpt_tos == ["new.address@elsewhere.example"]


async def test_sink_down_then_up_is_retried_on_backoff(
    start_daemon: DaemonFactory, directory: Directory, clock: FakeClock
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    port = await refused_port()
    d = await start_daemon(smarthost=HostPort("127.0.0.1", port))
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    assert data is not None and data[0] == 250
    await until(lambda: queue_rows(d.settings.state_dir) == [(TARGET, 1)])
    up = Sink()
    await up.start(port)
    try:
        clock.advance(299)
        assert await scan_due(d) == 0  # not due before 300 s (first backoff step)
        clock.advance(1)
        assert await scan_due(d) == 1
        (got,) = await up.wait_for(1)
        assert got.rcpt_tos == [TARGET]
        await until(lambda: queue_rows(d.settings.state_dir) == [])
    finally:
        await up.stop()


async def test_destination_tempfail_then_permfail(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, clock: FakeClock
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    sink.handler.rcpt_reply = lambda rcpt: "450 4.2.0 mailbox busy"
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    await until(lambda: queue_rows(d.settings.state_dir) == [(TARGET, 1)])
    clock.advance(300)
    await scan_due(d)
    await until(lambda: queue_rows(d.settings.state_dir) == [(TARGET, 2)])
    clock.advance(599)  # second step is 600 s
    assert await scan_due(d) == 0
    sink.handler.rcpt_reply = lambda rcpt: "550 5.1.1 no such user"
    clock.advance(1)
    assert await scan_due(d) == 1
    # A permanent failure ends the recipient at once (no further retries).
    await until(lambda: queue_rows(d.settings.state_dir) == [])
    assert sink.messages == []
    # The queue-depth metric knows two states, and the failed recipient is in neither.
    await until(lambda: not d.dispatcher.in_flight)
    await d.refresh_status()
    depth = {state: d.metrics.registry.get_sample_value("forwarder_queue_depth",
                                                        {"state": state})
             for state in ("queued", "in_flight", "failed")}
    assert depth == {"queued": 0, "in_flight": 0, "failed": None}


async def test_directory_locked_gives_451_not_5xx(
    start_daemon: DaemonFactory, directory: Directory, state_dir: Path
) -> None:
    directory.add(GRAD, [TARGET])
    d = await start_daemon(busy_timeout=0.2)
    # Another process holds every WAL lock byte of the directory's shared-memory index,
    # as a process stuck in a checkpoint or recovery would (SQLite's unix VFS: bytes
    # 120..127 of the -shm file). Our reads cannot start: the RCPT must be deferred.
    lock = ("import fcntl, os\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX, 8, 120, 0)")
    async with held_by_another_process(lock, state_dir / "directory.sqlite3-shm"):
        # SQLite gives up on WAL read locks after its own retries, about 10 s whatever
        # busy_timeout says (then SQLITE_PROTOCOL): the RCPT reply takes that long.
        rcpts, _ = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message(),
                                   timeout=30)
        assert rcpts[GRAD][0] == 451
        assert rcpts[GRAD][1].startswith(f"4.3.0 <{GRAD}>: temporary lookup failure")
    # The fault cleared: the next RCPT is answered normally, without a restart.
    rcpts, _ = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    assert rcpts[GRAD][0] == 451 and "not configured" in rcpts[GRAD][1]  # active, no mailbox


async def test_corrupted_directory_gives_451(
    start_daemon: DaemonFactory, directory: Directory, state_dir: Path
) -> None:
    directory.add(GRAD, [TARGET])
    directory.close()
    d = await start_daemon()
    path = state_dir / "directory.sqlite3"
    # Overwrite the pages with garbage, as a failing disk would.
    for name in ("directory.sqlite3-wal",):
        (state_dir / name).unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)
    path.write_bytes(bytes(data))
    rcpts, _ = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    assert rcpts[GRAD][0] == 451


async def test_bare_postmaster_without_domain_is_accepted(
    start_daemon: DaemonFactory, sink: Sink
) -> None:
    """RFC 5321 4.1.1.3: RCPT TO:<Postmaster> (no domain) must be accepted."""
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    rcpts, data = await smtp_send(d.port, "someone@outside.example", ["Postmaster"],
                                  simple_message())
    assert rcpts["Postmaster"][0] == 250
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == ["it-team@school-it.example"]
