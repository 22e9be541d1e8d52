"""MTA-STS (RFC 8461) against real receivers and a real HTTPS policy server.

The policy host ``mta-sts.<domain>`` is in the test DNS (127.0.0.63) and serves HTTPS
with a trustme certificate on a free port (``mta_sts_port``); the engine trusts the test
CA through ``tls_cafile``. ``enforce`` + a bad certificate or no STARTTLS: deferred,
nothing in plain text; ``testing``: delivered, with a warning; MX hosts outside the
policy are not used; policies are cached (on disk too) until the id changes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import body, make_engine, new_domain, publish_mx, request, run
from tests.outbound.receivers import Certs, Receiver
from tests.outbound.sts_server import STSServer, policy_text, publish_sts

from mailgate.queue.outbound import Outcome, Relay
from mailgate.queue.outbound.mtasts import PolicyError, parse_policy, parse_txt


def lower_domain(prefix: str) -> str:
    """A fresh test domain, lower-case as host names reach the policy server."""
    return new_domain(prefix).lower()


def engine_for(dns: DNSTestServer, mx_port: int, certs: Certs, sts: STSServer, **options: object):  # type: ignore[no-untyped-def]
    return make_engine(
        dns, mx_port, tls_cafile=str(certs.ca_file), mta_sts_port=sts.port, **options
    )


def test_enforce_delivers_over_verified_tls_and_defers_bad_certificates(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    good = lower_domain("stsGood")
    bad = lower_domain("stsBadCert")
    plain = lower_domain("stsPlain")
    publish_mx(dns_server, good, (10, "mx", "127.0.0.61"))
    publish_mx(dns_server, bad, (10, "mx", "127.0.0.62"))
    publish_mx(dns_server, plain, (10, "mx", "127.0.0.60"))
    for domain in (good, bad, plain):
        publish_sts(dns_server, domain, "1")
    path = body(tmp_path)

    async def main() -> None:
        names = [f"mta-sts.{d}" for d in (good, bad, plain)]
        async with STSServer(certs, names) as sts:
            for domain in (good, bad, plain):
                sts.policies[domain] = policy_text("enforce", f"mx.{domain}")
            with (
                Receiver(
                    "127.0.0.61", mx_port, tls_context=certs.server_context(f"mx.{good}")
                ) as good_mx,
                Receiver(
                    "127.0.0.62", mx_port, tls_context=certs.server_context("other.test")
                ) as bad_mx,
                Receiver("127.0.0.60", mx_port) as plain_mx,
            ):
                async with engine_for(dns_server, mx_port, certs, sts) as engine:
                    delivered = await engine.deliver(request(path, Relay(good), f"a@{good}"))
                    wrong = await engine.deliver(request(path, Relay(bad), f"a@{bad}"))
                    cleartext = await engine.deliver(request(path, Relay(plain), f"a@{plain}"))
        assert delivered.recipients[0].outcome is Outcome.DELIVERED
        assert delivered.tls is not None
        assert (delivered.tls.verified, delivered.tls.method) == (True, "mta-sts")
        assert delivered.tls_policy is not None
        assert delivered.tls_policy.source == "mta-sts"
        assert delivered.tls_policy.mode == "verify"
        assert f"MTA-STS policy 1 of {good} (enforce)" in delivered.tls_policy.reason
        assert [m.tls for m in good_mx.messages] == [True]
        # A certificate for another name: deferred, and nothing sent at all.
        [refused] = wrong.recipients
        assert (refused.outcome, refused.status) == (Outcome.DEFERRED, "4.7.5")
        assert "Server certificate not verified" in refused.diagnostic
        assert bad_mx.messages == []
        # No STARTTLS: deferred, never plain text.
        [unencrypted] = cleartext.recipients
        assert (unencrypted.outcome, unencrypted.status) == (Outcome.DEFERRED, "4.7.4")
        assert plain_mx.messages == []

    run(main())


def test_testing_mode_delivers_and_logs_what_would_have_failed(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    certs: Certs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = lower_domain("stsTesting")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.62"), (20, "other", "127.0.0.60"))
    publish_sts(dns_server, domain, "t1")
    path = body(tmp_path)

    async def main() -> None:
        async with STSServer(certs, [f"mta-sts.{domain}"]) as sts:
            sts.policies[domain] = policy_text("testing", f"other.{domain}")
            with (
                Receiver(
                    "127.0.0.62", mx_port, tls_context=certs.server_context("other.test")
                ) as bad_mx,
                Receiver("127.0.0.60", mx_port),
            ):
                async with engine_for(
                    dns_server, mx_port, certs, sts, connection_reuse_count=1
                ) as engine:
                    result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                    again = await engine.deliver(request(path, Relay(domain), f"b@{domain}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert again.recipients[0].outcome is Outcome.DELIVERED
        assert result.tls is not None and not result.tls.verified
        assert result.tls_policy is not None
        assert (result.tls_policy.level, result.tls_policy.mode) == ("mta-sts", "may")
        assert [m.tls for m in bad_mx.messages] == [True, True]

    with caplog.at_level(logging.WARNING, logger="mailgate.queue.outbound"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Each said once, though two deliveries (two sessions) met the same problems.
    assert sum(f"MX host mx.{domain} is not in the MTA-STS policy" in w for w in warnings) == 1
    assert (
        sum(
            "certificate not verified" in w and "(testing: delivered anyway)" in w for w in warnings
        )
        == 1
    )


def test_mx_hosts_outside_the_policy_are_not_used(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = lower_domain("stsMX")
    # The best MX is not in the policy (and has a fine certificate): skipped.
    publish_mx(dns_server, domain, (10, "rogue", "127.0.0.62"), (20, "mx1", "127.0.0.61"))
    nowhere = lower_domain("stsNoMX")
    publish_mx(dns_server, nowhere, (10, "rogue", "127.0.0.62"))
    publish_sts(dns_server, domain, "m1")
    publish_sts(dns_server, nowhere, "m1")
    path = body(tmp_path)

    async def main() -> None:
        async with STSServer(certs, [f"mta-sts.{domain}", f"mta-sts.{nowhere}"]) as sts:
            sts.policies[domain] = policy_text("enforce", f"*.{domain}.invalid", f"mx1.{domain}")
            sts.policies[nowhere] = policy_text("enforce", f"*.{domain}")
            with (
                Receiver(
                    "127.0.0.62",
                    mx_port,
                    tls_context=certs.server_context(f"rogue.{domain}", f"rogue.{nowhere}"),
                ) as rogue,
                Receiver(
                    "127.0.0.61", mx_port, tls_context=certs.server_context(f"*.{domain}")
                ) as listed,
            ):
                async with engine_for(dns_server, mx_port, certs, sts) as engine:
                    result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                    none_left = await engine.deliver(request(path, Relay(nowhere), f"a@{nowhere}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert result.remote is not None and result.remote.host == f"mx1.{domain}"
        assert result.tls is not None and result.tls.method == "mta-sts"  # wildcard cert
        assert rogue.session_count == 0 and rogue.messages == []
        assert [m.tls for m in listed.messages] == [True]
        [deferred] = none_left.recipients
        assert (deferred.outcome, deferred.status) == (Outcome.DEFERRED, "4.7.5")
        assert "is allowed by MTA-STS policy m1" in deferred.diagnostic

    run(main())


def test_policies_are_cached_on_disk_until_the_id_changes(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = lower_domain("stsCache")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.61"))
    publish_sts(dns_server, domain, "c1")
    path = body(tmp_path)
    cache = tmp_path / "mta-sts.json"

    async def main() -> None:
        async with STSServer(certs, [f"mta-sts.{domain}"]) as sts:
            sts.policies[domain] = policy_text("enforce", f"mx.{domain}")
            context = certs.server_context(f"mx.{domain}")
            with Receiver("127.0.0.61", mx_port, tls_context=context) as mx:
                async with engine_for(
                    dns_server, mx_port, certs, sts, mta_sts_cache_file=str(cache)
                ) as engine:
                    for n in range(3):
                        result = await engine.deliver(
                            request(path, Relay(domain), f"r{n}@{domain}")
                        )
                        assert result.recipients[0].outcome is Outcome.DELIVERED
                assert sts.fetches[domain] == 1
                assert domain in cache.read_text()
                # A restarted engine (a new resolver, no memory) reads the file.
                async with engine_for(
                    dns_server, mx_port, certs, sts, mta_sts_cache_file=str(cache)
                ) as engine:
                    result = await engine.deliver(request(path, Relay(domain), f"s@{domain}"))
                    assert result.tls_policy is not None
                    assert "policy c1" in result.tls_policy.reason
                assert sts.fetches[domain] == 1
                # A new id: fetched again (now in testing mode).
                publish_sts(dns_server, domain, "c2")
                sts.policies[domain] = policy_text("testing", f"mx.{domain}")
                async with engine_for(
                    dns_server, mx_port, certs, sts, mta_sts_cache_file=str(cache)
                ) as engine:
                    result = await engine.deliver(request(path, Relay(domain), f"t@{domain}"))
                    assert result.tls_policy is not None
                    assert "policy c2 of" in result.tls_policy.reason
                    assert "(testing)" in result.tls_policy.reason
                assert sts.fetches[domain] == 2
            assert len(mx.messages) == 5

    run(main())


def test_a_policy_that_cannot_be_fetched_leaves_opportunistic_tls(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = lower_domain("stsMissing")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.60"))
    publish_sts(dns_server, domain, "x1")  # TXT says yes, the server has no policy (404)
    off = lower_domain("stsOff")
    publish_mx(dns_server, off, (10, "mx", "127.0.0.60"))
    publish_sts(dns_server, off, "o1")
    # The policy host's certificate does not name mta-sts.<this domain>: no policy.
    untrusted = lower_domain("stsWrongHTTPS")
    publish_mx(dns_server, untrusted, (10, "mx", "127.0.0.60"))
    publish_sts(dns_server, untrusted, "u1")
    path = body(tmp_path)

    async def main() -> None:
        async with STSServer(certs, [f"mta-sts.{domain}", f"mta-sts.{off}"]) as sts:
            sts.policies[off] = policy_text("enforce", f"nomatch.{off}")
            sts.policies[untrusted] = policy_text("enforce", f"nomatch.{untrusted}")
            with Receiver("127.0.0.60", mx_port) as plain_mx:
                async with engine_for(dns_server, mx_port, certs, sts) as engine:
                    missing = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                    bad_https = await engine.deliver(
                        request(path, Relay(untrusted), f"a@{untrusted}")
                    )
                async with engine_for(dns_server, mx_port, certs, sts, mta_sts=False) as engine:
                    switched_off = await engine.deliver(request(path, Relay(off), f"a@{off}"))
                async with engine_for(
                    dns_server, mx_port, certs, sts, mta_sts=False, tls_policy="mta-sts"
                ) as engine:
                    explicit = await engine.deliver(request(path, Relay(off), f"b@{off}"))
        assert missing.recipients[0].outcome is Outcome.DELIVERED
        assert missing.tls_policy is not None and missing.tls_policy.level == "may"
        assert sts.fetches[domain] == 1
        assert bad_https.recipients[0].outcome is Outcome.DELIVERED
        assert sts.fetches[untrusted] == 0  # the handshake failed before any request
        # mta_sts = false: the policy is not even asked for.
        assert switched_off.recipients[0].outcome is Outcome.DELIVERED
        # ...unless the level is mta-sts: then the enforce policy rules the MX out.
        assert explicit.recipients[0].outcome is Outcome.DEFERRED
        assert sts.fetches[off] == 1
        assert [m.rcpt_tos for m in plain_mx.messages] == [
            [f"a@{domain}"],
            [f"a@{untrusted}"],
            [f"a@{off}"],
        ]

    run(main())


def test_txt_records_and_policy_files_are_read_as_rfc_8461_says() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["something else", "v=STSv1; id=a1; ext=x"]) == "a1"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: none
    assert parse_txt(["v=STSv1; id=not-alnum"]) is None
    assert parse_txt([]) is None
    text = (
        "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 604800\n"
    )
    assert parse_policy(text) == ("enforce", ("mail.example.com", "*.example.net"), 604800)
    assert parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 9999999999\r\n")[2] <= 31557600
    for broken in (
        "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.b\n",
        "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: soon\n",
        "<html>not a policy</html>",
    ):
        with pytest.raises(PolicyError):
            parse_policy(broken)


def test_concurrent_deliveries_share_one_fetch(
    dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = lower_domain("stsOnce")
    publish_sts(dns_server, domain, "once")

    async def main() -> None:
        async with STSServer(certs, [f"mta-sts.{domain}"]) as sts:
            sts.policies[domain] = policy_text("testing", f"mx.{domain}")
            async with engine_for(dns_server, mx_port, certs, sts) as engine:
                found = await asyncio.gather(*(engine.mta_sts.policy(domain) for _ in range(8)))
        assert {policy.id for policy in found if policy is not None} == {"once"}
        assert all(policy is found[0] for policy in found)
        assert sts.fetches[domain] == 1

    run(main())
