"""Delivery: lease due recipients, route them, send with aiosmtplib, record the outcome.

A `Dispatcher` owns the set of recipients in flight. Fresh messages reach it straight from
the SMTP front (their bytes are still in memory, and their recipients were leased in the
same commit that queued them); retries are found by scanning the queue, which leases what
it hands out. Each `Job` is sent by `Sender`, which groups recipients by envelope sender
and destination and reuses connections through `ConnectionPool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiosmtplib

from forwarder import log
from forwarder.clock import Clock
from forwarder.config import DeliverySettings, HostPort, Settings
from forwarder.metrics import Metrics
from forwarder.policy import Outcome, Route, is_expired, outcome_of_reply, retry_delay
from forwarder.queue import Job, Queue, RecipientJob, Result

LOG = log.get("forwarder.delivery")


class RoutingError(Exception):
    """No destination now; `permanent` says whether trying again could help."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class Router(Protocol):
    async def route(self, recipient: str, route: Route) -> list[HostPort]:
        """The destinations to try in order, or raise RoutingError."""
        ...


@dataclass
class StaticRouter:
    """Active accounts go to the mailbox host; everything else to the smarthost."""

    mailbox_host: HostPort | None
    smarthost: HostPort | None

    async def route(self, recipient: str, route: Route) -> list[HostPort]:
        if route is Route.MAILBOX:
            if self.mailbox_host is None:
                raise RoutingError("mailbox host not configured")
            return [self.mailbox_host]
        if self.smarthost is None:
            raise RoutingError("no smarthost configured and no MX routing")
        return [self.smarthost]


@dataclass(frozen=True)
class Attempt:
    """The destination's verdict on one recipient."""

    outcome: Outcome
    status: str  # enhanced status code, e.g. "2.0.0", "4.4.1"
    text: str  # "smtp; 550 5.1.1 ..." style diagnostic
    relay: str | None


def _enhanced(code: int, message: str) -> str:
    first = message.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return first
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def _reply_attempt(code: int, message: str, relay: str) -> Attempt:
    text = " ".join(message.split())  # one line, never a raw CR/LF in a log or a DSN
    return Attempt(outcome_of_reply(code), _enhanced(code, text), f"smtp; {code} {text}", relay)


def _local_attempt(status: str, reason: str, relay: str | None = None) -> Attempt:
    outcome = Outcome.FAILED if status.startswith("5") else Outcome.DEFERRED
    return Attempt(outcome, status, f"x-local; {reason}", relay)


class ConnectionPool:
    """Open SMTP sessions per destination, reused for several messages (DESIGN.md)."""

    def __init__(self, settings: DeliverySettings, hostname: str) -> None:
        self._settings = settings
        self._hostname = hostname
        self._idle: dict[HostPort, list[aiosmtplib.SMTP]] = defaultdict(list)
        self._limits: dict[HostPort, asyncio.Semaphore] = {}
        self._tls = ssl.create_default_context()
        # Opportunistic TLS (Postfix's "may"): encrypt when offered, do not authenticate.
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE

    def limit(self, dest: HostPort) -> asyncio.Semaphore:
        if dest not in self._limits:
            self._limits[dest] = asyncio.Semaphore(self._settings.per_destination)
        return self._limits[dest]

    async def acquire(self, dest: HostPort) -> aiosmtplib.SMTP:
        idle = self._idle[dest]
        while idle:
            client = idle.pop()
            if client.is_connected:
                return client
        return await self._connect(dest)

    async def _connect(self, dest: HostPort) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=dest.host, port=dest.port, local_hostname=self._hostname,
            timeout=self._settings.command_timeout, start_tls=False,
        )
        await client.connect(timeout=self._settings.connect_timeout)
        await client.ehlo()
        if client.supports_extension("starttls"):
            await client.starttls(tls_context=self._tls, server_hostname=dest.host)
        return client

    def release(self, dest: HostPort, client: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and client.is_connected:
            self._idle[dest].append(client)
        else:
            client.close()

    async def close(self) -> None:
        for clients in self._idle.values():
            for client in clients:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.quit(), 2)
                client.close()
        self._idle.clear()


_TEMP_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError)


