"""Notices to redirect targets: building them, and queueing them from the admin command.

A notice is ordinary mail from us, delivered by the daemon through its own queue like any
other (retries, a DSN on permanent failure, which goes to the admin address): its
recipient's route is `notice`, its original recipient the school address it is about, so
delivery records its outcome against the target (the dead-target rule) as it does for
forwarded mail. Two kinds (texts in noticetext.py):

- declared: to a newly declared target, with its confirm+ address as `Reply-To:` and its
  refuse+ address in the text (tokens.py);
- failing: to each target still working when another became `failing`.

The headers are those a receiving provider expects of automatic mail (RFC 3834 5:
`Auto-Submitted: auto-generated`; `Message-ID`, `Date`, RFC 5322 3.6), plus
`X-Auto-Response-Suppress`, which asks Exchange not to answer with an out-of-office reply
(that would land on the confirm+ address; the front ignores automatic replies anyway).
The body is UTF-8 in quoted-printable, so it crosses any 7-bit hop unchanged.

Who queues them, never talking SMTP:

- the admin command that declares a target (`account add --redirect`, `redirect`,
  `target ... on`): `queue_notices` writes the notice into the queue file with the
  queue's own insert, due at once, and the running daemon's scanner picks it up within
  its poll interval. The directory records the notice as owed in the same transaction
  as the declaration, with a grace period; the command clears that once the notice is
  queued, so if the queue refused it, the daemon sends it after the grace period;
- an import: its targets' notices are owed in the directory, committed with them, and
  the daemon sends them one every `notice_interval` (forwarder/noticesender.py). An
  import of 100,000 rows therefore writes no mail: the same import used to write 200 MB
  into the queue and took three times as long;
- the daemon itself, for the failing notices (forwarder/targetwatch.py).
"""

from __future__ import annotations

import binascii
import functools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from forwarder import noticetext
from forwarder.config import Settings
from forwarder.directory.model import Declared, StateChange
from forwarder.policy import Route
from forwarder.queue import NewMessage, NewRecipient, new_queue_id, open_queue_db
from forwarder.queue.ops import insert_message
from forwarder.tokens import TokenKind, make_token

# Notices committed per queue transaction: the daemon's own commits wait at most one
# chunk's worth (a few milliseconds), never a whole import.
CHUNK = 1000
_ERROR_MAX = 200


