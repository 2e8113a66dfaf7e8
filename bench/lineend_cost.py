"""What the DATA reader's bare CR/LF check costs (forwarder/smtpbody.py `BodyReader._take`),
per kind of body: the universal-newlines decoder it uses against the count of CRLF plus
the CR/LF deletion pass it replaced, then the whole reader (`BodyReader.feed`, every check
of a piece, spilled to nowhere past 256 KiB as the daemon spills to a file). 5 MB of each
body in 256 KiB pieces, best of `--rounds`, milliseconds.

    PYTHONPATH=. .venv/bin/python bench/lineend_cost.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

from forwarder.smtpbody import BodyReader

PIECE = 256 * 1024
TOTAL = 5_000_000
NOT_CR_LF = bytes(octet for octet in range(256) if octet not in b"\r\n")
BODIES = {
    "smtp-source lines": b"0" + b"X" * 77 + b"\r\n",
    "base64": b"QUJD" * 19 + b"\r\n",
    "2-octet lines": b"ab\r\n",
    "tab-indented text": b"\tX" * 39 + b"\r\n",
    "tabs only": b"\t" * 78 + b"\r\n",
    "empty lines": b"\r\n",
}


def pieces(line: bytes) -> list[bytes]:
    piece = line * (PIECE // len(line))
    return [piece] * (TOTAL // len(piece))


def counted(parts: list[bytes]) -> bool:
    """Before: one count of CRLF and a pass keeping only CR and LF."""
    return all(len(p.translate(None, NOT_CR_LF)) == 2 * p.count(b"\r\n") for p in parts)


def decoded(parts: list[bytes]) -> bool:
    """Now: which line ends the universal-newlines decoder saw."""
    ends = io.IncrementalNewlineDecoder(None, translate=False)
    for part in parts:
        ends.decode(part.decode("latin-1"), True)
    return ends.newlines in (None, "\r\n")


class NullSpill:
    """A spill that drops what it is given: the reader's own cost, without the file's."""

    path = Path("/dev/null")

    def write(self, data: bytes | bytearray) -> None:
        pass

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


def read(parts: list[bytes]) -> bool:
    """Every check of every piece, spilled past 256 KiB as in the daemon."""
    body = BodyReader(10**9, 1000, NullSpill)
    for part in parts:
        assert body.feed(part) is None
    return body.feed(b".\r\n") is not None


def best(fn: Callable[[list[bytes]], bool], parts: list[bytes], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        assert fn(parts)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    print("| body | count + deletion pass | newline decoder | whole BodyReader |")
    print("|---|---|---|---|")
    for name, line in BODIES.items():
        parts = pieces(line)
        cells = [best(fn, parts, rounds) for fn in (counted, decoded, read)]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
