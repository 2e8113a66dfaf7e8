"""The inbound checks' pure parts, from tables: DMARC (records, organisational domains,
alignment, results), what each outcome means for the message, the rate buckets and the
sender tally. No I/O, no event loop."""

from __future__ import annotations

import pytest

from forwarder import replies
from forwarder.checkpolicy import (
    ACCEPT,
    DmarcMode,
    Survival,
    dmarc_decision,
    filter_failure_decision,
    is_spam,
    rate_decision,
    separate_transaction,
    spam_decision,
    survival,
)
from forwarder.clock import FakeClock
from forwarder.config import RateLimits
from forwarder.dmarc import (
    Discovery,
    Identity,
    Outcome,
    Record,
    Result,
    aligned,
    choose_record,
    evaluate,
    organizational_domain,
    parse_record,
    worst,
)
from forwarder.ratelimit import Buckets, RateLimiter
from forwarder.senders import SenderCount, SenderTally

# --- DMARC records ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", Record(p="reject")),
        ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=50",
         Record(p="quarantine", sp="none", strict_dkim=True, strict_spf=True, pct=50)),
        ("  v = DMARC1 ; P=Reject ; rua=mailto:d@example.org", Record(p="reject")),
        ("v=DMARC1", Record(p="none")),  # no p=: treated as none (RFC 7489 6.6.3 step 6)
        ("v=DMARC1; p=bogus; sp=bogus; pct=150", Record(p="none", pct=100)),
        ("v=DMARC1; p=reject; pct=x", Record(p="reject", pct=100)),
        ("v=DMARC1; p=reject; p=none", Record(p="reject")),  # the first of a repeated tag
        ("v=dmarc1; p=reject", None),  # "DMARC1" is case-sensitive (6.4)
        ("p=reject; v=DMARC1", None),  # v= must come first
        ("v=spf1 -all", None),
        ("", None),
    ],
)
def test_parse_record(text: str, expected: Record | None) -> None:
    assert parse_record(text) == expected


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ([], None),
        (["v=spf1 -all", "v=DMARC1; p=reject"], Record(p="reject")),
        (["v=DMARC1; p=reject", "v=DMARC1; p=none"], None),  # two records: no policy
        (["something else"], None),
    ],
)
def test_choose_record(texts: list[str], expected: Record | None) -> None:
    assert choose_record(texts) == expected


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("jobteaser.com", "jobteaser.com"),
        ("mail.sigma-clermont.jobteaser.com", "jobteaser.com"),
        ("JobTeaser.COM.", "jobteaser.com"),
        ("x.co.uk", "x.co.uk"),
        ("a.b.x.co.uk", "x.co.uk"),
        ("co.uk", "co.uk"),  # a public suffix is its own
        ("someone.github.io", "someone.github.io"),  # the list's private section counts
        ("news.spoofer.example", "spoofer.example"),  # an unknown TLD: one label
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("from_domain", "identifier", "strict", "expected"),
    [
        ("jobteaser.com", "jobteaser.com", True, True),
        ("jobteaser.com", "JOBTEASER.com.", True, True),
        ("jobteaser.com", "mail.jobteaser.com", False, True),
        ("jobteaser.com", "mail.jobteaser.com", True, False),
        ("news.jobteaser.com", "bounce.jobteaser.com", False, True),
        ("jobteaser.com", "jobteaser.net", False, False),
        ("a.co.uk", "b.co.uk", False, False),  # siblings under a public suffix
        ("a.github.io", "b.github.io", False, False),
    ],
)
def test_alignment(from_domain: str, identifier: str, strict: bool, expected: bool) -> None:
    assert aligned(from_domain, identifier, strict) is expected


REJECT = Discovery(Record(p="reject"))
SPF_PASS = Identity("pass", "bounces.jobteaser.com")
SPF_FAIL = Identity("fail", "jobteaser.com")
DKIM_PASS = Identity("pass", "jobteaser.com")
DKIM_OTHER = Identity("pass", "esp.example")


