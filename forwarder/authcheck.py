"""SPF (pyspf) and DKIM (dkimpy) for one message, run in a worker thread, with their DNS
answered by the daemon's own resolver.

Both libraries are synchronous and do their own DNS. Here every question they ask goes to
`ThreadDns`, which runs it on the daemon's event loop through `dns.CachingResolver` (the
configured `dns_servers`, the shared cache, never the system resolver) and makes the thread
wait for the answer, never past the message's deadline. The event loop itself never waits on
these libraries: DKIM hashes the whole body, so it runs in the thread too.

A temporary DNS failure becomes `temperror` (RFC 7208 2.6.6, RFC 6376 6.1.2), which is
reported and never refused with a 5xx. pyspf enforces RFC 7208 4.6.4's limits itself: at
most 10 mechanisms and modifiers that query DNS, and at most 2 void lookups (permerror past
them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import dkim
import spf

from forwarder import log
from forwarder.authresults import DkimResult, SpfResult
from forwarder.dns import (
    CachingResolver,
    DnsPermanentError,
    DnsTemporaryError,
    Lookup,
    txt_text,
)

LOG = log.get("forwarder.checks")
# RFC 6376 6.1 lets a verifier bound its work: signatures past these are not verified.
MAX_SIGNATURES = 8
# dkimpy reports every failure on a logger; the result is what we use, so it stays quiet.
_DKIM_LOG = logging.getLogger("forwarder.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False


class ThreadDns:
    """DNS for code running in a worker thread, answered on the event loop (module doc)."""

    def __init__(self, resolver: CachingResolver, loop: asyncio.AbstractEventLoop,
                 deadline: float, clock: Callable[[], float] = time.monotonic,
                 waiting: set[concurrent.futures.Future[Lookup]] | None = None) -> None:
        self._resolver = resolver
        self._loop = loop
        # The questions threads are waiting on, shared by the checks of one process, so
        # that stopping the daemon can release every waiting thread at once (abandon()).
        self._waiting = set() if waiting is None else waiting
        self._deadline = deadline  # on `clock`
        self._clock = clock
        self.temporary_failures = 0
        # Until when every answer given so far stays valid (on the resolver's clock): a
        # result computed from them may be reused until then.
        self.valid_until = float("inf")

    def lookup(self, name: str, rdtype: str) -> Lookup:
        """Records of `rdtype` at `name`; DnsTemporaryError when DNS fails or the deadline
        passes, DnsPermanentError for a name that cannot exist."""
        # A cached answer is read here, in the thread: the round trip through the event
        # loop (two wake-ups) costs more than pyspf's whole evaluation of a simple record.
        hit = self._resolver.cached(name, rdtype)
        if hit is None:
            found = self._ask_loop(name, rdtype)
            hit = self._resolver.cached(name, rdtype) or (found, 0.0)  # 0: not reusable
        self.valid_until = min(self.valid_until, hit[1])
        return hit[0]

    def _ask_loop(self, name: str, rdtype: str) -> Lookup:
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            self.temporary_failures += 1
            raise DnsTemporaryError("check deadline passed")
        future = asyncio.run_coroutine_threadsafe(self._resolver.lookup(name, rdtype),
                                                  self._loop)
        self._waiting.add(future)
        try:
            return future.result(remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.temporary_failures += 1
            raise DnsTemporaryError("check deadline passed") from None
        except concurrent.futures.CancelledError:
            self.temporary_failures += 1
            raise DnsTemporaryError("the daemon is stopping") from None
        except DnsTemporaryError:
            self.temporary_failures += 1
            raise
        finally:
            self._waiting.discard(future)


def abandon(waiting: set[concurrent.futures.Future[Lookup]]) -> None:
    """Release every thread waiting on a DNS answer (the daemon stops: its loop will not
    answer): each gets a temporary error at once instead of waiting out its deadline."""
    for future in list(waiting):
        future.cancel()


# --- SPF ------------------------------------------------------------------------------

# pyspf asks its module-level DNSLookup(name, qtype, strict, timeout) for every record; it
# is pointed once at the ThreadDns of the check running in the calling thread.
_CURRENT = threading.local()


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's DNS interface: [((name, type), value)], values shaped as its dnspython
    driver gives them; a temporary failure raises spf.TempError."""
    dns: ThreadDns | None = getattr(_CURRENT, "dns", None)
    if dns is None:
        raise spf.TempError("DNS: no resolver for this thread")
    try:
        found = dns.lookup(name, qtype)
    except DnsPermanentError:
        return []
    except DnsTemporaryError as exc:
        raise spf.TempError(f"DNS {exc.reason}") from None
    return [((name, qtype), _spf_value(qtype, rdata)) for rdata in found.rdata]


