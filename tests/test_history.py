"""The delivery history per address, end to end: the real daemon, real sinks, the CLI as an
admin runs it (`forwarder history`, `forwarder send-test`, `forwarder account purge`)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from forwarder import cli
from forwarder.clock import FakeClock
from forwarder.config import HistorySettings, HostPort
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from forwarder.history import view
from forwarder.history.recorder import DAY
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Sink,
    scan_due,
    simple_message,
    smtp_send,
    until,
)
from tests.test_mx_delivery import self_signed
from tests.test_service import Service, config_text

GRAD = f"marie.curie@{DOMAIN}"
TARGET = "marie@example.org"
CLOSED = f"jean.dupont@{DOMAIN}"
JOBTEASER = "noreply@jobteaser.com"

Run = tuple[int, str, str]


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDER_CONFIG", raising=False)


def run(capsys: pytest.CaptureFixture[str], state_dir: Path, *argv: str) -> Run:
    """`forwarder ARGV --state-dir STATE` in this thread: `history` reads the queue file
    and never waits for the daemon."""
    capsys.readouterr()
    code = cli.main([*argv, "--state-dir", str(state_dir)])
    out, err = capsys.readouterr()
    return code, out, err


async def run_in_thread(capsys: pytest.CaptureFixture[str], state_dir: Path, *argv: str) -> Run:
    """For `send-test`, which waits on the daemon that runs in this test's event loop."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, [*argv, "--state-dir", str(state_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def history_doc(capsys: pytest.CaptureFixture[str], state_dir: Path, *argv: str) -> Any:
    code, out, err = run(capsys, state_dir, "history", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def outcomes(capsys: pytest.CaptureFixture[str], state_dir: Path, address: str) -> list[str]:
    doc = history_doc(capsys, state_dir, address)
    return [t["outcome"] for m in doc["messages"] for t in m["targets"]]


def graduate(directory: Directory, address: str, target: str | None) -> None:
    directory.add(address, [target] if target else [])
    directory.delete(address)


async def send(d: Daemon, rcpt: str, msgid: str, subject: str = "Réinitialisation") -> str:
    _, data = await smtp_send(d.port, JOBTEASER, [rcpt],
                              simple_message(subject, f"<{msgid}@jobteaser.com>"))
    assert data is not None and data[0] == 250, data
    return data[1].rsplit(" ", 1)[1]


async def test_history_tells_the_help_desk_what_became_of_each_message(
    start_daemon: DaemonFactory, directory: Directory, state_dir: Path, clock: FakeClock,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    graduate(directory, GRAD, TARGET)
    graduate(directory, CLOSED, None)
    sink = Sink(tls_context=self_signed(tmp_path))
    await sink.start()
    try:
        d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
        t0 = clock.now()
        # 1. The reset, delivered.
        delivered = await send(d, GRAD, "reset1")
        await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered"])
        # 2. Refused by the target's provider: bounced, the DSN to JobTeaser.
        clock.advance(60)
        sink.handler.rcpt_reply = lambda r: "550 5.1.1 no such user" if r == TARGET else None
        bounced = await send(d, GRAD, "reset2")
        await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered", "failed"])
        assert (await sink.wait_for(2))[1].rcpt_tos == [JOBTEASER]
        # 3. Deferred, then delivered at the retry.
        clock.advance(60)
        sink.handler.rcpt_reply = lambda r: "451 4.7.1 try later"
        late = await send(d, GRAD, "reset3")
        await until(lambda: outcomes(capsys, state_dir, GRAD)[-1] == "deferred")
        sink.handler.rcpt_reply = lambda r: None
        clock.advance(300)
        await scan_due(d)
        await until(lambda: outcomes(capsys, state_dir, GRAD)[-1] == "delivered")
        # 4. Refused at RCPT: a closed address.
        clock.advance(60)
        rcpts, _ = await smtp_send(d.port, JOBTEASER, [CLOSED], simple_message())
        assert rcpts[CLOSED][0] == 550
        await until(lambda: history_doc(capsys, state_dir, CLOSED)["refusals"] != [])
    finally:
        await sink.stop()

    doc = history_doc(capsys, state_dir, GRAD)
    assert doc["address"] == GRAD and doc["now"]["target"] == TARGET
    first, second, third = doc["messages"]
    assert [m["queue_id"] for m in doc["messages"]] == [delivered, bounced, late]
    assert first["sender"] == JOBTEASER and first["from_domain"] == "jobteaser.com"
    assert first["message_id"] == "<reset1@jobteaser.com>" and first["subject"] is None
    assert first["client"] == "127.0.0.1" and first["size"] > 100 and first["test"] is False
    assert first["received_at"] == view.iso(t0)
    (ok,) = first["targets"]
    assert ok["target"] == TARGET and ok["route"] == "redirect" and ok["in_queue"] is None
    (attempt,) = ok["attempts"]
    assert attempt["tls"] is True and attempt["reply"] == "250 2.0.0 Ok: stored"
    assert attempt["relay"] == f"127.0.0.1[127.0.0.1]:{sink.port}"
    (refused,) = second["targets"]
    assert refused["outcome"] == "failed" and refused["attempts"][0]["reply"].startswith(
        "550 5.1.1 no such user")
    assert refused["dsn_queue_id"] and refused["dsn_queue_id"] != bounced
    (retried,) = third["targets"]
    assert [a["reply"].split()[0] for a in retried["attempts"]] == ["451", "250"]
    assert retried["outcome"] == "delivered" and retried["next_attempt"] is None

    code, text, _ = run(capsys, state_dir, "history", GRAD)
    assert code == 0
    lines = text.splitlines()
    now = time.time()  # the CLI's: the daemon's clock is 2027's
    assert lines[0] == f"{GRAD}: now accepted, 250 2.1.5 Ok (redirect to {TARGET})"
    assert lines[1] == (
        f"{view.when(t0, now)} from {JOBTEASER}, subject not stored, 1 KB, "
        f"<reset1@jobteaser.com>, queue id {delivered}; delivered "
        f"{view.clock_time(t0, t0, now)} to {TARGET} via 127.0.0.1, TLS, 250 2.0.0 Ok: stored")
    assert (f"not delivered {view.clock_time(t0 + 60, t0, now)} to {TARGET} via 127.0.0.1, "
            "TLS, 550 5.1.1 no such user") in lines[2]
    assert lines[2].endswith(f"; bounced: DSN {refused['dsn_queue_id']} to {JOBTEASER}")
    assert lines[3].endswith("250 2.0.0 Ok: stored (attempt 2)")
    assert lines[4] == (f"{view.INDENT}earlier: deferred {view.clock_time(t0 + 120, t0, now)} "
                        f"for {TARGET} via 127.0.0.1, TLS, 451 4.7.1 try later")
    assert lines[-1].startswith("-- 3 message(s), 0 refusal(s) at RCPT; history kept 30 days")

    code, text, _ = run(capsys, state_dir, "history", CLOSED)
    assert code == 0
    assert f"{CLOSED}: now refused, 550 5.1.1 <{CLOSED}>: address closed" in text
    assert (f"{view.when(t0 + 480, now)} refused at RCPT: mail from {JOBTEASER} (client "
            f"127.0.0.1) got 550 5.1.1 <{CLOSED}>: address closed") in text
    (refusal,) = history_doc(capsys, state_dir, CLOSED)["refusals"]
    assert refusal["sender"] == JOBTEASER and refusal["reply"].startswith("550 5.1.1")


async def test_history_filters_by_sender_and_time(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    clock: FakeClock, capsys: pytest.CaptureFixture[str],
) -> None:
    graduate(directory, GRAD, TARGET)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await send(d, GRAD, "old")
    clock.advance(3 * DAY)
    news = (b"From: Alumni <alumni@sigma-clermont.fr>\r\nMessage-ID: <news@school.test>\r\n"
            b"Subject: news\r\n\r\nhello\r\n")
    _, data = await smtp_send(d.port, "alumni@sigma-clermont.fr", [GRAD], news)
    assert data is not None and data[0] == 250
    await sink.wait_for(2)
    await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered", "delivered"])

    def ids(*argv: str) -> list[str | None]:
        return [m["message_id"] for m in history_doc(capsys, state_dir, GRAD, *argv)["messages"]]

    assert ids("--from", "jobteaser.com") == ["<old@jobteaser.com>"]
    assert ids("--from", "com") == ["<old@jobteaser.com>"]  # a parent domain matches
    assert ids("--from", "ALUMNI@sigma-clermont.fr") == ["<news@school.test>"]
    assert ids("--from", "example.net") == []
    since = view.local(clock.now() - DAY).date().isoformat()
    assert ids("--since", since) == ["<news@school.test>"]
    assert run(capsys, state_dir, "history", GRAD, "--since", "yesterday")[0] == 2
    code, _, err = run(capsys, state_dir, "history", "someone@example.org")
    assert code == 1 and "not in our domains" in err


async def test_retention_on_an_injected_clock(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    clock: FakeClock, capsys: pytest.CaptureFixture[str],
) -> None:
    graduate(directory, GRAD, TARGET)
    graduate(directory, CLOSED, None)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await send(d, GRAD, "month-old")
    await smtp_send(d.port, JOBTEASER, [CLOSED], simple_message())
    await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered"])
    clock.advance(29 * DAY)
    await send(d, GRAD, "recent")
    await sink.wait_for(2)
    await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered", "delivered"])
    assert await d.history.purge_expired() == 0  # nothing is 30 days old yet
    clock.advance(2 * DAY)
    assert await d.history.purge_expired() == 2  # the first message's row and the refusal
    (kept,) = history_doc(capsys, state_dir, GRAD)["messages"]
    assert kept["message_id"] == "<recent@jobteaser.com>"
    assert history_doc(capsys, state_dir, CLOSED)["refusals"] == []


async def test_retention_zero_keeps_nothing(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    clock: FakeClock, capsys: pytest.CaptureFixture[str],
) -> None:
    graduate(directory, GRAD, TARGET)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await send(d, GRAD, "kept")
    await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered"])
    # Turned off in the configuration file, then SIGHUP.
    d.reload_settings = lambda: dataclasses.replace(
        d.settings, history=HistorySettings(retention_days=0))
    assert d.reload()
    await send(d, GRAD, "not-kept")
    await sink.wait_for(2)
    assert await d.history.purge_expired() == 1  # what was kept before goes too
    assert history_doc(capsys, state_dir, GRAD)["messages"] == []


async def test_subjects_only_when_turned_on(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    graduate(directory, GRAD, TARGET)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port),
                           history=HistorySettings(subjects=True))
    subject = "=?utf-8?q?R=C3=A9initialisation_de_votre_mot_de_passe?="
    await send(d, GRAD, "s", subject)
    await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered"])
    (message,) = history_doc(capsys, state_dir, GRAD)["messages"]
    assert message["subject"] == "Réinitialisation de votre mot de passe"
    assert "'Réinitialisation de votre mot de passe'" in run(
        capsys, state_dir, "history", GRAD)[1]


async def test_account_purge_erases_the_history(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    graduate(directory, GRAD, TARGET)
    graduate(directory, CLOSED, None)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await send(d, GRAD, "one")
    await send(d, GRAD, "two")
    await smtp_send(d.port, JOBTEASER, [CLOSED], simple_message())
    await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered", "delivered"])
    code, out, _ = run(capsys, state_dir, "account", "purge", GRAD, "--yes")
    assert code == 0 and "history on this node erased (2 rows)" in out
    code, out, _ = run(capsys, state_dir, "account", "purge", CLOSED, "--yes", "--json")
    assert code == 0 and json.loads(out) == {"purged": CLOSED, "account": True,
                                             "history_rows": 1}
    with sqlite3.connect(d.settings.queue_path) as conn:
        dump = "\n".join(conn.iterdump())
    assert "marie" not in dump and "jean.dupont" not in dump
    assert history_doc(capsys, state_dir, GRAD)["messages"] == []
    # Another node, sharing the directory, keeps its own history: purging there finds
    # no account any more, erases the history all the same (none here: refused).
    code, _, err = run(capsys, state_dir, "account", "purge", GRAD, "--yes")
    assert code == 1 and "no such account" in err


async def test_send_test_delivered_and_refused(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    graduate(directory, GRAD, TARGET)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    code, out, err = await run_in_thread(capsys, state_dir, "send-test", GRAD, "--wait", "10")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"test message sent to {GRAD} through 127.0.0.1:{d.port}")
    assert " TEST from postmaster@sigma-clermont.fr, " in lines[1]
    assert f"delivered {view.clock_time(d.clock.now(), d.clock.now(), d.clock.now())} to " \
           f"{TARGET} via 127.0.0.1, no TLS, 250 2.0.0 Ok: stored" in lines[1]
    (got,) = sink.messages
    message = email.message_from_bytes(got.content)
    assert message["Auto-Submitted"] == "auto-generated" and message["X-Forwarder-Test"]
    text = message.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert "Ceci est un message de test" in text.decode() and "This is a test message" in \
        text.decode()
    # From our own domain, so SRS leaves it as it is (it already passes SPF from here).
    assert got.rcpt_tos == [TARGET] and got.mail_from == f"postmaster@{DOMAIN}"
    # Counted apart: a test is not the school's mail.
    registry = d.metrics.registry
    # Counted once the delivery's commit returns, just after the command saw it.
    await until(lambda: registry.get_sample_value("forwarder_test_deliveries_total",
                                                  {"result": "delivered"}) == 1)
    assert registry.get_sample_value("forwarder_deliveries_total",
                                     {"result": "delivered", "destination": "redirect"}) == 0

    sink.handler.rcpt_reply = lambda r: "550 5.1.1 <marie@example.org>: no such user"
    code, out, err = await run_in_thread(capsys, state_dir, "send-test", GRAD, "--json")
    assert code == 1
    assert err == ("forwarder: not accepted by every target: marie@example.org failed: "
                   "550 5.1.1 <marie@example.org>: no such user\n")
    doc = json.loads(out)
    assert doc["ok"] is False and doc["message"]["test"] is True
    assert doc["message"]["targets"][0]["dsn_queue_id"] is None  # a test is never bounced
    await until(lambda: d.dispatcher.in_flight == set())
    with sqlite3.connect(d.settings.queue_path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    assert len(sink.messages) == 1
    assert registry.get_sample_value("forwarder_test_deliveries_total",
                                     {"result": "failed"}) == 1
    # Not evidence against the target (the dead-target rule): ordinary mail refused the
    # same way is the first failure on record.
    watch = d.targets.watch
    assert watch is not None
    await watch.flush()
    assert directory.require(GRAD).targets[0].health.failures == 0
    await send(d, GRAD, "after-test")
    # Found by its Message-ID: the fake clock gives all three messages the same time.
    await until(lambda: [t["outcome"] for m in history_doc(capsys, state_dir, GRAD)["messages"]
                         if m["message_id"] == "<after-test@jobteaser.com>"
                         for t in m["targets"]] == ["failed"])
    await until(lambda: d.dispatcher.in_flight == set())
    await watch.flush()
    assert directory.require(GRAD).targets[0].health.failures == 1


async def test_send_test_needs_the_daemon_and_says_so(
    start_daemon: DaemonFactory, directory: Directory, state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = await run_in_thread(capsys, state_dir, "send-test", GRAD)
    assert code == 1 and "the daemon is not running" in err
    code, _, err = run(capsys, state_dir, "history", GRAD)
    assert code == 1 and "no queue database here" in err
    graduate(directory, CLOSED, None)
    await start_daemon()
    code, out, err = await run_in_thread(capsys, state_dir, "send-test", CLOSED)
    assert (code, out) == (1, "")
    assert err.startswith(f"forwarder: refused at RCPT: 550 5.1.1 <{CLOSED}>: address closed")


async def test_several_processes_write_one_history(tmp_path: Path, sink: Sink,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """With an acceptor process, mail accepted by either process is in the history."""
    state_dir = tmp_path / "state"
    graduate(Directory(state_dir / "directory.sqlite3", actor="test"), GRAD, TARGET)
    svc = Service(tmp_path, config_text([DOMAIN], smarthost=sink.port,
                                        extra="acceptors = 1\n"), state_dir=state_dir)
    await svc.start()
    try:
        await svc.wait_notify("READY=1")
        for n in range(8):
            _, data = await smtp_send(svc.port, JOBTEASER, [GRAD],
                                      simple_message(msgid=f"<{n}@jobteaser.com>"))
            assert data is not None and data[0] == 250
        await sink.wait_for(8)
        await until(lambda: outcomes(capsys, state_dir, GRAD) == ["delivered"] * 8)
        code, _, err = await run_in_thread(capsys, state_dir, "send-test", GRAD)
        assert code == 0, err
    finally:
        assert await svc.close() == 0