class Sender:
    """Sends one message to a group of recipients at one destination."""

    def __init__(self, settings: Settings, pool: ConnectionPool) -> None:
        self._settings = settings
        self._pool = pool

    async def send(
        self, dest: HostPort, sender: str, recipients: Sequence[str], body: bytes
    ) -> dict[str, Attempt]:
        relay = str(dest)
        async with self._pool.limit(dest):
            try:
                client = await self._pool.acquire(dest)
            except _TEMP_ERRORS as exc:
                return {r: _local_attempt("4.4.1", f"connect to {relay}: {_describe(exc)}",
                                          relay) for r in recipients}
            reusable = False
            try:
                results = await self._transaction(client, sender, recipients, body, relay)
                reusable = True
                return results
            except aiosmtplib.SMTPResponseException as exc:
                # 421: the server is closing the session (RFC 5321 3.8).
                reusable = exc.code != 421
                return {r: _reply_attempt(exc.code, exc.message, relay) for r in recipients}
            except _TEMP_ERRORS as exc:
                return {r: _local_attempt("4.4.2", f"{relay}: {_describe(exc)}", relay)
                        for r in recipients}
            finally:
                if reusable:
                    reusable = await _reset(client)
                self._pool.release(dest, client, reusable)

    async def _transaction(
        self, client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], body: bytes,
        relay: str,
    ) -> dict[str, Attempt]:
        await client.mail(sender)
        results: dict[str, Attempt] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                reply = await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[rcpt] = _reply_attempt(exc.code, exc.message, relay)
                continue
            accepted.append(rcpt)
            results[rcpt] = _reply_attempt(reply.code, reply.message, relay)
        if not accepted:
            return results
        # RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot.
        reply = await client.data(body, timeout=self._settings.delivery.data_timeout)
        for rcpt in accepted:
            results[rcpt] = _reply_attempt(reply.code, reply.message, relay)
        return results


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET between transactions on a reused connection; False if the session is unusable."""
    try:
        await client.rset()
    except _TEMP_ERRORS:
        return False
    return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "timed out"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


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
    on_results: Callable[[Job, list[Result], dict[int, Attempt]], Awaitable[None]] | None = None
    in_flight: set[int] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: asyncio.Semaphore = field(init=False)
    _stopping: bool = False

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.delivery.concurrency)

    def wake(self) -> None:
        self._wake.set()

    def submit(self, job: Job) -> None:
        """Start delivering a job whose recipients are already leased to us."""
        self.in_flight.update(r.id for r in job.recipients)
        task = asyncio.create_task(self._run_job(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        poll = self.settings.delivery.poll_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)
            self._wake.clear()
            if self._stopping:
                break
            await self.scan()

    async def scan(self) -> int:
        """Lease whatever is due now and start it; return how many jobs started."""
        room = max(0, 4 * self.settings.delivery.concurrency - len(self._tasks))
        if room == 0:
            return 0
        try:
            jobs = await self.queue.lease_due(self.clock.now(), room, frozenset(self.in_flight))
        except Exception as exc:
            LOG.error("queue_scan_failed", error=type(exc).__name__)
            return 0
        for job in jobs:
            self.submit(job)
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
            async with self._slots:
                await self._deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug, not a delivery failure: leave the lease; recovery counts it, and a
            # message that keeps doing this is held (quarantined) instead of looping.
            LOG.exception("delivery_crashed", queue_id=job.message_id)
        finally:
            self.in_flight.difference_update(r.id for r in job.recipients)

    async def _deliver(self, job: Job) -> None:
        body = job.body if job.body is not None else await self.queue.load_body(job.message_id)
        if body is None:
            return  # deleted by an administrator meanwhile
        attempts = await self._attempt_all(job, body)
        now = self.clock.now()
        results = [self._result(job, rcpt, attempts[rcpt.id], now) for rcpt in job.recipients]
        await self.queue.record(results)
        for rcpt, result in zip(job.recipients, results, strict=True):
            self._log(job, rcpt, result, attempts[rcpt.id], now)
            latency = now - job.arrived_at if result.outcome == "delivered" else None
            self.metrics.delivery_result(result.outcome, rcpt.route.value, latency)
        if self.on_results is not None:
            await self.on_results(job, results, attempts)

    async def _attempt_all(self, job: Job, body: bytes) -> dict[int, Attempt]:
        groups: dict[tuple[str, tuple[HostPort, ...]], list[RecipientJob]] = defaultdict(list)
        attempts: dict[int, Attempt] = {}
        for rcpt in job.recipients:
            try:
                dests = await self.router.route(rcpt.rcpt, rcpt.route)
            except RoutingError as exc:
                status = "5.1.2" if exc.permanent else "4.4.3"
                attempts[rcpt.id] = _local_attempt(status, exc.reason)
                continue
            groups[(await self.envelope_sender(job, rcpt), tuple(dests))].append(rcpt)
        sends = [self._send_group(sender, dests, rcpts, body)
                 for (sender, dests), rcpts in groups.items()]
        for result in await asyncio.gather(*sends):
            attempts.update(result)
        return attempts

    async def _send_group(
        self, sender: str, dests: tuple[HostPort, ...], rcpts: list[RecipientJob], body: bytes
    ) -> dict[int, Attempt]:
        """Try each destination in turn for the recipients not yet settled."""
        pending = list(rcpts)
        attempts: dict[int, Attempt] = {}
        for dest in dests:
            by_addr = await self.sender.send(dest, sender, [r.rcpt for r in pending], body)
            for rcpt in pending:
                attempts[rcpt.id] = by_addr[rcpt.rcpt]
            # Only a failure to talk to this host moves on to the next one (RFC 5321 5.1).
            pending = [r for r in pending if attempts[r.id].text.startswith("x-local")]
            if not pending:
                break
        return attempts

    def _result(self, job: Job, rcpt: RecipientJob, attempt: Attempt, now: float) -> Result:
        outcome = attempt.outcome
        retry_at = None
        if outcome is Outcome.DEFERRED:
            lifetime = self.settings.delivery.queue_lifetime
            if is_expired(job.arrived_at, now, lifetime):
                outcome = Outcome.FAILED
            else:
                d = self.settings.delivery
                retry_at = now + retry_delay(rcpt.attempts + 1, d.first_retry, d.max_retry)
        return Result(rcpt.id, job.message_id, outcome.value, now, retry_at,
                      attempt.text, attempt.status, attempt.relay)

    def _log(self, job: Job, rcpt: RecipientJob, result: Result, attempt: Attempt,
             now: float) -> None:
        fields: dict[str, Any] = {
            "queue_id": job.message_id, "to": rcpt.rcpt, "orig_to": rcpt.orig_rcpt,
            "relay": attempt.relay or "none", "delay": round(now - job.arrived_at, 3),
            "dsn": attempt.status, "status": result.outcome, "route": rcpt.route.value,
        }
        if result.outcome == "delivered":
            LOG.info("delivery", **fields)
        else:
            LOG.warning("delivery", reason=attempt.text, retry_at=result.retry_at, **fields)
