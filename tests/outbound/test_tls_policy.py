"""TLS policy levels against real receivers with every kind of certificate.

For ``none``, ``may``, ``encrypt`` and ``verify`` (Postfix's meanings) and each receiver
(valid certificate, wrong name, expired, self-signed, no STARTTLS): what was delivered
in plain text, what over TLS, what was deferred, judged by what each receiver got and
whether its session was TLS. Then: ``verify`` moves on to the next MX; the policy comes
from the domain table or the route over the default; ``dane`` without DANE is ``may``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import body, make_engine, new_domain, publish_mx, request, run
from tests.outbound.receivers import Certs, Receiver
from tests.outbound.tls_servers import ADDRESSES, publish_zoo, zoo

from mailgate.queue.outbound import DeliveryResult, Forward, Outcome, Relay

KINDS = tuple(ADDRESSES)

#: policy -> receiver kind -> (outcome, "tls" / "plain" / None for nothing received,
#: the verification reported).
EXPECTED: dict[str, dict[str, tuple[Outcome, str | None, str | None]]] = {
    "none": {kind: (Outcome.DELIVERED, "plain", None) for kind in KINDS},
    "may": {
        "valid": (Outcome.DELIVERED, "tls", "ca"),
        "wrong-name": (Outcome.DELIVERED, "tls", None),
        "expired": (Outcome.DELIVERED, "tls", None),
        "self-signed": (Outcome.DELIVERED, "tls", None),
        "no-starttls": (Outcome.DELIVERED, "plain", None),
    },
    "encrypt": {
        "valid": (Outcome.DELIVERED, "tls", "ca"),
        "wrong-name": (Outcome.DELIVERED, "tls", None),
        "expired": (Outcome.DELIVERED, "tls", None),
        "self-signed": (Outcome.DELIVERED, "tls", None),
        "no-starttls": (Outcome.DEFERRED, None, None),
    },
    "verify": {
        "valid": (Outcome.DELIVERED, "tls", "ca"),
        "wrong-name": (Outcome.DEFERRED, None, None),
        "expired": (Outcome.DEFERRED, None, None),
        "self-signed": (Outcome.DEFERRED, None, None),
        "no-starttls": (Outcome.DEFERRED, None, None),
    },
}


@pytest.mark.parametrize("policy", list(EXPECTED))
def test_each_policy_against_each_certificate(
    policy: str, tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domains = publish_zoo(dns_server, f"pol{policy}")
    path = body(tmp_path)
    results: dict[str, DeliveryResult] = {}

    async def main() -> None:
        with zoo(tmp_path, certs, mx_port, domains) as servers:
            async with make_engine(
                dns_server, mx_port, tls_policy=policy, tls_cafile=str(certs.ca_file)
            ) as engine:
                for kind, domain in domains.items():
                    results[kind] = await engine.deliver(
                        request(path, Relay(domain), f"rcpt@{domain}")
                    )
            for kind, (outcome, received, method) in EXPECTED[policy].items():
                result = results[kind]
                [recipient] = result.recipients
                receiver = servers.receivers[kind]
                assert recipient.outcome is outcome, (kind, recipient.diagnostic)
                got = [("tls" if m.tls else "plain") for m in receiver.messages]
                assert got == ([received] if received else []), kind
                assert result.tls_policy is not None
                assert (result.tls_policy.level, result.tls_policy.source) == (policy, "default")
                if received == "tls":
                    assert result.tls is not None and result.tls.version.startswith("TLSv1.")
                    assert result.tls.cipher
                    assert result.tls.method == method
                    assert result.tls.verified is (method is not None)
                if received == "plain":
                    assert result.tls is None
                if policy == "none":
                    assert receiver.starttls == 0
                if outcome is Outcome.DEFERRED:
                    expected_status = "4.7.4" if kind == "no-starttls" else "4.7.5"
                    assert recipient.status == expected_status, recipient.diagnostic
                    if kind != "no-starttls":
                        assert "Server certificate not verified" in recipient.diagnostic
                        # It spoke TLS and stopped there: no transaction, no plain text.
                        assert receiver.starttls == 1

    run(main())


def test_verify_moves_on_to_the_next_mx_and_never_falls_back_to_plain_text(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("verifyNext")
    publish_mx(dns_server, domain, (10, "bad", "127.0.0.57"), (20, "good", "127.0.0.56"))
    path = body(tmp_path)

    async def main() -> None:
        with (
            Receiver("127.0.0.57", mx_port, tls_context=certs.server_context("x.test")) as bad,
            Receiver(
                "127.0.0.56", mx_port, tls_context=certs.server_context(f"good.{domain}")
            ) as good,
        ):
            async with make_engine(
                dns_server,
                mx_port,
                tls_policies=((domain, "verify"),),
                tls_cafile=str(certs.ca_file),
            ) as engine:
                result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        [recipient] = result.recipients
        assert recipient.outcome is Outcome.DELIVERED
        assert result.remote is not None and result.remote.host == f"good.{domain}"
        assert result.tls is not None and (result.tls.verified, result.tls.method) == (True, "ca")
        assert result.tls_policy is not None
        assert (result.tls_policy.level, result.tls_policy.source) == ("verify", "domain")
        assert bad.messages == [] and bad.starttls == 1
        assert [m.tls for m in good.messages] == [True]

    run(main())


def test_the_route_wins_over_the_domain_table_and_the_domain_over_the_default(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("levels")
    sub = f"a.{domain}"
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.60"))
    publish_mx(dns_server, sub, (10, "mx", "127.0.0.60"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.60", mx_port) as plain_only:  # no STARTTLS
            async with make_engine(
                dns_server,
                mx_port,
                tls_policy="none",
                tls_policies=((domain, "encrypt"), (f".{domain}", "verify")),
            ) as engine:
                by_domain = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                by_parent = await engine.deliver(request(path, Relay(sub), f"b@{sub}"))
                by_route = await engine.deliver(
                    request(path, Relay(domain, tls="may"), f"c@{domain}")
                )
        assert by_domain.recipients[0].outcome is Outcome.DEFERRED
        assert by_domain.tls_policy is not None
        assert (by_domain.tls_policy.level, by_domain.tls_policy.source) == ("encrypt", "domain")
        assert by_parent.recipients[0].outcome is Outcome.DEFERRED
        assert by_parent.tls_policy is not None and by_parent.tls_policy.level == "verify"
        assert by_route.recipients[0].outcome is Outcome.DELIVERED
        assert by_route.tls_policy is not None
        assert (by_route.tls_policy.level, by_route.tls_policy.source) == ("may", "route")
        assert [m.rcpt_tos for m in plain_only.messages] == [[f"c@{domain}"]]

    run(main())


def test_dane_without_a_dane_provider_is_may_and_says_so(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    certs: Certs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = new_domain("daneless")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.60"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.60", mx_port) as plain_only:
            async with make_engine(dns_server, mx_port, tls_policy="dane") as engine:
                result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert [m.tls for m in plain_only.messages] == [False]
        assert result.tls_policy is not None
        assert (result.tls_policy.level, result.tls_policy.mode) == ("dane", "may")

    with caplog.at_level(logging.WARNING, logger="mailgate.queue.outbound"):
        run(main())
    assert any(
        f"TLS policy dane for {domain}: DANE is not available" in r.getMessage()
        for r in caplog.records
    )


def test_the_log_line_names_tls_version_cipher_verification_and_policy(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    certs: Certs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = new_domain("logged")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.56"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.56", mx_port, tls_context=certs.server_context(f"mx.{domain}")):
            async with make_engine(
                dns_server, mx_port, tls_policy="verify", tls_cafile=str(certs.ca_file)
            ) as engine:
                await engine.deliver(request(path, Relay(domain), f"a@{domain}"))

    with caplog.at_level(logging.INFO, logger="mailgate.queue.outbound"):
        run(main())
    [line] = [r for r in caplog.records if hasattr(r, "outbound")]
    text = line.getMessage()
    assert " tls=TLSv1.3/" in text and "/verified(ca) policy=verify(default)" in text
    record = line.outbound  # type: ignore[attr-defined]
    assert record["tls_version"] == "TLSv1.3" and record["tls_cipher"]
    assert (record["tls_verified"], record["tls_verification"]) == (True, "ca")
    assert (record["tls_policy"], record["tls_policy_source"]) == ("verify", "default")


def test_a_smarthost_url_takes_a_tls_level(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("smartTLS")
    dns_server.add(f"smart.{domain}. 60 IN A 127.0.0.57\n")
    path = body(tmp_path)
    url = f"smtp://smart.{domain}:{mx_port}"

    async def main() -> None:
        with Receiver(
            "127.0.0.57", mx_port, tls_context=certs.server_context("elsewhere.test")
        ) as smarthost:
            async with make_engine(dns_server, mx_port, tls_cafile=str(certs.ca_file)) as engine:
                verified = await engine.deliver(
                    request(path, Forward(f"{url}?tls=verify"), "a@x.test")
                )
                encrypted = await engine.deliver(
                    request(path, Forward(f"{url}?tls=encrypt"), "b@x.test")
                )
        assert verified.recipients[0].outcome is Outcome.DEFERRED
        assert "Server certificate not verified" in verified.recipients[0].diagnostic
        assert verified.tls_policy is not None
        assert (verified.tls_policy.level, verified.tls_policy.source) == ("verify", "url")
        assert encrypted.recipients[0].outcome is Outcome.DELIVERED
        assert [(m.rcpt_tos, m.tls) for m in smarthost.messages] == [(["b@x.test"], True)]
        with pytest.raises(ValueError, match="tls must be one of"):
            Forward(f"{url}?tls=sometimes")

    run(main())


def test_a_cached_session_is_reused_only_under_the_same_requirement(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("reuseTLS")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.56"))
    path = body(tmp_path)

    async def main() -> None:
        context = certs.server_context(f"mx.{domain}")
        with Receiver("127.0.0.56", mx_port, tls_context=context) as receiver:
            async with make_engine(
                dns_server, mx_port, tls_cafile=str(certs.ca_file), connection_idle_time=30.0
            ) as engine:
                first = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                again = await engine.deliver(request(path, Relay(domain), f"b@{domain}"))
                # The domain's policy changes (a reload, an MTA-STS policy now in force):
                # the session opened under the old requirement is not used for it.
                engine.policies.domains[domain.lower()] = "verify"
                stricter = await engine.deliver(request(path, Relay(domain), f"c@{domain}"))
        assert (first.reused, again.reused, stricter.reused) == (False, True, False)
        assert stricter.tls_policy is not None and stricter.tls_policy.level == "verify"
        assert stricter.recipients[0].outcome is Outcome.DELIVERED
        assert receiver.starttls == 2 and len(receiver.messages) == 3  # two sessions

    run(main())
