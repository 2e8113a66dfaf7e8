"""Validation of redirect targets when an admin declares them (PRODUCT.md, Administration).

Two steps. `check_target` is the syntax step, offline: RFC 5321 syntax and lengths through
email-validator (in `addresses.validate_redirect_syntax`), no control characters, no quoted
or source-routed forms, not inside our own domains. `check_domains` is the DNS step: the
target's domain must have MX, or else A/AAAA, records. Each distinct domain is resolved
once, several at a time, so an import of 100,000 rows costs one lookup per domain.

A DNS failure that says nothing about the domain (timeout, SERVFAIL) is reported as such,
never as a bad address: the admin retries later or passes --no-dns-check.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

from email_validator import EmailNotValidError
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, EMAIL_MAX_LENGTH
from email_validator.syntax import validate_email_local_part

from forwarder.addresses import (
    AddressError,
    has_control_chars,
    parse_address,
    validate_redirect_syntax,
)
from forwarder.config import Settings
from forwarder.dns import CachingResolver, DnsError, DnsTemporaryError, MxRouter

DEFAULT_DNS_TIMEOUT = 5.0
# Characters that send a target down the full validator (quotes, brackets, comments, lists):
# one regular expression, not a loop over them (an import asks 100,000 times).
_UNPLAIN = re.compile(r'["<>\[\]() ,:;\\]')
# Enough to hide latency, few enough not to look like a flood to the school's resolver.
MAX_LOOKUPS_IN_FLIGHT = 16


def check_target(text: str, own_domains: tuple[str, ...]) -> str:
    """The target normalised (domain lower-cased), or AddressError with a one-line reason."""
    if has_control_chars(text):
        raise AddressError("control characters (CR, LF, TAB, NUL...) are not allowed")
    text = text.strip()
    if text.startswith("@") or text.startswith("<"):
        # RFC 5321 4.1.2 source routes ("@relay:user@host") and bracketed forms: refused
        # rather than interpreted, as is the "%" hack by the parser.
        raise AddressError("source routes and angle brackets are not allowed; give user@domain")
    if text.startswith('"'):
        raise AddressError("quoted local parts are not allowed")
    target = validate_redirect_syntax(text, own_domains)
    domain = target.rpartition("@")[2]
    for own in own_domains:
        if domain.endswith("." + own):
            # A subdomain of ours is served by the school's own mail system: mail sent
            # there may well come back here, a loop (PRODUCT.md, Loops).
            raise AddressError(f"target {target} is inside our own domain {own}: a loop")
    return target


def target_domain(target: str) -> str:
    return target.rpartition("@")[2]


class TargetValidator:
    """`check_target` for many targets at once (imports): same results, much faster.

    email-validator spends most of its ~50 us per address on the domain (IDNA, UTS #46),
    which in an export is one of a few hundred domains for 100,000 rows. So the domain's
    verdict is cached, and a plain ASCII address only has its local part checked, still by
    email-validator. Anything unusual, and every refusal, goes through `check_target`
    itself, so the reasons shown are the same.
    """

    def __init__(self, own_domains: tuple[str, ...]) -> None:
        self.own_domains = own_domains
        self._domains: dict[str, str | None] = {}  # as written -> normalised, None: bad

    def __call__(self, text: str) -> str:
        text = text.strip()
        local, _, domain = text.rpartition("@")
        if not self._plain(text, local) or self._domain(domain) is None:
            return check_target(text, self.own_domains)
        try:
            result = validate_email_local_part(local, allow_smtputf8=False)
        except EmailNotValidError:
            return check_target(text, self.own_domains)
        normalized = f"{result['local_part']}@{self._domains[domain]}"
        if len(normalized) > EMAIL_MAX_LENGTH:
            return check_target(text, self.own_domains)
        return str(parse_address(normalized))

    @staticmethod
    def _plain(text: str, local: str) -> bool:
        return (text.isascii() and text.count("@") == 1 and not has_control_chars(text)
                and not _UNPLAIN.search(text)
                and local.lower() not in CASE_INSENSITIVE_MAILBOX_NAMES)

    def _domain(self, domain: str) -> str | None:
        if domain not in self._domains:
            try:
                # "x" is a valid local part: a refusal here is about the domain.
                checked: str | None = target_domain(check_target(f"x@{domain}",
                                                                 self.own_domains))
            except AddressError:
                checked = None
            self._domains[domain] = checked
        return self._domains[domain]


@dataclass(frozen=True)
class DomainProblem:
    """Why a domain was refused; `temporary` means DNS could not tell (not a verdict)."""

    domain: str
    reason: str
    temporary: bool


def _resolver(settings: Settings, timeout: float) -> CachingResolver:
    servers = settings.dns_servers
    if servers:
        return CachingResolver([s.host for s in servers], port=servers[0].port,
                               timeout=timeout, lifetime=timeout)
    return CachingResolver(use_system_config=True, timeout=timeout, lifetime=timeout)


def _temporary(domain: str, error: DnsError) -> DomainProblem:
    what = "timed out" if error.reason == "timeout" else f"failed ({error.reason})"
    return DomainProblem(
        domain, f"DNS lookup for {domain} {what}: the address was not checked; "
        "try again later or use --no-dns-check", temporary=True)


async def _check_one(router: MxRouter, domain: str, limit: asyncio.Semaphore
                     ) -> DomainProblem | None:
    async with limit:
        try:
            if await router.has_mail_route(domain):
                return None
        except DnsTemporaryError as exc:
            return _temporary(domain, exc)
        except DnsError as exc:
            return DomainProblem(domain, f"domain {domain}: {exc.reason}", temporary=False)
    return DomainProblem(
        domain, f"domain {domain} cannot receive mail (no such domain, no MX, A or AAAA "
        "record, or a null MX)", temporary=False)


async def check_domains_async(
    domains: Iterable[str], settings: Settings, dns_timeout: float = DEFAULT_DNS_TIMEOUT,
    concurrency: int = MAX_LOOKUPS_IN_FLIGHT,
) -> dict[str, DomainProblem]:
    """The problem with each domain that cannot receive mail; {} if all can.
    `dns_timeout` bounds each domain's lookups (the resolver's lifetime)."""
    wanted = sorted(set(domains))
    if not wanted:
        return {}
    try:
        router = MxRouter(_resolver(settings, dns_timeout))
    except Exception as exc:  # no /etc/resolv.conf and no dns_servers configured
        reason = (f"no DNS resolver available ({type(exc).__name__}): the addresses were not "
                  "checked; set dns_servers or use --no-dns-check")
        return {d: DomainProblem(d, reason, temporary=True) for d in wanted}
    limit = asyncio.Semaphore(max(1, concurrency))
    results = await asyncio.gather(*(_check_one(router, d, limit) for d in wanted))
    return {p.domain: p for p in results if p is not None}


def check_domains(
    domains: Iterable[str], settings: Settings, dns_timeout: float = DEFAULT_DNS_TIMEOUT,
) -> dict[str, DomainProblem]:
    """`check_domains_async` for the synchronous CLI (its own short-lived event loop)."""
    return asyncio.run(check_domains_async(domains, settings, dns_timeout))
