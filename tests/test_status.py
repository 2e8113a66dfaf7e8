"""`forwarder status`: the CLI reading a real daemon's status socket (forwarder/control.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from forwarder import cli, log
from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.control import HOUR, STATUS_SOCKET, History
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Sink,
    make_settings,
    simple_message,
    smtp_send,
    until,
)
from tests.test_service import Service, config_text

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@perso.example"
LATE = f"marie.curie@{DOMAIN}"
LATE_TARGET = "marie@slow.example"


async def status(
    capsys: pytest.CaptureFixture[str], state_dir: Path, *extra: str
) -> tuple[int, str, str]:
    """`forwarder status` as an admin runs it; in a thread, because it blocks on the socket
    while the daemon under test answers from this test's event loop."""
    code = await asyncio.to_thread(cli.main, ["status", "--state-dir", str(state_dir), *extra])
    out, err = capsys.readouterr()
    return code, out, err


async def status_doc(capsys: pytest.CaptureFixture[str], state_dir: Path) -> dict[str, Any]:
    code, out, err = await status(capsys, state_dir, "--json")
    assert (code, err) == (0, "")
    doc: dict[str, Any] = json.loads(out)
    return doc


async def test_not_running_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await status(capsys, tmp_path)
    assert code == 1 and out == ""
    assert err == (f"forwarder: the daemon is not running (nothing answers on "
                   f"{tmp_path / STATUS_SOCKET})\n")
    code, out, _ = await status(capsys, tmp_path, "--json")
    assert code == 1
    assert json.loads(out) == {"running": False, "socket": str(tmp_path / STATUS_SOCKET)}


async def test_a_running_daemon_reports_traffic_queue_and_errors(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log.drain_problems()  # warnings of earlier tests in this process
    for address, target in ((GRAD, TARGET), (LATE, LATE_TARGET)):
        directory.add(address, [target])
        directory.delete(address)
    sink.handler.rcpt_reply = lambda rcpt: "451 4.7.1 try later" if rcpt == LATE_TARGET else None
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    for rcpt in (GRAD, LATE):
        _, data = await smtp_send(d.port, "noreply@jobteaser.com", [rcpt], simple_message())
        assert data is not None and data[0] == 250
    await sink.wait_for(1)
    await until(lambda: d.metrics.summary()["deliveries"]["deferred"] == 1)

    doc = await status_doc(capsys, state_dir)
    assert doc["running"] is True and doc["state"] == "running"
    assert doc["pid"] == os.getpid() and doc["version"] == "0.1.0"
    assert doc["listening"] == {"smtp": [f"127.0.0.1:{d.port}"], "metrics": None}
    assert doc["acceptors"] == []
    hour = doc["last_hour"]
    assert (hour["accepted"], hour["delivered"], hour["deferred"], hour["failed"]) == (2, 1, 1, 0)
    # The deferred recipient waits in the queue, counted afresh for the answer.
    assert doc["queue"]["recipients"]["queued"] == 1
    (problem,) = [e for e in doc["errors"] if e["event"] == "delivery"]
    assert problem["level"] == "warning" and problem["process"] == "main"
    assert problem["fields"]["status"] == "deferred"
    assert problem["fields"]["to"] == LATE_TARGET
    assert "451 4.7.1" in problem["fields"]["reason"]

    code, text, _ = await status(capsys, state_dir)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].startswith(f"forwarder 0.1.0: running (pid {os.getpid()}), up ")
    assert lines[1] == f"listening: SMTP 127.0.0.1:{d.port}; metrics off"
    assert lines[2].startswith("since start (")
    assert "2 accepted" in lines[2] and "1 delivered, 1 deferred, 0 failed" in lines[2]
    assert lines[3].startswith("queue: 1 recipient(s) (") and "1 queued" in lines[3]
    assert lines[4] == "last warnings and errors (1, newest last):"
    assert "warning delivery" in lines[5] and f"to={LATE_TARGET}" in lines[5]


async def test_the_socket_is_for_the_service_user_and_group_and_goes_with_the_daemon(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = Daemon(make_settings(state_dir), clock=FakeClock())
    await d.start()
    path = state_dir / STATUS_SOCKET
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    await d.stop()
    assert not path.exists()
    code, _, err = await status(capsys, state_dir)
    assert code == 1 and "not running" in err


async def test_a_socket_left_by_a_crash_means_not_running_then_is_replaced(
    start_daemon: DaemonFactory, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.makedirs(state_dir)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(state_dir / STATUS_SOCKET))
    dead.close()  # the file stays, nothing listens: what SIGKILL leaves behind
    code, _, err = await status(capsys, state_dir)
    assert code == 1 and "the daemon is not running" in err
    await start_daemon()
    assert (await status_doc(capsys, state_dir))["running"] is True


async def test_a_daemon_that_does_not_answer_is_reported_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(tmp_path / STATUS_SOCKET))
    stuck.listen()  # the kernel completes the connection; nobody ever writes
    try:
        code, _, err = await status(capsys, tmp_path, "--timeout", "0.2")
    finally:
        stuck.close()
    assert code == 1
    assert err.startswith("forwarder: the daemon did not answer on ")
    assert err.endswith("within 0.2 s (its event loop may be stuck)\n")


