"""Client checks against the suite's real DNS server: reverse DNS, FCrDNS, the HELO name and
the sender's domain, with each action (reject, tempfail, annotate), DNS failures that must
never give a 5xx, and the clients that are not checked.

Clients connect from 127.0.4.N (only this file uses 127.0.4.0/24); each test takes fresh
N values, because the PTR names N.4.0.127.in-addr.arpa live as long as the DNS server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import smtplib
import time
from typing import Any

import pytest
from tests.dns_server import DNSTestServer, unique

from mailgate import Server
from mailgate.config import options_from_settings
from mailgate.dns import Resolver
from mailgate.hooks import Address, Envelope, Reject, Session, TempFail
from mailgate.plugins.client_checks import (
    HEADER,
    NOTE_FCRDNS,
    NOTE_HOSTNAME,
    NOTE_PTR,
    NOTE_PTR_NAMES,
    NOTE_PTR_RESULT,
    TABLE_DEFAULTS,
    ClientChecks,
    helo_kind,
    literal_address,
    plugins_from_options,
)
from mailgate.plugins.policy import ANNOTATIONS, DECISIONS, PolicyConfigError, PolicyEnv
from mailgate.server.errors import StartupError
from mailgate.testing import running_server

_hosts = itertools.count(2)
HELO = "client.example.org"
MESSAGE = b"Subject: client checks\r\n\r\nhello\r\n"
ALL_OFF = dict.fromkeys(TABLE_DEFAULTS, "off")


def client_ip() -> str:
    n = next(_hosts)
    assert n < 255, "out of 127.0.4.x addresses"
    return f"127.0.4.{n}"


def ptr_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@pytest.fixture(scope="module")
def sender(dns_server: DNSTestServer) -> str:
    """A sender address whose domain has an MX."""
    domain = f"{unique('sender')}.test"
    dns_server.add(f"{domain}. 60 IN MX 10 mx.{domain}.\nmx.{domain}. 60 IN A 192.0.2.25")
    return f"alice@{domain}"


def settings(dns_server: DNSTestServer, **checks: str) -> dict[str, Any]:
    """Server settings with only the given checks on."""
    return {
        "client_checks": {**ALL_OFF, **checks},
        "dns_nameservers": [dns_server.address],
        "dns_timeout": 1,
        "local_domains": ["example.com"],
        "relay_networks": [],
        "hostname": "mx.example.net",
    }


def with_ptr(dns_server: DNSTestServer, ip: str, *, resolves_to: str | None = None) -> str:
    """Give ``ip`` a PTR name (fresh), whose A record is ``resolves_to`` if given."""
    host = f"host.{unique('ptr')}.test"
    dns_server.add(f"{ptr_name(ip)}. 60 IN PTR {host}.")
    if resolves_to is not None:
        dns_server.add(f"{host}. 60 IN A {resolves_to}")
    return host


def converse(
    srv: Any,
    ip: str,
    sender: str,
    *,
    helo: str = HELO,
    rcpt: str = "user@example.com",
    login: tuple[str, str] | None = None,
) -> tuple[int, str]:
    """One transaction; the first reply that is not a success, or the end of data's."""
    with smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10) as smtp:
        code, text = smtp.ehlo(helo)
        if code != 250:
            return code, text.decode()
        if login is not None:
            smtp.login(*login)
        code, text = smtp.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = smtp.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = smtp.data(MESSAGE)
        return code, text.decode()


class Recorder:
    """``configure=`` for running_server: steps added in code run after the policy plugins,
    so they see session.notes at RCPT and each message with the headers the policy added.
    (The test server's own capture keeps the bytes as they arrived, before any header.)"""

    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []
        self.headers: list[list[str]] = []

    def __call__(self, server: Server) -> None:
        @server.on_rcpt
        def record(session: Session, envelope: Envelope, address: Address) -> None:
            self.notes.append(dict(session.notes))

        @server.on_message
        async def headers(session: Session, envelope: Envelope, message: Any) -> None:
            parsed = await asyncio.to_thread(message.as_email)
            # unfolded: a long value was folded, which leaves a tab where the break was
            values = parsed.get_all(HEADER, [])
            self.headers.append([" ".join(str(value).split()) for value in values])


