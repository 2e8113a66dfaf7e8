"""What the history keeps from a message's header section: the `From:` domain, the
`Message-ID` and, only if the admin turned it on, the `Subject`.

Bounded work: the header section alone (RFC 5322 2.1: it ends at the first empty line), and
at most its first HEADER_LIMIT octets, searched at C speed; a body is never looked at,
whatever its size. It runs in the queue's writer thread, not on the event loop, for every
message delivered: what is kept is only cut to size here, and made printable where it is
shown (`clean`).
"""

from __future__ import annotations

import contextlib
import re
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
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


# (the From: domain, the Message-ID, the Subject or None unless asked for): a plain tuple,
# made for every message delivered.
HeaderFacts = tuple[str | None, str | None, str | None]
NO_FACTS: HeaderFacts = (None, None, None)


def header_section(message: bytes) -> bytes:
    """The header section, without the empty line that ends it; at most HEADER_LIMIT."""
    end = message.find(b"\r\n\r\n", 0, HEADER_LIMIT)
    return message[: end + 2] if end >= 0 else message[:HEADER_LIMIT]


def _value(message: bytes, end: int, name: bytes) -> bytes | None:
    """The first `name:` field's value in `message[:end]`, unfolded (RFC 5322 2.2.3). The
    usual spellings are found with bytes.find, at C speed and without a copy; any other
    capitalisation (field names are case-insensitive, 2.2) with a regular expression. A
    field is found after a line break: the first line of what the queue holds is always
    our own Received field."""
    start = -1
    for spelling in _SPELLINGS[name]:
        start = message.find(spelling, 0, end)
        if start >= 0:
            start += len(spelling)
            break
    if start < 0:
        match = _ANY_CASE[name].search(message, 0, end)
        if match is None:
            return None
        start = match.end()
    stop = message.find(b"\r\n", start, end)
    while stop >= 0 and message[stop + 2:stop + 3] in (b" ", b"\t"):
        stop = message.find(b"\r\n", stop + 2, end)
    return message[start:end if stop < 0 else stop].replace(b"\r\n", b"")


def clean(text: str) -> str:
    """One line of printable text: control characters (a CR, an escape sequence for the
    help desk's terminal) become spaces, and runs of spaces one. Applied where the text is
    shown (forwarder/history/view.py): what is stored is only bounded."""
    return " ".join(_CONTROL.sub(" ", text).split())


def _text(raw: bytes, limit: int) -> str:
    return raw[:4 * limit].strip().decode("utf-8", "replace")[:limit]


def from_domain(value: bytes) -> str | None:
    """The domain of the first mailbox: after the '@' of the angle-addr if there is one,
    else of the value (RFC 5322 3.4), lower-cased; None if there is no '@'."""
    angle = value.find(b"<")
    at = value.find(b"@", angle + 1)
    if at < 0:
        return None
    domain = value[at + 1:].partition(b">" if angle >= 0 else b",")[0].strip()
    return domain[:MAX_VALUE].decode("utf-8", "replace").lower() or None


def decoded_subject(value: bytes) -> str:
    """RFC 2047 encoded words decoded; a malformed one is kept as it came."""
    text = clean(_text(value, 4 * MAX_SUBJECT))
    with contextlib.suppress(HeaderParseError, LookupError, UnicodeError, ValueError):
        text = str(make_header(decode_header(text)))
    return clean(text)[:MAX_SUBJECT]


def notice_kind(section: bytes) -> str:
    """Which of our notices to a target (forwarder/notices.py) a header section is: the
    one asking to confirm has the confirm+ address as its `Reply-To:`; the one saying
    another target fails has none."""
    return "confirm" if section.find(b"\r\nReply-To:") >= 0 else "failing"


def scan(message: bytes, subjects: bool) -> HeaderFacts:
    """The facts of a whole message (its header section is found first)."""
    return scan_section(header_section(message), subjects)


def scan_section(section: bytes, subjects: bool) -> HeaderFacts:
    """The facts of a header section (`header_section`'s result). Run for every message
    delivered, so the usual shape (`From:` and `Message-ID:` so spelled, each on one line)
    is read in line with a few bytes methods, and anything else the general way."""
    find, end = section.find, len(section)
    start = find(b"\r\nFrom:")
    stop = find(b"\r\n", start + 7) if start >= 0 else -1
    if stop < 0 or section.startswith((b" ", b"\t"), stop + 2):
        sender = _value(section, end, b"from")  # absent, folded, or spelled otherwise
    else:
        sender = section[start + 7:stop]
    start = find(b"\r\nMessage-ID:")
    if start < 0:
        start = find(b"\r\nMessage-Id:")
    stop = find(b"\r\n", start + 13) if start >= 0 else -1
    if stop < 0 or section.startswith((b" ", b"\t"), stop + 2):
        message_id = _value(section, end, b"message-id")
    else:
        message_id = section[start + 13:stop]
    subject = _value(section, end, b"subject") if subjects else None
    return (None if sender is None else from_domain(sender),
            None if message_id is None else _text(message_id, MAX_VALUE) or None,
            None if subject is None else decoded_subject(subject))
