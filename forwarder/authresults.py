"""The message's header section as the checks see it, and our Authentication-Results.

- `header_end`, `field_spans`: where the header section ends and where named fields are,
  found with bytes methods and regular expressions (C speed); Python only walks the lines
  of the fields it is asked about, never the body.
- `from_domains`: the RFC 5322.From domains, which DMARC is about (RFC 7489 3.1).
- `remove_our_results`: RFC 8601 section 5: an Authentication-Results field that arrived
  with our authserv-id is a forgery and is removed before we add ours; nothing else in the
  message changes, so the sender's DKIM signature still verifies downstream.
- `results_header`: our one field (RFC 8601 2.2), its clauses formatted by `authres`.

Everything that comes from the peer (HELO, MAIL FROM, a signature's d= and s=, the From
domain) goes into the header only if it has the syntax of what it claims to be: a header
value built from client text must never carry a `;` that starts a forged clause.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from authres import DKIMAuthenticationResult, SPFAuthenticationResult
from authres.core import AuthenticationResultProperty
from authres.dmarc import DMARCAuthenticationResult

from forwarder.dmarc import Outcome, Result

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_ADDRESS_LITERAL = re.compile(r"^\[(?:IPv6:)?[0-9A-Fa-f:.]+\]$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+$")
MAX_DOMAIN = 253
# RFC 6008: the first characters of b= tell several signatures of one domain apart.
B_PREFIX = 8


@dataclass(frozen=True)
class SpfResult:
    """check_host() for the MAIL FROM identity, or HELO for the null sender (RFC 7208 2.4)."""

    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    domain: str  # the domain checked (the identity DMARC aligns)
    mailfrom: str  # the reverse-path as given ("" for the null sender)
    helo: str


@dataclass(frozen=True)
class DkimResult:
    """One DKIM-Signature's verification (RFC 6376 6, reported per RFC 8601 2.7.1)."""

    result: str  # pass, fail, neutral, temperror, permerror
    domain: str  # d=
    selector: str  # s=
    b: str  # the start of b=


# --- the header section ---------------------------------------------------------------


def header_end(message: bytes) -> int:
    """The length of the header section (its fields, each ending in CRLF); the empty line
    and the body follow. A message with no empty line is all header."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2


def _field_pattern(name: str) -> re.Pattern[bytes]:
    # RFC 5322 4.5.3 (obsolete syntax) allows white space before the colon.
    return re.compile(rb"^" + re.escape(name.encode()) + rb"[ \t]*:", re.MULTILINE | re.IGNORECASE)


_AUTH_RESULTS = _field_pattern("Authentication-Results")
_FROM = _field_pattern("From")
_DKIM_SIGNATURE = _field_pattern("DKIM-Signature")


def field_spans(header: bytes, pattern: re.Pattern[bytes]) -> list[tuple[int, int, int]]:
    """(start, value start, end) of each field whose name `pattern` matches: `end` is past
    the CRLF of its last line, folded continuation lines included (RFC 5322 2.2.3)."""
    spans = []
    for match in pattern.finditer(header):
        end = match.end()
        while True:
            crlf = header.find(b"\r\n", end)
            if crlf < 0:
                end = len(header)
                break
            end = crlf + 2
            if end >= len(header) or header[end] not in b" \t":
                break
        spans.append((match.start(), match.end(), end))
    return spans


def has_dkim_signature(header: bytes) -> bool:
    return _DKIM_SIGNATURE.search(header) is not None


def _unfold(value: bytes) -> str:
    return value.replace(b"\r\n", b"").decode("utf-8", "replace")


def from_domains(header: bytes) -> list[str]:
    """The distinct domains of the RFC 5322.From addresses, lower case, in order; a From
    field or address that is not well formed contributes nothing."""
    values = [_unfold(header[v:e]) for _, v, e in field_spans(header, _FROM)]
    domains: list[str] = []
    for _, address in getaddresses(values):
        domain = safe_domain(address.rpartition("@")[2]) if "@" in address else None
        if domain is not None and domain not in domains:
            domains.append(domain)
    return domains


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with (RFC 8601 2.2), after
    any comments; "" if there is none."""
    text = value.lstrip()
    while text.startswith("("):  # CFWS
        text = _after_comment(text).lstrip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end].lower() if end > 0 else ""
    return re.split(r"[\s;(]", text, maxsplit=1)[0].lower()


