"""What the history keeps from a message's header section: the `From:` domain, the
`Message-ID` and, only if the admin turned it on, the `Subject`.

Bounded work: the header section alone (RFC 5322 2.1: it ends at the first empty line), and
at most its first HEADER_LIMIT octets, searched at C speed; a body is never looked at,
whatever its size. It runs in the queue's writer thread, not on the event loop.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header

HEADER_LIMIT = 64 * 1024
# Characters kept of a field's value: a Message-ID is at most 998 octets on its line
# (RFC 5322 2.1.1), but the help desk reads the first few dozen.
MAX_VALUE = 256
MAX_SUBJECT = 200
_SPELLINGS = {b"from": (b"\r\nFrom:",), b"message-id": (b"\r\nMessage-ID:", b"\r\nMessage-Id:"),
              b"subject": (b"\r\nSubject:",)}
_ANY_CASE = {name: re.compile(rb"\r\n" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE)
             for name in _SPELLINGS}
# The domain of the (first) mailbox: the part after the last '@' of the angle-addr, or of
# the whole value when there is none (RFC 5322 3.4).
_DOMAIN = re.compile(rb"@([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class HeaderFacts:
    from_domain: str | None
    message_id: str | None
    subject: str | None  # None unless asked for


def header_section(message: bytes) -> bytes:
    """The header section, without the empty line that ends it; at most HEADER_LIMIT."""
    end = message.find(b"\r\n\r\n", 0, HEADER_LIMIT)
    return message[: end + 2] if end >= 0 else message[:HEADER_LIMIT]


def _value(header: bytes, name: bytes) -> bytes | None:
    """The first `name:` field's value, unfolded (RFC 5322 2.2.3); `header` starts with a
    line break. The usual spellings are found with bytes.find, at C speed; any other
    capitalisation (field names are case-insensitive, 2.2) with a regular expression."""
    start = -1
    for spelling in _SPELLINGS[name]:
        start = header.find(spelling)
        if start >= 0:
            start += len(spelling)
            break
    if start < 0:
        match = _ANY_CASE[name].search(header)
        if match is None:
            return None
        start = match.end()
    end = header.find(b"\r\n", start)
    while end >= 0 and header[end + 2:end + 3] in (b" ", b"\t"):
        end = header.find(b"\r\n", end + 2)
    return (header[start:] if end < 0 else header[start:end]).replace(b"\r\n", b"")


def _clean(text: str) -> str:
    """One line of printable text: control characters (a CR, an escape sequence for the
    help desk's terminal) become spaces, and runs of spaces one."""
    return " ".join(_CONTROL.sub(" ", text).split())


def _text(raw: bytes, limit: int) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return (text if text.isprintable() else _clean(text))[:limit]


def from_domain(value: bytes) -> str | None:
    angle = value.rfind(b"<")
    match = _DOMAIN.search(value, angle if angle >= 0 else 0)
    return match.group(1).decode("ascii").lower() if match else None


def decoded_subject(value: bytes) -> str:
    """RFC 2047 encoded words decoded; a malformed one is kept as it came."""
    text = _text(value, 4 * MAX_SUBJECT)
    with contextlib.suppress(HeaderParseError, LookupError, UnicodeError, ValueError):
        text = str(make_header(decode_header(text)))
    return _clean(text)[:MAX_SUBJECT]


def scan(message: bytes, subjects: bool) -> HeaderFacts:
    header = b"\r\n" + header_section(message)
    sender = _value(header, b"from")
    message_id = _value(header, b"message-id")
    subject = _value(header, b"subject") if subjects else None
    return HeaderFacts(
        from_domain=None if sender is None else from_domain(sender),
        message_id=None if message_id is None else _text(message_id, MAX_VALUE) or None,
        subject=None if subject is None else decoded_subject(subject),
    )
