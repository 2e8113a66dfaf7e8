"""Every SMTP reply the daemon sends, as named constants (RFC 5321 4.2, RFC 3463 codes).

Replies are plain ASCII (PRODUCT.md). Texts that name an address take it through
`Reply.at(address)`, which refuses to echo control characters back to the peer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # RFC 3463 code; "" for the replies that carry none (RFC 2034 4)
    text: str

    def __str__(self) -> str:
        if not self.enhanced:
            return f"{self.code} {self.text}"
        return f"{self.code} {self.enhanced} {self.text}"

    def at(self, address: str) -> str:
        """The reply prefixed by `<address>: `, with anything non-printable replaced."""
        safe = "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in address)
        return f"{self.code} {self.enhanced} <{safe}>: {self.text}"

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500


# RCPT verdicts (PRODUCT.md, "Address lifecycle and what each state gets").
RCPT_OK = Reply(250, "2.1.5", "Ok")
RCPT_CLOSED = Reply(
    550,
    "5.1.1",
    "address closed, no forwarding address declared / adresse fermee, aucune redirection declaree",
)
RCPT_UNKNOWN = Reply(550, "5.1.1", "user unknown")
RCPT_BAD_SRS = Reply(550, "5.1.1", "invalid SRS address")
# Every target declared, none on: failing ones make the reason the one senders can act on.
RCPT_TARGETS_FAILING = Reply(
    550, "5.1.1",
    "forwarding address no longer works / la redirection ne fonctionne plus")
RCPT_TARGETS_OFF = Reply(
    550, "5.1.1", "forwarding address disabled / redirection desactivee")
# A confirm+ or refuse+ address (a reply to a notice) whose token does not verify.
RCPT_BAD_TOKEN = Reply(550, "5.1.1", "invalid or expired confirmation address")
RCPT_LOOP = Reply(550, "5.4.6", "forwarding loop: redirect points into our own domains")
RCPT_RELAY_DENIED = Reply(554, "5.7.1", "relay access denied")
RCPT_BAD_SYNTAX = Reply(553, "5.1.3", "bad recipient address syntax")
RCPT_TOO_MANY = Reply(452, "4.5.3", "too many recipients")
RCPT_TEMPFAIL = Reply(451, "4.3.0", "temporary lookup failure, try again later")
# Several nodes: this node's copy of the directory has not been synchronised with
# PostgreSQL for longer than directory_max_staleness; it no longer vouches for anyone, and
# never refuses from stale data (docs/cluster.md).
DIRECTORY_STALE = Reply(451, "4.3.0", "directory temporarily out of date, try again later")
RCPT_NOT_CONFIGURED = Reply(451, "4.3.0", "destination not configured, try again later")

# MAIL and DATA.
MAIL_OK = Reply(250, "2.1.0", "Ok")
MAIL_BAD_SYNTAX = Reply(553, "5.1.7", "bad sender address syntax")
SIZE_EXCEEDED = Reply(552, "5.3.4", "message size exceeds fixed maximum message size")
QUEUED = Reply(250, "2.0.0", "Ok: queued as")
TOO_MANY_HOPS = Reply(554, "5.4.6", "too many hops: mail loop detected")
BARE_LINE_END = Reply(550, "5.6.0", "bare CR or LF in message; lines must end with CRLF")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "no valid recipients")
QUEUE_UNAVAILABLE = Reply(451, "4.3.0", "queue temporarily unavailable, try again later")
QUEUE_FULL = Reply(452, "4.3.1", "insufficient system storage, try again later")
# A message to confirm+ or refuse+ addresses only: recorded, consumed, never queued.
CONSUMED = Reply(250, "2.0.0", "Ok: recorded, thank you / enregistre, merci")
DIRECTORY_WRITE_FAILED = Reply(451, "4.3.0", "directory temporarily unavailable, try again later")

# The inbound checks before the 250 (PRODUCT.md "Inbound checks before a 250"). RFC 3463:
# 5.7.1 "delivery not authorized, message refused", 4.7.0 "other or undefined security
# status" (a check that cannot conclude now), 4.7.1 for the filter's temporary refusals.
DMARC_REJECTED = Reply(550, "5.7.1", "message refused: it fails the DMARC policy (p=reject) "
                                     "of its From domain")
SPAM_REJECTED = Reply(550, "5.7.1", "message refused as spam")
SPAM_DEFERRED = Reply(451, "4.7.1", "message deferred by the spam filter, try again later")
CLIENT_RATE_LIMITED = Reply(451, "4.7.0", "too many messages from your address, "
                                          "try again later")
RECIPIENT_RATE_LIMITED = Reply(451, "4.7.0", "too many messages for this recipient, "
                                             "try again later")
CHECKS_UNAVAILABLE = Reply(451, "4.7.0", "message authentication could not be checked now, "
                                         "try again later")
FILTER_UNAVAILABLE = Reply(451, "4.7.0", "spam filter unavailable, try again later")
# RFC 5321 4.5.3.1.10: the client sends the recipients refused with 452 in a later
# transaction. Used so that role-account mail, never refused as spam (RFC 5321 4.5.1),
# never shares a message (and so a spam verdict) with other recipients.
RCPT_SEPARATE_TRANSACTION = Reply(452, "4.5.3", "postmaster mail goes in a transaction of "
                                                "its own, send this recipient again")

# Session-level.
BAD_ARGUMENT = Reply(501, "5.5.4", "syntax error in parameters or arguments")
LOCAL_ERROR = Reply(451, "4.3.0", "local error in processing, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "too many connections, try again later")

# The SMTP session (forwarder/session.py); choices in docs/security.md. Texts follow
# aiosmtpd's, which clients and tests have long seen.
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")  # 3yz: no enhanced code
COMMAND_UNRECOGNIZED = Reply(500, "5.5.1", "command unrecognized")
SYNTAX_ERROR = Reply(500, "5.5.2", "syntax error")
# RFC 5321 4.5.3.1.4: "500 Line too long".
COMMAND_TOO_LONG = Reply(500, "5.5.2", "line too long: command lines are limited to 512 octets")
BAD_SEQUENCE = Reply(503, "5.5.1", "bad sequence of commands")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "command not implemented")
# RFC 5321 4.5.3.1.6 and RFC 5322 2.1.1: refused after the final dot, like bare CR or LF.
TEXT_LINE_TOO_LONG = Reply(550, "5.6.0", "line longer than 1000 octets in message")
# RFC 5322 2.3 and RFC 6152: NUL is never allowed in message text (no BINARYMIME here).
NUL_IN_MESSAGE = Reply(550, "5.6.0", "NUL character in message")
TIMEOUT = Reply(421, "4.4.2", "timeout exceeded, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "too many errors, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "session time limit exceeded, closing connection")
# Replies to HELO and EHLO carry no enhanced code (RFC 2034 4).
HELO_SYNTAX = Reply(501, "", "Syntax: HELO hostname")
HELO_NEEDED = Reply(503, "5.5.1", "Error: send HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
MALFORMED_ADDRESS = Reply(553, "5.1.3", "Error: malformed address")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM: <address>")
MAIL_SYNTAX_ESMTP = Reply(501, "5.5.4", "Syntax: MAIL FROM: <address> [SP <mail-parameters>]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO: <address>")
RCPT_SYNTAX_ESMTP = Reply(501, "5.5.4", "Syntax: RCPT TO: <address> [SP <mail-parameters>]")
# RFC 5321 4.1.1.11: a parameter we do not recognise or implement is a 555.
MAIL_PARAMETERS_UNKNOWN = Reply(555, "5.5.4",
                                "MAIL FROM parameters not recognized or not implemented")
RCPT_PARAMETERS_UNKNOWN = Reply(555, "5.5.4",
                                "RCPT TO parameters not recognized or not implemented")
BODY_UNSUPPORTED = Reply(555, "5.5.4", "Error: BODY can only be one of 7BIT, 8BITMIME")
SMTPUTF8_ARGUMENT = Reply(501, "5.5.4", "Error: SMTPUTF8 takes no arguments")
# RFC 6531 3.5: a UTF-8 address needs SMTPUTF8 on MAIL; X.6.7 is "non-ASCII addresses
# not permitted for that sender/recipient" (RFC 6531 3.7.5 and the RFC 5248 registry).
UTF8_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "non-ASCII address requires MAIL FROM with SMTPUTF8")
# RFC 3461 4: malformed DSN parameters are a syntax error in the arguments.
DSN_BAD_RET = Reply(501, "5.5.4", "Error: RET must be FULL or HDRS")
DSN_BAD_ENVID = Reply(501, "5.5.4", "Error: ENVID must be xtext of at most 100 characters")
DSN_BAD_NOTIFY = Reply(501, "5.5.4",
                       "Error: NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
DSN_BAD_ORCPT = Reply(501, "5.5.4", "Error: ORCPT must be addr-type;xtext")
RSET_SYNTAX = Reply(501, "5.5.4", "Syntax: RSET")
# XFORWARD (Postfix's XFORWARD_README, "Server reply codes"; forwarder/xforward.py).
XFORWARD_OK = Reply(250, "2.0.0", "Ok")
XFORWARD_DENIED = Reply(550, "5.7.0", "Error: insufficient authorization")
XFORWARD_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
XFORWARD_SYNTAX = Reply(501, "5.5.4", "Syntax: XFORWARD attribute=value...")
XFORWARD_BAD_ATTRIBUTE = Reply(501, "5.5.4", "Bad XFORWARD attribute name")
XFORWARD_BAD_VALUE = Reply(501, "5.5.4", "Bad XFORWARD attribute value")
QUIT_SYNTAX = Reply(501, "5.5.4", "Syntax: QUIT")
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY <address>")
OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
# RFC 5321 3.5.3: 252, neither confirmed nor denied (no address harvesting).
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
VRFY_UNPARSABLE = Reply(502, "5.5.1", "Could not VRFY")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
# RFC 5321 4.1.1.8 and 4.2.2: 214 is the help reply.
HELP = Reply(214, "2.0.0", "Supported commands:")
HELP_SYNTAX = Reply(214, "2.0.0", "Syntax:")
HELP_UNKNOWN = Reply(501, "5.5.4", "Supported commands:")


def queued(queue_id: str) -> str:
    return f"{QUEUED} {queue_id}"