def _after_comment(text: str) -> str:
    """What follows the comment `text` starts with (comments nest; a backslash quotes
    the next character, RFC 5322 3.2.2)."""
    depth, escaped = 0, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "()":
            depth += 1 if char == "(" else -1
            if depth == 0:
                return text[index + 1:]
    return ""


def remove_our_results(message: bytes, end: int, authserv_id: str) -> tuple[bytes, int]:
    """The message without the Authentication-Results fields that carry our authserv-id
    (RFC 8601 5), and how many there were. Without any, the same bytes object comes back."""
    header = message[:end]
    ours = authserv_id.lower()
    drop = [(s, e) for s, v, e in field_spans(header, _AUTH_RESULTS)
            if authserv_id_of(_unfold(header[v:e])) == ours]
    if not drop:
        return message, 0
    parts, kept_from = [], 0
    for start, stop in drop:
        parts.append(message[kept_from:start])
        kept_from = stop
    parts.append(message[kept_from:])
    return b"".join(parts), len(drop)


# --- values taken from the peer -------------------------------------------------------


def safe_domain(text: str) -> str | None:
    """`text` as a domain name (lower case, no final dot) if it is one."""
    name = text.strip().rstrip(".").lower()
    if 0 < len(name) <= MAX_DOMAIN and _DOMAIN.match(name):
        return name
    return None


def _mailfrom_value(mailfrom: str) -> str | None:
    local, _, domain = mailfrom.rpartition("@")
    checked = safe_domain(domain)
    if checked is None:
        return None
    return f"{local}@{checked}" if _DOT_ATOM.match(local) else checked


def _helo_value(helo: str) -> str | None:
    return safe_domain(helo) or (helo if _ADDRESS_LITERAL.match(helo) else None)


# --- our header -----------------------------------------------------------------------


def _spf_clause(spf: SpfResult) -> str:
    if spf.mailfrom:
        clause = SPFAuthenticationResult(result=spf.result,
                                         smtp_mailfrom=_mailfrom_value(spf.mailfrom))
    else:  # the null sender: HELO was the identity checked (RFC 7208 2.4)
        clause = SPFAuthenticationResult(result=spf.result, smtp_helo=_helo_value(spf.helo))
    return str(clause)


def _dkim_clause(dkim: DkimResult) -> str:
    clause = DKIMAuthenticationResult(result=dkim.result, header_d=safe_domain(dkim.domain),
                                      header_s=safe_domain(dkim.selector))
    prefix = dkim.b[:B_PREFIX]
    if _BASE64.match(prefix):
        clause.properties.append(AuthenticationResultProperty("header", "b", prefix))
    return str(clause)


def _dmarc_clause(dmarc: Outcome) -> str:
    comment = None
    if dmarc.policy:
        comment = f"p={dmarc.policy.upper()} dis={(dmarc.disposition or 'none').upper()}"
    header_from = dmarc.domain if dmarc.result is not Result.PERMERROR else None
    return str(DMARCAuthenticationResult(result=dmarc.result.value, result_comment=comment,
                                         header_from=header_from or None))


def results_header(authserv_id: str, spf: SpfResult | None, dkim: Sequence[DkimResult],
                   dmarc: Sequence[Outcome], dkim_checked: bool = True) -> bytes:
    """Our Authentication-Results field, one clause a line (RFC 8601 2.2): spf, every
    DKIM signature (dkim=none if the message has none), dmarc for each From domain."""
    clauses = []
    if spf is not None:
        clauses.append(_spf_clause(spf))
    if dkim_checked:
        clauses.extend(_dkim_clause(d) for d in dkim)
        if not dkim:
            clauses.append("dkim=none")
    clauses.extend(_dmarc_clause(d) for d in dmarc)
    if not clauses:
        clauses.append("none")
    text = f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(clauses) + "\r\n"
    return text.encode("ascii", "replace")
