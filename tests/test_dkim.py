"""A JobTeaser password reset, DKIM-signed, reaches the graduate with its signature intact."""

from __future__ import annotations

import base64
from collections.abc import Callable
from email.message import EmailMessage

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from forwarder.config import DeliverySettings, HostPort
from forwarder.directory import Directory
from tests.conftest import DOMAIN, DaemonFactory, Providers, Sink, smtp_send

GRAD = f"camille.martin@{DOMAIN}"
TARGET = "camille.martin@gmail.example"
SELECTOR = b"s2026"
SIGNING_DOMAIN = b"jobteaser.com"


def password_reset() -> bytes:
    msg = EmailMessage()
    msg["From"] = "JobTeaser <noreply@jobteaser.com>"
    msg["To"] = GRAD
    msg["Subject"] = "Reinitialisation de votre mot de passe / Reset your password"
    msg["Message-ID"] = "<reset-4242@jobteaser.com>"
    msg["Date"] = "Sat, 28 Nov 2026 09:00:00 +0000"
    link = "https://sigma-clermont.jobteaser.com/fr/users/password/edit?reset_token=Zx81kP"
    msg.set_content(f"Bonjour,\n\nPour choisir un nouveau mot de passe : {link}\n")
    msg.add_alternative(
        f'<html><body><p>Bonjour,</p><p><a href="{link}">Choisir un nouveau mot de passe'
        "</a></p></body></html>\n", subtype="html")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def keypair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


DnsFunc = Callable[..., bytes]


def signed_reset() -> tuple[bytes, DnsFunc]:
    """The reset, DKIM-signed by jobteaser.com, and the DNS answer that verifies it."""
    private, public = keypair()
    message = password_reset()
    signature = dkim.sign(message, SELECTOR, SIGNING_DOMAIN, private,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    signed = signature + message
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2026._domainkey.jobteaser.com."
        return txt

    assert dkim.verify(signed, dnsfunc=dnsfunc)  # the test's own sanity check
    return signed, dnsfunc


async def test_dkim_signature_survives_forwarding(
    start_daemon: DaemonFactory, sink: Sink, directory: Directory
) -> None:
    directory.add(GRAD, [TARGET])
    directory.delete(GRAD)
    signed, dnsfunc = signed_reset()
    d = await start_daemon(smarthost=HostPort("127.0.0.1", sink.port))
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], signed)
    assert data is not None and data[0] == 250
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == [TARGET]
    assert got.content.startswith(b"Received: ")
    assert dkim.verify(got.content, dnsfunc=dnsfunc)
    # And a byte changed in the body would have broken it: the check has teeth.
    assert not dkim.verify(got.content.replace(b"Bonjour", b"Bonsoir"), dnsfunc=dnsfunc)


async def test_a_reset_reaches_two_targets_signature_intact_at_both(
    start_daemon: DaemonFactory, providers: Providers, directory: Directory
) -> None:
    """Two targets at two providers (found by MX): one queued message, a copy to each, the
    sender's DKIM signature verifying at both."""
    home, work = "camille@perso.example", "camille.martin@work.example"
    directory.add(GRAD, [home, work])
    directory.delete(GRAD)
    signed, dnsfunc = signed_reset()
    d = await start_daemon(dns_servers=(HostPort("127.0.0.1", providers.dns.port),),
                           delivery=DeliverySettings(mx_port=providers.port))
    _, data = await smtp_send(d.port, "noreply@jobteaser.com", [GRAD], signed)
    assert data is not None and data[0] == 250
    (at_home,) = await providers["perso.example"].wait_for(1)
    (at_work,) = await providers["work.example"].wait_for(1)
    assert (at_home.rcpt_tos, at_work.rcpt_tos) == ([home], [work])
    # SRS once: the same rewritten sender on both copies.
    assert at_home.mail_from == at_work.mail_from and at_home.mail_from.startswith("SRS0=")
    for got in (at_home, at_work):
        assert dkim.verify(got.content, dnsfunc=dnsfunc)
        assert got.content.endswith(signed)
