"""Delivery status notifications (RFC 3464), built with the standard library's email package.

A DSN is ``multipart/report; report-type=delivery-status`` (RFC 6522) holding a bilingual
human-readable part, the machine-readable ``message/delivery-status`` part, and the original
message's header (``text/rfc822-headers``); the whole message (``message/rfc822``) only where
the sender asked with RET=FULL (RFC 3461 4.3) and it is small and 7-bit, as Postfix's
bounce_size_limit does.
It must be sent with a null envelope sender (RFC 5321 4.5.5) so it is never bounced itself;
``is_bounce`` tells which messages must never get one.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from typing import Literal

Action = Literal["failed", "delayed", "relayed"]

# SMTP policy: CRLF line ends, lines folded at 78, and header values containing CR or LF
# refused (no header injection through an address or a diagnostic).
_POLICY = email.policy.SMTP
_MAX_LINE = 998  # RFC 5322 2.1.1, octets before CRLF
_MAX_DIAGNOSTIC = 900  # even unfolded, "Diagnostic-Code: " plus this fits in one line
_MAX_HEADERS = 64 * 1024  # a bound on the returned header block (Postfix bounces 50 kB)
# RET=FULL returns the whole message up to this size (Postfix's bounce_size_limit).
MAX_RETURNED_MESSAGE = 50_000
SENDER_NAME = "Mail Delivery System / Système de messagerie"
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # RFC 3463 section 2
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Header octets kept as they are in the returned header block; any other becomes "?".
_SEVEN_BIT = bytes(b if 32 <= b < 127 or b == 9 else 63 for b in range(256))


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient's block in the delivery-status part (RFC 3464 section 2.3)."""

    final_recipient: str
    action: Action
    status: str  # "5.1.1"
    last_attempt_date: datetime
    original_recipient: str | None = None  # the address as given at RCPT, before rewriting
    orcpt: str | None = None  # the ORCPT parameter (RFC 3461 4.2), "addr-type;address"
    remote_mta: str | None = None  # "mx1.example.org"
    diagnostic_code: str | None = None  # "smtp; 550 5.1.1 user unknown"
    will_retry_until: datetime | None = None  # for "delayed" (RFC 3464 2.3.9)

    def __post_init__(self) -> None:
        if self.action not in ("failed", "delayed", "relayed"):
            raise ValueError(f"unsupported DSN action {self.action!r}")
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"bad DSN status {self.status!r}")


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    arrival_date: datetime,
    original_message: bytes,
    recipients: Sequence[RecipientStatus],
    from_address: str,
    message_id_domain: str,
    now: datetime,
    envid: str | None = None,
    return_full: bool = False,
) -> bytes:
    """The DSN for ``original_sender``, as bytes with CRLF line ends, ready to queue.
    `envid`: the sender's ENVID (RFC 3461 4.4); `return_full`: RET=FULL was asked."""
    if is_null_sender(original_sender):
        raise ValueError("never send a DSN to the null sender (RFC 5321 4.5.5)")
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient")
    # One DSN reports one kind of event; given several, a failure is what the sender
    # most needs to read about.
    action = "failed" if any(r.action == "failed" for r in recipients) else recipients[0].action
    # A UTF-8 sender is written as it is (RFC 6532): the DSN then goes with SMTPUTF8.
    policy = _POLICY if original_sender.isascii() else email.policy.SMTPUTF8
    report = EmailMessage(policy=policy)
    report["From"] = Address(display_name=SENDER_NAME, addr_spec=from_address)
    report["To"] = _one_line(original_sender)
    report["Subject"] = _SUBJECTS[action]
    report["Date"] = email.utils.format_datetime(now)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=message_id_domain)
    # RFC 3834 section 5: marks the DSN as automatic, so responders do not answer it.
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    whole = (return_full and action == "failed" and original_message.isascii()
             and len(original_message) <= MAX_RETURNED_MESSAGE)
    returned = _message_part(original_message) if whole else _headers_part(original_message)
    report.set_payload(
        [
            _human_part(reporting_mta, recipients, action, whole),
            _status_part(reporting_mta, arrival_date, recipients, envid),
            returned,
        ]
    )
    return report.as_bytes(policy=policy)


