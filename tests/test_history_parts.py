"""The history's parts without a daemon: the header facts it keeps (a table), the send-test
mark, the rows on a real queue file and the lines read aloud."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC
from pathlib import Path

import pytest

from forwarder import sendtest
from forwarder.history import headers, store, view
from forwarder.history.recorder import address_key
from forwarder.queue import open_queue_db

RECEIVED = b"Received: from client.test ([127.0.0.1])\r\n\tby forwarder.test; date\r\n"


@pytest.mark.parametrize(("header", "facts"), [
    (b"From: JobTeaser <noreply@JobTeaser.com>\r\nMessage-ID: <a@b>\r\nSubject: hi\r\n",
     ("jobteaser.com", "<a@b>", "hi")),
    # Folded fields (RFC 5322 2.2.3), names in any case, the first occurrence wins.
    (b"FROM:\r\n \"a@fake.example\"\r\n <x@real.example>\r\nfrom: y@second.example\r\n",
     ("real.example", None, None)),
    (b"From: bare@Example.ORG\r\nmessage-id:\r\n\t<long@id>\r\n", ("example.org", "<long@id>",
                                                                   None)),
    # RFC 2047 encoded words are decoded; a control character never reaches the terminal.
    (b"Subject: =?utf-8?q?R=C3=A9initialisation?= \x1b[31m\r\n",
     (None, None, "Réinitialisation [31m")),
    (b"Subject: =?bogus?q?x?=\r\nFrom: undisclosed-recipients:;\r\n",
     (None, None, "=?bogus?q?x?=")),
])
def test_header_facts(header: bytes, facts: tuple[str | None, ...]) -> None:
    message = RECEIVED + header + b"\r\nFrom: body@not.header\r\n"
    found = headers.scan(message, subjects=True)
    assert (found.from_domain, found.message_id, found.subject) == facts
    assert headers.scan(message, subjects=False).subject is None


def test_only_the_bounded_header_section_is_read() -> None:
    huge = RECEIVED + b"X-Filler: " + b"a" * headers.HEADER_LIMIT + b"\r\nFrom: late@x.example"
    assert headers.scan(huge + b"\r\n\r\nbody", subjects=False).from_domain is None
    assert headers.header_section(huge).endswith(b"a")
    no_end = RECEIVED + b"From: a@b.example\r\nSubject: no blank line"
    assert headers.scan(no_end, subjects=True).from_domain == "b.example"
    long_id = RECEIVED + b"Message-ID: <" + b"x" * 2000 + b">\r\n\r\n"
    message_id = headers.scan(long_id, subjects=False).message_id
    assert message_id is not None and len(message_id) == headers.MAX_VALUE


def test_address_keys_are_the_directorys() -> None:
    assert address_key("Marie.Curie@Sigma-Clermont.FR.") == "marie.curie@sigma-clermont.fr"


def test_the_send_test_mark_verifies_only_with_the_key_and_address(tmp_path: Path) -> None:
    key = sendtest.ensure_key(tmp_path)
    assert sendtest.ensure_key(tmp_path) == key  # made once
    assert (tmp_path / sendtest.KEY_FILE).stat().st_mode & 0o777 == sendtest.KEY_MODE
    body, message_id = sendtest.build(key, "marie.curie@sigma-clermont.fr",
                                      "postmaster@sigma-clermont.fr", "fw.test", 1.8e9)
    message = RECEIVED + body
    assert message_id.endswith("@fw.test>") and b"Auto-Submitted: auto-generated" in body
    assert sendtest.is_test(message, key, ["Marie.Curie@sigma-clermont.fr"])
    assert not sendtest.is_test(message, key, ["someone.else@sigma-clermont.fr"])
    assert not sendtest.is_test(message, b"k" * 64, ["marie.curie@sigma-clermont.fr"])
    assert not sendtest.is_test(message, None, ["marie.curie@sigma-clermont.fr"])
    forged = RECEIVED + b"X-Forwarder-Test: 0123 4567\r\n\r\nbody\r\n"
    assert not sendtest.is_test(forged, key, ["marie.curie@sigma-clermont.fr"])
    in_body = RECEIVED + b"Subject: x\r\n\r\n" + body
    assert not sendtest.is_test(in_body, key, ["marie.curie@sigma-clermont.fr"])


def arrival(queue_id: str, at: float, checks: dict[str, str] | None = None) -> store.Arrival:
    return store.Arrival(queue_id, at, "192.0.2.1", "noreply@jobteaser.com", "jobteaser.com",
                         f"<{queue_id}@jobteaser.com>", None, 2048,
                         json.dumps(checks) if checks else None, False,
                         (("marie@example.org", "redirect", "marie.curie@sigma-clermont.fr"),
                          ("marie@backup.example", "redirect",
                           "marie.curie@sigma-clermont.fr")))


def attempt(queue_id: str, at: float, target: str, reply: str, outcome: str,
            next_attempt: float | None = None) -> store.Try:
    return store.Try(1.8e9, queue_id, target, "redirect", at, "mx.example.org[192.0.2.7]:25",
                     None, reply, outcome, next_attempt, None)


def test_rows_on_a_queue_file_and_the_lines_read_aloud(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    conn = open_queue_db(path)
    checks = {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    store.insert_arrival(conn, arrival("Q1", 1.8e9, checks))
    store.record_tries(conn, [
        attempt("Q1", 1.8e9 + 4, "marie@example.org", "smtp; 250 2.0.0 OK id=abc", "delivered"),
        attempt("Q1", 1.8e9 + 5, "marie@backup.example",
                "x-local; connect to mx.example.org[192.0.2.7]:25: timed out", "deferred",
                1.8e9 + 305),
        # An attempt for a row that is not there (a DSN's): nothing happens.
        attempt("DSN", 1.8e9, "noreply@jobteaser.com", "smtp; 250 ok", "delivered")])
    store.insert_refusal(conn, 1.8e9 - 60, "marie.curie@sigma-clermont.fr", "192.0.2.9",
                         "", "550 5.1.1 <marie.curie@sigma-clermont.fr>: closed")
    reader = store.open_reader(path)
    messages, refusals = store.read_address(reader, "marie.curie@sigma-clermont.fr", 0.0)
    (message,) = messages
    backup, main = message.targets  # a message's targets in alphabetical order
    assert message.checks == checks and main.outcome == "delivered"
    # Deferred, and no longer in the queue file (this one never was): the history says so.
    assert backup.outcome == "deferred" and backup.in_queue is False
    lines = view.lines(messages, refusals, 1.8e9, UTC)
    assert lines == [
        "15 Jan 07:59 refused at RCPT: mail from <> (client 192.0.2.9) got 550 5.1.1 "
        "<marie.curie@sigma-clermont.fr>: closed",
        "15 Jan 08:00 from noreply@jobteaser.com, subject not stored, 2 KB, <Q1@jobteaser.com>,"
        " queue id Q1, checks dkim=pass dmarc=pass spf=pass; deferred 08:00:05 for "
        "marie@backup.example via mx.example.org, no reply: connect to "
        "mx.example.org[192.0.2.7]:25: timed out; no longer in the queue (deleted by an "
        "administrator)",
        "    and delivered 08:00:04 to marie@example.org via mx.example.org, TLS not known, "
        "250 2.0.0 OK id=abc"]
    doc = view.message_doc(message, UTC)
    assert doc["targets"][0]["attempts"][0] == {
        "at": "2027-01-15T08:00:05+00:00", "relay": "mx.example.org[192.0.2.7]:25",
        "tls": None, "reply": None,
        "error": "connect to mx.example.org[192.0.2.7]:25: timed out"}
    assert store.read_message(reader, "marie.curie@sigma-clermont.fr", "Q1") is not None
    assert store.read_message(reader, "marie.curie@sigma-clermont.fr", "Q2") is None
    with pytest.raises(sqlite3.OperationalError):  # the CLI's connection cannot write
        reader.execute("DELETE FROM history")
    assert store.forget(conn, "marie.curie@sigma-clermont.fr") == 3


def test_purge_in_chunks_even_when_every_row_arrived_at_once(tmp_path: Path) -> None:
    conn = open_queue_db(tmp_path / "queue.sqlite3")
    for n in range(7):
        store.insert_arrival(conn, arrival(f"Q{n}", 1.8e9))
    store.insert_arrival(conn, arrival("NEW", 1.8e9 + 10))
    gone = [store.purge_before(conn, 1.8e9 + 1, chunk=3) for _ in range(3)]
    assert gone == [14, 0, 0]  # the same instant: all of it at once, never stuck
    for n in range(7):
        store.insert_arrival(conn, arrival(f"R{n}", 1.8e9 + n))
    gone = [store.purge_before(conn, 1.8e9 + 7, chunk=2) for _ in range(6)]
    assert gone == [4, 4, 4, 2, 0, 0]
    assert conn.execute("SELECT DISTINCT queue_id FROM history").fetchall() == [("NEW",)]