def _spf_value(qtype: str, rdata: Any) -> Any:
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(True))
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return tuple(rdata.strings)  # TXT (and the obsolete SPF type): the character-strings


spf.DNSLookup = _spf_lookup


def check_spf(dns: ThreadDns, client_ip: str, mailfrom: str, helo: str) -> SpfResult:
    """check_host() (RFC 7208 4) for MAIL FROM, or for HELO when MAIL FROM is null (2.4)."""
    identity = mailfrom.rpartition("@")[2] if mailfrom else helo
    _CURRENT.dns = dns
    try:
        query = spf.query(i=client_ip, s=mailfrom, h=helo or "unknown", strict=True)
        result = str(query.check()[0])
    except Exception as exc:  # a library bug must not cost the message: reported, not fatal
        LOG.error("check_error", check="spf", error=type(exc).__name__, detail=str(exc))
        result = "temperror"
    finally:
        _CURRENT.dns = None
    return SpfResult(result, identity.lower().rstrip("."), mailfrom, helo)


# --- DKIM -----------------------------------------------------------------------------


def verify_dkim(dns: ThreadDns, message: bytes) -> list[DkimResult]:
    """Every DKIM-Signature of the message (up to MAX_SIGNATURES), verified on the exact
    bytes received (RFC 6376 6)."""
    try:
        verifier = dkim.DKIM(message, logger=_DKIM_LOG)
    except dkim.DKIMException:  # a header section dkimpy cannot parse: none is usable
        return [DkimResult("neutral", "", "", "")]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    return [_verify_one(verifier, index, dns) for index in range(min(count, MAX_SIGNATURES))]


def _verify_one(verifier: Any, index: int, dns: ThreadDns) -> DkimResult:
    try:
        verifier.verify_headerprep(index)
    except dkim.DKIMException:
        # A signature that does not parse or lacks required tags (RFC 6376 6.1.1): it was
        # there but could not be processed (RFC 8601 2.7.1 "neutral").
        return DkimResult("neutral", "", "", "")
    fields = verifier.signature_fields
    key = _KeyLookup(dns)

    def result(value: str) -> DkimResult:
        return DkimResult(value, _text(fields.get(b"d")), _text(fields.get(b"s")),
                          _text(fields.get(b"b"))[:16])

    try:
        valid = verifier.verify(index, dnsfunc=key)
    except dkim.KeyFormatError:
        return result("permerror")
    except dkim.DKIMException:  # a body hash mismatch, a malformed canonicalisation
        return result("fail")
    except Exception as exc:
        LOG.error("check_error", check="dkim", error=type(exc).__name__, detail=str(exc))
        return result("temperror")
    if valid:
        return result("pass")
    if key.temporary:
        return result("temperror")
    return result("permerror" if key.missing else "fail")


class _KeyLookup:
    """dkimpy's dnsfunc: the first TXT record at <selector>._domainkey.<domain>, noting a
    temporary failure (dkimpy turns DnsTimeoutError into a plain False) or a missing key."""

    def __init__(self, dns: ThreadDns) -> None:
        self.dns = dns
        self.temporary = False
        self.missing = False

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        try:
            found = self.dns.lookup(name.decode("ascii"), "TXT")
        except (UnicodeDecodeError, DnsPermanentError):
            found = Lookup(nxdomain=True, rdata=())
        except DnsTemporaryError as exc:
            self.temporary = True
            raise dkim.DnsTimeoutError(exc.reason) from None
        if not found.rdata:
            self.missing = True
            return None
        return txt_text(found.rdata[0])


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace").strip()
