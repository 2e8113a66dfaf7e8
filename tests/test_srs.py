"""SRS: vectors from Debian's postsrsd (libsrs2), then the rules one by one.

No I/O: the scheme is pure (its storage side is tests/test_srsstore.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from forwarder.srs import (
    KeyRef,
    Srs,
    SrsError,
    SrsReason,
    SrsTooLong,
    is_srs_local,
    new_key,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "srs_vectors.json").read_text()
)
DOMAIN: str = VECTORS["domain"]
SECRETS = [s.encode() for s in VECTORS["secrets"]]
SIGN_AT: int = VECTORS["sign_at"]
DAY = 86400
# libsrs2 srs_strerror() texts, as postsrsd answered, mapped to our reasons.
LIBSRS2_REASONS = {
    "Not an SRS address.": SrsReason.NOT_SRS,
    "Hash too short in SRS address.": SrsReason.HASH_TOO_SHORT,
    "Hash invalid in SRS address.": SrsReason.BAD_HASH,
    "Time stamp out of date.": SrsReason.EXPIRED,
}


class Clock:
    """Settable clock: the SRS logic only ever calls it."""

    def __init__(self, t: float = SIGN_AT) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(
    secrets: list[bytes] | None = None, t: float = SIGN_AT, **kw: Any
) -> tuple[Srs, Clock]:
    clock = Clock(t)
    return Srs(SECRETS if secrets is None else secrets, DOMAIN, clock, **kw), clock


def reason_of(srs: Srs, address: str) -> SrsReason:
    with pytest.raises(SrsError) as info:
        srs.reverse(address)
    return info.value.reason


# --- Vectors produced by postsrsd 1.10 (libsrs2) and cross-checked with Mail::SRS. ---


@pytest.mark.parametrize("vector", VECTORS["forward"], ids=lambda v: v["forward"])
def test_forward_matches_postsrsd(vector: dict[str, Any]) -> None:
    srs, _ = make(hash_length=vector["hash_length"])
    assert srs.forward(vector["sender"]) == vector["forward"]


@pytest.mark.parametrize(
    "vector", VECTORS["reverse"], ids=lambda v: f"{v['address']}+{v['now'] - SIGN_AT}s"
)
def test_reverse_matches_postsrsd(vector: dict[str, Any]) -> None:
    srs, _ = make(t=vector["now"])
    if vector["ok"]:
        assert srs.reverse(vector["address"]) == vector["result"]
    else:
        assert reason_of(srs, vector["address"]) is LIBSRS2_REASONS[vector["result"]]


@pytest.mark.parametrize("vector", VECTORS["rotation"], ids=lambda v: str(len(v["verify_secrets"])))
def test_rotation_matches_postsrsd(vector: dict[str, Any]) -> None:
    signer, _ = make([s.encode() for s in vector["signed_with"]])
    assert signer.forward("dave@example.org") == vector["address"]
    srs, _ = make([s.encode() for s in vector["verify_secrets"]], t=vector["now"])
    if vector["ok"]:
        assert srs.reverse(vector["address"]) == vector["result"]
    else:
        assert reason_of(srs, vector["address"]) is LIBSRS2_REASONS[vector["result"]]


# --- Forward and reverse rules. ---


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.com",
        "Bob.Smith+tag@Mail.Example.NET",
        "odd=local=part@example.com",
        "josé@exämple.fr",
        "a@b",
    ],
)
def test_srs0_round_trip(sender: str) -> None:
    srs, _ = make()
    forwarded = srs.forward(sender)
    assert forwarded.startswith("SRS0=") and forwarded.endswith("@" + DOMAIN)
    assert srs.reverse(forwarded) == sender
    local = forwarded.rpartition("@")[0]
    if "@" not in local:  # a bare local part works too, when it cannot be mistaken
        assert srs.reverse(local) == sender


@pytest.mark.parametrize("sender", ['"quoted@local"@example.com', '"john doe"@example.net',
                                    "user@[192.0.2.1]", "user@[IPv6:2001:db8::1]"])
def test_a_sender_that_cannot_be_a_dot_string_goes_under_a_key(sender: str) -> None:
    """RFC 5321 4.1.2: an SRS0 local part holding a quoted string or an address literal
    would not be a valid address; such senders are stored under a key instead."""
    srs, _ = make()
    with pytest.raises(SrsTooLong):
        srs.forward(sender)


def test_srs0_of_another_forwarder_becomes_srs1_and_bounces_back_hop_by_hop() -> None:
    first = Srs([b"first hop secret"], "first.example", Clock())
    ours, _ = make()
    hop1 = first.forward("alice@example.com")
    hop2 = ours.forward(hop1)
    assert hop2.startswith("SRS1=") and "=first.example==" in hop2
    # libsrs2 srs_parse_guarded: we send the bounce to the first hop's SRS0 address...
    back_to_first = ours.reverse(hop2)
    assert back_to_first == hop1
    # ...and only the first hop, which knows its secret, recovers the original sender.
    assert first.reverse(str(back_to_first)) == "alice@example.com"


def test_srs1_is_rewrapped_keeping_the_first_hop() -> None:
    first = Srs([b"first"], "first.example", Clock())
    second = Srs([b"second"], "second.example", Clock())
    ours, _ = make()
    hop1 = first.forward("alice@example.com")
    hop2 = second.forward(hop1)
    hop3 = ours.forward(hop2)
    assert hop3.rpartition("@")[0].split("=", 2)[2] == hop2.rpartition("@")[0].split("=", 2)[2]
    # The bounce skips the second hop and goes straight to the first (Shevek's SRS1 design).
    assert ours.reverse(hop3) == hop1
    assert reason_of(second, hop3) is SrsReason.BAD_HASH  # signed with our secret, not theirs


def test_srs1_carries_no_timestamp_so_never_expires() -> None:
    srs, clock = make()
    address = srs.forward("SRS0=abcd=TT=example.com=alice@other.example")
    clock.t += 400 * DAY
    assert srs.reverse(address) == "SRS0=abcd=TT=example.com=alice@other.example"


def test_hash_is_compared_case_insensitively() -> None:
    srs, _ = make()
    address = srs.forward("alice@example.com")
    tag, hash_, rest = address.split("=", 2)
    assert srs.reverse(f"{tag}={hash_.swapcase()}={rest}") == "alice@example.com"
    assert srs.reverse(address.upper()) == "ALICE@EXAMPLE.COM"


def _tamper(address: str, index: int, value: str) -> str:
    local, _, domain = address.rpartition("@")
    fields = local.split("=", 4)
    fields[index] = value
    return "=".join(fields) + "@" + domain


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [
        (1, "AAAA", SrsReason.BAD_HASH),  # hash
        (1, "JDwYx", SrsReason.BAD_HASH),  # a longer hash is not a prefix match
        (2, "MT", SrsReason.BAD_HASH),  # timestamp moved back a day
        (3, "example.net", SrsReason.BAD_HASH),  # domain
        (4, "mallory", SrsReason.BAD_HASH),  # local part
        (1, "J", SrsReason.HASH_TOO_SHORT),
        (1, "JDw", SrsReason.HASH_TOO_SHORT),
        (1, "", SrsReason.MALFORMED),
        (2, "M!", SrsReason.MALFORMED),
        (2, "MUU", SrsReason.MALFORMED),
        (0, "SRS2", SrsReason.NOT_SRS),
    ],
)
def test_tampered_addresses_are_refused(index: int, value: str, reason: SrsReason) -> None:
    srs, _ = make()
    address = srs.forward("alice@example.com")
    assert address == "SRS0=JDwY=MU=example.com=alice@" + DOMAIN
    assert reason_of(srs, _tamper(address, index, value)) is reason


@pytest.mark.parametrize(
    "address",
    ["SRS0=JDwY=MU=example.com", "SRS0=JDwY=MU=example.com=", "SRS0=", "SRS1=abcd=host", "SRS1="],
)
def test_malformed(address: str) -> None:
    srs, _ = make()
    assert reason_of(srs, address + "@" + DOMAIN) is SrsReason.MALFORMED


@pytest.mark.parametrize("hash_length", [0, 1, 3, 28])
def test_short_or_impossible_hash_lengths_are_refused_in_config(hash_length: int) -> None:
    with pytest.raises(ValueError):
        make(hash_length=hash_length)


def test_min_hash_length_lets_a_longer_hash_length_accept_old_short_hashes() -> None:
    old, _ = make()
    address = old.forward("alice@example.com")
    strict, _ = make(hash_length=6)
    assert reason_of(strict, address) is SrsReason.HASH_TOO_SHORT
    lenient, _ = make(hash_length=6, min_hash_length=4)
    assert lenient.reverse(address) == "alice@example.com"
    with pytest.raises(ValueError):
        make(hash_length=6, min_hash_length=3)


@pytest.mark.parametrize(
    ("age_days", "max_age", "ok"),
    [(0, 21, True), (20, 21, True), (21, 21, True), (22, 21, False), (1023, 21, False),
     (1024, 21, True),  # the 10-bit day number wraps (libsrs2): accepted as 0 days old
     (3, 2, False), (2, 2, True)],
)
def test_timestamp_validity(age_days: int, max_age: int, ok: bool) -> None:
    srs, clock = make(max_age_days=max_age)
    address = srs.forward("alice@example.com")
    clock.t += age_days * DAY
    if ok:
        assert srs.reverse(address) == "alice@example.com"
    else:
        assert reason_of(srs, address) is SrsReason.EXPIRED


def test_timestamp_from_the_future_is_refused() -> None:
    srs, clock = make()
    clock.t += 2 * DAY
    address = srs.forward("alice@example.com")
    clock.t -= 2 * DAY
    assert reason_of(srs, address) is SrsReason.EXPIRED


def test_unknown_secret_is_refused() -> None:
    signer, _ = make([b"somebody else's secret"])
    srs, _ = make()
    assert reason_of(srs, signer.forward("alice@example.com")) is SrsReason.BAD_HASH


def test_rotation_signs_with_the_first_secret_and_verifies_with_all() -> None:
    old, new = b"the old secret, still valid", b"the new secret"
    before, _ = make([old])
    in_flight = before.forward("alice@example.com")
    rotated, _ = make([new, old])
    only_new, _ = make([new])
    fresh = rotated.forward("alice@example.com")
    assert fresh == only_new.forward("alice@example.com") != in_flight
    assert rotated.reverse(in_flight) == rotated.reverse(fresh) == "alice@example.com"
    assert reason_of(only_new, in_flight) is SrsReason.BAD_HASH


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("", ""),  # RFC 5321 4.5.5: the null sender stays null
        ("someone@" + DOMAIN, "someone@" + DOMAIN),  # libsrs2: our own domain is kept
        ("x@FWD.Example.ORG", "x@FWD.Example.ORG"),
    ],
)
def test_senders_left_alone(sender: str, expected: str) -> None:
    srs, _ = make()
    assert srs.forward(sender) == expected


@pytest.mark.parametrize("sender", ["postmaster", "@example.com", "alice@", "alice@1"])
def test_forward_refuses_senders_without_a_real_domain(sender: str) -> None:
    srs, _ = make()
    with pytest.raises(SrsError) as info:
        srs.forward(sender)
    assert info.value.reason is SrsReason.MALFORMED


@pytest.mark.parametrize(
    ("local", "expected"),
    [("SRS0=abcd", True), ("srs1+x", True), ("SrS0-", True), ("SRS0", False),
     ("SRS2=abcd", False), ("SRS0_x", False), ("alice", False), ("", False)],
)
def test_is_srs_local(local: str, expected: bool) -> None:
    assert is_srs_local(local) is expected


def test_reasons_are_the_admin_texts() -> None:
    assert str(SrsError(SrsReason.BAD_HASH)) == "bad hash"
    assert {r.value for r in SrsReason} == {
        "not an SRS address", "malformed", "hash too short", "bad hash", "expired timestamp",
        "unknown key",
    }


# --- Long senders (postsrsd issue #108). ---

LONG_LOCAL = "very.long.local.part.from.a.mailing.list+bounces-123456789"
LONG_SENDER = f"{LONG_LOCAL}@lists.some-long-domain.example.com"


def test_long_sender_goes_through_a_key() -> None:
    srs, clock = make()
    with pytest.raises(SrsTooLong) as info:
        srs.forward(LONG_SENDER)
    assert info.value.sender == LONG_SENDER
    key = new_key()
    address = srs.forward_with_key(key)
    local = address.rpartition("@")[0]
    assert len(local.encode()) <= 64
    assert local.startswith("SRS0=") and local.endswith(f"=MU=1={key}")
    assert srs.reverse(address) == KeyRef(key)
    assert srs.reverse(address.lower()) == KeyRef(key)  # keys are upper-case base32
    assert reason_of(srs, address.replace(key, new_key())) is SrsReason.BAD_HASH
    clock.t += 22 * DAY
    assert reason_of(srs, address) is SrsReason.EXPIRED


def test_srs1_wrap_that_is_too_long_also_needs_a_key() -> None:
    srs, _ = make()
    with pytest.raises(SrsTooLong):
        srs.forward("SRS0=abcd=TT=some-long-domain.example.com=" + LONG_LOCAL + "@other.example")


def test_longest_local_part_that_fits() -> None:
    srs, _ = make()
    prefix = len("SRS0=JDwY=MU=example.com=")
    fits = "a" * (64 - prefix) + "@example.com"
    assert len(srs.forward(fits).rpartition("@")[0]) == 64
    with pytest.raises(SrsTooLong):
        srs.forward("a" + fits)


@pytest.mark.parametrize("key", ["", "short", "A" * 15, "A" * 17, "0" * 16, "A" * 15 + "="])
def test_forward_with_key_refuses_foreign_keys(key: str) -> None:
    srs, _ = make()
    with pytest.raises(ValueError):
        srs.forward_with_key(key)


def test_new_keys_are_16_base32_chars_and_distinct() -> None:
    keys = {new_key() for _ in range(200)}
    assert len(keys) == 200
    assert all(len(k) == 16 and set(k) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for k in keys)


# --- Property: whatever the sender, a bounce finds its way back. ---

_ATOM = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~",
                min_size=1, max_size=20)
_LOCAL = st.lists(_ATOM, min_size=1, max_size=4).map(".".join)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join).filter(
    lambda d: d not in ("1", DOMAIN)
)


@settings(database=None, suppress_health_check=[HealthCheck.too_slow])
@example(local="SRS1=x", domain="example.com", age=0, secret=b"k")  # malformed SRS1
@example(local="SRS0=x", domain="other.example", age=21, secret=b"k")
@given(local=_LOCAL, domain=_DOMAIN, age=st.integers(0, 21), secret=st.binary(min_size=1))
def test_round_trip_property(local: str, domain: str, age: int, secret: bytes) -> None:
    srs, clock = make([secret, b"older"])
    sender = f"{local}@{domain}"
    try:
        forwarded: str | KeyRef = srs.forward(sender)
        expected: str | KeyRef = sender
    except SrsTooLong:
        key = new_key()
        forwarded, expected = srs.forward_with_key(key), KeyRef(key)
    assert isinstance(forwarded, str)
    assert len(forwarded.rpartition("@")[0].encode()) <= 64
    clock.t += age * DAY
    result = srs.reverse(forwarded)
    if forwarded.startswith("SRS1="):
        # Another forwarder's address: the bounce goes to its first hop (libsrs2).
        assert is_srs_local(local) and isinstance(result, str) and result.startswith("SRS0")
    else:
        assert result == expected