# --- reverse DNS -------------------------------------------------------------------------------


def test_no_ptr_tempfail_is_450_4_7_25_at_rcpt(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    with running_server(**settings(dns_server, reverse_dns="tempfail")) as srv:
        code, text = converse(srv, ip, sender)
    assert code == 450
    assert text == f"4.7.25 Client host rejected: cannot find your reverse hostname, [{ip}]"


def test_no_ptr_reject_is_550_5_7_25_and_logged(
    dns_server: DNSTestServer, sender: str, caplog: pytest.LogCaptureFixture
) -> None:
    ip = client_ip()
    caplog.set_level(logging.INFO, logger="mailgate.policy")
    before = DECISIONS[("client-checks", "reject")]
    with running_server(**settings(dns_server, reverse_dns="reject")) as srv:
        code, text = converse(srv, ip, sender)
    assert (code, text.split(" ")[0]) == (550, "5.7.25")
    assert DECISIONS[("client-checks", "reject")] == before + 1
    [record] = [r for r in caplog.records if getattr(r, "policy", None) == "client-checks"]
    assert "policy client-checks: reject (reverse_dns=none: no PTR record for" in (
        record.getMessage()
    )
    assert record.rcpt == "user@example.com" and record.sender == sender  # type: ignore[attr-defined]


def test_no_ptr_annotate_adds_a_header(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    rec = Recorder()
    with running_server(**settings(dns_server, reverse_dns="annotate"), configure=rec) as srv:
        assert converse(srv, ip, sender)[0] == 250
    assert rec.headers == [[f"reverse_dns=none; no PTR record for {ip}"]]


def test_ptr_present_passes_and_is_noted(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    host = with_ptr(dns_server, ip)
    rec = Recorder()
    seen = rec.notes
    with running_server(**settings(dns_server, reverse_dns="reject"), configure=rec) as srv:
        assert converse(srv, ip, sender)[0] == 250
    assert rec.headers == [[]]
    assert seen[0][NOTE_PTR] == host
    assert seen[0][NOTE_PTR_NAMES] == (host,)
    assert seen[0][NOTE_PTR_RESULT] == "pass"
    assert NOTE_FCRDNS not in seen[0]  # not asked for: no forward lookups made


def test_reverse_lookups_are_cached_across_connections(
    dns_server: DNSTestServer, sender: str
) -> None:
    ip = client_ip()
    host = with_ptr(dns_server, ip, resolves_to=ip)
    checks = settings(dns_server, reverse_dns="reject", forward_confirmed="reject")
    with running_server(**checks) as srv:
        assert converse(srv, ip, sender)[0] == 250
        assert converse(srv, ip, sender)[0] == 250
    assert dns_server.asked(ptr_name(ip)) == 1
    assert dns_server.asked(host) == 1


# --- forward-confirmed reverse DNS -------------------------------------------------------------


def test_fcrdns_pass(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    host = with_ptr(dns_server, ip, resolves_to=ip)
    rec = Recorder()
    seen = rec.notes
    with running_server(**settings(dns_server, forward_confirmed="reject"), configure=rec) as srv:
        assert converse(srv, ip, sender)[0] == 250
    assert seen[0][NOTE_FCRDNS] is True
    assert seen[0][NOTE_HOSTNAME] == host


def test_fcrdns_one_of_several_ptr_names_is_enough(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    with_ptr(dns_server, ip, resolves_to="192.0.2.7")
    good = with_ptr(dns_server, ip, resolves_to=ip)
    rec = Recorder()
    seen = rec.notes
    with running_server(**settings(dns_server, forward_confirmed="reject"), configure=rec) as srv:
        assert converse(srv, ip, sender)[0] == 250
    assert len(seen[0][NOTE_PTR_NAMES]) == 2
    assert seen[0][NOTE_HOSTNAME] == good


def test_fcrdns_fail_reject_and_annotate(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    host = with_ptr(dns_server, ip, resolves_to="192.0.2.7")
    with running_server(**settings(dns_server, forward_confirmed="reject")) as srv:
        code, text = converse(srv, ip, sender)
    assert code == 550
    assert text == f"5.7.25 Client host rejected: cannot find your hostname, [{ip}]"

    ip = client_ip()
    host = with_ptr(dns_server, ip)  # no address at all
    rec = Recorder()
    seen = rec.notes
    with running_server(
        **settings(dns_server, forward_confirmed="annotate", reverse_dns="reject"), configure=rec
    ) as srv:
        assert converse(srv, ip, sender)[0] == 250
    assert rec.headers == [[f"forward_confirmed=fail; PTR {host} does not resolve back to {ip}"]]
    assert seen[0][NOTE_FCRDNS] is False and seen[0][NOTE_HOSTNAME] is None


def test_no_ptr_fails_fcrdns_too(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    with running_server(
        **settings(dns_server, reverse_dns="annotate", forward_confirmed="tempfail")
    ) as srv:
        code, text = converse(srv, ip, sender)
    assert (code, text.split(" ")[0]) == (450, "4.7.25")
    assert "cannot find your hostname" in text


# --- DNS failures never give a 5xx ------------------------------------------------------------


def test_ptr_servfail_is_451_even_when_the_action_is_reject(
    dns_server: DNSTestServer, sender: str
) -> None:
    ip = client_ip()
    dns_server.fail(ptr_name(ip))
    checks = settings(dns_server, reverse_dns="reject", forward_confirmed="reject")
    with running_server(**checks) as srv:
        code, text = converse(srv, ip, sender)
    assert code == 451
    assert text == f"4.4.3 Temporary DNS failure looking up your hostname [{ip}], try again later"


def test_ptr_servfail_with_annotate_goes_through(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    dns_server.fail(ptr_name(ip))
    before = DECISIONS[("client-checks", "error")]
    rec = Recorder()
    with running_server(**settings(dns_server, reverse_dns="annotate"), configure=rec) as srv:
        assert converse(srv, ip, sender)[0] == 250
    [[value]] = rec.headers
    assert value.startswith("reverse_dns=temperror; PTR lookup for")
    assert DECISIONS[("client-checks", "error")] == before + 1


def test_forward_lookup_servfail_is_451(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    host = with_ptr(dns_server, ip)
    dns_server.fail(host)
    with running_server(**settings(dns_server, forward_confirmed="reject")) as srv:
        code, text = converse(srv, ip, sender)
    assert (code, text.split(" ")[0]) == (451, "4.4.3")


def test_ptr_timeout_does_not_delay_the_banner_and_is_a_451(
    dns_server: DNSTestServer, sender: str
) -> None:
    ip = client_ip()
    dns_server.hang(ptr_name(ip))
    with running_server(**settings(dns_server, reverse_dns="reject")) as srv:
        started = time.monotonic()
        with smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10) as smtp:
            banner_after = time.monotonic() - started
            smtp.ehlo(HELO)
            assert smtp.mail(sender)[0] == 250
            code, text = smtp.rcpt("user@example.com")
            answered_after = time.monotonic() - started
    assert banner_after < 0.5  # the lookup runs in the background
    assert (code, text.split(b" ")[0]) == (451, b"4.4.3")
    assert answered_after < 4  # dns_timeout=1, not the DNS server's 5 s


def test_hanging_lookup_is_cancelled_at_close() -> None:
    async def main() -> None:
        class Hanging:
            cancelled = False

            async def ptr(self, ip: str) -> list[str]:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    Hanging.cancelled = True
                    raise
                return []

        plugin = ClientChecks(reverse_dns="reject", resolver=Hanging(), relay_networks=[])  # type: ignore[arg-type]
        session = Session(
            id="t", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
        )
        await plugin.on_connect(session)
        assert len(plugin._tasks) == 1
        await asyncio.sleep(0)
        await plugin.on_close(session)
        await asyncio.sleep(0.01)
        assert Hanging.cancelled and not plugin._tasks
        # a session the server never closed: aclose cancels its lookup
        other = Session(
            id="u", peer_host="192.0.2.2", peer_port=1, local_host="127.0.0.1", local_port=25
        )
        await plugin.on_connect(other)
        await plugin.aclose()
        assert not plugin._tasks

    asyncio.run(main())


def test_a_broken_resolver_is_a_451_not_a_crash() -> None:
    async def main() -> None:
        class Broken:
            async def ptr(self, ip: str) -> list[str]:
                raise RuntimeError("boom")

            async def mx(self, name: str) -> list[tuple[int, str]]:
                return []

        plugin = ClientChecks(reverse_dns="reject", resolver=Broken(), relay_networks=[])  # type: ignore[arg-type]
        session = Session(
            id="t", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
        )
        await plugin.on_connect(session)
        with pytest.raises(TempFail) as info:
            await plugin.on_rcpt(session, Envelope(Address("a@b.test")), Address("u@example.com"))
        assert (info.value.code, info.value.enhanced) == (451, "4.4.3")
        assert session.notes[NOTE_PTR_RESULT] == "temperror" and session.notes[NOTE_PTR] is None

    asyncio.run(main())


# --- HELO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("mail.example.org", "hostname"),
        ("mail.example.org.", "hostname"),
        ("localhost", "hostname"),
        ("DESKTOP_4F2.corp.example", "hostname"),
        ("xn--bcher-kva.example", "hostname"),
        ("bücher.example", "hostname"),
        ("a" * 63 + ".example", "hostname"),
        ("[192.0.2.1]", "literal"),
        ("[IPv6:2001:db8::1]", "literal"),
        ("[ipv6:::ffff:192.0.2.1]", "literal"),
        ("192.0.2.1", "address"),
        ("2001:db8::1", "address"),
        ("a" * 64 + ".example", "invalid"),
        ("-mail.example.org", "invalid"),
        ("mail-.example.org", "invalid"),
        ("mail..example.org", "invalid"),
        (".example.org", "invalid"),
        ("mail.example.123", "invalid"),
        ("1.2.3.999", "invalid"),
        ("mail!.example", "invalid"),
        ("[192.0.2.256]", "invalid"),
        ("[2001:db8::1]", "invalid"),
        ("[IPv6:fe80::1%eth0]", "invalid"),
        ("[x400:whatever]", "invalid"),
        ("[]", "invalid"),
        (".", "invalid"),
        ("a." * 127 + "example", "invalid"),
    ],
)
def test_helo_kind(name: str, kind: str) -> None:
    assert helo_kind(name) == kind


def test_literal_address() -> None:
    assert str(literal_address("[IPv6:2001:DB8::1]")) == "2001:db8::1"
    assert literal_address("192.0.2.1") is None


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("-bad-.example", "501 5.5.2 <-bad-.example>: Helo command rejected: Invalid name"),
        ("192.0.2.1", "501 5.5.2 <192.0.2.1>: Helo command rejected: Invalid name"),
        (
            "mx.example.net",
            "550 5.7.1 <mx.example.net>: Helo command rejected: that is my own name",
        ),
        ("EXAMPLE.COM.", "550 5.7.1 <EXAMPLE.COM.>: Helo command rejected: that is my own name"),
        (
            "[127.0.0.1]",
            "550 5.7.1 <[127.0.0.1]>: Helo command rejected: that is my own address",
        ),
        ("mybox", "504 5.5.2 <mybox>: Helo command rejected: need fully-qualified hostname"),
        ("under_score.example.org", "250"),
    ],
)
def test_helo_checks_refuse_at_rcpt(
    dns_server: DNSTestServer, sender: str, helo: str, expected: str
) -> None:
    ip = client_ip()
    checks = settings(dns_server, helo_syntax="reject", helo_is_us="reject", helo_fqdn="reject")
    with running_server(**checks) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10) as smtp:
            assert smtp.ehlo(helo)[0] == 250  # refused later, when AUTH may have happened
            assert smtp.mail(sender)[0] == 250
            code, text = smtp.rcpt("user@example.com")
    assert f"{code} {text.decode()}".startswith(expected)


def test_helo_own_address_literal_of_the_client_is_fine(
    dns_server: DNSTestServer, sender: str
) -> None:
    ip = client_ip()
    checks = settings(dns_server, helo_syntax="reject", helo_is_us="reject", helo_fqdn="reject")
    with running_server(**checks) as srv:
        assert converse(srv, ip, sender, helo=f"[{ip}]")[0] == 250


def test_helo_tempfail_and_annotate(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    with running_server(**settings(dns_server, helo_fqdn="tempfail")) as srv:
        code, text = converse(srv, ip, sender, helo="mybox")
    assert (code, text.split(" ")[0]) == (450, "4.5.2")
    rec = Recorder()
    checks = settings(dns_server, helo_fqdn="annotate", helo_syntax="annotate")
    with running_server(**checks, configure=rec) as srv:
        assert converse(srv, ip, sender, helo="my_box")[0] == 250
    assert rec.headers == [["helo_fqdn=fail; HELO my_box is not a fully-qualified hostname"]]


def test_the_strongest_refusal_wins(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    checks = settings(dns_server, reverse_dns="tempfail", helo_fqdn="reject")
    with running_server(**checks) as srv:
        code, _ = converse(srv, ip, sender, helo="mybox")
    assert code == 504


def test_new_ehlo_replaces_the_helo_annotation(dns_server: DNSTestServer, sender: str) -> None:
    ip = client_ip()
    rec = Recorder()
    with running_server(**settings(dns_server, helo_fqdn="annotate"), configure=rec) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10) as smtp:
            smtp.ehlo("mybox")
            smtp.sendmail(sender, ["user@example.com"], MESSAGE)
            smtp.ehlo("mybox.example.org")
            smtp.sendmail(sender, ["user@example.com"], MESSAGE)
    assert rec.headers == [["helo_fqdn=fail; HELO mybox is not a fully-qualified hostname"], []]


# --- sender domain -------------------------------------------------------------------------------


def test_sender_domain_with_mx_or_only_an_address(dns_server: DNSTestServer, sender: str) -> None:
    only_a, only_aaaa = f"{unique('a')}.test", f"{unique('aaaa')}.test"
    dns_server.add(f"{only_a}. 60 IN A 192.0.2.1\n{only_aaaa}. 60 IN AAAA 2001:db8::1")
    with running_server(**settings(dns_server, sender_domain="reject")) as srv:
        ip = client_ip()
        assert converse(srv, ip, sender)[0] == 250
        assert converse(srv, ip, f"bob@{only_a}")[0] == 250
        assert converse(srv, ip, f"bob@{only_aaaa.upper()}")[0] == 250
        assert converse(srv, ip, "")[0] == 250  # the null sender has no domain to check
        assert converse(srv, ip, "bob@[192.0.2.1]")[0] == 250


def test_sender_domain_not_found(dns_server: DNSTestServer) -> None:
    missing = f"bob@{unique('gone')}.test"
    with running_server(**settings(dns_server, sender_domain="reject")) as srv:
        code, text = converse(srv, client_ip(), missing)
    assert code == 550
    assert text == f"5.1.8 <{missing}>: Sender address rejected: Domain not found"
    with running_server(**settings(dns_server, sender_domain="tempfail")) as srv:
        code, text = converse(srv, client_ip(), missing)
    assert (code, text.split(" ")[0]) == (450, "4.1.8")


def test_sender_domain_null_mx(dns_server: DNSTestServer) -> None:
    domain = f"{unique('nullmx')}.test"
    dns_server.add(f"{domain}. 60 IN MX 0 .\n{domain}. 60 IN A 192.0.2.1")
    with running_server(**settings(dns_server, sender_domain="reject")) as srv:
        code, text = converse(srv, client_ip(), f"bob@{domain}")
    assert code == 550
    assert text == f"5.7.27 <bob@{domain}>: Sender address rejected: Domain does not accept mail"


def test_sender_domain_servfail(dns_server: DNSTestServer) -> None:
    domain = f"{unique('broken')}.test"
    dns_server.fail(domain)
    with running_server(**settings(dns_server, sender_domain="reject")) as srv:
        code, text = converse(srv, client_ip(), f"bob@{domain}")
    assert (code, text.split(" ")[0]) == (451, "4.4.3")
    rec = Recorder()
    with running_server(**settings(dns_server, sender_domain="annotate"), configure=rec) as srv:
        assert converse(srv, client_ip(), f"bob@{domain}")[0] == 250
    [[value]] = rec.headers
    assert value.startswith(f"sender_domain=temperror; lookup of {domain} failed")


def test_sender_domain_annotation_is_per_transaction(
    dns_server: DNSTestServer, sender: str
) -> None:
    missing = f"bob@{unique('gone')}.test"
    rec = Recorder()
    with running_server(**settings(dns_server, sender_domain="annotate"), configure=rec) as srv:
        with smtplib.SMTP(srv.host, srv.port, source_address=(client_ip(), 0), timeout=10) as smtp:
            smtp.ehlo(HELO)
            smtp.sendmail(missing, ["user@example.com"], MESSAGE)
            smtp.sendmail(sender, ["user@example.com"], MESSAGE)
    domain = missing.split("@")[1]
    assert rec.headers == [[f"sender_domain=notfound; {domain} has no MX, A or AAAA record"], []]


# --- who is not checked ------------------------------------------------------------------------


def test_relay_networks_are_not_checked(dns_server: DNSTestServer) -> None:
    checks = {
        **settings(dns_server, **{check: "reject" for check in TABLE_DEFAULTS}),
        "relay_networks": ["127.0.4.0/24"],
    }
    with running_server(**checks) as srv:
        code, _ = converse(srv, client_ip(), f"bob@{unique('gone')}.test", helo="[127.0.0.1]")
    assert code == 250


def test_authenticated_clients_are_not_checked(dns_server: DNSTestServer) -> None:
    checks = {
        **settings(dns_server, **{check: "reject" for check in TABLE_DEFAULTS}),
        "auth_users": ["alice:s3cret"],
        "allow_insecure_auth": True,
        "auth_failure_delay": 0,
    }
    missing = f"bob@{unique('gone')}.test"
    ip = client_ip()
    with running_server(**checks) as srv:
        assert converse(srv, ip, missing, helo="my_box", login=("alice", "s3cret"))[0] == 250
        assert converse(srv, ip, missing, helo="my_box")[0] == 550


def test_allow_listed_clients_are_not_checked(sender: str) -> None:
    async def main() -> None:
        plugin = ClientChecks(helo_syntax="reject", relay_networks=[])
        session = Session(
            id="t", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
        )
        session.helo = "bad..name"
        session.notes["policy.allowlisted"] = "lists: trusted partner"
        await plugin.on_rcpt(session, Envelope(Address(sender)), Address("u@example.com"))
        del session.notes["policy.allowlisted"]
        with pytest.raises(Reject):
            await plugin.on_rcpt(session, Envelope(Address(sender)), Address("u@example.com"))

    asyncio.run(main())


# --- IPv6, from code, configuration ------------------------------------------------------------


def test_fcrdns_over_ipv6(dns_server: DNSTestServer) -> None:
    async def main() -> None:
        ip = "2001:db8:c11e:4::17"
        host = f"host.{unique('v6')}.test"
        reverse = ".".join(reversed("20010db8c11e00040000000000000017"))
        dns_server.add(f"{reverse}.ip6.arpa. 60 IN PTR {host}.\n{host}. 60 IN AAAA {ip}")
        resolver = Resolver([dns_server.address], timeout=1)
        plugin = ClientChecks(forward_confirmed="reject", resolver=resolver, relay_networks=[])
        session = Session(id="t", peer_host=ip, peer_port=1, local_host="::1", local_port=25)
        session.helo = "[IPv6:::1]"
        await plugin.on_connect(session)
        await plugin.on_rcpt(session, Envelope(Address("a@b.test")), Address("u@example.com"))
        assert session.notes[NOTE_HOSTNAME] == host and session.notes[NOTE_FCRDNS] is True
        claims = ClientChecks(helo_is_us="reject", relay_networks=[])
        with pytest.raises(Reject, match="my own address"):
            await claims.on_rcpt(session, Envelope(Address("a@b.test")), Address("u@example.com"))

    asyncio.run(main())


def test_plugin_added_in_code(dns_server: DNSTestServer, sender: str) -> None:
    def configure(server: Any) -> None:
        server.add_plugin(ClientChecks(helo_fqdn="reject", relay_networks=[]))

    with running_server(configure=configure) as srv:
        code, _ = converse(srv, client_ip(), sender, helo="mybox")
        assert code == 504
        assert converse(srv, client_ip(), sender)[0] == 250


def env_for(**settings: Any) -> PolicyEnv:
    return PolicyEnv(options_from_settings(settings))


def test_plugins_from_options() -> None:
    assert plugins_from_options(env_for()) == []
    assert plugins_from_options(env_for(client_checks=ALL_OFF)) == []
    assert plugins_from_options(env_for(client_checks={}, lmtp=True)) == []
    [plugin] = plugins_from_options(
        env_for(client_checks={"helo_fqdn": "Annotate"}, hostname="mx.example.net")
    )
    assert plugin.name == "client-checks"
    assert plugin.actions == {**TABLE_DEFAULTS, "helo_fqdn": "annotate"}
    assert "mx.example.net" in plugin.our_names


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"reverse_dns": "bounce"}, " reverse_dns: 'bounce' is not one of off, annotate"),
        ({"helo_fqnd": "reject"}, ": unknown key 'helo_fqnd' (did you mean 'helo_fqdn'?)"),
        ({"sender_domain": True}, " sender_domain: expected a string, got True"),
    ],
)
def test_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyConfigError, match=re.escape(f"setting [client_checks]{message}")):
        plugins_from_options(env_for(client_checks=table))


