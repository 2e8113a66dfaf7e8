"""`forwarder report senders`: per sender domain, whether its mail survives forwarding.

A message survives our forwarding when DMARC passes through an aligned DKIM signature: the
signature travels with the bytes. One that passes through SPF alone fails DMARC at the
graduate's provider after any forwarding (the provider sees our address, not the sender's),
and if the domain publishes p=reject it is refused or lost there. The counts come from the
inbound checks (forwarder/senders.py), added up in the directory.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

from forwarder.cli_common import CliError, add_command, add_group, emit, open_directory
from forwarder.config import Settings
from forwarder.senders import SECONDS_A_DAY, SenderCount

DEFAULT_DAYS = 30


def at_risk(row: SenderCount) -> int:
    """Messages that will not pass DMARC downstream once forwarded."""
    return row.spf_only + row.unaligned


def total(row: SenderCount) -> int:
    return row.dkim_aligned + row.spf_only + row.unaligned


def worst_first(rows: list[SenderCount]) -> list[SenderCount]:
    """Most messages at risk first; then the smallest share surviving; then by name."""
    return sorted(rows, key=lambda r: (-at_risk(r), r.dkim_aligned / max(total(r), 1),
                                       r.domain))


def _doc(row: SenderCount) -> dict[str, Any]:
    messages = total(row)
    return {"domain": row.domain, "policy": row.policy or None, "messages": messages,
            "dkim_aligned": row.dkim_aligned, "spf_only": row.spf_only,
            "unaligned": row.unaligned,
            "survives": round(row.dkim_aligned / messages, 4) if messages else None}


def _text(doc: dict[str, Any]) -> str:
    lines = [f"Sender domains since {doc['since']} ({doc['days']} days), worst first. "
             "Survives forwarding: DMARC passed through an aligned DKIM signature.",
             f"{'domain':<32} {'policy':<10} {'messages':>8} {'dkim':>8} {'spf-only':>8} "
             f"{'neither':>8} {'survives':>8}"]
    for d in doc["domains"]:
        share = "-" if d["survives"] is None else f"{d['survives']:.0%}"
        lines.append(f"{d['domain']:<32} {d['policy'] or '-':<10} {d['messages']:>8} "
                     f"{d['dkim_aligned']:>8} {d['spf_only']:>8} {d['unaligned']:>8} "
                     f"{share:>8}")
    spf_only = [d["domain"] for d in doc["domains"] if d["spf_only"]]
    lines.append(f"-- {doc['count']} domain(s), {doc['messages']} message(s)."
                 + (f" Passing through SPF only: {', '.join(spf_only[:5])}"
                    f"{' ...' if len(spf_only) > 5 else ''}: ask them to sign with DKIM."
                    if spf_only else ""))
    return "\n".join(lines)


def cmd_senders(args: argparse.Namespace, settings: Settings) -> int:
    if args.since < 1:
        raise CliError("--since: a number of days, at least 1")
    if not settings.state_dir.is_dir():
        raise CliError(f"no state directory {settings.state_dir} (wrong --state-dir or "
                       "--config?)")
    first_day = int(time.time() // SECONDS_A_DAY) - args.since + 1
    directory = open_directory(settings)
    try:
        rows = worst_first(directory.sender_report(first_day))
    finally:
        directory.close()
    domains = [_doc(r) for r in rows]
    doc = {"since": datetime.fromtimestamp(first_day * SECONDS_A_DAY, UTC).date().isoformat(),
           "days": args.since, "domains": domains, "count": len(domains),
           "messages": sum(d["messages"] for d in domains)}
    emit(args, doc, _text(doc))
    return 0


def register(sub: Any) -> None:
    r = add_group(sub, "report", "reports from what the daemon has seen",
                  "forwarder report senders")
    p = add_command(r, "senders", cmd_senders,
                    "per sender domain: does its mail survive forwarding (DMARC through an "
                    "aligned DKIM signature) or pass through SPF only? Worst first",
                    "forwarder report senders --since 7", json_flag=True)
    p.add_argument("--since", type=int, default=DEFAULT_DAYS, metavar="DAYS",
                   help=f"the last DAYS days, today included (default {DEFAULT_DAYS})")
