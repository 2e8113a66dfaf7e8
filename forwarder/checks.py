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
from forwarder.authcheck import ThreadDns, check_spf, verify_dkim
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
from forwarder.dns import CachingResolver, DnsError, DnsTemporaryError, txt_text
from forwarder.metrics import Metrics
from forwarder.ratelimit import RateLimiter
from forwarder.rspamd import Envelope, RspamdClient, RspamdError, spam_headers
from forwarder.senders import SenderTally

LOG = log.get("forwarder.checks")


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


def _scan(message: bytes, authserv_id: str) -> _Scan:
    """The header section's part of the work (in a worker thread: it is proportional to
    the header's size)."""
    end = header_end(message)
    header = message[:end]
    content, removed = remove_our_results(message, end, authserv_id)
    return _Scan(content, removed, from_domains(header), has_dkim_signature(header))


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
        # SPF and DKIM may wait on DNS up to the deadline; the header scan never does, so it
        # has threads of its own and never queues behind a slow name server.
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.checks.threads,
                                                          thread_name_prefix="checks")
        self.scan_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="scan")
        self.rspamd = RspamdClient(settings.rspamd) if settings.rspamd.url else None
        self.limiter = RateLimiter(settings.rate_limits, now)

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
    def splits_roles(self) -> bool:
        """Role-account recipients get a transaction of their own (checkpolicy)."""
        return self.rspamd is not None

    async def close(self) -> None:
        if self.rspamd is not None:
            await self.rspamd.close()
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
        dns = ThreadDns(self.resolver, loop, deadline) if self.resolver else None
        spf_task = (loop.run_in_executor(self.pool, check_spf, dns, message.client,
                                         message.mailfrom, message.helo)
                    if dns is not None else None)
        scan = await loop.run_in_executor(self.scan_pool, _scan, message.content,
                                          self.settings.authserv_id)
        dkim_task = (loop.run_in_executor(self.pool, verify_dkim, dns, message.content)
                     if dns is not None and scan.signed else None)
        mode = DmarcMode(self.settings.checks.dmarc_reject)
        discovery = asyncio.ensure_future(self._discover_all(
            scan.from_domains if mode is not DmarcMode.OFF else []))
        tasks: list[asyncio.Future[Any]] = [t for t in (spf_task, dkim_task, discovery) if t]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        discovery.cancel()
        spf = _done(spf_task) or SpfResult("temperror", _spf_domain(message), message.mailfrom,
                                           message.helo)
        dkim = _dkim_results(dkim_task, scan.signed)
        found = _done(discovery) or [Discovery(None, temperror=True)] * len(scan.from_domains)
        if mode is DmarcMode.OFF:
            found = [Discovery(None)] * len(scan.from_domains)
        outcomes = self._dmarc(scan.from_domains, found, spf, dkim)
        return self._conclude(message, scan, spf, dkim, outcomes, mode)

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

    async def _discover_all(self, domains: list[str]) -> list[Discovery]:
        if self.resolver is None:  # no resolver could be configured: DNS cannot answer
            return [Discovery(None, temperror=True) for _ in domains]
        return list(await asyncio.gather(*(self._discover(d) for d in domains)))

    async def _discover(self, domain: str) -> Discovery:
        """RFC 7489 6.6.3: the From domain's record, else its organisational domain's."""
        try:
            record = choose_record(await self._txt(f"_dmarc.{domain}"))
            if record is not None:
                return Discovery(record)
            org = organizational_domain(domain)
            if org != domain:
                record = choose_record(await self._txt(f"_dmarc.{org}"))
                if record is not None:
                    return Discovery(record, at_org_domain=True)
            return Discovery(None)
        except DnsTemporaryError:
            return Discovery(None, temperror=True)
        except DnsError:  # a name that cannot exist: nothing published
            return Discovery(None)

    async def _txt(self, name: str) -> list[str]:
        assert self.resolver is not None
        found = await self.resolver.lookup(name, "TXT")
        return [txt_text(r).decode("utf-8", "replace") for r in found.rdata]

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
