"""Online guessing and sessions that never end: SRS hashes long enough, errors counted per
session and per client address with a growing delay (the tarpit) and `421 4.7.0` at the
hard limit, junk commands limited, and a deadline for the whole session.

Everything goes through real SMTP on loopback to the real daemon. The tarpit waits on the
event loop's clock (a timer, never a sleep); tests that walk through every step shrink
its step (`error_sleep`) so they run in a fraction of a second, and one runs the real
defaults to measure the guessing rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from forwarder.clock import FakeClock
from forwarder.config import HostPort, Limits
from forwarder.directory import Directory
from forwarder.returnpath import HASH_LENGTH
from forwarder.srs import Srs
from forwarder.srsstore import ensure_secrets, load_secrets
from tests.conftest import DOMAIN, DaemonFactory, Sink, simple_message, smtp_send
from tests.test_hostile import RawClient, stuffed

DAY = 86400.0
STEP = 0.05
FAST = Limits(error_sleep=STEP)  # the tarpit's step: 50 ms instead of 1 s


async def rcpt_session(port: int) -> RawClient:
    client = await RawClient.open(port)
    await client.greet()
    assert (await client.cmd("MAIL FROM:<x@guesser.example>"))[0] == 250
    return client


async def timed(client: RawClient, line: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code, text = await client.cmd(line)
    return code, text, time.monotonic() - started


# --- SRS: long hashes, short ones only while they are still valid ------------------------


async def test_srs_addresses_carry_a_long_hash(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory,
) -> None:
    directory.add(f"jean.dupont@{DOMAIN}", ["jd@gmail.example"])
    directory.delete(f"jean.dupont@{DOMAIN}")
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await smtp_send(d.port, "noreply@jobteaser.com", [f"jean.dupont@{DOMAIN}"],
                    simple_message())
    (got,) = await sink.wait_for(1)
    tag, hash_, stamp, *_ = got.mail_from.split("=")
    assert tag == "SRS0" and len(hash_) == HASH_LENGTH == 12 and len(stamp) == 2


def short(secrets: Path, clock: FakeClock, sender: str = "alice@sender.example") -> str:
    """An SRS address as the release before signed them: a 4-character hash."""
    return Srs(load_secrets(secrets), DOMAIN, clock.now, hash_length=4).forward(sender)


async def test_short_hashes_only_on_addresses_issued_before_the_change(
    start_daemon: DaemonFactory, state_dir: Path, clock: FakeClock,
) -> None:
    """An installation upgraded from 4-character hashes: its addresses in flight keep
    working until they expire; a short hash dated after the change is refused."""
    await asyncio.to_thread(state_dir.mkdir, parents=True)
    ensure_secrets(state_dir / "srs-secrets")  # the old release's secrets
    issued_before = short(state_dir / "srs-secrets", clock)
    d = await start_daemon()  # the change: today
    probe = await rcpt_session(d.port)
    assert (await probe.cmd(f"RCPT TO:<{issued_before}>"))[0] == 250
    clock.advance(DAY)
    forged_after = short(state_dir / "srs-secrets", clock, "bob@sender.example")
    assert (await probe.cmd(f"RCPT TO:<{forged_after}>"))[:2] == (
        550, f"5.1.1 <{forged_after}>: invalid SRS address")
    assert (await probe.cmd(f"RCPT TO:<{issued_before}>"))[0] == 250
    clock.advance(21 * DAY)  # 22 days after it was issued: expired
    assert (await probe.cmd(f"RCPT TO:<{issued_before}>"))[0] == 550
    await probe.close()


async def test_a_new_installation_accepts_no_short_hash(
    start_daemon: DaemonFactory, state_dir: Path, clock: FakeClock,
) -> None:
    d = await start_daemon()
    probe = await rcpt_session(d.port)
    assert (await probe.cmd(f"RCPT TO:<{short(state_dir / 'srs-secrets', clock)}>"))[0] == 550
    await probe.close()


# --- The tarpit ----------------------------------------------------------------------


async def test_bad_recipients_are_slowed_down_then_cut_off(
    start_daemon: DaemonFactory,
) -> None:
    """Postfix's model: 10 free errors, then each reply waits a step longer (here 50 ms a
    step), and the 20th error ends the session with 421 4.7.0."""
    d = await start_daemon(limits=FAST)
    client = await rcpt_session(d.port)
    waits = []
    for n in range(1, 20):
        code, _, waited = await timed(client, f"RCPT TO:<nobody{n}@{DOMAIN}>")
        assert code == 550
        waits.append(waited)
    assert sorted(waits[:10])[5] < STEP <= waits[10], waits  # the 11th waits one step
    assert waits[18] >= 9 * STEP, waits  # the 19th nine
    code, _, waited = await timed(client, f"RCPT TO:<nobody20@{DOMAIN}>")
    assert code == 550 and waited >= 10 * STEP  # the longest wait, then the end
    assert await client.reply() == (421, "4.7.0 too many errors, closing connection")
    assert await client.closed()


async def test_reconnecting_does_not_start_afresh(start_daemon: DaemonFactory) -> None:
    """The client address's recent errors count too: its next session gets the longest
    wait at its first error, then 421."""
    d = await start_daemon(limits=FAST)
    first = await rcpt_session(d.port)
    for n in range(20):
        await first.cmd(f"RCPT TO:<nobody{n}@{DOMAIN}>")
    await first.close()
    again = await rcpt_session(d.port)
    code, _, waited = await timed(again, f"RCPT TO:<someone@{DOMAIN}>")
    assert code == 550 and waited >= 10 * STEP
    assert (await again.reply())[0] == 421
    assert await again.closed()


async def test_an_accepted_message_forgives_the_session_not_the_address(
    start_daemon: DaemonFactory, sink: Sink,
) -> None:
    """As in Postfix, a message accepted resets the session's count; the address's
    recent errors stay, so postmaster mail between guesses buys no fresh start."""
    d = await start_daemon(limits=FAST, smarthost=HostPort("127.0.0.1", sink.port))
    client = await rcpt_session(d.port)
    for n in range(15):
        await client.cmd(f"RCPT TO:<nobody{n}@{DOMAIN}>")
    assert (await client.cmd(f"RCPT TO:<postmaster@{DOMAIN}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(stuffed(simple_message()))
    assert (await client.reply())[0] == 250
    assert (await client.cmd("MAIL FROM:<x@guesser.example>"))[0] == 250
    code, _, waited = await timed(client, f"RCPT TO:<nobody16@{DOMAIN}>")
    assert code == 550 and waited >= 6 * STEP  # the address's 16th error
    await client.close()


@pytest.mark.parametrize("listed", ["error_limit_exempt", "xforward_hosts"])
async def test_exempt_networks_are_counted_per_session_only(
    start_daemon: DaemonFactory, listed: str,
) -> None:
    """The school's relay passes its senders' mistakes on: listed in error_limit_exempt,
    or trusted for XFORWARD, its address collects no errors across sessions (each session
    still does)."""
    d = await start_daemon(limits=FAST, **{listed: ("127.0.0.0/8",)})
    waits = []
    for _ in range(3):
        client = await rcpt_session(d.port)
        for n in range(10):
            code, _, waited = await timed(client, f"RCPT TO:<nobody{n}@{DOMAIN}>")
            assert code == 550
            waits.append(waited)
        await client.close()
    # Counted across sessions, the last ten would have waited 1 to 10 steps each.
    assert sorted(waits)[15] < STEP and max(waits) < 5 * STEP, waits


async def guesser(port: int, replies: list[int], stop: asyncio.Event) -> None:
    """Guess SRS addresses as fast as the daemon answers, reconnecting when cut off."""
    n = 0
    while not stop.is_set():
        with contextlib.suppress(OSError, AssertionError, TimeoutError):
            client = await rcpt_session(port)
            try:
                while not stop.is_set():
                    n += 1
                    await client.send(f"RCPT TO:<SRS0=Ab{n:02d}=AA=victim.example=x@{DOMAIN}>"
                                      "\r\n".encode())
                    code, _ = await client.reply(timeout=60)  # a patient guesser
                    replies.append(code)
                    if code == 421:
                        break
            finally:
                await client.close()


async def test_online_guessing_with_the_default_limits(start_daemon: DaemonFactory) -> None:
    """20 sessions (the per-client cap) guessing SRS hashes for 3 s with the defaults.
    Before, each RCPT was answered at once: about 6,800 guesses a second from one
    address. Now the address's first 10 errors are free, the next wait 1 s, 2 s, ... and
    from the 20th on every error waits 10 s and closes its session: about 2 a second,
    and fewer than 40 in the first 3 s."""
    d = await start_daemon()
    replies: list[int] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(guesser(d.port, replies, stop)) for _ in range(20)]
    await asyncio.sleep(3.0)  # the measurement window itself
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    guesses = sum(1 for code in replies if code == 550)
    assert 10 <= guesses < 40, guesses


# --- Sessions that never end ------------------------------------------------------------


async def test_junk_commands_are_limited(start_daemon: DaemonFactory) -> None:
    """Postfix's smtpd_junk_command_limit: 100 NOOPs are free; each one past them is an
    error, so the 120th ends the session."""
    d = await start_daemon(limits=Limits(error_sleep=0.001))
    client = await RawClient.open(d.port)
    await client.greet()
    for _ in range(100):
        assert await client.cmd("NOOP") == (250, "2.0.0 OK")
    for _ in range(19):
        assert (await client.cmd("RSET"))[0] == 250  # RSET is junk too
    assert await client.cmd("NOOP") == (250, "2.0.0 OK")
    assert await client.reply() == (421, "4.7.0 too many errors, closing connection")
    assert await client.closed()


async def test_mail_and_rset_for_ever_meet_the_junk_limit(start_daemon: DaemonFactory) -> None:
    d = await start_daemon(limits=Limits(error_sleep=0.001))
    client = await RawClient.open(d.port)
    await client.greet()
    for _ in range(119):
        assert (await client.cmd("MAIL FROM:<a@b.example>"))[0] == 250
        assert (await client.cmd("RSET"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@b.example>"))[0] == 250
    await client.cmd("RSET")
    assert await client.reply() == (421, "4.7.0 too many errors, closing connection")
    assert await client.closed()


async def test_a_session_ends_at_its_time_limit(start_daemon: DaemonFactory) -> None:
    """A client that keeps sending commands that are never junk (EHLO) is still closed at
    `session_timeout` (here 0.5 s), at its next command."""
    d = await start_daemon(limits=Limits(session_timeout=0.5))
    client = await RawClient.open(d.port)
    await client.greet()
    started = time.monotonic()
    while time.monotonic() - started < 5:
        code, text = await client.cmd("EHLO client.test")
        if code == 421:
            break
        await asyncio.sleep(0.05)
    assert (code, text) == (421, "4.4.2 session time limit exceeded, closing connection")
    assert 0.5 <= time.monotonic() - started < 5
    assert await client.closed()


async def test_the_time_limit_lets_a_transaction_finish(
    start_daemon: DaemonFactory, sink: Sink,
) -> None:
    """At the time limit a transaction under way completes (its message is accepted), and
    the session ends at the next command."""
    d = await start_daemon(limits=Limits(session_timeout=0.3),
                           smarthost=HostPort("127.0.0.1", sink.port))
    client = await RawClient.open(d.port)
    await client.greet()
    assert (await client.cmd("MAIL FROM:<a@b.example>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<postmaster@{DOMAIN}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await asyncio.sleep(0.5)
    await client.send(stuffed(simple_message()))
    assert (await client.reply())[0] == 250
    assert (await client.cmd("NOOP"))[0] == 421
    assert await client.closed()
