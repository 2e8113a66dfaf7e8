"""Reading a DATA body (forwarder/smtpbody.py `BodyReader`): the reader that takes the body as
it arrives and looks for CRLF `.` CRLF gives exactly what reading it line by line gives,
for any body and any way the bytes arrive, kept in memory or spilled to a file past a
threshold, and hands back exactly what follows the end."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from forwarder import replies
from forwarder.replies import Reply
from forwarder.smtpbody import (
    HEAD_OCTETS,
    BodyReader,
    Spilled,
    content_fault,
    lines_within,
    stuffed_pieces,
    unstuff,
)

LIMIT = 16  # the reader's buffer limit: small, so bodies cross it all the time
MAX_LINE = 12
MAX_SIZE = 80


class MemorySpill:
    """A Spill that keeps what it is given (the daemon's is a spool file)."""

    def __init__(self) -> None:
        self.path = Path("/nonexistent/spill")
        self.data = bytearray()
        self.closed = self.discarded = False

    def write(self, data: bytes | bytearray) -> None:
        assert not self.closed and not self.discarded
        self.data += data

    def close(self) -> None:
        self.closed = True

    def discard(self) -> None:
        self.discarded = True
        self.data.clear()


async def _read(data: bytes, cuts: list[int], new: bool, spill_at: int | None = None,
                dot_steps: int = BodyReader.dot_steps) -> tuple[bytes | Reply, bytes]:
    reader = asyncio.StreamReader(limit=LIMIT)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})

    async def feed() -> None:
        for a, b in itertools.pairwise(points):
            reader.feed_data(data[a:b])
            await asyncio.sleep(0)
        reader.feed_eof()

    if new:
        return _read_new(data, points, spill_at, dot_steps)
    feeder = asyncio.create_task(feed())
    got = await _reference(reader)
    rest = await reader.read()
    await feeder
    return got, rest


def _read_new(data: bytes, points: list[int], spill_at: int | None = None,
              dot_steps: int = BodyReader.dot_steps) -> tuple[bytes | Reply, bytes]:
    """BodyReader fed the same pieces; what follows the end is its rest plus what was
    not fed yet. With `spill_at`, what went to the spill is read back (unstuffed).
    `dot_steps`: how many stuffed dots a piece is scanned for one by one before `find`
    and `count` take over (a small figure takes the second way in short bodies)."""
    spills: list[MemorySpill] = []

    def spill() -> MemorySpill:
        spills.append(MemorySpill())
        return spills[-1]

    body = (BodyReader(MAX_SIZE, MAX_LINE) if spill_at is None
            else BodyReader(MAX_SIZE, MAX_LINE, spill, spill_at))
    body.dot_steps = dot_steps
    for a, b in itertools.pairwise(points):
        done = body.feed(data[a:b])
        if done is not None:
            got, rest = done
            if isinstance(got, Spilled):
                (used,) = spills
                assert got.spill is used and used.closed and not used.discarded
                content = unstuff(used.data)
                assert got.size == len(content) and content.startswith(got.head)
                return content, rest + data[b:]
            assert all(s.discarded for s in spills)  # refused: nothing is left behind
            return got, rest + data[b:]
    raise AssertionError("the end of data was not found")


async def _reference(reader: asyncio.StreamReader) -> bytes | Reply:
    """The reference: the line-by-line reader `read_body` replaced, then `content_fault`."""
    kept: list[bytes] = []
    size, fault, at_start = 0, None, True
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            fault, at_start = fault or replies.TEXT_LINE_TOO_LONG, False
            continue
        if line[0] == 0x2E and at_start:
            if line == b".\r\n":
                break
            line = line[1:]
        at_start = True
        if fault is not None:
            continue
        size += len(line)
        if size > MAX_SIZE or len(line) > MAX_LINE:
            fault = replies.SIZE_EXCEEDED if size > MAX_SIZE else replies.TEXT_LINE_TOO_LONG
        else:
            kept.append(line)
    if fault is not None:
        return fault
    content = b"".join(kept)
    return content_fault(content) or content


