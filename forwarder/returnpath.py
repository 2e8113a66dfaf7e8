"""The daemon's side of SRS: rewrite senders of forwarded mail, verify bounces coming back.

`srs.py` is pure; what needs storage comes through the two interfaces of `srsstore.py`:
the secrets (by default a file in the state directory, created 0600 at first start,
reloaded on SIGHUP) and the key store for senders too long for an SRS0 local part (postsrsd
issue #108; by default an SQLite file of its own).

Our SRS addresses are only ever checked by us, so their hash is as long as online guessing
requires (HASH_LENGTH; docs/security.md has the arithmetic), not libsrs2's 4 characters.
Addresses signed with 4 characters before the change stay valid until they expire: the
day of the change is recorded once in the state directory (SHORT_HASH_FILE), and a short
hash is accepted only on an address stamped on or before it.
"""

from __future__ import annotations

from pathlib import Path

from forwarder.clock import Clock
from forwarder.srs import MIN_HASH_LENGTH, KeyRef, Srs, SrsError, SrsReason, SrsTooLong
from forwarder.srsstore import KeyStore, SecretsFile, SecretsSource, SqliteKeyStore

SECRETS_FILE = "srs-secrets"
KEYS_FILE = "srs-keys.sqlite3"
MAX_AGE_DAYS = 21
# 12 base64 characters compared case-insensitively: 60 bits (docs/security.md).
HASH_LENGTH = 12
_DAY = 86400


def secrets_path(state_dir: Path) -> Path:
    return state_dir / SECRETS_FILE


def load_srs(secrets: SecretsSource, domain: str, clock: Clock, fresh: bool = False,
             record: bool = True) -> Srs:
    """The signer/verifier: HASH_LENGTH characters, the old short hashes accepted on
    addresses issued before the change (`SecretsSource.short_hashes_until`), until they
    expire. `fresh`: the secrets were just created; `record`: write the day of the change
    if it is not yet recorded (the daemon does; `forwarder srs reverse` only reads)."""
    until = secrets.short_hashes_until(fresh, int(clock.now() // _DAY), record)
    return Srs(secrets.load(), domain, clock.now, hash_length=HASH_LENGTH,
               max_age_days=MAX_AGE_DAYS, min_hash_length=MIN_HASH_LENGTH,
               short_until_day=-1 if until is None else until)


class ReturnPath:
    """SRS for the daemon. `state_dir` holds the default stores (a secrets file and an
    SQLite key store); `secrets` and `keys` replace them with other backends."""

    def __init__(self, state_dir: Path, domain: str, clock: Clock,
                 secrets: SecretsSource | None = None, keys: KeyStore | None = None) -> None:
        self.clock = clock
        self.secrets = secrets or SecretsFile(secrets_path(state_dir))
        self.keys = keys or SqliteKeyStore(state_dir / KEYS_FILE)
        self.srs = load_srs(self.secrets, domain, clock, fresh=self.secrets.ensure())

    def reload(self, domain: str) -> None:
        """SIGHUP: re-read the secrets (a rotation done with `forwarder srs rotate`)."""
        self.secrets.ensure()
        self.srs = load_srs(self.secrets, domain, self.clock)

    @property
    def domain(self) -> str:
        return self.srs.domain

    async def rewrite(self, sender: str) -> str:
        """The envelope sender for a copy forwarded out of our domains."""
        try:
            return self.srs.forward(sender)
        except SrsTooLong:
            key = await self.keys.put(sender, self.clock.now())
            return self.srs.forward_with_key(key)
        except SrsError:
            # A sender we cannot wrap (no domain): forwarding it unchanged is what a
            # plain forwarder would do; SPF may fail, but the mail is not lost.
            return sender

    async def reverse(self, address: str) -> str:
        """The original sender behind one of our SRS addresses, or raise SrsError."""
        result = self.srs.reverse(address)
        if isinstance(result, KeyRef):
            found = await self.keys.get(result.key)
            if found is None:
                raise SrsError(SrsReason.UNKNOWN_KEY)
            return found
        return result

    async def purge_expired(self) -> int:
        """Forget the long senders whose SRS addresses have all expired (a day of margin:
        the timestamp counts whole days); return how many."""
        before = self.clock.now() - (MAX_AGE_DAYS + 1) * 86400.0
        return await self.keys.purge(before)

    async def close(self) -> None:
        await self.keys.close()
