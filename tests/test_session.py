"""The SMTP session rules, with no socket and no event loop (forwarder/session.py).

Each case is a table of client lines and the exact reply lines the session answers; the
handler's decisions are made here by a small synchronous stand-in that accepts everything,
so what is tested is the session's own grammar, sequence rules and replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from forwarder import replies
from forwarder.session import Session
from forwarder.smtpevents import (
    Closing,
    Envelope,
    ErrorCounted,
    Hello,
    MailFrom,
    MessageReceived,
    MessageRefused,
    RcptTo,
    SessionInfo,
    SessionLimits,
    StartTls,
    TlsInfo,
)

LIMITS = SessionLimits(max_message_size=1000, max_line_length=100, max_command_line=512)
EHLO = ["250-mx.test", "250-PIPELINING", "250-SIZE 1000", "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES", "250-DSN", "250 SMTPUTF8"]


@dataclass
class Driver:
    """Feeds a session and answers its events as an accepting handler would."""

    tls: bool = False
    info: SessionInfo = field(
        default_factory=lambda: SessionInfo(("192.0.2.7", 4000), "192.0.2.7"))
    session: Session[str] = field(init=False)
    events: list[object] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session = Session("mx.test", LIMITS, self.info, tls_offered=self.tls)
        self.session.greet()
        self.session.data_to_send()

    def send(self, data: bytes) -> list[str]:
        """The reply lines the session writes for `data` (events answered as they come)."""
        self.session.receive(data)
        while (event := self.session.next_event()) is not None:
            self.events.append(event)
            self._answer(event)
        out = self.session.data_to_send().decode("ascii")
        assert out == "" or out.endswith("\r\n"), out
        return out.split("\r\n")[:-1]

    def _answer(self, event: object) -> None:
        s = self.session
        if isinstance(event, Hello):
            s.reply_lines(event.lines or ["250 mx.test"])
        elif isinstance(event, MailFrom):
            s.envelope.mail_from = event.address
            s.reply("250 2.1.0 Ok")
        elif isinstance(event, RcptTo):
            s.envelope.rcpt_tos.append(event.address)
            s.envelope.accepted.append(event.address)
            s.reply("250 2.1.5 Ok")
        elif isinstance(event, MessageReceived):
            s.reply("250 2.0.0 Ok: queued as X")


def _run(script: list[tuple[str, list[str]]], tls: bool = False) -> Driver:
    driver = Driver(tls=tls)
    for line, expected in script:
        assert driver.send(line.encode("utf-8") + b"\r\n") == expected, line
    return driver


HELO = ("HELO client.test", ["250 mx.test"])
MAIL = ("MAIL FROM:<a@sender.example>", ["250 2.1.0 Ok"])
RCPT = ("RCPT TO:<b@mx.test>", ["250 2.1.5 Ok"])
SYNTAX_MAIL = ["501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"]

CASES: dict[str, list[tuple[str, list[str]]]] = {
    "ehlo offers our extensions": [("EHLO client.test", EHLO)],
    "helo without a name": [("HELO", ["501 Syntax: HELO hostname"])],
    "ehlo without a name": [("EHLO", ["501 5.5.4 syntax error in parameters or arguments"])],
    "mail before helo": [("MAIL FROM:<a@b.example>", ["503 5.5.1 Error: send HELO first"])],
    "rcpt before mail": [HELO, ("RCPT TO:<b@mx.test>", ["503 5.5.1 Error: need MAIL command"])],
    "nested mail": [HELO, MAIL, ("MAIL FROM:<c@d.example>",
                                 ["503 5.5.1 Error: nested MAIL command"])],
    "quoted local part with a space": [HELO, ('MAIL FROM:<"john doe"@example.net>',
                                              ["250 2.1.0 Ok"])],
    "quoted local part with >": [HELO, ('MAIL FROM:<"a>b"@example.net>', ["250 2.1.0 Ok"])],
    "quoted pair": [HELO, ('MAIL FROM:<"a\\"> b"@example.net>', ["250 2.1.0 Ok"])],
    "unterminated path": [HELO, ("MAIL FROM:<a@b.example", ["553 5.1.3 Error: malformed address"])],
    "space outside quotes": [HELO, ("MAIL FROM:<a b@c.example>",
                                    ["553 5.1.3 Error: malformed address"])],
    "null sender": [HELO, ("MAIL FROM:<>", ["250 2.1.0 Ok"])],
    "no keyword": [("EHLO c", EHLO), ("MAIL <a@b.example>", SYNTAX_MAIL)],
    "unknown mail parameter": [("EHLO c", EHLO), (
        "MAIL FROM:<a@b.example> X-FOO=1",
        ["555 5.5.4 MAIL FROM parameters not recognized or not implemented"])],
    # RFC 6531 3.3: UTF-8 paths in an SMTPUTF8 transaction; without it, 553 5.6.7.
    "smtputf8": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> SMTPUTF8", ["250 2.1.0 Ok"])],
    "utf-8 sender": [("EHLO c", EHLO), ("MAIL FROM:<jöe@exämple.org> SMTPUTF8",
                                        ["250 2.1.0 Ok"]),
                     ("RCPT TO:<élodie@mx.test>", ["250 2.1.5 Ok"])],
    "utf-8 sender without smtputf8": [("EHLO c", EHLO), (
        "MAIL FROM:<jöe@exämple.org>",
        ["553 5.6.7 non-ASCII address requires MAIL FROM with SMTPUTF8"])],
    "utf-8 recipient without smtputf8": [("EHLO c", EHLO), MAIL, (
        "RCPT TO:<élodie@mx.test>",
        ["553 5.6.7 non-ASCII address requires MAIL FROM with SMTPUTF8"])],
    "smtputf8 with a value": [("EHLO c", EHLO), (
        "MAIL FROM:<a@b.example> SMTPUTF8=yes", ["501 5.5.4 Error: SMTPUTF8 takes no arguments"])],
    "utf-8 in helo": [("EHLO é.example", ["501 5.5.4 syntax error in parameters or arguments"])],
    # RFC 3461 4: the DSN extension's parameters.
    "dsn on mail": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> RET=HDRS ENVID=QQ+2B1",
                                       ["250 2.1.0 Ok"])],
    "bad ret": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> RET=BODY",
                                   ["501 5.5.4 Error: RET must be FULL or HDRS"])],
    "bad envid": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> ENVID=a+zz",
                                     ["501 5.5.4 Error: ENVID must be xtext of at most 100 "
                                      "characters"])],
    "dsn on rcpt": [("EHLO c", EHLO), MAIL, (
        "RCPT TO:<b@mx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@mx.test",
        ["250 2.1.5 Ok"])],
    "notify never with another": [("EHLO c", EHLO), MAIL, (
        "RCPT TO:<b@mx.test> NOTIFY=NEVER,SUCCESS",
        ["501 5.5.4 Error: NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"])],
    "orcpt without a type": [("EHLO c", EHLO), MAIL, (
        "RCPT TO:<b@mx.test> ORCPT=b@mx.test", ["501 5.5.4 Error: ORCPT must be addr-type;xtext"])],
    "binarymime not offered": [("EHLO c", EHLO), (
        "MAIL FROM:<a@b.example> BODY=BINARYMIME",
        ["555 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"])],
    "8bitmime": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> BODY=8BITMIME", ["250 2.1.0 Ok"])],
    "size within": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> SIZE=1000", ["250 2.1.0 Ok"])],
    "size over": [("EHLO c", EHLO), (
        "MAIL FROM:<a@b.example> SIZE=1001",
        ["552 5.3.4 message size exceeds fixed maximum message size"])],
    "size not a number": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> SIZE=x", SYNTAX_MAIL)],
    "malformed parameter": [("EHLO c", EHLO), ("MAIL FROM:<a@b.example> =1", SYNTAX_MAIL)],
    "parameters after helo": [HELO, ("MAIL FROM:<a@b.example> SIZE=1",
                                     ["501 5.5.4 Syntax: MAIL FROM: <address>"])],
    "rcpt parameter": [("EHLO c", EHLO), MAIL, (
        "RCPT TO:<b@mx.test> X-FOO=1",
        ["555 5.5.4 RCPT TO parameters not recognized or not implemented"])],
    "data without mail": [HELO, ("DATA", ["503 5.5.1 bad sequence of commands"])],
    "data without recipients": [HELO, MAIL, ("DATA", ["554 5.5.1 no valid recipients"])],
    "data with an argument": [HELO, MAIL, RCPT, (
        "DATA x", ["501 5.5.4 syntax error in parameters or arguments"])],
    "help": [("HELP", ["214 2.0.0 Supported commands: DATA EHLO EXPN HELO HELP MAIL NOOP "
                       "QUIT RCPT RSET VRFY"])],
    "help on a command": [("HELP mail", ["214 2.0.0 Syntax: MAIL FROM: <address> "
                                         "[SP <mail-parameters>]"])],
    "help on nothing known": [("HELP FOO", ["501 5.5.4 Supported commands: DATA EHLO EXPN "
                                            "HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"])],
    "noop": [("NOOP", ["250 2.0.0 OK"]), ("NOOP anything", ["250 2.0.0 OK"])],
    "rset": [HELO, MAIL, ("RSET", ["250 2.0.0 OK"]),
             ("RCPT TO:<b@mx.test>", ["503 5.5.1 Error: need MAIL command"])],
    "rset with an argument": [("RSET x", ["501 5.5.4 Syntax: RSET"])],
    "vrfy": [("VRFY a@b.example", ["252 2.0.0 Cannot VRFY user, but will accept message and "
                                   "attempt delivery"]),
             ("VRFY", ["501 5.5.4 Syntax: VRFY <address>"]),
             ("VRFY <a", ["502 5.5.1 Could not VRFY <a"])],
    "expn": [("EXPN staff", ["502 5.5.1 command not implemented"])],
    "unknown command": [("AUTH PLAIN x", ["500 5.5.1 command unrecognized"])],
    "not a command word": [("M4IL x", ["500 5.5.2 syntax error"])],
    "control character": [("HELO a\tb", ["501 5.5.4 syntax error in parameters or arguments"])],
    "lower case": [("ehlo c", EHLO), ("mail from:<a@b.example>", ["250 2.1.0 Ok"])],
    "starttls not offered": [("STARTTLS", ["454 4.7.0 TLS not available"])],
    "starttls with an argument": [("STARTTLS x", ["501 5.5.4 Syntax: STARTTLS"])],
    "quit with an argument": [("QUIT now", ["501 5.5.4 Syntax: QUIT"])],
    "quit": [("QUIT", ["221 2.0.0 Bye"])],
}


@pytest.mark.parametrize("name", list(CASES))
def test_session_rules(name: str) -> None:
    _run(CASES[name])


def test_quoted_sender_reaches_the_handler_verbatim() -> None:
    driver = _run([HELO, ('MAIL FROM:<"a>b c"@example.net> ', ["250 2.1.0 Ok"])])
    assert driver.events[-1] == MailFrom('"a>b c"@example.net', [])


def test_parameters_keep_their_values_case() -> None:
    driver = _run([("EHLO c", EHLO), ("MAIL FROM:<a@b.example> body=8bitmime SIZE=10",
                                      ["250 2.1.0 Ok"])])
    assert driver.events[-1] == MailFrom("a@b.example", ["BODY=8bitmime", "SIZE=10"])


def test_eight_bit_argument_is_refused() -> None:
    driver = Driver()
    assert driver.send("HELO h\u00e9\r\n".encode()) == [
        "501 5.5.4 syntax error in parameters or arguments"]


def test_a_message_is_unstuffed_and_handed_over() -> None:
    driver = _run([HELO, MAIL, RCPT, ("DATA", ["354 End data with <CR><LF>.<CR><LF>"])])
    assert driver.send(b"Subject: x\r\n\r\n..dot\r\n.\r\n") == ["250 2.0.0 Ok: queued as X"]
    event = driver.events[-1]
    assert isinstance(event, MessageReceived)
    assert event.envelope.content == b"Subject: x\r\n\r\n.dot\r\n"
    assert event.envelope.accepted == ["b@mx.test"]
    # The transaction is over: a new one needs MAIL again.
    assert driver.send(b"RCPT TO:<b@mx.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]


@pytest.mark.parametrize(("body", "reply"), [
    (b"a\nb\r\n.\r\n", replies.BARE_LINE_END),
    (b"a\x00b\r\n.\r\n", replies.NUL_IN_MESSAGE),
    (b"x" * 99 + b"\r\n.\r\n", replies.TEXT_LINE_TOO_LONG),
    ((b"y" * 90 + b"\r\n") * 12 + b".\r\n", replies.SIZE_EXCEEDED),
])
def test_a_refused_body_is_answered_once_and_the_session_goes_on(body: bytes,
                                                                 reply: replies.Reply) -> None:
    driver = _run([HELO, MAIL, RCPT, ("DATA", ["354 End data with <CR><LF>.<CR><LF>"])])
    assert driver.send(body + b"NOOP\r\n") == [str(reply), "250 2.0.0 OK"]
    # The refusal is an error like any 5xx (the tarpit counts it).
    assert driver.events[-2:] == [MessageRefused(reply), ErrorCounted(1)]


def test_pipelined_commands_wait_for_each_decision() -> None:
    """RFC 2920: replies keep the commands' order; RCPT's event stops the parsing until the
    handler has answered."""
    driver = Driver()
    session = driver.session
    session.receive(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<b@mx.test>\r\nNOOP\r\n")
    first = session.next_event()
    assert isinstance(first, Hello)
    session.reply_lines(first.lines)
    mail = session.next_event()
    assert isinstance(mail, MailFrom)
    session.envelope.mail_from = mail.address
    session.reply("250 2.1.0 Ok")
    rcpt = session.next_event()
    assert isinstance(rcpt, RcptTo)
    assert session.buffered == len(b"NOOP\r\n")  # held until the answer
    session.reply("550 5.1.1 <b@mx.test>: user unknown")
    assert session.next_event() == ErrorCounted(1)  # the adapter's tarpit hears of it
    assert session.next_event() is None
    assert session.data_to_send().decode().split("\r\n")[-3:] == [
        "550 5.1.1 <b@mx.test>: user unknown", "250 2.0.0 OK", ""]


def test_a_handler_reply_gets_an_enhanced_code_and_stays_one_line() -> None:
    driver = _run([HELO])
    driver.session.receive(b"MAIL FROM:<a@b.example>\r\n")
    assert isinstance(driver.session.next_event(), MailFrom)
    driver.session.reply("451 try later\r\nInjected: yes")
    assert driver.session.data_to_send() == b"451 4.0.0 try later Injected: yes\r\n"


def test_an_overlong_line_is_skipped_to_its_end() -> None:
    driver = Driver()
    long = b"NOOP " + b"x" * 600 + b"\r\n"
    assert driver.send(long[:300]) == []
    assert driver.send(long[300:] + b"NOOP\r\n") == [str(replies.COMMAND_TOO_LONG),
                                                     "250 2.0.0 OK"]


def test_garbage_closes_the_session() -> None:
    driver = Driver()
    lines = driver.send(b"BOGUS\r\n" * LIMITS.max_bad_commands)
    assert lines[-1] == str(replies.TOO_MANY_ERRORS)
    assert lines.count("500 5.5.1 command unrecognized") == LIMITS.max_bad_commands - 1
    errors = [ErrorCounted(n) for n in range(1, LIMITS.max_bad_commands)]
    assert driver.events == [*errors, Closing(quit=False)] and driver.session.closed
    assert driver.send(b"NOOP\r\n") == []  # nothing more is read


def test_quit_ends_the_session() -> None:
    driver = Driver()
    assert driver.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert driver.events == [Closing(quit=True)]


def test_starttls_forgets_everything() -> None:
    """RFC 3207 4.2 and CVE-2024-34083: what came with the command is dropped, and the
    session starts over (HELO needed again; STARTTLS no longer offered)."""
    driver = _run([("EHLO c", [*EHLO[:-1], "250-SMTPUTF8", "250 STARTTLS"]),
                   MAIL], tls=True)
    session = driver.session
    session.receive(b"STARTTLS\r\nRCPT TO:<b@mx.test>\r\n")
    assert isinstance(session.next_event(), StartTls)
    assert session.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    session.discard_input()
    session.tls_started(TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
    assert session.info.tls is not None and session.info.host_name is None
    assert driver.send(b"MAIL FROM:<a@b.example>\r\n") == ["503 5.5.1 Error: send HELO first"]
    assert driver.send(b"EHLO c\r\n") == EHLO
    assert driver.send(b"STARTTLS\r\n") == ["503 5.5.1 bad sequence of commands"]


def test_helo_name_is_kept_only_when_the_handler_accepts_it() -> None:
    driver = Driver()
    session = driver.session
    session.receive(b"HELO bad.example\r\n")
    assert isinstance(session.next_event(), Hello)
    session.reply_lines(["501 5.5.4 no"])
    assert session.data_to_send() == b"501 5.5.4 no\r\n"
    assert session.info.host_name is None
    assert driver.send(b"HELO good.example\r\n") == ["250 mx.test"]
    assert session.info.host_name == "good.example"


def test_between_transactions_and_in_body() -> None:
    driver = _run([HELO])
    session = driver.session
    assert session.between_transactions and not session.in_body
    driver.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    assert not session.between_transactions and session.in_body
    assert session.current == "DATA"
    driver.send(b".\r\n")
    assert session.between_transactions and not session.in_body


def test_envelope_is_typed_by_the_handler() -> None:
    envelope: Envelope[int] = Envelope()
    envelope.accepted.append(3)
    assert envelope.accepted == [3] and envelope.mail_from is None
