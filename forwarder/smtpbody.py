"""The session's input, pure: command lines framed by CRLF, and the DATA body (find its
end, check it, keep it: RFC 5321 4.5.2, 2.3.8).

Everything here works on byte strings at C speed (`bytes.find`, `count`, `replace`, and
`io`'s universal-newlines decoder for the line ends), a piece at a time as the bytes
arrive, never on a Python object per line of the body, and never on the whole body in one
pass: what a 25 MiB body costs is spread over the reads that bring it, a few hundred
microseconds each.

A body is kept in its wire form (CRLF line ends, dot-stuffed) as it arrives: in memory up
to `spill_at` octets, then written to a `Spill` (a spool file the adapter provides), so a
session holds a bounded amount of memory whatever it is sent. The session does no I/O
itself: it only calls the spill's methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import IncrementalNewlineDecoder
from pathlib import Path
from typing import Protocol

from forwarder import replies
from forwarder.replies import Reply

TOO_LONG = b"\x00too long"  # a sentinel: no real line holds a NUL and gets this far

# The unstuffed beginning of a spilled body kept in memory: its header section (or the
# start of it), for the checks that only read headers (loops, DSNs).
HEAD_OCTETS = 64 * 1024


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


def unstuff(wire: bytes | bytearray) -> bytes:
    """RFC 5321 4.5.2: a line's leading "." is removed. `wire` starts at a line start."""
    start = 1 if wire[:1] == b"." else 0
    return bytes(wire[start:]).replace(b"\r\n.", b"\r\n")


