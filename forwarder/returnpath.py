"""The daemon's side of SRS: rewrite senders of forwarded mail, verify bounces coming back.

`srs.py` is pure; what needs storage comes through the two interfaces of `srsstore.py`:
the secrets (by default a file in the state directory, created 0600 at first start,
reloaded on SIGHUP) and the key store for senders too long for an SRS0 local part (postsrsd
issue #108; by default an SQLite file of its own).
"""

from __future__ import annotations

from pathlib import Path

from forwarder.clock import Clock
from forwarder.srs import KeyRef, Srs, SrsError, SrsReason, SrsTooLong
from forwarder.srsstore import KeyStore, SecretsFile, SecretsSource, SqliteKeyStore

SECRETS_FILE = "srs-secrets"
KEYS_FILE = "srs-keys.sqlite3"
MAX_AGE_DAYS = 21


def secrets_path(state_dir: Path) -> Path:
    return state_dir / SECRETS_FILE


def load_srs(secrets: SecretsSource, domain: str, clock: Clock) -> Srs:
    """Create the secrets if there are none, then build the signer/verifier."""
    secrets.ensure()
    return Srs(secrets.load(), domain, clock.now, max_age_days=MAX_AGE_DAYS)


class ReturnPath:
    """SRS for the daemon. `state_dir` holds the default stores (a secrets file and an
    SQLite key store); `secrets` and `keys` replace them with other backends."""

    def __init__(self, state_dir: Path, domain: str, clock: Clock,
                 secrets: SecretsSource | None = None, keys: KeyStore | None = None) -> None:
        self.clock = clock
        self.secrets = secrets or SecretsFile(secrets_path(state_dir))
        self.keys = keys or SqliteKeyStore(state_dir / KEYS_FILE)
        self.srs = load_srs(self.secrets, domain, clock)

    def reload(self, domain: str) -> None:
        """SIGHUP: re-read the secrets (a rotation done with `forwarder srs rotate`)."""
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
