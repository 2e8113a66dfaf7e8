"""DMARC (RFC 7489) without I/O: the record's tags, the organisational domain, identifier
alignment and the result for one From domain.

The DNS side (which TXT records `_dmarc.<domain>` holds) is the caller's (forwarder/checks.py,
through the daemon's resolver); everything here is a plain function of its arguments, tested
from tables. The organisational domain comes from the public-suffix list shipped in the
`publicsuffixlist` package (never fetched at run time), loaded once per process.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

# RFC 7489 6.4: the version tag must come first, exactly "v=DMARC1" (case matters in
# "DMARC1"); whitespace around "=" and ";" is allowed.
_VERSION = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
_POLICIES = frozenset({"none", "quarantine", "reject"})


class Result(enum.StrEnum):
    """RFC 8601 2.7.1's dmarc= results (RFC 7489 11.2)."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"  # no DMARC record published: nothing to apply
    TEMPERROR = "temperror"  # DNS could not tell, now
    PERMERROR = "permerror"  # no usable From domain


@dataclass(frozen=True)
class Record:
    """The tags of a DMARC record that decide what a receiver does (RFC 7489 6.3)."""

    p: str = "none"
    sp: str | None = None
    strict_dkim: bool = False  # adkim=s
    strict_spf: bool = False  # aspf=s
    pct: int = 100


@dataclass(frozen=True)
class Identity:
    """An authenticated identifier: an SPF or DKIM result and the domain it is about."""

    result: str  # "pass", "fail", "temperror", ... (RFC 8601 values)
    domain: str


@dataclass(frozen=True)
class Discovery:
    """What policy discovery (RFC 7489 6.6.3) found for a From domain."""

    record: Record | None
    at_org_domain: bool = False  # found at the organisational domain, not the From domain
    temperror: bool = False


@dataclass(frozen=True)
class Outcome:
    result: Result
    domain: str  # the RFC 5322.From domain
    policy: str  # the published policy that applies (p, or sp for a subdomain); "" if none
    disposition: str  # what the policy asks for this message, after pct sampling
    dkim_aligned: bool  # an aligned DKIM signature passed: survives forwarding
    spf_aligned: bool  # aligned SPF passed: does not survive forwarding


@functools.cache
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label; a public suffix is its own."""
    name = domain.lower().rstrip(".")
    return _suffixes().privatesuffix(name) or name


def aligned(from_domain: str, identifier: str, strict: bool) -> bool:
    """RFC 7489 3.1: strict alignment is the same domain, relaxed the same organisational
    domain."""
    a, b = from_domain.lower().rstrip("."), identifier.lower().rstrip(".")
    if a == b:
        return True
    return not strict and organizational_domain(a) == organizational_domain(b)


def parse_record(text: str) -> Record | None:
    """The record's tags, or None if the text is not a DMARC record (RFC 7489 6.6.3 step 5
    discards those). Unknown tags are ignored; invalid values take the defaults (6.3),
    and a missing or invalid p= means none (6.6.3 step 6)."""
    if not _VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip().lower())
    p = tags.get("p", "none")
    sp = tags.get("sp")
    return Record(
        p=p if p in _POLICIES else "none",
        sp=sp if sp in _POLICIES else None,
        strict_dkim=tags.get("adkim") == "s",
        strict_spf=tags.get("aspf") == "s",
        pct=_percent(tags.get("pct")),
    )


def _percent(value: str | None) -> int:
    if value is None or not value.isdigit():
        return 100
    return min(int(value), 100)


def choose_record(texts: Sequence[str]) -> Record | None:
    """RFC 7489 6.6.3 step 5: of the TXT records at _dmarc.<domain>, those that are DMARC
    records; exactly one is used, none or several mean no policy here."""
    records = [r for r in (parse_record(t) for t in texts) if r is not None]
    return records[0] if len(records) == 1 else None


def evaluate(
    from_domain: str, found: Discovery, spf: Identity | None, dkim: Sequence[Identity],
    sample: float,
) -> Outcome:
    """The DMARC result for one From domain (RFC 7489 6.6.2 and 6.6.4).

    `sample` in [0, 1) decides pct= (6.6.4: a message outside the percentage gets the next
    less strict policy). Alignment is computed even without a record (relaxed), for the
    "survives forwarding" report."""
    record = found.record or Record()
    dkim_ok = any(d.result == "pass" and aligned(from_domain, d.domain, record.strict_dkim)
                  for d in dkim)
    spf_ok = (spf is not None and spf.result == "pass"
              and aligned(from_domain, spf.domain, record.strict_spf))

    def outcome(result: Result, policy: str = "", disposition: str = "") -> Outcome:
        return Outcome(result, from_domain, policy, disposition, dkim_ok, spf_ok)

    if found.temperror:
        return outcome(Result.TEMPERROR)
    if found.record is None:
        return outcome(Result.NONE)
    policy = _applicable_policy(from_domain, found)
    if dkim_ok or spf_ok:
        return outcome(Result.PASS, policy, "none")
    # A check that could not conclude might have passed: never a failure on that basis
    # (a temporary error is a retry, never a 5xx).
    unsure = (spf is not None and spf.result == "temperror") or any(
        d.result == "temperror" for d in dkim)
    if unsure:
        return outcome(Result.TEMPERROR, policy)
    return outcome(Result.FAIL, policy, _sampled(policy, record.pct, sample))


def _applicable_policy(from_domain: str, found: Discovery) -> str:
    """p=, or sp= when the record is the organisational domain's and the From domain is
    one of its subdomains (RFC 7489 6.3)."""
    assert found.record is not None
    if found.at_org_domain and found.record.sp is not None:
        return found.record.sp
    return found.record.p


def _sampled(policy: str, pct: int, sample: float) -> str:
    """RFC 7489 6.6.4: outside pct=, reject becomes quarantine and quarantine none."""
    if sample * 100 < pct:
        return policy
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")


_SEVERITY = {Result.FAIL: 4, Result.TEMPERROR: 3, Result.PERMERROR: 2, Result.NONE: 1,
             Result.PASS: 0}


def worst(outcomes: Sequence[Outcome]) -> Outcome:
    """A message with several From domains (RFC 7489 6.6.1) is judged by its worst one."""
    return max(outcomes, key=lambda o: (_SEVERITY[o.result], o.disposition == "reject"))
