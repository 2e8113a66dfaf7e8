"""DNS records for the inbound checks' tests (and the checks-on benchmark): SPF, DKIM keys
and DMARC for jobteaser.com, a spoofer's domain, a p=none domain and an SPF-only sender.

The test client connects from 127.0.0.1. jobteaser.com's SPF does not list it (its mail
there passes DMARC only through its DKIM signature); the other senders' SPF does.
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.dnsserver import DnsServer

SELECTOR = "s2026"
JOBTEASER = "jobteaser.com"
SPOOFER = "spoofer.example"  # SPF passes from 127.0.0.1, but its From is not its own
RELAXED = "relaxed.example"  # p=none
NEWSLETTER = "newsletter.example"  # p=reject, SPF only: survives no forwarding


def txt(value: str) -> str:
    """A TXT record's presentation text: character-strings of at most 255 octets
    (RFC 1035 3.3.14), as a long DKIM key needs."""
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + chunk.replace('"', '\\"') + '"' for chunk in chunks)


class SigningKey:
    def __init__(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private = key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        self.record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


def bench_records() -> dict[tuple[str, str], list[Any]]:
    """What the checks-on benchmark needs: its unsigned mail from noreply@jobteaser.com on
    loopback passes SPF (so DMARC passes through SPF only)."""
    return {
        (JOBTEASER, "TXT"): [txt("v=spf1 ip4:127.0.0.0/8 -all")],
        (f"_dmarc.{JOBTEASER}", "TXT"): [txt("v=DMARC1; p=reject")],
    }


def publish(server: DnsServer, key: SigningKey) -> None:
    records: dict[tuple[str, str], str] = {
        (JOBTEASER, "TXT"): "v=spf1 ip4:192.0.2.0/24 -all",
        (f"_dmarc.{JOBTEASER}", "TXT"): "v=DMARC1; p=reject; rua=mailto:dmarc@jobteaser.com",
        (f"{SELECTOR}._domainkey.{JOBTEASER}", "TXT"): key.record,
        (SPOOFER, "TXT"): "v=spf1 ip4:127.0.0.1 -all",
        (f"_dmarc.{SPOOFER}", "TXT"): "v=DMARC1; p=none",
        (RELAXED, "TXT"): "v=spf1 -all",
        (f"_dmarc.{RELAXED}", "TXT"): "v=DMARC1; p=none",
        (NEWSLETTER, "TXT"): "v=spf1 ip4:127.0.0.1 -all",
        (f"_dmarc.{NEWSLETTER}", "TXT"): "v=DMARC1; p=reject",
        # RFC 7208 4.6.4: eleven DNS-querying mechanisms is one too many.
        ("greedy.example", "TXT"): "v=spf1 " + " ".join(
            f"a:h{i}.greedy.example" for i in range(11)) + " -all",
        # ... and three lookups that find nothing, one void lookup too many.
        ("void.example", "TXT"): "v=spf1 a:v1.void.example a:v2.void.example "
                                 "a:v3.void.example ip4:127.0.0.1 -all",
    }
    for (name, rdtype), value in records.items():
        server.set_records(name, rdtype, [txt(value)])
    for i in range(11):
        server.set_records(f"h{i}.greedy.example", "A", ["192.0.2.1"])
