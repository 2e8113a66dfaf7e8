"""The lines the school's Postfix gateway needs so that every address the forwarder
answers for reaches it (docs/admin.md section 3), pure: `forwarder check` prints them and
tests/test_postfix.py runs a real Postfix with them.

Graduates' addresses come from the directory (hash maps generated after each import); the
addresses the forwarder makes up itself cannot be listed, so they are matched by pattern:
SRS addresses in the SRS domain (`SRS0=...`, `SRS1=...`: bounces of forwarded mail, which
must come back to us to reach their sender) and the `confirm+`/`refuse+` addresses of
redirect notices in each of our domains. The patterns are Postfix `regexp:` tables (no
extra package): matching there is case-insensitive by default, as an SRS address may come
back case-folded, and the `i` flag would turn that *off* (regexp_table(5)), so it is never
used.
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSPORT_FILE = "forwarder-transport.regexp"
RECIPIENTS_FILE = "forwarder-recipients.regexp"


@dataclass(frozen=True)
class PostfixMaps:
    transport: list[str]  # lines of the regexp transport table
    recipients: list[str]  # lines of the regexp relay-recipient table
    main_cf: list[str]  # main.cf settings that use them with the hash maps


def _domain(domain: str) -> str:
    """A domain as a POSIX regular expression: LDH labels, so only the dots need quoting
    (re.escape's `\\-` is undefined in POSIX EREs)."""
    return domain.lower().rstrip(".").replace(".", r"\.")


def patterns(domains: tuple[str, ...], srs_domain: str) -> list[str]:
    """The regular expressions for our made-up addresses."""
    found = [rf"/^SRS[01][=+-][^@]+@{_domain(srs_domain)}$/"]
    found += [rf"/^(confirm|refuse)\+[^@]+@{_domain(d)}$/" for d in domains]
    return found


def postfix_maps(domains: tuple[str, ...], srs_domain: str, next_hop: str,
                 table_dir: str = "/etc/postfix") -> PostfixMaps:
    """The tables and the main.cf lines; `next_hop` is where the forwarder listens as the
    gateway reaches it (`host:port`)."""
    host, _, port = next_hop.rpartition(":")
    nexthop = f"smtp:[{host.strip('[]')}]:{port}"
    found = patterns(domains, srs_domain)
    relay = sorted({*domains, srs_domain})
    return PostfixMaps(
        transport=[f"{p} {nexthop}" for p in found],
        recipients=[f"{p} OK" for p in found],
        main_cf=[
            f"relay_domains = {', '.join(relay)}",
            f"transport_maps = hash:{table_dir}/transport_forwarder, "
            f"regexp:{table_dir}/{TRANSPORT_FILE}",
            f"relay_recipient_maps = hash:{table_dir}/relay_recipients, "
            f"regexp:{table_dir}/{RECIPIENTS_FILE}",
            # Tell the forwarder who the gateway's client was (its XFORWARD, for the
            # inbound checks); sent only to servers that offer it to this client.
            "smtp_send_xforward_command = yes",
        ],
    )
