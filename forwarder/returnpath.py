"""The daemon's side of SRS: rewrite senders of forwarded mail, verify bounces coming back.

`srs.py` is pure; this module adds what needs I/O: the secrets file (created 0600 at first
start, reloaded on SIGHUP) and the key store for senders too long for an SRS0 local part
(postsrsd issue #108), which lives in its own SQLite file and is used from one thread.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from forwarder.clock import Clock
from forwarder.srs import (
    KeyRef,
    Srs,
    SrsError,
    SrsKeyStore,
    SrsReason,
    SrsTooLong,
    ensure_secrets,
    load_secrets,
)

SECRETS_FILE = "srs-secrets"
KEYS_FILE = "srs-keys.sqlite3"
MAX_AGE_DAYS = 21


def secrets_path(state_dir: Path) -> Path:
    return state_dir / SECRETS_FILE


def load_srs(state_dir: Path, domain: str, clock: Clock) -> Srs:
    """Create the secrets file if missing (mode 0600), then build the signer/verifier."""
    path = secrets_path(state_dir)
    ensure_secrets(path)
    return Srs(load_secrets(path), domain, clock.now, max_age_days=MAX_AGE_DAYS)


class ReturnPath:
    def __init__(self, state_dir: Path, domain: str, clock: Clock) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.srs = load_srs(state_dir, domain, clock)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="srs-keys")
        self._store: SrsKeyStore | None = None

    def reload(self, domain: str) -> None:
        """SIGHUP: re-read the secrets (a rotation done with `forwarder srs rotate`)."""
        self.srs = load_srs(self.state_dir, domain, self.clock)

    @property
    def domain(self) -> str:
        return self.srs.domain

    def _keys(self) -> SrsKeyStore:
        if self._store is None:
            self._store = SrsKeyStore(self.state_dir / KEYS_FILE)
        return self._store

    async def _in_thread(self, fn: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)  # type: ignore[arg-type]

    async def rewrite(self, sender: str) -> str:
        """The envelope sender for a copy forwarded out of our domains."""
        try:
            return self.srs.forward(sender)
        except SrsTooLong:
            now = self.clock.now()
            key = await self._in_thread(lambda: self._keys().put(sender, now))
            return self.srs.forward_with_key(str(key))
        except SrsError:
            # A sender we cannot wrap (no domain): forwarding it unchanged is what a
            # plain forwarder would do; SPF may fail, but the mail is not lost.
            return sender

    async def reverse(self, address: str) -> str:
        """The original sender behind one of our SRS addresses, or raise SrsError."""
        result = self.srs.reverse(address)
        if isinstance(result, KeyRef):
            found = await self._in_thread(lambda: self._keys().get(result.key))
            if found is None:
                raise SrsError(SrsReason.UNKNOWN_KEY)
            return str(found)
        return result

    async def close(self) -> None:
        def _close() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None

        await self._in_thread(_close)
        self._executor.shutdown(wait=True)
