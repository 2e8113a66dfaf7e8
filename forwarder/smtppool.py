"""Outbound SMTP sessions: opened with our EHLO name and source address, STARTTLS as the
destination's policy asks, and kept open for reuse per destination address.

TLS, like Postfix's `smtp` client: at level `may` (RFC 7435 opportunistic security)
STARTTLS is used when offered, without authenticating the server; if the handshake fails,
the failure is logged and counted, the address is remembered as "clear only" for a while
and the delivery is retried in clear. Where an MTA-STS policy says `enforce` (RFC 8461
4.2), the session must be TLS with a certificate that chains to a trusted CA and names
the MX host: anything less is a `TlsPolicyFailed` (the caller defers with 4.7.5; never
clear text). In `testing` mode the same check is made, a failure is logged and counted,
and delivery goes on as at level `may`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import ssl
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from forwarder import log
from forwarder.config import Settings
from forwarder.dns import Destination
from forwarder.metrics import Metrics

LOG = log.get("forwarder.delivery")

# How long an address whose TLS handshake failed is contacted in clear only.
NO_TLS_SECONDS = 3600.0


class TlsPolicy(enum.Enum):
    """What a destination requires of TLS."""

    MAY = "may"  # opportunistic: encrypt when offered (RFC 7435)
    TESTING = "testing"  # MTA-STS testing: check as for enforce, report, deliver anyway
    VERIFY = "verify"  # MTA-STS enforce: TLS, valid certificate for the MX name, or defer


@dataclass(frozen=True)
class TlsUse:
    """The TLS of one outbound session."""

    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    verified: bool  # the certificate chains to a trusted CA and names the MX host


class TlsHandshakeFailed(Exception):
    pass


class TlsPolicyFailed(Exception):
    """The destination's policy demands TLS this session cannot give."""


@dataclass
class PooledSession:
    client: aiosmtplib.SMTP
    tls: TlsUse | None


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificate and host name checked, against `ca_file` or the system's CAs."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


class ConnectionPool:
    """Open SMTP sessions per destination address, reused for several messages."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.configure(settings)
        self._metrics = metrics
        # Sessions are kept apart by whether their certificate was verified: a session
        # opened at level `may` never serves a destination whose policy says `enforce`.
        self._idle: dict[tuple[Destination, bool], list[PooledSession]] = defaultdict(list)
        self._no_tls: dict[tuple[str, int], float] = {}
        self._may = ssl.create_default_context()
        # Opportunistic TLS (RFC 7435): encrypt when offered, do not authenticate.
        self._may.check_hostname = False
        self._may.verify_mode = ssl.CERT_NONE
        self._verify = verifying_context(settings.tls_ca_file)

    def configure(self, settings: Settings) -> None:
        """Timeouts, EHLO name and source addresses (again on SIGHUP: new sessions)."""
        self._settings = settings.delivery
        self._helo = settings.ehlo_name
        self._source4 = settings.source_address
        self._source6 = settings.source_address6

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.outbound_tls(result)

    async def acquire(self, dest: Destination, policy: TlsPolicy) -> PooledSession:
        strict = policy is not TlsPolicy.MAY
        for key in ((dest, True),) if strict else ((dest, False), (dest, True)):
            idle = self._idle[key]
            while idle:
                session = idle.pop()
                if session.client.is_connected:
                    return session
        return await self._connect(dest, policy)

    def _tls_allowed(self, dest: Destination) -> bool:
        until = self._no_tls.get((dest.address, dest.port))
        loop_now = asyncio.get_running_loop().time()
        return until is None or loop_now >= until

    def _source(self, address: str) -> tuple[str, int] | None:
        """Where the connection leaves from (SPF names these), by the address family."""
        try:
            version = ipaddress.ip_address(address).version
        except ValueError:
            return None  # a smarthost named by host name: the kernel chooses
        source = self._source4 if version == 4 else self._source6
        return None if source is None else (source, 0)

    async def _connect(self, dest: Destination, policy: TlsPolicy) -> PooledSession:
        client = aiosmtplib.SMTP(
            hostname=dest.address, port=dest.port, local_hostname=self._helo,
            source_address=self._source(dest.address),
            timeout=self._settings.command_timeout, start_tls=False,
        )
        await client.connect(timeout=self._settings.connect_timeout)
        try:
            await client.ehlo()
            return await self._secure(client, dest, policy)
        except BaseException:
            client.close()
            raise

    async def _secure(self, client: aiosmtplib.SMTP, dest: Destination,
                      policy: TlsPolicy) -> PooledSession:
        """STARTTLS as `policy` says (module docstring)."""
        if not client.supports_extension("starttls"):
            if policy is not TlsPolicy.MAY:
                self._policy_failure(dest, policy, "STARTTLS not offered")
            self._count("clear")
            return PooledSession(client, None)
        if policy is not TlsPolicy.VERIFY and not self._tls_allowed(dest):
            self._count("clear")
            return PooledSession(client, None)
        context = self._may if policy is TlsPolicy.MAY else self._verify
        try:
            await client.starttls(tls_context=context, server_hostname=dest.host)
        except ssl.SSLCertVerificationError as exc:
            self._policy_failure(dest, policy, exc.verify_message or str(exc))
            # testing: as if there were no policy (RFC 8461 5), on a new session
            client.close()
            return await self._connect(dest, TlsPolicy.MAY)
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            LOG.warning("tls_failed", relay=f"{dest.host}[{dest.address}]:{dest.port}",
                        error=reason[:200], policy=policy.value)
            self._count("handshake_failed")
            if policy is TlsPolicy.VERIFY:
                raise TlsPolicyFailed(f"TLS handshake failed: {reason}") from exc
            key = (dest.address, dest.port)
            self._no_tls[key] = asyncio.get_running_loop().time() + NO_TLS_SECONDS
            raise TlsHandshakeFailed(reason) from exc
        await client.ehlo()  # RFC 3207 4.2: forget what was said before TLS, ask again
        tls = _tls_use(client, verified=policy is not TlsPolicy.MAY)
        self._count("verified" if tls.verified else "encrypted")
        return PooledSession(client, tls)

    def _policy_failure(self, dest: Destination, policy: TlsPolicy, reason: str) -> None:
        """An MTA-STS check failed: always logged and counted; under `enforce`, fatal."""
        LOG.warning("tls_policy_failed", relay=f"{dest.host}[{dest.address}]:{dest.port}",
                    mode="enforce" if policy is TlsPolicy.VERIFY else "testing",
                    reason=reason[:200])
        self._count("policy_failed")
        if policy is TlsPolicy.VERIFY:
            raise TlsPolicyFailed(reason)

    def release(self, dest: Destination, session: PooledSession, reusable: bool) -> None:
        if reusable and session.client.is_connected:
            verified = session.tls is not None and session.tls.verified
            self._idle[(dest, verified)].append(session)
        else:
            session.client.close()

    async def close(self) -> None:
        for sessions in self._idle.values():
            for session in sessions:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(session.client.quit(), 2)
                session.client.close()
        self._idle.clear()


def _tls_use(client: aiosmtplib.SMTP, verified: bool) -> TlsUse:
    transport = client.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return TlsUse("unknown", "unknown", verified)
    cipher = ssl_object.cipher()
    return TlsUse(ssl_object.version() or "unknown", cipher[0] if cipher else "unknown",
                  verified)
