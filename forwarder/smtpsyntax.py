"""SMTP command syntax, pure: command words, arguments, paths, ESMTP parameters, replies.

No I/O and no state: the session (forwarder/session.py) calls these on each command line,
and tests run them from tables.
"""

from __future__ import annotations

import functools
import re

from forwarder import replies
from forwarder.dsnparams import mail_dsn, rcpt_dsn
from forwarder.replies import Reply

# RFC 1870 6: the SIZE parameter lengthens MAIL FROM by up to 26 octets.
SIZE_EXTENSION_OCTETS = 26

_COMMAND_WORD = re.compile(rb"[A-Za-z]{1,16}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_REPLY = re.compile(r"([245])(\d\d)([ -])(.*)", re.DOTALL)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_LINE_BREAKS = re.compile(r"[\r\n]+")
# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"), and
# esmtp-value = 1*(%d33-60 / %d62-126): printable, no "=", no space.
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
# RFC 3463 codes for the replies (aiosmtpd's wording) that carry none.
_DEFAULT_ENHANCED = {
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
    552: "5.3.4", 553: "5.1.3", 555: "5.5.4", 454: "4.7.0", 421: "4.3.0",
}


def with_enhanced_code(status: str) -> str:
    """Give a 2yz/4yz/5yz reply an RFC 3463 code when it has none; others pass unchanged."""
    match = _REPLY.fullmatch(status)
    if match is None:
        return status
    klass, rest, sep, text = match.groups()
    if _ENHANCED.match(text):
        return status
    code = int(klass + rest)
    enhanced = _DEFAULT_ENHANCED.get(code, f"{klass}.0.0")
    return f"{code}{sep}{enhanced} {text}".rstrip()


@functools.lru_cache(maxsize=512)
def render_reply(text: str, enhanced: bool) -> bytes:
    """A reply line on the wire. Cached: almost every reply is one of a few constants, and
    this was a regular expression or two per reply (docs/performance.md)."""
    if enhanced:
        text = with_enhanced_code(text)
    # A reply is one line: nothing a handler returns may add another (RFC 5321 4.2).
    return _LINE_BREAKS.sub(" ", text).encode("ascii", "replace") + b"\r\n"


def split_command(line: bytes) -> tuple[str, bytes] | Reply:
    """`line` without its CRLF -> (COMMAND, raw argument), or the reply refusing it."""
    word, _, arg = line.partition(b" ")
    if not _COMMAND_WORD.fullmatch(word):
        return replies.SYNTAX_ERROR
    return word.decode("ascii").upper(), arg.strip(b" ")


def decode_argument(arg: bytes, utf8: bool = False) -> str | Reply | None:
    """An argument as text; control characters are a 501, and so are 8-bit octets except
    well-formed UTF-8 where `utf8` (MAIL and RCPT paths: RFC 6531 3.3, checked against
    the SMTPUTF8 parameter by the session)."""
    if not arg:
        return None
    if _CONTROL.search(arg):
        return replies.BAD_ARGUMENT
    if arg.isascii():
        return arg.decode("ascii")
    if not utf8:
        return replies.BAD_ARGUMENT
    try:
        return arg.decode("utf-8")
    except UnicodeDecodeError:
        return replies.BAD_ARGUMENT


def _path_end(text: str) -> int:
    """Index of the `>` closing a path that starts with `<`, or -1. A quoted local part
    (RFC 5321 4.1.2 Quoted-string) may hold `>`, `<` and spaces, and a backslash quotes
    the character after it."""
    end = text.find(">")
    if end < 0 or '"' not in text[:end]:
        return end  # the usual path: no quoted local part
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    return -1


def _unquoted_has(mailbox: str, chars: str) -> bool:
    """Whether any of `chars` appears in `mailbox` outside a quoted local part."""
    if mailbox.startswith('"'):
        close = _quote_end(mailbox)
        if close < 0:
            return True
        mailbox = mailbox[close + 1:]
    return any(c in mailbox for c in chars)


def _quote_end(text: str) -> int:
    """Index of the `"` closing the quoted string that `text` starts with, or -1."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1


def split_path(arg: str) -> tuple[str | None, str | None]:
    """RFC 5321 4.1.2 `Path [SP params]` -> (mailbox, params); (None, None) if malformed.

    Deliberately simpler than RFC 5322 parsing (no comments, no folding): the mailbox is
    returned verbatim for addresses.py to judge. A source route (`@a,@b:x@y`) is dropped, as
    RFC 5321 4.1.1.3 and Appendix C ask; the null path is returned as `<>`.
    """
    text = arg.lstrip(" ")
    if not text:
        return "", ""
    if text.startswith("<"):
        end = _path_end(text)
        if end < 0:
            return None, None
        mailbox, rest = text[1:end], text[end + 1:]
        if not mailbox:
            return "<>", rest
    else:
        mailbox, _, rest = text.partition(" ")
    if mailbox.startswith("@"):
        _, colon, mailbox = mailbox.partition(":")
        if not colon:
            return None, None
    if not mailbox or _unquoted_has(mailbox, " <>"):
        return None, None
    return mailbox, rest


def after_keyword(keyword: str, arg: str | None) -> str | None:
    """`FROM:<a>` -> `<a>`; None if the keyword is missing."""
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def parameters(params: str) -> dict[str, str | bool] | None:
    """RFC 5321 4.1.2 esmtp-param list as a dict (keywords upper-cased, values as sent);
    None if one is malformed."""
    result: dict[str, str | bool] = {}
    if not params:
        return result
    for param in params.split():
        key, eq, value = param.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            return None
        result[key.upper()] = value if eq else True
    return result


def mail_parameters_fault(params: dict[str, str | bool], max_size: int,
                          address: str = "") -> Reply | None:
    """What is wrong with MAIL FROM's parameters, or None: SIZE (RFC 1870; over the limit
    552 5.3.4, 6.1), BODY (RFC 6152), SMTPUTF8 (RFC 6531: required by a UTF-8 `address`,
    3.5), RET and ENVID (RFC 3461). RFC 5321 4.1.1.11: a parameter we do not implement is
    a 555; a malformed one a 501."""
    if not address.isascii() and "SMTPUTF8" not in params:
        return replies.UTF8_NEEDS_SMTPUTF8
    if not params:
        return None
    params = dict(params)
    body = params.pop("BODY", "7BIT")
    if not isinstance(body, str) or body.upper() not in ("7BIT", "8BITMIME"):
        # RFC 6152 2: 7BIT or 8BITMIME; BINARYMIME (RFC 3030) is not offered.
        return replies.BODY_UNSUPPORTED
    smtputf8 = params.pop("SMTPUTF8", False)
    if not isinstance(smtputf8, bool):
        return replies.SMTPUTF8_ARGUMENT
    size = params.pop("SIZE", None)
    if size is not None:
        if isinstance(size, bool) or not size.isdigit():
            return replies.MAIL_SYNTAX_ESMTP
        if int(size) > max_size:
            return replies.SIZE_EXCEEDED
    dsn = mail_dsn(params)
    if isinstance(dsn, Reply):
        return dsn
    return replies.MAIL_PARAMETERS_UNKNOWN if params else None


def rcpt_parameters_fault(params: dict[str, str | bool], address: str = "",
                          smtputf8: bool = False) -> Reply | None:
    """What is wrong with RCPT TO's parameters, or None: NOTIFY and ORCPT (RFC 3461) are
    the only ones we implement (RFC 5321 4.1.1.11: others are a 555); a UTF-8 `address`
    needs an SMTPUTF8 transaction (RFC 6531 3.5)."""
    if not smtputf8 and not address.isascii():
        return replies.UTF8_NEEDS_SMTPUTF8
    if not params:
        return None
    params = dict(params)
    dsn = rcpt_dsn(params)
    if isinstance(dsn, Reply):
        return dsn
    return replies.RCPT_PARAMETERS_UNKNOWN if params else None


def envelope_path(keyword: str, arg: str | None, extended: bool,
                  syntax: Reply) -> tuple[str, dict[str, str | bool]] | Reply:
    """MAIL's and RCPT's `KEYWORD:<path> [params]` -> (mailbox, parameters), or the reply
    refusing it (`syntax` is the command's usage reply). Parameters only after EHLO."""
    path = after_keyword(keyword, arg)
    if path is None:
        return syntax
    address, params = split_path(path)
    if address is None:
        return replies.MALFORMED_ADDRESS
    if not address or (params and not extended):
        return syntax
    parsed = parameters(params or "")
    return syntax if parsed is None else (address, parsed)


# HELP's answers (RFC 5321 4.1.1.8); STARTTLS is listed only where it is offered.
_USAGE = {
    "DATA": "DATA", "EHLO": "EHLO hostname", "EXPN": "EXPN <address>", "HELO": "HELO hostname",
    "HELP": "HELP [command]", "MAIL": "MAIL FROM: <address> [SP <mail-parameters>]",
    "NOOP": "NOOP [ignored]", "QUIT": "QUIT", "RCPT": "RCPT TO: <address> [SP <mail-parameters>]",
    "RSET": "RSET", "STARTTLS": "STARTTLS", "VRFY": "VRFY <address>",
}


def help_text(arg: str | None, starttls: bool) -> str:
    """HELP's reply: the usage of one command, or the list of them (214, RFC 5321 4.2.2)."""
    offered = {k: v for k, v in _USAGE.items() if k != "STARTTLS" or starttls}
    if arg and arg.upper() in offered:
        return f"{replies.HELP_SYNTAX} {offered[arg.upper()]}"
    reply = replies.HELP_UNKNOWN if arg else replies.HELP
    return f"{reply} {' '.join(sorted(offered))}"
