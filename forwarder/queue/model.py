"""What goes into the queue and what comes out of it: messages, delivery jobs, results."""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.dsnparams import DsnRequest, RecipientDsn
from forwarder.policy import Lane, Outcome, Route

NO_DSN_REQUEST = DsnRequest()
NO_RECIPIENT_DSN = RecipientDsn()


class QueueError(Exception):
    """The queue could not commit; `no_space` tells a full disk (452) from the rest (451)."""

    def __init__(self, message: str, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


# Queue ids need to be unique, not secret: a generator seeded from os.urandom once per
# process (each acceptor is a fresh interpreter) spares a getrandom() call per message.
_ID_RANDOM = random.Random()


def new_queue_id(now: float) -> str:
    """16 base32 characters: 40 bits of milliseconds (sortable by time) + 40 random bits."""
    raw = ((int(now * 1000) & (2**40 - 1)) << 40) | _ID_RANDOM.getrandbits(40)
    return base64.b32encode(raw.to_bytes(10, "big")).decode("ascii")


@dataclass(frozen=True)
class SpooledBody:
    """A message too big for a queue row: `prefix` (our own header fields, kept in the
    row), then the client's message in a spool file (forwarder/queue/spool.py) in its wire
    form, dot-stuffed. `size`: the whole message's octets unstuffed; `head`: its first
    octets unstuffed (whole lines, prefix included), where known (the header checks)."""

    prefix: bytes
    path: Path
    size: int
    head: bytes = b""


# A message's bytes: in memory (unstuffed), or partly in a spool file.
Body = bytes | SpooledBody


def body_size(body: Body) -> int:
    return len(body) if isinstance(body, bytes) else body.size


@dataclass(frozen=True)
class NewRecipient:
    orig_rcpt: str
    rcpt: str
    route: Route
    dsn: RecipientDsn = NO_RECIPIENT_DSN  # NOTIFY and ORCPT (RFC 3461)


@dataclass(frozen=True)
class MessageFlags:
    """What the client said about the message, kept for its delivery: the DSN request
    (RFC 3461 RET, ENVID), SMTPUTF8 (RFC 6531) and whether the body has 8-bit octets."""

    dsn: DsnRequest = NO_DSN_REQUEST
    smtputf8: bool = False
    eight_bit: bool = False


PLAIN = MessageFlags()


@dataclass(frozen=True)
class NewMessage:
    id: str
    sender: str
    arrived_at: float
    client: str
    body: Body
    recipients: tuple[NewRecipient, ...]
    flags: MessageFlags = PLAIN
    # The verdicts of the checks at receipt (name -> result), for the delivery history;
    # not a queue column.
    checks: Mapping[str, object] = field(default_factory=dict)


@dataclass
class RecipientJob:
    id: int
    orig_rcpt: str
    rcpt: str
    route: Route
    attempts: int
    warned: bool = False
    dsn: RecipientDsn = NO_RECIPIENT_DSN


@dataclass
class Job:
    """A message and the recipients a worker must try now."""

    message_id: str
    sender: str
    arrived_at: float
    recipients: list[RecipientJob]
    body: Body | None = None
    isolated: bool = False  # a suspect, alone in the lane: a crash now is charged to it
    flags: MessageFlags = PLAIN
    size: int = 0  # of the body, known without it (SIZE= on MAIL, RFC 1870)
    # A `forwarder send-test` message (forwarder/sendtest.py), known once its bytes are
    # read: counted apart in the metrics, never bounced, not evidence against a target.
    test: bool = False
    client: str = ""  # the address it came from (for the delivery history)

    @classmethod
    def fresh(cls, message: NewMessage, recipient_ids: list[int]) -> Job:
        """The job for a message just committed (its recipients leased with it), with its
        bytes still in memory."""
        return cls(message.id, message.sender, message.arrived_at, [
            RecipientJob(rid, r.orig_rcpt, r.rcpt, r.route, 0, dsn=r.dsn)
            for rid, r in zip(recipient_ids, message.recipients, strict=True)
        ], message.body, flags=message.flags, size=body_size(message.body),
            client=message.client)

    @property
    def lane(self) -> Lane:
        return Lane.ALONE if self.isolated else Lane.ORDINARY


@dataclass(frozen=True)
class Result:
    """What happened to one recipient; `retry_at` None with outcome deferred is impossible."""

    recipient_id: int
    message_id: str
    outcome: Outcome
    attempted_at: float
    retry_at: float | None = None
    error: str | None = None
    dsn_status: str | None = None
    remote_mta: str | None = None
    warned: bool = False  # a delay warning was sent with this result
