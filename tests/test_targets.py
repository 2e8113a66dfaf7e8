"""Redirect targets, pure: selection, transitions, the dead-target rule, tokens, automatic
replies. Tables with the time passed in; no I/O, no event loop."""

from __future__ import annotations

import pytest

from forwarder import replies
from forwarder.policy import (
    Accept,
    Account,
    AccountState,
    NeedsTokenCheck,
    Refuse,
    Route,
    classify_recipient,
    decide_account,
    is_automatic,
    is_reserved_local,
)
from forwarder.targets import (
    TRANSITIONS,
    DeadRule,
    Event,
    Health,
    TargetState,
    TargetView,
    after_failure,
    after_success,
    counts_against,
    is_dead,
    transition,
)
from forwarder.tokens import (
    TOKEN_CHARS,
    Binding,
    TokenError,
    TokenKind,
    TokenReason,
    check_token,
    make_token,
    parse_token,
    split_local,
)

OURS = ("sigma-clermont.fr",)
GRAD = "marie.curie@sigma-clermont.fr"
P, C, R, X, F = (TargetState.PENDING, TargetState.CONFIRMED, TargetState.REFUSED,
                 TargetState.OFF, TargetState.FAILING)
DAY = 86400.0
T0 = 1_800_000_000.0


def views(*pairs: tuple[str, TargetState]) -> tuple[TargetView, ...]:
    return tuple(TargetView(t, s) for t, s in pairs)


# --- selection at RCPT ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (views(("a@x.example", C), ("b@y.example", P)), ("a@x.example", "b@y.example")),
        (views(("a@x.example", R), ("b@y.example", P)), ("b@y.example",)),
        (views(("a@x.example", F), ("b@y.example", X), ("c@z.example", C)), ("c@z.example",)),
        # An own-domain target that slipped in is skipped, the others still get the mail.
        (views(("loop@sigma-clermont.fr", C), ("b@y.example", C)), ("b@y.example",)),
    ],
)
def test_mail_goes_to_every_target_that_is_on(
    targets: tuple[TargetView, ...], expected: tuple[str, ...]
) -> None:
    verdict = decide_account(Account(GRAD, AccountState.DELETED, targets), OURS, True)
    assert isinstance(verdict, Accept) and verdict.route is Route.REDIRECT
    assert verdict.targets == expected and verdict.reason == "forward"


@pytest.mark.parametrize(
    ("targets", "reply", "reason"),
    [
        ((), replies.RCPT_CLOSED, "closed"),
        (views(("a@x.example", F)), replies.RCPT_TARGETS_FAILING, "targets_failing"),
        (views(("a@x.example", F), ("b@y.example", R)), replies.RCPT_TARGETS_FAILING,
         "targets_failing"),
        (views(("a@x.example", R), ("b@y.example", X)), replies.RCPT_TARGETS_OFF,
         "targets_off"),
        (views(("loop@sigma-clermont.fr", P)), replies.RCPT_LOOP, "loop"),
    ],
)
def test_no_target_on_is_refused_with_why(
    targets: tuple[TargetView, ...], reply: replies.Reply, reason: str
) -> None:
    verdict = decide_account(Account(GRAD, AccountState.DELETED, targets), OURS, True)
    assert isinstance(verdict, Refuse) and (verdict.reply, verdict.reason) == (reply, reason)
    assert verdict.reply.code == 550


def test_the_failing_reply_is_the_products_text() -> None:
    assert replies.RCPT_TARGETS_FAILING.at(GRAD) == (
        f"550 5.1.1 <{GRAD}>: forwarding address no longer works / la redirection ne "
        "fonctionne plus")


def test_active_accounts_ignore_their_targets() -> None:
    account = Account(GRAD, AccountState.ACTIVE, views(("a@x.example", F)))
    verdict = decide_account(account, OURS, True)
    assert isinstance(verdict, Accept) and verdict.route is Route.MAILBOX


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        (f"confirm+{'0' * 40}@sigma-clermont.fr", TokenKind.CONFIRM),
        (f"REFUSE+{'a' * 40}@sigma-clermont.fr", TokenKind.REFUSE),
        ("Confirm+x@sigma-clermont.fr", TokenKind.CONFIRM),
    ],
)
def test_confirm_and_refuse_addresses_are_token_checks(address: str, kind: TokenKind) -> None:
    first = classify_recipient(address, OURS, "pm@x.example")
    assert isinstance(first, NeedsTokenCheck) and first.kind is kind
    assert is_reserved_local(address.split("@")[0])


def test_confirm_elsewhere_is_relay_and_plus_alone_is_an_account() -> None:
    relay = classify_recipient(f"confirm+{'0' * 40}@other.example", OURS, "pm@x.example")
    assert isinstance(relay, Refuse) and relay.reason == "relay_denied"
    assert split_local("marie+news") is None and not is_reserved_local("marie+news")


