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
    """Live sessions, counted in all and per client address; the TLS context they use."""

    def __init__(self, tls_context: ssl.SSLContext | None = None,
                 metrics: Metrics | None = None) -> None:
        self.tls_context = tls_context
        self.metrics = metrics
        self.closing = False
        self._sessions: set[Session] = set()
        self._per_client: dict[str, int] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self._background: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, client: str) -> int:
        return self._per_client.get(client, 0)

    def admit(self, session: Session, client: str, limits: Limits) -> Reply | None:
        """Count a new session, or say why it is refused (RFC 5321 3.1: 421 and close)."""
        if self.closing:
            return replies.SHUTTING_DOWN
        if (len(self._sessions) >= limits.max_connections
                or self.count(client) >= limits.max_connections_per_client):
            return replies.TOO_MANY_CONNECTIONS
        self._sessions.add(session)
        self._per_client[client] = self.count(client) + 1
        self._empty.clear()
        if self.metrics is not None:
            self.metrics.session_opened()
        LOG.info("connect", client=client, sessions=len(self._sessions))
        return None

    def release(self, session: Session, client: str) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        if self.metrics is not None:
            self.metrics.session_closed()
        LOG.info("disconnect", client=client)
        left = self.count(client) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)
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
