"""REQUIRETLS (RFC 8689) in the outbound engine, against real receivers on 127.0.0.x:
mailgate's own server (it offers REQUIRETLS over TLS) and aiosmtpd (it does not). A
REQUIRETLS message goes only over verified TLS to a server that offers REQUIRETLS, with
the parameter; anything less fails the recipient for good (5.7.30) and sends nothing.
``TLS-Required: No`` sets the recipient domain's DANE policy aside."""

from __future__ import annotations

from pathlib import Path

from tests.dns_server import DNSTestServer
from tests.outbound.helpers import body, make_engine, new_domain, publish_mx, request, run
from tests.outbound.receivers import Certs, Receiver, mailgate_server
from tests.outbound.test_dane import dane_engine, dane_zone, der, server

from mailgate.queue.outbound import Forward, Outcome, Relay
from mailgate.queue.outbound.dane import tlsa_for_certificate


def test_requiretls_to_a_verified_smarthost_that_offers_it_passes_the_parameter(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    smarthost = f"smarthost.{new_domain('rtls')}"
    dns_server.add(f"{smarthost}. 60 IN A 127.0.0.80\n")
    path = body(tmp_path)
    url = f"smtp://{smarthost}:{mx_port}"

    async def main() -> None:
        async with mailgate_server(tmp_path, certs, f"127.0.0.80:{mx_port}", smarthost) as (
            _,
            seen,
        ):
            async with make_engine(dns_server, 25, tls_cafile=str(certs.ca_file)) as engine:
                required = await engine.deliver(
                    request(path, Forward(url), "bob@example.net", require_tls=True)
                )
                plain = await engine.deliver(request(path, Forward(url), "carol@example.net"))
            # The same server, but its certificate cannot be verified (no CA given).
            async with make_engine(dns_server, 25) as engine:
                unverified = await engine.deliver(
                    request(path, Forward(url), "dave@example.net", require_tls=True)
                )
        [delivered] = required.recipients
        assert delivered.outcome is Outcome.DELIVERED, delivered.diagnostic
        assert required.tls is not None and required.tls.verified
        assert required.tls.method == "ca"
        assert plain.recipients[0].outcome is Outcome.DELIVERED
        [(_, with_param, _), (_, without, _)] = seen.messages
        assert "REQUIRETLS" in with_param.mail_params
        assert "REQUIRETLS" not in without.mail_params
        [refused] = unverified.recipients
        assert (refused.outcome, refused.status) == (Outcome.FAILED, "5.7.30")
        assert "not verified" in refused.diagnostic
        assert len(seen.messages) == 2

    run(main())


def test_a_next_hop_without_requiretls_gets_nothing(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    smarthost = f"smarthost.{new_domain('nortls')}"
    dns_server.add(f"{smarthost}. 60 IN A 127.0.0.81\n")
    plain_domain = new_domain("rtlsPlain")
    publish_mx(dns_server, plain_domain, (10, "mx", "127.0.0.82"))
    path = body(tmp_path)
    url = f"smtp://{smarthost}:{mx_port}"

    async def main() -> None:
        with (
            # aiosmtpd: TLS with a good certificate, but no REQUIRETLS.
            Receiver(
                "127.0.0.81", mx_port, tls_context=certs.server_context(smarthost)
            ) as receiver,
            Receiver("127.0.0.82", mx_port) as cleartext,  # no STARTTLS either
        ):
            async with make_engine(dns_server, 25, tls_cafile=str(certs.ca_file)) as engine:
                result = await engine.deliver(
                    request(path, Forward(url), "bob@example.net", require_tls=True)
                )
                # The host is alive: its other mail is neither slowed down nor suspended.
                assert engine.status(Forward(url)).consecutive_failures == 0
            async with make_engine(dns_server, mx_port, tls_cafile=str(certs.ca_file)) as engine:
                # An MX found without DNSSEC cannot be trusted with REQUIRETLS mail: not
                # even a connection.
                insecure_mx = await engine.deliver(
                    request(path, Relay(plain_domain), f"a@{plain_domain}", require_tls=True)
                )
        [outcome] = result.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.FAILED, "5.7.30")
        assert "REQUIRETLS is required, but was not offered" in outcome.diagnostic
        assert receiver.starttls == 1 and receiver.messages == []
        [outcome] = insecure_mx.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.FAILED, "5.7.30")
        assert "DNSSEC" in outcome.diagnostic
        assert cleartext.session_count == 0 and cleartext.messages == []

    run(main())


def test_requiretls_over_dane_and_tls_required_no_over_a_failing_dane_policy(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    secure = new_domain("rtlsDane")
    mismatch = new_domain("rtlsNo")
    mx = f"mx.{secure}"
    context, _ = server(certs, f"mx.{mismatch}")
    _, other = server(certs, f"mx.{mismatch}")
    mismatched = dane_zone(dns_server, mx_port, mismatch, "127.0.0.84", tlsa_for_certificate(other))
    path = body(tmp_path)

    async def main() -> None:
        async with mailgate_server(tmp_path, certs, f"127.0.0.83:{mx_port}", mx) as (_, seen):
            # The TLSA record of the certificate the server was given.
            pem = (tmp_path / mx / "cert.pem").read_bytes()
            leaf = pem[: pem.index(b"-----END CERTIFICATE-----") + 26]
            zone = dane_zone(
                dns_server, mx_port, secure, "127.0.0.83", tlsa_for_certificate(der(leaf))
            )
            anchors = [zone.trust_anchor, mismatched.trust_anchor]
            with Receiver("127.0.0.84", mx_port, tls_context=context) as receiver:
                async with dane_engine(dns_server, mx_port, *anchors) as engine:
                    required = await engine.deliver(
                        request(path, Relay(secure), f"a@{secure}", require_tls=True)
                    )
                    relaxed = await engine.deliver(
                        request(path, Relay(mismatch), f"a@{mismatch}", tls_optional=True)
                    )
                    strict = await engine.deliver(request(path, Relay(mismatch), f"b@{mismatch}"))
        assert required.recipients[0].outcome is Outcome.DELIVERED
        assert required.tls is not None and required.tls.method == "dane"
        [(_, envelope, _)] = seen.messages
        assert "REQUIRETLS" in envelope.mail_params
        # TLS-Required: No: the TLSA mismatch does not hold it back (TLS still used).
        assert relaxed.recipients[0].outcome is Outcome.DELIVERED
        assert relaxed.tls is not None and not relaxed.tls.verified
        assert relaxed.tls_policy is not None and relaxed.tls_policy.reason == "TLS-Required: No"
        assert strict.recipients[0].status == "4.7.5"  # without the header: deferred
        assert [m.rcpt_tos for m in receiver.messages] == [[f"a@{mismatch}"]]

    run(main())
