"""Turning an 8-bit message into a 7-bit one, for a next hop that does not offer 8BITMIME.

RFC 6152 3: a message with 8-bit octets may only be sent with BODY=8BITMIME, to a server
that offers 8BITMIME; to any other, the client must convert it (RFC 1652 had the same rule)
or return it. Postfix converts, and so do we: every leaf part whose content has 8-bit
octets is re-encoded as quoted-printable (RFC 2045 6.7) with the standard library's email
package. The header fields are written back as they came, whatever they hold (RFC 2047
encoding them would change their meaning). Conversion changes the body, so the sender's
DKIM signature no longer verifies (docs/admin.md says so).

CPU work proportional to the message: run `to_7bit` in a worker thread, never on the
event loop (`convert` does).
"""

from __future__ import annotations

import asyncio
import email.policy
import quopri
from email.message import Message
from email.parser import BytesParser
from io import BytesIO

# compat32 keeps header fields exactly as parsed; no refolding (max_line_length None),
# CRLF on the wire.
_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=None)
# RFC 2045 6.1: only these say what the octets are; anything else (base64,
# quoted-printable, or a label we do not know) is left alone.
_PLAIN_ENCODINGS = ("", "7bit", "8bit", "binary")


def needs_conversion(body: bytes) -> bool:
    return not body.isascii()


def to_7bit(body: bytes) -> bytes:
    """`body` (a whole message, CRLF line ends) with its 8-bit parts in quoted-printable."""
    from email.generator import BytesGenerator

    message = BytesParser(policy=_POLICY).parsebytes(body)
    changed = False
    for part in message.walk():
        if not part.is_multipart():
            changed |= _encode_part(part)
    if not changed:  # 8-bit only in header fields: nothing in MIME can carry it
        return body
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(message)
    return out.getvalue()


def _encode_part(part: Message) -> bool:
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte not in _PLAIN_ENCODINGS:
        return False
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes) or raw.isascii():
        return False
    # quopri wants LF line ends; the generator writes CRLF again.
    encoded = quopri.encodestring(raw.replace(b"\r\n", b"\n"))
    part.set_payload(encoded.decode("ascii"))
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", "quoted-printable")
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
    return True


async def convert(body: bytes) -> bytes:
    """`to_7bit` in a worker thread: parsing is proportional to the message's size."""
    return await asyncio.to_thread(to_7bit, body)
