"""MTA-STS (RFC 8461): a recipient domain's published demand for authenticated TLS.

Discovery: the `_mta-sts.<domain>` TXT record (`v=STSv1; id=...`), asked through the
daemon's own resolver (forwarder/dns.py). The policy: `https://mta-sts.<domain>/.well-known/
mta-sts.txt` over HTTPS with aiohttp, the certificate checked against the system's CAs or
`tls_ca_file`, no redirects, at most 64 KiB; the policy host's address also comes from the
daemon's resolver (an aiohttp resolver over it), so `dns_servers` answers for everything
and a test can point it at its own DNS server. A policy is cached for its `max_age`;
a new TXT `id` fetches it again; a failed fetch keeps a cached policy, and without one the
domain is treated as having none (RFC 8461 5.1).

What a policy means for delivery is decided here too, as pure functions: in `enforce` mode
only MX hosts matching the policy's `mx` patterns are tried, over TLS with a valid
certificate for their name, else the mail is deferred with 4.7.5 (never bounced for a
policy failure); `testing` mode delivers as before and logs what `enforce` would refuse.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import dns.rdata
import dns.rdtypes.ANY.TXT
from aiohttp.abc import AbstractResolver, ResolveResult

from forwarder import log
from forwarder.dns import CachingResolver, DnsError

LOG = log.get("forwarder.delivery")

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: "SHOULD NOT exceed 64 KB"
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: at most a year
# A domain whose policy could not be fetched is not asked again before this.
FETCH_RETRY = 300.0
MAX_DOMAINS = 10_000


@dataclass(frozen=True)
class Policy:
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]  # patterns: "mx.example.org" or "*.example.org"
    max_age: int
    id: str = ""  # the TXT record's id when it was fetched


class PolicyError(ValueError):
    pass


# --- pure ------------------------------------------------------------------------------


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id of the `_mta-sts` TXT record set, or None without exactly one valid
    STSv1 record (RFC 8461 3.1: several mean none)."""
    found = [r for r in records if r.replace(" ", "").startswith("v=STSv1;")
             or r.strip() == "v=STSv1"]
    if len(found) != 1:
        return None
    fields = dict(_fields(found[0], ";", "="))
    policy_id = fields.get("id", "")
    if not policy_id or len(policy_id) > 32 or not policy_id.isalnum():
        return None
    return policy_id


def _fields(text: str, sep: str, eq: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(sep):
        key, found, value = item.partition(eq)
        if found:
            pairs.append((key.strip(), value.strip()))
    return pairs


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """RFC 8461 3.2: `version: STSv1`, `mode`, one `mx` line per pattern, `max_age`."""
    version, mode, max_age, mx = None, None, None, []
    for key, value in _fields(text.replace("\r\n", "\n"), "\n", ":"):
        if key == "version":
            version = value
        elif key == "mode":
            mode = value
        elif key == "max_age":
            max_age = value
        elif key == "mx":
            mx.append(value.lower().rstrip("."))
    if version != "STSv1":
        raise PolicyError("not an STSv1 policy")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    if max_age is None or not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError("bad max_age")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return Policy(mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT), policy_id)


def mx_matches(host: str, pattern: str) -> bool:
    """RFC 8461 4.1: a pattern matches the name, or with `*.` exactly one more label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return host == pattern


def allowed(host: str, policy: Policy) -> bool:
    return any(mx_matches(host, p) for p in policy.mx)


# --- I/O -------------------------------------------------------------------------------


class DaemonResolver(AbstractResolver):
    """aiohttp's resolver, answered by the daemon's DNS resolver (A, then AAAA)."""

    def __init__(self, owner: MtaSts) -> None:
        self._owner = owner  # its resolver changes on SIGHUP

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                lookup = await self._owner.resolver.lookup(host, rdtype)
            except DnsError:
                continue
            results += [ResolveResult(hostname=host, host=str(r), port=port, family=fam,
                                      proto=0, flags=socket.AI_NUMERICHOST)
                        for r in lookup.rdata]
        if not results:
            raise OSError(f"{host}: no address")
        return results

    async def close(self) -> None:
        return None


@dataclass
class _Cached:
    policy: Policy | None
    expires: float  # when the policy (or the memory of a failure) is stale


class MtaSts:
    """Policies of recipient domains, fetched and cached (module docstring)."""

    def __init__(self, resolver: CachingResolver, now: Callable[[], float], *,
                 ca_file: str | None = None, port: int = 443, timeout: float = 30.0) -> None:
        self.resolver = resolver
        self._now = now
        self._port = port
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._cache: dict[str, _Cached] = {}
        self._fetching: dict[str, asyncio.Future[Policy | None]] = {}
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy in force, or None (no policy: opportunistic TLS)."""
        domain = domain.lower().rstrip(".")
        cached = self._cache.get(domain)
        try:
            lookup = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
            policy_id = parse_txt([_txt(r) for r in lookup.rdata])
        except DnsError:
            policy_id = None  # DNS down: keep what is cached (RFC 8461 5.1)
            if cached is None:
                return None
        now = self._now()
        if cached is not None and now < cached.expires and (
                policy_id is None or cached.policy is None or cached.policy.id == policy_id):
            return cached.policy
        if policy_id is None:
            return cached.policy if cached is not None and now < cached.expires else None
        return await self._single_fetch(domain, policy_id, cached)

    async def _single_fetch(self, domain: str, policy_id: str,
                            cached: _Cached | None) -> Policy | None:
        """One fetch per domain at a time; the others wait for its answer."""
        pending = self._fetching.get(domain)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Policy | None] = asyncio.get_running_loop().create_future()
        self._fetching[domain] = future
        try:
            result = await self._refresh(domain, policy_id, cached)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._fetching[domain]

    async def _refresh(self, domain: str, policy_id: str,
                       cached: _Cached | None) -> Policy | None:
        try:
            policy = parse_policy(await self._fetch(domain), policy_id)
        except (PolicyError, aiohttp.ClientError, OSError, TimeoutError, UnicodeError,
                DnsError) as exc:
            LOG.warning("mta_sts_fetch_failed", domain=domain, error=_describe(exc))
            if cached is not None and cached.policy is not None:
                return cached.policy  # keep it until it expires (RFC 8461 5.1)
            self._store(domain, _Cached(None, self._now() + FETCH_RETRY))
            return None
        LOG.info("mta_sts_policy", domain=domain, mode=policy.mode, mx=list(policy.mx),
                 max_age=policy.max_age, id=policy_id)
        self._store(domain, _Cached(policy, self._now() + policy.max_age))
        return policy

    def _store(self, domain: str, entry: _Cached) -> None:
        if len(self._cache) >= MAX_DOMAINS and domain not in self._cache:
            del self._cache[next(iter(self._cache))]
        self._cache[domain] = entry

    async def _fetch(self, domain: str) -> str:
        if self._http is None:
            connector = aiohttp.TCPConnector(resolver=DaemonResolver(self),
                                             ssl=self._ssl, use_dns_cache=False)
            self._http = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout))
        port = "" if self._port == 443 else f":{self._port}"
        url = f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"
        # RFC 8461 3.3: no redirects; only a 200 with text/plain counts.
        async with self._http.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise PolicyError(f"HTTP {response.status}")
            if response.content_type != "text/plain":
                raise PolicyError(f"media type {response.content_type}")
            data = await response.content.read(MAX_POLICY_BYTES + 1)
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError("policy over 64 KiB")
        return data.decode("utf-8")


def _txt(rdata: dns.rdata.Rdata) -> str:
    strings = rdata.strings if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT) else ()
    return b"".join(strings).decode("ascii", "replace")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