def test_config_error_stops_the_server() -> None:
    with pytest.raises(StartupError, match=r"\[client_checks\] helo_syntax"):
        with running_server(client_checks={"helo_syntax": "maybe"}):
            pass  # pragma: no cover


def test_bad_action_in_code() -> None:
    with pytest.raises(ValueError, match="helo_is_us"):
        ClientChecks(helo_is_us="block")


def test_annotations_are_kept_apart_from_other_policies() -> None:
    async def main() -> None:
        plugin = ClientChecks(helo_fqdn="annotate", relay_networks=[])
        session = Session(
            id="t", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
        )
        session.notes[ANNOTATIONS] = {"dnsbl": [("X-Other", "listed")]}
        session.helo = "mybox"
        rcpt = Address("u@example.com")
        await plugin.on_rcpt(session, Envelope(Address("a@b.test")), rcpt)
        await plugin.on_rcpt(session, Envelope(Address("a@b.test")), rcpt)
        assert session.notes[ANNOTATIONS]["dnsbl"] == [("X-Other", "listed")]
        assert len(session.notes[ANNOTATIONS]["client-checks"]) == 1
        session.helo = "mybox.example.org"
        await plugin.on_rcpt(session, Envelope(Address("a@b.test")), rcpt)
        assert session.notes[ANNOTATIONS]["client-checks"] == []

    asyncio.run(main())
