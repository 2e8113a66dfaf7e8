"""The daemon's side of the history: what is written, in which transaction, and for how long.

- An accepted message: one row per target, in the transaction that queues it (the intake's
  journal, forwarder/queue/intake.py); the header facts are read in the writer thread.
- A delivery round: each attempt appended to its row, with the outcome it left, in the
  transaction that records the outcome (forwarder/delivery.py).
- A refused RCPT for an address of ours: one row, riding along with the next commit.
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
from collections.abc import Sequence
from functools import partial
from typing import Any

from forwarder import log, sendtest
from forwarder.addresses import normalize_domain
from forwarder.clock import Clock
from forwarder.config import HistorySettings
from forwarder.history import headers, store
from forwarder.metrics import Metrics
from forwarder.policy import Outcome, Refuse, Route
from forwarder.queue import Job, NewMessage, Queue, QueueError, Result
from forwarder.queue.writer import Op
from forwarder.smtpclient import Attempt

LOG = log.get("forwarder.history")
DAY = 86400.0
# Copies to our graduates' addresses are kept; SRS returns and DSNs are not about one.
RECORDED_ROUTES = frozenset({Route.MAILBOX, Route.REDIRECT, Route.POSTMASTER})
# Refusals that name no account of ours are not kept: a dictionary attack on unknown
# addresses would fill the table, and `history` says "not in the directory" anyway.
UNRECORDED_REFUSALS = frozenset({"unknown", "bad_syntax", "relay_denied", "srs_invalid",
                                 "srs_store_unavailable", "postmaster_unset"})


def address_key(address: str) -> str:
    """The directory key of one of our addresses as a client wrote it (addresses.Address)."""
    local, _, domain = address.rpartition("@")
    return f"{local.lower()}@{normalize_domain(domain)}"


def arrival(message: NewMessage, targets: tuple[tuple[str, str, str], ...], subjects: bool,
            test_key: bytes | None) -> store.Arrival:
    facts = headers.scan(message.body, subjects)
    checks = json.dumps(dict(message.checks), default=str, sort_keys=True) \
        if message.checks else None
    test = sendtest.is_test(message.body, test_key, [r.orig_rcpt for r in message.recipients])
    return store.Arrival(message.id, message.arrived_at, message.client, message.sender,
                         facts.from_domain, facts.message_id, facts.subject,
                         len(message.body), checks, test, targets)


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

    def _guarded(self, what: str, queue_id: str | None,
                 write: partial[None]) -> Op:
        """`write` as an operation that reports its failure instead of raising it, so the
        queue's own statements in the same transaction still commit."""
        loop = asyncio.get_running_loop()

        def op(conn: sqlite3.Connection) -> None:
            try:
                write(conn)
            except Exception as exc:
                loop.call_soon_threadsafe(self._failed, what, queue_id, exc)

        return op

    def _failed(self, what: str, queue_id: str | None, exc: BaseException) -> None:
        LOG.error("history_write_failed", what=what, queue_id=queue_id,
                  error=type(exc).__name__, detail=str(exc))
        self.metrics.history_write_failed()

    # --- what is written ------------------------------------------------------------------

    def journal(self, message: NewMessage) -> Op | None:
        """The arrival, for the transaction that queues `message` (None: nothing to keep)."""
        if not self.enabled:
            return None
        targets = tuple((r.rcpt, r.route.value, address_key(r.orig_rcpt))
                        for r in message.recipients if r.route in RECORDED_ROUTES)
        if not targets:
            return None
        found = partial(arrival, message, targets, self.settings.subjects, self.test_key)
        return self._guarded("arrival", message.id,
                             partial(_insert_arrival, found))

    def attempted(self, job: Job, results: Sequence[Result], attempts: dict[int, Attempt],
                  bounce_id: str | None) -> Op | None:
        """A delivery round's attempts, for the transaction that records their outcomes;
        `bounce_id`: the DSN that reports this round's failures, if one was sent."""
        if not self.enabled:
            return None
        tries = [
            store.Try(job.arrived_at, job.message_id, rcpt.rcpt, rcpt.route.value,
                      result.attempted_at, attempts[rcpt.id].relay, attempts[rcpt.id].tls,
                      result.error, result.outcome.value, result.retry_at,
                      bounce_id if result.outcome is Outcome.FAILED else None)
            for rcpt, result in zip(job.recipients, results, strict=True)
            if rcpt.route in RECORDED_ROUTES]
        if not tries:
            return None
        return self._guarded("attempt", job.message_id, partial(store.record_tries, tries=tries))

    def refused(self, address: str, client: str, sender: str, verdict: Refuse) -> None:
        """A refused RCPT: kept if it names an account of ours (UNRECORDED_REFUSALS)."""
        if not self.enabled or verdict.reason in UNRECORDED_REFUSALS:
            return
        write = partial(store.insert_refusal, at=self.clock.now(), address=address_key(address),
                        client=client, sender=sender, reply=verdict.reply.at(address))
        # Not while shutting down (QueueError): the refusal is in the log line all the same.
        with contextlib.suppress(QueueError):
            written = self.queue.write_soon(self._guarded("refusal", None, write))
            written.add_done_callback(self._commit_failed)

    def _commit_failed(self, written: asyncio.Future[Any]) -> None:
        """The commit that carried a refusal failed (the queue reports its own faults)."""
        if not written.cancelled() and written.exception() is not None:
            self._failed("refusal", None, written.exception() or Exception())

    def is_test(self, job: Job, body: bytes) -> bool:
        return sendtest.is_test(body, self.test_key, [r.orig_rcpt for r in job.recipients])

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


def _insert_arrival(found: partial[store.Arrival], conn: sqlite3.Connection) -> None:
    store.insert_arrival(conn, found())
