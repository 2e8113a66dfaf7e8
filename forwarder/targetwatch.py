"""The delivery side of the dead-target rule: what delivery learns about redirect targets
goes to the directory, without a write per message.

Delivery reports every result here (`observe`, synchronous and cheap: it only sorts
them). What the directory must hear is written by one task of its own, in order:

- a permanent failure about the mailbox (targets.counts_against: 5.1.x, 5.2.1) of
  forwarded mail or of a notice: always;
- a success to a target with failures on record or `failing` (the `watched` set, loaded
  at start and kept up to date here): always, since it clears them;
- any other success: only to keep `last_success` fresh, at most once a day per target,
  several at a time (`FLUSH_INTERVAL`), so the hot path never waits for the directory.

A target that becomes `failing` is logged, and its account's targets still on get a
notice (forwarder/notices.py) through the queue. A crash may lose the results not yet
written (a few seconds' worth): the rule then fires a little later, never wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence

from forwarder import log
from forwarder.addresses import AddressError, parse_address
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.directory import DaemonDirectory, StateChange, TargetResult
from forwarder.notices import failing_notices
from forwarder.policy import WATCHED_ROUTES, Outcome
from forwarder.queue import Job, Queue, QueueError, RecipientJob, Result
from forwarder.targets import DeadRule, TargetState, counts_against

LOG = log.get("forwarder.targets")

# How often successes that change nothing but `last_success` are written, in one batch.
FLUSH_INTERVAL = 60.0
# Results kept for another try while the directory cannot be written (then dropped).
MAX_PENDING = 10_000


def account_key(orig_rcpt: str) -> str | None:
    """The directory key of the school address a copy was for, as the client wrote it."""
    try:
        return parse_address(orig_rcpt).key
    except AddressError:
        return None


class TargetWatch:
    def __init__(self, settings: Settings, directory: DaemonDirectory, queue: Queue,
                 wake: Callable[[], None], clock: Clock) -> None:
        self.settings = settings
        self.directory = directory
        self.queue = queue
        self.wake = wake
        self.clock = clock
        self.watched: set[str] = set()
        self._pending: list[TargetResult] = []
        self._fresh: list[tuple[RecipientJob, float]] = []
        self._fresh_today: set[str] = set()
        self._day = -1
        self._event = asyncio.Event()
        # One batch at a time, so that `flush` also waits for the one under way.
        self._writing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def rule(self) -> DeadRule:
        t = self.settings.targets
        return DeadRule(t.max_failures, t.failure_days * 86400.0)

    async def start(self) -> None:
        try:
            self.watched = await self.directory.watched()
        except (sqlite3.Error, OSError) as exc:
            LOG.error("directory_unavailable", error=type(exc).__name__, detail=str(exc))
        self._task = asyncio.create_task(self._run(), name="target-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    # --- from delivery (synchronous, on the hot path) -----------------------------------

    def observe(self, job: Job, results: Sequence[Result]) -> None:
        by_id = {r.id: r for r in job.recipients}
        for result in results:
            rcpt = by_id[result.recipient_id]
            if rcpt.route not in WATCHED_ROUTES:
                continue
            if result.outcome is Outcome.FAILED and counts_against(result.dsn_status):
                self._note(rcpt, result, delivered=False)
                self.watched.add(rcpt.rcpt)
            elif result.outcome is Outcome.DELIVERED:
                if rcpt.rcpt in self.watched:
                    self._note(rcpt, result, delivered=True)
                else:
                    self._note_fresh(rcpt, result.attempted_at)

    def _note(self, rcpt: RecipientJob, result: Result, delivered: bool) -> None:
        key = account_key(rcpt.orig_rcpt)
        if key is not None:
            self._pending.append(TargetResult(key, rcpt.rcpt, result.attempted_at, delivered,
                                              result.dsn_status, result.error))
            self._event.set()

    def _note_fresh(self, rcpt: RecipientJob, when: float) -> None:
        day = int(when // 86400)
        if day != self._day:
            self._day = day
            self._fresh_today.clear()
        if rcpt.rcpt not in self._fresh_today:
            self._fresh_today.add(rcpt.rcpt)
            self._fresh.append((rcpt, when))

    # --- the writer task -----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_at = loop.time() + FLUSH_INTERVAL
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), max(0.0, refresh_at - loop.time()))
            self._event.clear()
            await self._record()
            if loop.time() >= refresh_at:
                await self._refresh()
                refresh_at = loop.time() + FLUSH_INTERVAL

    async def flush(self) -> None:
        """Write whatever is waiting (at stop, and for tests that wait on the directory)."""
        await self._record()
        await self._refresh()

    async def _record(self) -> None:
        async with self._writing:
            await self._record_pending()

    async def _record_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            changes = await self.directory.record(pending, self.rule)
        except (sqlite3.Error, OSError) as exc:
            LOG.error("directory_write_failed", error=type(exc).__name__, detail=str(exc),
                      results=len(pending))
            self._pending[:0] = pending[-MAX_PENDING:]
            return
        for result in pending:
            LOG.info("target_result", account=result.account, target=result.target,
                     delivered=result.delivered, dsn=result.status)
        last = {r.target: r.delivered for r in pending}
        self.watched -= {target for target, delivered in last.items() if delivered}
        for change in changes:
            await self._announce(change)

    async def _refresh(self) -> None:
        async with self._writing:
            await self._refresh_fresh()

    async def _refresh_fresh(self) -> None:
        fresh, self._fresh = self._fresh, []
        seen = [(key, rcpt.rcpt, when) for rcpt, when in fresh
                if (key := account_key(rcpt.orig_rcpt)) is not None]
        if not seen:
            return
        try:
            await self.directory.refresh_successes(seen)
        except (sqlite3.Error, OSError) as exc:
            # Only `last_success` is late: nothing depends on it but what admins see.
            LOG.error("directory_write_failed", error=type(exc).__name__, detail=str(exc),
                      results=len(seen))

    async def _announce(self, change: StateChange) -> None:
        if change.after is not TargetState.FAILING:
            LOG.info("target_recovered", account=change.account, target=change.target,
                     state=change.after.value)
            return
        notices = failing_notices(self.settings, change, self.clock.now())
        try:
            for notice in notices:
                await self.queue.enqueue(notice, leased=False)
                LOG.info("notice_queued", queue_id=notice.id, account=change.account,
                         to=notice.recipients[0].rcpt, kind="failing")
        except QueueError as exc:
            LOG.error("queue_write_failed", client="", error=str(exc), no_space=exc.no_space)
        if notices:
            self.wake()
        LOG.warning("target_failing", account=change.account, target=change.target,
                    failures=change.health.failures, since=change.health.first_failure,
                    last_error=change.last_error, notified=list(change.others_on))
