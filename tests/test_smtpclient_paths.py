"""The outbound client's fast path for plain addresses (forwarder/smtpclient.py) puts on
the command line exactly what aiosmtplib's own quoting would, and nothing else takes it."""

from __future__ import annotations

from aiosmtplib.email import quote_address
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.smtpclient import PLAIN_MAILBOX, plain_path


@settings(max_examples=400)
@given(st.from_regex(PLAIN_MAILBOX, fullmatch=True))
def test_a_plain_address_is_sent_as_the_library_would_send_it(address: str) -> None:
    assert plain_path(address) == quote_address(address).encode("ascii")


@given(st.text())
def test_whatever_takes_the_fast_path_is_what_the_library_sends(address: str) -> None:
    path = plain_path(address)
    if path is not None and address:
        assert path == quote_address(address).encode("ascii")
        assert not set(address) & set(' \t\r\n<>"\x00')


def test_the_null_path_and_unusual_addresses() -> None:
    assert plain_path("") == b"<>"
    for address in ['"john smith"@example.org', "user@[192.0.2.1]", "élève@example.fr",
                    "a@b\r\nRSET", "a@b>\r\nRCPT TO:<c@d", "a..b@example.org",
                    ".a@example.org", "a@-example.org", "a@example.org "]:
        assert plain_path(address) is None, address  # the library's own parser decides
