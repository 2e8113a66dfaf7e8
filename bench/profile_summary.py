"""Summarise a py-spy raw profile (`py-spy record --format raw --threads`) by component.

Each sample's stack is walked from the leaf towards the root; the first frame that belongs
to a known component decides where the sample goes (so json called by structlog counts as
logging, the email parser called by aiosmtplib as delivery). Frames of the event loop
machinery itself (asyncio, uvloop) count as "event loop" only when nothing above them does.

usage: python bench/profile_summary.py PROFILE.raw [--top N]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

# (component, pattern on "function (file:line)"), most specific first.
RULES: list[tuple[str, str]] = [
    ("logging (structlog, JSON, stdout)", r"structlog/|forwarder/log\.py|logging/__init__"),
    ("metrics", r"forwarder/metrics\.py|prometheus_client/"),
    ("queue (our code, writer thread hop)", r"forwarder/queue/"),
    ("directory lookup (aiosqlite hop)", r"forwarder/directory/|aiosqlite/"),
    ("delivery (aiosmtplib client)", r"aiosmtplib/"),
    ("delivery (our dispatcher/sender)", r"forwarder/delivery\.py|forwarder/returnpath\.py"
     r"|forwarder/srs(store)?\.py|_envelope_sender"),
    ("front handlers (our code)", r"forwarder/(front|policy|addresses|replies)\.py"),
    ("SMTP session (commands, replies, DATA)", r"forwarder/(smtp|connections|session)"),
    # An aiosmtpd-based build (the history's profiles) or a test sink in the process.
    ("aiosmtpd", r"aiosmtpd/"),
]
GENERIC: list[tuple[str, str]] = [
    ("event loop (uvloop C code: epoll, socket I/O, callbacks)", r"^Runner\.run "),
    ("event loop (asyncio Python: streams, tasks, futures)", r"uvloop|asyncio/|selectors"),
    ("thread pool plumbing", r"concurrent/futures|threading\.py|queue\.py \("),
]


def classify(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in RULES:
            if re.search(pattern, frame):
                return name
    for frame in reversed(frames):
        for name, pattern in GENERIC:
            if re.search(pattern, frame):
                return name
    return "other: " + (frames[-1] if frames else "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    by_thread: dict[str, Counter[str]] = {}
    leaves: Counter[str] = Counter()
    with open(args.profile, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = re.sub(r"thread \(\d+\): ", "", frames[0])
        thread = re.sub(r"_\d+$|Thread-\d+ ", "", thread)
        n = int(count)
        by_thread.setdefault(thread, Counter())[classify(frames[1:])] += n
        if thread == "MainThread":
            leaves[frames[-1]] += n
    for thread, counts in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        print(f"== {thread}: {total} active samples")
        for name, n in counts.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
    total = sum(leaves.values())
    print(f"== MainThread, top {args.top} leaf functions (self time)")
    for name, n in leaves.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
