"""RFC 3464 DSNs: built, then parsed back with the standard library and checked field by field."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message

import pytest

from forwarder.dsn import RecipientStatus, build_dsn, is_bounce
from forwarder.dsnparams import (
    RecipientDsn,
    encode_orcpt,
    parse_notify,
    parse_orcpt,
    xtext_decode,
    xtext_encode,
)

ARRIVED = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
ATTEMPTED = ARRIVED + timedelta(days=5)
NOW = ATTEMPTED + timedelta(seconds=3)

ORIGINAL = (
    b"Received: from mail.jobteaser.com by mx.sigma-clermont.fr; Sat, 1 Mar 2025 09:30:00 +0000\r\n"
    b"From: JobTeaser <no-reply@jobteaser.com>\r\n"
    b"To: jean.dupont@sigma-clermont.fr\r\n"
    b"Subject: =?utf-8?q?R=C3=A9initialisation?=\r\n"
    b"Message-ID: <reset-1@jobteaser.com>\r\n"
    b"\r\n"
    b"Your reset link: https://jobteaser.example/reset?token=SECRET\r\n"
)

FAILED = RecipientStatus(
    original_recipient="jean.dupont@sigma-clermont.fr",
    final_recipient="jean.dupont@gmail.example",
    action="failed",
    status="5.1.1",
    remote_mta="mx1.gmail.example",
    diagnostic_code="smtp; 550 5.1.1 user unknown",
    last_attempt_date=ATTEMPTED,
)
DELAYED = RecipientStatus(
    final_recipient="marie.curie@laposte.example",
    action="delayed",
    status="4.4.1",
    last_attempt_date=ATTEMPTED,
    will_retry_until=ARRIVED + timedelta(days=5),
)


def make(*recipients: RecipientStatus, original: bytes = ORIGINAL) -> bytes:
    return build_dsn(
        reporting_mta="mx.sigma-clermont.fr",
        original_sender="no-reply@jobteaser.com",
        arrival_date=ARRIVED,
        original_message=original,
        recipients=recipients or (FAILED,),
        from_address="MAILER-DAEMON@mx.sigma-clermont.fr",
        message_id_domain="mx.sigma-clermont.fr",
        now=NOW,
    )


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: Message) -> list[Message]:
    """Sub-parts of a multipart, or the header blocks of a message/delivery-status part."""
    payload = message.get_payload()
    assert isinstance(payload, list)
    assert all(isinstance(p, Message) for p in payload)
    return [p for p in payload if isinstance(p, Message)]


def test_top_level_headers() -> None:
    message = parse(make())
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.sigma-clermont.fr"
    assert message["From"].addresses[0].display_name == (
        "Mail Delivery System / Système de messagerie")
    assert b"From: Mail Delivery System / =?utf-8?q?Syst=C3=A8me?= de messagerie" in make()
    assert message["To"] == "no-reply@jobteaser.com"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert "non distribué" in message["Subject"] and "Undelivered" in message["Subject"]
    assert email.utils.parsedate_to_datetime(message["Date"]) == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.sigma-clermont\.fr>", message["Message-ID"])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    types = [p.get_content_type() for p in parts(message)]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_delayed_only_subject() -> None:
    subject = parse(make(DELAYED))["Subject"]
    assert "retardé" in subject and "Delayed" in subject


def test_human_part_is_bilingual() -> None:
    human = parts(parse(make(FAILED, DELAYED)))[0]
    assert isinstance(human, EmailMessage)
    assert human["Content-Transfer-Encoding"] == "quoted-printable"
    text = human.get_content()
    assert "Votre message n'a pas pu être remis" in text
    assert "Your message could not be delivered" in text
    assert "<jean.dupont@sigma-clermont.fr> (failed): smtp; 550 5.1.1 user unknown" in text
    assert "<marie.curie@laposte.example> (delayed): status 4.4.1" in text


def test_human_part_reads_well() -> None:
    """Each language's sentence is followed by its recipient list; the English half is
    not behind a "-- " line, which mail clients hide as a signature."""
    human = parts(parse(make(FAILED)))[0]
    assert isinstance(human, EmailMessage)
    text = human.get_content().replace("\r\n", "\n")
    assert "\n-- \n" not in text
    listing = "  <jean.dupont@sigma-clermont.fr> (failed): smtp; 550 5.1.1 user unknown"
    for sentence in ("Votre message n'a pas pu être remis aux destinataires suivants :",
                     "Your message could not be delivered to the following recipients:"):
        assert f"{sentence}\n\n{listing}\n" in text
    assert text.index("Votre message") < text.index("English") < text.index("Your message")

def test_delivery_status_fields() -> None:
    status = parts(parse(make(FAILED, DELAYED)))[1]
    blocks = parts(status)
    # the stdlib parses message/delivery-status into the per-message block, then one per
    # recipient (RFC 3464 section 2.1)
    assert len(blocks) == 3
    per_message, first, second = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.sigma-clermont.fr"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVED

    assert first["Original-Recipient"] == "rfc822; jean.dupont@sigma-clermont.fr"
    assert first["Final-Recipient"] == "rfc822; jean.dupont@gmail.example"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx1.gmail.example"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"
    assert email.utils.parsedate_to_datetime(first["Last-Attempt-Date"]) == ATTEMPTED
    assert first["Will-Retry-Until"] is None

    assert second["Original-Recipient"] is None
    assert second["Final-Recipient"] == "rfc822; marie.curie@laposte.example"
    assert second["Action"] == "delayed"
    assert second["Status"] == "4.4.1"
    assert second["Remote-MTA"] is None and second["Diagnostic-Code"] is None
    assert email.utils.parsedate_to_datetime(second["Will-Retry-Until"]) == ARRIVED + timedelta(
        days=5
    )


def test_original_headers_only() -> None:
    raw = make()
    headers = parts(parse(raw))[2]
    text = headers.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"Message-ID: <reset-1@jobteaser.com>\r\n" in text
    assert b"Subject: =?utf-8?q?R=C3=A9initialisation?=" in text
    assert b"SECRET" not in raw  # the body never travels back


def test_wire_format_crlf_7bit_short_lines() -> None:
    long_diag = "smtp; 550 5.7.1 " + "rejected by policy " * 100
    long_header = b"X-Long: " + b"a" * 2000 + b"\r\n"
    raw = make(
        RecipientStatus(
            final_recipient="x@example.org",
            action="failed",
            status="5.7.1",
            diagnostic_code=long_diag + "\r\nInjected: header",
            last_attempt_date=ATTEMPTED,
        ),
        original=long_header + b"Subject: caf\xc3\xa9\n\nbody\n",
    )
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line ends in CRLF
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    blocks = parts(parts(parse(raw))[1])
    diagnostic = blocks[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 rejected by policy")
    assert "\n" not in diagnostic and len(diagnostic) <= 900
    assert blocks[1]["Injected"] is None
    headers = parts(parse(raw))[2].get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert b"Subject: caf??\r\n" in headers  # raw 8-bit octets made 7-bit


def test_non_ascii_address_uses_utf8_type() -> None:
    raw = make(
        RecipientStatus(
            final_recipient="rené+x@exemple.fr",
            action="failed",
            status="5.1.1",
            last_attempt_date=ATTEMPTED,
        )
    )
    blocks = parts(parts(parse(raw))[1])
    assert blocks[1]["Final-Recipient"] == "utf-8; ren\\x{E9}\\x{2B}x@exemple.fr"  # RFC 6533


def test_never_to_the_null_sender() -> None:
    with pytest.raises(ValueError, match="null sender"):
        build_dsn(
            reporting_mta="mx",
            original_sender="<>",
            arrival_date=ARRIVED,
            original_message=ORIGINAL,
            recipients=[FAILED],
            from_address="MAILER-DAEMON@mx",
            message_id_domain="mx",
            now=NOW,
        )


@pytest.mark.parametrize(
    ("action", "status"), [("delivered", "2.0.0"), ("failed", "5.1"), ("failed", "550")]
)
def test_recipient_status_validated(action: str, status: str) -> None:
    with pytest.raises(ValueError):
        RecipientStatus(
            final_recipient="x@example.org",
            action=action,  # type: ignore[arg-type]
            status=status,
            last_attempt_date=ATTEMPTED,
        )


@pytest.mark.parametrize(
    ("sender", "headers", "expected"),
    [
        ("", [("Subject", "hi")], True),
        ("<>", [], True),
        ("alice@example.org", [("Subject", "hi")], False),
        (
            "alice@example.org",
            [("Content-Type", 'multipart/report; report-type="delivery-status"; boundary=x')],
            True,
        ),
        # Only delivery-status reports count as bounces; other reports are ordinary mail.
        ("alice@example.org", [("Content-Type", "multipart/report; report-type=x")], False),
        ("alice@example.org", [("Content-Type", "multipart/mixed; boundary=x")], False),
        # Automatic mail (a password reset) is still reported to its sender, as Postfix does.
        ("alice@example.org", [("Auto-Submitted", "auto-replied")], False),
        ("alice@example.org", [("Auto-Submitted", "auto-generated; owner-email=x@y")], False),
        ("alice@example.org", [("Auto-Submitted", "no")], False),
        ("alice@example.org", [("auto-submitted", "No ")], False),
    ],
)
def test_is_bounce(sender: str, headers: list[tuple[str, str]], expected: bool) -> None:
    assert is_bounce(sender, headers) is expected


def test_is_bounce_of_our_own_dsn() -> None:
    message = email.message_from_bytes(make(), policy=email.policy.default)
    assert is_bounce("someone@example.org", message) is True


# --- the DSN extension (RFC 3461) ---------------------------------------------------------


@pytest.mark.parametrize(("xtext", "text"), [
    ("abc", "abc"), ("a+2Bb", "a+b"), ("+3D+20", "= "), ("", ""),
    ("caf+C3+A9", "café"),
])
def test_xtext_round_trip(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text
    assert xtext_decode(xtext_encode(text)) == text


@pytest.mark.parametrize("bad", ["a b", "a+2b", "a+", "a=b", "a+ZZ", "+FF"])
def test_xtext_refused(bad: str) -> None:
    assert xtext_decode(bad) is None


@pytest.mark.parametrize(("value", "parsed"), [
    ("NEVER", "NEVER"), ("never", "NEVER"), ("DELAY,SUCCESS", "SUCCESS,DELAY"),
    ("FAILURE", "FAILURE"), ("NEVER,FAILURE", None), ("SUCCESS,SUCCESS", None),
    ("SOMETIMES", None), ("", None),
])
def test_notify_values(value: str, parsed: str | None) -> None:
    assert parse_notify(value) == parsed


@pytest.mark.parametrize(("value", "parsed"), [
    ("rfc822;jean.dupont@sigma-clermont.fr", "rfc822;jean.dupont@sigma-clermont.fr"),
    ("RFC822;a+2Bb@x.example", "rfc822;a+b@x.example"),
    ("utf-8;ren+C3+A9@x.example", "utf-8;rené@x.example"),
    ("jean@x.example", None), ("rfc822;", None), ("rfc 822;a@b", None),
])
def test_orcpt_values(value: str, parsed: str | None) -> None:
    assert parse_orcpt(value) == parsed


def test_orcpt_encoded_for_the_wire() -> None:
    assert encode_orcpt("rfc822;a+b=c@x.example") == "rfc822;a+2Bb+3Dc@x.example"
    assert encode_orcpt("utf-8;rené@x.example") == "utf-8;ren\\x{E9}@x.example"


def test_notify_wants() -> None:
    assert RecipientDsn().wants("FAILURE") and RecipientDsn().wants("DELAY")
    assert not RecipientDsn().wants("SUCCESS")
    assert not RecipientDsn("NEVER").wants("FAILURE")
    assert RecipientDsn("SUCCESS").wants("SUCCESS")
    assert not RecipientDsn("SUCCESS").wants("FAILURE")


def test_envid_and_orcpt_in_the_report() -> None:
    orcpt = RecipientStatus(**{**FAILED.__dict__, "orcpt": "rfc822;prenom.nom@sigma-clermont.fr",
                               "original_recipient": "other@sigma-clermont.fr"})
    raw = build_dsn(
        reporting_mta="mx.sigma-clermont.fr", original_sender="no-reply@jobteaser.com",
        arrival_date=ARRIVED, original_message=ORIGINAL, recipients=[orcpt],
        from_address="MAILER-DAEMON@mx.sigma-clermont.fr",
        message_id_domain="mx.sigma-clermont.fr", now=NOW, envid="reset-42")
    per_message, first = parts(parts(parse(raw))[1])
    assert per_message["Original-Envelope-Id"] == "reset-42"
    assert first["Original-Recipient"] == "rfc822; prenom.nom@sigma-clermont.fr"


def test_ret_full_returns_the_message() -> None:
    raw = build_dsn(
        reporting_mta="mx", original_sender="no-reply@jobteaser.com", arrival_date=ARRIVED,
        original_message=ORIGINAL, recipients=[FAILED], from_address="MAILER-DAEMON@mx",
        message_id_domain="mx", now=NOW, return_full=True)
    third = parts(parse(raw))[2]
    assert third.get_content_type() == "message/rfc822"
    assert b"SECRET" in raw
    # too big, or 8-bit: the header only, as for RET=HDRS
    big = ORIGINAL + b"x" * 60_000 + b"\r\n"
    raw = build_dsn(
        reporting_mta="mx", original_sender="no-reply@jobteaser.com", arrival_date=ARRIVED,
        original_message=big, recipients=[FAILED], from_address="MAILER-DAEMON@mx",
        message_id_domain="mx", now=NOW, return_full=True)
    assert parts(parse(raw))[2].get_content_type() == "text/rfc822-headers"


def test_relayed_report() -> None:
    relayed = RecipientStatus(final_recipient="jean@gmail.example", action="relayed",
                              status="2.0.0", last_attempt_date=ATTEMPTED,
                              remote_mta="mx.gmail.example")
    message = parse(make(relayed))
    assert "Relayed" in message["Subject"]
    assert parts(parts(message)[1])[1]["Action"] == "relayed"
