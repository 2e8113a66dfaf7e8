"""Builds every component, owns every task, handles signals and shutdown.

Start-up order matters to systemd (`Type=notify`): READY=1 is sent only once the listener
is bound, the databases are open and the queue recovered. SIGHUP reloads the configuration
file and the SRS secrets in place (an invalid file is refused and the old settings stay);
SIGTERM stops accepting, lets transactions in flight finish within `stop_timeout`, stops
delivery (an interrupted attempt is simply retried after restart) and exits 0.

Its parts live beside it: daemonparts.py (start-up errors, the state lock, resolver and
router, the disk space check, the queue's recovery), daemonupkeep.py (the periodic loops
and the reload itself) and workers.py (`ProcessGroup`: the listening socket, the acceptors
or the link to the main process, the caps table they share).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from forwarder import __version__, log, sendtest
from forwarder.accepting import Accepting
from forwarder.checks import Checks
from forwarder.clock import Clock, SystemClock
from forwarder.config import HostPort, Settings
from forwarder.connections import Connections, load_tls_context
from forwarder.control import STATUS_SOCKET, StatusService
from forwarder.daemonparts import (
    StateLockError,
    check_space,
    lock_state_dir,
    mail_router,
    make_resolver,
    recover_queue,
    start_error,
    sweep_spool,
    tune_gc,
    tune_malloc,
)
from forwarder.daemonupkeep import reload as reload_daemon
from forwarder.daemonupkeep import report_loop, space_loop, status_loop
from forwarder.delivery import Dispatcher, Router
from forwarder.directory import SqliteDaemonDirectory
from forwarder.directory.cluster import open_daemon_directory
from forwarder.dns import CachingResolver
from forwarder.faults import FAULT_FILE, FaultRecord
from forwarder.front import Accepted, Front
from forwarder.history.recorder import HistoryRecorder
from forwarder.metrics import Metrics
from forwarder.metricsserver import MetricsServer, start_metrics_server
from forwarder.mtasts import MtaSts
from forwarder.policy import needs_srs
from forwarder.queue import DirectIntake, Intake, Job, Queue, RecipientJob, ScannerIntake
from forwarder.returnpath import ReturnPath
from forwarder.senders import SenderTally
from forwarder.smtpclient import ConnectionPool, Sender
from forwarder.smtpserver import SmtpProtocol
from forwarder.systemd import Notifier, watchdog_interval, watchdog_loop
from forwarder.targetupkeep import TargetUpkeep
from forwarder.tarpit import ErrorLedger
from forwarder.workers import Inherited, ProcessGroup, StartError, listen_error

LOG = log.get("forwarder.daemon")


class Daemon:
    """The running forwarder. `async with Daemon(settings) as d:` serves on `d.port`."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock | None = None,
        router: Router | None = None,
        reload_settings: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        acceptor_argv: Sequence[str] | None = None,
        inherited: Inherited | None = None,
    ) -> None:
        self.settings = settings
        # The processes that accept and their socket (argv to start them, or inherited fds).
        self.group = ProcessGroup(settings.acceptor_count, acceptor_argv, inherited)
        self.listener: socket.socket | None = None
        self.clock = clock or SystemClock()
        self.fixed_router = router
        # One resolver (and cache) for MX routing, MTA-STS and the inbound checks.
        self.resolver = make_resolver(settings, self.clock)
        self.router = router or mail_router(settings, self.resolver)
        self.reload_settings = reload_settings
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics()
        self.port = 0
        self._lock_fd: int | None = None
        self.accepting: Accepting | None = None
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._stopped = False
        self.queue = Queue(settings.queue_path, settings.busy_timeout,
                           reserve=settings.limits.disk_reserve)
        # The main process's fatal faults, for crash blame at the next start; armed only
        # by `forwarder serve` (run()), not in a process that embeds the daemon.
        self.faults = FaultRecord(settings.state_dir / FAULT_FILE)
        self.record_faults = False
        # Live sessions and STARTTLS; caps counted across processes (sharedcounts.py).
        self.connections = Connections(metrics=self.metrics, counts=self.group.counts)
        # Errors per client for the tarpit; a trusted XFORWARD gateway's are its clients'.
        self.error_ledger = ErrorLedger(self.clock.now,
                                        settings.error_limit_exempt + settings.xforward_hosts)
        self.directory: SqliteDaemonDirectory | None = None
        self.return_path: ReturnPath | None = None
        self.front: Front | None = None
        self.senders = SenderTally(self.clock.now)
        self.checks = Checks(settings, self.resolver, self.metrics, self.senders,
                             self.clock.now)
        self._build_delivery(settings)
        # `forwarder status` (forwarder/control.py); only the main process listens.
        self.status = StatusService(settings.state_dir / STATUS_SOCKET, self.metrics,
                                    self.clock, lambda: describe(self), self.refresh_status)

    def _build_delivery(self, settings: Settings) -> None:
        """The delivery side: sessions out, MTA-STS, the history, the dispatcher, and the
        targets' upkeep that watches its outcomes."""
        self.pool = ConnectionPool(settings, self.metrics)
        self.mta_sts = _mta_sts(settings, self.resolver, self.clock)
        # The delivery history per address, in the queue's file (forwarder/history/).
        self.history = HistoryRecorder(settings.history, self.queue, self.clock, self.metrics)
        self.dispatcher = Dispatcher(settings, self.queue, self.router,
                                     Sender(settings.delivery, self.pool, self.metrics),
                                     self.clock, self.metrics,
                                     envelope_sender=self._envelope_sender,
                                     mta_sts=self.mta_sts, history=self.history)
        self.targets = TargetUpkeep(settings, self.queue, self.dispatcher, self.clock, self.metrics)

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
        acceptor = self.group.is_acceptor
        if not acceptor:  # the main process owns the state directory and the leases
            self._lock_fd = lock_state_dir(self.settings.state_dir)
        # Bound by the main process (a busy address fails here, before anything else is
        # opened) or handed to an acceptor.
        self.listener = self.group.listener(self.settings.listen)
        if not acceptor:
            # Room for opening the databases and recovering the queue on a full disk (the
            # reserve is remade once started, or as soon as there is space again:
            # forwarder/queue/reserve.py).
            await asyncio.to_thread(self.queue.reserve.release)
        await self._open_directory(acceptor)
        try:
            self.connections.tls_context = load_tls_context(self.settings.tls_cert,
                                                            self.settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StartError(f"TLS certificate {self.settings.tls_cert} or key "
                              f"{self.settings.tls_key}: {reason}") from exc
        if not acceptor:  # the key of send-test's mark, checked where mail is delivered
            self.history.test_key = sendtest.ensure_key(self.settings.state_dir)
        await self.queue.open()
        if not acceptor:
            await recover_queue(self.queue, self.faults, self.clock.now(), self.record_faults)
            await sweep_spool(self.queue)
        await self._listen(acceptor)
        await check_space(self.queue, self.front, acceptor)
        self._spawn(space_loop(self, acceptor), "space")
        # Every process counts the sender domains its checks saw and adds them up in the
        # directory now and then.
        self._spawn(report_loop(self), "senders")
        if acceptor:
            link = self.group.join_main(on_lost=self.request_stop)
            self._spawn(link.report_loop(self.metrics), "report")
            return
        await self._start_main()

    async def _start_main(self) -> None:
        """What only the main process runs once it listens: metrics, the targets' upkeep,
        delivery, the status loop and watchdog, the acceptors, and READY to systemd."""
        await self._start_metrics()
        assert self.directory is not None and self.listener is not None
        assert self.accepting is not None
        await self.targets.start(self.directory)
        self._spawn(self.dispatcher.run(), "dispatcher")
        self._spawn(status_loop(self), "status")
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self._spawn(watchdog_loop(self.notifier, interval), "watchdog")
        self.dispatcher.wake()
        await self.group.start_acceptors(self.listener, self.dispatcher.wake, self.metrics,
                                         self.settings.stop_timeout,
                                         self.accepting.acceptors_serving)
        await self.status.start()
        LOG.info("listening", host=self.settings.listen.host, port=self.port,
                 domains=list(self.settings.domains), version=__version__,
                 acceptors=self.group.size - 1)
        log.flush()  # the "listening" line is in the journal before systemd hears READY
        self.notifier.ready(f"listening on {self.settings.listen.host}:{self.port}")

    async def _open_directory(self, acceptor: bool) -> None:
        """The embedded SQLite directory, or this node's copy of the PostgreSQL one."""
        self.directory, self.return_path, cluster = await open_daemon_directory(
            self.settings, self.clock, acceptor)
        if cluster is not None:
            self.metrics.directory_staleness(lambda: min(cluster.staleness(), 1e9))
            cluster.on_secrets = self._reload_secrets

    def _reload_secrets(self, domain: str | None = None) -> None:
        """The SRS and token secrets, read again: on SIGHUP, and on a node of several when
        a rotation made on any node has been copied here (raises OSError, ValueError)."""
        assert self.return_path is not None
        self.return_path.reload(domain or self.settings.effective_srs_domain)
        if self.front is not None:
            self.front.reload_token_secrets()

    async def _listen(self, acceptor: bool) -> None:
        """Serve SMTP on the socket bound at start (or, in an acceptor, inherited)."""
        # The main process delivers what it accepts; an acceptor leaves it to the main
        # process's scanner (forwarder/queue/intake.py).
        journal = self.history.journal
        intake: Intake = (ScannerIntake(self.queue, self.group.wake_main, journal) if acceptor
                          else DirectIntake(self.queue, self.dispatcher.submit, journal))
        assert self.directory is not None and self.return_path is not None
        self.front = Front(self.settings, self.directory, intake, self.clock,
                           self.return_path, self.metrics, checks=self.checks,
                           spool=self.queue.spool, history=self.history)
        assert self.listener is not None
        front = self.front
        self.accepting = Accepting(self.listener, self.settings.listen_backlog,
                                   lambda: self._protocol(front), shared=self.group.size > 1)
        await self.accepting.start()
        self.port = self.listener.getsockname()[1]

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _start_metrics(self) -> None:
        where = self.settings.metrics_listen
        if where is not None:
            try:
                self._metrics_server = await start_metrics_server(self.metrics, where.host,
                                                                  where.port)
            except OSError as exc:
                raise listen_error(f"serve metrics on {where}", exc,
                                   "another program listens there") from None
            LOG.info("metrics_listening", host=where.host, port=self._metrics_server.port)

    def _protocol(self, front: Front) -> SmtpProtocol[Accepted]:
        return SmtpProtocol(front, self.settings, self.connections, self.error_ledger,
                            self.queue.spool.open_incoming)

    async def refresh_status(self) -> None:
        stats = await self.queue.stats()
        depth: dict[str, int] = dict(stats["recipients"])
        depth["in_flight"] = len(self.dispatcher.in_flight)
        oldest = stats["oldest"]
        age = None if oldest is None else max(0.0, self.clock.now() - oldest)
        self.metrics.queue_snapshot(depth, age)
        self.notifier.status(
            f"{self.metrics.all_open_sessions} SMTP sessions; queue: {stats['messages']} "
            f"messages, {sum(stats['recipients'].values())} recipients, "
            f"{len(self.dispatcher.in_flight)} in delivery")

    async def flush_senders(self) -> int:
        """Add the sender counts gathered since the last flush to the directory."""
        assert self.directory is not None
        return await self.senders.flush(self.directory.record_senders)

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration file and the SRS secrets, keep sessions open."""
        return reload_daemon(self)

    # --- stop -------------------------------------------------------------------------

    async def stop(self, quiet: bool = False) -> None:
        """Stop everything that was started (also after a failed start: every thread and
        the state lock are released, or the process could not exit). Once."""
        if self._stopped:
            return
        self._stopped = True
        if not quiet:
            self.notifier.stopping()
        if self.accepting is not None:
            self.accepting.close()
        if self.listener is not None:
            self.listener.close()
        # 421 to idle sessions; transactions in flight finish (bounded), here and in each
        # acceptor process at the same time.
        await asyncio.gather(
            self.connections.shutdown(self.settings.stop_timeout),
            self.group.stop_acceptors())
        interrupted = await self.dispatcher.stop(grace=min(5.0, self.settings.stop_timeout))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.targets.stop()
        await self.queue.release_leases(interrupted, self.clock.now())
        await self.pool.close()
        if self.mta_sts is not None:
            await self.mta_sts.close()
        await self.checks.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        await self.status.close()
        await self.queue.close()
        if self.directory is not None:
            await self.flush_senders()
            await self.directory.close()
        if self.return_path is not None:
            await self.return_path.close()
        self.group.close(self.metrics)  # the acceptors are gone
        self.faults.disarm()  # a clean stop: no fault to report
        self._unlock()
        if not quiet:
            LOG.info("stopped")
        log.flush()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except StateLockError:
            raise  # nothing was opened
        except Exception as exc:
            await self.stop(quiet=True)
            if isinstance(exc, StartError):
                raise
            raise StartError(start_error(exc, self.settings)) from exc
        try:
            await self._stop.wait()
        finally:
            LOG.info("stopping")
            await self.stop()


def describe(daemon: Daemon) -> dict[str, Any]:
    """What the status document says about the process itself (forwarder/control.py)."""
    served = daemon._metrics_server
    acceptors = daemon.group.acceptor_pids()
    return {
        "state": "stopping" if daemon._stop.is_set() else "running",
        "listening": {
            "smtp": [str(HostPort(daemon.settings.listen.host, daemon.port))],
            "metrics": None if served is None else str(HostPort(served.host, served.port))},
        "acceptors": acceptors,
    }


def run(
    settings: Settings,
    reload_settings: Callable[[], Settings] | None = None,
    acceptor_argv: Sequence[str] | None = None,
    inherited: Inherited | None = None,
) -> int:
    """Entry point of `forwarder serve` (and of the acceptor processes it starts)."""
    log.configure(settings.log_format, settings.log_level)
    try:  # an acceptor first arms its death with the main process, then gets the socket
        inherited = None if inherited is None else inherited.joined()
    except StartError as exc:
        LOG.error("start_failed", error=str(exc))
        return 1
    # Only the main process speaks to systemd (NotifyAccess=main).
    notifier = Notifier({}) if inherited is not None else Notifier()
    daemon = Daemon(settings, reload_settings=reload_settings, notifier=notifier,
                    acceptor_argv=None if inherited is not None else acceptor_argv,
                    inherited=inherited)
    daemon.record_faults = inherited is None
    tune_gc()
    tune_malloc()
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # optional: faster event loop where installed

        runner = uvloop.run
    try:
        runner(daemon.serve_forever())
    except (StateLockError, StartError) as exc:
        LOG.error("start_failed", error=str(exc))
        return 1
    finally:
        log.flush()
    return 0


def _mta_sts(settings: Settings, resolver: CachingResolver | None,
             clock: Clock) -> MtaSts | None:
    """MTA-STS applies to delivery by MX (RFC 8461), with the daemon's resolver."""
    if not settings.mta_sts or resolver is None:
        return None
    d = settings.delivery
    return MtaSts(resolver, clock.now, port=d.mta_sts_port, timeout=d.mta_sts_timeout,
                  ca_file=str(settings.tls_ca_file) if settings.tls_ca_file else None)
