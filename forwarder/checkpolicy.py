"""Pure decisions of the inbound checks: what a DMARC result, a spam verdict, a rate limit
or a failed check means for the message (PRODUCT.md "Inbound checks before a 250").

No I/O, in the manner of policy.py: every rule is a small function of its arguments,
tested from tables (tests/test_checkpolicy.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from forwarder import replies
from forwarder.dmarc import Outcome, Result
from forwarder.replies import Reply


class DmarcMode(enum.StrEnum):
    REJECT = "reject"  # a failure under p=reject is refused: 550 5.7.1
    MARK = "mark"  # forwarded, with dmarc=fail in the header
    OFF = "off"  # DMARC not evaluated


class SpamAction(enum.StrEnum):
    """rspamd's actions (its /checkv2 "action")."""

    REJECT = "reject"
    SOFT_REJECT = "soft reject"
    GREYLIST = "greylist"
    ADD_HEADER = "add header"
    REWRITE_SUBJECT = "rewrite subject"
    NO_ACTION = "no action"


@dataclass(frozen=True)
class Decision:
    """Refuse with `reply` (counted under `reason`), or accept (reply None)."""

    reply: Reply | None = None
    reason: str = ""


ACCEPT = Decision()


def dmarc_decision(outcome: Outcome | None, mode: DmarcMode, fail_open: bool) -> Decision:
    """A DMARC failure whose policy asks for reject is refused in mode `reject`. A temporary
    error that could hide such a policy (the record could not be read, or a check that
    might have passed failed temporarily under p=reject) is forwarded when failing open, and
    otherwise deferred with 451 4.7.0: never a 5xx on a DNS failure."""
    if outcome is None or mode is not DmarcMode.REJECT:
        return ACCEPT
    if outcome.result is Result.FAIL and outcome.disposition == "reject":
        return Decision(replies.DMARC_REJECTED, "dmarc")
    could_be_reject = outcome.policy in ("", "reject")
    if outcome.result is Result.TEMPERROR and could_be_reject and not fail_open:
        return Decision(replies.CHECKS_UNAVAILABLE, "auth_unavailable")
    return ACCEPT


def spam_decision(action: str, role_only: bool) -> Decision:
    """rspamd's action: reject is 550 5.7.1, soft reject and greylist 451 4.7.1, anything
    else is forwarded (with its score headers). Mail for postmaster@ and abuse@ only is
    never refused as spam (RFC 5321 4.5.1): it is forwarded, marked."""
    if role_only:
        return ACCEPT
    if action == SpamAction.REJECT:
        return Decision(replies.SPAM_REJECTED, "spam")
    if action in (SpamAction.SOFT_REJECT, SpamAction.GREYLIST):
        return Decision(replies.SPAM_DEFERRED, "spam_deferred")
    return ACCEPT


def is_spam(action: str) -> bool:
    """Whether X-Spam-Status says Yes: rspamd asked for more than forwarding as is."""
    return action not in (SpamAction.NO_ACTION, "")


def filter_failure_decision(fail_open: bool) -> Decision:
    """rspamd unreachable, slow or answering nonsense."""
    return ACCEPT if fail_open else Decision(replies.FILTER_UNAVAILABLE, "filter_unavailable")


def rate_decision(scope: str) -> Decision:
    reply = replies.CLIENT_RATE_LIMITED if scope == "client" else replies.RECIPIENT_RATE_LIMITED
    return Decision(reply, "rate_limited")


class Survival(enum.StrEnum):
    """Whether a message's authentication survives our forwarding (the sender report)."""

    DKIM = "dkim_aligned"  # an aligned DKIM signature passed: it still passes after us
    SPF_ONLY = "spf_only"  # only aligned SPF passed: DMARC fails at the next hop
    UNALIGNED = "unaligned"  # neither: fails DMARC already


def survival(outcome: Outcome) -> Survival:
    if outcome.dkim_aligned:
        return Survival.DKIM
    return Survival.SPF_ONLY if outcome.spf_aligned else Survival.UNALIGNED


def separate_transaction(first_is_role: bool, this_is_role: bool) -> bool:
    """With a spam filter, a transaction holds either role-account recipients or others,
    so that a spam verdict never has to be both a refusal and an acceptance."""
    return first_is_role != this_is_role
