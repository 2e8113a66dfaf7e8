"""Our Authentication-Results field and the header section as the checks read it: folded
fields, forged fields with our authserv-id removed and nothing else touched, values from
the peer kept out of the header unless they have the syntax they claim."""

from __future__ import annotations

import authres
import pytest

from forwarder.authresults import (
    DkimResult,
    SpfResult,
    authserv_id_of,
    from_domains,
    has_dkim_signature,
    header_end,
    remove_our_results,
    results_header,
)
from forwarder.dmarc import Outcome, Result

OURS = "forwarder.test"


@pytest.mark.parametrize(
    ("message", "end"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n", 12),
        (b"\r\nbody only\r\n", 0),
        (b"A: 1\r\nB: 2\r\n", 12),  # no body at all
    ],
)
def test_header_end(message: bytes, end: int) -> None:
    assert header_end(message) == end


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        (" forwarder.test; spf=pass", "forwarder.test"),
        ("Forwarder.TEST;spf=pass", "forwarder.test"),
        (" (a comment (nested) \\) here) forwarder.test 1; none", "forwarder.test"),
        (' "forwarder.test"; none', "forwarder.test"),
        ("\tmx.google.com; dkim=pass", "mx.google.com"),
        ("   ", ""),
    ],
)
def test_authserv_id_of(value: str, authserv_id: str) -> None:
    assert authserv_id_of(value) == authserv_id


FORGED = (
    b"Authentication-Results: forwarder.test;\r\n"
    b"\tdkim=pass header.d=jobteaser.com;\r\n"
    b"\tdmarc=pass header.from=jobteaser.com\r\n"
)
THEIRS = b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=a@example.net\r\n"


def test_forged_results_are_removed_and_nothing_else_changes() -> None:
    body = b"\r\nAuthentication-Results: forwarder.test; in the body, untouched\r\n"
    message = (b"Received: by mx.example.net\r\n" + FORGED + THEIRS
               + b"authentication-results : (x) FORWARDER.test; spf=pass\r\n"
               + b"From: a@example.net\r\n" + body)
    cleaned, removed = remove_our_results(message, header_end(message), OURS)
    assert removed == 2
    assert cleaned == (b"Received: by mx.example.net\r\n" + THEIRS + b"From: a@example.net\r\n"
                       + body)


def test_a_message_without_forgeries_is_the_same_object() -> None:
    message = THEIRS + b"From: a@example.net\r\n\r\nbody\r\n"
    cleaned, removed = remove_our_results(message, header_end(message), OURS)
    assert removed == 0 and cleaned is message


@pytest.mark.parametrize(
    ("header", "domains"),
    [
        (b"From: JobTeaser <noreply@jobteaser.com>\r\n", ["jobteaser.com"]),
        (b"from : \"A, B\" <a@News.Example.ORG.>,\r\n c@example.net\r\n",
         ["news.example.org", "example.net"]),
        (b"From: a@x.example\r\nFrom: b@x.example\r\nFrom: c@y.example\r\n",
         ["x.example", "y.example"]),
        (b"Sender: s@x.example\r\nX-From: q@y.example\r\n", []),
        (b"From: undisclosed\r\n", []),
        (b"From: a@[192.0.2.1]\r\n", []),  # an address literal is no domain
        (b"From: =?utf-8?q?Jos=C3=A9?= <jose@example.com>\r\n", ["example.com"]),
    ],
)
def test_from_domains(header: bytes, domains: list[str]) -> None:
    assert from_domains(header) == domains


def test_dkim_signature_seen_in_any_case_and_folding() -> None:
    assert has_dkim_signature(b"X: 1\r\ndkim-signature: v=1;\r\n\ta=rsa-sha256\r\n")
    assert not has_dkim_signature(b"X-DKIM-Signature: no\r\n")


def _parse(header: bytes) -> authres.AuthenticationResultsHeader:
    return authres.parse(header.decode().replace("\r\n", ""))


def test_results_header_is_rfc_8601_and_folded() -> None:
    spf = SpfResult("pass", "jobteaser.com", "noreply@jobteaser.com", "mta.jobteaser.com")
    dkim = [DkimResult("pass", "jobteaser.com", "s2026", "AbCd+/EfGh12")]
    dmarc = [Outcome(Result.PASS, "jobteaser.com", "reject", "none", True, True)]
    header = results_header(OURS, spf, dkim, dmarc)
    assert header == (
        b"Authentication-Results: forwarder.test;\r\n"
        b"\tspf=pass smtp.mailfrom=noreply@jobteaser.com;\r\n"
        b"\tdkim=pass header.d=jobteaser.com header.s=s2026 header.b=\"AbCd+/Ef\";\r\n"
        b"\tdmarc=pass (p=REJECT dis=NONE) header.from=jobteaser.com\r\n")
    parsed = _parse(header)
    assert parsed.authserv_id == OURS
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")]


def test_null_sender_reports_helo_and_unsigned_mail_dkim_none() -> None:
    spf = SpfResult("none", "mx.example.net", "", "mx.example.net")
    header = results_header(OURS, spf, [], [])
    assert b"spf=none smtp.helo=mx.example.net;\r\n\tdkim=none\r\n" in header


@pytest.mark.parametrize(
    ("mailfrom", "helo", "dkim_domain", "selector"),
    [
        ("x;dkim=pass@evil.example", "h", "d.example", "s"),
        ("a@evil.example;dmarc=pass", "h", "d.example", "s"),
        ("", "evil.example; dkim=pass header.d=jobteaser.com", "d.example", "s"),
        ("a@x.example", "h", "jobteaser.com; dmarc=pass", "s (x) ; dmarc=pass"),
        ('"a;b"@x.example', "h", "d.example", "s"),
    ],
)
def test_peer_text_cannot_add_a_clause(mailfrom: str, helo: str, dkim_domain: str,
                                       selector: str) -> None:
    spf = SpfResult("fail", "x.example", mailfrom, helo)
    dkim = [DkimResult("fail", dkim_domain, selector, "b;=x")]
    header = results_header(OURS, spf, dkim, [])
    parsed = _parse(header)
    assert [r.method for r in parsed.results] == ["spf", "dkim"]
    assert b"pass" not in header