def _encode(line: str) -> bytes:
    """One line in quoted-printable (RFC 2045 6.7): soft breaks keep lines under 76."""
    return binascii.b2a_qp(line.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")


# Quoted-printable lines are at most 76 characters (RFC 2045 6.7).
_QP_LINE = 76
Piece = bytes | str  # an encoded run of fixed lines, or one line with a placeholder


@dataclass(frozen=True)
class _Template:
    pieces: tuple[Piece, ...]
    # The whole body with its fixed lines encoded and its variable lines left to format,
    # right as it is when every value is plain ASCII short enough (`limits`): one
    # str.format per notice, instead of encoding each variable line.
    text: str
    limits: dict[str, int]


@functools.cache
def _compile(lines: tuple[str, ...]) -> _Template:
    """The template as runs of fixed lines, encoded once, between its variable lines."""
    pieces: list[Piece] = []
    run: list[bytes] = []
    limits: dict[str, int] = {}
    for line in lines:
        if "{" not in line:
            run.append(_encode(line))
            continue
        if run:
            pieces.append(b"\r\n".join(run))
            run = []
        pieces.append(line)
        for _, name, _, _ in string.Formatter().parse(line):
            if name:
                room = _QP_LINE - len(line) + len(name) + 2
                limits[name] = min(limits.get(name, room), room)
    if run:
        pieces.append(b"\r\n".join(run))
    text = "\r\n".join(p.decode("ascii").replace("{", "{{").replace("}", "}}")
                        if isinstance(p, bytes) else p for p in pieces)
    return _Template(tuple(pieces), text + "\r\n", limits)


def render(lines: tuple[str, ...], values: dict[str, str]) -> bytes:
    """The body in quoted-printable: fixed lines encoded once per process."""
    template = _compile(lines)
    if all(value.isascii() and "=" not in value and len(value) <= template.limits[name]
           and value == value.strip() for name, value in values.items()
           if name in template.limits):
        return template.text.format(**values).encode("ascii")
    return b"\r\n".join(p if isinstance(p, bytes) else _encode(p.format(**values))
                        for p in template.pieces) + b"\r\n"


def _subject(text: str) -> str:
    # RFC 5322 2.2.3: fold a long field at a space (here the one before the English).
    return text.replace(" / ", " /\r\n ", 1) if len(text) > 68 else text


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _day(ts: float) -> str:
    return _date_of_day(int(ts // 86400))


@functools.lru_cache(maxsize=4)
def _date_of_day(number: int) -> str:
    return datetime.fromtimestamp(number * 86400, UTC).strftime("%Y-%m-%d")


def _message(settings: Settings, account: str, to: str, subject: str, body: bytes,
             now: float, reply_to: str | None = None) -> NewMessage:
    queue_id = new_queue_id(now)
    sender = settings.effective_notice_sender
    head = [f"From: Redirection / Forwarding <{sender}>", f"To: <{to}>"]
    if reply_to is not None:
        head.append(f"Reply-To: <{reply_to}>")
    head += [f"Subject: {_subject(subject)}", f"Date: {_date(int(now))}",
             f"Message-ID: <{queue_id}.notice@{settings.hostname}>",
             "Auto-Submitted: auto-generated", "X-Auto-Response-Suppress: All",
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
             "Content-Transfer-Encoding: quoted-printable"]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body
    return NewMessage(queue_id, sender, now, "", data,
                      (NewRecipient(account, to, Route.NOTICE),))


def declared_notice(settings: Settings, declared: Declared, secret: bytes,
                    now: float) -> NewMessage:
    """The notice to a newly declared target, with its confirm+ and refuse+ addresses."""
    expires = now + settings.targets.token_days * 86400.0
    domain = declared.account.rpartition("@")[2]
    confirm, refuse = (
        f"{kind.prefix}{make_token(kind, declared.target_id, declared.binding, expires, secret)}"
        f"@{domain}" for kind in (TokenKind.CONFIRM, TokenKind.REFUSE))
    values = {"account": declared.account, "target": declared.target, "confirm": confirm,
              "refuse": refuse, "until": _day(expires), "domain": domain}
    return _message(settings, declared.account, declared.target,
                    noticetext.DECLARED_SUBJECT.format(**values),
                    render(noticetext.DECLARED_BODY, values), now, reply_to=confirm)


def failing_notices(settings: Settings, change: StateChange, now: float) -> list[NewMessage]:
    """One notice to each of the account's targets still on, about the one failing."""
    since = change.health.first_failure if change.health.first_failure is not None else now
    error = " ".join((change.last_error or "unknown").split())[:_ERROR_MAX]
    domain = change.account.rpartition("@")[2]
    notices = []
    for target in change.others_on:
        values = {"account": change.account, "failed": change.target, "target": target,
                  "since": _day(since), "error": error, "domain": domain}
        notices.append(_message(settings, change.account, target,
                                noticetext.FAILING_SUBJECT.format(**values),
                                render(noticetext.FAILING_BODY, values), now))
    return notices


def queue_notices(settings: Settings, messages: Sequence[NewMessage]) -> None:
    """Write `messages` into the queue file for the daemon to deliver, due at once (the
    admin command's side: it never talks SMTP)."""
    if not messages:
        return
    conn = open_queue_db(settings.queue_path, settings.busy_timeout)
    try:
        for start in range(0, len(messages), CHUNK):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for message in messages[start:start + CHUNK]:
                    insert_message(message, leased=False)(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.close()
