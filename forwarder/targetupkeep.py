"""The main process's work on redirect targets, started and stopped as one: the delivery
side of the dead-target rule (targetwatch.py), the notices owed after imports
(noticesender.py), and the forwarder_targets gauge."""

from __future__ import annotations

import asyncio
import contextlib

from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.delivery import Dispatcher
from forwarder.directory import DaemonDirectory
from forwarder.metrics import Metrics
from forwarder.noticesender import NoticeSender
from forwarder.queue import Queue
from forwarder.targetwatch import TargetWatch

# How often the redirect targets are counted for forwarder_targets (a scan of the table).
GAUGE_INTERVAL = 60.0


class TargetUpkeep:
    """Built with the daemon, started in the main process only (acceptors deliver nothing);
    `stop` and `reload` do nothing until it is started."""

    def __init__(self, settings: Settings, queue: Queue, dispatcher: Dispatcher,
                 clock: Clock, metrics: Metrics) -> None:
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.directory: DaemonDirectory | None = None
        self.watch: TargetWatch | None = None
        self.notices: NoticeSender | None = None
        self._gauge: asyncio.Task[None] | None = None

    async def start(self, directory: DaemonDirectory) -> None:
        self.directory = directory
        wake = self.dispatcher.wake
        self.watch = TargetWatch(self.settings, directory, self.queue, wake, self.clock)
        self.notices = NoticeSender(self.settings, directory, self.queue, wake, self.clock)
        await self.watch.start()
        self.dispatcher.observe = self.watch.observe
        self.notices.start()
        self._gauge = asyncio.create_task(self._gauge_loop(), name="targets-gauge")

    def reload(self, settings: Settings) -> None:
        self.settings = settings
        for part in (self.watch, self.notices):
            if part is not None:
                part.settings = settings

    async def stop(self) -> None:
        """After delivery has stopped: what it reported last is written."""
        if self._gauge is not None:
            self._gauge.cancel()
            await asyncio.gather(self._gauge, return_exceptions=True)
        if self.notices is not None:
            await self.notices.stop()
        if self.watch is not None:
            await self.watch.stop()

    async def _gauge_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh_gauge()
            await asyncio.sleep(GAUGE_INTERVAL)

    async def refresh_gauge(self) -> None:
        """Count the redirect targets by state for forwarder_targets."""
        assert self.directory is not None
        counts = await self.directory.target_counts()
        self.metrics.targets_snapshot({state.value: n for state, n in counts.items()})
