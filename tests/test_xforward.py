"""Postfix's XFORWARD, as the session speaks it (no socket) and as forwarder/xforward.py
parses it. End to end, behind a real Postfix gateway: tests/test_postfix.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder import replies, xforward
from forwarder.smtpevents import SessionInfo
from forwarder.xforward import Forwarded
from tests.test_session import LIMITS, Driver

RELAY = "10.0.0.25"


def driver(allowed: bool) -> Driver:
    return Driver(info=SessionInfo((RELAY, 4000), RELAY, xforward_allowed=allowed))


def send(d: Driver, line: str) -> list[str]:
    """The reply lines for one client line, the handler accepting everything."""
    return d.send(line.encode() + b"\r\n")


def test_ehlo_offers_xforward_only_to_a_trusted_relay() -> None:
    assert send(driver(True), "EHLO gw.test")[-1] == f"250 {xforward.EHLO_KEYWORD}"
    assert not any("XFORWARD" in line for line in send(driver(False), "EHLO gw.test"))


def test_a_stranger_is_refused_and_its_errors_count() -> None:
    d = driver(False)
    send(d, "EHLO c.test")
    assert send(d, "XFORWARD ADDR=192.0.2.7") == [str(replies.XFORWARD_DENIED)]
    assert d.session.info.forwarded is None and d.session.info.origin == RELAY
    # Each refusal is a bad command: a client that keeps trying is cut off.
    for _ in range(LIMITS.max_bad_commands - 2):
        send(d, "XFORWARD ADDR=192.0.2.7")
    assert send(d, "XFORWARD ADDR=192.0.2.7") == [str(replies.TOO_MANY_ERRORS)]
    assert d.session.closed


def test_attributes_add_up_and_last_one_transaction() -> None:
    d = driver(True)
    send(d, "EHLO gw.test")
    assert send(d, "XFORWARD NAME=mail.example.org ADDR=IPv6:2001:DB8::7 PROTO=ESMTP") == [
        "250 2.0.0 Ok"]
    assert send(d, "xforward helo=mail.example.org source=remote") == ["250 2.0.0 Ok"]
    assert d.session.info.forwarded == Forwarded(addr="2001:db8::7", name="mail.example.org",
                                         proto="ESMTP", helo="mail.example.org",
                                         source="REMOTE")
    info = d.session.info
    assert (info.origin, info.origin_helo) == ("2001:db8::7", "mail.example.org")
    send(d, "MAIL FROM:<a@example.org>")
    assert send(d, "XFORWARD ADDR=192.0.2.8") == [str(replies.XFORWARD_IN_TRANSACTION)]
    send(d, "RCPT TO:<b@mx.test>")
    send(d, "DATA")
    assert send(d, "hi\r\n.") == ["250 2.0.0 Ok: queued as X"]
    # XFORWARD_README: reset at the end of the transaction, back to the real client.
    assert d.session.info.forwarded is None
    assert (d.session.info.origin, d.session.info.origin_helo) == (RELAY, "gw.test")


def test_rset_forgets_and_unavailable_addr_means_the_relay_itself() -> None:
    d = driver(True)
    send(d, "EHLO gw.test")
    send(d, "XFORWARD ADDR=192.0.2.7 HELO=x.example")
    assert send(d, "RSET") == [str(replies.OK)]
    assert d.session.info.forwarded is None
    # A mail the relay submitted itself: its own address and HELO, never mixed with a
    # forwarded HELO (XFORWARD_README, note 4).
    send(d, "XFORWARD ADDR=[UNAVAILABLE] HELO=x.example")
    assert (d.session.info.origin, d.session.info.origin_helo) == (RELAY, "gw.test")


@pytest.mark.parametrize(("arg", "reply"), [
    ("", replies.XFORWARD_SYNTAX),
    ("ADDR", replies.XFORWARD_SYNTAX),
    ("ADDR=", replies.XFORWARD_SYNTAX),
    ("COLOUR=blue", replies.XFORWARD_BAD_ATTRIBUTE),
    ("ADDR=mail.example.org", replies.XFORWARD_BAD_VALUE),  # not an IP address
    ("PORT=70000", replies.XFORWARD_BAD_VALUE),
    ("SOURCE=NEARBY", replies.XFORWARD_BAD_VALUE),
    ("HELO=a+0Ab", replies.XFORWARD_BAD_VALUE),  # a line feed once decoded
    ("HELO=a+3Cb+3E", replies.XFORWARD_BAD_VALUE),  # "<" and ">": special in a header
    ("HELO=a+2", replies.XFORWARD_BAD_VALUE),  # not xtext
    ("HELO=" + "a" * 256, replies.XFORWARD_BAD_VALUE),
    ("PROTO=" + "P" * 65, replies.XFORWARD_BAD_VALUE),
])
def test_bad_commands_get_postfixs_replies_and_change_nothing(arg: str, reply: object) -> None:
    before = Forwarded(addr="192.0.2.7")
    assert xforward.update(before, arg) == reply
    d = driver(True)
    send(d, "EHLO gw.test")
    send(d, "XFORWARD ADDR=192.0.2.7")
    assert send(d, f"XFORWARD {arg}".rstrip()) == [str(reply)]
    assert d.session.info.forwarded == before


def test_xtext_values_are_decoded() -> None:
    assert xforward.update(None, "HELO=a+2Bb NAME=[unavailable]") == Forwarded(helo="a+b")


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300))
def test_any_printable_argument_gets_a_forwarded_or_a_501(arg: str) -> None:
    result = xforward.update(Forwarded(), f"HELO={arg}")
    assert isinstance(result, Forwarded) or (result.code, result.enhanced) == (501, "5.5.4")


def test_trusted_relays() -> None:
    assert xforward.trusted("10.0.0.25", ("10.0.0.0/24",))
    assert not xforward.trusted("10.0.1.25", ("10.0.0.0/24",))
    assert not xforward.trusted("10.0.0.25", ())
    assert xforward.trusted("2001:db8::1", ("2001:db8::/32",))
    assert not xforward.trusted("unknown", ("0.0.0.0/0",))
