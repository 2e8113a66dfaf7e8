"""Where to deliver mail for a domain by its MX records (RFC 5321 section 5); the fixed
destinations (smarthost, mailbox host) are chosen in delivery.MailRouter.

The decisions (MX ordering, equal-preference shuffling, the address cap, null MX, which DNS
errors are temporary) are plain functions with no I/O, so they are tested from tables. The
I/O is one small caching wrapper around dnspython's asyncio resolver; the clock and the random
generator are injected so that tests control TTL expiry and shuffling.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.SOA
import dns.rdtypes.txtbase
import dns.resolver

SMTP_PORT = 25
# Postfix's smtp_mx_address_limit: a bound on the addresses tried for one delivery attempt,
# so a domain with many MX hosts (or a hostile one) cannot hold a worker for long.
MAX_ADDRESSES = 5
# Negative answers without an SOA to take a TTL from (RFC 2308 section 5), and the upper
# bound on any negative caching; RFC 2308 section 5 suggests 1 to 3 hours at most.
DEFAULT_NEGATIVE_TTL = 60.0
MAX_NEGATIVE_TTL = 3600.0
# RFC 2181 section 8 allows TTLs up to 2**31 - 1; a day is enough for mail routing.
MAX_POSITIVE_TTL = 86400.0
MAX_CACHE_ENTRIES = 10_000
# A name whose presentation form dnspython would not change: LDH labels, nothing escaped.
_PLAIN_NAME = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                         r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?$")


class DnsError(Exception):
    """A lookup that gave no usable route; ``reason`` is short and fit for logs and DSNs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DnsPermanentError(DnsError):
    """The domain cannot receive mail (NXDOMAIN, null MX, no records): bounce."""


class DnsTemporaryError(DnsError):
    """DNS could not answer now (SERVFAIL, timeout, ...): retry later."""


@dataclass(frozen=True)
class Destination:
    host: str  # the MX (or smarthost) name, for logs, TLS SNI and certificate checks
    address: str  # an IP address to connect to (a smarthost may give a host name)
    port: int


@dataclass(frozen=True)
class MxRecord:
    preference: int
    exchange: str  # without the trailing dot; "" for the root (null MX)


class Router(Protocol):
    async def route(self, domain: str) -> list[Destination]: ...


# -- pure decisions --------------------------------------------------------------------


def is_null_mx(records: Sequence[MxRecord]) -> bool:
    """RFC 7505 section 3: a single MX whose exchange is the root says "no mail here"."""
    return len(records) == 1 and records[0].exchange == ""


def order_mx(records: Iterable[MxRecord], rng: random.Random) -> list[MxRecord]:
    """Lowest preference first; hosts of equal preference in random order (RFC 5321 5.1).

    Root exchanges (a null MX mixed with real ones, which RFC 7505 section 3 forbids) are
    dropped: there is nothing to connect to.
    """
    by_preference: dict[int, list[MxRecord]] = {}
    for record in records:
        if record.exchange:
            by_preference.setdefault(record.preference, []).append(record)
    ordered: list[MxRecord] = []
    for preference in sorted(by_preference):
        group = sorted(by_preference[preference], key=lambda r: r.exchange)
        rng.shuffle(group)  # sorted first, so a seeded generator gives a stable order
        ordered.extend(group)
    return ordered


def select_addresses(
    hosts: Sequence[tuple[str, Sequence[str]]], port: int, limit: int = MAX_ADDRESSES
) -> list[Destination]:
    """Hosts in order, each host's addresses in order (A before AAAA), capped at ``limit``.

    An address already listed for an earlier host is not tried twice.
    """
    seen: set[str] = set()
    destinations: list[Destination] = []
    for host, addresses in hosts:
        for address in addresses:
            if len(destinations) >= limit:
                return destinations
            if address not in seen:
                seen.add(address)
                destinations.append(Destination(host, address, port))
    return destinations


def classify_error(exc: BaseException) -> DnsError:
    """Whether a dnspython failure is permanent (bounce) or temporary (retry)."""
    if isinstance(exc, DnsError):
        return exc
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DnsPermanentError("NXDOMAIN")
    if isinstance(exc, dns.resolver.YXDOMAIN):
        return DnsPermanentError("YXDOMAIN")
    if isinstance(exc, dns.exception.Timeout):  # includes LifetimeTimeout
        return DnsTemporaryError("timeout")
    if isinstance(exc, dns.resolver.NoNameservers):
        return DnsTemporaryError(_nameserver_failure(exc))
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return DnsTemporaryError("no nameserver configured")
    # Anything else (network errors, malformed answers) may well pass: never bounce on it.
    return DnsTemporaryError("DNS error")


