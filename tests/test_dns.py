"""The policy resolver against a real authoritative DNS server on 127.0.0.1: answers by
type, the TTL cache (negative answers too), shared in-flight lookups, failures as
DNSTempError, the blocking form, and the name helpers."""

from __future__ import annotations

import asyncio
import time

import pytest
from tests.dns_server import DNSTestServer, unique

from mailgate.dns import (
    DNSTempError,
    NameServer,
    Resolver,
    dnsbl_name,
    parse_nameserver,
    reverse_name,
)


def resolver(dns_server: DNSTestServer, timeout: float = 2.0) -> Resolver:
    return Resolver([dns_server.address], timeout=timeout)


def test_answers_by_type(dns_server: DNSTestServer) -> None:
    zone = unique("types") + ".test"
    records = [
        f"{zone}. 60 IN A 192.0.2.10",
        f"{zone}. 60 IN AAAA 2001:db8::10",
        f"{zone}. 60 IN MX 20 mx2.{zone}.",
        f"{zone}. 60 IN MX 10 mx1.{zone}.",
        f'{zone}. 60 IN TXT "v=spf1 " "-all"',
        f"10.2.0.192.in-addr.arpa. 60 IN PTR host.{zone}.",
    ]
    dns_server.add("\n".join(records))

    async def main() -> None:
        r = resolver(dns_server)
        assert await r.a(zone) == ["192.0.2.10"]
        assert await r.aaaa(zone) == ["2001:db8::10"]
        assert sorted(await r.addresses(zone)) == ["192.0.2.10", "2001:db8::10"]
        assert await r.mx(zone) == [(10, f"mx1.{zone}"), (20, f"mx2.{zone}")]
        assert await r.txt(zone) == ["v=spf1 -all"]  # strings of one record joined
        assert await r.ptr("192.0.2.10") == [f"host.{zone}"]
        assert await r.a("nothing." + zone) == []

    asyncio.run(main())


def test_cache_keeps_answers_and_negative_answers(dns_server: DNSTestServer) -> None:
    zone = unique("cache") + ".test"
    dns_server.add(f"{zone}. 60 IN A 192.0.2.1")
    missing = "missing." + zone

    async def main() -> None:
        r = resolver(dns_server)
        assert r.cached(zone, "A") is None
        for _ in range(3):
            assert await r.a(zone) == ["192.0.2.1"]
            assert await r.a(missing) == []
        assert r.cached(zone, "A") == ["192.0.2.1"]
        assert r.cached(missing, "A") == []  # known not to exist: not None
        assert r.queries == 2

    asyncio.run(main())
    assert dns_server.asked(zone) == 1
    assert dns_server.asked(missing) == 1


def test_cache_expires_with_the_ttl() -> None:
    now = [1000.0]
    r = Resolver(["127.0.0.1:9"], clock=lambda: now[0])
    r._store(("x.test", "A"), ["192.0.2.1"], 30.0)
    assert r.cached("X.test.", "a") == ["192.0.2.1"]
    now[0] += 31
    assert r.cached("x.test", "A") is None


def test_concurrent_questions_share_one_lookup(dns_server: DNSTestServer) -> None:
    zone = unique("shared") + ".test"
    dns_server.add(f"{zone}. 60 IN A 192.0.2.2")

    async def main() -> None:
        r = resolver(dns_server)
        answers = await asyncio.gather(*(r.a(zone) for _ in range(20)))
        assert answers == [["192.0.2.2"]] * 20
        assert r.queries == 1

    asyncio.run(main())
    assert dns_server.asked(zone) == 1


def test_servfail_and_timeout_are_temporary_errors(dns_server: DNSTestServer) -> None:
    failing = unique("fail") + ".test"
    hanging = unique("hang") + ".test"
    dns_server.fail(failing)
    dns_server.hang(hanging)

    async def main() -> None:
        r = resolver(dns_server, timeout=0.5)
        with pytest.raises(DNSTempError):
            await r.a(failing)
        started = time.monotonic()
        with pytest.raises(DNSTempError):
            await r.a(hanging)
        assert time.monotonic() - started < 2.0
        assert r.cached(failing, "A") is None  # failures are not cached

    asyncio.run(main())


def test_blocking_form_for_worker_threads(dns_server: DNSTestServer) -> None:
    zone = unique("sync") + ".test"
    dns_server.add(f'{zone}. 60 IN TXT "hello"')
    dns_server.fail("fail." + zone)
    r = resolver(dns_server)
    assert r.sync_lookup(zone.encode(), "TXT") == ["hello"]
    assert r.sync_lookup("none." + zone, "TXT") == []
    with pytest.raises(DNSTempError):
        r.sync_lookup("fail." + zone, "A")


def test_name_helpers() -> None:
    assert dnsbl_name("192.0.2.1", "bl.example.") == "1.2.0.192.bl.example"
    assert dnsbl_name("::ffff:192.0.2.1", "bl.example") == "1.2.0.192.bl.example"
    v6 = dnsbl_name("2001:db8::1", "bl.example")
    assert v6 == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.example"
    assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert reverse_name("2001:db8::1").endswith(".ip6.arpa")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", NameServer("192.0.2.53", 53)),
        ("127.0.0.1:5353", NameServer("127.0.0.1", 5353)),
        ("[::1]:5300", NameServer("::1", 5300)),
        ("::1", NameServer("::1", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: NameServer) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ns.example.com", "must be an IP address"),
        ("127.0.0.1:x", "no valid port"),
        ("127.0.0.1:70000", "out of range"),
        ("[::1", "is not"),
    ],
)
def test_parse_nameserver_errors(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_nameserver(text)
