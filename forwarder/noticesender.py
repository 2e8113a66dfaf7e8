"""The daemon's side of the notices owed to newly declared targets.

An import declares a term's new targets in one transaction and owes each a notice
(directory `notice_due`); an admin command that declared one target queues its notice
itself and only leaves it owed if that failed (forwarder/notices.py). Here the main
process claims what is owed, one notice every `notice_interval` seconds, so that
thousands of notices after an import go out spread over time rather than in one burst
(providers' rate limits, our sending reputation), and puts them in its queue like any
mail: delivery, retries and DSNs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from collections.abc import Callable

from forwarder import log
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.directory import DaemonDirectory
from forwarder.notices import declared_notice
from forwarder.queue import Queue, QueueError

LOG = log.get("forwarder.targets")

# The pacer looks at least this often; with a shorter notice_interval it claims several
# notices each time.
MIN_TICK = 0.1


class NoticeSender:
    def __init__(self, settings: Settings, directory: DaemonDirectory, queue: Queue,
                 wake: Callable[[], None], clock: Clock) -> None:
        self.settings = settings
        self.directory = directory
        self.queue = queue
        self.wake = wake
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notice-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            interval = max(self.settings.targets.notice_interval, 0.0)
            tick = max(interval, MIN_TICK)
            await self.send_owed(max(1, math.floor(tick / interval)) if interval else 100)
            await asyncio.sleep(tick)

    async def send_owed(self, limit: int) -> int:
        """Queue up to `limit` owed notices; return how many."""
        now = self.clock.now()
        try:
            owed = await self.directory.claim_notices(limit, now)
            if not owed:
                return 0
            secret = self.directory.token_secrets()[0]
        except (sqlite3.Error, OSError, ValueError) as exc:
            LOG.error("directory_unavailable", error=type(exc).__name__, detail=str(exc))
            return 0
        sent = []
        for declared in owed:
            notice = declared_notice(self.settings, declared, secret, now)
            try:
                await self.queue.enqueue(notice, leased=False)
            except QueueError as exc:
                # Claimed, not sent: owed again once the claim lapses.
                LOG.error("queue_write_failed", client="", error=str(exc),
                          no_space=exc.no_space)
                break
            sent.append(declared.target_id)
            LOG.info("notice_queued", queue_id=notice.id, account=declared.account,
                     to=declared.target, kind="declared")
        if sent:
            self.wake()
            try:
                await self.directory.notices_sent(sent)
            except (sqlite3.Error, OSError) as exc:
                # They would go again once the claim lapses: a duplicate, never a loss.
                LOG.error("directory_write_failed", error=type(exc).__name__,
                          detail=str(exc), results=len(sent))
        return len(sent)