def is_null_sender(sender: str) -> bool:
    return sender.strip() in ("", "<>")


def is_bounce(sender: str, headers: Message | Iterable[tuple[str, str]]) -> bool:
    """True when a failure of this message must NOT be reported: never a bounce of a bounce.

    - the null sender asks for no notification at all (RFC 5321 4.5.5 and 6.1);
    - a message that is itself a delivery report (multipart/report with
      report-type=delivery-status, RFC 3464) whose sender was rewritten on the way.
    Auto-Submitted mail (a password reset, say) is still reported, as Postfix does:
    RFC 5321 decides by the envelope sender, and RFC 3834 governs responders, not DSNs.
    """
    if is_null_sender(sender):
        return True
    message = headers if isinstance(headers, Message) else _message_of(headers)
    return (message.get_content_type() == "multipart/report"
            and str(message.get_param("report-type", "")).lower() == "delivery-status")


def _message_of(headers: Iterable[tuple[str, str]]) -> Message:
    message = Message()
    for name, value in headers:
        message[name] = value
    return message


# -- the three parts ----------------------------------------------------------------------

_SUBJECTS: dict[Action, str] = {
    "failed": "Message non distribué / Undelivered Mail Returned to Sender",
    "delayed": "Message retardé / Delayed Mail (still being retried)",
    "relayed": "Message transmis / Mail Relayed (no delivery report will follow)",
}
# Each language says what happened, then lists the recipients right under that sentence,
# then what is attached. The two halves are separated by a plain rule, never by "-- ",
# which mail clients take for a signature and hide.
_WHAT: dict[Action, tuple[str, str]] = {
    "failed": ("Votre message n'a pas pu être remis aux destinataires suivants :",
               "Your message could not be delivered to the following recipients:"),
    "delayed": ("Votre message n'a pas encore pu être remis aux destinataires suivants. "
                "Nous réessaierons ; vous n'avez rien à faire pour l'instant.",
                "Your message could not be delivered yet to the following recipients. "
                "We will keep trying; there is nothing for you to do for now."),
    "relayed": ("Votre message a été transmis aux destinataires suivants, à un serveur "
                "qui ne confirmera pas sa remise :",
                "Your message was relayed to the following recipients, to a server that "
                "will not confirm its delivery:"),
}
_HELLO = ("Ceci est le système de messagerie de {mta}.",
          "This is the mail system at host {mta}.")
_ATTACHED = (("Le rapport technique et l'en-tête de votre message sont joints.",
              "The technical report and the header of your message are attached."),
             ("Le rapport technique et votre message sont joints.",
              "The technical report and your message are attached."))
_RULE = "=" * 30 + " English " + "=" * 30


def _human_part(mta: str, recipients: Sequence[RecipientStatus], action: Action,
                whole: bool) -> MIMEPart:
    lines = []
    for r in recipients:
        who = r.original_recipient or r.final_recipient
        detail = r.diagnostic_code or f"status {r.status}"
        lines.append(f"  <{_one_line(who)}> ({r.action}): "
                     f"{_one_line(detail)[:_MAX_DIAGNOSTIC]}")
    listing = "\n".join(lines)
    halves = [f"{_HELLO[i].format(mta=mta)}\n\n{_WHAT[action][i]}\n\n{listing}\n\n"
              f"{_ATTACHED[int(whole)][i]}\n" for i in (0, 1)]
    text = f"{halves[0]}\n{_RULE}\n\n{halves[1]}"
    part = MIMEPart(policy=_POLICY)
    # quoted-printable keeps the French readable in 7-bit transport, lines under 76 octets.
    part.set_content(text, charset="utf-8", cte="quoted-printable")
    part["Content-Description"] = "Notification"
    return part


