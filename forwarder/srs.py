"""Sender Rewriting Scheme (Shevek's scheme), compatible with libsrs2 and postsrsd.

Pure and stdlib-only: the secrets and the clock are injected, and nothing here does any
I/O. The secrets file and the long-sender key store are on the storage side
(forwarder/srsstore.py).

Address forms (the reference is libsrs2's ``srs2.c``, as embedded in postsrsd 1.x; the
vectors in ``tests/fixtures/srs_vectors.json`` come from running that code):

* ``SRS0=HHHH=TT=orig-domain=orig-local@<srs domain>``: a sender we forward.
  ``HHHH`` is HMAC-SHA1(secret, lower(TT + orig-domain + orig-local)), base64, truncated
  to `hash_length` characters; ``TT`` is the day number modulo 1024 in two base32 chars.
* ``SRS1=HHHH=first-hop==XXXX=TT=orig-domain=orig-local@<srs domain>``: a sender that was
  already another forwarder's ``SRS0=XXXX=...@first-hop``. Our hash covers
  lower(first-hop + "=XXXX=TT=orig-domain=orig-local") (note: the part after ``SRS0``
  keeps its leading separator, hence the ``==``). An SRS1 sender is re-wrapped keeping
  the first hop and its opaque part, with our own hash (libsrs2 srs_compile_guarded).
  Reversing an SRS1 gives ``SRS0=XXXX=TT=orig-domain=orig-local@first-hop``: the bounce
  goes back to the first forwarder, who alone can check the inner hash. SRS1 carries no
  timestamp, so, as in libsrs2, none is checked.

Long senders (postsrsd issue #108): an SRS0 local part longer than the 64 octets of
RFC 5321 section 4.5.3.1.1 is refused by many servers. `Srs.forward` then raises
`SrsTooLong`; the caller stores the sender under a key (a `srsstore.KeyStore`, which makes
it with `new_key()` and keeps it at least `max_age_days` + 1 days) and calls
`Srs.forward_with_key(key)`, which returns

    ``SRS0=HHHH=TT=1=<KEY>@<srs domain>``  (KEY: 16 base32 chars, 80 random bits)

This is postsrsd 2.x's database-alias convention: the key sits in the user slot and the
domain slot is the literal ``1``, which can never be a real domain (an all-numeric TLD is
not allowed, RFC 3696 section 2). It is an ordinary SRS0 address, so the hash (covering the
timestamp, ``1`` and the key) and the timestamp are checked like any other, and
`Srs.reverse` returns `KeyRef(key)` instead of an address: the caller looks the key up.

Verification reasons are the fixed set in `SrsReason`; `forwarder srs reverse` shows them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets as _secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "KEY_DOMAIN",
    "MIN_HASH_LENGTH",
    "KeyRef",
    "Srs",
    "SrsError",
    "SrsReason",
    "SrsTooLong",
    "is_srs_local",
    "new_key",
]

# libsrs2 srs2.c: "Use this" separators after the tag, and the one inside the address.
_TAG_SEPARATORS = "=-+"
_SEP = "="
# libsrs2 srs2.c: SRS_TIME_PRECISION, SRS_TIME_BASECHARS, SRS_TIME_SIZE, SRS_TIME_SLOTS.
_DAY = 60 * 60 * 24
_TIME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_TIME_SLOTS = 1024
# Fewer than 4 base64 characters (24 bits) is forgeable by brute force; srslib 0.1.5
# accepts 1, libsrs2 and postsrsd default to a minimum of 4.
MIN_HASH_LENGTH = 4
# base64 of a 20-byte SHA-1 digest, without padding.
_MAX_HASH_LENGTH = 27
# RFC 5321 section 4.5.3.1.1: the maximum total length of a local part is 64 octets.
_MAX_LOCAL_OCTETS = 64
# RFC 5321 4.1.2 Dot-string: what an SRS local part must stay, whatever it wraps (UTF-8
# allowed: RFC 6531 3.3 extends atext).
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
                         r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*")
# postsrsd 2.x srs.c: a database alias is reversed to "<key>@1".
KEY_DOMAIN = "1"
_KEY_BYTES = 10
_KEY_RE = re.compile(r"[A-Z2-7]{16}")


class SrsReason(StrEnum):
    """Why an address does not reverse; the value is what admins see."""

    NOT_SRS = "not an SRS address"
    MALFORMED = "malformed"
    HASH_TOO_SHORT = "hash too short"
    BAD_HASH = "bad hash"
    EXPIRED = "expired timestamp"
    # Raised by callers whose key store no longer knows a `KeyRef`.
    UNKNOWN_KEY = "unknown key"


class SrsError(Exception):
    """An SRS address failed its check; `reason` is one of `SrsReason`."""

    def __init__(self, reason: SrsReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class SrsTooLong(Exception):
    """The rewritten local part would exceed 64 octets, or would not be a Dot-string (a
    sender with a quoted local part or an address literal, RFC 5321 4.1.2): store the
    sender under a key."""

    def __init__(self, sender: str) -> None:
        super().__init__(f"SRS local part for {sender!r} would not be a valid local part")
        self.sender = sender


@dataclass(frozen=True)
class KeyRef:
    """`Srs.reverse` result for a long-sender address: look `key` up in the key store."""

    key: str


def is_srs_local(local: str) -> bool:
    """True if `local` looks like SRS0/SRS1 (libsrs2 SRS_IS_SRS_ADDRESS), checks nothing."""
    return (
        len(local) >= 5
        and local[:3].upper() == "SRS"
        and local[3] in "01"
        and local[4] in _TAG_SEPARATORS
    )


def new_key() -> str:
    """A fresh key for a long sender: base32 of 80 random bits, 16 chars, no padding."""
    return base64.b32encode(_secrets.token_bytes(_KEY_BYTES)).decode("ascii")


def _lower_ascii(text: str) -> bytes:
    # libsrs2 lower-cases byte by byte with tolower() in the C locale: ASCII only, so a
    # UTF-8 local part (RFC 6531) keeps its non-ASCII bytes as they are.
    return text.encode("utf-8").lower()


def _timestamp(now: float) -> str:
    # libsrs2 srs_timestamp_create: day number, low 10 bits, two base32 characters.
    day = int(now // _DAY)
    return _TIME_CHARS[(day >> 5) & 31] + _TIME_CHARS[day & 31]


def _timestamp_age(stamp: str, now: float) -> int | None:
    """Age in days modulo 1024 (libsrs2 srs_timestamp_check), or None if not base32."""
    stamp = stamp.upper()
    if len(stamp) != 2 or any(c not in _TIME_CHARS for c in stamp):
        return None
    then = _TIME_CHARS.index(stamp[0]) << 5 | _TIME_CHARS.index(stamp[1])
    # A stamp "from the future" wraps to ~1024 days old and is refused, as in libsrs2.
    return (int(now // _DAY) - then) % _TIME_SLOTS


def _split_sender(sender: str) -> tuple[str, str]:
    # The last "@": a quoted local part may contain one, a domain never does (RFC 5321 4.1.2).
    local, at, domain = sender.rpartition("@")
    if not at or not local or not domain:
        raise SrsError(SrsReason.MALFORMED)
    return local, domain


def _parse_srs1(local: str) -> tuple[str, str, str] | None:
    """(hash, first-hop host, opaque part) of an SRS1 local part, or None if malformed."""
    hash_, sep1, rest = local[5:].partition(_SEP)
    host, sep2, opaque = rest.partition(_SEP)
    if not (hash_ and sep1 and host and sep2 and opaque):
        return None
    return hash_, host, opaque


class Srs:
    """Forward and reverse SRS addresses for one SRS domain.

    `secrets`: the first signs, every one verifies (rotation). `now`: epoch seconds.
    `min_hash_length` (default: `hash_length`) is the shortest hash accepted on reverse,
    so a deployment can lengthen `hash_length` without breaking addresses in flight.
    `short_until_day` bounds that leniency in time: if given, a hash shorter than
    `hash_length` is accepted only on an address stamped on or before that day (days since
    the epoch), i.e. issued before `hash_length` grew, and so only until it expires; SRS1
    addresses, which carry no stamp, only until `max_age_days` after that day.
    """

    def __init__(
        self,
        secrets: Sequence[bytes],
        domain: str,
        now: Callable[[], float],
        hash_length: int = 4,
        max_age_days: int = 21,
        min_hash_length: int | None = None,
        short_until_day: int | None = None,
    ) -> None:
        if not secrets or any(not s for s in secrets):
            raise ValueError("SRS needs at least one non-empty secret")
        if not MIN_HASH_LENGTH <= hash_length <= _MAX_HASH_LENGTH:
            raise ValueError(f"hash_length must be {MIN_HASH_LENGTH}..{_MAX_HASH_LENGTH}")
        min_len = hash_length if min_hash_length is None else min_hash_length
        if not MIN_HASH_LENGTH <= min_len <= hash_length:
            raise ValueError(f"min_hash_length must be {MIN_HASH_LENGTH}..hash_length")
        if not 0 <= max_age_days < _TIME_SLOTS:
            raise ValueError(f"max_age_days must be 0..{_TIME_SLOTS - 1}")
        if not domain or "@" in domain:
            raise ValueError("the SRS domain must be a bare domain")
        self._secrets = [bytes(s) for s in secrets]
        self._domain = domain
        self._now = now
        self._hash_length = hash_length
        self._min_hash_length = min_len
        self._max_age_days = max_age_days
        self._short_until_day = short_until_day

    @property
    def domain(self) -> str:
        return self._domain

    def _digest(self, secret: bytes, parts: Sequence[str]) -> str:
        # libsrs2 srs_hash_create_v: HMAC-SHA1 over the lower-cased parts, concatenated
        # without separators, then "a little base64": standard base64 of the digest.
        mac = hmac.new(secret, b"".join(_lower_ascii(p) for p in parts), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("ascii").rstrip("=")

    def _sign(self, *parts: str) -> str:
        return self._digest(self._secrets[0], parts)[: self._hash_length]

    def _check_hash(self, given: str, *parts: str, issued_day: int | None = None) -> None:
        """`issued_day`: the day the address says it was made (None: SRS1, no stamp)."""
        if len(given) < self._hash_length and not self._short_allowed(len(given), issued_day):
            raise SrsError(SrsReason.HASH_TOO_SHORT)
        # Case-insensitive because mail systems may fold local parts (libsrs2 uses
        # strncasecmp); constant time so the check does not leak how many chars matched.
        given_b = _lower_ascii(given)
        ok = False
        for secret in self._secrets:
            want = _lower_ascii(self._digest(secret, parts)[: len(given)])
            ok |= hmac.compare_digest(given_b, want)
        if not ok:
            raise SrsError(SrsReason.BAD_HASH)

    def _short_allowed(self, length: int, issued_day: int | None) -> bool:
        if length < self._min_hash_length:
            return False
        if self._short_until_day is None:
            return True
        today = int(self._now() // _DAY)
        if issued_day is None:
            return today <= self._short_until_day + self._max_age_days
        return issued_day <= self._short_until_day

    def _fits(self, sender: str, address: str) -> str:
        local = address.rpartition("@")[0]
        if len(local.encode("utf-8")) > _MAX_LOCAL_OCTETS or not _DOT_STRING.fullmatch(local):
            raise SrsTooLong(sender)
        return address

    def forward(self, sender: str) -> str:
        """The envelope sender to use when forwarding mail from `sender`.

        The null sender stays null (RFC 5321 4.5.5) and a sender already in our SRS domain
        is kept (libsrs2 srs_forward without alwaysrewrite). Raises `SrsTooLong` (use
        `forward_with_key`) or `SrsError(MALFORMED)` for a sender without a domain.
        """
        if sender == "":
            return ""
        local, domain = _split_sender(sender)
        if domain.lower() == self._domain.lower():
            return sender
        if domain == KEY_DOMAIN:
            # Would reverse to a KeyRef; "1" is not a domain anyone can send from.
            raise SrsError(SrsReason.MALFORMED)
        guarded = self._guarded_parts(local, domain) if is_srs_local(local) else None
        if guarded is not None:
            host, opaque = guarded
            address = f"SRS1={self._sign(host, opaque)}={host}={opaque}@{self._domain}"
        else:
            stamp = _timestamp(self._now())
            hash_ = self._sign(stamp, domain, local)
            address = f"SRS0={hash_}={stamp}={domain}={local}@{self._domain}"
        return self._fits(sender, address)

    @staticmethod
    def _guarded_parts(local: str, domain: str) -> tuple[str, str] | None:
        """(first hop, opaque part) for an SRS1 wrap (libsrs2 srs_compile_guarded)."""
        if local[3] == "0":
            # Another forwarder's SRS0: its domain is the first hop, and the opaque part
            # is everything after the tag, separator included.
            return domain, local[4:]
        parsed = _parse_srs1(local)
        # A malformed SRS1 is wrapped in SRS0 like any sender (libsrs2 would refuse it):
        # its bounces still come back to us and reverse to the string we were given.
        return None if parsed is None else parsed[1:]

    def forward_with_key(self, key: str) -> str:
        """``SRS0=HHHH=TT=1=<KEY>@domain`` for a sender stored under `key` (`new_key`)."""
        key = key.upper()
        if not _KEY_RE.fullmatch(key):
            raise ValueError("not a key made by new_key()")
        stamp = _timestamp(self._now())
        hash_ = self._sign(stamp, KEY_DOMAIN, key)
        return f"SRS0={hash_}={stamp}={KEY_DOMAIN}={key}@{self._domain}"

    def reverse(self, address: str) -> str | KeyRef:
        """The original sender of an SRS address (or local part), or a `KeyRef`.

        The domain after "@" is ignored, as in libsrs2 srs_reverse: whether the address
        belongs to us is the caller's routing decision. Raises `SrsError`.
        """
        local = address.rpartition("@")[0] if "@" in address else address
        if not is_srs_local(local):
            raise SrsError(SrsReason.NOT_SRS)
        if local[3] == "1":
            return self._reverse_srs1(local)
        return self._reverse_srs0(local)

    def _reverse_srs0(self, local: str) -> str | KeyRef:
        fields = local[5:].split(_SEP, 3)
        if len(fields) != 4 or not all(fields):
            raise SrsError(SrsReason.MALFORMED)
        hash_, stamp, host, user = fields
        age = _timestamp_age(stamp, self._now())
        if age is None:
            raise SrsError(SrsReason.MALFORMED)
        # Hash before age (libsrs2 checks the age first): a forged address whose stamp is
        # also old is reported as forged, which is what an admin needs to know.
        self._check_hash(hash_, stamp, host, user, issued_day=int(self._now() // _DAY) - age)
        if age > self._max_age_days:
            raise SrsError(SrsReason.EXPIRED)
        if host == KEY_DOMAIN:
            if not _KEY_RE.fullmatch(user.upper()):
                raise SrsError(SrsReason.MALFORMED)
            return KeyRef(user.upper())
        return f"{user}@{host}"

    def _reverse_srs1(self, local: str) -> str:
        parsed = _parse_srs1(local)
        if parsed is None:
            raise SrsError(SrsReason.MALFORMED)
        hash_, host, opaque = parsed
        self._check_hash(hash_, host, opaque)
        # libsrs2 srs_parse_guarded: "SRS0" + opaque (which starts with its separator).
        return f"SRS0{opaque}@{host}"