def _nameserver_failure(exc: dns.resolver.NoNameservers) -> str:
    # errors: [(server, tcp, port, exception or rcode text, response)]
    for error in exc.kwargs.get("errors", []):
        if isinstance(error[3], str):
            return error[3]  # "SERVFAIL", "REFUSED", ...
    return "no nameserver answered"


def negative_ttl(
    response: dns.message.Message | None,
    default: float = DEFAULT_NEGATIVE_TTL,
    maximum: float = MAX_NEGATIVE_TTL,
) -> float:
    """How long to cache NXDOMAIN or NODATA: min(SOA TTL, SOA minimum) (RFC 2308 section 5)."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                soa = rrset[0]
                assert isinstance(soa, dns.rdtypes.ANY.SOA.SOA)
                return float(min(rrset.ttl, soa.minimum, maximum))
    return min(default, maximum)


def address_literal(domain: str) -> str | None:
    """The IP in an RFC 5321 4.1.3 address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]")."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        return str(ipaddress.IPv6Address(text[5:]))
    return str(ipaddress.IPv4Address(text))


# -- caching resolver -------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """One DNS answer: records (possibly none, NODATA) or NXDOMAIN."""

    nxdomain: bool
    rdata: tuple[dns.rdata.Rdata, ...]


@dataclass(frozen=True)
class _Entry:
    expires: float
    lookup: Lookup


