"""What the running daemon does besides serving and delivering: its periodic work (the
queue's status, the hourly purges and spool sweep, the disk space check, the sender
counts) and a reload of its configuration on SIGHUP. Functions of the `Daemon`
(forwarder/daemon.py), which starts the loops and calls `reload`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import ssl
from typing import TYPE_CHECKING

from forwarder import log
from forwarder.addresses import parse_networks
from forwarder.config import ConfigError, Settings
from forwarder.daemonparts import check_space, mail_router, make_resolver, sweep_spool

if TYPE_CHECKING:
    from forwarder.daemon import Daemon

LOG = log.get("forwarder.daemon")
STATUS_INTERVAL = 5.0
PURGE_INTERVAL = 3600.0


async def status_loop(d: Daemon) -> None:
    """Queue depth for metrics and for `systemctl status` (STATUS=); once an hour, the
    long-sender keys whose SRS addresses have expired are forgotten and the delivery
    history past its retention is deleted."""
    purged_at = -PURGE_INTERVAL
    while True:
        with contextlib.suppress(Exception):
            await d.refresh_status()
        d.status.tick()
        if d.clock.now() - purged_at >= PURGE_INTERVAL and d.return_path is not None:
            purged_at = d.clock.now()
            with contextlib.suppress(Exception):
                await d.return_path.purge_expired()
            with contextlib.suppress(Exception):
                await d.history.purge_expired()
            await sweep_spool(d.queue)
        await asyncio.sleep(STATUS_INTERVAL)


async def space_loop(d: Daemon, acceptor: bool) -> None:
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        with contextlib.suppress(OSError):
            await check_space(d.queue, d.front, acceptor)


async def report_loop(d: Daemon) -> None:
    while True:
        await asyncio.sleep(d.settings.checks.report_interval)
        await d.flush_senders()


def reload(d: Daemon) -> bool:
    """SIGHUP: re-read the configuration file and the SRS secrets, keep sessions open."""
    if d.reload_settings is None:
        return False
    d.notifier.reloading()
    d.group.signal_acceptors(signal.SIGHUP)  # they re-read the same file
    try:
        new = d.reload_settings()
        assert d.return_path is not None
        d.return_path.reload(new.effective_srs_domain)
        if d.front is not None:
            d.front.reload_token_secrets()
        d.connections.reload_tls(new)
    except (ConfigError, OSError, ValueError, ssl.SSLError) as exc:
        LOG.error("reload_refused", error=str(exc))
        d.notifier.ready("reload refused: configuration invalid, old one kept")
        return False
    if (new.listen, new.state_dir) != (d.settings.listen, d.settings.state_dir):
        LOG.warning("reload_partial", detail="listen and state_dir need a restart")
        new = dataclasses.replace(new, listen=d.settings.listen,
                                  state_dir=d.settings.state_dir)
    if new.listen_backlog != d.settings.listen_backlog and d.listener is not None:
        # listen() on a listening socket sets its backlog (Linux), for every process
        # that shares it.
        d.listener.listen(new.listen_backlog)
    apply_settings(d, new)
    d.targets.reload(new)
    LOG.info("reloaded", domains=list(new.domains))
    d.notifier.ready("reloaded")
    return True


def apply_settings(d: Daemon, new: Settings) -> None:
    d.settings = new
    d.error_ledger.exempt = parse_networks(new.error_limit_exempt + new.xforward_hosts)
    if d.fixed_router is None:
        d.resolver = make_resolver(new, d.clock)
        d.router = mail_router(new, d.resolver)
    if d.mta_sts is not None and d.resolver is not None:
        d.mta_sts.resolver = d.resolver
    d.dispatcher.set_router(d.router, new)
    d.pool.configure(new)
    d.checks.apply(new, d.resolver)
    d.history.settings = new.history
    if d.front is not None:
        d.front.settings = new
