"""Connection accounting for the SMTP front: live sessions counted in all and per client
address, the caps that answer `421 4.7.0` (PRODUCT.md "Limits"), the shutdown notice
(`421 4.3.2` to sessions between transactions, RFC 5321 3.8), the STARTTLS context that
a reload replaces for new sessions, and the metrics the session itself reports."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Protocol

from forwarder import log, replies
from forwarder.config import Limits, Settings
from forwarder.metrics import Metrics
from forwarder.replies import Reply
from forwarder.sharedcounts import SharedCounts

LOG = log.get("forwarder.smtp")


class Session(Protocol):
    def close_if_idle(self) -> None: ...

    def abort(self) -> None: ...


def load_tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server context for STARTTLS, or None when no certificate is configured."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("tls_cert and tls_key must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class Connections:
    """Live sessions of this process, counted against the caps in a table that every
    process of the daemon shares (forwarder/sharedcounts.py); the TLS context they use."""

    def __init__(self, tls_context: ssl.SSLContext | None = None,
                 metrics: Metrics | None = None, counts: SharedCounts | None = None) -> None:
        self.tls_context = tls_context
        self.metrics = metrics
        self.closing = False
        # One process alone counts in a table of its own.
        self.counts = counts if counts is not None else SharedCounts.create(1)
        self._sessions: dict[Session, tuple[int, int]] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self._background: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        """Sessions open in this process."""
        return len(self._sessions)

    def count(self, client: str) -> int:
        """Sessions open from `client` in all the daemon's processes."""
        return self.counts.count(client)

    def total(self) -> int:
        """Sessions open in all the daemon's processes."""
        return self.counts.total()

    def admit(self, session: Session, client: str, limits: Limits) -> Reply | None:
        """Count a new session, or say why it is refused (RFC 5321 3.1: 421 and close).
        The caps are the daemon's, whichever process the kernel handed the connection to."""
        if self.closing:
            return replies.SHUTTING_DOWN
        counted = self.counts.admit(client, limits.max_connections,
                                    limits.max_connections_per_client)
        if counted is None:
            return replies.TOO_MANY_CONNECTIONS
        self._sessions[session] = counted
        self._empty.clear()
        if self.metrics is not None:
            self.metrics.session_opened()
        LOG.info("connect", client=client, sessions=self.counts.total())
        return None

    def release(self, session: Session, client: str) -> None:
        counted = self._sessions.pop(session, None)
        if counted is None:
            return
        self.counts.release(counted)
        if self.metrics is not None:
            self.metrics.session_closed()
        LOG.info("disconnect", client=client)
        if not self._sessions:
            self._empty.set()

    def count_refusal(self, reply: Reply) -> None:
        """A message the session refused after its final dot, counted by its reason."""
        if self.metrics is not None:
            self.metrics.body_refused(reply)

    def keep(self, future: asyncio.Future[Any]) -> None:
        """Hold a shielded task until it is done (and retrieve its outcome)."""
        self._background.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled():
            future.exception()

    def reload_tls(self, settings: Settings) -> None:
        """SIGHUP: load the certificate again; new sessions use it. On error the old one
        stays and the error is raised for the caller to log."""
        self.tls_context = load_tls_context(settings.tls_cert, settings.tls_key)

    async def shutdown(self, grace: float) -> None:
        """Refuse new sessions, send idle ones `421 4.3.2`, let transactions in flight end
        within `grace` seconds, then cut whatever is left."""
        self.closing = True
        for session in list(self._sessions):
            session.close_if_idle()
        try:
            await asyncio.wait_for(self._empty.wait(), grace)
        except TimeoutError:
            LOG.warning("sessions_cut", count=len(self._sessions))
        for session in list(self._sessions):
            session.abort()
        if self._background:
            await asyncio.wait(list(self._background), timeout=grace)
