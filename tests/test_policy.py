"""Pure decisions, table-driven, with no I/O and no event loop (DESIGN.md, h11 style).

Only the last test starts a process: a fresh interpreter, to see what importing policy.py
pulls in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from forwarder import replies
from forwarder.addresses import AddressError, parse_address, parse_sender
from forwarder.policy import (
    BLAME,
    MAX_CRASHES,
    Accept,
    Account,
    AccountState,
    Ending,
    Lane,
    NeedsLookup,
    NeedsSrsCheck,
    Outcome,
    Refuse,
    Route,
    Suspicion,
    blame,
    classify_recipient,
    count_received_headers,
    decide_account,
    is_expired,
    needs_srs,
    outcome_of_reply,
    retry_delay,
)
from forwarder.targets import TargetState, TargetView

OURS = ("sigma-clermont.fr",)
PM = "it@school-it.example"


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        ("jean.dupont@sigma-clermont.fr", NeedsLookup),
        ("Jean.Dupont@SIGMA-CLERMONT.FR.", NeedsLookup),  # case and trailing dot: ours
        ("SRS0=HHHH=TT=example.org=x@sigma-clermont.fr", NeedsSrsCheck),
        ("postmaster@sigma-clermont.fr", Accept),
        ("ABUSE@sigma-clermont.fr", Accept),
        ("Postmaster", Accept),  # RFC 5321 4.1.1.3
        ("x@other.example", Refuse),
        ("x@sigma-clermont.fr.evil.example", Refuse),
        ("x%other.example@sigma-clermont.fr", Refuse),
        ("other.example!x@sigma-clermont.fr", Refuse),
        ('"x@other.example"@sigma-clermont.fr', Refuse),
        ("x@other.example@sigma-clermont.fr", Refuse),
        ("x@[127.0.0.1]", Refuse),
        ("a" * 65 + "@sigma-clermont.fr", Refuse),
        ("", Refuse),
    ],
)
def test_classify_recipient(rcpt: str, expected: type) -> None:
    verdict = classify_recipient(rcpt, OURS, PM, "sigma-clermont.fr")
    assert isinstance(verdict, expected)
    if isinstance(verdict, Accept):
        assert verdict.route is Route.POSTMASTER and verdict.target == PM


def test_relay_and_syntax_replies_are_distinct() -> None:
    relay = classify_recipient("x@other.example", OURS, PM)
    syntax = classify_recipient("x%y@sigma-clermont.fr", OURS, PM)
    assert isinstance(relay, Refuse) and relay.reply is replies.RCPT_RELAY_DENIED
    assert isinstance(syntax, Refuse) and syntax.reply is replies.RCPT_BAD_SYNTAX


def test_postmaster_unset_is_deferred_not_refused() -> None:
    verdict = classify_recipient("postmaster@sigma-clermont.fr", OURS, None)
    assert isinstance(verdict, Refuse) and verdict.reply.code == 451


A = "jean.dupont@sigma-clermont.fr"


def on(*targets: str) -> tuple[TargetView, ...]:
    return tuple(TargetView(t, TargetState.CONFIRMED) for t in targets)


@pytest.mark.parametrize(
    ("account", "mailbox", "reply", "route"),
    [
        (None, True, replies.RCPT_UNKNOWN, None),
        (Account(A, AccountState.ACTIVE), True, None, Route.MAILBOX),
        (Account(A, AccountState.ACTIVE, on("x@perso.example")), True, None, Route.MAILBOX),
        (Account(A, AccountState.ACTIVE), False, replies.RCPT_NOT_CONFIGURED, None),
        (Account(A, AccountState.DELETED, on("x@perso.example")), False, None, Route.REDIRECT),
        (Account(A, AccountState.DELETED), True, replies.RCPT_CLOSED, None),
        (Account(A, AccountState.DELETED, on("y@sigma-clermont.fr")), True, replies.RCPT_LOOP,
         None),
    ],
)
def test_decide_account(
    account: Account | None, mailbox: bool, reply: replies.Reply | None, route: Route | None
) -> None:
    verdict = decide_account(account, OURS, mailbox)
    if reply is not None:
        assert isinstance(verdict, Refuse) and verdict.reply is reply
    else:
        assert isinstance(verdict, Accept) and verdict.route is route


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(0, 0.0), (1, 300.0), (2, 600.0), (3, 1200.0), (4, 2400.0), (5, 4000.0), (50, 4000.0)],
)
def test_retry_delay_is_postfix_backoff(attempts: int, delay: float) -> None:
    assert retry_delay(attempts, 300.0, 4000.0) == delay


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(250, Outcome.DELIVERED), (251, Outcome.DELIVERED), (421, Outcome.DEFERRED),
     (451, Outcome.DEFERRED), (550, Outcome.FAILED), (554, Outcome.FAILED),
     (999, Outcome.DEFERRED), (0, Outcome.DEFERRED)],
)
def test_outcome_of_reply(code: int, outcome: Outcome) -> None:
    assert outcome_of_reply(code) is outcome


# Crash blame: (lane, ending, crashes and held before) -> (crashes, held, suspect) after.
ORD, ALONE = Lane.ORDINARY, Lane.ALONE
DONE, RAISED, DIED, KILLED = Ending.COMPLETED, Ending.RAISED, Ending.FAULTED, Ending.KILLED


@pytest.mark.parametrize(
    ("lane", "ending", "before", "after"),
    [
        # In flight beside hundreds of others when the process died of a fault of its own
        # (forwarder/faults.py): suspected, once.
        (ORD, DIED, (0, False), (1, False, True)),
        (ORD, DIED, (1, False), (1, False, True)),  # never charged twice for that
        (ORD, DIED, (2, False), (2, False, True)),
        # Alone in the suspect lane when the process died: charged, held at MAX_CRASHES.
        (ALONE, DIED, (1, False), (2, False, True)),
        (ALONE, DIED, (2, False), (3, True, False)),
        # A worker raising on it is its own fault, wherever it ran.
        (ORD, RAISED, (0, False), (1, False, True)),
        (ORD, RAISED, (2, False), (3, True, False)),
        (ALONE, RAISED, (1, False), (2, False, True)),
        (ALONE, RAISED, (2, False), (3, True, False)),
        # A lone attempt that completed, whatever its outcome: not a suspect any more.
        (ALONE, DONE, (2, False), (0, False, False)),
        (ALONE, DONE, (1, True), (0, True, False)),  # held by an admin meanwhile: stays
        # Ordinary delivery only holds unsuspected messages: nothing changes.
        (ORD, DONE, (0, False), (0, False, False)),
        (ORD, DONE, (1, False), (1, False, True)),
        # Killed from outside (SIGKILL, the OOM killer): nobody's fault, in either lane.
        (ORD, KILLED, (0, False), (0, False, False)),
        (ORD, KILLED, (1, False), (1, False, True)),
        (ALONE, KILLED, (1, False), (1, False, True)),
        (ALONE, KILLED, (2, False), (2, False, True)),
        # Held stays held: only an administrator releases (`forwarder queue release`).
        (ORD, DIED, (3, True), (3, True, False)),
        (ALONE, RAISED, (5, True), (6, True, False)),
    ],
)
def test_crash_blame(lane: Lane, ending: Ending, before: tuple[int, bool],
                     after: tuple[int, bool, bool]) -> None:
    got = blame(lane, ending, Suspicion(*before))
    assert (got.crashes, got.held, got.suspect) == after


def test_crash_blame_table_is_complete() -> None:
    assert set(BLAME) == {(lane, ending) for lane in Lane for ending in Ending}


def test_a_burst_of_kills_never_holds_a_message() -> None:
    """However many kills land while it is in flight, alone or not, nothing is charged."""
    standing = Suspicion(0, False)
    for lane in [ORD, ALONE] * 10:
        standing = blame(lane, KILLED, standing)
    assert standing == Suspicion(0, False)


def test_a_poison_message_is_held_after_crashing_alone_twice() -> None:
    """Suspected at a crash under load, then two crashes alone in the lane: held."""
    standing = blame(ORD, DIED, Suspicion(0, False))
    while not standing.held:
        standing = blame(ALONE, DIED, standing)
    assert standing.crashes == MAX_CRASHES == 3


def test_queue_lifetime() -> None:
    assert not is_expired(1000.0, 1000.0 + 5 * 86400 - 1, 5 * 86400)
    assert is_expired(1000.0, 1000.0 + 5 * 86400, 5 * 86400)


@pytest.mark.parametrize(
    ("route", "sender", "target", "rewrite"),
    [
        (Route.REDIRECT, "noreply@jobteaser.com", "x@gmail.example", True),
        (Route.REDIRECT, "", "x@gmail.example", False),  # the null sender stays null
        (Route.MAILBOX, "noreply@jobteaser.com", A, False),
        (Route.POSTMASTER, "a@b.example", "it@school-it.example", True),
        (Route.POSTMASTER, "a@b.example", "it@sigma-clermont.fr", False),
        (Route.SRS_RETURN, "", "noreply@jobteaser.com", False),
        (Route.BOUNCE, "", "noreply@jobteaser.com", False),
    ],
)
def test_needs_srs(route: Route, sender: str, target: str, rewrite: bool) -> None:
    assert needs_srs(route, sender, target, OURS) is rewrite


@pytest.mark.parametrize(
    ("message", "count"),
    [
        (b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\nReceived: in body\r\n", 2),
        (b"Subject: x\r\n\r\n", 0),
        (b"received: lower\r\nX-Received: not one\r\n\r\n", 1),
    ],
)
def test_count_received_headers(message: bytes, count: int) -> None:
    assert count_received_headers(message) == count


@pytest.mark.parametrize(
    "bad",
    ["no-at-sign", "@sigma-clermont.fr", "a b@x.example", "a@x_y.example", "a\r\n@x.example",
     "a@" + "x" * 250 + ".example", "a..b@x.example", ".a@x.example"],
)
def test_parse_address_refuses(bad: str) -> None:
    with pytest.raises(AddressError):
        parse_address(bad)


def test_parse_sender_null_and_normal() -> None:
    assert parse_sender("<>") == "" and parse_sender("") == ""
    assert parse_sender("Noreply@JobTeaser.COM") == "Noreply@jobteaser.com"


@pytest.mark.parametrize(("sender", "parsed"), [
    ('"john doe"@example.net', '"john doe"@example.net'),
    ('"a>b"@Example.NET', '"a>b"@example.net'),
    ('"a\\"b"@example.net', '"a\\"b"@example.net'),
    ("user%relay@example.net", "user%relay@example.net"),
    ("bang!user@example.net", "bang!user@example.net"),
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
    ("user@[IPv6:2001:db8::1]", "user@[IPv6:2001:db8::1]"),
    ("user@[x-tag:opaque]", "user@[x-tag:opaque]"),
])
def test_senders_are_taken_liberally(sender: str, parsed: str) -> None:
    """PRODUCT.md: any RFC 5321 4.1.2 reverse-path is a valid MAIL FROM."""
    assert parse_sender(sender) == parsed


@pytest.mark.parametrize("sender", [
    "john doe@example.net", '"unterminated@example.net', '"a"b"@example.net',
    "user@[300.1.1.1]", "user@[IPv6:zz]", "user@[]", "a..b@example.net", "a@-bad.example",
    "no-at-sign", "a@b\x00.example", '"' + "x" * 63 + '"@example.net',
])
def test_senders_that_are_not_rfc5321_paths_are_refused(sender: str) -> None:
    with pytest.raises(AddressError):
        parse_sender(sender)


def test_policy_imports_no_io() -> None:
    """policy.py (and what it imports: addresses, replies, the pure SRS scheme) pulls in no
    database, event loop or socket module, so the decisions stay testable without I/O."""
    code = ("import sys, forwarder.policy; print(' '.join(m for m in"
            " ('sqlite3', 'aiosqlite', 'asyncio', 'socket', 'forwarder.srsstore')"
            " if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    assert found == []
