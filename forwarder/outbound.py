"""One delivery attempt of one message: route each recipient, group the copies by envelope
sender and destination, and send each group once it holds a slot at its destination
(forwarder/slots.py), under the destination's TLS policy (forwarder/mtasts.py).

Only messages being sent are in memory: a group that must wait for a slot lets go of the
message's bytes (unless another copy of it is on the wire), and they are read back from the
queue when the slot comes, so a backlog behind a slow destination costs a few objects per
message, not its body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from forwarder import log
from forwarder.dns import Destination
from forwarder.dsnparams import orcpt_for
from forwarder.mtasts import MtaSts, Policy, allowed
from forwarder.policy import Route
from forwarder.queue import Body, Job, Queue, RecipientJob
from forwarder.routing import Router, RoutingError
from forwarder.slots import Site, SiteKind, Slots, Verdict
from forwarder.smtpclient import Attempt, Outgoing, OutRcpt, Sender, TlsPolicy, local_attempt

LOG = log.get("forwarder.delivery")

# Attempts that say the destination did not answer at all (connect failed or timed out,
# the session dropped or stalled): they feed the dead-destination rule.
_NO_ANSWER = ("4.4.1", "4.4.2")


@dataclass
class Bodies:
    """How many message bodies delivery holds in memory now (tests, status)."""

    held: int = 0


@dataclass
class BodyHolder:
    """A message's bytes while some copy of it is being sent (module docstring)."""

    message_id: str
    body: Body | None  # a spooled body holds only our fields and its file's name
    bodies: Bodies
    sending: int = 0
    waiting: int = 0

    def __post_init__(self) -> None:
        if self.body is not None:
            self.bodies.held += 1

    def drop(self) -> None:
        if self.body is not None and self.sending == 0:
            self.body = None
            self.bodies.held -= 1

    async def take(self, queue: Queue) -> Body | None:
        if self.body is None:
            body = await queue.load_body(self.message_id)
            if body is None:
                return None  # deleted by an administrator meanwhile
            if self.body is None:
                self.body = body
                self.bodies.held += 1
        self.sending += 1
        return self.body

    def done(self) -> None:
        self.sending -= 1
        if self.waiting:
            self.drop()


@dataclass
class _Group:
    sender: str
    site: Site
    dests: tuple[Destination, ...]
    rcpts: list[RecipientJob] = field(default_factory=list)


def orcpt_of(rcpt: RecipientJob) -> str | None:
    """ORCPT to pass on (RFC 3461 4.2): the client's, else the address it gave us when we
    changed it (a forwarded copy), so a later DSN names prenom.nom@ our domain."""
    if rcpt.dsn.orcpt:
        return rcpt.dsn.orcpt
    if rcpt.route in (Route.REDIRECT, Route.POSTMASTER):
        return orcpt_for(rcpt.orig_rcpt)
    return None