# Lines of a few octets from an alphabet with every troublemaker: dots, bare CR and LF, NUL.
_LINE = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\x00", b" "]), max_size=16)
_BODY = st.lists(_LINE.map(b"".join), max_size=12).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines))
_SIZE_OR_LINE = {replies.SIZE_EXCEEDED, replies.TEXT_LINE_TOO_LONG}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BODY, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
       stuff=st.booleans(), spill_at=st.one_of(st.none(), st.integers(0, 40)),
       dot_steps=st.sampled_from([0, 1, 2, BodyReader.dot_steps]))
@example(body=b"", cuts=[], stuff=True, spill_at=None, dot_steps=64)
@example(body=b"..\r\n.a\r\n", cuts=[1, 2, 3], stuff=False, spill_at=None, dot_steps=64)
@example(body=b"a\r\r\n", cuts=[2, 3], stuff=True, spill_at=None, dot_steps=64)  # a CRLF in two
@example(body=b".a\r\nb\r\n", cuts=[1, 4], stuff=True, spill_at=2, dot_steps=64)
@example(body=b"a\r\n.b\r\n.c\r\n", cuts=[5], stuff=True, spill_at=None, dot_steps=1)
@example(body=b"a\r\n.b\r\n", cuts=[4], stuff=True, spill_at=None, dot_steps=0)  # dot last
def test_pieces_read_like_lines(body: bytes, cuts: list[int], stuff: bool,
                                spill_at: int | None, dot_steps: int) -> None:
    # What a client sends: a "." that starts a line (after any CRLF) is doubled; a careless
    # client sends the body as it is, and its lines are read the same way by both.
    if stuff:
        body = (b"." if body.startswith(b".") else b"") + body.replace(b"\r\n.", b"\r\n..")
    wire = body + b".\r\nQUIT\r\n"
    new, new_rest = asyncio.run(_read(wire, cuts, new=True, spill_at=spill_at,
                                      dot_steps=dot_steps))
    old, old_rest = asyncio.run(_read(wire, cuts, new=False))
    assert new_rest == old_rest  # both stop exactly after the real end of data
    if isinstance(old, Reply) and old in _SIZE_OR_LINE:
        # Oversized and with a long line: which of the two refusals wins may differ.
        assert new in _SIZE_OR_LINE
    else:
        assert new == old


def test_oversized_body_is_refused_with_bounded_memory_and_the_rest_kept() -> None:
    body = BodyReader(MAX_SIZE, MAX_LINE)
    for _ in range(1000):
        assert body.feed(b"abcdefghij\r\n") is None
        assert len(body._kept) <= MAX_SIZE  # past the limit, the bytes are dropped
    assert body.feed(b".\r\nNOOP\r\n") == (replies.SIZE_EXCEEDED, b"NOOP\r\n")


def test_the_end_may_straddle_two_pieces_after_the_limit() -> None:
    body = BodyReader(MAX_SIZE, MAX_LINE)
    assert body.feed(b"x" * 500 + b"\r\n.") is None
    done = body.feed(b"\r\nQUIT\r\n")
    assert done is not None and done[0] in _SIZE_OR_LINE and done[1] == b"QUIT\r\n"


def test_a_big_body_goes_to_the_spill_as_it_arrives() -> None:
    """Past the threshold, memory holds at most the threshold and a line, whatever the
    body's size; the head keeps the unstuffed start for the header checks."""
    spill = MemorySpill()
    body = BodyReader(10**9, 1000, lambda: spill, spill_at=4096)
    header = b"Subject: big\r\n\r\n"
    assert body.feed(header + b"..dot\r\n") is None
    for _ in range(2000):
        assert body.feed(b"ab\r\n" * 256) is None
        assert len(body._kept) < 4096 + 1024
    got, rest = body.feed(b".\r\nQUIT\r\n") or (None, b"")
    assert isinstance(got, Spilled) and rest == b"QUIT\r\n"
    assert got.size == len(header) + len(b".dot\r\n") + 2000 * 256 * 4
    assert got.head.startswith(header + b".dot\r\n") and len(got.head) <= HEAD_OCTETS
    assert bytes(spill.data[:len(header) + 7]) == header + b"..dot\r\n"  # wire form