# --- transitions ------------------------------------------------------------------------


def test_the_table_covers_every_state_and_event() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in TargetState for e in Event}


@pytest.mark.parametrize(
    ("state", "confirmed", "event", "after", "now_confirmed", "notice", "clear"),
    [
        (P, False, Event.CONFIRM, C, True, False, False),
        (C, True, Event.CONFIRM, C, True, False, False),  # idempotent
        (P, False, Event.REFUSE, R, False, False, False),
        (C, True, Event.REFUSE, R, False, False, False),
        (R, False, Event.REFUSE, R, False, False, False),  # idempotent
        (R, False, Event.CONFIRM, R, False, False, False),  # only the school brings it back
        (R, False, Event.ON, P, False, True, True),  # ... by declaring it again
        (R, False, Event.OFF, R, False, False, False),
        (C, True, Event.OFF, X, True, False, False),
        (X, True, Event.ON, C, True, False, True),  # back as it was
        (X, False, Event.ON, P, False, True, True),
        (X, False, Event.CONFIRM, X, True, False, False),  # remembered for later
        (P, False, Event.ON, P, False, True, True),  # the notice again, a fresh start
        (C, True, Event.ON, C, True, False, False),
        (P, False, Event.DEAD, F, False, False, False),
        (C, True, Event.DEAD, F, True, False, False),
        (X, True, Event.DEAD, X, True, False, False),
        (F, True, Event.ALIVE, C, True, False, True),
        (F, False, Event.ALIVE, P, False, False, True),
        (F, True, Event.ON, P, False, True, True),  # a new declaration
        (F, True, Event.CONFIRM, F, True, False, False),
    ],
)
def test_transitions(state: TargetState, confirmed: bool, event: Event, after: TargetState,
                     now_confirmed: bool, notice: bool, clear: bool) -> None:
    change = transition(state, confirmed, event)
    assert (change.state, change.confirmed, change.notice, change.clear_failures) == (
        after, now_confirmed, notice, clear)


# --- the dead-target rule, with the time injected ------------------------------------------


@pytest.mark.parametrize(
    ("status", "counts"),
    [("5.1.1", True), ("5.1.2", True), ("5.1.10", True), ("5.1.6", True), ("5.2.1", True),
     ("5.2.2", False), ("5.7.1", False), ("5.7.26", False), ("5.6.0", False),
     ("5.0.0", False), ("4.1.1", False), ("4.4.7", False), ("", False), (None, False),
     ("5.1", False), ("2.0.0", False)],
)
def test_only_mailbox_failures_count(status: str | None, counts: bool) -> None:
    assert counts_against(status) is counts


def failures_at(*days: float) -> Health:
    health = Health()
    for day in days:
        health = after_failure(health, T0 + day * DAY)
    return health


@pytest.mark.parametrize(
    ("days", "dead"),
    [
        ((0, 8, 16, 24, 30), True),  # 5 failures spanning 30 days
        ((0, 8, 16, 24, 29.9), False),  # not long enough
        ((0, 30), False),  # long enough, not enough failures
        ((0, 1, 2, 3, 4, 5, 6), False),  # many, all in one week
        ((0, 1, 2, 3, 40), True),
    ],
)
def test_dead_after_n_failures_over_d_days(days: tuple[float, ...], dead: bool) -> None:
    assert is_dead(failures_at(*days), DeadRule()) is dead


def test_a_success_in_between_restarts_the_count() -> None:
    health = failures_at(0, 8, 16)
    health = after_success(health, T0 + 17 * DAY)
    assert (health.failures, health.first_failure) == (0, None)
    for day in (24, 31, 40, 45):
        health = after_failure(health, T0 + day * DAY)
    assert not is_dead(health, DeadRule())  # 4 failures since the success
    health = after_failure(health, T0 + 55 * DAY)
    assert is_dead(health, DeadRule()) and health.first_failure == T0 + 24 * DAY


def test_results_recorded_out_of_order() -> None:
    health = after_success(failures_at(0, 8), T0 + 10 * DAY)
    # A failure from before that success, recorded after it: no news.
    assert after_failure(health, T0 + 9 * DAY) == health
    later = after_failure(health, T0 + 11 * DAY)
    # A success from before that failure, recorded after it: the failure stands.
    assert after_success(later, T0 + 10.5 * DAY).failures == 1


def test_the_rule_is_configurable() -> None:
    assert is_dead(failures_at(0, 2), DeadRule(max_failures=2, span=2 * DAY))
    assert not is_dead(failures_at(0, 1), DeadRule(max_failures=2, span=2 * DAY))


# --- tokens -----------------------------------------------------------------------------

