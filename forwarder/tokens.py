"""Confirmation tokens: the `confirm+TOKEN@` and `refuse+TOKEN@` addresses of a notice.

Pure and stdlib-only, like srs.py: the secrets and the time are passed in.

A token names one declared target and is valid until an expiry. It must fit, with its
`confirm+` or `refuse+` prefix, in the 64 octets of a local part (RFC 5321 4.5.3.1.1), so
it cannot carry the account and target addresses themselves (up to 254 octets each). It
carries the target's id and binds the rest: the MAC covers the kind (confirm or refuse),
the id, the expiry, the account, the target address and the time the target was declared.
Whoever checks it looks the id up in the directory and recomputes the MAC over what it
finds there, so a token for another account, a target declared again since (a refusal
undone by the school) or a purged account does not verify.

Layout, 20 bytes in hexadecimal: 40 characters, so `confirm+` + token is 48 octets.

    version (1) | target id (5, big endian) | expiry (4: seconds since the epoch) |
    HMAC-SHA256 (10 bytes: 80 bits)

Mail systems may fold local parts to one case, so the token is hexadecimal and read in
either case. The MAC is compared in constant time against every secret (rotation:
the first signs, all verify), so a comparison does not leak how much of it matched.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

VERSION = 1
_ID_BYTES = 5
_EXPIRY_BYTES = 4
_MAC_BYTES = 10
_TOKEN_BYTES = 1 + _ID_BYTES + _EXPIRY_BYTES + _MAC_BYTES
TOKEN_CHARS = _TOKEN_BYTES * 2  # 40
MAX_TARGET_ID = 2 ** (8 * _ID_BYTES) - 1
DEFAULT_VALIDITY = 30 * 86400.0


class TokenKind(enum.StrEnum):
    CONFIRM = "confirm"
    REFUSE = "refuse"

    @property
    def prefix(self) -> str:
        return f"{self.value}+"


_PREFIXES = tuple((kind.prefix, kind) for kind in TokenKind)


class TokenReason(enum.StrEnum):
    """Why a token does not verify; the value is what logs and admins see."""

    MALFORMED = "malformed"
    BAD_HASH = "bad hash"
    EXPIRED = "expired"
    UNKNOWN = "unknown target"


class TokenError(Exception):
    def __init__(self, reason: TokenReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class Binding:
    """What a token is bound to, as the directory holds it."""

    account: str
    target: str
    declared_at: float


@dataclass(frozen=True)
class Claim:
    """A token as presented, parsed but not verified."""

    kind: TokenKind
    target_id: int
    expires: int
    signed: bytes  # the bytes the MAC covers, before the binding is appended
    mac: bytes


def split_local(local: str) -> tuple[TokenKind, str] | None:
    """(kind, token) if `local` is a confirm+ or refuse+ local part (any case), else None."""
    if "+" not in local:  # most local parts: one test, as RCPT and imports ask often
        return None
    lowered = local[:8].lower()
    for prefix, kind in _PREFIXES:
        if lowered.startswith(prefix):
            return kind, local[len(prefix):]
    return None


def _message(kind: TokenKind, signed: bytes, binding: Binding) -> bytes:
    # Fields separated by NUL, which no address contains; the declaration time in whole
    # milliseconds, so a database's float round trip cannot change it.
    return b"\0".join((b"forwarder-token", kind.value.encode(), signed,
                       binding.account.encode(), binding.target.encode(),
                       str(round(binding.declared_at * 1000)).encode()))


def _mac(secret: bytes, kind: TokenKind, signed: bytes, binding: Binding) -> bytes:
    return hmac.digest(secret, _message(kind, signed, binding), "sha256")[:_MAC_BYTES]


def make_token(kind: TokenKind, target_id: int, binding: Binding, expires: float,
               secret: bytes) -> str:
    """The token for `kind` of target `target_id`, valid until `expires` (epoch seconds)."""
    if not 0 < target_id <= MAX_TARGET_ID:
        raise ValueError(f"target id {target_id} out of range")
    signed = (bytes([VERSION]) + target_id.to_bytes(_ID_BYTES, "big")
              + int(expires).to_bytes(_EXPIRY_BYTES, "big"))
    return (signed + _mac(secret, kind, signed, binding)).hex()


def parse_token(kind: TokenKind, token: str) -> Claim:
    """Parse without verifying (the id is needed to find the binding); raises TokenError."""
    if len(token) != TOKEN_CHARS:
        raise TokenError(TokenReason.MALFORMED)
    try:
        raw = bytes.fromhex(token)
    except ValueError:
        raise TokenError(TokenReason.MALFORMED) from None
    if raw[0] != VERSION:
        raise TokenError(TokenReason.MALFORMED)
    signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    target_id = int.from_bytes(signed[1:1 + _ID_BYTES], "big")
    expires = int.from_bytes(signed[1 + _ID_BYTES:], "big")
    return Claim(kind, target_id, expires, signed, mac)


def check_token(claim: Claim, binding: Binding | None, secrets: Sequence[bytes],
                now: float) -> None:
    """Raise TokenError unless `claim` was signed with one of `secrets` for `binding` (the
    directory's record of the claimed target id; None: no such target) and is unexpired.
    The MAC is checked before the age, as for SRS: a forged, old token is reported as
    forged, which is what an admin needs to know."""
    if binding is None:
        raise TokenError(TokenReason.UNKNOWN)
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(claim.mac, _mac(secret, claim.kind, claim.signed, binding))
    if not ok:
        raise TokenError(TokenReason.BAD_HASH)
    if now >= claim.expires:
        raise TokenError(TokenReason.EXPIRED)
