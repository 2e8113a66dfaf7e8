"""Delivery: lease due recipients, route them, send, record the outcome, bounce failures.

A `Dispatcher` owns the set of recipients in flight. Fresh messages accepted in this
process reach it straight from the SMTP front (their bytes are still in memory, and their
recipients were leased in the same commit that queued them); an acceptor process's
messages, and retries, are found by scanning the queue, which leases what it hands out.
Recipients of one message are grouped by envelope sender and destination, so one
transaction carries all the copies that go to the same place.

A message suspected of crashing the daemon is tried alone in a lane of its own, one at a
time, beside the ordinary traffic (policy.blame says how crashes are charged).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from forwarder import log
from forwarder.bounces import Action, make_dsn, should_report
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.history.headers import header_section
from forwarder.history.recorder import HistoryRecorder
from forwarder.metrics import Metrics
from forwarder.mtasts import MtaSts
from forwarder.outbound import BodyHolder, Outbound
from forwarder.policy import Outcome, is_expired, retry_delay
from forwarder.queue import Job, NewMessage, Queue, RecipientJob, Result
from forwarder.routing import MailRouter, Router, RoutingError
from forwarder.slots import Slots
from forwarder.smtpclient import Attempt, Sender

__all__ = ["Dispatcher", "MailRouter", "Router", "RoutingError"]

LOG = log.get("forwarder.delivery")


def _reportable(action: Action, rcpt: RecipientJob, result: Result,
                attempts: dict[int, Attempt]) -> bool:
    if action == "failed":
        return result.outcome is Outcome.FAILED and rcpt.dsn.wants("FAILURE")
    if action == "delayed":
        return result.outcome is Outcome.DEFERRED and result.warned and rcpt.dsn.wants("DELAY")
    return (result.outcome is Outcome.DELIVERED and rcpt.dsn.notify is not None
            and rcpt.dsn.wants("SUCCESS") and not attempts[result.recipient_id].dsn_passed)


async def _unchanged_sender(job: Job) -> str:
    return job.sender


@dataclass
class Dispatcher:
    """Leases due work, runs it with bounded concurrency, records the results."""

    settings: Settings
    queue: Queue
    router: Router
    sender: Sender
    clock: Clock
    metrics: Metrics
    envelope_sender: Callable[[Job, RecipientJob], Awaitable[str]] = field(
        default=lambda job, rcpt: _unchanged_sender(job))
    # Told every round's results (forwarder/targetwatch.py: the dead-target rule).
    observe: Callable[[Job, list[Result]], None] | None = None
    mta_sts: MtaSts | None = None
    # The delivery history (forwarder/history/): attempts written with their outcomes, and
    # send-test messages told apart.
    history: HistoryRecorder | None = None
    in_flight: set[int] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stopping: bool = False
    _more_due: bool = False
    _lane_busy: bool = False  # a suspect is being tried alone
    outbound: Outbound = field(init=False)

    def __post_init__(self) -> None:
        slots = Slots(self.settings.delivery, self.clock.now,
                      self.metrics.destination_suspended)
        self.metrics.count_suspended(lambda: slots.suspended_count)
        self.outbound = Outbound(self.router, self.sender, slots, self.queue,
                                 self.envelope_sender, self.mta_sts)

    def set_router(self, router: Router, settings: Settings) -> None:
        """SIGHUP: new routes and limits (the slots keep their windows and suspensions)."""
        self.router = self.outbound.router = router
        self.settings = settings
        self.outbound.slots.settings = settings.delivery

    @property
    def bodies_held(self) -> int:
        """Message bodies delivery holds in memory now (only those being sent)."""
        return self.outbound.bodies.held

    def wake(self) -> None:
        self._wake.set()

    def submit(self, job: Job) -> None:
        """Start delivering a job whose recipients are already leased to us."""
        self.in_flight.update(r.id for r in job.recipients)
        task = asyncio.create_task(self._run_job(job))
        self._tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # The last scan filled every slot, so more is probably due: look again once half
        # the slots are free instead of at the next poll, or a backlog drains at
        # 4 x concurrency messages per poll_interval (80/s) whatever the destination's speed.
        active = len(self._tasks) - self.outbound.waiting
        if self._more_due and active <= 2 * self.settings.delivery.concurrency:
            self._more_due = False
            self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.delivery.poll_interval)
            self._wake.clear()
            if not self._stopping:
                await self.scan()

    async def scan(self) -> int:
        """Lease whatever is due now and start it; return how many jobs started. Jobs
        waiting for a slot at a slow destination hold no body and do not count against
        the room for more (up to a bound), so they cannot starve the others' retries."""
        concurrency = self.settings.delivery.concurrency
        active = len(self._tasks) - self.outbound.waiting
        room = max(0, min(4 * concurrency - active, 20 * concurrency - len(self._tasks)))
        if room == 0 and self._lane_busy:  # a full house does not starve the suspect lane
            return 0
        try:
            jobs = await self.queue.lease_due(self.clock.now(), room, frozenset(self.in_flight),
                                              lane_free=not self._lane_busy)
        except Exception as exc:
            LOG.error("queue_scan_failed", error=type(exc).__name__)
            return 0
        for job in jobs:
            self._lane_busy = self._lane_busy or job.isolated
            self.submit(job)
        self._more_due = len(jobs) >= room
        return len(jobs)

    async def stop(self, grace: float = 0.0) -> list[int]:
        """Stop: deliveries get `grace` seconds to finish; the rest are cancelled and their
        recipient ids returned, to be released for a retry after restart."""
        self._stopping = True
        self._wake.set()
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        interrupted = sorted(self.in_flight)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return interrupted

    async def _run_job(self, job: Job) -> None:
        try:
            await self._deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug, not a delivery failure: retry later, and hold (quarantine) a message
            # that keeps doing this rather than crash on it forever (Mailman's "shunt").
            LOG.exception("delivery_crashed", queue_id=job.message_id)
            await self._crashed(job)
        finally:
            self.in_flight.difference_update(r.id for r in job.recipients)
            if job.isolated:  # the next suspect need not wait for the poll
                self._lane_busy = False
                self._wake.set()

    async def _crashed(self, job: Job) -> None:
        retry_at = self.clock.now() + self.settings.delivery.first_retry
        with contextlib.suppress(Exception):
            if await self.queue.crashed(job, retry_at):
                LOG.error("message_held", queue_id=job.message_id, reason="repeated crashes")

    async def _deliver(self, job: Job) -> None:
        holder = BodyHolder(job.message_id, job.body, self.outbound.bodies)
        job.body = None  # the holder decides when the bytes may go (outbound.py)
        try:
            attempts = await self.outbound.attempt(job, holder)
            if attempts is None:
                return  # deleted by an administrator meanwhile
            head = None
            if self.history is not None:  # the header, before the holder lets the bytes go
                body = holder.body
                head = self._header(job, body if body is not None else
                                    await self.queue.load_body(job.message_id))
            now = self.clock.now()
            results = [self._result(job, rcpt, attempts[rcpt.id], now)
                       for rcpt in job.recipients]
            dsns = await self._reports(job, holder, results, attempts, now)
        finally:
            holder.drop()
        also = None if self.history is None or head is None else self.history.attempted(
            job, head, results, attempts, _bounced(job, results, attempts, dsns))
        # The attempt completed: crash blame is told so (a suspect alone in the lane that
        # got this far did not bring the daemon down).
        _, new_ids = await self.queue.record(results, dsns, [(job.message_id, job.lane)],
                                             also=also)
        # A test message's failure is the admin's answer, not evidence against a target.
        if self.observe is not None and not job.test:
            self.observe(job, results)
        for rcpt, result in zip(job.recipients, results, strict=True):
            self._log(job, rcpt, result, attempts[rcpt.id], now)
            delivered = result.outcome is Outcome.DELIVERED
            latency = now - job.arrived_at if delivered else None
            if job.test:
                self.metrics.test_delivery(result.outcome)
            else:
                self.metrics.delivery_result(result.outcome, rcpt.route.value, latency)
        for dsn, ids in zip(dsns, new_ids, strict=True):
            LOG.info("bounce_queued", queue_id=dsn.id, orig_queue_id=job.message_id,
                     to=dsn.recipients[0].rcpt, route=dsn.recipients[0].route.value)
            self.submit(Job.fresh(dsn, ids))

    def _header(self, job: Job, body: bytes | None) -> bytes | None:
        """The header section, for the history and the send-test mark: a copy of the
        bytes still held (or, when waiting for a slot let go of them, read again), so the
        body itself goes as before. Marks `job.test`."""
        if body is None or self.history is None:
            return None
        head = header_section(body)
        job.test = self.history.is_test(job, head)
        return head

    async def _reports(self, job: Job, holder: BodyHolder, results: list[Result],
                       attempts: dict[int, Attempt], now: float) -> list[NewMessage]:
        """The DSNs this round causes, as each recipient's NOTIFY asks (RFC 3461 4.1;
        without NOTIFY: failures and delays): one for failures, one for first delay
        warnings, and one "relayed" for NOTIFY=SUCCESS copies handed to a next hop that
        does not offer DSN (RFC 3461 5.2.2.1; one that does reports on its own). None for
        a test message: `forwarder send-test` reports its outcome itself."""
        if job.test:
            return []
        by_id = {r.id: r for r in job.recipients}
        reports: list[tuple[Action, list[tuple[RecipientJob, Result]]]] = [
            (action, [(by_id[r.recipient_id], r) for r in results
                      if _reportable(action, by_id[r.recipient_id], r, attempts)])
            for action in ("failed", "delayed", "relayed")]
        if not any(chosen for _, chosen in reports):
            return []
        body = holder.body or await self.queue.load_body(job.message_id)
        # Parse the headers (is it a bounce?) only when there is something to report.
        if body is None or not should_report(job.sender, body):
            return []
        return [make_dsn(self.settings, job, body, action, chosen, now)
                for action, chosen in reports if chosen]

    def _result(self, job: Job, rcpt: RecipientJob, attempt: Attempt, now: float) -> Result:
        outcome, retry_at, warned = attempt.outcome, None, False
        d = self.settings.delivery
        if outcome is Outcome.DEFERRED:
            if is_expired(job.arrived_at, now, d.queue_lifetime):
                outcome = Outcome.FAILED
                # RFC 3463 X.4.7: delivery time expired; keep the last error as diagnostic.
                attempt = Attempt(outcome, "4.4.7", attempt.text, attempt.relay)
            else:
                retry_at = now + retry_delay(rcpt.attempts + 1, d.first_retry, d.max_retry)
                warned = (d.delay_warning > 0 and not rcpt.warned
                          and now - job.arrived_at >= d.delay_warning)
        return Result(rcpt.id, job.message_id, outcome, now, retry_at,
                      attempt.text, attempt.status, attempt.relay, warned)

    def _log(self, job: Job, rcpt: RecipientJob, result: Result, attempt: Attempt,
             now: float) -> None:
        fields: dict[str, Any] = {
            "queue_id": job.message_id, "to": rcpt.rcpt, "orig_to": rcpt.orig_rcpt,
            "relay": attempt.relay or "none", "delay": round(now - job.arrived_at, 3),
            "dsn": result.dsn_status, "status": result.outcome.value,
            "route": rcpt.route.value,
            # Every hop's TLS on record: "none" for clear text (or no session).
            "tls": attempt.tls.version if attempt.tls else "none",
        }
        if attempt.tls is not None:
            fields["cipher"] = attempt.tls.cipher
            fields["tls_verified"] = attempt.tls.verified
        if result.outcome is Outcome.DELIVERED:
            LOG.info("delivery", **fields)
        else:
            LOG.warning("delivery", reason=attempt.text, retry_at=result.retry_at, **fields)


def _bounced(job: Job, results: list[Result], attempts: dict[int, Attempt],
             dsns: list[NewMessage]) -> dict[int, str]:
    """Recipient id -> the queue id of the DSN that reports its failure (`_reports` puts
    the failures' DSN first, and makes it when any failure is to be reported)."""
    if not dsns:
        return {}
    by_id = {r.id: r for r in job.recipients}
    return {r.recipient_id: dsns[0].id for r in results
            if _reportable("failed", by_id[r.recipient_id], r, attempts)}
