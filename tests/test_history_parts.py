"""The history's parts without a daemon: the header facts it keeps (a table), the send-test
mark, the rows on a real queue file and the lines read aloud."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC
from pathlib import Path

import pytest

from forwarder import sendtest
from forwarder.config import ConfigError, HistorySettings, settings_from_mapping
from forwarder.history import headers, reader, store, view
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
    (b"Message-Id: <x@y>\r\nFrom: a@b.example, c@d.example\r\n", ("b.example", "<x@y>", None)),
    # Kept as it came, cut to size; made printable where it is shown.
    (b"From: Odd <x@Odd_Domain\x1b!>\r\nMessage-ID: <\x1b[2J@x>\r\n",
     ("odd_domain\x1b!", "<\x1b[2J@x>", None)),
    # RFC 2047 encoded words are decoded; a control character never reaches the terminal.
    (b"Subject: =?utf-8?q?R=C3=A9initialisation?= \x1b[31m\r\n",
     (None, None, "Réinitialisation [31m")),
    (b"Subject: =?bogus?q?x?=\r\nFrom: undisclosed-recipients:;\r\n",
     (None, None, "=?bogus?q?x?=")),
])
def test_header_facts(header: bytes, facts: tuple[str | None, ...]) -> None:
    message = RECEIVED + header + b"\r\nFrom: body@not.header\r\n"
    assert headers.scan(message, subjects=True) == facts
    assert headers.scan(message, subjects=False)[2] is None


def test_only_the_bounded_header_section_is_read() -> None:
    huge = RECEIVED + b"X-Filler: " + b"a" * headers.HEADER_LIMIT + b"\r\nFrom: late@x.example"
    assert headers.scan(huge + b"\r\n\r\nbody", subjects=False)[0] is None
    assert headers.header_section(huge).endswith(b"a")
    no_end = RECEIVED + b"From: a@b.example\r\nSubject: no blank line"
    assert headers.scan(no_end, subjects=True)[0] == "b.example"
    long_id = RECEIVED + b"Message-ID: <" + b"x" * 2000 + b">\r\n\r\n"
    message_id = headers.scan(long_id, subjects=False)[1]
    assert message_id is not None and len(message_id) == headers.MAX_VALUE


def test_address_keys_are_the_directorys() -> None:
    assert address_key("Marie.Curie@Sigma-Clermont.FR.") == "marie.curie@sigma-clermont.fr"


def test_the_send_test_mark_verifies_only_with_the_key_and_address(tmp_path: Path) -> None:
    key = sendtest.ensure_key(tmp_path)
    assert sendtest.ensure_key(tmp_path) == key  # made once
    assert (tmp_path / sendtest.KEY_FILE).stat().st_mode & 0o777 == sendtest.KEY_MODE
    body, message_id = sendtest.build(key, "marie.curie@sigma-clermont.fr",
                                      "postmaster@sigma-clermont.fr", "fw.test", 1.8e9)
    message = headers.header_section(RECEIVED + body)
    assert message_id.endswith("@fw.test>") and b"Auto-Submitted: auto-generated" in body
    assert sendtest.is_test(message, key, ["Marie.Curie@sigma-clermont.fr"])
    assert not sendtest.is_test(message, key, ["someone.else@sigma-clermont.fr"])
    assert not sendtest.is_test(message, b"k" * 64, ["marie.curie@sigma-clermont.fr"])
    assert not sendtest.is_test(message, None, ["marie.curie@sigma-clermont.fr"])
    forged = headers.header_section(RECEIVED + b"X-Forwarder-Test: 0123 4567\r\n\r\nbody\r\n")
    assert not sendtest.is_test(forged, key, ["marie.curie@sigma-clermont.fr"])
    in_body = headers.header_section(RECEIVED + b"Subject: x\r\n\r\n" + body)
    assert not sendtest.is_marked(in_body) and sendtest.is_marked(message)
    assert not sendtest.is_test(in_body, key, ["marie.curie@sigma-clermont.fr"])


def row(queue_id: str, target: str, at: float, reply: str, outcome: str,
        next_attempt: float | None = None, tls: str | None = "TLSv1.3") -> tuple[object, ...]:
    values = {"received_at": 1.8e9, "queue_id": queue_id,
              "address": "marie.curie@sigma-clermont.fr", "target": target, "route": "redirect",
              "client": "192.0.2.1", "sender": "noreply@jobteaser.com",
              "from_domain": "jobteaser.com", "message_id": f"<{queue_id}@jobteaser.com>",
              "subject": None, "notice": None, "size": 2048, "test": 0, "at": at,
              "relay": "mx.example.org[192.0.2.7]:25", "tls": tls, "reply": reply,
              "outcome": outcome, "next_attempt": next_attempt, "dsn_id": None}
    return tuple(values[column] for column in store.TRY_COLUMNS)


def test_rows_on_a_queue_file_and_the_lines_read_aloud(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    conn = open_queue_db(path)
    checks = {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    store.insert_checks(conn, 1.8e9, "Q1", json.dumps(checks))
    store.record_tries(conn, [
        row("Q1", "marie@example.org", 1.8e9 + 4, "smtp; 250 2.0.0 OK id=abc", "delivered"),
        row("Q1", "marie@backup.example", 1.8e9 + 5,
            "x-local; connect to mx.example.org[192.0.2.7]:25: timed out", "deferred",
            1.8e9 + 305, tls="")])
    store.insert_refusal(conn, 1.8e9 - 60, "marie.curie@sigma-clermont.fr", "192.0.2.9",
                         "", "550 5.1.1 <marie.curie@sigma-clermont.fr>: closed")
    reader_conn = store.open_reader(path)
    messages, refusals, replies = reader.read_address(
        reader_conn, "marie.curie@sigma-clermont.fr", 0.0, subjects=False)
    (message,) = messages
    main, backup = message.targets  # in the order they were written
    assert message.checks == checks and main.outcome == "delivered"
    # Deferred, and not in the queue file (this one never was): the history says so.
    assert backup.outcome == "deferred" and backup.in_queue is False
    assert replies == []
    lines = view.lines(messages, refusals, replies, 1.8e9, UTC)
    assert lines == [
        "15 Jan 07:59 refused at RCPT: mail from <> (client 192.0.2.9) got 550 5.1.1 "
        "<marie.curie@sigma-clermont.fr>: closed",
        "15 Jan 08:00 from noreply@jobteaser.com, subject not stored, 2 KB, <Q1@jobteaser.com>,"
        " queue id Q1, checks dkim=pass dmarc=pass spf=pass; delivered 08:00:04 to "
        "marie@example.org via mx.example.org, TLS, 250 2.0.0 OK id=abc",
        "    and deferred 08:00:05 for marie@backup.example via mx.example.org, no reply: "
        "connect to mx.example.org[192.0.2.7]:25: timed out; no longer in the queue (deleted "
        "by an administrator)"]
    doc = view.message_doc(message, UTC)
    assert doc["targets"][1]["attempts"][0] == {
        "at": "2027-01-15T08:00:05+00:00", "relay": "mx.example.org[192.0.2.7]:25",
        "tls": False, "tls_version": None, "reply": None, "outcome": "deferred",
        "error": "connect to mx.example.org[192.0.2.7]:25: timed out"}
    assert doc["targets"][0]["attempts"][0]["tls_version"] == "TLSv1.3"
    assert reader.read_message(reader_conn, "marie.curie@sigma-clermont.fr", "Q1",
                               subjects=False) is not None
    assert reader.read_message(reader_conn, "marie.curie@sigma-clermont.fr", "Q2",
                               subjects=False) is None
    with pytest.raises(sqlite3.OperationalError):  # the CLI's connection cannot write
        reader_conn.execute("DELETE FROM history")
    assert store.forget(conn, "marie.curie@sigma-clermont.fr") == 4


def test_purge_in_chunks(tmp_path: Path) -> None:
    conn = open_queue_db(tmp_path / "queue.sqlite3")
    store.record_tries(conn, [row(f"Q{n}", "t@example.org", 1.8e9 + n, "smtp; 250 ok",
                                  "delivered") for n in range(10)])
    for n in range(5):
        store.insert_refusal(conn, 1.8e9 + n, "a@sigma-clermont.fr", "192.0.2.1", "", "550")
        store.insert_checks(conn, 1.8e9 + n, f"Q{n}", "{}")
    gone = [store.purge_before(conn, 1.8e9 + 7, chunk=3) for _ in range(5)]
    # 3 attempts, 3 refusals, 4 checks (up to the 4th, included); then 3, 2, 1; then the
    # last attempt older than 7 s.
    assert gone == [10, 6, 1, 0, 0]
    assert [r[0] for r in conn.execute("SELECT queue_id FROM history")] == ["Q7", "Q8", "Q9"]


def test_the_history_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"history": {"subjects": "yes", "retention_days": -1,
                                           "size": 3}})
    assert caught.value.problems == ["[history] subjects: must be true or false",
                                     "[history] retention_days: must be a number >= 0",
                                     "[history] unknown key 'size'"]
    settings = settings_from_mapping({"history": {"subjects": True, "retention_days": 7}})
    assert settings.history == HistorySettings(retention_days=7.0, subjects=True)


def test_a_read_since_starts_at_the_right_row(tmp_path: Path) -> None:
    conn = open_queue_db(tmp_path / "queue.sqlite3")
    hour = reader.CLOCK_SLACK
    store.record_tries(conn, [row(f"Q{n}", "t@example.org", 1.8e9 + n * hour, "smtp; 250 ok",
                                  "delivered") for n in range(20)])
    conn.execute("DELETE FROM history WHERE id IN (5, 6, 7, 12)")  # purged or forgotten
    assert reader.first_row(conn, 0.0) == 0
    rows = conn.execute("SELECT id, at FROM history ORDER BY id").fetchall()
    for n in range(-1, 22):
        since = 1.8e9 + n * hour
        first = reader.first_row(conn, since)
        # Exactly the rows from an hour before `since` on (the slack for a clock step).
        assert [i for i, _ in rows if i >= first] == [
            i for i, at in rows if at >= since - reader.CLOCK_SLACK], n


def test_what_strangers_wrote_is_shown_printable() -> None:
    message = store.MessageView("Q1", 1.8e9, "a@sigma-clermont.fr", "192.0.2.1",
                                "x@evil.example", "evil\x1b.example", "<\x1b[2J@x>", None,
                                900, False)
    message.target("a@example.org", "redirect").attempts.append(store.AttemptView(
        1.8e9, "mx[192.0.2.7]:25", "", "smtp; 550 5.1.1 \x1b]0;pwned\x07", "failed", None, None))
    (line,) = view.message_lines(message, 1.8e9, UTC)
    assert "\x1b" not in line and "\x07" not in line
    assert "(From: evil?.example)" in line and "<?[2J@x>" in line
    assert line.endswith("no TLS, 550 5.1.1 ?]0;pwned?; no DSN sent")
    assert view.message_doc(message, UTC)["message_id"] == "<\x1b[2J@x>"  # JSON escapes it
