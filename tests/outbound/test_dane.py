"""DANE (RFC 7672) end to end: zones signed with dnspython on the test DNS server, TLSA
records matching or not the trustme certificates of real receiving servers on 127.0.0.x;
validated by mailgate from a test trust anchor, or believed from a validating resolver's
AD bit. Each case says what was delivered, over what, and what never left in plain text."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.dns_server import DNSTestServer, SignedZone
from tests.outbound.helpers import body, make_engine, new_domain, request, run
from tests.outbound.receivers import Certs, Receiver

from mailgate.queue.outbound import OutboundEngine, Outcome, Relay
from mailgate.queue.outbound.dane import (
    TLSARecord,
    match_chain,
    tlsa_for_certificate,
)


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def server(certs: Certs, name: str, *, send_ca: bool = False) -> tuple[ssl.SSLContext, bytes]:
    """A receiving server's TLS context for ``name`` and its certificate (DER); with
    ``send_ca`` the chain it sends ends with the trustme CA (for DANE-TA)."""
    leaf = certs.ca.issue_cert(name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    if send_ca:
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + certs.ca.cert_pem.bytes()
        chain_file = Path(certs.ca_file).parent / f"{name}.chain.pem"
        key_file = Path(certs.ca_file).parent / f"{name}.key.pem"
        chain_file.write_bytes(chain)
        leaf.private_key_pem.write_to_path(str(key_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(chain_file), str(key_file))
    return context, der(leaf.cert_chain_pems[0].bytes())


def dane_zone(
    dns: DNSTestServer,
    port: int,
    domain: str,
    address: str,
    *tlsa: TLSARecord,
    broken: bool = False,
    validating: bool = False,
    stripped: bool = False,
    nsec3: bool = False,
) -> SignedZone:
    """A signed zone for ``domain``: its MX ``mx.<domain>`` at ``address`` and the TLSA
    records of that host for ``port`` (the test MX port stands in for 25)."""
    records = [f"{domain}. 60 IN MX 10 mx.{domain}.", f"mx.{domain}. 60 IN A {address}"]
    records += [f"_{port}._tcp.mx.{domain}. 60 IN TLSA {record}" for record in tlsa]
    return dns.add_signed(
        domain,
        "\n".join(records),
        broken=[f"_{port}._tcp.mx.{domain}"] if broken else (),
        validating=validating,
        stripped=[f"_{port}._tcp.mx.{domain}"] if stripped else (),
        nsec3=nsec3,
    )


def dane_engine(
    dns: DNSTestServer, port: int, *anchors: str, level: str = "dane", **extra: Any
) -> OutboundEngine:
    return make_engine(
        dns,
        port,
        tls_policy=level,
        dnssec="local",
        dnssec_trust_anchors=anchors,
        connection_reuse_count=1,
        **extra,
    )


def test_dane_ee_3_1_1_matching_is_delivered_verified_by_dane(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs, caplog: Any
) -> None:
    domain = new_domain("daneEE")
    context, leaf = server(certs, f"mx.{domain}")
    zone = dane_zone(dns_server, mx_port, domain, "127.0.0.70", tlsa_for_certificate(leaf))
    path = body(tmp_path)
    caplog.set_level(logging.INFO, logger="mailgate.queue.outbound")

    async def main() -> None:
        with Receiver("127.0.0.70", mx_port, tls_context=context) as receiver:
            async with dane_engine(dns_server, mx_port, zone.trust_anchor) as engine:
                result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        [outcome] = result.recipients
        assert outcome.outcome is Outcome.DELIVERED, outcome.diagnostic
        assert result.tls is not None and result.tls.verified and result.tls.method == "dane"
        assert result.tls_policy is not None
        assert (result.tls_policy.level, result.tls_policy.mode, result.tls_policy.source) == (
            "dane",
            "verify",
            "dane",
        )
        assert [m.tls for m in receiver.messages] == [True]

    run(main())
    line = next(
        r for r in caplog.records if "destination=relay:" + domain.lower() in r.getMessage()
    )
    assert "verified(dane)" in line.getMessage()
    assert line.outbound["tls_verification"] == "dane"  # type: ignore[attr-defined]


def test_tlsa_not_matching_defers_and_nothing_goes_in_plain_text(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("daneBad")
    context, _ = server(certs, f"mx.{domain}")
    _, other = server(certs, f"mx.{domain}")  # a different key: its hash is published
    zone = dane_zone(dns_server, mx_port, domain, "127.0.0.71", tlsa_for_certificate(other))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.71", mx_port, tls_context=context) as receiver:
            async with dane_engine(dns_server, mx_port, zone.trust_anchor) as engine:
                first = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                second = await engine.deliver(request(path, Relay(domain), f"b@{domain}"))
        for result in (first, second):
            [outcome] = result.recipients
            assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.7.5")
            assert "matches no TLSA record" in outcome.diagnostic
        # The handshake happened each time (no plain-text fallback), no message went.
        assert receiver.messages == []
        assert receiver.starttls == 2

    run(main())


def test_dane_ta_2_1_1_of_the_ca_with_the_name_checked(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    good = new_domain("daneTA")
    wrong = new_domain("daneTAname")
    ca_record = tlsa_for_certificate(der(certs.ca.cert_pem.bytes()), usage=2)
    good_context, _ = server(certs, f"mx.{good}", send_ca=True)
    wrong_context, _ = server(certs, "somewhere.else.test", send_ca=True)
    zones = [
        dane_zone(dns_server, mx_port, good, "127.0.0.72", ca_record),
        dane_zone(dns_server, mx_port, wrong, "127.0.0.73", ca_record),
    ]
    path = body(tmp_path)

    async def main() -> None:
        anchors = [zone.trust_anchor for zone in zones]
        with (
            Receiver("127.0.0.72", mx_port, tls_context=good_context) as receiver,
            Receiver("127.0.0.73", mx_port, tls_context=wrong_context) as misnamed,
        ):
            async with dane_engine(dns_server, mx_port, *anchors) as engine:
                delivered = await engine.deliver(request(path, Relay(good), f"a@{good}"))
                refused = await engine.deliver(request(path, Relay(wrong), f"a@{wrong}"))
        assert delivered.recipients[0].outcome is Outcome.DELIVERED
        assert delivered.tls is not None and delivered.tls.method == "dane"
        assert [m.tls for m in receiver.messages] == [True]
        [outcome] = refused.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.7.5")
        assert "does not verify" in outcome.diagnostic
        assert misnamed.messages == []

    run(main())
    # Matched only against what the server sends: a chain without the CA fails.
    leaf = certs.ca.issue_cert("mx.x.test")
    assert match_chain([der(leaf.cert_chain_pems[0].bytes())], [ca_record], ["mx.x.test"]) == (
        "no certificate the server sent matches a DANE-TA record"
    )


def test_no_tlsa_records_or_an_insecure_zone_fall_back_to_may(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    signed = new_domain("daneNone")
    plain = new_domain("daneInsecure")
    context, _ = server(certs, f"mx.{signed}")
    zone = dane_zone(dns_server, mx_port, signed, "127.0.0.74")  # signed, no TLSA: a secure denial
    # Not under the trust anchor: insecure, even with TLSA records published.
    dns_server.add(
        f"{plain}. 60 IN MX 10 mx.{plain}.\n"
        f"mx.{plain}. 60 IN A 127.0.0.75\n"
        f"_{mx_port}._tcp.mx.{plain}. 60 IN TLSA 3 1 1 {'00' * 32}\n"
    )
    path = body(tmp_path)

    async def main() -> None:
        with (
            Receiver("127.0.0.74", mx_port, tls_context=context) as tls,
            Receiver("127.0.0.75", mx_port) as cleartext,
        ):
            async with dane_engine(dns_server, mx_port, zone.trust_anchor) as engine:
                first = await engine.deliver(request(path, Relay(signed), f"a@{signed}"))
                second = await engine.deliver(request(path, Relay(plain), f"a@{plain}"))
        assert first.recipients[0].outcome is Outcome.DELIVERED
        assert first.tls is not None and not first.tls.verified  # opportunistic TLS
        assert first.tls_policy is not None and first.tls_policy.mode == "may"
        assert [m.tls for m in tls.messages] == [True]
        assert second.recipients[0].outcome is Outcome.DELIVERED and second.tls is None
        assert [m.tls for m in cleartext.messages] == [False]

    run(main())


def test_a_zone_signed_with_nsec3(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    matching = new_domain("daneN3")
    bare = new_domain("daneN3none")
    context, leaf = server(certs, f"mx.{matching}")
    bare_context, _ = server(certs, f"mx.{bare}")
    zones = [
        dane_zone(
            dns_server, mx_port, matching, "127.0.0.89", tlsa_for_certificate(leaf), nsec3=True
        ),
        dane_zone(dns_server, mx_port, bare, "127.0.0.90", nsec3=True),  # denied by NSEC3
    ]
    path = body(tmp_path)

    async def main() -> None:
        anchors = [zone.trust_anchor for zone in zones]
        with (
            Receiver("127.0.0.89", mx_port, tls_context=context) as receiver,
            Receiver("127.0.0.90", mx_port, tls_context=bare_context) as fallback,
        ):
            async with dane_engine(dns_server, mx_port, *anchors) as engine:
                verified = await engine.deliver(request(path, Relay(matching), f"a@{matching}"))
                opportunistic = await engine.deliver(request(path, Relay(bare), f"a@{bare}"))
        assert verified.tls is not None and verified.tls.method == "dane"
        assert [m.tls for m in receiver.messages] == [True]
        assert opportunistic.recipients[0].outcome is Outcome.DELIVERED
        assert opportunistic.tls_policy is not None and opportunistic.tls_policy.mode == "may"
        assert [m.tls for m in fallback.messages] == [True]

    run(main())


@pytest.mark.parametrize("attack", ["bad signature", "signatures stripped"])
def test_bogus_tlsa_defers_without_connecting(
    attack: str, tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("daneBogus")
    context, leaf = server(certs, f"mx.{domain}")
    zone = dane_zone(
        dns_server,
        mx_port,
        domain,
        "127.0.0.76",
        tlsa_for_certificate(leaf),
        broken=attack == "bad signature",
        stripped=attack == "signatures stripped",
    )
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.76", mx_port, tls_context=context) as receiver:
            async with dane_engine(dns_server, mx_port, zone.trust_anchor) as engine:
                result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        [outcome] = result.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.7.5")
        assert "bogus" in outcome.diagnostic
        assert receiver.session_count == 0 and receiver.messages == []

    run(main())


def test_dane_from_a_validating_resolvers_ad_bit(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("daneAD")
    context, leaf = server(certs, f"mx.{domain}")
    dane_zone(
        dns_server, mx_port, domain, "127.0.0.77", tlsa_for_certificate(leaf), validating=True
    )
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.77", mx_port, tls_context=context) as receiver:
            async with make_engine(
                dns_server, mx_port, tls_policy="dane", dnssec="resolver"
            ) as engine:
                result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert result.tls is not None and result.tls.method == "dane"
        assert [m.tls for m in receiver.messages] == [True]

    run(main())


def test_dane_only_defers_without_tlsa_and_tlsa_makes_starttls_mandatory(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    bare = new_domain("daneOnly")
    no_tls = new_domain("daneNoTLS")
    context, leaf = server(certs, f"mx.{bare}")
    zones = [
        dane_zone(dns_server, mx_port, bare, "127.0.0.78"),
        dane_zone(dns_server, mx_port, no_tls, "127.0.0.79", tlsa_for_certificate(leaf)),
    ]
    path = body(tmp_path)

    async def main() -> None:
        anchors = [zone.trust_anchor for zone in zones]
        with (
            Receiver("127.0.0.78", mx_port, tls_context=context) as receiver,
            Receiver("127.0.0.79", mx_port) as plain,  # offers no STARTTLS
        ):
            async with dane_engine(dns_server, mx_port, *anchors, level="dane-only") as engine:
                refused = await engine.deliver(request(path, Relay(bare), f"a@{bare}"))
            async with dane_engine(dns_server, mx_port, *anchors) as engine:
                no_starttls = await engine.deliver(request(path, Relay(no_tls), f"a@{no_tls}"))
        [outcome] = refused.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.7.5")
        assert "dane-only" in outcome.diagnostic
        assert receiver.session_count == 0
        [outcome] = no_starttls.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.7.4")
        assert plain.messages == []

    run(main())


def test_tlsa_records_parse_and_unusable_ones_are_told_apart() -> None:
    record = TLSARecord.from_text("3 1 1 " + "AB" * 16 + " " + "cd" * 16)
    assert record.usable and record.data == bytes.fromhex("ab" * 16 + "cd" * 16)
    assert not TLSARecord.from_text("1 1 1 " + "ab" * 32).usable  # PKIX-EE: not in SMTP
    assert not TLSARecord.from_text("3 1 1 abcd").usable  # a SHA-256 must be 32 bytes
    assert not TLSARecord.from_text("3 2 0 abcd").usable
    with pytest.raises(ValueError):
        TLSARecord.from_text("3 1 x")
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.example.test")
    leaf_der = der(leaf.cert_chain_pems[0].bytes())
    for selector in (0, 1):
        for matching in (0, 1, 2):
            published = tlsa_for_certificate(leaf_der, 3, selector, matching)
            assert match_chain([leaf_der], [published], ["x"]) is None
