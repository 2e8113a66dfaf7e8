"""Property-based: arbitrary command sequences and bytes thrown at a live daemon.

Whatever a client sends, the daemon never crashes, never hangs past its deadlines, answers
only with well-formed replies (RFC 5321 4.2: `ddd`, space or hyphen, printable ASCII, CRLF),
and never queues or delivers a message that did not get a `250 ... queued as ID`.

The daemon runs on its own event loop in a thread, so examples are plain blocking socket
conversations and hypothesis drives them synchronously.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forwarder.config import HostPort, Limits
from forwarder.daemon import Daemon
from forwarder.directory import Directory
from tests.conftest import DOMAIN, Sink, make_settings
from tests.test_hostile import GRAD, forwarding, stuffed

T = TypeVar("T")
REPLY_LINE = re.compile(rb"(\d{3})([ -])[\x20-\x7e]*")
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([A-Z2-7]{16})\r\n")
TRACE_ID = re.compile(rb"with E?SMTP id ([A-Z2-7]{16})")
# Command and DATA deadlines: the longest any example may keep a session.
DEADLINE = 1.0
# Ends DATA if a session is in it, then leaves; the server must close after that.
END = b"\r\n.\r\nQUIT\r\n"


@dataclass
class Live:
    """The daemon and a sink on a private event loop in a background thread."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    daemon: Daemon | None = None
    sink: Sink | None = None
    errors: list[BaseException] = field(default_factory=list)
    announced: set[str] = field(default_factory=set)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self, state_dir: Path) -> None:
        self.sink = Sink()
        await self.sink.start()
        limits = Limits(command_timeout=DEADLINE, data_timeout=DEADLINE,
                        max_message_size=8192)
        self.daemon = Daemon(make_settings(state_dir, limits=limits,
                                           smarthost=HostPort("127.0.0.1", self.sink.port)))
        await self.daemon.start()
        assert self.daemon.front is not None
        record = self.daemon.front.exception_reply

        def exception_reply(error: BaseException) -> str:
            self.errors.append(error)  # any exception reaching the session is a bug
            return record(error)

        self.daemon.front.exception_reply = exception_reply  # type: ignore[method-assign]

    async def stop(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
        if self.sink is not None:
            await self.sink.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    state_dir = tmp_path_factory.mktemp("fuzz") / "state"
    directory = Directory(state_dir / "directory.sqlite3", actor="test")
    forwarding(directory)
    directory.close()
    live = Live()
    thread = threading.Thread(target=live.loop.run_forever, name="fuzz-daemon", daemon=True)
    thread.start()
    try:
        live.run(live.start(state_dir))
        yield live
    finally:
        live.run(live.stop())
        live.loop.call_soon_threadsafe(live.loop.stop)
        thread.join(10)
        live.loop.close()


def converse(port: int, chunks: list[bytes]) -> bytes:
    """Send everything (as one pipelined stream), then END; read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    received = bytearray()
    try:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.sendall(END)
        except OSError:  # the server closed first (QUIT, too many errors): fine
            pass
        started = time.monotonic()
        while time.monotonic() - started < 3 * DEADLINE + 5:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:  # closed with our bytes unread: a close all the same
                return bytes(received)
            if not data:
                return bytes(received)
            received += data
        raise AssertionError(f"session still open after its deadlines: {bytes(received)!r}")
    finally:
        sock.close()


def check_replies(stream: bytes) -> list[str]:
    """Every line a well-formed reply, multi-line replies consistent; the queue ids."""
    lines = stream.split(b"\r\n")
    assert lines[-1] == b"", f"reply stream does not end with CRLF: {stream[-80:]!r}"
    code = None
    for line in lines[:-1]:
        match = REPLY_LINE.fullmatch(line)
        assert match is not None, f"malformed reply line {line!r}"
        assert code is None or match[1] == code, f"code changes inside a reply: {line!r}"
        code = match[1] if match[2] == b"-" else None
    assert code is None, "the stream ends inside a multi-line reply"
    assert lines[0].startswith(b"220 "), lines[0]
    return [m.decode() for m in QUEUED.findall(stream)]


def stored_ids(live: Live) -> set[str]:
    assert live.daemon is not None and live.sink is not None
    conn = sqlite3.connect(live.daemon.settings.queue_path)
    try:
        queued = {row[0] for row in conn.execute("SELECT id FROM messages")}
    finally:
        conn.close()
    delivered = {m[1].decode() for msg in list(live.sink.messages)
                 if (m := TRACE_ID.search(msg.content))}
    return queued | delivered


ENVELOPE = f"MAIL FROM:<a@sender.example>\r\nRCPT TO:<{GRAD}>\r\nDATA\r\n".encode()
TOKENS = [
    b"EHLO fuzz.example\r\n", b"HELO fuzz.example\r\n", b"MAIL FROM:<a@sender.example>\r\n",
    b"MAIL FROM:<>\r\n", b"MAIL FROM:<a@sender.example> SIZE=99999999\r\n",
    b"MAIL FROM:<a@sender.example> BODY=8BITMIME SIZE=10\r\n", f"RCPT TO:<{GRAD}>\r\n".encode(),
    b"RCPT TO:<x@other.example>\r\n", f"RCPT TO:<nobody@{DOMAIN}>\r\n".encode(),
    b"RCPT TO:<postmaster>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n",
    b"EXPN x\r\n", b"HELP\r\n", b"HELP DATA\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
    b"QUIT\r\n", b"BDAT 10 LAST\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r",
    b"\x00", b"\r", b"\n", b"\r\n", b"Subject: x\r\n\r\nbody\r\n",
    b"EHLO fuzz.example\r\n" + ENVELOPE + stuffed(b"Subject: ok\r\n\r\n.hello\r\n"),
    ENVELOPE + b"Subject: smuggle\r\n\r\nx\n.\nMAIL FROM:<b@x.example>\r\n.\r\n",
]
CHUNK = st.one_of(
    st.sampled_from(TOKENS),
    st.binary(max_size=64),
    st.binary(min_size=500, max_size=3000),
    st.text(st.characters(codec="ascii"), max_size=60).map(lambda t: t.encode() + b"\r\n"),
    st.tuples(st.sampled_from(["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "VRFY", "NOOP"]),
              st.binary(max_size=80)).map(lambda p: p[0].encode() + b" " + p[1] + b"\r\n"),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(CHUNK, min_size=1, max_size=16))
def test_arbitrary_sessions_get_well_formed_replies_and_no_stray_mail(
    live: Live, chunks: list[bytes],
) -> None:
    assert live.daemon is not None
    stream = converse(live.daemon.port, chunks)
    live.announced.update(check_replies(stream))
    assert live.errors == []
    assert stored_ids(live) <= live.announced


def test_after_the_fuzz_the_daemon_still_serves(live: Live) -> None:
    assert live.daemon is not None and live.sink is not None
    before = len(live.sink.messages)
    stream = converse(live.daemon.port, [b"EHLO fuzz.example\r\n", ENVELOPE,
                                         stuffed(b"Subject: after\r\n\r\nfine\r\n")])
    (queue_id,) = check_replies(stream)
    live.announced.add(queue_id)
    deadline = time.monotonic() + 10
    while len(live.sink.messages) <= before:
        assert time.monotonic() < deadline, "the last message was not delivered"
        time.sleep(0.02)
    assert stored_ids(live) <= live.announced and queue_id in stored_ids(live)
    assert len(live.daemon.connections) == 0