def stuffed_pieces(content: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """`content` (whole CRLF lines) dot-stuffed, in pieces of about `size` octets cut at
    line ends, so a big legacy body is never stuffed in one pass."""
    start, end = 0, len(content)
    while start < end:
        cut = content.find(b"\r\n", min(start + size, end) - 2)
        stop = end if cut < 0 else cut + 2
        piece = content[start:stop].replace(b"\r\n.", b"\r\n..")
        yield b"." + piece if piece[:1] == b"." else piece
        start = stop


def lines_within(region: bytes | bytearray, longest: int) -> bool:
    """Whether every line of `region` (from a line start, ending with CRLF) holds at most
    `longest` octets before its CRLF, one more if it starts with "." (the stuffed dot
    does not count: RFC 5321 4.5.3.1.6).

    Not a pass per line: from a line start, the last CRLF within reach of the longest
    allowed line is found with one `rfind`; if there is none, that line is too long, and
    if there is one, every line before it is shorter. Each step moves on by about a
    whole allowed line, so 25 MiB of 2-octet lines costs some 25,000 steps, not 6
    million."""
    pos, end = 0, len(region)
    while pos < end:
        reach = pos + longest + 2 + (region[pos] == 0x2E)
        if reach >= end:
            reach = end
        last = region.rfind(b"\r\n", pos, reach)
        if last < 0:
            return False
        pos = last + 2
    return True


def _no_end(buf: bytes, dots: int) -> tuple[int, int]:
    """`_scan`'s answer when the end is not in `buf`: only the whole lines are taken, up
    to the last CRLF; a dot right after it starts the partial line kept for the next
    piece, and was counted among `dots`."""
    last = buf.rfind(b"\r\n")
    return -1, dots - (last >= 0 and buf[last + 2:last + 3] == b".")


class Spill(Protocol):
    """Where a body too big for memory goes (the adapter's spool file). `write` and
    `close` raise OSError; `discard` never does and may be called more than once."""

    path: Path

    def write(self, data: bytes | bytearray) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Spilled:
    """A body that went to a spill: its wire form is in `spill` (closed), `size` is the
    message's octets unstuffed, `head` its first octets unstuffed (whole lines, at most
    HEAD_OCTETS): its header section, or the start of it; `eight_bit`: whether any octet
    is past US-ASCII (RFC 6152: BODY=8BITMIME or a conversion onward)."""

    spill: Spill
    size: int
    head: bytes
    eight_bit: bool = False


SpillFactory = Callable[[], Spill]


def _storage_fault(error: OSError) -> Reply:
    return replies.QUEUE_FULL if error.errno == 28 else replies.QUEUE_UNAVAILABLE  # ENOSPC


class BodyReader:
    """A DATA body taken in as it arrives, up to the line `.` (RFC 5321 4.5.2), checked
    and kept a piece at a time.

    The end is a line that is exactly `.`: `.` CRLF at the very start, or CRLF `.` CRLF.
    Each piece is cut after its last CRLF; the whole lines before the cut are checked
    (size unstuffed, line length, bare CR or LF, NUL) and kept, the partial line after it
    waits for the next piece (at most a line's worth). Once the message is known to be
    refused (too big, a line too long) nothing more is kept or checked, but the reading
    goes on to the real end, so the client's remaining bytes are never taken for commands.
    `feed` returns None until the end, then the result (the message unstuffed, a
    `Spilled`, or the reply refusing it) and the bytes after the end (pipelined commands).
    """

    # Lines starting with a stuffed dot looked at one by one in a piece (`_scan`).
    dot_steps = 16

    def __init__(self, max_size: int, max_line: int, spill: SpillFactory | None = None,
                 spill_at: int = 256 * 1024) -> None:
        self.max_size = max_size
        self.longest = max_line - 2  # octets before the CRLF
        self._spill_factory = spill
        self._spill_at = spill_at
        self._spill: Spill | None = None
        self._head = b""
        self._kept = bytearray()  # wire form, while in memory
        self._carry = b""  # the partial line after the last CRLF seen
        self._at_line_start = True  # _carry begins a line (not the tail of a long one)
        self._size = 0  # octets unstuffed, of the whole lines seen
        # Which line ends the body holds (CRLF, bare CR, bare LF): see `_take`.
        self._line_ends = IncrementalNewlineDecoder(None, translate=False)
        self._nul = False
        self._eight_bit = False
        self._fault: Reply | None = None  # too big or a line too long: refused
        self._storage: Reply | None = None  # the spill failed: 451 or 452

    def feed(self, data: bytes | bytearray) -> tuple[bytes | Spilled | Reply, bytes] | None:
        buf = self._carry + data
        if self._at_line_start and buf[:3] == b".\r\n":
            return self._result(), bytes(buf[3:])
        end, dots = self._scan(buf)
        if end < 0:
            cut = buf.rfind(b"\r\n") + 2
            self._take(buf[:cut] if cut > 1 else b"", dots)
            self._carry = buf[cut:] if cut > 1 else buf
            if len(self._carry) > self.longest + 2:  # a line too long, still going on
                self._fail(replies.TEXT_LINE_TOO_LONG)
                self._carry = self._carry[-4:]
                self._at_line_start = False
            return None
        self._take(buf[:end], dots)
        return self._result(), bytes(buf[end + 3:])

    def _scan(self, buf: bytes) -> tuple[int, int]:
        """One pass for two answers: where the end of data is (the offset of its `.`
        line, -1 if it is not in `buf`), and how many lines after the first, up to the
        last whole line before the end, start with a stuffed `.`. Both are found at the
        dots that follow a CRLF: followed by CRLF it is the end, otherwise a stuffed dot.

        The dots are looked for alone first: that is `memchr`, some 50 times faster
        than looking for CRLF `.` (which stops at every line end), and a big body is
        mostly an attachment in base64, which holds no dot at all. Past `dot_steps` dots
        in one piece (text, with a dot in every sentence), CRLF `.` is looked for
        instead (`_scan_lines`)."""
        pos = dots = 0
        for _ in range(self.dot_steps):
            found = buf.find(b".", pos)
            if found < 0:
                return _no_end(buf, dots)
            if found >= 2 and buf[found - 2:found] == b"\r\n":
                if buf[found + 1:found + 3] == b"\r\n":
                    return found, dots
                dots += 1
            pos = found + 1
        # A CRLF "." whose dot is at `pos` or later starts at `pos - 2` or later.
        return self._scan_lines(buf, max(pos - 2, 0), dots)

    def _scan_lines(self, buf: bytes, pos: int, dots: int) -> tuple[int, int]:
        """`_scan` from `pos` on by looking for CRLF `.`. Real text has few lines that
        start with a dot; past `dot_steps` of them, `find` and `count` take over, so a
        body of dot lines costs two passes at C speed, not a Python step per line."""
        for _ in range(self.dot_steps):
            found = buf.find(b"\r\n.", pos)
            if found < 0:
                break
            if buf[found + 3:found + 5] == b"\r\n":
                return found + 2, dots
            pos, dots = found + 3, dots + 1
        else:
            found = buf.find(b"\r\n.\r\n", pos)
            if found >= 0:
                return found + 2, dots + buf.count(b"\r\n.", pos, found + 2)
            dots += buf.count(b"\r\n.", pos)
        return _no_end(buf, dots)

    def _take(self, region: bytes, dots: int) -> None:
        """Whole lines (or nothing), `dots` of them (after the first) starting with a
        stuffed `.`: check them, and keep them while all is well. After an overlong line
        (the only way not to be at a line start) the message is refused already, so what
        follows it is only looked through for the end."""
        if not region:
            return
        if self._fault is not None:
            self._at_line_start = True
            return
        if not lines_within(region, self.longest):
            self._fail(replies.TEXT_LINE_TOO_LONG)
            return
        self._size += len(region) - dots - (region[0] == 0x2E)
        if self._size > self.max_size:
            self._fail(replies.SIZE_EXCEEDED)
            return
        # Any CR or LF not in a CRLF is bare (RFC 5321 2.3.8): the universal-newlines
        # decoder records which of CRLF, CR and LF it has seen, in one C pass that skips
        # every octet above CR in a tight loop (1.9 ms for 5 MB of text lines, against
        # 6.2 for a count of CRLF plus a pass counting CR and LF: docs/performance.md).
        # Latin-1 maps each octet to one character, with no error possible, and knows
        # whether all were ASCII as it goes. `region` ends with a CRLF, so nothing is
        # left pending from one piece to the next (`final`).
        text = region.decode("latin-1")
        self._line_ends.decode(text, True)
        self._nul = self._nul or b"\x00" in region
        self._eight_bit = self._eight_bit or not text.isascii()
        if self._content_fault() is None and self._storage is None:
            self._keep(region)

    def _keep(self, region: bytes) -> None:
        if self._spill is not None:
            self._write(region)
            return
        self._kept += region
        if self._spill_factory is None or len(self._kept) < self._spill_at:
            return
        cut = self._kept.rfind(b"\r\n", 0, HEAD_OCTETS) + 2
        self._head = unstuff(self._kept[:cut])
        self._write(self._kept)
        self._kept = bytearray()

    def _write(self, data: bytes | bytearray) -> None:
        try:
            if self._spill is None:
                assert self._spill_factory is not None
                self._spill = self._spill_factory()
            self._spill.write(data)
        except OSError as error:
            self._storage = _storage_fault(error)
            self.discard()

    def _fail(self, reply: Reply) -> None:
        """The message is refused: nothing more is kept."""
        self._fault = self._fault or reply
        self.discard()

    def _content_fault(self) -> Reply | None:
        if self._line_ends.newlines not in (None, "\r\n"):
            return replies.BARE_LINE_END  # SMTP smuggling
        return replies.NUL_IN_MESSAGE if self._nul else None

    def _result(self) -> bytes | Spilled | Reply:
        fault = self._fault or self._content_fault() or self._storage
        if fault is not None:
            self.discard()
            return fault
        if self._spill is None:
            return unstuff(self._kept)
        try:
            self._spill.close()
        except OSError as error:
            self.discard()
            return _storage_fault(error)
        return Spilled(self._spill, self._size, self._head, self._eight_bit)

    def discard(self) -> None:
        """Forget what was kept (the session ended, or the message is refused)."""
        self._kept = bytearray()
        if self._spill is not None:
            self._spill.discard()
