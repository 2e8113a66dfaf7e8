"""Reading one address's history for the CLI: the attempts kept, joined with the queue's
own rows (a message not tried yet is only there; one still waiting shows its next attempt,
or that it is held, or that an administrator deleted it), in one read transaction.

This and `store.open_reader` are the whole interface `forwarder history` and
`forwarder send-test` use: another backend needs only these.
"""

from __future__ import annotations

import json
import sqlite3

from forwarder.history.headers import (
    HEADER_LIMIT,
    NO_FACTS,
    HeaderFacts,
    header_section,
    notice_kind,
    scan,
)
from forwarder.history.store import QUEUED, AttemptView, MessageView, RefusalView, ReplyView

_ATTEMPTS = (
    "SELECT received_at, queue_id, client, sender, from_domain, message_id, subject, notice,"
    " size, test, target, route, at, relay, tls, reply, outcome, next_attempt, dsn_id"
    " FROM history WHERE id >= ? AND address = ? AND received_at >= ?")
# Rows are appended in the order of their attempts, which come after their message's
# receipt; a clock stepped back by up to this much still finds every row.
CLOCK_SLACK = 3600.0
NOTICE_ROUTE = "notice"  # policy.Route.NOTICE: one of our notices to a target
# Our addresses are compared case-insensitively (PRODUCT.md): the client's spelling is kept.
_QUEUED = (
    "SELECT m.id, m.arrived_at, m.client, m.sender, m.size, m.held, r.rcpt, r.route,"
    " r.next_attempt, r.leased FROM recipients r JOIN messages m ON m.id = r.message_id"
    " WHERE lower(r.orig_rcpt) = ? AND m.arrived_at >= ?")


# What is kept about an address: its messages, the refusals at RCPT, the replies to notices.
Found = tuple[list[MessageView], list[RefusalView], list[ReplyView]]


def first_row(conn: sqlite3.Connection, since: float) -> int:
    """The lowest row id that can hold an attempt at a message received since `since`,
    by binary search over the ids (there is no index by address or time: the rows from
    there on are scanned, so `--since` bounds the cost of a read)."""
    low, high = conn.execute("SELECT min(id), max(id) FROM history").fetchone()
    if low is None or since <= 0:
        return 0
    bound, high = since - CLOCK_SLACK, high + 1
    while low < high:
        middle = (low + high) // 2
        row_id, at = conn.execute("SELECT id, at FROM history WHERE id >= ? ORDER BY id"
                                  " LIMIT 1", (middle,)).fetchone()
        if at < bound:
            low = row_id + 1
        else:
            high = middle
    return int(low)


def read_address(conn: sqlite3.Connection, address: str, since: float, subjects: bool,
                 queue_id: str | None = None) -> Found:
    """Everything kept about `address` since `since` (or about one message of it), oldest
    first: the messages, the refusals at RCPT, the replies to notices. `subjects`: whether
    a message still queued shows its subject (as configured)."""
    conn.execute("BEGIN")
    try:
        views = _attempts(conn, address, since, queue_id)
        _join_queue(conn, views, address, since, subjects, queue_id)
        for view in views.values():
            row = conn.execute("SELECT checks FROM history_checks WHERE received_at = ?"
                               " AND queue_id = ?", (view.received_at, view.queue_id)).fetchone()
            view.checks = json.loads(row[0]) if row else {}
        refusals, replies = ([], []) if queue_id is not None else _rcpt_events(conn, address,
                                                                              since)
    finally:
        conn.execute("COMMIT")
    return sorted(views.values(), key=lambda m: (m.received_at, m.queue_id)), refusals, replies


def _rcpt_events(conn: sqlite3.Connection, address: str,
                 since: float) -> tuple[list[RefusalView], list[ReplyView]]:
    refusals = [RefusalView(*row) for row in conn.execute(
        "SELECT at, address, client, sender, reply FROM history_refusals"
        " WHERE address = ? AND at >= ? ORDER BY at, id", (address, since))]
    replies = [ReplyView(*row) for row in conn.execute(
        "SELECT at, address, target, kind, client, sender, result FROM history_replies"
        " WHERE address = ? AND at >= ? ORDER BY at, id", (address, since))]
    return refusals, replies


def read_message(conn: sqlite3.Connection, address: str, queue_id: str, subjects: bool,
                 since: float = 0.0) -> MessageView | None:
    """One message to `address`, received since `since` (what `send-test` waits on)."""
    messages, _, _ = read_address(conn, address, since, subjects, queue_id)
    return messages[0] if messages else None


def _attempts(conn: sqlite3.Connection, address: str, since: float,
              queue_id: str | None) -> dict[str, MessageView]:
    views: dict[str, MessageView] = {}
    sql, params = _ATTEMPTS, [first_row(conn, since), address, since]
    if queue_id is not None:
        sql, params = sql + " AND queue_id = ?", [*params, queue_id]
    for row in conn.execute(sql + " ORDER BY id", params):
        (received, qid, client, sender, domain, message_id, subject, notice, size, test,
         target, route, at, relay, tls, reply, outcome, next_attempt, dsn_id) = row
        view = views.get(qid)
        if view is None:
            view = views[qid] = MessageView(qid, received, address, client, sender, domain,
                                            message_id, subject, size, bool(test), notice)
        view.target(target, route).attempts.append(AttemptView(
            at, relay, tls, reply, outcome, next_attempt, dsn_id))
    return views


def _join_queue(conn: sqlite3.Connection, views: dict[str, MessageView], address: str,
                since: float, subjects: bool, queue_id: str | None) -> None:
    sql, params = _QUEUED, [address, since]
    if queue_id is not None:
        sql, params = sql + " AND m.id = ?", [*params, queue_id]
    for qid, arrived, client, sender, size, held, rcpt, route, next_attempt, leased in \
            conn.execute(sql, params).fetchall():
        view = views.get(qid)
        if view is None:
            domain, message_id, subject, notice = _facts(conn, qid, subjects, route)
            view = views[qid] = MessageView(qid, arrived, address, client, sender, domain,
                                            message_id, subject, size, False, notice)
        target = view.target(rcpt, route)
        target.in_queue, target.held, target.in_delivery = True, bool(held), bool(leased)
        target.queued_next = next_attempt
    for view in views.values():
        for target in view.targets:
            if target.in_queue is None and target.outcome in (QUEUED, "deferred"):
                target.in_queue = False  # deleted by an administrator since


def _facts(conn: sqlite3.Connection, queue_id: str, subjects: bool,
           route: str) -> tuple[str | None, str | None, str | None, str | None]:
    """The header facts of a message not tried yet, from its bytes in the queue, and
    which notice it is if it is one of ours."""
    row = conn.execute("SELECT substr(body, 1, ?) FROM messages WHERE id = ?",
                       (HEADER_LIMIT, queue_id)).fetchone()
    if row is None:
        return (*NO_FACTS, None)
    section = header_section(b"\r\n" + bytes(row[0]))  # a notice starts with its From:
    facts: HeaderFacts = scan(section, subjects)
    return (*facts, notice_kind(section) if route == NOTICE_ROUTE else None)
