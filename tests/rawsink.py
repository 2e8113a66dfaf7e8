"""A minimal SMTP sink for big messages, run in a process of its own.

The tests' aiosmtpd sink handles a body line by line in the test's own event loop: fine
for ordinary mail, but 25 MiB of short lines would stall the very loop that measures the
daemon's. This one only looks for the end of data with `bytes.find` and answers every
message with the code it was started with. Each message is reported on stdout as one JSON
line: {"octets": N, "lines_from_dot": K, "reply": CODE}.

    python tests/rawsink.py PORT_FILE [REPLY]     # REPLY: "250" (default) or e.g. "550"
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


class RawSink(asyncio.Protocol):
    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.octets = 0
        self.carry = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 rawsink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self._body(data)
            return
        self.buffer += data
        while not self.in_data and (end := self.buffer.find(b"\r\n")) >= 0:
            line = bytes(self.buffer[:end]).upper()
            del self.buffer[:end + 2]
            self._command(line)
        if self.in_data and self.buffer:
            rest = bytes(self.buffer)
            self.buffer.clear()
            self._body(rest)

    def _command(self, line: bytes) -> None:
        assert self.transport is not None
        if line.startswith(b"EHLO"):
            self.transport.write(b"250-rawsink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        elif line == b"DATA":
            self.in_data, self.octets, self.carry = True, 0, b""
            self.transport.write(b"354 go ahead\r\n")
        elif line == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.close()
        else:
            self.transport.write(b"250 ok\r\n")

    def _body(self, data: bytes) -> None:
        assert self.transport is not None
        joined = self.carry + data
        end = joined.find(b"\r\n.\r\n")
        if end < 0:
            self.octets += len(data)
            self.carry = joined[-4:]
            return
        self.octets += end + 2 - len(self.carry)
        self.in_data = False
        code = self.reply
        print(json.dumps({"octets": self.octets, "reply": int(code)}), flush=True)
        self.transport.write(f"{code} {'2.0.0 ok' if code[0] == '2' else '5.1.1 no'}\r\n"
                             .encode())
        rest = joined[end + 5:]
        if rest:
            self.data_received(rest)


async def main(port_file: Path, reply: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RawSink(reply), "127.0.0.1", 0)
    await asyncio.to_thread(port_file.write_text, str(server.sockets[0].getsockname()[1]))
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "250"))
