"""The exact texts of the notices sent to redirect targets (docs/admin.md quotes them; a
test holds the two together). French first, then English; plain text.

A line holds at most one `{placeholder}`, and addresses sit on lines of their own: the
fixed lines are encoded once per process and only the short variable ones per notice
(forwarder/notices.py), which keeps an import of 100,000 rows fast.
"""

from __future__ import annotations

DECLARED_SUBJECT = "Redirection de {account} / Forwarding of {account}"

DECLARED_BODY = (
    "(English below)",
    "",
    "Bonjour,",
    "",
    "Le courrier envoyé à l'adresse de l'école",
    "    {account}",
    "sera redirigé vers cette adresse-ci :",
    "    {target}",
    "comme cela a été déclaré auprès de l'école.",
    "",
    "Si c'est bien vous, répondez simplement à ce message pour confirmer",
    "(ou écrivez à l'adresse suivante) :",
    "    {confirm}",
    "",
    "Si ce n'est pas vous, écrivez à l'adresse suivante (un message vide",
    "suffit) et plus rien ne sera envoyé ici :",
    "    {refuse}",
    "",
    "Ces deux adresses sont valables jusqu'au {until}.",
    "",
    "--",
    "",
    "Hello,",
    "",
    "Mail sent to the school address",
    "    {account}",
    "will be forwarded to this address:",
    "    {target}",
    "as was declared to the school.",
    "",
    "If this is you, just reply to this message to confirm",
    "(or write to this address):",
    "    {confirm}",
    "",
    "If this is not you, write to this address (an empty message will do)",
    "and nothing more will be sent here:",
    "    {refuse}",
    "",
    "Both addresses are valid until {until}.",
    "",
    "-- ",
    "{domain} - redirection du courrier / mail forwarding",
)

FAILING_SUBJECT = "Redirection de {account} : adresse en panne / forwarding address failing"

FAILING_BODY = (
    "(English below)",
    "",
    "Bonjour,",
    "",
    "Le courrier envoyé à l'adresse de l'école",
    "    {account}",
    "n'est plus redirigé vers",
    "    {failed}",
    "car le serveur de cette adresse refuse les messages depuis le {since}.",
    "Sa dernière réponse :",
    "    {error}",
    "Il reste redirigé vers cette adresse-ci :",
    "    {target}",
    "",
    "Pour rétablir l'adresse en panne ou en déclarer une autre, répondez",
    "à ce message : il parviendra au service informatique de l'école.",
    "",
    "--",
    "",
    "Hello,",
    "",
    "Mail sent to the school address",
    "    {account}",
    "is no longer forwarded to",
    "    {failed}",
    "because that address's mail server has refused messages since {since}.",
    "Its last answer:",
    "    {error}",
    "It is still forwarded to this address:",
    "    {target}",
    "",
    "To restore the failing address or declare another one, reply to this",
    "message: it will reach the school's IT service.",
    "",
    "-- ",
    "{domain} - redirection du courrier / mail forwarding",
)