@pytest.mark.parametrize(
    ("found", "spf", "dkim", "sample", "result", "disposition", "dkim_ok", "spf_ok"),
    [
        (REJECT, SPF_PASS, [DKIM_PASS], 0.0, Result.PASS, "none", True, True),
        (REJECT, SPF_FAIL, [DKIM_PASS], 0.0, Result.PASS, "none", True, False),
        (REJECT, SPF_PASS, [], 0.0, Result.PASS, "none", False, True),
        # A passing signature of another domain does not align.
        (REJECT, SPF_FAIL, [DKIM_OTHER], 0.0, Result.FAIL, "reject", False, False),
        (REJECT, None, [], 0.0, Result.FAIL, "reject", False, False),
        # pct=50: half the failures get the next less strict policy (RFC 7489 6.6.4).
        (Discovery(Record(p="reject", pct=50)), SPF_FAIL, [], 0.49, Result.FAIL, "reject",
         False, False),
        (Discovery(Record(p="reject", pct=50)), SPF_FAIL, [], 0.5, Result.FAIL, "quarantine",
         False, False),
        # A temporary failure that might have passed is never a failure.
        (REJECT, Identity("temperror", "jobteaser.com"), [], 0.0, Result.TEMPERROR, "",
         False, False),
        (REJECT, SPF_FAIL, [Identity("temperror", "jobteaser.com")], 0.0, Result.TEMPERROR,
         "", False, False),
        (Discovery(None, temperror=True), SPF_PASS, [], 0.0, Result.TEMPERROR, "", False,
         True),
        # No record: none, but the alignment is still known (the sender report).
        (Discovery(None), SPF_PASS, [DKIM_PASS], 0.0, Result.NONE, "", True, True),
        # Strict alignment.
        (Discovery(Record(p="reject", strict_spf=True)), SPF_PASS, [], 0.0, Result.FAIL,
         "reject", False, False),
    ],
)
def test_evaluate(found: Discovery, spf: Identity | None, dkim: list[Identity], sample: float,
                  result: Result, disposition: str, dkim_ok: bool, spf_ok: bool) -> None:
    outcome = evaluate("jobteaser.com", found, spf, dkim, sample)
    assert (outcome.result, outcome.disposition, outcome.dkim_aligned, outcome.spf_aligned) == (
        result, disposition, dkim_ok, spf_ok)


def test_subdomain_policy_applies_to_subdomains_through_the_org_record() -> None:
    found = Discovery(Record(p="reject", sp="none"), at_org_domain=True)
    outcome = evaluate("news.jobteaser.com", found, SPF_FAIL, [], 0.0)
    assert (outcome.result, outcome.policy, outcome.disposition) == (Result.FAIL, "none", "none")
    direct = evaluate("jobteaser.com", Discovery(Record(p="reject", sp="none")), SPF_FAIL, [],
                      0.0)
    assert direct.disposition == "reject"


def _outcome(result: Result, disposition: str = "", policy: str = "") -> Outcome:
    return Outcome(result, "example.org", policy, disposition, False, False)


def test_worst_of_several_from_domains() -> None:
    fail = _outcome(Result.FAIL, "reject", "reject")
    assert worst([_outcome(Result.PASS), fail, _outcome(Result.NONE)]) is fail
    assert worst([_outcome(Result.NONE), _outcome(Result.TEMPERROR)]).result is Result.TEMPERROR


# --- what the outcomes mean ----------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "mode", "fail_open", "reply"),
    [
        (_outcome(Result.FAIL, "reject", "reject"), DmarcMode.REJECT, True,
         replies.DMARC_REJECTED),
        (_outcome(Result.FAIL, "reject", "reject"), DmarcMode.MARK, True, None),
        (_outcome(Result.FAIL, "reject", "reject"), DmarcMode.OFF, False, None),
        (_outcome(Result.FAIL, "quarantine", "quarantine"), DmarcMode.REJECT, True, None),
        (_outcome(Result.FAIL, "quarantine", "reject"), DmarcMode.REJECT, True, None),  # pct
        (_outcome(Result.FAIL, "none", "none"), DmarcMode.REJECT, True, None),
        (_outcome(Result.PASS, "none", "reject"), DmarcMode.REJECT, False, None),
        (_outcome(Result.NONE), DmarcMode.REJECT, False, None),
        (_outcome(Result.PERMERROR), DmarcMode.REJECT, False, None),
        # A DNS failure is never a 5xx: forwarded, or 451 when failing closed.
        (_outcome(Result.TEMPERROR), DmarcMode.REJECT, True, None),
        (_outcome(Result.TEMPERROR), DmarcMode.REJECT, False, replies.CHECKS_UNAVAILABLE),
        (_outcome(Result.TEMPERROR, "", "reject"), DmarcMode.REJECT, False,
         replies.CHECKS_UNAVAILABLE),
        (_outcome(Result.TEMPERROR, "", "none"), DmarcMode.REJECT, False, None),
        (_outcome(Result.TEMPERROR), DmarcMode.MARK, False, None),
        (None, DmarcMode.REJECT, False, None),
    ],
)
def test_dmarc_decision(outcome: Outcome | None, mode: DmarcMode, fail_open: bool,
                        reply: replies.Reply | None) -> None:
    decision = dmarc_decision(outcome, mode, fail_open)
    assert decision.reply == reply
    assert decision.reply is None or not (decision.reply.is_temporary
                                          and decision.reply.code >= 500)


@pytest.mark.parametrize(
    ("action", "role_only", "reply", "spam"),
    [
        ("reject", False, replies.SPAM_REJECTED, True),
        ("soft reject", False, replies.SPAM_DEFERRED, True),
        ("greylist", False, replies.SPAM_DEFERRED, True),
        ("add header", False, None, True),
        ("rewrite subject", False, None, True),
        ("no action", False, None, False),
        ("some custom action", False, None, True),
        # postmaster@ is never refused for spam (RFC 5321 4.5.1): forwarded, marked.
        ("reject", True, None, True),
        ("soft reject", True, None, True),
        ("greylist", True, None, True),
    ],
)
def test_spam_decision(action: str, role_only: bool, reply: replies.Reply | None,
                       spam: bool) -> None:
    assert spam_decision(action, role_only).reply == reply
    assert is_spam(action) is spam


