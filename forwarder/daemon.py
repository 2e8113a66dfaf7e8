"""Builds every component, owns every task, handles signals and shutdown.

Start-up order matters to systemd (`Type=notify`): READY=1 is sent only once the listener
is bound, the databases are open and the queue recovered. SIGHUP reloads the configuration
file and the SRS secrets in place (an invalid file is refused and the old settings stay);
SIGTERM stops accepting, lets transactions in flight finish within `stop_timeout`, stops
delivery (an interrupted attempt is simply retried after restart) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP

from forwarder import __version__, log
from forwarder.clock import Clock, SystemClock
from forwarder.config import ConfigError, Settings
from forwarder.connections import Connections, load_tls_context
from forwarder.delivery import Dispatcher, MailRouter, Router
from forwarder.directory import DirectoryReader
from forwarder.dns import CachingResolver, MxRouter
from forwarder.front import Front
from forwarder.metrics import Metrics, MetricsServer, start_metrics_server
from forwarder.policy import needs_srs
from forwarder.queue import Job, Queue, RecipientJob
from forwarder.returnpath import ReturnPath
from forwarder.smtp import ForwarderSMTP
from forwarder.smtpclient import ConnectionPool, Sender
from forwarder.systemd import Notifier, watchdog_interval, watchdog_loop

LOG = log.get("forwarder.daemon")
STATUS_INTERVAL = 5.0


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
        self,
        settings: Settings,
        clock: Clock | None = None,
        router: Router | None = None,
        reload_settings: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self._fixed_router = router
        self.router = router or self._router(settings)
        self.reload_settings = reload_settings
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics()
        self.port = 0
        self._lock_fd: int | None = None
        self._server: asyncio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.queue = Queue(settings.queue_path, settings.busy_timeout)
        # Issue 7: live sessions (caps, shutdown notice) and the STARTTLS context.
        self.connections = Connections()
        self.directory: DirectoryReader | None = None
        self.return_path: ReturnPath | None = None
        self.front: Front | None = None
        self.pool = ConnectionPool(settings.delivery, settings.hostname)
        self.dispatcher = Dispatcher(settings, self.queue, self.router,
                                     Sender(settings.delivery, self.pool), self.clock,
                                     self.metrics,
                                     envelope_sender=self._envelope_sender)

    def _router(self, settings: Settings) -> MailRouter:
        return MailRouter(settings.mailbox_host, settings.smarthost, self._mx_router(settings))

    def _mx_router(self, settings: Settings) -> MxRouter | None:
        servers = settings.dns_servers
        try:
            if servers:
                resolver = CachingResolver([s.host for s in servers], port=servers[0].port,
                                           now=self.clock.now)
            else:
                resolver = CachingResolver(use_system_config=True, now=self.clock.now)
        except Exception as exc:  # no /etc/resolv.conf: MX delivery deferred, not fatal
            LOG.error("dns_unavailable", error=str(exc))
            return None
        return MxRouter(resolver, port=settings.delivery.mx_port)

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

    # --- start ------------------------------------------------------------------------

    async def start(self) -> None:
        self._lock_fd = lock_state_dir(self.settings.state_dir)
        self.return_path = ReturnPath(self.settings.state_dir,
                                      self.settings.effective_srs_domain, self.clock)
        self.directory = await DirectoryReader.open(
            self.settings.directory_path, self.settings.busy_timeout)
        self.connections.tls_context = load_tls_context(self.settings.tls_cert,
                                                        self.settings.tls_key)
        await self.queue.open()
        recovered, held = await self.queue.recover(self.clock.now())
        if recovered or held:
            LOG.warning("queue_recovered", recipients=recovered, held=held)
        self.front = Front(self.settings, self.directory, self.queue, self.dispatcher.submit,
                           self.clock, self.return_path, self.metrics)
        front = self.front
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._protocol(front), self.settings.listen.host, self.settings.listen.port)
        self.port = self._server.sockets[0].getsockname()[1]
        await self._start_metrics()
        self._spawn(self.dispatcher.run(), "dispatcher")
        self._spawn(self._status_loop(), "status")
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self._spawn(watchdog_loop(self.notifier, interval), "watchdog")
        self.dispatcher.wake()
        LOG.info("listening", host=self.settings.listen.host, port=self.port,
                 domains=list(self.settings.domains), version=__version__)
        self.notifier.ready(f"listening on {self.settings.listen.host}:{self.port}")

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _start_metrics(self) -> None:
        where = self.settings.metrics_listen
        if where is not None:
            self._metrics_server = await start_metrics_server(self.metrics, where.host,
                                                              where.port)
            LOG.info("metrics_listening", host=where.host, port=self._metrics_server.port)

    def _protocol(self, front: Front) -> SMTP:
        # Issue 7: aiosmtpd's SMTP made strict (limits, smuggling, caps): forwarder/smtp.py.
        return ForwarderSMTP(front, self.settings, self.connections)

    async def _status_loop(self) -> None:
        """Queue depth for metrics and for `systemctl status` (STATUS=)."""
        while True:
            with contextlib.suppress(Exception):
                await self.refresh_status()
            await asyncio.sleep(STATUS_INTERVAL)

    async def refresh_status(self) -> None:
        stats = await self.queue.stats()
        depth: dict[str, int] = dict(stats["recipients"])
        depth["in_flight"] = len(self.dispatcher.in_flight)
        oldest = stats["oldest"]
        age = None if oldest is None else max(0.0, self.clock.now() - oldest)
        self.metrics.queue_snapshot(depth, age)
        self.notifier.status(
            f"queue: {stats['messages']} messages, {sum(stats['recipients'].values())} "
            f"recipients, {len(self.dispatcher.in_flight)} in delivery")

    # --- reload -----------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration file and the SRS secrets, keep sessions open."""
        if self.reload_settings is None:
            return False
        self.notifier.reloading()
        try:
            new = self.reload_settings()
            assert self.return_path is not None
            self.return_path.reload(new.effective_srs_domain)
        except (ConfigError, OSError, ValueError) as exc:
            LOG.error("reload_refused", error=str(exc))
            self.notifier.ready("reload refused: configuration invalid, old one kept")
            return False
        if (new.listen, new.state_dir) != (self.settings.listen, self.settings.state_dir):
            LOG.warning("reload_partial", detail="listen and state_dir need a restart")
            new = dataclasses.replace(new, listen=self.settings.listen,
                                      state_dir=self.settings.state_dir)
        self._apply(new)
        LOG.info("reloaded", domains=list(new.domains))
        self.notifier.ready("reloaded")
        return True

    def _apply(self, new: Settings) -> None:
        self.settings = new
        if self._fixed_router is None:
            self.router = self._router(new)
            self.dispatcher.router = self.router
        self.dispatcher.settings = new
        if self.front is not None:
            self.front.settings = new

    # --- stop -------------------------------------------------------------------------

    async def stop(self) -> None:
        self.notifier.stopping()
        if self._server is not None:
            self._server.close()
            # Issue 7: 421 to idle sessions, transactions in flight finish (bounded).
            await self.connections.shutdown(self.settings.stop_timeout)
        interrupted = await self.dispatcher.stop(grace=min(5.0, self.settings.stop_timeout))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.release_leases(interrupted, self.clock.now())
        await self.pool.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
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
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            LOG.info("stopping")
            await self.stop()


def run(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> int:
    """Entry point of `forwarder serve`."""
    log.configure(settings.log_format, settings.log_level)
    daemon = Daemon(settings, reload_settings=reload_settings, notifier=Notifier())
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
