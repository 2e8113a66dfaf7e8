"""Redirect targets end to end: the real daemon, the real CLI, graduates' providers as real
SMTP sinks found by MX through a real DNS server, the time injected."""

from __future__ import annotations

import asyncio
import email
import re
import sqlite3
import time
from email.message import Message
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.cli import main
from forwarder.clock import FakeClock
from forwarder.config import DeliverySettings, HostPort, TargetSettings
from forwarder.daemon import Daemon
from forwarder.directory import Directory, token_secrets_path
from forwarder.srsstore import load_secrets
from forwarder.targets import TargetState
from forwarder.tokens import Binding, TokenKind, make_token
from tests.conftest import (
    DOMAIN,
    DaemonFactory,
    Providers,
    Received,
    Sink,
    scan_due,
    simple_message,
    smtp_send,
    until,
)

GRAD = f"marie.curie@{DOMAIN}"
HOME = "marie@perso.example"
WORK = "marie.curie@work.example"
SENDER = "noreply@jobteaser.example"
ADMIN = "it@school-it.example"
DAY = 86400.0


@pytest.fixture
def clock() -> FakeClock:
    # The admin commands sign with the real time: start the daemon's clock a little later.
    return FakeClock(time.time() + 60)


async def start(start_daemon: DaemonFactory, providers: Providers, **delivery: float) -> Daemon:
    return await start_daemon(
        dns_servers=(HostPort("127.0.0.1", providers.dns.port),), postmaster=ADMIN,
        delivery=DeliverySettings(mx_port=providers.port, **delivery),  # type: ignore[arg-type]
        targets=TargetSettings(notice_interval=0.05))


async def cli(state_dir: Path, *argv: str) -> int:
    return await asyncio.to_thread(main, [*argv, "--state-dir", str(state_dir)])


def states(state_dir: Path) -> dict[str, TargetState]:
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    try:
        row = directory.require(GRAD)
        return {t.target: t.state for t in row.targets}
    finally:
        directory.close()


def history(state_dir: Path) -> list[dict[str, object]]:
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    try:
        return directory.history(GRAD)
    finally:
        directory.close()


def queued(d: Daemon) -> int:
    with sqlite3.connect(d.settings.queue_path) as conn:
        return int(conn.execute("SELECT count(*) FROM recipients").fetchone()[0])


def parsed(got: Received) -> Message:
    return email.message_from_bytes(got.content)


