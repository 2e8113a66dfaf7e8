"""The `forwarder send-test` message: what it says, and the mark the daemon knows it by.

A test message is real mail, sent to the daemon's own SMTP listener like any client's, so
it takes the whole path. It says what it is in French and English and carries
`Auto-Submitted: auto-generated` (RFC 3834 5), so no vacation responder answers it. Its
`X-Forwarder-Test` field holds a nonce and an HMAC of the nonce and the address it was sent
to, keyed by a secret in the state directory (`send-test.key`, created by the daemon, mode
0640: readable by the service user and the admins of its group). A field that verifies
marks the message as a test: its deliveries are counted apart in the metrics, it never
causes a DSN (the command reports the outcome itself), and the dead-target rule does not
take its failures as evidence against a target. Anyone may write the field; only who can
read the key can make one that verifies, and only for the address it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

KEY_FILE = "send-test.key"
KEY_MODE = 0o640
FIELD = "X-Forwarder-Test"
_FIELD_LINE = b"\r\n" + FIELD.encode("ascii") + b": "
_TAG_LENGTH = 32  # hex digits of the HMAC kept (128 bits)


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def ensure_key(state_dir: Path) -> bytes:
    """The daemon's key, created at its first start (atomically: linked into place, so two
    processes starting at once agree on one)."""
    path = key_path(state_dir)
    with contextlib.suppress(FileNotFoundError):
        return read_key(path)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), KEY_MODE)  # whatever the umask
            f.write(secrets.token_hex(32).encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return read_key(path)


def read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise ValueError(f"{path}: not a send-test key")
    return key


def _tag(key: bytes, nonce: str, address: str) -> str:
    mac = hmac.new(key, f"{nonce} {address.lower()}".encode(), hashlib.sha256)
    return mac.hexdigest()[:_TAG_LENGTH]


def mark(key: bytes, nonce: str, address: str) -> str:
    """The field's value for a test sent to `address`."""
    return f"{nonce} {_tag(key, nonce, address)}"


def is_marked(section: bytes) -> bool:
    """Whether a header section (headers.header_section) has the field at all: one search
    at C speed, before anything is built to verify it (ordinary mail never has it)."""
    return section.find(_FIELD_LINE) >= 0


def is_test(section: bytes, key: bytes | None, addresses: Iterable[str]) -> bool:
    """Whether a header section carries a mark that verifies for one of `addresses`."""
    start = section.find(_FIELD_LINE)
    if key is None or start < 0:
        return False
    start += len(_FIELD_LINE)
    line_end = section.find(b"\r\n", start)
    nonce, _, tag = section[start:line_end].decode("ascii", "replace").strip().partition(" ")
    return any(hmac.compare_digest(tag, _tag(key, nonce, address)) for address in addresses)


TEXT = """\
Ceci est un message de test envoyé par les administrateurs de la messagerie de {domain}
avec la commande « forwarder send-test », pour vérifier que le courrier adressé à
{address} arrive bien à destination. Il n'appelle aucune réponse : vous pouvez le
supprimer.

This is a test message sent by the mail administrators of {domain} with the command
"forwarder send-test", to check that mail sent to {address} reaches its destination.
No reply is needed: you may delete it.

{stamp}
"""


def build(key: bytes, address: str, sender: str, hostname: str, now: float) -> tuple[bytes, str]:
    """The test message for `address` (bytes with CRLF line ends) and its Message-ID."""
    nonce = secrets.token_hex(8)
    message = EmailMessage()
    message["From"] = f"Forwarder test <{sender}>"
    message["To"] = address
    message["Subject"] = "Message de test / Test message"
    message["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    message_id = make_msgid("send-test", domain=hostname)
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message[FIELD] = mark(key, nonce, address)
    stamp = f"test {nonce}, {datetime.fromtimestamp(now, UTC).isoformat(timespec='seconds')}"
    message.set_content(TEXT.format(domain=address.rpartition("@")[2], address=address,
                                    stamp=stamp), cte="quoted-printable")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n")), message_id
