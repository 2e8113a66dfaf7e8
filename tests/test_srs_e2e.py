"""SRS through real SMTP: forwarded mail leaves with an SRS0 sender, its bounces come back."""

from __future__ import annotations

import os
import stat

from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.directory import Directory
from tests.conftest import DOMAIN, DaemonFactory, Sink, simple_message, smtp_send

GRAD = f"jean.dupont@{DOMAIN}"
TARGET = "jean.dupont@gmail.example"
JOBTEASER = "noreply@jobteaser.com"


def graduate(directory: Directory) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)


async def forward_once(d: object, sink: Sink, sender: str = JOBTEASER) -> str:
    port = d.port  # type: ignore[attr-defined]
    _, data = await smtp_send(port, sender, [GRAD], simple_message())
    assert data is not None and data[0] == 250
    got = (await sink.wait_for(len(sink.messages) + 1))[-1]
    return got.mail_from


async def test_round_trip_forward_then_bounce_back(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    srs_sender = await forward_once(d, sink)
    local, _, domain = srs_sender.rpartition("@")
    assert domain == DOMAIN
    assert local.startswith("SRS0=") and local.endswith("=jobteaser.com=noreply")
    secrets = d.settings.state_dir / "srs-secrets"
    assert stat.S_IMODE(os.stat(secrets).st_mode) == 0o600

    # The graduate's provider bounces it: null sender, RCPT to our SRS address.
    rcpts, data = await smtp_send(d.port, "", [srs_sender], b"Subject: bounce\r\n\r\nno\r\n")
    assert rcpts[srs_sender][0] == 250
    assert data is not None and data[0] == 250
    (_, bounce) = await sink.wait_for(2)
    assert bounce.rcpt_tos == [JOBTEASER]
    assert bounce.mail_from in ("", "<>")


async def test_mail_to_mailbox_host_is_not_rewritten(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    directory.add(GRAD)
    d = await start_daemon(mailbox_host=HostPort("127.0.0.1", sink.port))
    assert await forward_once(d, sink) == JOBTEASER


async def test_null_sender_is_never_rewritten(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    assert await forward_once(d, sink, sender="") in ("", "<>")


async def test_forged_tampered_and_expired_srs_are_refused(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, clock: FakeClock
) -> None:
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    good = await forward_once(d, sink)
    tag, hash_, rest = good.split("=", 2)
    # Hashes compare case-insensitively (srs.py), so the flip must change the letter, not
    # only its case: "b" -> "B" would be the same hash (a 1-in-64 flaky test before).
    flipped = ("B" if hash_[0].upper() != "B" else "C") + hash_[1:]
    candidates = {
        "forged": f"SRS0=AAAA=AB=other.example=victim@{DOMAIN}",
        "tampered hash": f"{tag}={flipped}={rest}",
        "tampered domain": good.replace("=jobteaser.com=", "=attacker.example="),
        "one-character hash": f"{tag}={hash_[0]}={rest}",
    }
    for name, address in candidates.items():
        rcpts, _ = await smtp_send(d.port, "", [address], b"\r\nx\r\n")
        assert rcpts[address][0] == 550, name
        assert rcpts[address][1].startswith("5.1.1"), name
    clock.advance(22 * 86400)  # the timestamp is valid 21 days
    rcpts, _ = await smtp_send(d.port, "", [good], b"\r\nx\r\n")
    assert rcpts[good][0] == 550
    assert len(sink.messages) == 1  # nothing but the original forward reached the sink


async def test_long_sender_uses_a_stored_key(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    long_sender = "a.very.long.local.part.for.a.notification.system.x@" \
                  "notifications.some-career-platform.example"
    srs_sender = await forward_once(d, sink, sender=long_sender)
    local = srs_sender.rpartition("@")[0]
    assert len(local) <= 64 and "=1=" in local
    rcpts, _ = await smtp_send(d.port, "", [srs_sender], b"Subject: bounce\r\n\r\nno\r\n")
    assert rcpts[srs_sender][0] == 250
    (_, bounce) = await sink.wait_for(2)
    assert bounce.rcpt_tos == [long_sender]


def _with_received(count: int) -> bytes:
    trace = b"".join(b"Received: from hop%d.example by x; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
                     % i for i in range(count))
    return trace + simple_message()


async def test_received_header_loop_limit(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    _, data = await smtp_send(d.port, JOBTEASER, [GRAD], _with_received(51))
    assert data is not None and data[0] == 554 and data[1].startswith("5.4.6")
    _, data = await smtp_send(d.port, JOBTEASER, [GRAD], _with_received(50))
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.content.count(b"Received:") == 51  # 50 + ours


async def test_long_sender_keys_are_forgotten_once_their_addresses_expire(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, clock: FakeClock
) -> None:
    """The key store does not grow for ever: a key outlives its SRS addresses (21 days) by a
    day, then it is purged, and its address is refused like any expired one."""
    graduate(directory)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    long_sender = "a.very.long.local.part.for.a.notification.system.x@" \
                  "notifications.some-career-platform.example"
    srs_sender = await forward_once(d, sink, sender=long_sender)
    assert d.return_path is not None
    clock.advance(21 * 86400)
    assert await d.return_path.purge_expired() == 0  # still valid today
    clock.advance(2 * 86400)
    assert await d.return_path.purge_expired() == 1
    rcpts, _ = await smtp_send(d.port, "", [srs_sender], b"Subject: bounce\r\n\r\nno\r\n")
    assert rcpts[srs_sender][0] == 550
