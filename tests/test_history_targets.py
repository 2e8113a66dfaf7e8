"""The delivery history of a graduate with several redirect targets, end to end: the real
daemon and CLI, each provider a real SMTP sink found by MX through a real DNS server. Each
target is listed with its own attempts and outcome; the notices to the targets and the
replies to their confirm+ addresses are in the address's history too."""

from __future__ import annotations

import asyncio
import email
import json
import time
from pathlib import Path
from typing import Any

import pytest

from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.config import DeliverySettings, HostPort, TargetSettings
from forwarder.history import view
from tests.conftest import DOMAIN, DaemonFactory, Providers, scan_due, smtp_send, until

GRAD = f"marie.curie@{DOMAIN}"
HOME = "marie@perso.example"
WORK = "marie.curie@work.example"
SENDER = "noreply@jobteaser.example"
ADMIN = "it@school-it.example"


@pytest.fixture
def clock() -> FakeClock:
    # The admin commands sign the notices' tokens with the real time.
    return FakeClock(time.time() + 60)


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDER_CONFIG", raising=False)


async def cli(capsys: pytest.CaptureFixture[str], state_dir: Path,
              *argv: str) -> tuple[int, str]:
    """An admin command, in a thread: `account redirect` waits on nothing of the daemon's,
    but the event loop must go on serving it meanwhile."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, [*argv, "--state-dir", str(state_dir)])
    return code, capsys.readouterr().out


def history(capsys: pytest.CaptureFixture[str], state_dir: Path) -> Any:
    """`forwarder history GRAD --json`, in this thread (it only reads the queue file)."""
    capsys.readouterr()
    assert main(["history", GRAD, "--json", "--state-dir", str(state_dir)]) == 0
    return json.loads(capsys.readouterr().out)


async def test_each_target_notices_and_replies_in_the_history(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = await start_daemon(
        dns_servers=(HostPort("127.0.0.1", providers.dns.port),), postmaster=ADMIN,
        delivery=DeliverySettings(mx_port=providers.port),
        targets=TargetSettings(notice_interval=0.05))
    for argv in (("add", GRAD, "--no-dns-check"), ("delete", GRAD),
                 ("redirect", GRAD, HOME, WORK, "--no-dns-check")):
        assert (await cli(capsys, state_dir, "account", *argv))[0] == 0
    await scan_due(d)
    (home_notice,) = await providers["perso.example"].wait_for(1)
    await providers["work.example"].wait_for(1)
    confirm = email.message_from_bytes(home_notice.content)["Reply-To"].strip("<>")
    # The graduate confirms her home address from her mailbox.
    rcpts, data = await smtp_send(d.port, HOME, [confirm], b"Subject: Re\r\n\r\nok\r\n")
    assert rcpts[confirm][0] == 250 and data is not None and data[0] == 250
    # A reset from JobTeaser: delivered at home, refused by the work provider (bounced).
    providers["work.example"].handler.rcpt_reply = lambda r: "550 5.1.1 no such user"
    _, data = await smtp_send(d.port, SENDER, [GRAD],
                              b"From: JobTeaser <noreply@jobteaser.example>\r\n"
                              b"Message-ID: <reset@jobteaser.example>\r\n\r\nreset\r\n")
    assert data is not None and data[0] == 250
    queue_id = data[1].rsplit(" ", 1)[1]

    def reset(doc: Any) -> Any:
        return next((m for m in doc["messages"] if m["queue_id"] == queue_id), None)

    def settled() -> bool:
        found = reset(history(capsys, state_dir))
        return found is not None and len(found["targets"]) == 2 and all(
            t["outcome"] in ("delivered", "failed") for t in found["targets"])

    await until(settled)
    doc = history(capsys, state_dir)
    notices = [m for m in doc["messages"] if m["notice"]]
    assert sorted((m["notice"], m["sender"], m["targets"][0]["target"],
                   m["targets"][0]["route"], m["targets"][0]["outcome"]) for m in notices) == [
        ("confirm", f"postmaster@{DOMAIN}", WORK, "notice", "delivered"),
        ("confirm", f"postmaster@{DOMAIN}", HOME, "notice", "delivered")]
    (reply,) = doc["replies"]
    assert (reply["target"], reply["kind"], reply["sender"], reply["result"]) == (
        HOME, "confirm", HOME, "confirmed")
    message = reset(doc)
    by_target = {t["target"]: t for t in message["targets"]}
    assert set(by_target) == {HOME, WORK}
    assert by_target[HOME]["outcome"] == "delivered"
    assert by_target[WORK]["outcome"] == "failed"
    assert by_target[WORK]["attempts"][0]["reply"].startswith("550 5.1.1 no such user")
    assert by_target[WORK]["dsn_queue_id"]

    code, text = await cli(capsys, state_dir, "history", GRAD)
    assert code == 0
    lines = text.splitlines()
    now = time.time()
    assert lines[0] == f"{GRAD}: now accepted, 250 2.1.5 Ok (redirect to {HOME}, {WORK})"
    assert sum("confirmation notice (asks the target to confirm or refuse) from "
               f"postmaster@{DOMAIN}" in line for line in lines) == 2
    assert f"{view.when(reply_at(doc), now)} target {HOME} confirmed by a message from {HOME}" \
        " (client 127.0.0.1) to its confirm+ address" in lines
    first = next(n for n, line in enumerate(lines) if f"queue id {queue_id}" in line)
    home_line, work_line = (lines[first], lines[first + 1]) if HOME in lines[first] else (
        lines[first + 1], lines[first])
    assert "; delivered " in home_line and f"to {HOME} via mx.perso.example" in home_line
    assert work_line.startswith(f"{view.INDENT}and not delivered ")
    assert f"to {WORK} via mx.work.example" in work_line
    assert "550 5.1.1 no such user" in work_line and "bounced: DSN" in work_line
    assert lines[-1].startswith("-- 3 message(s), 0 refusal(s) at RCPT, 1 reply(ies) to "
                                "notices")

    # `account purge` erases all of it on this node: messages, notices, replies.
    code, out = await cli(capsys, state_dir, "account", "purge", GRAD, "--yes")
    assert code == 0 and "history on this node erased" in out
    gone = history(capsys, state_dir)
    assert [m for m in gone["messages"] if m["targets"][0]["outcome"] != "queued"] == []
    assert gone["replies"] == [] and gone["refusals"] == []


def reply_at(doc: Any) -> float:
    from datetime import datetime
    return datetime.fromisoformat(doc["replies"][0]["at"]).timestamp()
