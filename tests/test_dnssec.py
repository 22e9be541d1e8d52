"""DNSSEC status of answers (mailgate.dns.dnssec) against the real test DNS server serving
zones signed with dnspython: validated locally from a test trust anchor, or believed
from the AD bit of a validating resolver; bogus signatures, proven denials, names
outside every anchor."""

from __future__ import annotations

import asyncio

import pytest
from tests.dns_server import DNSTestServer, unique

from mailgate.dns import DNSTempError
from mailgate.dns.dnssec import DNSSECResolver, Security, parse_trust_anchor

TLSA = "3 1 1 " + "ab" * 32


def signed(dns_server: DNSTestServer, **extra: object) -> tuple[str, str]:
    zone = unique("sec") + ".test"
    records = f"""
        {zone}. 60 IN MX 10 mx.{zone}.
        mx.{zone}. 60 IN A 127.0.0.60
        _25._tcp.mx.{zone}. 60 IN TLSA {TLSA}
        _25._tcp.bad.{zone}. 60 IN TLSA {TLSA}
        bad.{zone}. 60 IN A 127.0.0.61
        alias.{zone}. 60 IN CNAME mx.{zone}.
    """
    made = dns_server.add_signed(zone, records, broken=[f"_25._tcp.bad.{zone}"], **extra)  # type: ignore[arg-type]
    return zone, made.trust_anchor


def test_local_validation_from_a_trust_anchor(dns_server: DNSTestServer) -> None:
    zone, anchor = signed(dns_server)

    async def main() -> None:
        resolver = DNSSECResolver([dns_server.address], mode="local", trust_anchors=[anchor])
        tlsa = await resolver.lookup(f"_25._tcp.mx.{zone}", "TLSA")
        assert tlsa.security is Security.SECURE, tlsa.reason
        assert tlsa.records == (TLSA,)
        mx = await resolver.lookup(zone, "MX")
        assert mx.secure and mx.records == (f"10 mx.{zone}.",)
        via_cname = await resolver.lookup(f"alias.{zone}", "A")
        assert via_cname.secure and via_cname.records == ("127.0.0.60",)
        # Proven absent: no such type at an existing name, no such name.
        nodata = await resolver.lookup(f"mx.{zone}", "TLSA")
        assert nodata.secure and nodata.records == ()
        nxdomain = await resolver.lookup(f"_25._tcp.none.{zone}", "TLSA")
        assert nxdomain.secure and nxdomain.records == (), nxdomain.reason
        # A signature that does not verify: bogus, the records still shown.
        bogus = await resolver.lookup(f"_25._tcp.bad.{zone}", "TLSA")
        assert bogus.security is Security.BOGUS
        assert "does not verify" in bogus.reason
        # The keys were fetched once and cached.
        assert dns_server.asked(zone) <= 3

    asyncio.run(main())


def test_a_dnskey_anchor_works_as_well_and_a_wrong_anchor_makes_everything_bogus(
    dns_server: DNSTestServer,
) -> None:
    zone, _ = signed(dns_server)
    other = dns_server.add_signed(unique("other") + ".test", "")
    # The DNSKEY form of this zone's own key:
    own = next(z for z in dns_server.resolver.signed if z.origin.to_text() == zone + ".")

    async def main() -> None:
        good = DNSSECResolver([dns_server.address], mode="local", trust_anchors=[own.dnskey_anchor])
        assert (await good.lookup(f"_25._tcp.mx.{zone}", "TLSA")).secure
        wrong_anchor = other.trust_anchor.replace(str(other.origin), zone + ".")
        wrong = DNSSECResolver([dns_server.address], mode="local", trust_anchors=[wrong_anchor])
        answer = await wrong.lookup(f"_25._tcp.mx.{zone}", "TLSA")
        assert answer.security is Security.BOGUS
        assert "matches" in answer.reason

    asyncio.run(main())


def test_names_outside_every_anchor_and_unsigned_names_are_insecure(
    dns_server: DNSTestServer,
) -> None:
    _, anchor = signed(dns_server)
    plain = unique("plain") + ".test"
    dns_server.add(f"_25._tcp.mx.{plain}. 60 IN TLSA {TLSA}")

    async def main() -> None:
        resolver = DNSSECResolver([dns_server.address], mode="local", trust_anchors=[anchor])
        answer = await resolver.lookup(f"_25._tcp.mx.{plain}", "TLSA")
        assert answer.security is Security.INSECURE
        assert answer.records == (TLSA,)

    asyncio.run(main())


