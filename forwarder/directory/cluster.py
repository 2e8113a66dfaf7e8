"""`ClusterDirectory`: the daemon's directory when several nodes share PostgreSQL.

Reads (RCPT's lookup, a token's binding, the watched targets) are the SQLite backend's,
on the node's copy (forwarder/directory/replica.py): no network on RCPT. Writes (tokens
consumed, failures, sender counts, owed notices claimed) go to PostgreSQL through the
same code as on SQLite (forwarder/directory/upkeep.py on a pgconn connection), so every
node sees them, and come back to each copy through the change log.

The main process runs the `Replicator`: LISTEN wakes it on every change, it replays the
change log since its version, and it sweeps every `directory_sweep` seconds besides (a
NOTIFY lost while disconnected costs nothing: the replay catches up). When PostgreSQL is
unreachable it reconnects with backoff, and the copy keeps answering until
`directory_max_staleness` has passed since its last successful sync; after that, lookups
raise `DirectoryStale` and RCPT answers 451 4.3.0: a copy that old vouches for no one,
and never gives a 550 from stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiosqlite
import psycopg

from forwarder import log
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.directory.daemon import SqliteDaemonDirectory
from forwarder.directory.model import DirectoryStale
from forwarder.directory.pgconn import DirectoryUnavailable, connect_kwargs
from forwarder.directory.pgschema import NOTIFY_CHANNEL, open_directory_db
from forwarder.directory.pgstores import PgKeyStore, PgSecrets, ReplicaSecrets
from forwarder.directory.replica import (
    FULL_COPY,
    Batch,
    ReplicaFile,
    ReplicaState,
    chunks,
    fetch,
    prune_log,
    read_secrets,
    replica_path,
    snapshot,
)
from forwarder.directory.upkeep import Upkeep
from forwarder.policy import Account
from forwarder.returnpath import ReturnPath
from forwarder.tokens import Binding

LOG = log.get("forwarder.directory")
T = TypeVar("T")
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 30.0
# How often the main process prunes PostgreSQL's change log (replica.prune_log).
PRUNE_INTERVAL = 3600.0


def _insert(table: str, rows: list[tuple[Any, ...]]) -> Callable[[ReplicaFile], None]:
    return lambda f: f.insert(table, rows)


class Replicator:
    """Keeps the copy current; owns the copy's file (from one thread of its own)."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.path = replica_path(settings.state_dir)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="directory-replica")
        self._file: ReplicaFile | None = None
        self.synced_at: float | None = None
        self.version = 0
        self.connected = False
        self.syncs = 0  # successful syncs so far
        self.pruned_at: float | None = None
        # Called when the secrets changed (a rotation on any node): reload them.
        self.on_secrets: Callable[[], None] | None = None

    async def _in_thread(self, fn: Callable[[ReplicaFile], T]) -> T:
        def run() -> T:
            if self._file is None:
                self._file = ReplicaFile(self.path, self.settings.busy_timeout)
            return fn(self._file)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def load(self) -> ReplicaState:
        state = await self._in_thread(lambda f: f.state())
        self.synced_at, self.version = state.synced_at, state.version
        return state

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        kwargs = connect_kwargs(self.settings.directory_url, self.settings.directory_password)
        conn = await psycopg.AsyncConnection.connect(**kwargs)
        await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return conn

    async def sync(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Replay what the copy lacks; return how many rows changed (0: it was current)."""
        have = await self._in_thread(lambda f: f.state())
        now = self.clock.now()
        async with snapshot(conn):
            batch = await fetch(conn, have)
            if batch.full:
                changed = await self._copy_all(conn, batch, now)
            elif batch.empty:
                changed = 0
                await self._in_thread(lambda f: f.mark_synced(now))
            else:
                changed = len(batch.accounts) + len(batch.targets) + 1
                await self._in_thread(lambda f: f.apply(batch, now))
                LOG.info("directory_synced", version=batch.version, full=False,
                         accounts=len(batch.accounts) + len(batch.gone_accounts),
                         targets=len(batch.changed_targets))
        if batch.secrets is not None and self.on_secrets is not None:
            self.on_secrets()
        was_stale = self.synced_at is not None and self.stale()
        self.synced_at, self.version = now, batch.version
        self.syncs += 1
        if was_stale:
            LOG.warning("directory_fresh_again", version=batch.version)
        return changed

    async def _copy_all(self, conn: psycopg.AsyncConnection[Any], batch: Batch,
                        now: float) -> int:
        """The whole directory into the copy, streamed (forwarder/directory/replica.py),
        in one SQLite transaction: all of it or, cut short, none of it."""
        counts = dict.fromkeys(FULL_COPY, 0)
        await self._in_thread(lambda f: f.begin_full())
        try:
            for table in FULL_COPY:
                # Closed here, whatever happens: its cursor goes before the snapshot ends.
                async with contextlib.aclosing(chunks(conn, table)) as table_rows:
                    async for rows in table_rows:
                        await self._in_thread(_insert(table, rows))
                        counts[table] += len(rows)
            await self._in_thread(lambda f: f.finish_full(batch, now))
        except BaseException:
            # The same thread, after whatever it was running: the old copy stays whole.
            await asyncio.shield(self._in_thread(lambda f: f.abort()))
            raise
        LOG.info("directory_synced", version=batch.version, full=True,
                 accounts=counts["accounts"], targets=counts["targets"])
        return sum(counts.values()) + 1

    def staleness(self) -> float:
        if self.synced_at is None:
            return float("inf")
        return max(0.0, self.clock.now() - self.synced_at)

    def stale(self) -> bool:
        return self.staleness() > self.settings.directory_max_staleness

    async def run(self) -> None:
        """Forever: connect, replay, wait for a NOTIFY or the sweep; reconnect with
        backoff when PostgreSQL goes away."""
        delay = BACKOFF_FIRST
        cap = min(BACKOFF_MAX, self.settings.directory_sweep)
        while True:
            syncs = self.syncs
            try:
                conn = await self.connect()
            except (psycopg.Error, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
                continue
            try:
                if not self.connected:
                    LOG.info("directory_connected", version=self.version)
                self.connected = True
                await self._follow(conn)
            except Exception as exc:  # the copy unwritable too: keep trying, never die
                self._lost(exc)
            finally:
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.close()
            # Back off unless this connection got somewhere (a sync that keeps failing
            # with PostgreSQL up must not reconnect five times a second).
            if self.syncs == syncs:
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
            else:
                delay = BACKOFF_FIRST

    async def prune_due(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Once every PRUNE_INTERVAL: PostgreSQL's change log past its retention goes
        (`directory_log_retention`; docs/cluster.md). A failure waits for the next time."""
        now = self.clock.now()
        if self.pruned_at is not None and now - self.pruned_at < PRUNE_INTERVAL:
            return
        self.pruned_at = now
        try:
            rows = await prune_log(conn, self.settings.directory_log_retention)
        except psycopg.Error as exc:
            LOG.error("directory_log_prune_failed", error=type(exc).__name__)
            return
        if rows:
            LOG.info("directory_log_pruned", rows=rows,
                     retention=self.settings.directory_log_retention)

    async def _follow(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            await self.sync(conn)
            await self.prune_due(conn)
            # A NOTIFY that came during the sync is kept by psycopg and ends this wait at
            # once; several changes in a burst are replayed together.
            async for _ in conn.notifies(timeout=self.settings.directory_sweep,
                                         stop_after=1):
                pass

    def _lost(self, exc: BaseException) -> None:
        if self.connected:
            LOG.error("directory_disconnected", error=type(exc).__name__,
                      detail=str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        self.connected = False
        if self.stale():
            LOG.error("directory_stale", staleness=round(self.staleness(), 1),
                      max_staleness=self.settings.directory_max_staleness)

    async def close(self) -> None:
        def _close() -> None:
            if self._file is not None:
                self._file.close()
                self._file = None

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)


def _prepare(settings: Settings) -> None:
    """Migrate PostgreSQL and make sure both kinds of secrets exist there (the first node
    or admin command to start creates them; every node copies them)."""
    conn = open_directory_db(settings.directory_url, settings.directory_password)
    try:
        for kind in ("srs", "token"):
            PgSecrets(conn, kind).ensure()
    finally:
        conn.close()


class ClusterDirectory(SqliteDaemonDirectory):
    """The DaemonDirectory of a node of several (see the module's docstring)."""

    replicator: Replicator | None = None
    clock: Clock
    max_staleness: float
    _synced_at: float | None = None
    _secrets_version: str | None = None
    _task: asyncio.Task[None] | None = None
    # Called when the secrets changed (a rotation on any node): in the main process by the
    # replicator, in an acceptor process by its watch of the copy.
    on_secrets: Callable[[], None] | None = None

    @classmethod
    async def open_cluster(cls, settings: Settings, clock: Clock,
                           replicate: bool) -> ClusterDirectory:
        """`replicate`: this is the main process, which keeps the copy current (an
        acceptor process only reads it)."""
        path = replica_path(settings.state_dir)
        replicator = Replicator(settings, clock) if replicate else None
        if replicator is not None:
            await _first_sync(settings, replicator)

        def open_upkeep() -> Upkeep:
            return Upkeep(open_directory_db(settings.directory_url,
                                            settings.directory_password))

        conn = await aiosqlite.connect(path, timeout=settings.busy_timeout,
                                       isolation_level=None)
        await conn.execute("PRAGMA query_only=ON")
        self = cls(path, settings.busy_timeout, conn, open_upkeep)
        self.clock, self.max_staleness = clock, settings.directory_max_staleness
        self.replicator = replicator
        if replicator is not None:
            replicator.on_secrets = self._secrets_changed
            self._task = asyncio.create_task(replicator.run(), name="directory-replica")
        else:
            await self._read_meta()
            self._task = asyncio.create_task(self._watch(), name="directory-watch")
        return self

    def _secrets_changed(self) -> None:
        if self.on_secrets is None:
            return
        try:
            self.on_secrets()
        except (OSError, ValueError) as exc:
            LOG.error("secrets_reload_failed", error=str(exc))
            return
        LOG.info("secrets_reloaded", source="directory")

    async def _read_meta(self) -> None:
        found = await self._conn.execute_fetchall(
            "SELECT name, value FROM replica_meta WHERE name IN"
            " ('synced_at', 'secrets_version')")
        rows: dict[str, str] = {str(name): str(value) for name, value in found}
        synced = rows.get("synced_at")
        self._synced_at = None if synced is None else float(synced)
        version = rows.get("secrets_version")
        if self._secrets_version is not None and version != self._secrets_version:
            self._secrets_changed()
        self._secrets_version = version or ""

    async def _watch(self) -> None:
        """An acceptor process: the main process records each sync in the copy; read it
        every second (staleness, and secrets rotated meanwhile)."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self._read_meta()

    def staleness(self) -> float:
        if self.replicator is not None:
            return self.replicator.staleness()
        if self._synced_at is None:
            return float("inf")
        return max(0.0, self.clock.now() - self._synced_at)

    def _vouch(self) -> None:
        staleness = self.staleness()
        if staleness > self.max_staleness:
            raise DirectoryStale(f"directory copy not synchronised for {staleness:.0f} s "
                                 f"(directory_max_staleness {self.max_staleness:.0f} s)")

    async def lookup(self, address: str) -> Account | None:
        self._vouch()
        return await super().lookup(address)

    async def binding(self, target_id: int) -> Binding | None:
        self._vouch()
        return await super().binding(target_id)

    def token_secrets(self) -> list[bytes]:
        return read_secrets(self.path, "token", self.busy_timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.replicator is not None:
            await self.replicator.close()
        await super().close()


async def _first_sync(settings: Settings, replicator: Replicator) -> None:
    """Before serving: migrate, create the secrets, bring the copy up to date. Without
    PostgreSQL, a node whose copy was synchronised before starts on it (and goes stale in
    due course); one that never was cannot vouch for anything and does not start."""
    state = await replicator.load()
    try:
        await asyncio.to_thread(_prepare, settings)
        conn = await replicator.connect()
        try:
            await replicator.sync(conn)
        finally:
            await conn.close()
    except (psycopg.Error, OSError) as exc:
        if state.synced_at is None:
            raise DirectoryUnavailable(
                f"PostgreSQL directory unreachable and this node has no copy of it yet: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from exc
        LOG.error("directory_unavailable_at_start", error=type(exc).__name__,
                  version=state.version)


async def open_daemon_directory(
    settings: Settings, clock: Clock, acceptor: bool,
) -> tuple[SqliteDaemonDirectory, ReturnPath, ClusterDirectory | None]:
    """The daemon's directory and SRS stores: the embedded SQLite directory and the state
    directory's files, or (several nodes) this node's copy of the PostgreSQL directory with
    the SRS secrets copied there and the long-sender keys in PostgreSQL."""
    s = settings
    if not s.directory_url:
        directory = await SqliteDaemonDirectory.open(s.directory_path, s.busy_timeout)
        return directory, ReturnPath(s.state_dir, s.effective_srs_domain, clock), None
    cluster = await ClusterDirectory.open_cluster(s, clock, replicate=not acceptor)
    return_path = ReturnPath(s.state_dir, s.effective_srs_domain, clock,
                             secrets=ReplicaSecrets(cluster.path, "srs"),
                             keys=PgKeyStore(s.directory_url, s.directory_password,
                                             cluster.path))
    return cluster, return_path, cluster