SECRET = b"s" * 32
OLD_SECRET = b"o" * 32
BOUND = Binding(GRAD, "marie@perso.example", T0)


def token(kind: TokenKind = TokenKind.CONFIRM, target_id: int = 42,
          binding: Binding = BOUND, expires: float = T0 + 30 * DAY,
          secret: bytes = SECRET) -> str:
    return make_token(kind, target_id, binding, expires, secret)


def verify(text: str, kind: TokenKind = TokenKind.CONFIRM, binding: Binding | None = BOUND,
           now: float = T0 + DAY, secrets: tuple[bytes, ...] = (SECRET,)) -> None:
    check_token(parse_token(kind, text), binding, secrets, now)


def test_a_token_fits_a_local_part_and_verifies() -> None:
    text = token()
    assert len(text) == TOKEN_CHARS and len(f"confirm+{text}") <= 64  # RFC 5321 4.5.3.1.1
    verify(text)
    verify(text.upper())  # a mail system that folds local parts to upper case
    assert parse_token(TokenKind.CONFIRM, text).target_id == 42


def one_char_changed(text: str) -> str:
    return text[:20] + ("1" if text[20] != "1" else "2") + text[21:]


@pytest.mark.parametrize(
    ("text", "kind", "binding", "now", "reason"),
    [
        ("0" * TOKEN_CHARS, TokenKind.CONFIRM, BOUND, T0, TokenReason.MALFORMED),  # forged
        ("zz" + token()[2:], TokenKind.CONFIRM, BOUND, T0, TokenReason.MALFORMED),
        (token()[:-1], TokenKind.CONFIRM, BOUND, T0, TokenReason.MALFORMED),
        ("01" + "0" * 38, TokenKind.CONFIRM, BOUND, T0, TokenReason.BAD_HASH),  # forged
        (one_char_changed(token()), TokenKind.CONFIRM, BOUND, T0, TokenReason.BAD_HASH),
        # Signed for another account, presented for this target id.
        (token(binding=Binding("pierre.curie@sigma-clermont.fr", "marie@perso.example", T0)),
         TokenKind.CONFIRM, BOUND, T0, TokenReason.BAD_HASH),
        # The target declared again since: tokens of the old declaration are void.
        (token(), TokenKind.CONFIRM, Binding(GRAD, "marie@perso.example", T0 + 5),
         T0, TokenReason.BAD_HASH),
        (token(), TokenKind.REFUSE, BOUND, T0, TokenReason.BAD_HASH),  # confirm as refuse
        (token(secret=b"x" * 32), TokenKind.CONFIRM, BOUND, T0, TokenReason.BAD_HASH),
        (token(), TokenKind.CONFIRM, None, T0, TokenReason.UNKNOWN),  # target gone
        (token(), TokenKind.CONFIRM, BOUND, T0 + 30 * DAY, TokenReason.EXPIRED),
        (token(), TokenKind.CONFIRM, BOUND, T0 + 31 * DAY, TokenReason.EXPIRED),
        # Forged and old: reported as forged (the MAC is checked first).
        (one_char_changed(token()), TokenKind.CONFIRM, BOUND, T0 + 60 * DAY,
         TokenReason.BAD_HASH),
    ],
)
def test_bad_tokens(text: str, kind: TokenKind, binding: Binding | None, now: float,
                    reason: TokenReason) -> None:
    with pytest.raises(TokenError) as caught:
        verify(text, kind, binding, now)
    assert caught.value.reason is reason


def test_rotation_keeps_old_tokens_valid() -> None:
    old = token(secret=OLD_SECRET)
    verify(old, secrets=(SECRET, OLD_SECRET))
    with pytest.raises(TokenError):
        verify(old, secrets=(SECRET,))


def test_target_ids_out_of_range() -> None:
    with pytest.raises(ValueError):
        token(target_id=0)
    with pytest.raises(ValueError):
        token(target_id=2**40)


# --- automatic replies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "headers", "automatic"),
    [
        ("marie@perso.example", b"Subject: Re: Redirection\r\n", False),
        ("marie@perso.example", b"Auto-Submitted: no\r\n", False),
        ("", b"Subject: Undelivered Mail\r\n", True),  # a bounce
        ("marie@perso.example", b"Auto-Submitted: auto-replied\r\n", True),  # RFC 3834
        ("marie@perso.example", b"auto-submitted: Auto-Generated; x=y\r\n", True),
        ("marie@perso.example", b"Precedence: bulk\r\n", True),
        ("marie@perso.example", b"X-Autoreply: yes\r\n", True),
    ],
)
def test_automatic_replies(sender: str, headers: bytes, automatic: bool) -> None:
    message = b"From: x@perso.example\r\n" + headers + b"\r\nI am away.\r\nPrecedence: bulk\r\n"
    assert is_automatic(sender, message) is automatic
