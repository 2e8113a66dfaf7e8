"""The daemon's side of the history: what is written, in which transaction, and for how long.

- A delivery round: one row per attempt, with the message's facts (those of the header
  found in the writer thread, off the event loop) and the outcome, in the transaction
  that records the outcome (forwarder/delivery.py). A message delivered at
  once costs one row; one not tried yet needs none (the queue's rows say it).
- The checks at receipt, when there are any: one row in the transaction that queues the
  message (the intake's journal, forwarder/queue/intake.py).
- A refused RCPT for an account of ours, or a message to a notice's confirm+ or refuse+
  address (what it did to the target): one row, riding along with the next commit.
- Our notices to an address's targets are delivered like its mail: their attempts are
  rows too, marked with the notice's kind.
- Every hour (forwarder/daemon.py), rows older than the retention are deleted, in chunks.

A failure to write the history never fails the queue's write: it is logged
(`history_write_failed`) and counted, and the mail goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from forwarder import log, sendtest
from forwarder.clock import Clock
from forwarder.config import HistorySettings
from forwarder.directory.model import TokenUse
from forwarder.history import headers, store
from forwarder.metrics import Metrics
from forwarder.policy import Consume, Refuse, Route
from forwarder.queue import Job, NewMessage, Queue, QueueError, Result
from forwarder.queue.writer import Op
from forwarder.smtpclient import Attempt

LOG = log.get("forwarder.history")
DAY = 86400.0
# Refusals that name no account of ours are not kept: a dictionary attack on unknown
# addresses would fill the table, and `history` says "not in the directory" anyway.
UNRECORDED_REFUSALS = frozenset({"unknown", "bad_syntax", "relay_denied", "srs_invalid",
                                 "srs_store_unavailable", "postmaster_unset"})


def address_key(address: str) -> str:
    """The directory key of one of our addresses as a client wrote it (addresses.Address:
    local part lower-cased, domain lower-cased without its one trailing dot)."""
    key = address.lower()
    return key[:-1] if key.endswith(".") else key


class HistoryRecorder:
    def __init__(self, settings: HistorySettings, queue: Queue, clock: Clock,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.test_key: bytes | None = None  # set at start (forwarder/sendtest.py)

    @property
    def enabled(self) -> bool:
        return self.settings.retention_days > 0

    def _guarded(self, what: str, queue_id: str | None, write: Callable[..., None],
                 *args: Any) -> Op:
        """`write(conn, *args)` as an operation that reports its failure instead of raising
        it, so the queue's own statements in the same transaction still commit."""
        loop = asyncio.get_running_loop()

        def op(conn: sqlite3.Connection) -> None:
            try:
                write(conn, *args)
            except Exception as exc:
                loop.call_soon_threadsafe(self._failed, what, queue_id, exc)

        return op

    def _failed(self, what: str, queue_id: str | None, exc: BaseException) -> None:
        LOG.error("history_write_failed", what=what, queue_id=queue_id,
                  error=type(exc).__name__, detail=str(exc))
        self.metrics.history_write_failed()

    # --- what is written ------------------------------------------------------------------

    def journal(self, message: NewMessage) -> Op | None:
        """For the transaction that queues `message`: its checks at receipt, if any."""
        if not self.enabled or not message.checks:
            return None
        checks = json.dumps(dict(message.checks), default=str, sort_keys=True)
        return self._guarded("checks", message.id, store.insert_checks, message.arrived_at,
                             message.id, checks)

    def attempted(self, job: Job, head: bytes, results: Sequence[Result],
                  attempts: dict[int, Attempt], bounced: dict[int, str]) -> Op | None:
        """A delivery round's attempts, for the transaction that records their outcomes;
        `head`: the message's header section; `bounced`: recipient id -> the DSN that
        reports its failure. The rows are made in the writer thread, off the event loop."""
        if not self.enabled:
            return None
        return self._guarded("attempt", job.message_id, _record_round, job, head, results,
                             attempts, bounced, self.settings.subjects)

    def refused(self, address: str, client: str, sender: str, verdict: Refuse) -> None:
        """A refused RCPT: kept if it names an account of ours (UNRECORDED_REFUSALS)."""
        if not self.enabled or verdict.reason in UNRECORDED_REFUSALS:
            return
        self._soon("refusal", self._guarded(
            "refusal", None, store.insert_refusal, self.clock.now(), address_key(address),
            client, sender, verdict.reply.at(address)))

    def replied(self, use: Consume, result: TokenUse, client: str, sender: str) -> None:
        """A message to a notice's confirm+ or refuse+ address, consumed: what it did to
        the target (its state after, or why nothing changed)."""
        if not self.enabled:
            return
        outcome = (f"ignored: {result.ignored}" if result.ignored is not None
                   else "no longer declared" if result.after is None else result.after.value)
        self._soon("reply", self._guarded(
            "reply", None, store.insert_reply, self.clock.now(), address_key(result.account),
            result.target, use.kind.value, client, sender, outcome))

    def _soon(self, what: str, op: Op) -> None:
        """`op` in the queue's next commit, without waiting for it. Not while shutting
        down (QueueError): the event is in its log line all the same."""
        with contextlib.suppress(QueueError):
            written = self.queue.write_soon(op)
            written.add_done_callback(partial(self._commit_failed, what))

    def _commit_failed(self, what: str, written: asyncio.Future[Any]) -> None:
        """The commit that carried a row failed (the queue reports its own faults)."""
        if not written.cancelled() and written.exception() is not None:
            self._failed(what, None, written.exception() or Exception())

    def is_test(self, job: Job, head: bytes) -> bool:
        return sendtest.is_marked(head) and sendtest.is_test(
            head, self.test_key, [r.orig_rcpt for r in job.recipients])

    # --- retention ------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Delete what is older than the retention (everything, with retention 0), one
        chunk per commit; the number of rows deleted."""
        days = self.settings.retention_days
        cutoff = self.clock.now() - days * DAY if days > 0 else math.inf
        total = 0
        while True:
            gone: int = await self.queue.write(partial(store.purge_before, cutoff=cutoff))
            if not gone:
                break
            total += gone
        if total:
            LOG.info("history_purged", rows=total, before=cutoff if days > 0 else None)
        return total


def _record_round(conn: sqlite3.Connection, job: Job, head: bytes, results: Sequence[Result],
                  attempts: dict[int, Attempt], bounced: dict[int, str], subjects: bool) -> None:
    """The rows of one delivery round. Run for every message delivered, so written for
    speed: routes and outcomes are compared by identity and their values read from the
    members (`.value` and hashing an enum member run Python code)."""
    rows = []
    message: tuple[Any, ...] = ()
    for rcpt, result in zip(job.recipients, results, strict=True):
        route = rcpt.route
        if route is Route.SRS_RETURN or route is Route.BOUNCE or route is Route.NOTICE_BOUNCE:
            continue  # not about one of our addresses
        if not message:
            domain, message_id, subject = headers.scan_section(head, subjects)
            notice = headers.notice_kind(head) if route is Route.NOTICE else None
            message = (job.client, job.sender, domain, message_id, subject, notice, job.size,
                       int(job.test))
        attempt, key = attempts[rcpt.id], rcpt.orig_rcpt.lower()  # address_key, in line
        rows.append((job.arrived_at, job.message_id, key[:-1] if key[-1] == "." else key,
                     rcpt.rcpt, route._value_, *message, result.attempted_at, attempt.relay,
                     "" if attempt.tls is None else attempt.tls.version, result.error,
                     result.outcome._value_, result.retry_at, bounced.get(rcpt.id)))
    if rows:
        store.record_tries(conn, rows)
