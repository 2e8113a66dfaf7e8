"""The storage side of SRS: where the secrets come from, where long senders are kept.

The SRS scheme itself is pure (forwarder/srs.py); what it needs from storage is two small
interfaces, so that another backend (PostgreSQL, for several nodes) can stand in for the
files here:

- `SecretsSource`: the secrets, the first one signing (read at start-up, on SIGHUP and by
  the admin commands, never per message, hence synchronous);
- `KeyStore`: the senders too long for an SRS0 local part, under a key (postsrsd 2.x's
  database alias), asynchronous because the daemon asks it while delivering and on RCPT.

The implementations here: `SecretsFile`, postsrsd's format (one secret per line, the first
signs; created 0600 at first start), and `SqliteKeyStore`, an SQLite file used from one
thread of its own (`SqliteKeys` is that file's synchronous connection, which the admin
commands use directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets as _secrets
import sqlite3
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from forwarder.srs import new_key

T = TypeVar("T")

_MIN_SECRET_BYTES = 16
# Beside the secrets file: the last day short hashes were signed (`short_hash_day`).
SHORT_HASH_FILE = "srs-short-hashes-until"


class SecretsSource(Protocol):
    def ensure(self) -> bool:
        """Create the secrets (one random secret) if there are none; True if created."""
        ...

    def load(self) -> list[bytes]:
        """The secrets, the signing one first; raises OSError or ValueError."""
        ...

    def short_hashes_until(self, fresh: bool, today: int, record: bool = True) -> int | None:
        """The last day (days since the epoch) on which addresses with short (4-character)
        hashes may have been signed with these secrets, or None if never (`fresh`: made by
        this release, which signs long hashes). Recorded the first time it is asked, unless
        not `record`."""
        ...


class KeyStore(Protocol):
    """key -> sender for `srs.SrsTooLong` senders. One key per sender: storing the same
    sender again refreshes its time and returns its key. Raises whatever its backend
    raises when it cannot be reached (the caller defers: never a 5xx)."""

    async def put(self, sender: str, now: float) -> str:
        """The key for `sender`, stored durably before it is returned."""
        ...

    async def get(self, key: str) -> str | None:
        """The sender stored under `key` (case-insensitive), or None."""
        ...

    async def purge(self, before: float) -> int:
        """Forget the senders stored before `before`; return how many."""
        ...

    async def close(self) -> None:
        ...


# --- Secrets file: one secret per line, the first signs (postsrsd's format) -----------


@dataclass(frozen=True)
class SecretsFile:
    """`SecretsSource` on a postsrsd-format file."""

    path: Path

    def ensure(self) -> bool:
        return ensure_secrets(self.path)

    def load(self) -> list[bytes]:
        return load_secrets(self.path)

    def short_hashes_until(self, fresh: bool, today: int, record: bool = True) -> int | None:
        return short_hash_day(self.path.with_name(SHORT_HASH_FILE), fresh, today, record)


def load_secrets(path: str | os.PathLike[str], what: str = "SRS") -> list[bytes]:
    """The secrets in `path`, one per line, first one signing; blank lines are skipped.
    (`what` names them in messages: the notices' token secrets use the same format.)"""
    lines = Path(path).read_bytes().splitlines()
    found = [line.strip() for line in lines if line.strip()]
    if not found:
        raise ValueError(f"{os.fspath(path)}: no {what} secret in the file")
    return found


def _write_private(path: Path, data: bytes, *, replace: bool) -> bool:
    """Write `data` to `path` atomically with mode 0600; False if it exists and not replace.

    A temporary file in the same directory, fsynced, then linked (no clobber) or renamed
    into place, then the directory fsynced, so a crash leaves the old file or the new one.
    """
    tmp = path.with_name(f".{path.name}.{_secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _new_secret() -> bytes:
    return _secrets.token_urlsafe(32).encode("ascii")


def ensure_secrets(path: str | os.PathLike[str]) -> bool:
    """Create the secrets file (0600, one random secret) if missing; True if created."""
    target = Path(path)
    if target.exists():
        return False
    return _write_private(target, _new_secret() + b"\n", replace=False)


def rotate_secrets(path: str | os.PathLike[str]) -> None:
    """Prepend a new signing secret, keeping the old ones so addresses in flight verify."""
    target = Path(path)
    old = load_secrets(target)
    _write_private(target, b"".join(s + b"\n" for s in [_new_secret(), *old]), replace=True)


def short_hash_day(path: str | os.PathLike[str], fresh: bool, today: int,
                   record: bool = True) -> int | None:
    """The last day (days since the epoch) on which addresses with short hashes may have
    been issued here, or None if never: recorded in `path` the first time it is asked,
    as today for an installation upgraded from a release that signed with 4 characters,
    or "none" for one whose secrets are `fresh` (made by this release). Without `record`,
    nothing is written (what would be recorded is returned)."""
    target = Path(path)
    if not target.exists():
        if not record:
            return None if fresh else today
        # Written once; a concurrent writer (an acceptor, the CLI) may win: read theirs.
        _write_private(target, b"none\n" if fresh else f"{today}\n".encode(), replace=False)
    text = target.read_text().strip()
    return None if text == "none" else int(text)


def secrets_file_problems(path: str | os.PathLike[str], what: str = "SRS") -> list[str]:
    """What `forwarder check` should report about the secrets file; [] if all is well."""
    target = Path(path)
    try:
        st = target.stat()
    except FileNotFoundError:
        return [f"{target}: missing (created at first start)"]
    except OSError as exc:
        return [f"{target}: cannot stat: {exc.strerror}"]
    if not stat.S_ISREG(st.st_mode):
        return [f"{target}: not a regular file"]
    problems: list[str] = []
    if st.st_mode & 0o077:
        problems.append(
            f"{target}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read or "
            f"change the {what} secrets; chmod 600"
        )
    try:
        found = load_secrets(target, what)
    except (OSError, ValueError) as exc:
        return [*problems, f"{target}: {getattr(exc, 'strerror', None) or exc}"]
    short = sum(1 for s in found if len(s) < _MIN_SECRET_BYTES)
    if short:
        problems.append(f"{target}: {short} secret(s) shorter than {_MIN_SECRET_BYTES} bytes")
    return problems


# --- Long-sender key store: an SQLite file ---------------------------------------------


class SqliteKeys:
    """The key store's SQLite file, synchronously: one connection, to be used from the
    thread that opened it (sqlite3's default), as `SqliteKeyStore` and the CLI do.

    Rows older than the SRS validity are useless (their addresses expire) and are removed
    by `purge`.
    """

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS srs_keys ("
        " key TEXT PRIMARY KEY, sender TEXT NOT NULL UNIQUE, stored_at REAL NOT NULL)"
    )

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(self._SCHEMA)

    def put(self, sender: str, now: float) -> str:
        """The key for `sender`, stored durably before it is returned."""
        row = self._db.execute(
            "INSERT INTO srs_keys (key, sender, stored_at) VALUES (?, ?, ?)"
            " ON CONFLICT (sender) DO UPDATE SET stored_at = excluded.stored_at"
            " RETURNING key",
            (new_key(), sender, now),
        ).fetchone()
        return str(row[0])

    def get(self, key: str) -> str | None:
        row = self._db.execute(
            "SELECT sender FROM srs_keys WHERE key = ?", (key.upper(),)
        ).fetchone()
        return None if row is None else str(row[0])

    def purge(self, before: float) -> int:
        """Delete keys stored before `before` (now - (max_age_days + 1) days)."""
        return self._db.execute("DELETE FROM srs_keys WHERE stored_at < ?", (before,)).rowcount

    def close(self) -> None:
        self._db.close()


class Keys(Protocol):
    """A `KeyStore`'s synchronous side: one connection, used from one thread only."""

    def put(self, sender: str, now: float) -> str: ...

    def get(self, key: str) -> str | None: ...

    def purge(self, before: float) -> int: ...

    def close(self) -> None: ...


K = TypeVar("K", bound=Keys)


class ThreadKeyStore(Generic[K]):
    """`KeyStore` on a synchronous `Keys` that lives in one thread of its own: opened there
    on first use (`_open`) and used there only, so the event loop never waits for the
    database. A backend with more to do around a call overrides `_call`."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="srs-keys")
        self._keys: K | None = None

    def _open(self) -> K:
        raise NotImplementedError

    def _call(self, fn: Callable[[K], T]) -> T:
        if self._keys is None:
            self._keys = self._open()
        return fn(self._keys)

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _run(self, fn: Callable[[K], T]) -> T:
        return await self._in_thread(self._call, fn)

    async def put(self, sender: str, now: float) -> str:
        return await self._run(lambda keys: keys.put(sender, now))

    async def get(self, key: str) -> str | None:
        return await self._run(lambda keys: keys.get(key))

    async def purge(self, before: float) -> int:
        return await self._run(lambda keys: keys.purge(before))

    def _forget(self) -> None:
        if self._keys is not None:
            keys, self._keys = self._keys, None
            keys.close()

    async def close(self) -> None:
        await self._in_thread(self._forget)
        self._executor.shutdown(wait=True)


class SqliteKeyStore(ThreadKeyStore[SqliteKeys]):
    """`KeyStore` on `SqliteKeys` (`ThreadKeyStore`): the file is only created once a long
    sender shows up."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _open(self) -> SqliteKeys:
        return SqliteKeys(self.path)