def test_the_ad_bit_of_a_validating_resolver(dns_server: DNSTestServer) -> None:
    zone, _ = signed(dns_server, validating=True)
    plain = unique("plainad") + ".test"
    dns_server.add(f"{plain}. 60 IN MX 10 mx.{plain}.")

    async def main() -> None:
        resolver = DNSSECResolver([dns_server.address], mode="resolver", timeout=2.0)
        tlsa = await resolver.lookup(f"_25._tcp.mx.{zone}", "TLSA")
        assert tlsa.secure and tlsa.records == (TLSA,)
        assert (await resolver.lookup(f"mx.{zone}", "TLSA")).secure  # a secure denial
        assert not (await resolver.lookup(plain, "MX")).secure
        # What a validating resolver finds bogus, it answers with SERVFAIL.
        with pytest.raises(DNSTempError):
            await resolver.lookup(f"_25._tcp.bad.{zone}", "TLSA")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("example.test. IN A 192.0.2.1", "must be a DS or DNSKEY"),
        ("example.test.", "is not"),
        ("example.test. IN DS 1 2 3 zz", "trust anchor"),
    ],
)
def test_bad_trust_anchors_are_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_trust_anchor(text)


def test_the_default_root_anchor_parses() -> None:
    resolver = DNSSECResolver(["127.0.0.1:9"], mode="local")
    assert [str(name) for name in resolver._anchors] == ["."]


def test_stripped_signatures_are_bogus_and_an_unsigned_delegation_is_insecure(
    dns_server: DNSTestServer,
) -> None:
    zone = unique("cut") + ".test"
    records = f"""
        _25._tcp.mx.{zone}. 60 IN TLSA {TLSA}
        mx.{zone}. 60 IN A 127.0.0.62
        child.{zone}. 60 IN NS ns.child.{zone}.
    """
    made = dns_server.add_signed(zone, records, stripped=[f"_25._tcp.mx.{zone}"])
    # The child zone is not signed: its records come from the plain part of the server.
    dns_server.add(f"_25._tcp.mx.child.{zone}. 60 IN TLSA {TLSA}")

    async def main() -> None:
        resolver = DNSSECResolver(
            [dns_server.address], mode="local", trust_anchors=[made.trust_anchor]
        )
        # A signed zone's answer without its RRSIGs: what a downgrade attacker serves.
        stripped = await resolver.lookup(f"_25._tcp.mx.{zone}", "TLSA")
        assert stripped.security is Security.BOGUS
        assert "no signature" in stripped.reason
        # Below a delegation the parent proves has no DS (NSEC: NS, no DS): insecure.
        below = await resolver.lookup(f"_25._tcp.mx.child.{zone}", "TLSA")
        assert below.security is Security.INSECURE, below.reason
        assert "unsigned delegation" in below.reason and below.records == (TLSA,)

    asyncio.run(main())


def test_nsec3_denials_and_an_opt_out_delegation(dns_server: DNSTestServer) -> None:
    zone = unique("nsec3") + ".test"
    records = f"""
        {zone}. 60 IN MX 10 mx.{zone}.
        mx.{zone}. 60 IN A 127.0.0.63
        _25._tcp.mx.{zone}. 60 IN TLSA {TLSA}
        child.{zone}. 60 IN NS ns.child.{zone}.
    """
    made = dns_server.add_signed(zone, records, nsec3=True, opt_out=True)
    dns_server.add(f"_25._tcp.mx.child.{zone}. 60 IN TLSA {TLSA}")

    async def main() -> None:
        resolver = DNSSECResolver(
            [dns_server.address], mode="local", trust_anchors=[made.trust_anchor]
        )
        assert (await resolver.lookup(f"_25._tcp.mx.{zone}", "TLSA")).secure
        nodata = await resolver.lookup(f"mx.{zone}", "TLSA")
        assert nodata.secure and nodata.records == (), nodata.reason
        # No such name, in the span of a non-opt-out record? Here every record is
        # opt-out (as in .com), so a missing name may hide an unsigned delegation.
        missing = await resolver.lookup(f"_25._tcp.none.{zone}", "TLSA")
        assert missing.records == () and missing.security is Security.INSECURE
        below = await resolver.lookup(f"_25._tcp.mx.child.{zone}", "TLSA")
        assert below.security is Security.INSECURE, below.reason
        assert below.records == (TLSA,)

    asyncio.run(main())


def test_nsec3_without_opt_out_proves_a_name_absent(dns_server: DNSTestServer) -> None:
    zone = unique("nsec3strict") + ".test"
    records = f"""
        mx.{zone}. 60 IN A 127.0.0.64
        _25._tcp.mx.{zone}. 60 IN TLSA {TLSA}
    """
    made = dns_server.add_signed(zone, records, nsec3=True, stripped=[f"_25._tcp.mx.{zone}"])

    async def main() -> None:
        resolver = DNSSECResolver(
            [dns_server.address], mode="local", trust_anchors=[made.trust_anchor]
        )
        missing = await resolver.lookup(f"_25._tcp.none.{zone}", "TLSA")
        assert missing.secure and missing.records == (), missing.reason
        # An empty non-terminal has no data, proven.
        empty = await resolver.lookup(f"_tcp.mx.{zone}", "TLSA")
        assert empty.secure and empty.records == (), empty.reason
        # Stripped signatures under NSEC3: bogus too (the walk down finds no cut).
        stripped = await resolver.lookup(f"_25._tcp.mx.{zone}", "TLSA")
        assert stripped.security is Security.BOGUS
        assert "no signature" in stripped.reason

    asyncio.run(main())
