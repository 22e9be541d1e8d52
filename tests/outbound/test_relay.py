"""Relay to a domain's MX hosts: DNS cases, host fallback, replies per recipient.

Real servers on 127.0.0.x, real DNS answers from tests/dns_server.py; nothing mocked.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.dns_server import DNSTestServer
from tests.outbound.helpers import (
    MESSAGE,
    body,
    make_engine,
    new_domain,
    publish_mx,
    request,
    run,
)
from tests.outbound.receivers import RawServer, Receiver, greeting

from mailgate.dns import Resolver
from mailgate.queue.outbound import Outcome, Relay, RemoteMTA


def test_relay_to_the_mx_delivers_the_message_byte_exact(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("relay")
    publish_mx(dns_server, domain, (10, "mx1", "127.0.0.5"))

    async def main() -> None:
        with Receiver("127.0.0.5", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(
                    request(
                        body(tmp_path),
                        Relay(domain),
                        f"bob@{domain}",
                        f"carol@{domain}",
                        queue_id="ABC123",
                        attempt=3,
                    )
                )
        assert [r.outcome for r in result.recipients] == [Outcome.DELIVERED] * 2
        first = result.recipients[0]
        assert first.status == "2.0.0"
        assert first.reply is not None and first.reply.code == 250
        assert first.reply.text == "Ok: queued"
        assert first.remote == RemoteMTA(f"mx1.{domain}", "127.0.0.5", mx_port)
        assert result.remote == first.remote and result.tls is None
        assert not result.reused
        [message] = receiver.messages
        assert message.data == MESSAGE
        assert message.mail_from == "alice@example.org"
        assert message.rcpt_tos == [f"bob@{domain}", f"carol@{domain}"]
        assert f"SIZE={len(MESSAGE)}" in message.mail_options
        assert receiver.ehlo_names == ["outbound.test"]

    run(main())


def test_null_sender_goes_out_as_empty_reverse_path(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("null")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.5"))

    async def main() -> None:
        with Receiver("127.0.0.5", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(
                    request(body(tmp_path), Relay(domain), f"bob@{domain}", sender="")
                )
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert receiver.messages[0].mail_from == "<>"

    run(main())


def test_lowest_preference_first_and_fallback_to_the_next_mx(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("pref")
    # 127.0.0.6 has no server at first: connection refused, so the next MX is tried.
    publish_mx(dns_server, domain, (20, "backup", "127.0.0.7"), (10, "primary", "127.0.0.6"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.7", mx_port) as backup:
            async with make_engine(dns_server, mx_port) as engine:
                down = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
            with Receiver("127.0.0.6", mx_port) as primary:
                async with make_engine(dns_server, mx_port) as engine:
                    up = await engine.deliver(request(path, Relay(domain), f"b@{domain}"))
            async with RawServer("127.0.0.6", mx_port, greeting("421 4.3.2 busy")) as busy:
                async with make_engine(dns_server, mx_port) as engine:
                    greylisted = await engine.deliver(request(path, Relay(domain), f"c@{domain}"))
        assert down.recipients[0].outcome is Outcome.DELIVERED
        assert down.remote is not None and down.remote.host == f"backup.{domain}"
        assert up.remote is not None and up.remote.host == f"primary.{domain}"
        assert [m.rcpt_tos for m in primary.messages] == [[f"b@{domain}"]]
        assert greylisted.remote is not None and greylisted.remote.host == f"backup.{domain}"
        assert busy.connections == 1
        assert [m.rcpt_tos for m in backup.messages] == [[f"a@{domain}"], [f"c@{domain}"]]

    run(main())


def test_equal_preferences_are_tried_in_random_order(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("tie")
    publish_mx(dns_server, domain, (10, "one", "127.0.0.8"), (10, "two", "127.0.0.9"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.8", mx_port) as one, Receiver("127.0.0.9", mx_port) as two:
            for seed in range(12):
                async with make_engine(dns_server, mx_port, rng=random.Random(seed)) as engine:
                    result = await engine.deliver(request(path, Relay(domain), f"x@{domain}"))
                    assert result.recipients[0].outcome is Outcome.DELIVERED
        assert len(one.messages) + len(two.messages) == 12
        assert one.messages and two.messages

    run(main())


def test_domain_without_mx_gets_mail_at_its_address(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("nomx")
    dns_server.add(f"{domain}. 60 IN A 127.0.0.10\n")

    async def main() -> None:
        with Receiver("127.0.0.10", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(request(body(tmp_path), Relay(domain), f"b@{domain}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert result.remote == RemoteMTA(domain, "127.0.0.10", mx_port)
        assert len(receiver.messages) == 1

    run(main())


def test_null_mx_fails_at_once(tmp_path: Path, dns_server: DNSTestServer, mx_port: int) -> None:
    domain = new_domain("nullmx")
    dns_server.add(f"{domain}. 60 IN MX 0 .\n{domain}. 60 IN A 127.0.0.11\n")

    async def main() -> None:
        async with RawServer("127.0.0.11", mx_port, greeting("220 must not be used")) as trap:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(
                    request(body(tmp_path), Relay(domain), f"a@{domain}", f"b@{domain}")
                )
        assert trap.connections == 0
        for outcome in result.recipients:
            assert outcome.outcome is Outcome.FAILED
            assert outcome.status == "5.1.10"
            assert "nullMX" in outcome.diagnostic
            assert outcome.reply is None and outcome.remote is None

    run(main())


def test_nxdomain_fails_and_servfail_defers(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    missing = new_domain("nx")
    broken = new_domain("servfail")
    dns_server.fail(broken)
    # MX hosts that cannot be looked up: one failing (defer), one missing (fail).
    flaky_mx, dead_mx = new_domain("flakymx"), new_domain("deadmx")
    dns_server.add(
        f"{flaky_mx}. 60 IN MX 10 mx.{flaky_mx}.\n{dead_mx}. 60 IN MX 10 mx.{dead_mx}.\n"
    )
    dns_server.fail(f"mx.{flaky_mx}")
    path = body(tmp_path)

    async def main() -> None:
        async with make_engine(dns_server, mx_port) as engine:
            nx = await engine.deliver(request(path, Relay(missing), f"a@{missing}"))
            servfail = await engine.deliver(request(path, Relay(broken), f"a@{broken}"))
            flaky = await engine.deliver(request(path, Relay(flaky_mx), f"a@{flaky_mx}"))
            dead = await engine.deliver(request(path, Relay(dead_mx), f"a@{dead_mx}"))
        assert (nx.recipients[0].outcome, nx.recipients[0].status) == (Outcome.FAILED, "5.1.2")
        assert "not found" in nx.recipients[0].diagnostic
        assert (servfail.recipients[0].outcome, servfail.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.4.3",
        )
        assert (flaky.recipients[0].outcome, flaky.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.4.3",
        )
        assert (dead.recipients[0].outcome, dead.recipients[0].status) == (Outcome.FAILED, "5.4.4")

    run(main())


def test_some_recipients_accepted_some_refused_some_deferred(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("mixed")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.12"))

    async def main() -> None:
        with Receiver("127.0.0.12", mx_port) as receiver:
            receiver.cue.rcpt = {
                f"nobody@{domain}": "550 5.1.1 No such user",
                f"grey@{domain}": "450 4.2.0 Greylisted, try later",
                f"odd@{domain}": "553 bad mailbox name",  # no enhanced code
            }
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(
                    request(
                        body(tmp_path),
                        Relay(domain),
                        f"bob@{domain}",
                        f"nobody@{domain}",
                        f"grey@{domain}",
                        f"odd@{domain}",
                        f"carol@{domain}",
                    )
                )
        outcomes = [(r.outcome, r.status) for r in result.recipients]
        assert outcomes == [
            (Outcome.DELIVERED, "2.0.0"),
            (Outcome.FAILED, "5.1.1"),
            (Outcome.DEFERRED, "4.2.0"),
            (Outcome.FAILED, "5.0.0"),
            (Outcome.DELIVERED, "2.0.0"),
        ]
        refused = result.recipients[1]
        assert refused.reply is not None
        assert (refused.reply.code, refused.reply.enhanced, refused.reply.text) == (
            550,
            "5.1.1",
            "No such user",
        )
        assert refused.diagnostic == (
            f"host mx.{domain}[127.0.0.12] said: 550 5.1.1 No such user "
            "(in reply to RCPT TO command)"
        )
        odd = result.recipients[3]
        assert odd.reply is not None and odd.reply.enhanced is None
        [message] = receiver.messages
        assert message.rcpt_tos == [f"bob@{domain}", f"carol@{domain}"]

    run(main())


def test_reply_to_the_message_applies_to_every_accepted_recipient(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("dataReply")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.13"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.13", mx_port) as receiver:
            receiver.cue.rcpt = {f"nobody@{domain}": "550 5.1.1 No such user"}
            async with make_engine(dns_server, mx_port) as engine:
                receiver.cue.data_reply = "554 5.7.1 Looks like spam"
                spam = await engine.deliver(
                    request(path, Relay(domain), f"a@{domain}", f"nobody@{domain}", f"b@{domain}")
                )
                receiver.cue.data_reply = "451 4.3.0 Try again"
                later = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        assert [(r.outcome, r.status) for r in spam.recipients] == [
            (Outcome.FAILED, "5.7.1"),
            (Outcome.FAILED, "5.1.1"),
            (Outcome.FAILED, "5.7.1"),
        ]
        assert spam.recipients[0].diagnostic.endswith("(in reply to end of DATA command)")
        assert [(r.outcome, r.status) for r in later.recipients] == [(Outcome.DEFERRED, "4.3.0")]
        assert later.reused  # a refused message leaves the session usable

    run(main())


def test_all_recipients_refused_sends_no_message_and_keeps_the_session(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("allRefused")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.14"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.14", mx_port) as receiver:
            receiver.cue.rcpt = {f"nobody@{domain}": "550 5.1.1 No such user"}
            async with make_engine(dns_server, mx_port) as engine:
                refused = await engine.deliver(request(path, Relay(domain), f"nobody@{domain}"))
                fine = await engine.deliver(request(path, Relay(domain), f"bob@{domain}"))
        assert refused.recipients[0].outcome is Outcome.FAILED
        assert fine.recipients[0].outcome is Outcome.DELIVERED and fine.reused
        assert receiver.session_count == 1  # RSET, then the next transaction
        assert [m.rcpt_tos for m in receiver.messages] == [[f"bob@{domain}"]]

    run(main())


def test_5xx_greeting_tries_the_next_mx_before_failing(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    refusing = new_domain("refusing")
    publish_mx(dns_server, refusing, (10, "a", "127.0.0.15"), (20, "b", "127.0.0.16"))
    mixed = new_domain("mixedGreeting")
    publish_mx(dns_server, mixed, (10, "a", "127.0.0.15"), (20, "b", "127.0.0.17"))
    recovering = new_domain("recovering")
    publish_mx(dns_server, recovering, (10, "a", "127.0.0.15"), (20, "b", "127.0.0.18"))
    path = body(tmp_path)

    async def main() -> None:
        go_away = greeting("554 5.7.1 No SMTP service here")
        async with (
            RawServer("127.0.0.15", mx_port, go_away) as first,
            RawServer("127.0.0.16", mx_port, go_away) as second,
            RawServer("127.0.0.17", mx_port, greeting("421 4.7.0 Too busy")) as busy,
        ):
            with Receiver("127.0.0.18", mx_port) as receiver:
                async with make_engine(dns_server, mx_port) as engine:
                    failed = await engine.deliver(request(path, Relay(refusing), f"a@{refusing}"))
                    deferred = await engine.deliver(request(path, Relay(mixed), f"a@{mixed}"))
                    delivered = await engine.deliver(
                        request(path, Relay(recovering), f"a@{recovering}")
                    )
        [fail] = failed.recipients
        assert (fail.outcome, fail.status) == (Outcome.FAILED, "5.7.1")
        assert fail.reply is not None and fail.reply.code == 554
        assert "refused to talk to me" in fail.diagnostic
        assert (first.connections, second.connections) == (3, 1)
        # A temporary refusal anywhere keeps the message: it may be delivered later.
        assert (deferred.recipients[0].outcome, deferred.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.7.0",
        )
        assert busy.connections == 1
        assert delivered.recipients[0].outcome is Outcome.DELIVERED
        assert len(receiver.messages) == 1

    run(main())


def test_dropped_connection_defers_and_is_not_reused(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("drop")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.19"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.19", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                receiver.cue.drop = "rcpt"
                at_rcpt = await engine.deliver(
                    request(path, Relay(domain), f"a@{domain}", f"b@{domain}")
                )
                receiver.cue.drop = "data"
                at_data = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                receiver.cue.drop = None
                fine = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
        for result in (at_rcpt, at_data):
            for outcome in result.recipients:
                assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.4.2")
                assert "lost connection" in outcome.diagnostic
        assert "while sending RCPT TO" in at_rcpt.recipients[0].diagnostic
        assert "while sending the message" in at_data.recipients[0].diagnostic
        assert fine.recipients[0].outcome is Outcome.DELIVERED and not fine.reused
        assert receiver.session_count == 3

    run(main())


def test_permanent_limits_known_before_mail(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    ascii_only = new_domain("asciiOnly")
    publish_mx(dns_server, ascii_only, (10, "mx", "127.0.0.20"))
    small = new_domain("small")
    publish_mx(dns_server, small, (10, "mx", "127.0.0.21"))
    path = body(tmp_path)

    async def main() -> None:
        with (
            Receiver("127.0.0.20", mx_port, smtputf8=False) as old,
            Receiver("127.0.0.21", mx_port, size_limit=100) as tiny,
        ):
            async with make_engine(dns_server, mx_port) as engine:
                utf8 = await engine.deliver(
                    request(path, Relay(ascii_only), f"bj\u00f6rn@{ascii_only}", smtputf8=True)
                )
                too_big = await engine.deliver(request(path, Relay(small), f"a@{small}"))
        assert (utf8.recipients[0].outcome, utf8.recipients[0].status) == (Outcome.FAILED, "5.6.7")
        assert "SMTPUTF8 is required" in utf8.recipients[0].diagnostic
        assert (too_big.recipients[0].outcome, too_big.recipients[0].status) == (
            Outcome.FAILED,
            "5.3.4",
        )
        assert old.messages == [] and tiny.messages == []

    run(main())


def test_address_literal_destination(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    async def main() -> None:
        with Receiver("127.0.0.22", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(
                    request(body(tmp_path), Relay("[127.0.0.22]"), "postmaster@[127.0.0.22]")
                )
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert result.remote == RemoteMTA("[127.0.0.22]", "127.0.0.22", mx_port)
        assert receiver.messages[0].rcpt_tos == ["postmaster@[127.0.0.22]"]

    run(main())


def test_mx_that_is_this_server_is_a_mail_loop(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("loop")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.39"))

    async def main() -> None:
        with Receiver("127.0.0.39", mx_port, name="outbound.test") as myself:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(request(body(tmp_path), Relay(domain), f"a@{domain}"))
        [outcome] = result.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.FAILED, "5.4.6")
        assert "loops back to myself" in outcome.diagnostic
        assert myself.messages == []

    run(main())


def test_next_address_of_the_same_mx_host_after_a_connection_failure(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("addr")
    # 127.0.0.43 has no server: refused, then the host's second address takes it.
    dns_server.add(
        f"{domain}. 60 IN MX 10 mx.{domain}.\n"
        f"mx.{domain}. 60 IN A 127.0.0.43\n"
        f"mx.{domain}. 60 IN A 127.0.0.44\n"
    )

    async def main() -> None:
        with Receiver("127.0.0.44", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(request(body(tmp_path), Relay(domain), f"a@{domain}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert result.remote == RemoteMTA(f"mx.{domain}", "127.0.0.44", mx_port)
        assert len(receiver.messages) == 1

    run(main())


def test_dns_timeout_defers(tmp_path: Path, dns_server: DNSTestServer, mx_port: int) -> None:
    domain = new_domain("slowdns")
    dns_server.hang(domain)

    async def main() -> None:
        engine = make_engine(dns_server, mx_port)
        engine.resolver = Resolver([dns_server.address], timeout=0.5)
        async with engine:
            result = await engine.deliver(request(body(tmp_path), Relay(domain), f"a@{domain}"))
        [outcome] = result.recipients
        assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.4.3")
        assert "temporarily" in outcome.diagnostic

    run(main())
