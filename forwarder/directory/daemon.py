"""`SqliteDaemonDirectory`: the SQLite backend of `DaemonDirectory`.

Reads go through aiosqlite on a query-only connection: RCPT's lookup is one indexed read
(the account joined with its targets), with no cache, so an admin change applies to the
next RCPT. Writes go to `Upkeep` (directory/upkeep.py), on a connection and a thread of
their own, opened on first use: an acceptor process that never consumes a confirm+ message
never opens it. Neither ever blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import aiosqlite

from forwarder.directory.model import Declared, StateChange, TargetResult, TokenUse
from forwarder.directory.schema import connect
from forwarder.directory.secrets import load_token_secrets, token_secrets_path
from forwarder.directory.upkeep import Upkeep
from forwarder.policy import Account, AccountState, Consume
from forwarder.senders import SenderCount
from forwarder.targets import DeadRule, TargetState, TargetView
from forwarder.tokens import Binding

T = TypeVar("T")

# The account and its targets in one read: the accounts primary key, then the targets'
# (address, target) index. A deleted account without targets gives one row of NULLs.
_LOOKUP = ("SELECT a.state, t.target, t.state FROM accounts a"
           " LEFT JOIN targets t ON t.address = a.address"
           " WHERE a.address = ? ORDER BY t.position")


class SqliteDaemonDirectory:
    def __init__(self, path: Path, busy_timeout: float, conn: aiosqlite.Connection,
                 open_upkeep: Callable[[], Upkeep] | None = None) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._conn = conn
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="directory-writer")
        self._upkeep: Upkeep | None = None
        # Where the writes go: this file, or (a node of several) PostgreSQL, while the
        # reads stay on this file, the node's copy (forwarder/directory/replica.py).
        self._open_writer = open_upkeep or (lambda: Upkeep.open(path, busy_timeout))

    @classmethod
    async def open(cls, path: Path, busy_timeout: float,
                   open_upkeep: Callable[[], Upkeep] | None = None) -> SqliteDaemonDirectory:
        connect(path, busy_timeout).close()  # create and migrate before serving
        conn = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
        await conn.execute("PRAGMA query_only=ON")
        return cls(path, busy_timeout, conn, open_upkeep)

    # --- reads ---------------------------------------------------------------------------

    async def lookup(self, address: str) -> Account | None:
        # One hop to aiosqlite's thread (execute, fetch and close there), not three.
        rows = list(await self._conn.execute_fetchall(_LOOKUP, (address,)))
        if not rows:
            return None
        targets = tuple(TargetView(target, TargetState(state))
                        for _, target, state in rows if target is not None)
        return Account(address, AccountState(rows[0][0]), targets)

    async def binding(self, target_id: int) -> Binding | None:
        rows = await self._conn.execute_fetchall(
            "SELECT address, target, declared_at FROM targets WHERE id = ?", (target_id,))
        for address, target, declared_at in rows:
            return Binding(address, target, declared_at)
        return None

    async def watched(self) -> set[str]:
        rows = await self._conn.execute_fetchall(
            "SELECT DISTINCT target FROM targets WHERE failures > 0 OR state = 'failing'")
        return {row[0] for row in rows}

    async def target_counts(self) -> dict[TargetState, int]:
        # A scan of the table (25-40 ms at 50,000 targets): on the writer's thread, not on
        # the connection RCPT's lookups wait for.
        return await self._write(lambda up: up.target_counts())

    def token_secrets(self) -> list[bytes]:
        return load_token_secrets(token_secrets_path(self.path.parent))

    # --- writes, on the writer's thread --------------------------------------------------

    async def _write(self, fn: Callable[[Upkeep], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._run(fn))

    def _run(self, fn: Callable[[Upkeep], T]) -> T:
        if self._upkeep is None:
            self._upkeep = self._open_writer()
        upkeep = self._upkeep
        try:
            return fn(upkeep)
        except Exception:
            # A connection to PostgreSQL that broke is opened again on the next write.
            if getattr(upkeep.conn, "broken", False):
                upkeep.close()
                self._upkeep = None
            raise

    async def consume(self, use: Consume, client: str, sender: str, automatic: bool,
                      now: float) -> TokenUse:
        return await self._write(lambda up: up.consume(use, client, sender, automatic, now))

    async def record(self, results: Sequence[TargetResult],
                     rule: DeadRule) -> list[StateChange]:
        return await self._write(lambda up: up.record(results, rule))

    async def claim_notices(self, limit: int, now: float) -> list[Declared]:
        # Asked every few seconds: a read on the partial index first, so that a directory
        # owing nothing is never locked for writing.
        owed = await self._conn.execute_fetchall(
            "SELECT 1 FROM targets WHERE notice_due <= ? LIMIT 1", (now,))
        if not owed:
            return []
        return await self._write(lambda up: up.claim_notices(limit, now))

    async def notices_sent(self, target_ids: Sequence[int]) -> None:
        await self._write(lambda up: up.notices_sent(target_ids))

    async def record_senders(self, rows: Sequence[SenderCount]) -> None:
        await self._write(lambda up: up.record_senders(rows))

    async def refresh_successes(self, seen: Sequence[tuple[str, str, float]]) -> None:
        await self._write(lambda up: up.refresh_successes(seen))

    async def close(self) -> None:
        def _close() -> None:
            if self._upkeep is not None:
                self._upkeep.close()
                self._upkeep = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)
        await self._conn.close()