def test_failures_and_limits() -> None:
    assert filter_failure_decision(True) == ACCEPT
    assert filter_failure_decision(False).reply == replies.FILTER_UNAVAILABLE
    assert str(rate_decision("client").reply).startswith("451 4.7.0")
    assert str(rate_decision("recipient").reply).startswith("451 4.7.0")
    for reply in (replies.SPAM_REJECTED, replies.DMARC_REJECTED):
        assert str(reply).startswith("550 5.7.1")
    assert str(replies.SPAM_DEFERRED).startswith("451 4.7.1")


@pytest.mark.parametrize(
    ("dkim_ok", "spf_ok", "expected"),
    [(True, True, Survival.DKIM), (True, False, Survival.DKIM),
     (False, True, Survival.SPF_ONLY), (False, False, Survival.UNALIGNED)],
)
def test_survival(dkim_ok: bool, spf_ok: bool, expected: Survival) -> None:
    outcome = Outcome(Result.PASS, "example.org", "reject", "none", dkim_ok, spf_ok)
    assert survival(outcome) is expected


@pytest.mark.parametrize(("first", "this", "expected"),
                         [(True, True, False), (False, False, False), (True, False, True),
                          (False, True, True)])
def test_separate_transaction(first: bool, this: bool, expected: bool) -> None:
    assert separate_transaction(first, this) is expected


# --- rate buckets ----------------------------------------------------------------------


def test_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    buckets = Buckets(60, 60.0, clock.now)  # one a second, 60 at most
    for _ in range(60):
        assert buckets.tokens("a") >= 1
        buckets.take("a")
    assert buckets.tokens("a") < 1
    clock.advance(1.0)
    assert buckets.tokens("a") == pytest.approx(1.0)
    clock.advance(3600)
    assert buckets.tokens("a") == 60  # never more than the capacity


def test_buckets_forget_full_ones_when_the_table_is_full() -> None:
    clock = FakeClock()
    buckets = Buckets(10, 60.0, clock.now, max_keys=4)
    for key in "abcd":
        buckets.take(key)
    clock.advance(60)  # all full again
    buckets.take("e")
    assert len(buckets) == 1


def test_limiter_takes_all_tokens_or_none() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(client_per_minute=3, recipient_per_hour=2, exempt=()),
                          clock.now)
    assert limiter.admit("192.0.2.1", ["a@x", "B@x"]) is None
    assert limiter.admit("192.0.2.1", ["a@x"]) is None
    refused = limiter.admit("192.0.2.1", ["a@x", "c@x"])  # a@x is empty now
    assert refused is not None and (refused.scope, refused.key) == ("recipient", "a@x")
    # Nothing was taken for c@x or the client: one more message still fits.
    assert limiter.admit("192.0.2.1", ["c@x"]) is None
    client = limiter.admit("192.0.2.1", ["d@x"])
    assert client is not None and client.scope == "client"
    clock.advance(20)  # a third of a minute: one client token back
    assert limiter.admit("192.0.2.1", ["d@x"]) is None


def test_exempt_clients_and_disabled_limits() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(client_per_minute=1, recipient_per_hour=0,
                                     exempt=("10.0.0.0/8", "::1")), clock.now)
    for _ in range(5):
        assert limiter.admit("10.1.2.3", ["a@x"]) is None
        assert limiter.admit("::1", ["a@x"]) is None
    assert limiter.admit("192.0.2.1", ["a@x"]) is None
    assert limiter.admit("192.0.2.1", ["a@x"]) is not None
    assert not RateLimiter(RateLimits(0, 0, ()), clock.now).enabled


# --- the sender tally -----------------------------------------------------------------


async def test_tally_counts_by_domain_and_day_and_keeps_a_failed_flush() -> None:
    clock = FakeClock(86400 * 20000 + 10)
    tally = SenderTally(clock.now)
    tally.record("jobteaser.com", Survival.DKIM, "reject")
    tally.record("jobteaser.com", Survival.SPF_ONLY, "reject")
    clock.advance(86400)
    tally.record("jobteaser.com", Survival.UNALIGNED, "reject")

    async def broken(rows: list[SenderCount]) -> None:
        raise OSError("disk on fire")

    assert await tally.flush(broken) == 0
    tally.record("jobteaser.com", Survival.DKIM, "reject")
    written: list[SenderCount] = []

    async def write(rows: list[SenderCount]) -> None:
        written.extend(rows)

    assert await tally.flush(write) == 2
    by_day = {r.day: (r.dkim_aligned, r.spf_only, r.unaligned) for r in written}
    assert by_day == {20000: (1, 1, 0), 20001: (1, 0, 1)}
    assert await tally.flush(write) == 0
