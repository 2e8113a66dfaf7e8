"""The inbound checks: one evaluation per message, after the final dot and before the 250.

In order, cheapest first: the rate limits (forwarder/ratelimit.py); SPF, DKIM and DMARC
(forwarder/authcheck.py in a bounded thread pool, forwarder/dmarc.py on the loop), recorded
in one Authentication-Results field (forwarder/authresults.py); rspamd (forwarder/rspamd.py).
What each outcome means for the message is decided in forwarder/checkpolicy.py. The result
is a refusal, or the headers to prepend and the message less any forged Authentication-
Results with our authserv-id (RFC 8601 5).

DNS goes through the daemon's own CachingResolver; the whole authentication has one deadline
(`[checks] deadline`), past which what is not known is `temperror`, never a 5xx.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forwarder import log
from forwarder.authcheck import ThreadDns, abandon, check_spf, verify_dkim
from forwarder.authresults import (
    DkimResult,
    SpfResult,
    from_domains,
    has_dkim_signature,
    header_end,
    remove_our_results,
    results_header,
)
from forwarder.checkpolicy import (
    ACCEPT,
    Decision,
    DmarcMode,
    SpamAction,
    dmarc_decision,
    filter_failure_decision,
    is_spam,
    rate_decision,
    spam_decision,
    survival,
)
from forwarder.config import Settings
from forwarder.dmarc import (
    Discovery,
    Identity,
    Outcome,
    Result,
    choose_record,
    evaluate,
    organizational_domain,
    worst,
)
from forwarder.dns import CachingResolver, DnsError, DnsTemporaryError, Lookup, txt_text
from forwarder.metrics import Metrics
from forwarder.ratelimit import RateLimiter
from forwarder.rspamd import Envelope, RspamdClient, RspamdError, spam_headers
from forwarder.senders import SenderTally

LOG = log.get("forwarder.checks")
# A header section up to this size is scanned on the event loop (bytes methods and regular
# expressions, tens of microseconds); a bigger one, or a message with no end of header
# within it, is scanned in a worker thread. A hop to a thread and back costs more than the
# scan of an ordinary header.
INLINE_HEADER = 64 * 1024


@dataclass(frozen=True)
class Inbound:
    """What the checks are asked about: one message and its envelope."""

    queue_id: str
    client: str
    helo: str
    mailfrom: str  # "" for the null sender
    recipients: Sequence[str]  # our addresses, as the client gave them
    role_only: bool  # every recipient is postmaster@ or abuse@
    content: bytes  # as received, without our Received field


@dataclass
class Checked:
    """The verdict: refuse (decision.reply), or prepend `prefix` to `content`."""

    decision: Decision
    content: bytes
    prefix: bytes = b""
    fields: dict[str, Any] = field(default_factory=dict)  # for the log line


@dataclass(frozen=True)
class _Scan:
    content: bytes  # less the forged Authentication-Results
    removed: int
    from_domains: list[str]
    signed: bool


def _small_header(message: bytes) -> bool:
    return message.startswith(b"\r\n") or message.find(b"\r\n\r\n", 0, INLINE_HEADER) >= 0


def _scan(message: bytes, authserv_id: str) -> _Scan:
    """The header section's part of the work: proportional to the header's size, so in a
    worker thread unless the header is small (INLINE_HEADER)."""
    end = header_end(message)
    header = message[:end]
    content, removed = remove_our_results(message, end, authserv_id)
    return _Scan(content, removed, from_domains(header), has_dkim_signature(header))


class SpfCache:
    """SPF results by (client address, MAIL FROM, HELO), until the first of the DNS answers
    they were computed from expires: evaluating again with the same cached answers would
    give the same result (every input of check_host() and of its macros is in the key,
    RFC 7208 4.1 and 7). A burst from one sender's address costs one evaluation, and no
    hop to a worker thread after it. Temporary errors are never kept."""

    def __init__(self, resolver: CachingResolver | None, max_entries: int = 10_000) -> None:
        self.resolver = resolver  # its clock is the one its expiries are on
        self.max_entries = max_entries
        self._results: dict[tuple[str, str, str], tuple[SpfResult, float]] = {}

    def get(self, key: tuple[str, str, str]) -> SpfResult | None:
        hit = self._results.get(key)
        if hit is None or self.resolver is None or hit[1] <= self.resolver.now():
            return None
        return hit[0]

    def put(self, key: tuple[str, str, str], result: SpfResult, dns: ThreadDns) -> None:
        if (result.result == "temperror" or dns.temporary_failures or self.resolver is None
                or dns.valid_until <= self.resolver.now()):
            return
        if len(self._results) >= self.max_entries:
            self._results.clear()
        self._results[key] = (result, dns.valid_until)


class _NotCached(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _discovery(domain: str, txt: Callable[[str], list[str]]) -> Discovery:
    """RFC 7489 6.6.3: the From domain's record, else its organisational domain's."""
    record = choose_record(txt(f"_dmarc.{domain}"))
    if record is not None:
        return Discovery(record)
    org = organizational_domain(domain)
    if org != domain:
        record = choose_record(txt(f"_dmarc.{org}"))
        if record is not None:
            return Discovery(record, at_org_domain=True)
    return Discovery(None)


def _texts(found: Lookup) -> list[str]:
    return [txt_text(r).decode("utf-8", "replace") for r in found.rdata]


class Checks:
    """One per process; the front calls `evaluate` once per message."""

    def __init__(self, settings: Settings, resolver: CachingResolver | None, metrics: Metrics,
                 tally: SenderTally, now: Callable[[], float],
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.metrics = metrics
        self.tally = tally
        self.now = now
        self.rng = rng or random.Random()
        # SPF and DKIM may wait on DNS up to the deadline; the scan of a big header never
        # does, so it has threads of its own and never queues behind a slow name server.
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.checks.threads,
                                                          thread_name_prefix="checks")
        self.scan_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="scan")
        self._waiting: set[concurrent.futures.Future[Lookup]] = set()
        self.rspamd = RspamdClient(settings.rspamd) if settings.rspamd.url else None
        self.limiter = RateLimiter(settings.rate_limits, now)
        self.spf_cache = SpfCache(resolver)

    def apply(self, settings: Settings, resolver: CachingResolver | None) -> None:
        """Start using new settings (SIGHUP); rate buckets start afresh if limits change.
        The thread count is kept until a restart."""
        old, self.settings, self.resolver = self.settings, settings, resolver
        if settings.rspamd != old.rspamd:
            if self.rspamd is not None:
                closing = asyncio.ensure_future(self.rspamd.close())
                closing.add_done_callback(lambda _: None)
            self.rspamd = RspamdClient(settings.rspamd) if settings.rspamd.url else None
        if settings.rate_limits != old.rate_limits:
            self.limiter = RateLimiter(settings.rate_limits, self.now)

    @property
    def active(self) -> bool:
        return self.settings.checks.enabled or self.rspamd is not None or self.limiter.enabled

    @property
    def reads_content(self) -> bool:
        """Whether a check reads the whole message (DKIM, rspamd), not only the rate
        limits' envelope: a spooled body is then read back into memory for it."""
        return self.settings.checks.enabled or self.rspamd is not None

    @property
    def splits_roles(self) -> bool:
        """Role-account recipients get a transaction of their own (checkpolicy)."""
        return self.rspamd is not None

    async def close(self) -> None:
        if self.rspamd is not None:
            await self.rspamd.close()
        # Threads waiting on DNS are released now, not at their deadline: the interpreter
        # joins the pool's threads before the process can exit.
        abandon(self._waiting)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.scan_pool.shutdown(wait=False, cancel_futures=True)

    async def evaluate(self, message: Inbound) -> Checked:
        refusal = self.limiter.admit(message.client, message.recipients)
        if refusal is not None:
            self.metrics.rate_limited(refusal.scope)
            return Checked(rate_decision(refusal.scope), message.content,
                           fields={"limit": refusal.scope})
        checked = Checked(ACCEPT, message.content)
        if self.settings.checks.enabled:
            checked = await self._authenticate(message)
            if checked.decision.reply is not None:
                return checked
        if self.rspamd is not None:
            await self._ask_rspamd(message, checked)
        return checked

    # --- SPF, DKIM, DMARC -------------------------------------------------------------

    async def _authenticate(self, message: Inbound) -> Checked:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.checks.deadline
        spf_key = (message.client, message.mailfrom, message.helo)
        spf = self.spf_cache.get(spf_key)
        spf_dns = self._thread_dns(loop, deadline) if spf is None else None
        spf_task = (loop.run_in_executor(self.pool, check_spf, spf_dns, message.client,
                                         message.mailfrom, message.helo)
                    if spf_dns is not None else None)
        scan = await self._scan(loop, message.content)
        dkim_dns = self._thread_dns(loop, deadline) if scan.signed else None
        dkim_task = (loop.run_in_executor(self.pool, verify_dkim, dkim_dns, message.content)
                     if dkim_dns is not None else None)
        mode = DmarcMode(self.settings.checks.dmarc_reject)
        domains = scan.from_domains if mode is not DmarcMode.OFF else []
        found = self._discover_cached(domains)
        discovery = asyncio.ensure_future(self._discover_all(domains)) if found is None else None
        tasks: list[asyncio.Future[Any]] = [t for t in (spf_task, dkim_task, discovery) if t]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        if discovery is not None:
            discovery.cancel()
            found = _done(discovery)
        if spf is None:
            spf = _done(spf_task) or SpfResult("temperror", _spf_domain(message),
                                               message.mailfrom, message.helo)
            if spf_dns is not None:
                self.spf_cache.put(spf_key, spf, spf_dns)
        if found is None:
            found = [Discovery(None, temperror=True)] * len(domains)
        if mode is DmarcMode.OFF:
            found = [Discovery(None)] * len(scan.from_domains)
        dkim = _dkim_results(dkim_task, scan.signed)
        outcomes = self._dmarc(scan.from_domains, found, spf, dkim)
        return self._conclude(message, scan, spf, dkim, outcomes, mode)

    def _thread_dns(self, loop: asyncio.AbstractEventLoop, deadline: float) -> ThreadDns | None:
        if self.resolver is None:
            return None
        return ThreadDns(self.resolver, loop, deadline, waiting=self._waiting)

    async def _scan(self, loop: asyncio.AbstractEventLoop, content: bytes) -> _Scan:
        if _small_header(content):
            return _scan(content, self.settings.authserv_id)
        return await loop.run_in_executor(self.scan_pool, _scan, content,
                                          self.settings.authserv_id)

    def _dmarc(self, domains: list[str], found: list[Discovery], spf: SpfResult,
               dkim: list[DkimResult]) -> list[Outcome]:
        if not domains:  # no usable RFC 5322.From: DMARC cannot apply (RFC 7489 6.6.1)
            return [Outcome(Result.PERMERROR, "", "", "", False, False)]
        spf_id = Identity(spf.result, spf.domain)
        dkim_ids = [Identity(d.result, d.domain) for d in dkim]
        return [evaluate(domain, disc, spf_id, dkim_ids, self.rng.random())
                for domain, disc in zip(domains, found, strict=True)]

    def _conclude(self, message: Inbound, scan: _Scan, spf: SpfResult, dkim: list[DkimResult],
                  outcomes: list[Outcome], mode: DmarcMode) -> Checked:
        verdict = worst(outcomes)
        for outcome in outcomes:
            if outcome.domain:
                self.tally.record(outcome.domain, survival(outcome), outcome.policy)
        shown = outcomes if mode is not DmarcMode.OFF else []
        header = results_header(self.settings.authserv_id, spf, dkim, shown)
        self.metrics.auth_result("spf", spf.result)
        for result in [d.result for d in dkim] or ["none"]:
            self.metrics.auth_result("dkim", result)
        if shown:
            self.metrics.auth_result("dmarc", verdict.result.value)
        fields: dict[str, Any] = {
            "spf": spf.result, "dkim": ",".join(d.result for d in dkim) or "none",
            "dmarc": verdict.result.value if shown else "off",
            "header_from": ",".join(scan.from_domains)}
        if scan.removed:
            fields["auth_results_removed"] = scan.removed
        decision = dmarc_decision(verdict, mode, self.settings.checks.fail_open)
        return Checked(decision, scan.content, header, fields)

    def _discover_cached(self, domains: list[str]) -> list[Discovery] | None:
        """Policy discovery from the resolver's cache alone, if it holds every answer
        needed (then no task is started); None otherwise."""
        if self.resolver is None:
            return [Discovery(None, temperror=True) for _ in domains]
        resolver = self.resolver

        def cached(name: str) -> list[str]:
            hit = resolver.cached(name, "TXT")
            if hit is None:
                raise _NotCached(name)
            return _texts(hit[0])

        try:
            return [_discovery(domain, cached) for domain in domains]
        except _NotCached:
            return None
        except DnsError:  # a From domain that is no DNS name: let the full path say so
            return None

    async def _discover_all(self, domains: list[str]) -> list[Discovery]:
        return list(await asyncio.gather(*(self._discover(d) for d in domains)))

    async def _discover(self, domain: str) -> Discovery:
        """_discovery, fetching what the cache lacks (at most two names)."""
        assert self.resolver is not None
        fetched: dict[str, list[str]] = {}

        def known(name: str) -> list[str]:
            if name in fetched:
                return fetched[name]
            hit = self.resolver.cached(name, "TXT") if self.resolver is not None else None
            if hit is None:
                raise _NotCached(name)
            return _texts(hit[0])

        while True:
            try:
                return _discovery(domain, known)
            except _NotCached as miss:
                try:
                    fetched[miss.name] = _texts(await self.resolver.lookup(miss.name, "TXT"))
                except DnsTemporaryError:
                    return Discovery(None, temperror=True)
                except DnsError:  # a name that cannot exist: nothing published
                    fetched[miss.name] = []
            except DnsError:
                return Discovery(None)

    # --- rspamd -----------------------------------------------------------------------

    async def _ask_rspamd(self, message: Inbound, checked: Checked) -> None:
        assert self.rspamd is not None
        envelope = Envelope(message.client, message.helo, message.mailfrom,
                            message.recipients, message.queue_id)
        try:
            verdict = await self.rspamd.check(checked.prefix + checked.content, envelope)
        except RspamdError as exc:
            fail_open = self.settings.rspamd.fail_open
            self.metrics.spam_checked("unavailable")
            LOG.warning("rspamd_unavailable", queue_id=message.queue_id, error=str(exc),
                        fail_open=fail_open)
            checked.decision = filter_failure_decision(fail_open)
            checked.fields["spam"] = "unavailable"
            return
        self.metrics.spam_checked(_action_label(verdict.action))
        checked.fields.update(spam=verdict.action, spam_score=verdict.score)
        checked.decision = spam_decision(verdict.action, message.role_only)
        if message.role_only and verdict.action in _REFUSING:
            LOG.info("spam_exempt", queue_id=message.queue_id, action=verdict.action,
                     score=verdict.score)
        checked.prefix += spam_headers(verdict, is_spam(verdict.action))


_REFUSING = frozenset({SpamAction.REJECT, SpamAction.SOFT_REJECT, SpamAction.GREYLIST})


def _action_label(action: str) -> str:
    try:
        return SpamAction(action).value.replace(" ", "_")
    except ValueError:
        return "other"


def _spf_domain(message: Inbound) -> str:
    return (message.mailfrom.rpartition("@")[2] if message.mailfrom else message.helo).lower()


def _done(task: asyncio.Future[Any] | None) -> Any:
    """A finished task's result; None if it did not finish in time."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.result()


def _dkim_results(task: asyncio.Future[Any] | None, signed: bool) -> list[DkimResult]:
    if not signed:
        return []
    results: list[DkimResult] | None = _done(task)
    return results if results is not None else [DkimResult("temperror", "", "", "")]