async def test_status_speaks_for_the_acceptor_processes(
    tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mail taken in, and warnings logged, by whichever process took the connection."""
    directory = Directory(tmp_path / "state" / "directory.sqlite3", actor="test")
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port, extra="acceptors = 1\n"))
    await svc.start()
    looped = b"".join(b"Received: from hop%d\r\n" % i for i in range(60)) + simple_message()
    try:
        await svc.wait_notify("READY=1")
        for _ in range(6):
            _, data = await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD], looped)
            assert data is not None and data[0] == 554
            _, data = await smtp_send(svc.port, "noreply@jobteaser.com", [GRAD],
                                      simple_message())
            assert data is not None and data[0] == 250
        await sink.wait_for(6)

        async def settled() -> dict[str, Any]:
            # The acceptor reports once a second.
            while True:
                doc = await status_doc(capsys, svc.state_dir)
                refused = [e for e in doc["errors"] if e["event"] == "refused"]
                if doc["last_hour"]["delivered"] == 6 and len(refused) == 6:
                    return doc
                await asyncio.sleep(0.2)

        doc = await asyncio.wait_for(settled(), 10)
        assert doc["last_hour"]["accepted"] == 6
        assert len(doc["acceptors"]) == 1 and doc["pid"] == svc.proc.pid  # type: ignore[union-attr]
        assert {e["process"] for e in doc["errors"]} <= {"main", "acceptor-0"}
        assert doc["resident_memory_bytes"] > 2 * 10_000_000  # two Python processes
    finally:
        assert await svc.close() == 0


def test_the_last_hour_is_a_difference_of_minute_samples() -> None:
    clock = FakeClock()
    start = clock.now()
    history = History(start, {"accepted": 0})
    for minute in range(1, 91):
        history.record(start + minute * 60, {"accepted": minute * 10})
    # 90 minutes in, 900 counted: the window starts at minute 30 (300 then).
    since, counted = history.last_hour(start + 90 * 60, {"accepted": 900})
    assert since == start + 30 * 60 and counted == {"accepted": 600}
    # Samples are a minute apart (more frequent calls add none), so the window slides by
    # whole minutes: 5 s later it starts at minute 31.
    history.record(start + 90 * 60 + 5, {"accepted": 901})
    assert history.last_hour(start + 90 * 60 + 5, {"accepted": 901}) == (
        start + 31 * 60, {"accepted": 901 - 310})


def test_a_young_daemon_counts_since_its_start() -> None:
    history = History(100.0, {"delivered": 0})
    since, counted = history.last_hour(100.0 + HOUR / 2, {"delivered": 7})
    assert (since, counted) == (100.0, {"delivered": 7})


def test_warnings_and_errors_are_remembered_with_the_process_that_logged_them() -> None:
    log.drain_problems()
    logger = log.get("forwarder.test")
    logger.info("connect", client="192.0.2.1")
    logger.warning("refused", client="192.0.2.1", reason="too_many_hops")
    logger.error("queue_write_failed", error="x" * 1000)
    own = log.drain_problems()
    assert [(e["level"], e["event"]) for e in own] == [("warning", "refused"),
                                                       ("error", "queue_write_failed")]
    assert own[0]["fields"] == {"client": "192.0.2.1", "reason": "too_many_hops"}
    assert len(own[1]["fields"]["error"]) == 303  # long values are cut
    assert log.recent_problems() == []
    log.remember_problems([*own, {"garbage": True}, "not a mapping"], "acceptor-0")  # type: ignore[list-item]
    assert [(e["event"], e["process"]) for e in log.recent_problems()] == [
        ("refused", "acceptor-0"), ("queue_write_failed", "acceptor-0")]
    log.drain_problems()


async def test_a_state_directory_too_deep_for_a_socket_costs_only_the_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    log.drain_problems()
    d = Daemon(make_settings(deep), clock=FakeClock())
    await d.start()
    try:
        _, data = await smtp_send(d.port, "noreply@jobteaser.com", [f"nobody@{DOMAIN}"],
                                  simple_message())
        assert data is None  # the daemon answers SMTP as ever (550 at RCPT here)
        assert [e["event"] for e in log.recent_problems()] == ["status_unavailable"]
        code, _, err = await status(capsys, deep)
    finally:
        await d.stop()
    assert code == 1 and "too long for a Unix socket" in err