def _status_part(mta: str, arrival: datetime, recipients: Sequence[RecipientStatus],
                 envid: str | None = None) -> MIMEPart:
    # The stdlib represents message/delivery-status as a list of header blocks, the first
    # per message, then one per recipient (RFC 3464 section 2.1), and writes them out
    # separated by blank lines.
    per_message = Message(policy=_POLICY)
    if envid:  # RFC 3464 2.2.1: the sender's ENVID, decoded
        per_message["Original-Envelope-Id"] = _one_line(envid)
    per_message["Reporting-MTA"] = f"dns; {_one_line(mta)}"
    per_message["Arrival-Date"] = email.utils.format_datetime(arrival)
    blocks: list[Message | str] = [per_message]
    blocks.extend(_recipient_block(r) for r in recipients)
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(blocks)
    return part


def _recipient_block(r: RecipientStatus) -> Message:
    block = Message(policy=_POLICY)
    if r.orcpt:  # RFC 3464 2.3.1: the ORCPT the sender gave, as given
        block["Original-Recipient"] = _orcpt_field(r.orcpt)
    elif r.original_recipient and r.original_recipient.lower() != r.final_recipient.lower():
        block["Original-Recipient"] = _address_field(r.original_recipient)
    block["Final-Recipient"] = _address_field(r.final_recipient)
    block["Action"] = r.action
    block["Status"] = r.status
    if r.remote_mta:
        block["Remote-MTA"] = f"dns; {_one_line(r.remote_mta)}"
    if r.diagnostic_code:
        block["Diagnostic-Code"] = _one_line(r.diagnostic_code)[:_MAX_DIAGNOSTIC]
    block["Last-Attempt-Date"] = email.utils.format_datetime(r.last_attempt_date)
    if r.will_retry_until is not None:
        block["Will-Retry-Until"] = email.utils.format_datetime(r.will_retry_until)
    return block


def _message_part(original: bytes) -> MIMEPart:
    """RET=FULL: the message itself (RFC 3462 / RFC 6522 3: message/rfc822)."""
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/rfc822"
    part["Content-Description"] = "Undelivered Message"
    part.set_payload([email.message_from_bytes(original, policy=email.policy.compat32)])
    return part


def _orcpt_field(orcpt: str) -> str:
    """ "addr-type;address" as RFC 3464 2.3.1 writes it; a utf-8 address as in
    `_address_field`."""
    addr_type, _, address = orcpt.partition(";")
    if addr_type == "utf-8" or not address.isascii():
        return _address_field(address)
    return f"{_one_line(addr_type)}; {_one_line(address)}"


def _headers_part(original: bytes) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    part.set_content(
        _original_headers(original), maintype="text", subtype="rfc822-headers", cte="7bit"
    )
    part["Content-Description"] = "Undelivered Message Headers"
    return part


def _original_headers(original: bytes) -> bytes:
    """The header block of ``original``, CRLF, 7-bit, no line over 998 octets, bounded."""
    # Only a bounded prefix is ever looked at (RFC 6522 lets the part be truncated): a
    # header section of any size costs the same.
    original = original[: _MAX_HEADERS + _MAX_LINE]
    match = re.search(rb"\r?\n\r?\n", original)
    block = original[: match.start()] if match else original
    lines: list[bytes] = []
    size = 0
    for line in re.split(rb"\r?\n", block):
        # Raw 8-bit header octets (RFC 6532) become "?": the DSN stays 7-bit, so it can go
        # to any server, with or without 8BITMIME.
        clean = line.translate(_SEVEN_BIT)[:_MAX_LINE]
        if size + len(clean) + 2 > _MAX_HEADERS:
            break
        lines.append(clean)
        size += len(clean) + 2
    return b"\r\n".join(lines) + b"\r\n"


def _address_field(address: str) -> str:
    """ "rfc822; addr", or RFC 6533's "utf-8" type with \\x{HEX} escapes if not ASCII."""
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    # RFC 6533 section 3, utf-8-addr-xtext: non-ASCII and the characters "\", "+" and "="
    # as EmbeddedUnicodeChar, so the field stays ASCII in message/delivery-status.
    escaped = "".join(
        c if c.isascii() and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {escaped}"


def _one_line(text: str) -> str:
    """No CR, LF or other control character can reach a header (RFC 5322 2.2)."""
    return " ".join(_CONTROL.sub(" ", text).split())
