"""Parsing of envelope addresses and validation of redirect targets.

Strict with recipients, liberal with senders (PRODUCT.md "Limits"). Envelope recipients
are our own addresses and are parsed strictly: anything that an older MTA might route
somewhere else (`%` hacks, `!` paths, quoted local parts holding an `@`, comments) is
refused outright rather than interpreted, so the daemon can never be made into an open
relay by syntax. A sender is only ever written back (SRS, a bounce), never routed on, so
any RFC 5321 4.1.2 reverse-path is taken: quoted local parts, `%` and `!`, address literals.
UTF-8 (RFC 6531 3.3: atext extended with non-ASCII characters, domains as U-labels) is
taken in both; the session lets it through only in an SMTPUTF8 transaction. Our own
recipients are ASCII directory keys, so a UTF-8 local part of ours is simply unknown.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import email_validator
import idna

# RFC 5321 4.5.3.1.1 and 4.5.3.1.2.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5322 3.2.3 atext, minus the characters that older MTAs treat as routing:
# '%' (the "percent hack") and '!' (UUCP bang paths).
# RFC 6531 3.3 adds UTF8-non-ascii to atext.
_LOCAL_ATOM = r"[A-Za-z0-9#$&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_LOCAL_RE = re.compile(rf"{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*")
# RFC 5321 4.1.2 Domain: LDH labels separated by dots.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 4.1.2: Dot-string of RFC 5322 atext (with "%" and "!"), or a Quoted-string of
# qtextSMTP (printable ASCII but '"' and "\\") and quoted-pairSMTP ("\\" + printable).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"'
_SENDER_LOCAL_RE = re.compile(rf"{_ATOM}(?:\.{_ATOM})*|{_QUOTED}")
# RFC 5321 4.1.3: a General-address-literal is a tag and printable text in brackets.
_GENERAL_LITERAL_RE = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")


class AddressError(ValueError):
    """An address that cannot be used; the message is safe to show an administrator."""


@dataclass(frozen=True)
class Address:
    local: str
    domain: str

    @property
    def key(self) -> str:
        """Directory key: local parts compare case-insensitively (PRODUCT.md)."""
        return f"{self.local.lower()}@{self.domain}"

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def has_control_chars(text: str) -> bool:
    return bool(_CONTROL_RE.search(text))


def normalize_domain(domain: str) -> str:
    """Lower-case, and drop one trailing dot: `Sigma-Clermont.FR.` is our domain too."""
    domain = domain.lower()
    return domain[:-1] if domain.endswith(".") else domain


def _split(text: str) -> tuple[str, str]:
    """An envelope address (without angle brackets) -> (local part, domain), after the
    checks every address gets: no control characters, RFC 5321 4.5.3.1 lengths."""
    if has_control_chars(text):
        raise AddressError("control characters in address")
    # The path's 256 octets include its angle brackets; the address comes without them.
    if len(text.encode("utf-8")) + 2 > MAX_PATH:  # octets (RFC 6531 3.3)
        raise AddressError("address too long (RFC 5321 4.5.3.1.3)")
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise AddressError("address must be local-part@domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets (RFC 5321 4.5.3.1.1)")
    return local, domain


def _host_name(domain: str) -> str:
    domain = normalize_domain(domain)
    ascii_form = domain if domain.isascii() else _a_labels(domain)
    if len(ascii_form) > MAX_DOMAIN or not _DOMAIN_RE.fullmatch(ascii_form):
        raise AddressError("domain is not a valid host name")
    return domain


def _a_labels(domain: str) -> str:
    """A U-label domain's A-label form (RFC 5890), to check it as a host name."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise AddressError("domain is not a valid internationalized host name") from exc


def parse_address(text: str) -> Address:
    """Parse an envelope address (without angle brackets) strictly, or raise AddressError."""
    local, domain = _split(text)
    if not _LOCAL_RE.fullmatch(local):
        raise AddressError("local part has characters that are not allowed")
    return Address(local, _host_name(domain))


def parse_sender(text: str) -> str:
    """The MAIL FROM reverse-path: `""` for the null sender, else the address with its
    domain lower-cased. Any RFC 5321 4.1.2 Mailbox is taken (module docstring)."""
    if text in ("", "<>"):
        return ""
    local, domain = _split(text)
    if not _SENDER_LOCAL_RE.fullmatch(local):
        raise AddressError("local part is not an RFC 5321 Dot-string or Quoted-string")
    if domain.startswith("["):
        if not is_address_literal(domain):
            raise AddressError("not an RFC 5321 address literal")
        return f"{local}@{domain}"
    return f"{local}@{_host_name(domain)}"


def is_address_literal(text: str) -> bool:
    """RFC 5321 4.1.3: `[IPv4]`, `[IPv6:...]` or a General-address-literal `[tag:text]`."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if inner[:5].upper() == "IPV6:":
        return _is_ip(inner[5:], ipaddress.IPv6Address)
    if ":" in inner:
        return bool(_GENERAL_LITERAL_RE.fullmatch(inner))
    return _is_ip(inner, ipaddress.IPv4Address)


def _is_ip(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def validate_redirect_syntax(target: str, own_domains: tuple[str, ...]) -> str:
    """Check a redirect target as declared by an admin and return it normalised.

    Uses email-validator for RFC 5321/5322 syntax and lengths; refuses quoted local parts,
    domain literals, control characters, and targets inside our own domains (a loop).
    """
    if has_control_chars(target):
        raise AddressError("control characters (CR, LF, NUL...) are not allowed in a target")
    target = target.strip()
    if not target:
        raise AddressError("empty target")
    try:
        result = email_validator.validate_email(
            target,
            check_deliverability=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_smtputf8=False,
        )
    except email_validator.EmailNotValidError as exc:
        raise AddressError(str(exc)) from exc
    parsed = parse_address(result.normalized)
    if is_own_domain(parsed.domain, own_domains):
        raise AddressError(f"target {parsed} is inside our own domain {parsed.domain}: a loop")
    return str(parsed)


def is_own_domain(domain: str, own_domains: tuple[str, ...]) -> bool:
    return normalize_domain(domain) in own_domains


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """Networks from "192.0.2.0/24", "2001:db8::/32" or single addresses; ValueError."""
    return tuple(ipaddress.ip_network(text.strip(), strict=False) for text in texts)


def in_networks(client: str, networks: tuple[Network, ...]) -> bool:
    """Whether a client's address (as the transport gives it) is in one of `networks`;
    anything that is not an IP address is in none."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in networks)
