"""Queue hygiene: poison messages are held, bytes leave with the last recipient."""

from __future__ import annotations

import sqlite3

from forwarder.clock import FakeClock
from forwarder.config import HostPort
from forwarder.daemon import Daemon
from forwarder.delivery import MailRouter
from forwarder.directory import Directory
from forwarder.dns import Destination
from forwarder.policy import MAX_CRASHES, Route
from tests.conftest import DOMAIN, DaemonFactory, Sink, scan_due, simple_message, smtp_send, until

GRAD = f"jean.dupont@{DOMAIN}"


class BuggyRouter(MailRouter):
    """Routes normally, except that it hits a bug (not a delivery failure) for one domain."""

    async def route(self, recipient: str, route: Route) -> list[Destination]:
        if recipient.endswith("@poison.example"):
            raise RuntimeError("a bug in routing")
        return await super().route(recipient, route)


def rows(d: Daemon, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(d.settings.queue_path) as conn:
        return conn.execute(sql).fetchall()


async def test_message_that_keeps_crashing_a_worker_is_held(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory, clock: FakeClock
) -> None:
    directory.add(GRAD, ["victim@poison.example"])
    directory.delete(GRAD)
    directory.add(f"other@{DOMAIN}", ["fine@perso.example"])
    directory.delete(f"other@{DOMAIN}")
    smarthost = HostPort("127.0.0.1", sink.port)
    d = await start_daemon(smarthost=smarthost, router=BuggyRouter(None, smarthost))
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], simple_message())
    await until(lambda: rows(d, "SELECT crashes FROM messages") == [(1,)])
    for n in range(2, MAX_CRASHES + 1):
        clock.advance(300)
        assert await scan_due(d) == 1
        def charged(n: int = n) -> bool:
            return rows(d, "SELECT crashes FROM messages") == [(n,)]

        await until(charged)
    assert rows(d, "SELECT held FROM messages") == [(1,)]
    clock.advance(86400)
    assert await scan_due(d) == 0  # held: no longer tried, kept for the admin
    # Other mail still flows past it.
    await smtp_send(d.port, "noreply@jobteaser.com", [f"other@{DOMAIN}"], simple_message())
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == ["fine@perso.example"]


async def test_delivered_message_leaves_no_bytes_behind(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    directory.add(GRAD, ["jd@perso.example"])
    directory.delete(GRAD)
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    await smtp_send(d.port, "noreply@jobteaser.com", [GRAD, f"postmaster@{DOMAIN}"],
                    simple_message())
    await sink.wait_for(1)
    await until(lambda: rows(d, "SELECT count(*) FROM messages") == [(0,)])
    assert rows(d, "SELECT count(*) FROM recipients") == [(0,)]
