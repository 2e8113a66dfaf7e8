"""Builds every component, owns every task, handles signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP

from forwarder import __version__, log
from forwarder.clock import Clock, SystemClock
from forwarder.config import Settings
from forwarder.delivery import ConnectionPool, Dispatcher, Router, Sender, StaticRouter
from forwarder.directory import DirectoryReader
from forwarder.front import Front
from forwarder.policy import needs_srs
from forwarder.queue import Job, Queue, RecipientJob
from forwarder.returnpath import ReturnPath

LOG = log.get("forwarder.daemon")


class StateLockError(Exception):
    pass


def lock_state_dir(state_dir: Path) -> int:
    """One daemon per state directory: a second one would deliver the same queue twice."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "forwarder.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLockError(f"another forwarder is running on {state_dir}") from None
    return fd


class Daemon:
    """The running forwarder. `async with Daemon(settings) as d:` serves on `d.port`."""

    def __init__(
        self, settings: Settings, clock: Clock | None = None, router: Router | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.router = router or StaticRouter(settings.mailbox_host, settings.smarthost)
        self.port = 0
        self._lock_fd: int | None = None
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.queue = Queue(settings.queue_path, settings.busy_timeout)
        self.directory: DirectoryReader | None = None
        self.pool = ConnectionPool(settings.delivery, settings.hostname)
        self.return_path: ReturnPath | None = None
        self.dispatcher = Dispatcher(settings, self.queue, self.router,
                                     Sender(settings, self.pool), self.clock,
                                     envelope_sender=self._envelope_sender)

    async def _envelope_sender(self, job: Job, rcpt: RecipientJob) -> str:
        assert self.return_path is not None
        if needs_srs(rcpt.route, job.sender, rcpt.rcpt, self.settings.domains):
            return await self.return_path.rewrite(job.sender)
        return job.sender

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._lock_fd = lock_state_dir(self.settings.state_dir)
        self.return_path = ReturnPath(self.settings.state_dir,
                                      self.settings.effective_srs_domain, self.clock)
        self.directory = await DirectoryReader.open(
            self.settings.directory_path, self.settings.busy_timeout)
        await self.queue.open()
        recovered, held = await self.queue.recover(self.clock.now())
        if recovered or held:
            LOG.warning("queue_recovered", recipients=recovered, held=held)
        front = Front(self.settings, self.directory, self.queue, self.dispatcher.submit,
                      self.clock, self.return_path)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._protocol(front), self.settings.listen.host, self.settings.listen.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="dispatcher"))
        self.dispatcher.wake()
        LOG.info("listening", host=self.settings.listen.host, port=self.port,
                 domains=list(self.settings.domains), version=__version__)

    def _protocol(self, front: Front) -> SMTP:
        limits = self.settings.limits
        return SMTP(
            front,
            hostname=self.settings.hostname,
            ident="forwarder",
            data_size_limit=limits.max_message_size,
            timeout=limits.command_timeout,
            enable_SMTPUTF8=False,
            decode_data=False,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.dispatcher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()
        await self.queue.close()
        if self.directory is not None:
            await self.directory.close()
        if self.return_path is not None:
            await self.return_path.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        LOG.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            LOG.info("stopping")
            await self.stop()


def run(settings: Settings) -> int:
    """Entry point of `forwarder serve`."""
    log.configure(settings.log_format, settings.log_level)
    daemon = Daemon(settings)
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # optional: faster event loop where installed

        runner = uvloop.run
    try:
        runner(daemon.serve_forever())
    except StateLockError as exc:
        LOG.error("start_failed", error=str(exc))
        return 1
    except OSError as exc:
        LOG.error("start_failed", error=f"{exc.strerror or exc}")
        return 1
    return 0