class CachingResolver:
    """dnspython's asyncio resolver with a cache per (name, type) on an injected clock.

    Either ``nameservers`` (and ``port``) are given, or ``use_system_config`` reads
    /etc/resolv.conf. dnspython's own cache is not used: it reads the wall clock.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        port: int = 53,
        use_system_config: bool = False,
        timeout: float = 5.0,
        lifetime: float = 10.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if use_system_config:
            self._resolver = dns.asyncresolver.Resolver(configure=True)
        elif nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = port
        else:
            raise ValueError("give nameservers or use_system_config=True")
        self._resolver.timeout = timeout
        self._resolver.lifetime = lifetime
        self._now = now
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._pending: dict[tuple[str, str], asyncio.Task[Lookup]] = {}

    def now(self) -> float:
        """The time on the clock the cache's expiries are on."""
        return self._now()

    def cached(self, name: str, rdtype: str) -> tuple[Lookup, float] | None:
        """The cached answer and when it expires, if there is one still valid; no I/O.
        Safe to call from any thread: it only reads the cache (whose entries are never
        changed in place)."""
        text = name.lower()
        if _PLAIN_NAME.match(text):  # the common case, without dnspython's parse
            key = (text if text.endswith(".") else text + ".", rdtype)
        else:
            key = (_to_name(name).to_text().lower(), rdtype)
        entry = self._cache.get(key)
        if entry is not None and self._now() < entry.expires:
            return entry.lookup, entry.expires
        return None

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """Records of ``rdtype`` at ``name``; raises DnsTemporaryError, never NXDOMAIN."""
        qname = _to_name(name)
        key = (qname.to_text().lower(), rdtype)
        entry = self._cache.get(key)
        if entry is not None and self._now() < entry.expires:
            return entry.lookup
        # Questions asked while the same one is on its way share its answer: a burst of
        # mail from a new sender asks for the same SPF and DMARC records many times at once.
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._query(qname, key, rdtype))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(pending)

    def _finished(self, key: tuple[str, str], task: asyncio.Task[Lookup]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: the waiters (if any are left) got it

    async def _query(self, qname: dns.name.Name, key: tuple[str, str], rdtype: str) -> Lookup:
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            lookup = Lookup(nxdomain=True, rdata=())
            self._store(key, lookup, negative_ttl(_nxdomain_response(exc)))
            return lookup
        except dns.exception.DNSException as exc:
            raise classify_error(exc) from exc
        if answer.rrset is None:  # NODATA: the name exists, without this type
            ttl = negative_ttl(answer.response)
            lookup = Lookup(nxdomain=False, rdata=())
        else:
            ttl = min(float(answer.rrset.ttl), MAX_POSITIVE_TTL)
            lookup = Lookup(nxdomain=False, rdata=tuple(answer.rrset))
        self._store(key, lookup, ttl)
        return lookup

    def _store(self, key: tuple[str, str], lookup: Lookup, ttl: float) -> None:
        now = self._now()
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache = {k: e for k, e in self._cache.items() if e.expires > now}
            while len(self._cache) >= MAX_CACHE_ENTRIES:  # still full: drop the oldest
                del self._cache[next(iter(self._cache))]
        self._cache[key] = _Entry(now + ttl, lookup)


def txt_text(rdata: dns.rdata.Rdata) -> bytes:
    """A TXT record's character-strings, joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    assert isinstance(rdata, dns.rdtypes.txtbase.TXTBase)
    return b"".join(rdata.strings)


def _nxdomain_response(exc: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    # The NXDOMAIN response carries the SOA whose minimum bounds the negative TTL.
    responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses", {})
    return next(iter(responses.values()), None)


def _to_name(name: str) -> dns.name.Name:
    # Always absolute: the resolver must not append a search domain (configure=True
    # would otherwise make "example" mean "example.school.lan").
    if not name.strip("."):
        raise DnsPermanentError("invalid domain name")  # "" would mean the root zone
    try:
        return dns.name.from_text(name.rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise DnsPermanentError("invalid domain name") from exc


# -- routers ----------------------------------------------------------------------------


class MxRouter:
    """Routes by MX, with the implicit MX and null MX rules of RFC 5321 5.1 and RFC 7505."""

    def __init__(
        self,
        resolver: CachingResolver,
        *,
        rng: random.Random | None = None,
        port: int = SMTP_PORT,
        max_addresses: int = MAX_ADDRESSES,
        ipv6: bool = True,
    ) -> None:
        self._resolver = resolver
        self._rng = rng or random.Random()
        self._port = port
        self._max_addresses = max_addresses
        self._rdtypes = ("A", "AAAA") if ipv6 else ("A",)

    async def route(self, domain: str) -> list[Destination]:
        literal = _literal_or_error(domain)
        if literal is not None:
            return [Destination(literal, literal, self._port)]
        records = await self._mx(domain)
        if not records:
            # No MX: the domain itself is the exchanger (implicit MX, RFC 5321 5.1)
            addresses, error = await self._addresses(domain)
            if addresses:
                return select_addresses(
                    [(_host(domain), addresses)], self._port, self._max_addresses
                )
            raise error or DnsPermanentError("no MX, A or AAAA records")
        return await self._route_mx(order_mx(records, self._rng))

    async def has_mail_route(self, domain: str) -> bool:
        """Whether the domain can receive mail: an MX, or else A/AAAA (for redirect checks).

        Raises DnsTemporaryError when DNS cannot tell, so the caller can say so.
        """
        if _literal_or_error(domain) is not None:
            return True
        try:
            records = await self._mx(domain)
        except DnsPermanentError:
            return False
        if records:
            return True
        for rdtype in self._rdtypes:
            lookup = await self._resolver.lookup(domain, rdtype)
            if lookup.rdata:
                return True
        return False

    async def _mx(self, domain: str) -> list[MxRecord]:
        """The domain's MX records; raises for NXDOMAIN and null MX."""
        lookup = await self._resolver.lookup(domain, "MX")
        if lookup.nxdomain:
            raise DnsPermanentError("NXDOMAIN")
        records = [_mx_record(rdata) for rdata in lookup.rdata]
        if is_null_mx(records):
            raise DnsPermanentError("null MX (RFC 7505)")
        return records

    async def _route_mx(self, ordered: list[MxRecord]) -> list[Destination]:
        # All exchangers are looked up at once: one dead name server must not cost a
        # resolver lifetime per MX host in turn.
        results = await asyncio.gather(*(self._addresses(mx.exchange) for mx in ordered))
        hosts = [
            (mx.exchange, addresses) for mx, (addresses, _) in zip(ordered, results, strict=True)
        ]
        destinations = select_addresses(hosts, self._port, self._max_addresses)
        if destinations:
            return destinations
        # An MX host that does not resolve is skipped; none resolving is a DNS problem
        # (often a passing one) for which the domain's owner is responsible: retry.
        reasons = sorted({error.reason for _, error in results if error is not None})
        detail = f" ({', '.join(reasons)})" if reasons else ""
        raise DnsTemporaryError(f"no MX host resolves{detail}")

    async def _addresses(self, host: str) -> tuple[list[str], DnsError | None]:
        """A then AAAA addresses of ``host``, and the error met on the way if any."""
        addresses: list[str] = []
        error: DnsError | None = None
        for rdtype in self._rdtypes:
            try:
                lookup = await self._resolver.lookup(host, rdtype)
            except DnsError as exc:
                error = exc
                continue
            if lookup.nxdomain:
                return addresses, DnsPermanentError("NXDOMAIN")
            # An RRset has no order; like Postfix (smtp_randomize_addresses) spread the load
            # over a host's addresses, A before AAAA.
            found = sorted(str(rdata) for rdata in lookup.rdata)
            self._rng.shuffle(found)
            addresses.extend(found)
        return addresses, error


def _mx_record(rdata: dns.rdata.Rdata) -> MxRecord:
    assert isinstance(rdata, dns.rdtypes.ANY.MX.MX)
    return MxRecord(rdata.preference, _host(rdata.exchange.to_text()))


def _host(name: str) -> str:
    return name.rstrip(".").lower()


def _literal_or_error(domain: str) -> str | None:
    try:
        return address_literal(domain)
    except ValueError as exc:
        raise DnsPermanentError("invalid address literal") from exc
