"""The session's input, pure: command lines framed by CRLF, and the DATA body (find its
end, undo dot-stuffing, check it: RFC 5321 4.5.2, 2.3.8).

Everything here works on whole byte strings at C speed (`bytes.find`, `count`, `replace`,
`split`), never on a Python object per line of the body.
"""

from __future__ import annotations

from forwarder import replies
from forwarder.replies import Reply

TOO_LONG = b"\x00too long"  # a sentinel: no real line holds a NUL and gets this far


class CommandLines:
    """Command lines out of the input buffer: each ends at CRLF only (RFC 5321 2.3.8)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # the longest line read whole
        self._skipping = False  # inside an overlong line, up to its CRLF

    def next_line(self, buf: bytearray) -> bytes | None:
        """The next line of `buf` without its CRLF (consumed), `TOO_LONG` for a line past
        the limit (skipped up to its CRLF, so its tail is never read as a command), or
        None until a whole line is there."""
        end = buf.find(b"\r\n")
        if self._skipping:
            if end < 0:
                del buf[:-1]  # keep a final CR: the CRLF may straddle two reads
                return None
            del buf[:end + 2]
            self._skipping = False
            return TOO_LONG
        if end < 0:
            if len(buf) > self.limit:
                self._skipping = True
                del buf[:-1]
            return None
        if end > self.limit:
            del buf[:end + 2]
            return TOO_LONG
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line


def content_fault(content: bytes) -> Reply | None:
    """What is wrong with a whole body whose lines all end in CRLF, if anything.

    Every CRLF in `content` ends a line, so any other CR or LF is bare (RFC 5321 2.3.8,
    RFC 5322 2.3): counting is the check, at C speed, instead of one scan per line."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        return replies.BARE_LINE_END  # SMTP smuggling
    if b"\x00" in content:
        return replies.NUL_IN_MESSAGE
    return None


# The end of DATA: "." CRLF at the start of a line (RFC 5321 4.5.2).
_DOT_CRLF = b".\r\n"
# Dot-stuffing adds one octet to a line of at least three ("." CRLF): the stuffed form of a
# body within the size limit is never longer than this.
_STUFFED = 4 / 3


def finish_body(raw: bytes, max_size: int, max_line: int) -> bytes | Reply:
    """A whole DATA body as read from the wire, without its final `.` CRLF -> the message,
    or what is wrong with it. Undoes dot-stuffing (RFC 5321 4.5.2: a line's leading "." is
    removed) and checks the size, the text line length (RFC 5321 4.5.3.1.6) and the line
    ends, each in one pass at C speed."""
    content = raw[1:] if raw[:1] == b"." else raw
    content = content.replace(b"\r\n.", b"\r\n")
    if len(content) > max_size:
        return replies.SIZE_EXCEEDED
    if content and max(map(len, content.split(b"\r\n"))) + 2 > max_line:
        return replies.TEXT_LINE_TOO_LONG
    return content_fault(content) or content


class BodyReader:
    """A DATA body taken in as it arrives, up to the line `.` (RFC 5321 4.5.2), then
    checked by `finish_body`.

    The end is a `.` CRLF at the start of a line: CRLF `.` CRLF anywhere, or `.` CRLF at
    the very start. Past the size limit the bytes are dropped but the reading goes on to
    that real end, so memory stays bounded and the client's remaining bytes are never
    taken for commands. `feed` returns None until the end, then the result and the bytes
    that came after the end (pipelined commands).
    """

    def __init__(self, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self.max_line = max_line
        # Dot-stuffing adds at most a third: more octets than this is over the limit.
        self._ceiling = int(max_size * _STUFFED) + len(_DOT_CRLF)
        self._buf = bytearray()
        self._dropped = 0  # octets discarded past the size limit
        self._scanned = 0  # where the next search for the end may start

    def feed(self, data: bytes | bytearray) -> tuple[bytes | Reply, bytes] | None:
        buf = self._buf
        buf += data
        if not self._dropped and buf[:3] == _DOT_CRLF:
            end = 0  # an empty body
        else:
            found = buf.find(b"\r\n.\r\n", max(0, self._scanned - 4))
            if found < 0:
                self._scanned = len(buf)
                if self._dropped + len(buf) > self._ceiling:
                    # Keep the last four octets: the end may straddle two reads.
                    self._dropped += len(buf) - 4
                    del buf[:-4]
                    self._scanned = 4
                return None
            end = found + 2
        rest = bytes(buf[end + 3:])
        if self._dropped or end + 3 > self._ceiling:
            return replies.SIZE_EXCEEDED, rest
        return finish_body(bytes(buf[:end]), self.max_size, self.max_line), rest