def test_a_spill_that_fails_refuses_with_a_temporary_reply() -> None:
    class FullDisk(MemorySpill):
        def write(self, data: bytes | bytearray) -> None:
            raise OSError(28, "No space left on device")

    spill = FullDisk()
    body = BodyReader(10**9, 1000, lambda: spill, spill_at=16)
    assert body.feed(b"x" * 40 + b"\r\n") is None
    assert body.feed(b".\r\n") == (replies.QUEUE_FULL, b"")
    assert spill.discarded


@pytest.mark.parametrize(("line", "fault"), [
    (b"a\rb\r\n", replies.BARE_LINE_END),  # a CR alone inside a line
    (b"a\nb\r\n", replies.BARE_LINE_END),  # an LF alone
    (b"a\r\n\nb\r\n", replies.BARE_LINE_END),  # an LF right after a CRLF
    (b"a\r\r\n", replies.BARE_LINE_END),  # a CR right before a CRLF
    (b"\tx\x0b\x0c\x01\r\n", None),  # control characters below CR end no line
    (b"caf\xc3\xa9\r\n", None),  # 8-bit text: one character per octet, never an error
])
def test_bare_line_ends_are_found_however_the_body_is_cut(line: bytes,
                                                          fault: Reply | None) -> None:
    """RFC 5321 2.3.8: a CR or LF outside a CRLF refuses the message (SMTP smuggling),
    wherever the pieces are cut and whether the body is kept or spilled; the 8-bit flag
    a spilled body carries (RFC 6152) is found on the way."""
    wire = b"x\r\n" * 30 + line * 3 + b".\r\n"
    for cut in range(1, len(wire)):
        spill = MemorySpill()
        body = BodyReader(10**6, 1000, itertools.repeat(spill).__next__, spill_at=64)
        done = body.feed(wire[:cut]) or body.feed(wire[cut:])
        assert done is not None and done[1] == b""
        if fault is not None:
            assert done[0] == fault and not spill.data  # nothing is left behind
        else:
            assert isinstance(done[0], Spilled)
            assert done[0].eight_bit == (not line.isascii())
            assert bytes(spill.data) == wire[:-3]


@given(lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"")
                                                 .replace(b"\n", b"")), max_size=20),
       longest=st.integers(0, 25))
def test_lines_within_is_the_longest_line(lines: list[bytes], longest: int) -> None:
    region = b"".join(line + b"\r\n" for line in lines)
    expected = all(len(line) - line.startswith(b".") <= longest for line in lines)
    assert lines_within(region, longest) == expected


@given(content=st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"a."]),
                        max_size=30).map(lambda ls: b"".join(x + b"\r\n" for x in ls)),
       size=st.integers(1, 12))
def test_stuffed_pieces_are_the_wire_form(content: bytes, size: int) -> None:
    wire = b"".join(stuffed_pieces(content, size))
    assert unstuff(wire) == content
    assert not wire.startswith(b".\r\n") and b"\r\n.\r\n" not in wire


def test_a_body_of_dot_lines_is_scanned_at_c_speed_past_the_first_dots() -> None:
    """Every line starts with a stuffed dot: past `dot_steps` of them in a piece, the
    reader counts the rest with `count` (no Python step per line), and gets the same size
    and content as the line-by-line reading."""
    content = b"".join(b".%d\r\n" % i for i in range(5000))
    wire = content.replace(b"\r\n.", b"\r\n..")
    wire = (b"." + wire if wire.startswith(b".") else wire) + b".\r\nQUIT\r\n"
    body = BodyReader(10**9, 1000)
    done = None
    for start in range(0, len(wire), 4096):
        done = body.feed(wire[start:start + 4096])
        if done is not None:
            break
    assert done == (content, b"QUIT\r\n")
