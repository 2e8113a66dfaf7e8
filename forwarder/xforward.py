"""Postfix's XFORWARD extension, pure: who the relay in front of us was talking to.

Behind the school's own MX (docs/admin.md, section 3) every connection comes from that
relay, so the inbound checks would test SPF against the relay's address and HELO, and the
per-client rate limit would count the whole Internet as one client. Postfix's SMTP client
sends the original client's attributes with `XFORWARD` (its `smtp_send_xforward_command =
yes`) when the server offers the keyword; only the hosts listed in `xforward_hosts` are
offered it or may use it, since it changes audit trails (Postfix's XFORWARD_README,
"Security").

The rules are Postfix's XFORWARD_README: `XFORWARD 1*(SP name=value)`, names case
insensitive, values xtext (RFC 3461 4, formerly RFC 1891) of at most 255 characters that
decode to printable ASCII with no space and nothing special in a header; `[UNAVAILABLE]`
(any case) erases an attribute; a first XFORWARD starts from nothing, later ones add to it;
everything is forgotten at the end of the next transaction (RSET or the final dot). An
unavailable ADDR means the relay submitted the mail itself: the session's own client then
stands, and the other forwarded attributes are ignored (never mixed with the session's).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from dataclasses import dataclass

from forwarder import replies
from forwarder.addresses import in_networks, parse_networks
from forwarder.dsnparams import xtext_decode
from forwarder.replies import Reply

# The attributes we take, in the order Postfix announces them.
ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
EHLO_KEYWORD = "XFORWARD " + " ".join(ATTRIBUTES)
MAX_VALUE = 255  # XFORWARD_README, note 1
_UNAVAILABLE = "[UNAVAILABLE]"
# Printable ASCII without space and the characters special in a header (note 1): what a
# value may decode to. Brackets are kept for "[UNAVAILABLE]", colons for IPv6 addresses.
_SAFE_VALUE = re.compile(r"[!#-'*+\-./0-:=?A-Z\[\]^_`a-z{|}~]+")
_SOURCES = ("LOCAL", "REMOTE")


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The relay's client, as far as it told us (None: not told, or unavailable)."""

    addr: str | None = None
    name: str | None = None
    port: str | None = None
    proto: str | None = None
    helo: str | None = None
    ident: str | None = None
    source: str | None = None


def update(current: Forwarded | None, arg: str | None) -> Forwarded | Reply:
    """The attributes after one XFORWARD command, or the reply refusing it (then the
    attributes stay as they were)."""
    if not arg:
        return replies.XFORWARD_SYNTAX
    changes: dict[str, str | None] = {}
    for item in arg.split():
        name, equals, raw = item.partition("=")
        name = name.upper()
        if not equals or not raw:
            return replies.XFORWARD_SYNTAX
        if name not in ATTRIBUTES:
            return replies.XFORWARD_BAD_ATTRIBUTE
        value = _value(name, raw)
        if isinstance(value, Reply):
            return value
        changes[name.lower()] = value
    return dataclasses.replace(current or Forwarded(), **changes)


def _value(name: str, raw: str) -> str | Reply | None:
    """One attribute's decoded and checked value (None: unavailable)."""
    if len(raw) > MAX_VALUE:
        return replies.XFORWARD_BAD_VALUE
    # Postfix before 2.3 sent values without xtext; a "+" not followed by two hex
    # digits then fails to decode and is refused, as Postfix itself does today.
    value = xtext_decode(raw)
    if value is None or not _SAFE_VALUE.fullmatch(value):
        return replies.XFORWARD_BAD_VALUE
    if value.upper() == _UNAVAILABLE:
        return None
    if name == "ADDR":
        return _address(value)
    if name == "PORT" and not (value.isdigit() and int(value) <= 65535):
        return replies.XFORWARD_BAD_VALUE
    if name == "SOURCE":
        return value.upper() if value.upper() in _SOURCES else replies.XFORWARD_BAD_VALUE
    if name == "PROTO" and len(value) > 64:  # XFORWARD_README: "up to 64 characters"
        return replies.XFORWARD_BAD_VALUE
    return value


def _address(value: str) -> str | Reply:
    """ADDR: an IP address, IPv6 possibly written `IPv6:...` as in RFC 5321 4.1.3. We need
    one to check SPF with, so a non-IP address is refused rather than guessed at."""
    if value[:5].upper() == "IPV6:":
        value = value[5:]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return replies.XFORWARD_BAD_VALUE


def trusted(client: str, relays: tuple[str, ...]) -> bool:
    """Whether `client` is one of the relays allowed XFORWARD (`xforward_hosts`)."""
    return bool(relays) and _in_networks(client, relays)


@functools.lru_cache(maxsize=4096)
def _in_networks(client: str, networks: tuple[str, ...]) -> bool:
    # Cached: asked once per connection, and the school's relay is most of them.
    return in_networks(client, parse_networks(networks))
