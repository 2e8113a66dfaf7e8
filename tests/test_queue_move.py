"""A dead node's queue moved to another node: `forwarder queue export` on its state
directory (no daemon there), `forwarder queue import` on a live node, whose daemon then
delivers the mail (docs/cluster.md, "A dead node's queue")."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.conftest import (
    DOMAIN,
    Sink,
    make_settings,
    refused_port,
    simple_message,
    smtp_send,
)

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@gmail.example"


def queued(state_dir: Path) -> int:
    conn = sqlite3.connect(state_dir / "queue.sqlite3")
    try:
        return int(conn.execute("SELECT count(*) FROM recipients").fetchone()[0])
    finally:
        conn.close()


def forwarder(capsys: pytest.CaptureFixture[str], state_dir: Path,
              *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--state-dir", str(state_dir)])
    out, err = capsys.readouterr()
    return code, out, err


async def test_dead_nodes_queue_is_exported_imported_and_delivered(
    tmp_path: Path, sink: Sink, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_dir, live_dir = tmp_path / "mx2", tmp_path / "mx1"
    for state in (dead_dir, live_dir):
        directory = Directory(state / "directory.sqlite3", actor="test")
        directory.add(GRAD, [TARGET])
        directory.delete(GRAD)
        directory.notices_sent([t.id for t in directory.require(GRAD).targets])
        directory.close()
    # The node that dies: its mail cannot leave (the next hop is down).
    dead = Daemon(make_settings(dead_dir, smarthost=HostPort("127.0.0.1",
                                                             await refused_port())),
                  clock=clock)
    await dead.start()
    try:
        for n in range(3):
            _, data = await smtp_send(dead.port, "noreply@jobteaser.com", [GRAD],
                                      simple_message(msgid=f"<{n}@jobteaser.example>"))
            assert data is not None and data[0] == 250
        # Not while its daemon runs: that daemon would deliver the same mail.
        code, _, err = forwarder(capsys, dead_dir, "queue", "export",
                                 str(tmp_path / "early.export"))
        assert code == 1 and "stop it first" in err and len(err.splitlines()) == 1
    finally:
        await dead.stop()
    assert queued(dead_dir) == 3

    export = tmp_path / "mx2.export"
    code, out, _ = forwarder(capsys, dead_dir, "queue", "export", str(export), "--json")
    assert code == 0 and json.loads(out) == {"file": str(export), "messages": 3,
                                             "recipients": 3, "kept": False}
    assert queued(dead_dir) == 0  # in one place at a time: the file
    code, _, err = forwarder(capsys, dead_dir, "queue", "export", str(export))
    assert code == 1 and "already exists" in err

    live = Daemon(make_settings(live_dir, smarthost=HostPort("127.0.0.1", sink.port)),
                  clock=clock)
    await live.start()
    try:
        code, out, _ = forwarder(capsys, live_dir, "queue", "import", str(export), "--json")
        assert code == 0 and json.loads(out)["messages"] == 3
        live.dispatcher.wake()
        got = await sink.wait_for(3)
        assert sorted(m.rcpt_tos[0] for m in got) == [TARGET] * 3
        assert all(m.mail_from.startswith("SRS0=") for m in got)
        # Importing again is refused: that mail has left the queue since.
        code, _, err = forwarder(capsys, live_dir, "queue", "import", str(export))
        assert code == 1 and "already imported into" in err
    finally:
        await live.stop()


def test_import_refuses_what_is_not_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "bogus.export"
    bogus.write_text("email,redirect,status\n")
    code, _, err = forwarder(capsys, tmp_path / "state", "queue", "import", str(bogus))
    assert code == 1 and "not a queue export" in err
