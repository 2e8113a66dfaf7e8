"""The DSN extension's envelope parameters (RFC 3461), pure: parsing, checking, xtext.

MAIL takes `RET=FULL|HDRS` and `ENVID=<xtext>`; RCPT takes `NOTIFY=NEVER` or a list of
SUCCESS, FAILURE and DELAY, and `ORCPT=<addr-type>;<xtext>`. The queue keeps them decoded
(`DsnRequest`, `RecipientDsn`); they are encoded again when passed on to a next hop that
offers DSN, and read when we write a DSN ourselves (forwarder/bounces.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from forwarder import replies
from forwarder.replies import Reply

# RFC 3461 4.1: NOTIFY's keywords; NEVER stands alone.
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")
# RFC 3461 4.2 and 4.4: ORCPT's value at most 500 characters, ENVID's at most 100.
MAX_ORCPT = 500
MAX_ENVID = 100
# RFC 3461 4: xtext = *( xchar / hexchar ), xchar = "!".."~" except "+" and "=".
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 3461 4.2: addr-type is an atom (RFC 5322 3.2.3).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


@dataclass(frozen=True)
class DsnRequest:
    """MAIL's DSN parameters: what to return in a failure report, and the sender's id."""

    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # decoded


@dataclass(frozen=True)
class RecipientDsn:
    """RCPT's DSN parameters. `notify` None: the default (failures and delays, RFC 3461
    4.1); `orcpt` decoded, as "addr-type;address"."""

    notify: str | None = None  # "NEVER" or e.g. "SUCCESS,FAILURE"
    orcpt: str | None = None

    def wants(self, kind: str) -> bool:
        """Whether a DSN of `kind` (SUCCESS, FAILURE, DELAY) may be sent."""
        if self.notify is None:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify.split(",")


def xtext_decode(text: str) -> str | None:
    """The text an xtext stands for, or None if it is not xtext."""
    if not _XTEXT.fullmatch(text):
        return None
    raw = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    # Octets above 127 in +HH would be bytes of some charset: keep them only as UTF-8.
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None


def xtext_encode(text: str) -> str:
    """RFC 3461 4: "+", "=", controls, space and non-ASCII (as UTF-8 octets) in +HH."""
    out = []
    for char in text:
        if "!" <= char <= "~" and char not in "+=":
            out.append(char)
        else:
            out.extend(f"+{octet:02X}" for octet in char.encode("utf-8"))
    return "".join(out)


def parse_notify(value: str | bool) -> str | None:
    """NOTIFY's value normalised ("NEVER", or the keywords in RFC order), None if bad."""
    if not isinstance(value, str) or not value:
        return None
    words = [w.upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return "NEVER"
    if len(set(words)) != len(words) or not set(words) <= set(NOTIFY_KEYWORDS):
        return None
    return ",".join(k for k in NOTIFY_KEYWORDS if k in words)


def parse_orcpt(value: str | bool) -> str | None:
    """ORCPT's value decoded, as "addr-type;address", or None if malformed."""
    if not isinstance(value, str):
        return None
    addr_type, semi, encoded = value.partition(";")
    if not semi or not _ADDR_TYPE.fullmatch(addr_type) or not encoded:
        return None
    decoded = xtext_decode(encoded)
    if decoded is None or len(addr_type) + 1 + len(decoded) > MAX_ORCPT:
        return None
    return f"{addr_type.lower()};{decoded}"


def orcpt_for(address: str) -> str:
    """The ORCPT value (decoded) for an address the client gave without one: RFC 6533's
    utf-8 type for a non-ASCII address, else rfc822."""
    return f"rfc822;{address}" if address.isascii() else f"utf-8;{address}"


def encode_orcpt(orcpt: str) -> str:
    """ORCPT as it goes on the wire. A utf-8 address uses RFC 6533 3's \\x{HEX} form for
    non-ASCII characters, then xtext like any other."""
    addr_type, _, address = orcpt.partition(";")
    if addr_type == "utf-8":
        address = "".join(c if c.isascii() and c != "\\" else f"\\x{{{ord(c):X}}}"
                          for c in address)
    return f"{addr_type};{xtext_encode(address)}"


def mail_dsn(params: dict[str, str | bool]) -> DsnRequest | Reply:
    """RET and ENVID from MAIL's parameters (popped), or the reply refusing them."""
    ret = params.pop("RET", None)
    envid = params.pop("ENVID", None)
    if ret is not None and (not isinstance(ret, str) or ret.upper() not in ("FULL", "HDRS")):
        return replies.DSN_BAD_RET
    decoded = None
    if envid is not None:
        decoded = xtext_decode(envid) if isinstance(envid, str) else None
        if not decoded or len(decoded) > MAX_ENVID or not decoded.isascii():
            return replies.DSN_BAD_ENVID
    return DsnRequest(ret.upper() if isinstance(ret, str) else None, decoded)


def rcpt_dsn(params: dict[str, str | bool]) -> RecipientDsn | Reply:
    """NOTIFY and ORCPT from RCPT's parameters (popped), or the reply refusing them."""
    notify = params.pop("NOTIFY", None)
    orcpt = params.pop("ORCPT", None)
    parsed_notify = None if notify is None else parse_notify(notify)
    if notify is not None and parsed_notify is None:
        return replies.DSN_BAD_NOTIFY
    parsed_orcpt = None if orcpt is None else parse_orcpt(orcpt)
    if orcpt is not None and parsed_orcpt is None:
        return replies.DSN_BAD_ORCPT
    return RecipientDsn(parsed_notify, parsed_orcpt)


def options_dict(options: list[str]) -> dict[str, str | bool]:
    """The session's `KEY=VALUE` / `KEY` options back as a dict (keys upper-case)."""
    result: dict[str, str | bool] = {}
    for option in options:
        key, eq, value = option.partition("=")
        result[key.upper()] = value if eq else True
    return result
