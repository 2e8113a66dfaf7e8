"""The notices as mail (headers, encoding) and as docs/admin.md quotes them, word for word."""

from __future__ import annotations

import email
import re
from email.message import Message
from pathlib import Path

import pytest

from forwarder.config import Settings
from forwarder.directory import Declared, StateChange
from forwarder.notices import declared_notice, failing_notices
from forwarder.queue import NewMessage
from forwarder.targets import Health, TargetState
from forwarder.tokens import TokenKind, check_token, parse_token

ADMIN_MD = Path(__file__).resolve().parent.parent / "docs" / "admin.md"
SEPT_1 = 1788220800.0  # 2026-09-01, the day of the examples in docs/admin.md
GRAD = "marie.curie@sigma-clermont.fr"
SETTINGS = Settings(hostname="forwarder.sigma-clermont.fr")
SECRET = b"k" * 32


def declared(target: str = "marie@example.org", account: str = GRAD) -> NewMessage:
    return declared_notice(SETTINGS, Declared(1234, account, target, SEPT_1), SECRET, SEPT_1)


def failing() -> NewMessage:
    change = StateChange(GRAD, "marie@old.example", TargetState.PENDING, TargetState.FAILING,
                         Health(5, SEPT_1 - 31 * 86400, SEPT_1),
                         "smtp; 550 5.1.1 <marie@old.example>: Recipient address rejected: "
                         "User unknown", ("marie@example.org",))
    (notice,) = failing_notices(SETTINGS, change, SEPT_1)
    return notice


def text(notice: NewMessage) -> tuple[Message, str]:
    assert isinstance(notice.body, bytes)  # a notice is small: never spooled
    message = email.message_from_bytes(notice.body)
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return message, payload.decode("utf-8")


@pytest.mark.parametrize("make", [declared, failing])
def test_the_docs_quote_the_notices_exactly(make: object) -> None:
    assert callable(make)
    notice = make()
    _, body = text(notice)
    quoted = re.sub(r"[0-9a-f]{40}", "TOKEN", body.replace("\r\n", "\n"))
    docs = ADMIN_MD.read_text()
    assert quoted in docs, "docs/admin.md must quote this notice's text as it is:\n" + quoted
    head = notice.body.split(b"\r\n\r\n")[0].decode().replace("\r\n", "\n")
    for line in re.sub(r"[0-9a-f]{40}", "TOKEN", head).split("\n"):
        if not line.startswith(("Date:", "Message-ID:", "MIME-Version", "Content-")):
            assert line in docs, line


def test_a_notice_is_automatic_mail_with_the_headers_providers_expect() -> None:
    notice = declared()
    message, body = text(notice)
    assert notice.sender == "postmaster@sigma-clermont.fr" and notice.client == ""
    (rcpt,) = notice.recipients
    assert (rcpt.orig_rcpt, rcpt.rcpt, rcpt.route.value) == (GRAD, "marie@example.org",
                                                             "notice")
    assert message["Auto-Submitted"] == "auto-generated"  # RFC 3834 5
    assert message["Message-ID"] == f"<{notice.id}.notice@forwarder.sigma-clermont.fr>"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == SEPT_1
    confirm = message["Reply-To"].strip("<>")
    (refuse,) = set(re.findall(r"refuse\+[0-9a-f]{40}@sigma-clermont\.fr", body))
    for address, kind in ((confirm, TokenKind.CONFIRM), (refuse, TokenKind.REFUSE)):
        local = address.split("@")[0]
        assert len(local) <= 64  # RFC 5321 4.5.3.1.1
        claim = parse_token(kind, local.split("+")[1])
        assert claim.target_id == 1234 and claim.expires == SEPT_1 + 30 * 86400
        check_token(claim, Declared(1234, GRAD, "marie@example.org", SEPT_1).binding,
                    [SECRET], SEPT_1)
    assert "Ces deux adresses sont valables jusqu'au 2026-10-01." in body


@pytest.mark.parametrize("target", ["marie@example.org",
                                    "a=b.c" + "x" * 50 + "@" + "d" * 60 + ".example"])
def test_the_body_is_seven_bit_quoted_printable_whatever_the_address(target: str) -> None:
    """Long addresses and `=` in them take the slow path; the result is valid either way."""
    notice = declared(target)
    assert isinstance(notice.body, bytes)
    body = notice.body.split(b"\r\n\r\n", 1)[1]
    assert body.isascii()
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))  # RFC 2045 6.7
    assert b"\n" not in body.replace(b"\r\n", b"")
    _, decoded = text(notice)
    assert f"\n    {target}\n" in decoded.replace("\r\n", "\n")
    assert "envoyé à l'adresse de l'école" in decoded
