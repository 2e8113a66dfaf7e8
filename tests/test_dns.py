"""MX routing: pure decisions from tables, then the real resolver against a loopback server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import dns.message
import dns.resolver
import dns.rrset
import pytest

from forwarder.dns import (
    CachingResolver,
    Destination,
    DnsPermanentError,
    DnsTemporaryError,
    MxRecord,
    MxRouter,
    address_literal,
    classify_error,
    is_null_mx,
    negative_ttl,
    order_mx,
    select_addresses,
)
from tests.dnsserver import Behaviour, DnsServer


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_router(
    server: DnsServer, clock: Clock | None = None, seed: int = 0, lifetime: float = 2.0
) -> MxRouter:
    resolver = CachingResolver(
        [server.host],
        port=server.port,
        timeout=lifetime,
        lifetime=lifetime,
        now=clock or Clock(),
    )
    return MxRouter(resolver, rng=random.Random(seed))


def addresses(destinations: list[Destination]) -> list[str]:
    return [d.address for d in destinations]


# -- pure decisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([MxRecord(0, "")], True),
        ([MxRecord(10, "")], True),  # RFC 7505 says preference 0; the root is unusable anyway
        ([MxRecord(0, "mx.example.org")], False),
        ([MxRecord(0, ""), MxRecord(10, "mx.example.org")], False),
        ([], False),
    ],
)
def test_is_null_mx(records: list[MxRecord], expected: bool) -> None:
    assert is_null_mx(records) is expected


def test_order_mx_sorts_by_preference_and_drops_root() -> None:
    records = [MxRecord(20, "b"), MxRecord(5, "a"), MxRecord(10, ""), MxRecord(30, "c")]
    assert [r.exchange for r in order_mx(records, random.Random(0))] == ["a", "b", "c"]


def test_order_mx_shuffles_only_within_a_preference() -> None:
    records = [MxRecord(10, h) for h in "pqrs"] + [MxRecord(5, "first"), MxRecord(50, "last")]
    orders = set()
    for seed in range(30):
        ordered = [r.exchange for r in order_mx(records, random.Random(seed))]
        assert ordered[0] == "first" and ordered[-1] == "last"
        assert sorted(ordered[1:5]) == ["p", "q", "r", "s"]
        orders.add(tuple(ordered))
        # same seed, same input in another order: same result
        again = order_mx(list(reversed(records)), random.Random(seed))
        assert [r.exchange for r in again] == ordered
    assert len(orders) > 5


@pytest.mark.parametrize(
    ("hosts", "limit", "expected"),
    [
        ([("a", ["1", "2"]), ("b", ["3"])], 5, [("a", "1"), ("a", "2"), ("b", "3")]),
        (
            [("a", ["1", "2", "3", "4"]), ("b", ["5", "6"])],
            5,
            [("a", x) for x in "1234"] + [("b", "5")],
        ),
        ([("a", ["1"]), ("b", ["1", "2"])], 5, [("a", "1"), ("b", "2")]),  # no address twice
        ([("a", []), ("b", ["2"])], 5, [("b", "2")]),
        ([("a", ["1", "2"])], 1, [("a", "1")]),
        ([], 5, []),
    ],
)
def test_select_addresses(
    hosts: list[tuple[str, list[str]]], limit: int, expected: list[tuple[str, str]]
) -> None:
    got = select_addresses(hosts, 25, limit)
    assert got == [Destination(h, a, 25) for h, a in expected]


def _untyped(cls: Callable[..., BaseException], **kwargs: object) -> BaseException:
    # dnspython's exception constructors are untyped (mypy --strict: no-untyped-call)
    return cls(**kwargs)


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (_untyped(dns.resolver.NXDOMAIN), DnsPermanentError, "NXDOMAIN"),
        (_untyped(dns.resolver.YXDOMAIN), DnsPermanentError, "YXDOMAIN"),
        (
            _untyped(dns.resolver.LifetimeTimeout, timeout=0.5, errors=[]),
            DnsTemporaryError,
            "timeout",
        ),
        (
            _untyped(dns.resolver.NoResolverConfiguration),
            DnsTemporaryError,
            "no nameserver configured",
        ),
        (OSError("network unreachable"), DnsTemporaryError, "DNS error"),
        (DnsPermanentError("null MX (RFC 7505)"), DnsPermanentError, "null MX (RFC 7505)"),
    ],
)
def test_classify_error(exc: BaseException, kind: type[Exception], reason: str) -> None:
    error = classify_error(exc)
    assert type(error) is kind
    assert error.reason == reason


def _no_nameservers(error: object) -> dns.resolver.NoNameservers:
    request = dns.message.make_query("example.org.", "MX")
    return dns.resolver.NoNameservers(  # type: ignore[no-untyped-call]
        request=request, errors=[("127.0.0.1", False, 53, error, None)]
    )


def test_classify_no_nameservers() -> None:
    assert classify_error(_no_nameservers("SERVFAIL")).reason == "SERVFAIL"
    refused = classify_error(_no_nameservers(ConnectionRefusedError()))
    assert isinstance(refused, DnsTemporaryError)
    assert refused.reason == "no nameserver answered"


def _negative(soa: str | None, soa_ttl: int = 300) -> dns.message.Message:
    query = dns.message.make_query("x.example.org.", "A")
    response = dns.message.make_response(query)
    if soa is not None:
        response.authority.append(dns.rrset.from_text("example.org.", soa_ttl, "IN", "SOA", soa))
    return response


@pytest.mark.parametrize(
    ("soa", "soa_ttl", "expected"),
    [
        ("ns. host. 1 3600 600 86400 120", 300, 120.0),  # SOA minimum
        ("ns. host. 1 3600 600 86400 900", 30, 30.0),  # SOA's own TTL is lower (RFC 2308 5)
        ("ns. host. 1 3600 600 86400 604800", 604800, 3600.0),  # never for ever
        (None, 0, 60.0),  # no SOA: short default
    ],
)
def test_negative_ttl(soa: str | None, soa_ttl: int, expected: float) -> None:
    assert negative_ttl(_negative(soa, soa_ttl)) == expected


def test_negative_ttl_without_response() -> None:
    assert negative_ttl(None) == 60.0


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.org", None),
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:2001:DB8:0::1]", "2001:db8::1"),
    ],
)
def test_address_literal(domain: str, expected: str | None) -> None:
    assert address_literal(domain) == expected


def test_resolver_needs_nameservers() -> None:
    with pytest.raises(ValueError, match="nameservers"):
        CachingResolver()


# -- against the loopback DNS server ----------------------------------------------------


async def test_mx_in_preference_order(dns_server: DnsServer) -> None:
    dns_server.set_records(
        "example.org", "MX", [(20, "mx2.example.org."), (10, "mx1.example.org.")]
    )
    dns_server.set_records("mx1.example.org", "A", ["127.0.0.1"])
    dns_server.set_records("mx1.example.org", "AAAA", ["::1"])
    dns_server.set_records("mx2.example.org", "A", ["127.0.0.2"])
    got = await make_router(dns_server).route("example.org")
    assert got == [
        Destination("mx1.example.org", "127.0.0.1", 25),
        Destination("mx1.example.org", "::1", 25),
        Destination("mx2.example.org", "127.0.0.2", 25),
    ]
    # the answers really came over the socket, over UDP
    assert {(q.name, q.rdtype, q.transport) for q in dns_server.queries} >= {
        ("example.org.", "MX", "udp"),
        ("mx1.example.org.", "A", "udp"),
        ("mx1.example.org.", "AAAA", "udp"),
    }


async def test_truncated_udp_answer_is_retried_over_tcp(dns_server: DnsServer) -> None:
    dns_server.truncate_udp = True
    dns_server.set_records("example.org", "MX", [(10, "mx1.example.org.")])
    dns_server.set_records("mx1.example.org", "A", ["127.0.0.1"])
    got = await make_router(dns_server).route("example.org")
    assert addresses(got) == ["127.0.0.1"]
    assert [q.transport for q in dns_server.queries_for("example.org", "MX")] == ["udp", "tcp"]


async def test_equal_preferences_shuffled_with_seeded_random(dns_server: DnsServer) -> None:
    hosts = [f"mx{i}.example.org" for i in range(4)]
    dns_server.set_records("example.org", "MX", [(10, h + ".") for h in hosts])
    for i, host in enumerate(hosts):
        dns_server.set_records(host, "A", [f"127.0.0.{i + 1}"])
    orders = set()
    for seed in range(8):
        first = await make_router(dns_server, seed=seed).route("example.org")
        second = await make_router(dns_server, seed=seed).route("example.org")
        assert first == second  # the seed decides
        assert sorted(d.host for d in first) == hosts
        expected = order_mx([MxRecord(10, h) for h in hosts], random.Random(seed))
        assert [d.host for d in first] == [r.exchange for r in expected]
        orders.add(tuple(d.host for d in first))
    assert len(orders) > 1


async def test_implicit_mx_from_a_and_aaaa(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "A", ["127.0.0.5"])
    dns_server.set_records("example.org", "AAAA", ["::1"])
    router = make_router(dns_server)
    got = await router.route("Example.ORG.")
    assert got == [
        Destination("example.org", "127.0.0.5", 25),
        Destination("example.org", "::1", 25),
    ]
    assert await router.has_mail_route("example.org") is True


async def test_no_mx_and_no_address_is_permanent(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "TXT", ['"v=spf1 -all"'])  # the name exists
    router = make_router(dns_server)
    with pytest.raises(DnsPermanentError, match="no MX, A or AAAA"):
        await router.route("example.org")
    assert await router.has_mail_route("example.org") is False


async def test_null_mx_is_permanent(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "MX", [(0, ".")])
    dns_server.set_records("example.org", "A", ["127.0.0.1"])  # must not be used
    router = make_router(dns_server)
    with pytest.raises(DnsPermanentError) as caught:
        await router.route("example.org")
    assert caught.value.reason == "null MX (RFC 7505)"
    assert await router.has_mail_route("example.org") is False
    assert dns_server.queries_for("example.org", "A") == []


async def test_nxdomain_is_permanent(dns_server: DnsServer) -> None:
    router = make_router(dns_server)
    with pytest.raises(DnsPermanentError) as caught:
        await router.route("nowhere.example.org")
    assert caught.value.reason == "NXDOMAIN"
    assert await router.has_mail_route("nowhere.example.org") is False


async def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "MX", [(10, "mx1.example.org.")])
    dns_server.set_behaviour("example.org", Behaviour.SERVFAIL)
    router = make_router(dns_server)
    with pytest.raises(DnsTemporaryError) as caught:
        await router.route("example.org")
    assert caught.value.reason == "SERVFAIL"
    with pytest.raises(DnsTemporaryError):
        await router.has_mail_route("example.org")


async def test_timeout_is_temporary(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "MX", [(10, "mx1.example.org.")])
    dns_server.set_behaviour("example.org", Behaviour.TIMEOUT)
    router = make_router(dns_server, lifetime=0.3)
    with pytest.raises(DnsTemporaryError) as caught:
        await router.route("example.org")
    assert caught.value.reason == "timeout"
    with pytest.raises(DnsTemporaryError, match="timeout"):
        await router.has_mail_route("example.org")


async def test_address_cap_of_five(dns_server: DnsServer) -> None:
    dns_server.set_records(
        "example.org", "MX", [(10, "mx1.example.org."), (20, "mx2.example.org.")]
    )
    dns_server.set_records("mx1.example.org", "A", [f"127.0.0.{i}" for i in range(1, 4)])
    dns_server.set_records("mx1.example.org", "AAAA", ["::1", "::2"])
    dns_server.set_records("mx2.example.org", "A", ["127.0.1.1", "127.0.1.2"])
    got = await make_router(dns_server).route("example.org")
    # A before AAAA, then the cap: mx2 is not reached
    assert sorted(addresses(got)[:3]) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert sorted(addresses(got)[3:]) == ["::1", "::2"]
    assert {d.host for d in got} == {"mx1.example.org"}


async def test_unresolvable_mx_host_is_skipped(dns_server: DnsServer) -> None:
    dns_server.set_records(
        "example.org",
        "MX",
        [(10, "gone.example.org."), (20, "slow.example.org."), (30, "mx3.example.org.")],
    )
    dns_server.set_behaviour("slow.example.org", Behaviour.SERVFAIL)
    dns_server.set_records("mx3.example.org", "A", ["127.0.0.3"])
    got = await make_router(dns_server).route("example.org")
    assert got == [Destination("mx3.example.org", "127.0.0.3", 25)]


async def test_no_mx_host_resolves_is_temporary(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "MX", [(10, "gone.example.org."), (20, "x.example.org.")])
    dns_server.set_behaviour("x.example.org", Behaviour.SERVFAIL)
    router = make_router(dns_server)
    with pytest.raises(DnsTemporaryError, match="no MX host resolves"):
        await router.route("example.org")
    assert await router.has_mail_route("example.org") is True  # it has an MX


async def test_answers_cached_for_their_ttl(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "MX", [(10, "mx1.example.org.")], ttl=60)
    dns_server.set_records("mx1.example.org", "A", ["127.0.0.1"], ttl=60)
    clock = Clock()
    router = make_router(dns_server, clock)
    assert addresses(await router.route("example.org")) == ["127.0.0.1"]
    asked = len(dns_server.queries)
    dns_server.set_records("mx1.example.org", "A", ["127.0.0.9"], ttl=60)
    clock.t += 59
    assert addresses(await router.route("example.org")) == ["127.0.0.1"]
    assert len(dns_server.queries) == asked  # nothing asked while fresh
    clock.t += 2
    assert addresses(await router.route("example.org")) == ["127.0.0.9"]


async def test_nxdomain_cached_for_soa_minimum(dns_server: DnsServer) -> None:
    dns_server.soa_minimum = 30
    clock = Clock()
    router = make_router(dns_server, clock)
    with pytest.raises(DnsPermanentError, match="NXDOMAIN"):
        await router.route("example.org")
    dns_server.set_records("example.org", "A", ["127.0.0.1"])
    clock.t += 29
    with pytest.raises(DnsPermanentError, match="NXDOMAIN"):
        await router.route("example.org")
    clock.t += 2
    assert addresses(await router.route("example.org")) == ["127.0.0.1"]


async def test_nxdomain_without_soa_cached_briefly(dns_server: DnsServer) -> None:
    dns_server.soa_minimum = None
    clock = Clock()
    router = make_router(dns_server, clock)
    with pytest.raises(DnsPermanentError):
        await router.route("example.org")
    dns_server.set_records("example.org", "A", ["127.0.0.1"])
    clock.t += 61  # the 60 s default, not for ever
    assert addresses(await router.route("example.org")) == ["127.0.0.1"]


async def test_temporary_failures_not_cached(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "A", ["127.0.0.1"])
    dns_server.set_behaviour("example.org", Behaviour.SERVFAIL)
    router = make_router(dns_server)
    with pytest.raises(DnsTemporaryError):
        await router.route("example.org")
    dns_server.set_behaviour("example.org", Behaviour.NORMAL)
    assert addresses(await router.route("example.org")) == ["127.0.0.1"]


async def test_questions_in_flight_share_one_query(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "TXT", ['"v=spf1 -all"'])
    resolver = CachingResolver([dns_server.host], port=dns_server.port, now=Clock())
    answers = await asyncio.gather(*(resolver.lookup("example.org", "TXT") for _ in range(20)))
    assert len({a.rdata for a in answers}) == 1
    assert len(dns_server.queries_for("example.org", "TXT")) == 1
    # And a cached answer can be read from any thread, with its expiry.
    hit = resolver.cached("Example.ORG.", "TXT")
    assert hit is not None and hit[0] == answers[0] and hit[1] == 1000.0 + 300


async def test_a_cancelled_asker_does_not_cancel_the_others(dns_server: DnsServer) -> None:
    dns_server.set_records("example.org", "TXT", ['"x"'])
    resolver = CachingResolver([dns_server.host], port=dns_server.port, now=Clock())
    first = asyncio.ensure_future(resolver.lookup("example.org", "TXT"))
    second = asyncio.ensure_future(resolver.lookup("example.org", "TXT"))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).rdata
    assert first.cancelled()


async def test_address_literal_needs_no_dns(dns_server: DnsServer) -> None:
    router = make_router(dns_server)
    assert await router.route("[127.0.0.1]") == [Destination("127.0.0.1", "127.0.0.1", 25)]
    with pytest.raises(DnsPermanentError, match="address literal"):
        await router.route("[not-an-ip]")
    with pytest.raises(DnsPermanentError, match="invalid domain"):
        await router.route("")
    with pytest.raises(DnsPermanentError, match="invalid domain"):
        await router.route("a..b")
    assert dns_server.queries == []