@dataclass
class Outbound:
    router: Router
    sender: Sender
    slots: Slots
    queue: Queue
    envelope_sender: Callable[[Job, RecipientJob], Awaitable[str]]
    mta_sts: MtaSts | None = None
    bodies: Bodies = field(default_factory=Bodies)
    waiting: int = 0  # groups waiting for a slot

    async def attempt(self, job: Job, holder: BodyHolder) -> dict[int, Attempt] | None:
        """Each recipient's attempt, or None if the message was deleted meanwhile."""
        attempts: dict[int, Attempt] = {}
        groups: dict[tuple[str, Site, tuple[Destination, ...]], _Group] = {}
        for rcpt in job.recipients:
            try:
                dests = await self.router.route(rcpt.rcpt, rcpt.route)
            except RoutingError as exc:
                attempts[rcpt.id] = local_attempt(exc.status, exc.reason)
                continue
            sender = await self.envelope_sender(job, rcpt)
            site = self.router.site(rcpt.rcpt, rcpt.route)
            key = (sender, site, tuple(dests))
            groups.setdefault(key, _Group(sender, site, tuple(dests))).rcpts.append(rcpt)
        sends = [self._send_group(job, group, holder) for group in groups.values()]
        # The usual case, one group, runs without a task per group.
        results = ([await sends[0]] if len(sends) == 1
                   else list(await asyncio.gather(*sends)))
        for result in results:
            if result is None:
                return None
            attempts.update(result)
        return attempts

    async def _send_group(self, job: Job, group: _Group,
                          holder: BodyHolder) -> dict[int, Attempt] | None:
        tls, dests, refusal = await self._tls_policy(group)
        if refusal is not None:
            return dict.fromkeys((r.id for r in group.rcpts), refusal)
        taken = self.slots.try_acquire(group.site)
        if taken is None:
            taken = await self._wait(group.site, holder)
        if not taken:
            reason = self.slots.suspended(group.site) or "destination not responding"
            return dict.fromkeys((r.id for r in group.rcpts), local_attempt(
                "4.4.1", f"delivery to {group.site} temporarily suspended: {reason}"))
        verdict, error = Verdict.NONE, ""
        try:
            body = await holder.take(self.queue)
            if body is None:
                return None
            try:
                out = Outgoing(group.sender, tuple(
                    OutRcpt(r.rcpt, r.dsn.notify, orcpt_of(r)) for r in group.rcpts),
                    job.flags, tls, "MTA-STS" if tls is not TlsPolicy.MAY else None)
                attempts = await self._try_addresses(out, dests, group.rcpts, body)
            finally:
                holder.done()
            verdict, error = _verdict(attempts.values())
            return attempts
        finally:
            self.slots.release(group.site, verdict, error)

    async def _wait(self, site: Site, holder: BodyHolder) -> bool:
        holder.waiting += 1
        holder.drop()
        self.waiting += 1
        try:
            return await self.slots.wait(site)
        finally:
            self.waiting -= 1
            holder.waiting -= 1

    async def _try_addresses(self, out: Outgoing, dests: list[Destination],
                             rcpts: list[RecipientJob], body: Body) -> dict[int, Attempt]:
        """Try each address in turn for the recipients not yet settled (RFC 5321 5.1);
        an address whose TLS handshake failed is tried once more, in clear, at the end."""
        pending = list(rcpts)
        attempts: dict[int, Attempt] = {}
        retried_clear: set[Destination] = set()
        while dests and pending:
            dest = dests.pop(0)
            now_out = out if len(pending) == len(out.recipients) else Outgoing(
                out.sender, tuple(o for o in out.recipients
                                  if o.address in {r.rcpt for r in pending}),
                out.flags, out.tls, out.policy)
            by_addr = await self.sender.send(dest, now_out, body)
            for rcpt in pending:
                attempts[rcpt.id] = by_addr[rcpt.rcpt]
            if any(a.tls_failed for a in by_addr.values()) and dest not in retried_clear:
                retried_clear.add(dest)
                dests.append(dest)
            pending = [r for r in pending if attempts[r.id].unreachable]
        return attempts

    async def _tls_policy(
        self, group: _Group,
    ) -> tuple[TlsPolicy, list[Destination], Attempt | None]:
        """The TLS a group's MX hosts must give, the hosts the policy allows, or the
        attempt that refuses them all (RFC 8461 4.1, 5.1)."""
        dests = list(group.dests)
        if (self.mta_sts is None or group.site.kind is not SiteKind.MX
                or group.site.name.startswith("[")):  # an address literal has no policy
            return TlsPolicy.MAY, dests, None
        policy = await self.mta_sts.policy(group.site.name)
        if policy is None or policy.mode == "none":
            return TlsPolicy.MAY, dests, None
        matching = [d for d in dests if allowed(d.host, policy)]
        if policy.mode == "testing":
            if len(matching) < len(dests):
                _log_mismatch(group.site, policy, dests)
            return TlsPolicy.TESTING, dests, None
        if not matching:
            _log_mismatch(group.site, policy, dests)
            return TlsPolicy.VERIFY, [], local_attempt(
                "4.7.5", f"no MX host of {group.site.name} matches its MTA-STS policy "
                f"({', '.join(policy.mx)})")
        return TlsPolicy.VERIFY, matching, None


def _log_mismatch(site: Site, policy: Policy, dests: list[Destination]) -> None:
    LOG.warning("tls_policy_failed", destination=site.name, mode=policy.mode,
                reason="MX host not in policy",
                hosts=sorted({d.host for d in dests if not allowed(d.host, policy)}))


def _verdict(attempts: Iterable[Attempt]) -> tuple[Verdict, str]:
    """What a group's attempts say about its destination: no answer from any address it
    tried (timeouts, refused connections) is UNREACHABLE; any answer, ANSWERED."""
    found = list(attempts)
    if any(not a.unreachable for a in found):
        return Verdict.ANSWERED, ""
    silent = [a for a in found if a.status in _NO_ANSWER]
    if silent:
        return Verdict.UNREACHABLE, silent[0].text.removeprefix("x-local; ")
    return Verdict.NONE, ""

