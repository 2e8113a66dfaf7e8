"""A small authoritative DNS server for tests, on loopback, over UDP and TCP.

It speaks the real DNS wire protocol (dnspython's ``dns.message``), so the code under test
goes through dnspython's real resolver and sockets; nothing is mocked.

Zone data is a plain dict keyed by (owner name, record type)::

    {
        ("example.org.", "MX"): [(10, "mx1.example.org."), (20, "mx2.example.org.")],
        ("mx1.example.org.", "A"): ["127.0.0.1"],
        ("mx1.example.org.", "AAAA"): ["::1"],
    }

MX values are (preference, exchange) pairs; every other value is the record's presentation
text as a zone file would have it. Per name, a behaviour can be set: answer normally,
NXDOMAIN, SERVFAIL, or never answer (the client times out). TTLs are settable per
(name, type). Every query received is logged in ``queries`` with its transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import signal
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

LOOPBACK = "127.0.0.1"

ZoneKey = tuple[str, str]
ZoneData = Mapping[ZoneKey, Sequence[Any]]


class Behaviour(enum.Enum):
    NORMAL = "normal"
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"  # the query is read and dropped: no answer at all


@dataclass(frozen=True)
class QueryLog:
    name: str  # lower case, absolute ("mx1.example.org.")
    rdtype: str  # "MX", "A", ...
    transport: str  # "udp" or "tcp"


def _norm(name: str) -> str:
    return dns.name.from_text(name).to_text().lower()


class DnsServer:
    """Authoritative answers from ``zone``; start() binds UDP and TCP on one loopback port."""

    def __init__(
        self,
        zone: ZoneData | None = None,
        *,
        default_ttl: int = 300,
        soa_minimum: int = 60,
        host: str = LOOPBACK,
    ) -> None:
        self.host = host
        self.port = 0
        self.default_ttl = default_ttl
        # Negative answers carry an SOA so resolvers can cache them (RFC 2308 section 5);
        # None leaves the SOA out, to test a resolver's default negative TTL.
        self.soa_minimum: int | None = soa_minimum
        # Every UDP answer truncated (TC=1), forcing clients to retry over TCP.
        self.truncate_udp = False
        self.records: dict[ZoneKey, list[Any]] = {}
        self.ttls: dict[ZoneKey, int] = {}
        self.behaviours: dict[str, Behaviour] = {}
        self.queries: list[QueryLog] = []
        for (name, rdtype), values in (zone or {}).items():
            self.set_records(name, rdtype, values)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # -- zone editing -------------------------------------------------------------------

    def set_records(
        self, name: str, rdtype: str, values: Iterable[Any], ttl: int | None = None
    ) -> None:
        key = (_norm(name), rdtype.upper())
        self.records[key] = list(values)
        if ttl is not None:
            self.ttls[key] = ttl

    def remove_records(self, name: str, rdtype: str) -> None:
        self.records.pop((_norm(name), rdtype.upper()), None)

    def set_ttl(self, name: str, rdtype: str, ttl: int) -> None:
        self.ttls[(_norm(name), rdtype.upper())] = ttl

    def set_behaviour(self, name: str, behaviour: Behaviour | str) -> None:
        self.behaviours[_norm(name)] = Behaviour(behaviour)

    def queries_for(self, name: str, rdtype: str | None = None) -> list[QueryLog]:
        wanted = _norm(name)
        return [
            q for q in self.queries if q.name == wanted and (rdtype is None or q.rdtype == rdtype)
        ]

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        # TCP first on port 0, then UDP on the same port number: a resolver given one port
        # uses it for both transports (RFC 7766 section 5).
        for _ in range(1 if port else 20):
            self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            self.port = self._tcp.sockets[0].getsockname()[1]
            try:
                self._udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
                )
                return
            except OSError:  # the UDP port is taken by someone else: try another pair
                self._tcp.close()
                await self._tcp.wait_closed()
        raise OSError("could not bind UDP and TCP on the same loopback port")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tcp_tasks):
                task.cancel()
            for task in list(self._tcp_tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- answering ----------------------------------------------------------------------

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The wire answer to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a real server may drop it too
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append(QueryLog(name, rdtype, transport))
        behaviour = self.behaviours.get(name, Behaviour.NORMAL)
        if behaviour is Behaviour.TIMEOUT:
            return None
        if behaviour is Behaviour.SERVFAIL:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        self._fill(response, question.name, rdtype, nxdomain=behaviour is Behaviour.NXDOMAIN)
        if transport == "udp":
            return self._udp_wire(query, response)
        return response.to_wire()

    def _fill(
        self, response: dns.message.Message, qname: dns.name.Name, rdtype: str, nxdomain: bool
    ) -> None:
        name = qname.to_text().lower()
        values = self.records.get((name, rdtype))
        if values and not nxdomain:
            ttl = self.ttls.get((name, rdtype), self.default_ttl)
            response.answer.append(_rrset(qname, rdtype, values, ttl))
            return
        exists = any(owner == name for owner, _ in self.records)
        if nxdomain or not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        # else NOERROR with an empty answer: NODATA (RFC 2308 section 2.2)
        if self.soa_minimum is not None:
            response.authority.append(self._soa(qname))

    def _soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        # The zone apex is taken to be the last two labels (example.org.): good enough here.
        apex = dns.name.Name(qname.labels[-3:]) if len(qname.labels) > 3 else qname
        text = f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {self.soa_minimum}"
        return dns.rrset.from_text(apex, self.default_ttl, "IN", "SOA", text)

    def _udp_wire(self, query: dns.message.Message, response: dns.message.Message) -> bytes:
        # Answers too big for the client's UDP payload (512, or its EDNS size) go out
        # truncated, and the client retries over TCP (RFC 1035 4.2.1, RFC 6891 6.2.3).
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            if self.truncate_udp:
                raise dns.exception.TooBig
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tcp_tasks.add(task)
        try:
            while True:
                # DNS over TCP: each message is prefixed by its 2-octet length (RFC 1035 4.2.2)
                header = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", header)[0])
                reply = self.answer(wire, "tcp")
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport does not subclass DatagramTransport on Python 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _rrset(qname: dns.name.Name, rdtype: str, values: Sequence[Any], ttl: int) -> dns.rrset.RRset:
    texts = [f"{v[0]} {v[1]}" if isinstance(v, tuple) else str(v) for v in values]
    rdatas = [dns.rdata.from_text(dns.rdataclass.IN, rdtype, text) for text in texts]
    return dns.rrset.from_rdata_list(qname, ttl, rdatas)


# -- standalone, for benchmarks ---------------------------------------------------------


async def _serve(host: str, port: int, zone: ZoneData) -> None:
    server = DnsServer(zone, host=host)
    await server.start(port)
    print(f"answering on {server.host}:{server.port} (UDP and TCP)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    print(f"{len(server.queries)} queries answered", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tests.dnsserver --port 5300 --bench`: a name server on loopback for the
    benchmark with the inbound checks on (tests/authzone.py's records for jobteaser.com),
    so that no query leaves the machine. `--txt NAME=VALUE` adds TXT records."""
    from tests.authzone import bench_records, txt

    parser = argparse.ArgumentParser(prog="python -m tests.dnsserver")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=5300)
    parser.add_argument("--bench", action="store_true",
                        help="publish SPF and DMARC for jobteaser.com (loopback is in its SPF)")
    parser.add_argument("--txt", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    zone: dict[ZoneKey, list[Any]] = dict(bench_records()) if args.bench else {}
    for item in args.txt:
        name, _, value = item.partition("=")
        zone.setdefault((name, "TXT"), []).append(txt(value))
    asyncio.run(_serve(args.host, args.port, zone))


if __name__ == "__main__":
    main()
