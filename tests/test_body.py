"""Reading a DATA body (forwarder/smtpbody.py `BodyReader`): the reader that takes the body as
it arrives and looks for CRLF `.` CRLF gives exactly what reading it line by line gives,
for any body and any way the bytes arrive, and hands back exactly what follows the end."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from forwarder import replies
from forwarder.replies import Reply
from forwarder.smtpbody import BodyReader, content_fault

LIMIT = 16  # the reader's buffer limit: small, so bodies cross it all the time
MAX_LINE = 12
MAX_SIZE = 80


async def _read(data: bytes, cuts: list[int], new: bool) -> tuple[bytes | Reply, bytes]:
    reader = asyncio.StreamReader(limit=LIMIT)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})

    async def feed() -> None:
        for a, b in itertools.pairwise(points):
            reader.feed_data(data[a:b])
            await asyncio.sleep(0)
        reader.feed_eof()

    if new:
        return _read_new(data, points)
    feeder = asyncio.create_task(feed())
    got = await _reference(reader)
    rest = await reader.read()
    await feeder
    return got, rest


def _read_new(data: bytes, points: list[int]) -> tuple[bytes | Reply, bytes]:
    """BodyReader fed the same pieces; what follows the end is its rest plus what was
    not fed yet."""
    body = BodyReader(MAX_SIZE, MAX_LINE)
    for a, b in itertools.pairwise(points):
        done = body.feed(data[a:b])
        if done is not None:
            got, rest = done
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BODY, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
       stuff=st.booleans())
@example(body=b"", cuts=[], stuff=True)
@example(body=b"..\r\n.a\r\n", cuts=[1, 2, 3], stuff=False)
@example(body=b"a\r\r\n", cuts=[2, 3], stuff=True)  # a CRLF split between two pieces
def test_pieces_read_like_lines(body: bytes, cuts: list[int], stuff: bool) -> None:
    # What a client sends: a "." that starts a line (after any CRLF) is doubled; a careless
    # client sends the body as it is, and its lines are read the same way by both.
    if stuff:
        body = (b"." if body.startswith(b".") else b"") + body.replace(b"\r\n.", b"\r\n..")
    wire = body + b".\r\nQUIT\r\n"
    new, new_rest = asyncio.run(_read(wire, cuts, new=True))
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
        assert len(body._buf) <= 2 * MAX_SIZE  # past the limit, the bytes are dropped
    assert body.feed(b".\r\nNOOP\r\n") == (replies.SIZE_EXCEEDED, b"NOOP\r\n")


def test_the_end_may_straddle_two_pieces_after_the_limit() -> None:
    body = BodyReader(MAX_SIZE, MAX_LINE)
    assert body.feed(b"x" * 500 + b"\r\n.") is None
    assert body.feed(b"\r\nQUIT\r\n") == (replies.SIZE_EXCEEDED, b"QUIT\r\n")
