"""Send one big message over SMTP from a process of its own, and print the final reply.

The test measuring the daemon's event loop must not stall its own: building and writing
25 MiB costs the writer tens of milliseconds at a time, so the writers run here.

    python tests/bigclient.py PORT RCPT KIND OCTETS    # KIND: lines ("ab" CRLF ...) or
                                                        # header (a header section of that size)
"""

from __future__ import annotations

import socket
import sys


def body(kind: str, octets: int) -> bytes:
    if kind == "lines":
        return b"ab\r\n" * (octets // 4)
    return b"X-Filler: ab\r\n" * (octets // 14)


def reply(sock: socket.socket, pending: bytearray) -> bytes:
    """The last line of the next reply (RFC 5321 4.2: "NNN-" lines continue it)."""
    while True:
        end = pending.find(b"\r\n")
        while end >= 0:
            line = bytes(pending[:end])
            del pending[:end + 2]
            if line[3:4] != b"-":
                return line
            end = pending.find(b"\r\n")
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        pending += data


def main(port: int, rcpt: str, kind: str, octets: int) -> None:
    message = body(kind, octets) + b".\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        pending = bytearray()
        reply(sock, pending)
        for command in (b"EHLO bigclient.test", b"MAIL FROM:<a@sender.example>",
                        f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            sock.sendall(command + b"\r\n")
            reply(sock, pending)
        sock.sendall(message)
        sock.settimeout(300)
        print(reply(sock, pending).decode(), flush=True)
        sock.sendall(b"QUIT\r\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
