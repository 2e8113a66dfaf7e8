"""The envelope's commands for the outbound client: MAIL FROM and RCPT TO with the
parameters the message needs and the next hop offers (forwarder/smtpclient.py says
which), sent one at a time, or as one RFC 2920 command group with DATA.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import aiosmtplib

from forwarder.dsnparams import encode_orcpt, xtext_encode

if TYPE_CHECKING:
    from forwarder.smtpclient import Outgoing, OutRcpt

__all__ = ["PLAIN_MAILBOX", "RCPT_ACCEPTED", "mail", "mail_options", "pipeline_group",
           "plain_path", "rcpt", "rcpt_options"]

# A plain RFC 5321 mailbox: Dot-string "@" a domain of LDH labels (4.1.2). aiosmtplib's
# mail() and rcpt() run every address through email.utils.parseaddr, an RFC 5322 header
# parser, and that was 11 % of the delivering process's CPU (docs/performance.md); for
# these addresses it returns them unchanged (tests/test_smtpclient_paths.py holds that
# with hypothesis), so they go on the command line as they are. Anything else (a quoted
# local part, an address literal, 8-bit) still goes through the library.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
PLAIN_MAILBOX = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*")

# The replies to RCPT TO that accept the recipient (RFC 5321 4.2.2: 251 will forward).
RCPT_ACCEPTED = (250, 251)


def mail_options(client: aiosmtplib.SMTP, out: Outgoing, size: int) -> list[str]:
    """MAIL FROM's parameters for this next hop (only the extensions it offered)."""
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={size}")  # RFC 1870 3
    if out.flags.eight_bit and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if out.flags.smtputf8 and client.supports_extension("smtputf8"):
        options.append("SMTPUTF8")
    if client.supports_extension("dsn"):
        if out.flags.dsn.ret:
            options.append(f"RET={out.flags.dsn.ret}")
        if out.flags.dsn.envid:
            options.append(f"ENVID={xtext_encode(out.flags.dsn.envid)}")
    return options


def rcpt_options(rcpt: OutRcpt) -> list[str]:
    """RCPT TO's DSN parameters, for a next hop that offers DSN (RFC 3461 5.2.1)."""
    options = []
    if rcpt.notify:
        options.append(f"NOTIFY={rcpt.notify}")
    if rcpt.orcpt:
        options.append(f"ORCPT={encode_orcpt(rcpt.orcpt)}")
    return options


def plain_path(address: str) -> bytes | None:
    """`<address>` for the command line if it is plain (or the null path), else None."""
    if not address:
        return b"<>"
    if PLAIN_MAILBOX.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    return None


def _rcpt_path(address: str) -> bytes | None:
    """`<address>` for RCPT TO if it is plain; never the null path, which is no recipient
    (None: the library's way)."""
    return plain_path(address) if address else None


def pipeline_group(client: aiosmtplib.SMTP, out: Outgoing, size: int,
                   dsn: bool) -> list[bytes] | None:
    """MAIL FROM, each RCPT TO and DATA as one RFC 2920 command group (DATA last, 3.1),
    if the next hop offers PIPELINING and every address is plain; else None (lock step:
    the library quotes and encodes the others, one command at a time)."""
    if not client.supports_extension("pipelining") or client.is_ehlo_or_helo_needed:
        return None
    sender = plain_path(out.sender)
    paths = [_rcpt_path(r.address) for r in out.recipients]
    if sender is None or None in paths:
        return None
    group = [_command(b"MAIL", b"FROM:" + sender, mail_options(client, out, size))]
    for rcpt, path in zip(out.recipients, paths, strict=True):
        assert path is not None
        group.append(_command(b"RCPT", b"TO:" + path, rcpt_options(rcpt) if dsn else []))
    group.append(b"DATA")
    return group


def _command(verb: bytes, path: bytes, options: list[str]) -> bytes:
    return b" ".join([verb, path, *(o.encode("ascii") for o in options)])


async def mail(client: aiosmtplib.SMTP, sender: str, options: list[str], utf8: bool) -> None:
    """aiosmtplib's mail(), without its header parser for a plain address."""
    path = plain_path(sender)
    if path is None or client.is_ehlo_or_helo_needed:
        await client.mail(sender, options=options, encoding="utf-8" if utf8 else "ascii")
        return
    reply = await client.execute_command(_command(b"MAIL", b"FROM:" + path, options))
    if reply.code != 250:
        raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)


async def rcpt(client: aiosmtplib.SMTP, recipient: str, options: list[str],
                utf8: bool) -> None:
    """aiosmtplib's rcpt(), without its header parser for a plain address."""
    path = _rcpt_path(recipient)
    if path is None or client.is_ehlo_or_helo_needed:
        await client.rcpt(recipient, options=options, encoding="utf-8" if utf8 else "ascii")
        return
    reply = await client.execute_command(_command(b"RCPT", b"TO:" + path, options))
    if reply.code not in RCPT_ACCEPTED:
        raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
