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
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from forwarder import log
from forwarder.bounces import Action, make_dsn, should_report
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.dsn import MAX_RETURNED_MESSAGE
from forwarder.history.headers import header_section
from forwarder.history.recorder import HistoryRecorder
from forwarder.metrics import Metrics
from forwarder.mtasts import MtaSts
from forwarder.outbound import BodyHolder, Outbound
from forwarder.policy import Outcome, is_expired, retry_delay
from forwarder.queue import Body, Job, NewMessage, Queue, QueueError, RecipientJob, Result
from forwarder.queue.spool import read_head
from forwarder.queue.writer import Op
from forwarder.routing import MailRouter, Router, RoutingError
from forwarder.slots import Slots
from forwarder.smtpbody import HEAD_OCTETS, unstuff
from forwarder.smtpclient import Attempt, Sender

__all__ = ["Dispatcher", "MailRouter", "Router", "RoutingError"]

LOG = log.get("forwarder.delivery")
# How often held messages are looked through for those at the end of their lifetime.
HELD_CHECK_INTERVAL = 60.0
HELD_EXPIRED = ("x-local; held (quarantined) after repeated crashes, and not delivered"
                " within the queue lifetime")
# An outcome that could not be written is written again after this long, then twice as
# long, up to the maximum (seconds).
UNWRITTEN_FIRST_RETRY = 0.5
UNWRITTEN_MAX_RETRY = 15.0


def _reportable(action: Action, rcpt: RecipientJob, result: Result,
                attempts: dict[int, Attempt]) -> bool:
    if action == "failed":
        return result.outcome is Outcome.FAILED and rcpt.dsn.wants("FAILURE")
    if action == "delayed":
        return result.outcome is Outcome.DEFERRED and result.warned and rcpt.dsn.wants("DELAY")
    return (result.outcome is Outcome.DELIVERED and rcpt.dsn.notify is not None
            and rcpt.dsn.wants("SUCCESS") and not attempts[result.recipient_id].dsn_passed)


async def message_head(body: Body) -> bytes:
    """The first HEAD_OCTETS of a message, unstuffed (whole lines where it is cut): enough
    for its header section or a bounded prefix of it."""
    if isinstance(body, bytes):
        return body[:HEAD_OCTETS]
    if body.head:
        return body.head[:HEAD_OCTETS]
    raw = await asyncio.to_thread(read_head, body.path, HEAD_OCTETS)
    cut = raw.rfind(b"\r\n") + 2
    return (body.prefix + unstuff(raw[:cut]))[:HEAD_OCTETS]


async def _returned(job: Job, body: Body) -> bytes:
    """What a DSN about `job` returns of the message (RFC 3462, RFC 3461 4.3): the whole
    message when RET=FULL asks for it and it is small enough, else the first octets, of
    which only the header fields are used."""
    if job.flags.dsn.ret == "FULL" and job.size <= MAX_RETURNED_MESSAGE:
        if isinstance(body, bytes):
            return body
        rest = await asyncio.to_thread(read_head, body.path, MAX_RETURNED_MESSAGE + 1)
        return body.prefix + unstuff(rest)
    return await message_head(body)


