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
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from forwarder import log
from forwarder.bounces import make_dsn, should_report
from forwarder.clock import Clock
from forwarder.config import HostPort, Settings
from forwarder.dns import Destination, DnsPermanentError, DnsTemporaryError
from forwarder.dns import Router as DnsRouter
from forwarder.metrics import Metrics
from forwarder.policy import Outcome, Route, is_expired, retry_delay
from forwarder.queue import Body, Job, NewMessage, Queue, QueueError, RecipientJob, Result
from forwarder.queue.spool import read_head
from forwarder.smtpbody import HEAD_OCTETS, unstuff
from forwarder.smtpclient import Attempt, Sender, local_attempt

LOG = log.get("forwarder.delivery")
# How often held messages are looked through for those at the end of their lifetime.
HELD_CHECK_INTERVAL = 60.0
HELD_EXPIRED = ("x-local; held (quarantined) after repeated crashes, and not delivered"
                " within the queue lifetime")
# An outcome that could not be written is written again after this long, then twice as
# long, up to the maximum (seconds).
UNWRITTEN_FIRST_RETRY = 0.5
UNWRITTEN_MAX_RETRY = 15.0


class RoutingError(Exception):
    """No destination now; `permanent` says whether trying again could help."""

    def __init__(self, reason: str, permanent: bool = False, status: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        # RFC 3463: 5.1.2 bad destination system; 4.4.3 directory (DNS) failure.
        self.status = status or ("5.1.2" if permanent else "4.4.3")


class Router(Protocol):
    async def route(self, recipient: str, route: Route) -> list[Destination]:
        """The destinations to try in order, or raise RoutingError."""
        ...


def _fixed(hp: HostPort) -> Destination:
    return Destination(hp.host, hp.host, hp.port)


@dataclass
class MailRouter:
    """Active accounts go to the mailbox host; everything else to the smarthost if one is
    configured, else to the recipient domain's MX hosts (RFC 5321 5.1)."""

    mailbox_host: HostPort | None
    smarthost: HostPort | None
    mx: DnsRouter | None = None

    async def route(self, recipient: str, route: Route) -> list[Destination]:
        if route is Route.MAILBOX:
            if self.mailbox_host is None:
                raise RoutingError("mailbox host not configured")
            return [_fixed(self.mailbox_host)]
        if self.smarthost is not None:
            return [_fixed(self.smarthost)]
        if self.mx is None:
            raise RoutingError("no smarthost and no DNS resolver configured")
        try:
            return await self.mx.route(recipient.rpartition("@")[2])
        except DnsPermanentError as exc:
            # RFC 7505 4.3: a null MX is reported as 5.1.10.
            status = "5.1.10" if exc.reason.startswith("null MX") else "5.1.2"
            raise RoutingError(exc.reason, permanent=True, status=status) from exc
        except DnsTemporaryError as exc:
            raise RoutingError(exc.reason) from exc


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
    in_flight: set[int] = field(default_factory=set)
    # Messages whose outcome waits to be written (a full disk): no new attempt meanwhile.
    unwritten: set[str] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stopping: bool = False
    _more_due: bool = False
    _lane_busy: bool = False  # a suspect is being tried alone
    _held_checked: float = -HELD_CHECK_INTERVAL  # when held messages were last looked at

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
        if self._more_due and len(self._tasks) <= 2 * self.settings.delivery.concurrency:
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
        """Lease whatever is due now and start it; return how many jobs started."""
        if self.unwritten:
            return 0  # storage is failing: outcomes first, no new attempts meanwhile
        await self._expire_held()
        room = max(0, 4 * self.settings.delivery.concurrency - len(self._tasks))
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
            body = await self.queue.load_body(job.message_id)
            if body is not None:
                # RFC 3463 X.4.7: delivery time expired (as for any message past its time).
                attempt = Attempt(Outcome.FAILED, "4.4.7", HELD_EXPIRED, None)
                await self._conclude(job, body, {r.id: attempt for r in job.recipients})
        except Exception:
            LOG.exception("delivery_crashed", queue_id=job.message_id)
        finally:
            self.in_flight.difference_update(r.id for r in job.recipients)

    async def _deliver(self, job: Job) -> None:
        body = job.body if job.body is not None else await self.queue.load_body(job.message_id)
        if body is None:
            return  # deleted by an administrator meanwhile
        await self._conclude(job, body, await self._attempt_all(job, body))

    async def _conclude(self, job: Job, body: Body, attempts: dict[int, Attempt]) -> None:
        """Record what the attempts did, with the DSNs they cause, then log and count."""
        now = self.clock.now()
        results = [self._result(job, rcpt, attempts[rcpt.id], now) for rcpt in job.recipients]
        dsns = await self._reports(job, body, results, now)
        # The attempt completed: crash blame is told so (a suspect alone in the lane that
        # got this far did not bring the daemon down).
        new_ids = await self._record(job, results, dsns)
        for rcpt, result in zip(job.recipients, results, strict=True):
            self._log(job, rcpt, result, attempts[rcpt.id], now)
            delivered = result.outcome is Outcome.DELIVERED
            latency = now - job.arrived_at if delivered else None
            self.metrics.delivery_result(result.outcome, rcpt.route.value, latency)
        for dsn, ids in zip(dsns, new_ids, strict=True):
            LOG.info("bounce_queued", queue_id=dsn.id, orig_queue_id=job.message_id,
                     to=job.sender)
            self.submit(Job.fresh(dsn, ids))

    async def _reports(self, job: Job, body: Body, results: list[Result],
                       now: float) -> list[NewMessage]:
        """The DSNs this round causes: one for failures, one for first delay warnings."""
        by_id = {r.id: r for r in job.recipients}
        plan: tuple[tuple[Literal["failed", "delayed"], Outcome], ...] = (
            ("failed", Outcome.FAILED), ("delayed", Outcome.DEFERRED))
        reports = [(action, [(by_id[r.recipient_id], r) for r in results
                             if r.outcome is wanted
                             and (wanted is Outcome.FAILED or r.warned)])
                   for action, wanted in plan]
        # Read the headers (is it a bounce?) only when there is something to report, and
        # only their first HEAD_OCTETS: a DSN returns a bounded prefix of them (RFC 6522's
        # text/rfc822-headers may be truncated), whatever the header section's size.
        if not any(chosen for _, chosen in reports):
            return []
        head = await message_head(body)
        if not should_report(job.sender, head):
            return []
        return [make_dsn(self.settings, job, head, action, chosen, now)
                for action, chosen in reports if chosen]

    async def _record(self, job: Job, results: list[Result],
                      dsns: list[NewMessage]) -> list[list[int]]:
        """Write the outcomes. One that cannot be written (a full disk) is kept here and
        written again until it is: the recipients stay in flight meanwhile, so the message
        is neither sent again nor taken for a crash (before, both happened)."""
        pause = UNWRITTEN_FIRST_RETRY
        while True:
            try:
                _, new_ids = await self.queue.record(results, dsns,
                                                     [(job.message_id, job.lane)])
                return new_ids
            except QueueError as exc:
                LOG.error("outcome_unwritten", queue_id=job.message_id, error=str(exc),
                          no_space=exc.no_space, retry_in=pause)
                self.unwritten.add(job.message_id)
                try:
                    await asyncio.sleep(pause)
                finally:
                    self.unwritten.discard(job.message_id)
                pause = min(pause * 2, UNWRITTEN_MAX_RETRY)

    async def _attempt_all(self, job: Job, body: Body) -> dict[int, Attempt]:
        groups: dict[tuple[str, tuple[Destination, ...]], list[RecipientJob]] = \
            defaultdict(list)
        attempts: dict[int, Attempt] = {}
        for rcpt in job.recipients:
            try:
                dests = await self.router.route(rcpt.rcpt, rcpt.route)
            except RoutingError as exc:
                attempts[rcpt.id] = local_attempt(exc.status, exc.reason)
                continue
            groups[(await self.envelope_sender(job, rcpt), tuple(dests))].append(rcpt)
        sends = [self._send_group(sender, list(dests), rcpts, body)
                 for (sender, dests), rcpts in groups.items()]
        if len(sends) == 1:  # the usual case: no task per group to run one coroutine
            attempts.update(await sends[0])
            return attempts
        for result in await asyncio.gather(*sends):
            attempts.update(result)
        return attempts

    async def _send_group(
        self, sender: str, dests: list[Destination], rcpts: list[RecipientJob], body: Body
    ) -> dict[int, Attempt]:
        """Try each address in turn for the recipients not yet settled (RFC 5321 5.1);
        an address whose TLS handshake failed is tried once more, in clear, at the end."""
        pending = list(rcpts)
        attempts: dict[int, Attempt] = {}
        retried_clear: set[Destination] = set()
        while dests and pending:
            dest = dests.pop(0)
            by_addr = await self.sender.send(dest, sender, [r.rcpt for r in pending], body)
            for rcpt in pending:
                attempts[rcpt.id] = by_addr[rcpt.rcpt]
            if any(a.tls_failed for a in by_addr.values()) and dest not in retried_clear:
                retried_clear.add(dest)
                dests.append(dest)
            pending = [r for r in pending if attempts[r.id].unreachable]
        return attempts

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
        }
        if result.outcome is Outcome.DELIVERED:
            LOG.info("delivery", **fields)
        else:
            LOG.warning("delivery", reason=attempt.text, retry_at=result.retry_at, **fields)

