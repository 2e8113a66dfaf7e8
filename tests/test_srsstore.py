"""SRS storage: the secrets file and the long-sender key store, on real files."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from forwarder.clock import FakeClock
from forwarder.returnpath import ReturnPath
from forwarder.srs import KeyRef, SrsError, SrsReason, new_key
from forwarder.srsstore import (
    KeyStore,
    SecretsFile,
    SecretsSource,
    SqliteKeys,
    SqliteKeyStore,
    ensure_secrets,
    load_secrets,
    rotate_secrets,
    secrets_file_problems,
)
from tests.test_srs import DAY, DOMAIN, LONG_SENDER, SIGN_AT, make


def test_sqlite_keys(tmp_path: Path) -> None:
    store = SqliteKeys(tmp_path / "srs-keys.sqlite")
    try:
        key = store.put(LONG_SENDER, now=SIGN_AT)
        assert store.put(LONG_SENDER, now=SIGN_AT + DAY) == key  # same sender, same key
        other = store.put("other" + LONG_SENDER, now=SIGN_AT)
        assert other != key
        assert store.get(key) == LONG_SENDER
        assert store.get(key.lower()) == LONG_SENDER
        assert store.get(new_key()) is None
        assert store.purge(before=SIGN_AT + 1) == 1  # only `other`: `key` was refreshed
        assert store.get(other) is None and store.get(key) == LONG_SENDER
    finally:
        store.close()


async def test_sqlite_key_store_is_a_key_store(tmp_path: Path) -> None:
    """The daemon's store: the same rules through the async interface, the file created
    at first use, not before."""
    path = tmp_path / "srs-keys.sqlite3"
    store: KeyStore = SqliteKeyStore(path)
    try:
        assert not await asyncio.to_thread(path.exists)
        assert await store.get(new_key()) is None
        key = await store.put(LONG_SENDER, now=SIGN_AT)
        assert await store.put(LONG_SENDER, now=SIGN_AT + DAY) == key
        other = await store.put("other" + LONG_SENDER, now=SIGN_AT)
        assert await store.get(key.lower()) == LONG_SENDER
        assert await store.purge(before=SIGN_AT + 1) == 1
        assert await store.get(other) is None
    finally:
        await store.close()
    reopened = SqliteKeys(path)  # durable: another connection (the CLI's) finds it
    try:
        assert reopened.get(key) == LONG_SENDER
    finally:
        reopened.close()


class MemorySecrets:
    """A SecretsSource that is not a file: what another backend would look like."""

    def __init__(self) -> None:
        self.secrets: list[bytes] = []

    def ensure(self) -> bool:
        created = not self.secrets
        if created:
            self.secrets.append(b"a-secret-from-somewhere-else")
        return created

    def load(self) -> list[bytes]:
        return list(self.secrets)

    def short_hashes_until(self, fresh: bool, today: int, record: bool = True) -> int | None:
        return None  # this backend never signed short hashes


class MemoryKeys:
    """A KeyStore that is not SQLite."""

    def __init__(self) -> None:
        self.senders: dict[str, str] = {}

    async def put(self, sender: str, now: float) -> str:
        for key, known in self.senders.items():
            if known == sender:
                return key
        key = new_key()
        self.senders[key] = sender
        return key

    async def get(self, key: str) -> str | None:
        return self.senders.get(key.upper())

    async def purge(self, before: float) -> int:
        return 0

    async def close(self) -> None:
        pass


async def test_return_path_runs_on_any_backend(tmp_path: Path) -> None:
    """ReturnPath only speaks to the two interfaces: with other backends it touches no
    file in the state directory, and long senders still come back."""
    secrets: SecretsSource = MemorySecrets()
    keys = MemoryKeys()
    rp = ReturnPath(tmp_path, DOMAIN, FakeClock(SIGN_AT), secrets=secrets, keys=keys)
    try:
        address = await rp.rewrite(LONG_SENDER)
        assert isinstance(rp.srs.reverse(address), KeyRef)
        assert await rp.reverse(address) == LONG_SENDER
        assert await rp.reverse(address.lower()) == LONG_SENDER
        keys.senders.clear()
        with pytest.raises(SrsError) as info:
            await rp.reverse(address)
        assert info.value.reason is SrsReason.UNKNOWN_KEY
    finally:
        await rp.close()
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


def test_secrets_file_is_a_secrets_source(tmp_path: Path) -> None:
    source: SecretsSource = SecretsFile(tmp_path / "srs-secrets")
    assert source.ensure() is True
    assert source.ensure() is False
    assert source.load() == load_secrets(tmp_path / "srs-secrets")


# --- Secrets file. ---


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ensure_secrets_creates_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "srs.secrets"
    assert ensure_secrets(path) is True
    assert _mode(path) == 0o600
    first = load_secrets(path)
    assert len(first) == 1 and len(first[0]) == 43  # token_urlsafe(32)
    assert ensure_secrets(path) is False
    assert load_secrets(path) == first
    assert secrets_file_problems(path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["srs.secrets"]  # no temp file left


def test_rotate_prepends_and_keeps_old_secrets(tmp_path: Path) -> None:
    path = tmp_path / "srs.secrets"
    ensure_secrets(path)
    (original,) = load_secrets(path)
    rotate_secrets(path)
    rotate_secrets(path)
    rotated = load_secrets(path)
    assert len(rotated) == 3 and rotated[2] == original and len(set(rotated)) == 3
    assert _mode(path) == 0o600
    signer, _ = make([original])
    assert make(rotated)[0].reverse(signer.forward("a@example.com")) == "a@example.com"


def test_load_secrets_skips_blank_lines_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"new-secret\r\n\n  old-secret  \n")
    assert load_secrets(path) == [b"new-secret", b"old-secret"]
    path.write_bytes(b"\n\n")
    with pytest.raises(ValueError):
        load_secrets(path)


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (b"a-long-enough-secret-value\n", 0o600, []),
        (b"a-long-enough-secret-value\n", 0o640, ["mode 0640"]),
        (b"a-long-enough-secret-value\n", 0o604, ["mode 0604"]),
        (b"short\n", 0o600, ["1 secret(s) shorter than 16 bytes"]),
        (b"\n", 0o600, ["no SRS secret"]),
        (None, 0o600, ["missing"]),
    ],
)
def test_secrets_file_problems(
    tmp_path: Path, content: bytes | None, mode: int, expected: list[str]
) -> None:
    path = tmp_path / "srs.secrets"
    if content is not None:
        path.write_bytes(content)
        os.chmod(path, mode)
    problems = secrets_file_problems(path)
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem


def test_secrets_file_problems_not_a_file(tmp_path: Path) -> None:
    assert "not a regular file" in secrets_file_problems(tmp_path)[0]