async def record_until_written(queue: Queue, unwritten: set[str], job: Job,
                               results: list[Result], dsns: list[NewMessage],
                               also: Op | None = None) -> list[list[int]]:
    """Write the outcomes. One that cannot be written (a full disk) is kept here and
    written again until it is, its message in `unwritten` meanwhile: the recipients stay
    in flight, so the message is neither sent again nor taken for a crash (before, both
    happened)."""
    pause = UNWRITTEN_FIRST_RETRY
    while True:
        try:
            _, new_ids = await queue.record(results, dsns, [(job.message_id, job.lane)],
                                            also=also)
            return new_ids
        except QueueError as exc:
            LOG.error("outcome_unwritten", queue_id=job.message_id, error=str(exc),
                      no_space=exc.no_space, retry_in=pause)
            unwritten.add(job.message_id)
            try:
                await asyncio.sleep(pause)
            finally:
                unwritten.discard(job.message_id)
            pause = min(pause * 2, UNWRITTEN_MAX_RETRY)


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
    # Messages whose outcome waits to be written (a full disk): no new attempt meanwhile.
    unwritten: set[str] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stopping: bool = False
    _more_due: bool = False
    _lane_busy: bool = False  # a suspect is being tried alone
    _held_checked: float = -HELD_CHECK_INTERVAL  # when held messages were last looked at
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

    def submit(self, job: Job, held: bool = False) -> None:
        """Start delivering a job whose recipients are already leased to us (`held`: a held
        message at the end of its lifetime, bounced without an attempt)."""
        self.in_flight.update(r.id for r in job.recipients)
        task = asyncio.create_task(self._bounce_held(job) if held else self._run_job(job))
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
        if self.unwritten:
            return 0  # storage is failing: outcomes first, no new attempts meanwhile
        await self._expire_held()
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
        except (QueueError, sqlite3.Error) as exc:
            # Storage, not the message: never counted as a crash (the leases stay; the
            # recipients are tried again when they lapse, or at the next start).
            LOG.error("queue_unavailable", queue_id=job.message_id, error=str(exc))
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

    async def _expire_held(self) -> None:
        """Held messages are never tried again, but one at the end of its lifetime leaves
        the queue like any undeliverable message: as a bounce to its sender."""
        now = self.clock.now()
        if now - self._held_checked < HELD_CHECK_INTERVAL:
            return
        self._held_checked = now
        try:
            jobs = await self.queue.lease_expired_held(now, self.settings.delivery.queue_lifetime)
        except Exception as exc:
            LOG.error("queue_scan_failed", error=type(exc).__name__)
            return
        for job in jobs:
            self.submit(job, held=True)

    async def _bounce_held(self, job: Job) -> None:
        try:
            # RFC 3463 X.4.7: delivery time expired (as for any message past its time).
            attempt = Attempt(Outcome.FAILED, "4.4.7", HELD_EXPIRED, None)
            holder = BodyHolder(job.message_id, None, self.outbound.bodies)
            await self._conclude(job, holder, {r.id: attempt for r in job.recipients})
        except Exception:
            LOG.exception("delivery_crashed", queue_id=job.message_id)
        finally:
            self.in_flight.difference_update(r.id for r in job.recipients)

    async def _deliver(self, job: Job) -> None:
        holder = BodyHolder(job.message_id, job.body, self.outbound.bodies)
        job.body = None  # the holder decides when the bytes may go (outbound.py)
        try:
            attempts = await self.outbound.attempt(job, holder)
            if attempts is not None:  # None: deleted by an administrator meanwhile
                await self._conclude(job, holder, attempts)
        finally:
            holder.drop()

    async def _conclude(self, job: Job, holder: BodyHolder,
                        attempts: dict[int, Attempt]) -> None:
        """Record what the attempts did, with the DSNs they cause and the history's rows,
        then log and count."""
        try:
            head = await self._header(job, holder)  # before the holder lets the bytes go
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
        new_ids = await record_until_written(self.queue, self.unwritten, job, results,
                                             dsns, also)
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

    async def _header(self, job: Job, holder: BodyHolder) -> bytes | None:
        """The header section (its first 64 KiB at most), for the history and the send-test
        mark: from the bytes still held (or, when waiting for a slot let go of them, read
        again; for a spooled body, its head), so the body itself goes as before. Marks
        `job.test`."""
        if self.history is None:
            return None
        body = holder.body
        if body is None:
            body = await self.queue.load_body(job.message_id)
        if body is None:
            return None
        head = header_section(await message_head(body))
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
        # Read the headers (is it a bounce?) only when there is something to report, and
        # only their first HEAD_OCTETS: a DSN returns a bounded prefix of them (RFC 6522's
        # text/rfc822-headers may be truncated), whatever the header section's size.
        if body is None or not should_report(job.sender, await message_head(body)):
            return []
        returned = await _returned(job, body)
        return [make_dsn(self.settings, job, returned, action, chosen, now)
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
