"""Where a recipient's copy goes: the mailbox host, the smarthost, or the recipient
domain's MX hosts (RFC 5321 5.1), and the destination ("site") whose slots it takes
(forwarder/slots.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from forwarder.config import HostPort
from forwarder.dns import Destination, DnsPermanentError, DnsTemporaryError
from forwarder.dns import Router as DnsRouter
from forwarder.policy import Route
from forwarder.slots import Site, SiteKind


class RoutingError(Exception):
    """No destination now; `permanent` says whether trying again could help."""

    def __init__(self, reason: str, permanent: bool = False, status: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        # RFC 3463: 5.1.2 bad destination system; 4.4.3 directory (DNS) failure.
        self.status = status or ("5.1.2" if permanent else "4.4.3")


class Router(Protocol):
    async def route(self, recipient: str, route: Route) -> list[Destination]:
        """The destinations to try in order, or raise RoutingError."""
        ...

    def site(self, recipient: str, route: Route) -> Site:
        """The destination whose slots the copy takes."""
        ...


def _fixed(hp: HostPort) -> Destination:
    return Destination(hp.host, hp.host, hp.port)


@dataclass
class MailRouter:
    """Active accounts go to the mailbox host; everything else to the smarthost if one is
    configured, else to the recipient domain's MX hosts (RFC 5321 5.1)."""

    mailbox_host: HostPort | None
    smarthost: HostPort | None
    mx: DnsRouter | None = None

    def __post_init__(self) -> None:
        # Made once: asked for every recipient.
        self._mailbox_site = (None if self.mailbox_host is None
                              else Site(SiteKind.MAILBOX, str(self.mailbox_host)))
        self._smarthost_site = (None if self.smarthost is None
                                else Site(SiteKind.SMARTHOST, str(self.smarthost)))

    def site(self, recipient: str, route: Route) -> Site:
        if route is Route.MAILBOX and self._mailbox_site is not None:
            return self._mailbox_site
        if route is not Route.MAILBOX and self._smarthost_site is not None:
            return self._smarthost_site
        return Site(SiteKind.MX, recipient.rpartition("@")[2].lower())

    async def route(self, recipient: str, route: Route) -> list[Destination]:
        if route is Route.MAILBOX:
            if self.mailbox_host is None:
                raise RoutingError("mailbox host not configured")
            return [_fixed(self.mailbox_host)]
        if self.smarthost is not None:
            return [_fixed(self.smarthost)]
        if self.mx is None:
            raise RoutingError("no smarthost and no DNS resolver configured")
        try:
            return await self.mx.route(recipient.rpartition("@")[2])
        except DnsPermanentError as exc:
            # RFC 7505 4.3: a null MX is reported as 5.1.10.
            status = "5.1.10" if exc.reason.startswith("null MX") else "5.1.2"
            raise RoutingError(exc.reason, permanent=True, status=status) from exc
        except DnsTemporaryError as exc:
            raise RoutingError(exc.reason) from exc
