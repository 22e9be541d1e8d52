"""TLS of outbound sessions: opportunistic STARTTLS, its fallback, the encrypt policy,
and the certificate check that is reported (trustme certificates, real handshakes)."""

from __future__ import annotations

import ssl
from pathlib import Path

from tests.dns_server import DNSTestServer
from tests.outbound.helpers import body, make_engine, new_domain, publish_mx, request, run
from tests.outbound.receivers import Certs, Receiver

from mailgate.queue.outbound import Outcome, Relay


def test_starttls_is_used_when_offered_and_the_certificate_is_checked(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    good = new_domain("tlsGood")
    publish_mx(dns_server, good, (10, "mx", "127.0.0.23"))
    wrong_name = new_domain("tlsWrongName")
    publish_mx(dns_server, wrong_name, (10, "mx", "127.0.0.24"))
    path = body(tmp_path)

    async def main() -> None:
        with (
            Receiver("127.0.0.23", mx_port, tls_context=certs.server_context(f"mx.{good}")) as ok,
            Receiver("127.0.0.24", mx_port, tls_context=certs.server_context("other.test")) as odd,
        ):
            async with make_engine(dns_server, mx_port, tls_cafile=str(certs.ca_file)) as engine:
                verified = await engine.deliver(request(path, Relay(good), f"a@{good}"))
                unverified = await engine.deliver(
                    request(path, Relay(wrong_name), f"a@{wrong_name}")
                )
            async with make_engine(dns_server, mx_port) as engine:  # system CAs only
                untrusted = await engine.deliver(request(path, Relay(good), f"b@{good}"))
        for result in (verified, unverified, untrusted):
            assert result.recipients[0].outcome is Outcome.DELIVERED
            assert result.tls is not None and result.tls.version.startswith("TLSv1.")
            assert result.tls.cipher
            assert result.recipients[0].tls == result.tls
        assert verified.tls is not None and verified.tls.verified
        assert unverified.tls is not None and not unverified.tls.verified
        assert untrusted.tls is not None and not untrusted.tls.verified
        assert [m.tls for m in ok.messages] == [True, True]
        assert [m.tls for m in odd.messages] == [True]
        assert ok.ehlo_names == ["outbound.test"] * 4  # EHLO again after STARTTLS

    run(main())


def test_failed_handshake_falls_back_to_plain_text_and_is_remembered(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("tlsBroken")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.25"))
    path = body(tmp_path)
    # A server context without a certificate: STARTTLS is offered, no handshake succeeds.
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    async def main() -> None:
        with Receiver("127.0.0.25", mx_port, tls_context=broken) as receiver:
            async with make_engine(dns_server, mx_port, connection_reuse_count=1) as engine:
                first = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                second = await engine.deliver(request(path, Relay(domain), f"b@{domain}"))
            async with make_engine(
                dns_server, mx_port, tls_policy="encrypt", connection_reuse_count=1
            ) as engine:
                required = await engine.deliver(request(path, Relay(domain), f"c@{domain}"))
        assert first.recipients[0].outcome is Outcome.DELIVERED and first.tls is None
        assert second.recipients[0].outcome is Outcome.DELIVERED and second.tls is None
        # One handshake tried; the second session went straight to plain text.
        assert receiver.starttls == 2  # the first engine's one, and the encrypt engine's
        assert receiver.session_count == 4
        assert [m.tls for m in receiver.messages] == [False, False]
        [refused] = required.recipients
        assert (refused.outcome, refused.status) == (Outcome.DEFERRED, "4.7.5")
        assert "TLS handshake" in refused.diagnostic

    run(main())


def test_encrypt_refuses_a_server_without_starttls_and_none_never_asks(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    plain = new_domain("plainOnly")
    publish_mx(dns_server, plain, (10, "mx", "127.0.0.26"))
    offered = new_domain("offered")
    publish_mx(dns_server, offered, (10, "mx", "127.0.0.27"))
    path = body(tmp_path)

    async def main() -> None:
        with (
            Receiver("127.0.0.26", mx_port) as receiver,
            Receiver("127.0.0.27", mx_port, tls_context=certs.server_context("x.test")) as tls,
        ):
            async with make_engine(dns_server, mx_port, tls_policy="encrypt") as engine:
                refused = await engine.deliver(request(path, Relay(plain), f"a@{plain}"))
            async with make_engine(dns_server, mx_port, tls_policy="none") as engine:
                cleartext = await engine.deliver(request(path, Relay(offered), f"a@{offered}"))
        [outcome] = refused.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.7.4")
        assert "TLS is required, but was not offered" in outcome.diagnostic
        assert receiver.messages == []
        assert cleartext.recipients[0].outcome is Outcome.DELIVERED and cleartext.tls is None
        assert tls.starttls == 0 and [m.tls for m in tls.messages] == [False]

    run(main())
