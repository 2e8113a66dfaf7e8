"""CPU and time per message of the inbound checks alone (forwarder/checks.py), by kind of
message, against the tests' DNS server on loopback (answers cached after the first).

    PYTHONPATH=. .venv/bin/python bench/checks_cost.py [--messages 2000] [--concurrency 20]

Prints, for each kind: the process CPU per message (all threads), the wall time per message
with `concurrency` in flight, and what the checks concluded. The kinds: compare.sh's unsigned
2000-byte message (SPF pass, no DKIM, DMARC pass through SPF), the same DKIM-signed, and a
DKIM-signed 100 kB message; "a new sender each" defeats the SPF result cache (as VERP
senders do), so pyspf runs in a worker thread for every message; "limits only" is the default
configuration (rate limits, no authentication).

Run from the repository's root with PYTHONPATH=. (it uses the tests' DNS server and keys).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from typing import Any

import dkim

from forwarder.checks import Checks, Inbound
from forwarder.clock import SystemClock
from forwarder.config import CheckSettings, RateLimits, Settings
from forwarder.dns import CachingResolver
from forwarder.metrics import Metrics
from forwarder.senders import SenderTally
from tests.authzone import SELECTOR, SigningKey, bench_records, txt
from tests.dnsserver import DnsServer


def message(size: int, key: SigningKey | None) -> bytes:
    head = (b"From: <noreply@jobteaser.com>\r\nTo: <1.nom@sigma-clermont.fr>\r\n"
            b"Date: Thu,  3 Dec 2026 14:10:53 +0000 (UTC)\r\nMessage-Id: <7ba0@vm>\r\n\r\n")
    line = b"X" * 78 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    text = head + body
    if key is None:
        return text
    signature = dkim.sign(text, SELECTOR.encode(), b"jobteaser.com", key.private,
                          include_headers=[b"from", b"to", b"date", b"message-id"])
    return bytes(signature) + text


async def measure(checks: Checks, content: bytes, count: int, concurrency: int,
                  new_senders: bool = False) -> Any:
    def inbound(i: int) -> Inbound:
        sender = f"bounce+{i}@jobteaser.com" if new_senders else "noreply@jobteaser.com"
        return Inbound(f"Q{i}", "127.0.0.1", "vm", sender, [f"{i}.nom@sigma-clermont.fr"],
                       False, content)

    first = await checks.evaluate(inbound(0))  # warms the DNS cache
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            await checks.evaluate(inbound(i))

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(1, count + 1)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / count, wall / count, first.fields


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    key = SigningKey()
    async with DnsServer(bench_records()) as server:
        server.set_records(f"{SELECTOR}._domainkey.jobteaser.com", "TXT", [txt(key.record)])
        clock = SystemClock()
        resolver = CachingResolver([server.host], port=server.port, now=clock.now)
        limits = RateLimits(client_per_minute=10**9, recipient_per_hour=10**9, exempt=())
        base = Settings(hostname="forwarder.test", rate_limits=limits)
        on = dataclasses.replace(base, checks=CheckSettings(enabled=True))
        cases = [("limits only, 2000 B", base, message(2000, None), False),
                 ("unsigned 2000 B (compare.sh)", on, message(2000, None), False),
                 ("the same, a new sender each", on, message(2000, None), True),
                 ("DKIM-signed 2000 B", on, message(2000, key), False),
                 ("DKIM-signed 100 kB", on, message(100_000, key), False)]
        for name, settings, content, new_senders in cases:
            checks = Checks(settings, resolver, Metrics(), SenderTally(clock.now), clock.now)
            cpu, wall, fields = await measure(checks, content, args.messages,
                                              args.concurrency, new_senders)
            await checks.close()
            print(f"{name:<30} CPU {cpu * 1e6:7.0f} us/msg  wall {wall * 1e6:7.0f} us/msg"
                  f"  {fields or '(no authentication)'}")


if __name__ == "__main__":
    asyncio.run(main())