def text_of(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode("utf-8")


def reply_addresses(message: Message) -> tuple[str, str]:
    """(confirm+ address from Reply-To, refuse+ address from the text)."""
    confirm = message["Reply-To"].strip("<>")
    (refuse,) = set(re.findall(r"refuse\+[0-9a-f]+@[\w.-]+", text_of(message)))
    return confirm, refuse


async def graduate_with_targets(state_dir: Path, d: Daemon, *targets: str) -> None:
    assert await cli(state_dir, "account", "add", GRAD, "--no-dns-check") == 0
    assert await cli(state_dir, "account", "delete", GRAD) == 0
    assert await cli(state_dir, "account", "redirect", GRAD, *targets, "--no-dns-check") == 0
    await scan_due(d)


async def test_declared_targets_get_a_notice_that_confirms_or_refuses(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path
) -> None:
    d = await start(start_daemon, providers)
    await graduate_with_targets(state_dir, d, HOME, WORK)
    (home_notice,) = await providers["perso.example"].wait_for(1)
    (work_notice,) = await providers["work.example"].wait_for(1)
    assert home_notice.mail_from == f"postmaster@{DOMAIN}" and home_notice.rcpt_tos == [HOME]
    notice = parsed(home_notice)
    assert notice["Auto-Submitted"] == "auto-generated"
    assert notice["From"] == f"Redirection / Forwarding <postmaster@{DOMAIN}>"
    assert notice["Message-ID"] and notice["Date"] and notice["To"] == f"<{HOME}>"
    assert GRAD in notice["Subject"] and GRAD in text_of(notice)
    assert "Si ce n'est pas vous" in text_of(notice) and "If this is not you" in text_of(notice)
    confirm, _ = reply_addresses(notice)
    _, refuse = reply_addresses(parsed(work_notice))
    assert confirm.startswith("confirm+") and len(confirm.split("@")[0]) <= 64

    # The graduate replies from her mailbox: confirmed, audited, nothing queued.
    await until(lambda: queued(d) == 0)
    reply = b"Subject: Re: Redirection\r\n\r\nok\r\n"
    rcpts, data = await smtp_send(d.port, HOME, [confirm], reply)
    assert rcpts[confirm][0] == 250 and data is not None and data[0] == 250
    assert "recorded" in data[1]
    assert states(state_dir) == {HOME: TargetState.CONFIRMED, WORK: TargetState.PENDING}
    entry = history(state_dir)[-1]
    assert entry["action"] == "confirm" and entry["actor"] == "mail"
    assert entry["new"] == {"target": HOME, "state": "confirmed", "client": "127.0.0.1",
                            "sender": HOME}
    assert queued(d) == 0
    # A stranger owns the work address: refused at once, and the next message skips it.
    rcpts, data = await smtp_send(d.port, "someone@work.example", [refuse], b"\r\nnot me\r\n")
    assert rcpts[refuse][0] == 250 and data is not None and data[0] == 250
    assert states(state_dir)[WORK] is TargetState.REFUSED
    # Both are idempotent: again, and nothing changes.
    assert (await smtp_send(d.port, HOME, [confirm], b"\r\nyes\r\n"))[1] is not None
    assert states(state_dir) == {HOME: TargetState.CONFIRMED, WORK: TargetState.REFUSED}
    _, data = await smtp_send(d.port, SENDER, [GRAD], simple_message())
    assert data is not None and data[0] == 250
    await providers["perso.example"].wait_for(2)
    await until(lambda: queued(d) == 0)
    assert len(providers["work.example"].messages) == 1  # the notice only
    # Only the school can bring a refused target back: a new declaration, a new notice.
    assert await cli(state_dir, "account", "target", GRAD, WORK, "on") == 0
    await scan_due(d)
    await providers["work.example"].wait_for(2)
    assert states(state_dir)[WORK] is TargetState.PENDING


async def test_bad_tokens_are_refused_and_change_nothing(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path, clock: FakeClock
) -> None:
    d = await start(start_daemon, providers)
    await graduate_with_targets(state_dir, d, HOME)
    assert await cli(state_dir, "account", "add", f"pierre.curie@{DOMAIN}", "--redirect",
                     "pierre@perso.example", "--no-dns-check") == 0
    await scan_due(d)
    notices = await providers["perso.example"].wait_for(2)
    by_to = {got.rcpt_tos[0]: parsed(got) for got in notices}
    confirm, refuse = reply_addresses(by_to[HOME])
    pierre_confirm, _ = reply_addresses(by_to["pierre@perso.example"])
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    target = directory.require(GRAD).targets[0]
    secret = load_secrets(token_secrets_path(state_dir))[0]
    # Signed with our secret, for Marie's target id, but bound to Pierre's account.
    other = make_token(TokenKind.CONFIRM, target.id,
                       Binding(f"pierre.curie@{DOMAIN}", HOME, target.declared_at),
                       clock.now() + 30 * DAY, secret)
    token = confirm.split("+")[1].split("@")[0]
    changed = token[:30] + ("0" if token[30] != "0" else "1") + token[31:]
    bad = [f"confirm+{'7' * 40}@{DOMAIN}", f"confirm+{changed}@{DOMAIN}",
           f"confirm+{other}@{DOMAIN}", f"refuse+{token}@{DOMAIN}",
           pierre_confirm.replace("confirm+", "refuse+")]
    before = history(state_dir)
    for address in bad:
        rcpts, data = await smtp_send(d.port, HOME, [address], b"\r\nyes\r\n")
        assert rcpts[address][0] == 550 and data is None, address
        assert rcpts[address][1].startswith("5.1.1"), rcpts[address]
    clock.advance(31 * DAY)
    for address in (confirm, refuse):
        rcpts, data = await smtp_send(d.port, HOME, [address], b"\r\nyes\r\n")
        assert rcpts[address][0] == 550 and data is None
    assert states(state_dir) == {HOME: TargetState.PENDING}
    assert history(state_dir) == before
    directory.close()


async def test_an_rcpt_probe_confirms_nothing_and_an_autoreply_is_ignored(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path
) -> None:
    """A gateway's recipient verification (RCPT, then RSET) must not act on a token, nor a
    vacation reply landing on the Reply-To."""
    d = await start(start_daemon, providers)
    await graduate_with_targets(state_dir, d, HOME)
    (notice,) = await providers["perso.example"].wait_for(1)
    confirm, _ = reply_addresses(parsed(notice))
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    for line in (b"EHLO gw.test", b"MAIL FROM:<>", f"RCPT TO:<{confirm}>".encode(), b"RSET",
                 b"QUIT"):
        writer.write(line + b"\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert b"\r\n250 2.1.5" in answer
    vacation = b"Auto-Submitted: auto-replied\r\nSubject: Away\r\n\r\nBack on Monday.\r\n"
    _, data = await smtp_send(d.port, HOME, [confirm], vacation)
    assert data is not None and data[0] == 250
    assert states(state_dir) == {HOME: TargetState.PENDING}
    assert history(state_dir)[-1]["new"]["ignored"] == "automatic reply"  # type: ignore[index]


async def send_at(d: Daemon, clock: FakeClock, day: float, start: float) -> None:
    """Send one message to the graduate at `day`; return once it and the DSNs it caused
    are settled (delivered, bounced or deferred), so the clock can move on."""
    clock.advance(start + day * DAY - clock.now())
    rcpts, data = await smtp_send(d.port, SENDER, [GRAD], simple_message())
    assert rcpts[GRAD][0] == 250 and data is not None and data[0] == 250, (rcpts, data)

    def settled() -> bool:
        with sqlite3.connect(d.settings.queue_path) as conn:
            fresh = conn.execute("SELECT count(*) FROM recipients WHERE attempts = 0")
            return int(fresh.fetchone()[0]) == 0
    await until(lambda: settled() and not d.dispatcher.in_flight)


def answer(sink: Sink, reply: str | None) -> None:
    """Make `sink` answer every RCPT with `reply` (None: accept)."""
    sink.handler.rcpt_reply = lambda rcpt: reply


async def target_gauge(d: Daemon) -> dict[str, float]:
    await d.targets.refresh_gauge()
    return {s.labels["state"]: s.value
            for f in text_string_to_metric_families(d.metrics.render().decode())
            if f.name == "forwarder_targets" for s in f.samples}


async def test_dead_targets_become_failing_and_a_delivery_revives_them(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path, clock: FakeClock
) -> None:
    # A retry far enough out that a deferred message is still in flight weeks later.
    d = await start(start_daemon, providers, first_retry=10 * DAY, max_retry=10 * DAY,
                    queue_lifetime=200 * DAY)
    await graduate_with_targets(state_dir, d, HOME, WORK)
    home, work = providers["perso.example"], providers["work.example"]
    await home.wait_for(1)
    await work.wait_for(1)
    await until(lambda: queued(d) == 0 and not d.dispatcher.in_flight)
    start_at = clock.now()
    watch = d.targets.watch
    assert watch is not None
    # A policy refusal says nothing about the mailbox: never counted.
    answer(home, "550 5.7.1 message refused by policy")
    for day in (0, 10, 20, 30, 40, 50):
        await send_at(d, clock, day, start_at)
    await watch.flush()
    assert states(state_dir)[HOME] is TargetState.PENDING
    # Home's mailbox is gone: 5 failures over 30 days, and it is failing.
    answer(home, "550 5.1.1 no such user")
    start_at += 60 * DAY
    for day in (0, 8, 16, 24):
        await send_at(d, clock, day, start_at)
    await watch.flush()
    assert states(state_dir)[HOME] is TargetState.PENDING
    await send_at(d, clock, 30, start_at)
    await watch.flush()
    assert states(state_dir) == {HOME: TargetState.FAILING, WORK: TargetState.PENDING}
    assert (await target_gauge(d))["failing"] == 1
    # The graduate is told at the target that still works.
    await scan_due(d)
    told = (await work.wait_for(13))[-1]
    assert told.rcpt_tos == [WORK] and "n'est plus redirigé" in text_of(parsed(told))
    assert HOME in text_of(parsed(told)) and "5.1.1" in text_of(parsed(told))
    tried = len(home.messages), home.connections
    await send_at(d, clock, 31, start_at)
    await work.wait_for(14)
    assert (len(home.messages), home.connections) == tried  # nothing went to the dead one
    # Work's mailbox dies too, with a message deferred just before the last failure.
    answer(work, "550 5.1.1 no such user")
    start_at += 40 * DAY
    for day in (0, 8, 16, 24):
        await send_at(d, clock, day, start_at)
    answer(work, "451 4.2.0 try later")
    await send_at(d, clock, 26, start_at)
    assert queued(d) == 1
    answer(work, "550 5.1.1 no such user")
    await send_at(d, clock, 30, start_at)
    await watch.flush()
    assert states(state_dir) == {HOME: TargetState.FAILING, WORK: TargetState.FAILING}
    rcpts, _ = await smtp_send(d.port, SENDER, [GRAD], simple_message())
    assert rcpts[GRAD] == (550, f"5.1.1 <{GRAD}>: forwarding address no longer works / la "
                                "redirection ne fonctionne plus")
    # One 250 from work's provider (the deferred message, retried) revives it.
    answer(work, None)
    await until(lambda: queued(d) == 1 and not d.dispatcher.in_flight)  # DSNs delivered
    clock.advance(10 * DAY)
    assert await scan_due(d) == 1
    await until(lambda: queued(d) == 0 and not d.dispatcher.in_flight)
    await watch.flush()
    assert states(state_dir) == {HOME: TargetState.FAILING, WORK: TargetState.PENDING}
    rcpts, _ = await smtp_send(d.port, SENDER, [GRAD], simple_message())
    assert rcpts[GRAD][0] == 250
    actions = [e["action"] for e in history(state_dir)]
    assert actions.count("failing") == 2 and actions.count("recovered") == 1


async def test_a_bouncing_notice_counts_and_its_dsn_goes_to_the_admin(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path
) -> None:
    d = await start(start_daemon, providers)
    answer(providers["perso.example"], "550 5.1.1 no such user")
    await graduate_with_targets(state_dir, d, HOME)
    (dsn,) = await providers["school-it.example"].wait_for(1)
    assert dsn.rcpt_tos == [ADMIN] and dsn.mail_from in ("", "<>")
    assert HOME in dsn.content.decode() and b"5.1.1" in dsn.content
    watch = d.targets.watch
    assert watch is not None
    await watch.flush()
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    (target,) = directory.require(GRAD).targets
    assert target.health.failures == 1 and "5.1.1" in (target.last_error or "")
    directory.close()
    labels = {"result": "failed", "destination": "notice"}
    assert d.metrics.registry.get_sample_value("forwarder_deliveries_total", labels) == 1


async def test_imported_targets_get_their_notices_from_the_daemon(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path, tmp_path: Path
) -> None:
    csv = tmp_path / "students.csv"
    csv.write_text("email,redirect,status\n"
                   f"{GRAD},{HOME};{WORK},deleted\n"
                   f"pierre.curie@{DOMAIN},pierre@perso.example,active\n")
    assert await cli(state_dir, "account", "import", str(csv), "--no-dns-check") == 0
    assert states(state_dir) == {HOME: TargetState.PENDING, WORK: TargetState.PENDING}
    d = await start(start_daemon, providers)
    # The daemon claims the owed notices at its own pace and queues them.
    await until(lambda: queued(d) == 0 and len(providers["perso.example"].messages) == 2)
    await providers["work.example"].wait_for(1)
    assert {m.rcpt_tos[0] for m in providers["perso.example"].messages} == {
        HOME, "pierre@perso.example"}
    # The same file again declares nothing: no notice is owed twice.
    assert await cli(state_dir, "account", "import", str(csv), "--no-dns-check") == 0
    assert d.targets.notices is not None and await d.targets.notices.send_owed(10) == 0


async def test_last_success_is_kept_fresh_once_a_day(
    start_daemon: DaemonFactory, providers: Providers, state_dir: Path, clock: FakeClock
) -> None:
    """A delivery that changes nothing is not written at once: `last_success` is refreshed
    in batches, at most once a day per target."""
    # The watch counts calendar days (UTC): start at 01:00 of the next one, so that the
    # deliveries 0.1 and 0.2 days later fall on the same day whenever the test runs (from
    # real time, as the fixture must: it failed between 19:12 and 21:36 UTC).
    clock.advance(DAY - clock.now() % DAY + 3600)
    d = await start(start_daemon, providers)
    await graduate_with_targets(state_dir, d, HOME)
    await providers["perso.example"].wait_for(1)  # the notice: its success is noted too
    await until(lambda: queued(d) == 0 and not d.dispatcher.in_flight)
    watch = d.targets.watch
    assert watch is not None
    first = clock.now()
    await send_at(d, clock, 0.1, first)
    await send_at(d, clock, 0.2, first)
    await watch.flush()

    def last_success() -> float | None:
        directory = Directory(state_dir / "directory.sqlite3", actor="test")
        try:
            return directory.require(GRAD).targets[0].health.last_success
        finally:
            directory.close()

    assert last_success() == first  # the day's first success: the notice's
    await send_at(d, clock, 1.5, first)
    await watch.flush()
    assert last_success() == first + 1.5 * DAY
    assert states(state_dir) == {HOME: TargetState.PENDING}
