"""What the history keeps from a message's header section: the `From:` domain, the
`Message-ID` and, only if the admin turned it on, the `Subject`.

Bounded work: the header section alone (RFC 5322 2.1: it ends at the first empty line), and
at most its first HEADER_LIMIT octets, split into lines at C speed; a body is never looked
at, whatever its size. It runs in the queue's writer thread, not on the event loop.
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
_WANTED = (b"from", b"message-id", b"subject")
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


def _fields(header: bytes) -> dict[bytes, bytes]:
    """The first occurrence of each wanted field, unfolded (RFC 5322 2.2.3)."""
    found: dict[bytes, bytes] = {}
    current: bytes | None = None
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                found[current] += line
            continue
        current = None
        colon = line.find(b":", 0, 40)
        if colon <= 0:
            continue
        name = line[:colon].rstrip().lower()
        if name in _WANTED and name not in found:
            found[name] = line[colon + 1:]
            current = name
    return found


def _clean(text: str) -> str:
    """One line of printable text: control characters (a CR, an escape sequence for the
    help desk's terminal) become spaces, and runs of spaces one."""
    return " ".join(_CONTROL.sub(" ", text).split())


def _text(raw: bytes, limit: int) -> str:
    return _clean(raw.decode("utf-8", "replace"))[:limit]


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
    fields = _fields(header_section(message))
    sender = fields.get(b"from")
    message_id = fields.get(b"message-id")
    subject = fields.get(b"subject")
    return HeaderFacts(
        from_domain=None if sender is None else from_domain(sender),
        message_id=None if message_id is None else _text(message_id, MAX_VALUE) or None,
        subject=decoded_subject(subject) if subjects and subject is not None else None,
    )
