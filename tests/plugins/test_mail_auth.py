"""SPF, DKIM and DMARC against a real authoritative DNS server (tests/dns_server.py): SPF
records, DKIM keys (an RSA key made at run time, messages signed with dkimpy) and DMARC
records are published there, and the server's resolver is pointed at it with
``dns_nameservers``; nothing is mocked in the integration tests. Unit tests at the end
cover record parsing, organizational domains and header syntax with a dict as DNS."""

from __future__ import annotations

import ast
import asyncio
import base64
import email
import logging
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.dns_server import DNSTestServer, unique

from mailgate.config import options_from_settings
from mailgate.dns import DNSTempError, Resolver
from mailgate.hooks import Address, Envelope, Message, Session
from mailgate.plugins import mail_auth
from mailgate.plugins.mail_auth import (
    DKIMResult,
    DMARCRecord,
    MailAuth,
    SPFResult,
    aligned,
    check_spf,
    evaluate_dmarc,
    from_domains,
    org_domain,
    parse_dmarc,
    plugins_from_options,
    verify_dkim,
)
from mailgate.plugins.mail_auth import spf as spf_check
from mailgate.plugins.policy import (
    DECISIONS,
    PolicyConfigError,
    PolicyEnv,
    mark_allowlisted,
    parse_size,
)
from mailgate.server.errors import StartupError
from mailgate.testing import RunningServer, running_server

AUTHSERV = "mx.mailgate.test"
RCPT = "user@example.com"


# --- keys, zones, messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    private_pem: bytes  # PKCS#1, what dkim.sign takes
    public_b64: str  # SubjectPublicKeyInfo, the p= of the key record


@pytest.fixture(scope="module")
def key() -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem, base64.b64encode(der).decode("ascii"))


def txt(name: str, text: str) -> str:
    """A TXT record in zone syntax, split into strings of at most 255 bytes."""
    strings = " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))
    return f"{name}. 60 IN TXT {strings}"


def new_domain(prefix: str = "d") -> str:
    return f"{unique(prefix)}.test"


def publish_key(dns: DNSTestServer, key: Key, domain: str, selector: str = "sel") -> str:
    name = f"{selector}._domainkey.{domain}"
    dns.add(txt(name, f"v=DKIM1; k=rsa; p={key.public_b64}"))
    return name


def message(sender: str, body: str = "Hello there.\r\n", subject: str = "test") -> bytes:
    return (
        f"From: Sender <{sender}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{unique('m')}@mailgate.test>\r\n\r\n{body}"
    ).encode()


def signed(msg: bytes, key: Key, domain: str, selector: str = "sel") -> bytes:
    signature = dkim.sign(
        msg,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    return bytes(signature) + msg


# --- a server that records what the message looks like after mail-auth ------------------------


class Recording:
    """The bytes of each message as the steps after mail-auth see it (``srv.messages``
    holds them as received, before policy hooks prepend anything)."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    def attach(self, server: Any) -> None:
        async def record(session: Session, envelope: Envelope, message: Message) -> None:
            self.contents.append(await message.read())

        server.on_message(record, after="mail-auth")

    def last_results(self) -> str:
        """The one Authentication-Results value of the last message, unfolded."""
        assert self.contents, "no message arrived"
        values = header_values(self.contents[-1], "Authentication-Results")
        assert len(values) == 1, values
        return values[0]


def header_values(content: bytes, name: str) -> list[str]:
    parsed = email.message_from_bytes(content)
    return [re.sub(r"\r?\n[ \t]", " ", str(v)) for v in parsed.get_all(name, [])]


@contextmanager
def server(
    dns: DNSTestServer, mail_auth_table: dict[str, Any] | None = None, **settings: Any
) -> Iterator[tuple[RunningServer, Recording]]:
    recording = Recording()
    base: dict[str, Any] = {
        "hostname": AUTHSERV,
        "dns_nameservers": [dns.address],
        "dns_timeout": 1,
        "local_domains": ["example.com"],
        "relay_networks": [],
        "mail_auth": mail_auth_table or {},
        "configure": recording.attach,
    }
    with running_server(**{**base, **settings}) as srv:
        yield srv, recording


@dataclass
class Outcome:
    mail: tuple[int, bytes]
    data: tuple[int, bytes] | None


def send(
    srv: RunningServer, ip: str, sender: str, msg: bytes, helo: str = "client.example"
) -> Outcome:
    """One transaction from ``ip`` (127.0.6.N): MAIL, RCPT, DATA (unless MAIL failed)."""
    with smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10) as c:
        c.ehlo(helo)
        mail = c.mail(sender)
        if mail[0] != 250:
            return Outcome(mail, None)
        assert c.rcpt(RCPT)[0] == 250
        return Outcome(mail, c.data(msg))


def spf_record(dns: DNSTestServer, domain: str, policy: str) -> None:
    dns.add(txt(domain, policy))


def dmarc_record(dns: DNSTestServer, domain: str, record: str) -> None:
    dns.add(txt(f"_dmarc.{domain}", record))


# --- SPF ----------------------------------------------------------------------------------------


def test_spf_pass_gives_one_header_with_answers_from_the_test_dns(
    dns_server: DNSTestServer,
) -> None:
    domain = new_domain("spfpass")
    spf_record(dns_server, domain, "v=spf1 ip4:127.0.6.1 -all")
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.1", f"alice@{domain}", message(f"alice@{domain}"))
        assert out.data is not None and out.data[0] == 250
        srv.messages.wait(1)
    assert dns_server.asked(domain) >= 1  # the configured server answered, not the system's
    results = rec.last_results()
    assert results.startswith(f"{AUTHSERV}; spf=pass (")
    assert f"smtp.mailfrom={domain}" in results
    assert "; dkim=none;" in results
    assert results.endswith(f"dmarc=none header.from={domain}")
    assert rec.contents[-1].startswith(b"Authentication-Results: ")


def test_spf_fail_is_annotated_by_default(dns_server: DNSTestServer) -> None:
    domain = new_domain("spffail")
    spf_record(dns_server, domain, "v=spf1 ip4:192.0.2.1 -all")
    before = DECISIONS[("mail-auth", "annotate")]
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.2", f"bob@{domain}", message(f"bob@{domain}"))
        assert out.mail[0] == 250 and out.data is not None and out.data[0] == 250
    assert "spf=fail (" in rec.last_results()
    assert f"is not allowed) smtp.mailfrom={domain}" in rec.last_results()
    assert DECISIONS[("mail-auth", "annotate")] > before


def test_spf_fail_rejected_at_mail_softfail_not(dns_server: DNSTestServer) -> None:
    hard, soft = new_domain("spfhard"), new_domain("spfsoft")
    spf_record(dns_server, hard, "v=spf1 ip4:192.0.2.1 -all")
    spf_record(dns_server, soft, "v=spf1 ip4:192.0.2.1 ~all")
    with server(dns_server, {"spf_fail": "reject"}) as (srv, rec):
        out = send(srv, "127.0.6.3", f"eve@{hard}", message(f"eve@{hard}"))
        assert out.mail[0] == 550
        assert out.mail[1].startswith(b"5.7.23 SPF validation failed")
        assert out.data is None
        out = send(srv, "127.0.6.3", f"eve@{soft}", message(f"eve@{soft}"))
        assert out.data is not None and out.data[0] == 250
    assert len(rec.contents) == 1
    assert "spf=softfail" in rec.last_results()


def test_spf_temperror_never_rejects(dns_server: DNSTestServer) -> None:
    domain = new_domain("spftemp")
    dns_server.fail(domain)
    with server(dns_server, {"spf_fail": "reject"}) as (srv, rec):
        out = send(srv, "127.0.6.4", f"carol@{domain}", message(f"carol@{domain}"))
        assert out.mail[0] == 250 and out.data is not None and out.data[0] == 250
    results = rec.last_results()
    assert "spf=temperror" in results and f"smtp.mailfrom={domain}" in results


def test_null_sender_is_checked_with_the_helo_identity(dns_server: DNSTestServer) -> None:
    domain = new_domain("helo")
    helo = f"mx.{domain}"
    spf_record(dns_server, helo, "v=spf1 ip4:127.0.6.5 -all")
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.5", "", message(f"postmaster@{domain}"), helo=helo)
        assert out.data is not None and out.data[0] == 250
    assert f"spf=pass ({helo}: 127.0.6.5 is allowed) smtp.helo={helo}" in rec.last_results()


def test_spf_include_and_mx_mechanisms(dns_server: DNSTestServer) -> None:
    domain, provider = new_domain("inc"), new_domain("provider")
    dns_server.add(
        f"{txt(domain, f'v=spf1 mx include:{provider} -all')}\n"
        f"{domain}. 60 IN MX 10 mx.{domain}.\n"
        f"mx.{domain}. 60 IN A 127.0.6.6\n"
        f"{txt(provider, 'v=spf1 ip4:127.0.6.7 -all')}"
    )
    with server(dns_server) as (srv, rec):
        for ip in ("127.0.6.6", "127.0.6.7", "127.0.6.8"):
            send(srv, ip, f"dave@{domain}", message(f"dave@{domain}"))
    verdicts = [
        header_values(c, "Authentication-Results")[0].split("; ")[1].split(" ")[0]
        for c in rec.contents
    ]
    assert verdicts == ["spf=pass", "spf=pass", "spf=fail"]


# --- DKIM ---------------------------------------------------------------------------------------


def test_dkim_pass(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("dkim")
    name = publish_key(dns_server, key, domain)
    msg = signed(message(f"frank@{domain}"), key, domain)
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.10", "bounce@unrelated.invalid", msg)
        assert out.data is not None and out.data[0] == 250
    assert dns_server.asked(name) == 1
    results = rec.last_results()
    assert re.search(
        rf"; dkim=pass header\.d={re.escape(domain)} header\.s=sel header\.b=", results
    )
    # The message arrives intact below the header.
    assert rec.contents[-1].endswith(msg)


def test_dkim_body_changed_fails(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("dkimbad")
    publish_key(dns_server, key, domain)
    msg = signed(message(f"gina@{domain}", body="Pay 10 EUR.\r\n"), key, domain)
    tampered = msg.replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    with server(dns_server) as (srv, rec):
        send(srv, "127.0.6.11", f"gina@{domain}", tampered)
    assert f"dkim=fail (body hash mismatch) header.d={domain}" in rec.last_results()


def test_dkim_missing_key_is_permerror_and_two_signatures_are_both_reported(
    dns_server: DNSTestServer, key: Key
) -> None:
    domain, other = new_domain("dkimtwo"), new_domain("dkimnokey")
    publish_key(dns_server, key, domain)
    msg = signed(signed(message(f"hal@{domain}"), key, domain), key, other, selector="gone")
    with server(dns_server) as (srv, rec):
        send(srv, "127.0.6.12", f"hal@{domain}", msg)
    results = rec.last_results()
    assert f"dkim=permerror (no key for signature) header.d={other} header.s=gone" in results
    assert f"dkim=pass header.d={domain} header.s=sel" in results


def test_dkim_key_lookup_temperror(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("dkimtemp")
    dns_server.fail(f"sel._domainkey.{domain}")
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    msg = signed(message(f"ivy@{domain}"), key, domain)
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.13", "bounce@unrelated.invalid", msg)
        assert out.data is not None and out.data[0] == 250  # never refused on temperror
    results = rec.last_results()
    assert "dkim=temperror" in results
    assert "dmarc=temperror (p=reject dis=none" in results


def sealed(msg: bytes, key: Key, domain: str, srv_id: str = "hop.test") -> bytes:
    """``msg`` as a forwarder ``srv_id`` would pass it on: its results, then its ARC set."""
    checked = f"Authentication-Results: {srv_id}; spf=pass smtp.mailfrom=a@{domain}\r\n"
    data = checked.encode() + msg
    arc_set = dkim.arc_sign(data, b"sel", domain.encode(), key.private_pem, srv_id.encode())
    return b"".join(arc_set) + data


def ours(content: bytes) -> str:
    """The Authentication-Results value this server added (the forwarder's stays too)."""
    [value] = [
        v for v in header_values(content, "Authentication-Results") if v.startswith(AUTHSERV)
    ]
    return value


def test_arc_chain_pass_and_fail(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("arc")
    publish_key(dns_server, key, domain)
    msg = sealed(message(f"list@{domain}", body="Minutes attached.\r\n"), key, domain)
    with server(dns_server) as (srv, rec):
        send(srv, "127.0.6.14", f"list@{domain}", msg)
        send(srv, "127.0.6.14", f"list@{domain}", msg.replace(b"Minutes", b"Invoice"))
        send(srv, "127.0.6.14", f"list@{domain}", message(f"plain@{domain}"))
    passed, failed, plain = (ours(content) for content in rec.contents[-3:])
    assert "; arc=pass;" in passed or passed.endswith("; arc=pass")
    assert "; arc=fail (" in failed
    assert "; arc=" not in plain  # no chain, no ARC result ("dmarc=" is another method)


def test_arc_key_lookup_temperror_gives_no_result(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("arctemp")
    dns_server.fail(f"sel._domainkey.{domain}")
    msg = sealed(message(f"list@{domain}"), key, domain)
    with server(dns_server) as (srv, rec):
        send(srv, "127.0.6.15", f"list@{domain}", msg)
    # RFC 8617 has no temporary error: no result rather than a fail every later hop keeps.
    assert "; arc=" not in ours(rec.contents[-1])


# --- DMARC --------------------------------------------------------------------------------------


def test_dmarc_pass_through_aligned_dkim(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("dmdkim")
    publish_key(dns_server, key, domain)
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    msg = signed(message(f"jay@{domain}"), key, domain)
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.20", "bounce@unrelated.invalid", msg)
        assert out.data is not None and out.data[0] == 250
    assert rec.last_results().endswith(f"dmarc=pass (p=reject dis=none) header.from={domain}")


def test_dmarc_pass_through_aligned_spf(dns_server: DNSTestServer) -> None:
    domain = new_domain("dmspf")
    spf_record(dns_server, f"bounces.{domain}", "v=spf1 ip4:127.0.6.21 -all")
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.21", f"b@bounces.{domain}", message(f"kim@{domain}"))
        assert out.data is not None and out.data[0] == 250
    results = rec.last_results()
    assert "spf=pass" in results and "dkim=none" in results
    assert results.endswith(f"dmarc=pass (p=reject dis=none) header.from={domain}")


def test_dmarc_reject_refuses_after_data(dns_server: DNSTestServer, key: Key) -> None:
    domain, forger = new_domain("dmrej"), new_domain("forger")
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    spf_record(dns_server, forger, "v=spf1 ip4:127.0.6.22 -all")
    publish_key(dns_server, key, forger)
    # SPF and DKIM both pass, for the forger's domain: nothing aligned with From.
    msg = signed(message(f"ceo@{domain}"), key, forger)
    before = DECISIONS[("mail-auth", "reject")]
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.22", f"x@{forger}", msg)
        assert out.mail[0] == 250
        assert out.data is not None and out.data[0] == 550
        assert out.data[1] == f"5.7.1 Email from {domain} rejected per DMARC policy".encode()
        time.sleep(0.2)
        assert not srv.messages
    assert not rec.contents
    assert DECISIONS[("mail-auth", "reject")] == before + 1


@pytest.mark.parametrize(
    ("setting", "quarantined", "disposition"),
    [("quarantine-header", True, "quarantine"), ("annotate", False, "none")],
)
def test_dmarc_reject_can_be_softened(
    dns_server: DNSTestServer, setting: str, quarantined: bool, disposition: str
) -> None:
    domain = new_domain("dmsoft")
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    with server(dns_server, {"dmarc_reject": setting}) as (srv, rec):
        out = send(srv, "127.0.6.23", f"x@{domain}", message(f"x@{domain}"))
        assert out.data is not None and out.data[0] == 250
    assert header_values(rec.contents[-1], "X-Mailgate-Quarantine") == (
        ["dmarc"] if quarantined else []
    )
    assert f"dmarc=fail (p=reject dis={disposition})" in rec.last_results()


def test_dmarc_quarantine_delivers_with_header(dns_server: DNSTestServer) -> None:
    domain = new_domain("dmquar")
    dmarc_record(dns_server, domain, "v=DMARC1; p=quarantine")
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.24", f"x@{domain}", message(f"x@{domain}"))
        assert out.data is not None and out.data[0] == 250
    content = rec.contents[-1]
    assert header_values(content, "X-Mailgate-Quarantine") == ["dmarc"]
    assert content.startswith(b"Authentication-Results: ")  # ours on top
    assert "dmarc=fail (p=quarantine dis=quarantine" in rec.last_results()


def test_dmarc_relaxed_and_strict_alignment_of_a_subdomain(
    dns_server: DNSTestServer, key: Key
) -> None:
    relaxed, strict = new_domain("relaxed"), new_domain("strict")
    for domain in (relaxed, strict):
        publish_key(dns_server, key, domain)
    dmarc_record(dns_server, relaxed, "v=DMARC1; p=reject")
    dmarc_record(dns_server, strict, "v=DMARC1; p=reject; sp=quarantine; adkim=s")
    with server(dns_server) as (srv, rec):
        # From a subdomain, signed by the organizational domain.
        for domain in (relaxed, strict):
            msg = signed(message(f"news@mail.{domain}"), key, domain)
            out = send(srv, "127.0.6.25", "bounce@unrelated.invalid", msg)
            assert out.data is not None and out.data[0] == 250
    first, second = (header_values(c, "Authentication-Results")[0] for c in rec.contents)
    # The policy comes from the organizational domain's record (sp= for the subdomain).
    assert f"dmarc=pass (p=reject dis=none) header.from=mail.{relaxed}" in first
    assert f"dmarc=fail (p=quarantine dis=quarantine) header.from=mail.{strict}" in second


def test_dmarc_does_not_align_different_test_domains(dns_server: DNSTestServer, key: Key) -> None:
    """Two registrable domains under the same (unlisted) TLD are different organizations
    (authheaders' own lookup would call both "test")."""
    domain, other = new_domain("orgone"), new_domain("orgtwo")
    publish_key(dns_server, key, other)
    dmarc_record(dns_server, domain, "v=DMARC1; p=none")
    with server(dns_server) as (srv, rec):
        send(
            srv,
            "127.0.6.26",
            "bounce@unrelated.invalid",
            signed(message(f"a@{domain}"), key, other),
        )
    results = rec.last_results()
    assert f"dkim=pass header.d={other}" in results
    assert f"dmarc=fail (p=none dis=none) header.from={domain}" in results


def test_dmarc_temperror_never_rejects(dns_server: DNSTestServer) -> None:
    domain = new_domain("dmtemp")
    dns_server.fail(f"_dmarc.{domain}")
    with server(dns_server) as (srv, rec):
        out = send(srv, "127.0.6.27", f"x@{domain}", message(f"x@{domain}"))
        assert out.data is not None and out.data[0] == 250
    assert re.search(
        rf"dmarc=temperror \(DMARC record lookup: [^)]*\) header\.from={domain}$",
        rec.last_results(),
    )


def test_message_above_max_size_is_not_verified_nor_refused(
    dns_server: DNSTestServer, key: Key
) -> None:
    domain = new_domain("big")
    publish_key(dns_server, key, domain)
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    msg = signed(message(f"x@{domain}", body="line of text\r\n" * 400), key, domain)
    with server(dns_server, {"max_message_size": "2K"}) as (srv, rec):
        out = send(srv, "127.0.6.28", "bounce@unrelated.invalid", msg)
        assert out.data is not None and out.data[0] == 250
    results = rec.last_results()
    assert f"dkim=policy (message too large to verify) header.d={domain}" in results
    assert (
        f"dmarc=fail (p=reject dis=none, local policy: too large to verify) header.from={domain}"
    ) in results
    assert dns_server.asked(f"sel._domainkey.{domain}") == 0


# --- the whole: one header, exemptions, the event loop --------------------------------------------


def test_existing_results_with_our_id_are_removed(
    dns_server: DNSTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 8601 5: fields claiming our authserv-id go (folded ones too, in any case);
    another server's stay, and so does everything else, in order."""
    domain = new_domain("forged")
    forged = (
        f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.example\r\n"
        "X-Before: kept\r\n"
        f"authentication-results: {AUTHSERV.upper()} (comment);\r\n"
        "\tspf=pass smtp.mailfrom=bank.example\r\n"
        "Authentication-Results: other.example; spf=fail smtp.mailfrom=bank.example\r\n"
    )
    caplog.set_level(logging.INFO, logger="mailgate.policy")
    with server(dns_server) as (srv, rec):
        send(srv, "127.0.6.30", f"x@{domain}", forged.encode() + message(f"x@{domain}"))
    stored = rec.contents[-1]
    values = header_values(stored, "Authentication-Results")
    assert len(values) == 2, values  # ours on top, the other server's below
    assert values[0].startswith(f"{AUTHSERV}; spf=none")
    assert values[1] == "other.example; spf=fail smtp.mailfrom=bank.example"
    assert b"X-Before: kept\r\n" in stored and b"header.d=bank.example" not in stored
    assert any(getattr(r, "forged_results", 0) == 2 for r in caplog.records)


def test_relay_networks_are_not_checked(
    dns_server: DNSTestServer,
) -> None:
    domain = new_domain("exempt")
    spf_record(dns_server, domain, "v=spf1 -all")
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    with server(dns_server, {"spf_fail": "reject"}, relay_networks=["127.0.6.31/32"]) as (srv, rec):
        out = send(srv, "127.0.6.31", f"x@{domain}", message(f"x@{domain}"))
        assert out.mail[0] == 250 and out.data is not None and out.data[0] == 250
    assert header_values(rec.contents[-1], "Authentication-Results") == []
    assert dns_server.asked(domain) == 0 and dns_server.asked(f"_dmarc.{domain}") == 0


def test_authenticated_clients_are_not_checked(dns_server: DNSTestServer, tmp_path: Path) -> None:
    domain = new_domain("authd")
    spf_record(dns_server, domain, "v=spf1 -all")
    plugin = MailAuth(
        authserv_id="mx.test", spf_fail="reject", resolver=Resolver([dns_server.address])
    )
    session = Session(
        id="t", peer_host="192.0.2.9", peer_port=1, local_host="127.0.0.1", local_port=25
    )
    session.user = "alice"
    path = tmp_path / "m.eml"
    content = message(f"x@{domain}")
    path.write_bytes(content)
    msg = Message("m", session, Envelope(), path.stat().st_size, path, 0.0)
    before = DECISIONS[("mail-auth", "skip")]

    async def transaction() -> None:
        assert await plugin.on_mail(session, Envelope(), Address(f"x@{domain}")) is None
        assert await plugin.on_message(session, Envelope(), msg) is None
        await plugin.aclose()

    asyncio.run(transaction())
    assert DECISIONS[("mail-auth", "skip")] == before + 2
    assert dns_server.asked(domain) == 0
    assert path.read_bytes() == content  # no header added


class _AllowAll:
    """Allow-lists every client, as the lists policy would."""

    name = "allow-all"

    async def on_connect(self, session: Session) -> None:
        mark_allowlisted(session, "test partner")


def test_allowlisted_client_is_checked_but_never_refused(dns_server: DNSTestServer) -> None:
    domain = new_domain("listed")
    spf_record(dns_server, domain, "v=spf1 -all")
    dmarc_record(dns_server, domain, "v=DMARC1; p=reject")
    recording = Recording()

    def configure(srv: Any) -> None:
        recording.attach(srv)
        srv.add_plugin(_AllowAll(), before="mail-auth")

    with server(dns_server, {"spf_fail": "reject"}, configure=configure) as (srv, _):
        out = send(srv, "127.0.6.32", f"x@{domain}", message(f"x@{domain}"))
        assert out.mail[0] == 250 and out.data is not None and out.data[0] == 250
    assert "spf=fail" in recording.last_results()
    assert "dmarc=fail (p=reject dis=none, local policy: allow-listed)" in recording.last_results()


def test_slow_dns_does_not_block_the_event_loop(dns_server: DNSTestServer, key: Key) -> None:
    domain = new_domain("slow")
    key_name = f"sel._domainkey.{domain}"
    dns_server.hang(key_name)
    msg = signed(message(f"x@{domain}"), key, domain)
    outcome: list[Outcome] = []
    with server(dns_server, dns_timeout=1) as (srv, rec):
        sender = threading.Thread(
            target=lambda: outcome.append(send(srv, "127.0.6.40", "b@unrelated.invalid", msg))
        )
        sender.start()
        deadline = time.monotonic() + 5
        while dns_server.asked(key_name) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dns_server.asked(key_name) >= 1  # the DKIM key lookup is hanging now
        started = time.monotonic()
        with smtplib.SMTP(srv.host, srv.port, source_address=("127.0.6.41", 0), timeout=5) as c:
            banner_wait = time.monotonic() - started
            assert c.noop()[0] == 250
        sender.join(10)
        assert not sender.is_alive()
    assert banner_wait < 0.5
    assert outcome and outcome[0].data is not None and outcome[0].data[0] == 250
    assert "dkim=temperror" in rec.last_results()


# --- configuration ------------------------------------------------------------------------------


def env_for(**settings: Any) -> PolicyEnv:
    return PolicyEnv(options_from_settings(settings))


def test_plugins_from_options() -> None:
    assert plugins_from_options(env_for()) == []
    assert (
        plugins_from_options(env_for(mail_auth={"spf": False, "dkim": False, "dmarc": False})) == []
    )
    (plugin,) = plugins_from_options(
        env_for(
            hostname="mx.example.org",
            mail_auth={
                "spf_fail": "REJECT",
                "dmarc_reject": "quarantine-header",
                "dmarc_quarantine": "annotate",
                "max_message_size": "1MB",
            },
        )
    )
    assert isinstance(plugin, MailAuth) and plugin.name == "mail-auth"
    assert plugin.authserv_id == "mx.example.org"
    assert (plugin.spf_fail, plugin.dmarc_reject, plugin.dmarc_quarantine) == (
        "reject",
        "quarantine-header",
        "annotate",
    )
    assert plugin.max_message_size == 1_000_000
    (plugin,) = plugins_from_options(env_for(mail_auth={"authserv_id": "auth.example.org"}))
    assert plugin.authserv_id == "auth.example.org"


@pytest.mark.parametrize(
    ("table", "message_part"),
    [
        ({"spf_fail": "bounce"}, "spf_fail: 'bounce' is not one of annotate, reject"),
        ({"dmarc_reject": "drop"}, "dmarc_reject"),
        ({"max_message_size": "lots"}, "max_message_size: 'lots' is not a size"),
        ({"spf": "yes"}, "spf: expected true or false"),
        ({"authserv_id": "a b"}, "authserv_id"),
        ({"dmarc_quarantin": "header"}, "did you mean 'dmarc_quarantine'"),
    ],
)
def test_bad_configuration(table: dict[str, Any], message_part: str) -> None:
    with pytest.raises(PolicyConfigError, match=re.escape(message_part)):
        plugins_from_options(env_for(mail_auth=table))


def test_bad_configuration_stops_the_server_at_start() -> None:
    with (
        pytest.raises(StartupError, match="mail_auth"),
        running_server(mail_auth={"spf_fail": "x"}),
    ):
        pass


def test_constructor_checks_values() -> None:
    with pytest.raises(ValueError, match="dmarc_quarantine"):
        MailAuth(dmarc_quarantine="reject")
    plugin = MailAuth(authserv_id="mx.test")
    assert plugin.spf and plugin.dkim and plugin.dmarc and plugin.spf_fail == "annotate"


def test_parse_size() -> None:
    assert parse_size(1234) == 1234
    assert parse_size("10M") == 10 * 1024 * 1024
    assert parse_size("10MB") == 10_000_000
    assert parse_size(" 2 k ") == 2048
    for bad in ("-1", "1.5M", "10X", True, -5):
        with pytest.raises(ValueError):
            parse_size(bad)


# --- unit level: a dict as DNS -------------------------------------------------------------------


def fake_dns(
    records: dict[tuple[str, str], list[str]], failing: frozenset[str] = frozenset()
) -> Any:
    """A lookup function over a dict that remembers what it was asked (unit tests only)."""
    asked: list[tuple[str, str]] = []

    def lookup(name: str, rdtype: str) -> list[str]:
        name = name.lower().rstrip(".")
        asked.append((name, rdtype))
        if name in failing:
            raise DNSTempError(f"{name} {rdtype}: SERVFAIL")
        return list(records.get((name, rdtype), []))

    lookup.asked = asked
    return lookup


def test_parse_dmarc() -> None:
    record = parse_dmarc("v=DMARC1; p=Reject; sp=none; adkim=s; aspf=r; pct=50; rua=mailto:a@b")
    assert record is not None
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == (
        "reject",
        "none",
        "s",
        "r",
        50,
    )
    assert parse_dmarc("v=DMARC1; p=quarantine") == DMARCRecord("quarantine", "quarantine")
    assert parse_dmarc("v=DMARC1; p=bogus") is None
    assert parse_dmarc("v=DMARC1; rua=mailto:x@y") == DMARCRecord("none", "none")
    assert parse_dmarc("p=reject; v=DMARC1") is None  # v= must come first
    assert parse_dmarc("v=spf1 -all") is None
    odd = parse_dmarc("v=DMARC1;p=none;adkim=x;pct=500")
    assert odd is not None and (odd.adkim, odd.pct) == ("r", 100)


def test_org_domains_follow_the_public_suffix_list() -> None:
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("mail.t1.test") == "t1.test"  # unlisted TLD: the default rule "*"
    assert org_domain("example.com.") == "example.com"
    assert org_domain("x.city.kawasaki.jp") == "city.kawasaki.jp"  # exception rule
    assert org_domain("a.b.c.ck") == "b.c.ck"  # wildcard rule
    assert org_domain("com") == "com"
    assert aligned("mail.example.com", "example.com", "r")
    assert not aligned("mail.example.com", "example.com", "s")
    assert not aligned("a.co.uk", "b.co.uk", "r")
    assert not aligned("", "example.com", "r")


def test_from_domains() -> None:
    assert from_domains([(b"From", b" A <a@Example.COM>")]) == ["example.com"]
    assert from_domains([(b"from", b" a@x.test, b@y.test, c@x.test")]) == ["x.test", "y.test"]
    assert from_domains([]) == "no From header"
    assert from_domains([(b"From", b"a@x.test"), (b"From", b"b@x.test")]) == "several From headers"
    assert from_domains([(b"From", b" undisclosed")]) == "From without a domain"
    assert from_domains([(b"From", b"a@localhost")]) == "From domain is not a domain name"


def test_evaluate_dmarc_policies_sampling_and_errors() -> None:
    lookup = fake_dns(
        {
            ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; sp=quarantine; pct=50"],
            ("_dmarc.two.test", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        },
        failing=frozenset({"_dmarc.broken.test"}),
    )
    spf_ok = SPFResult("pass", "mailfrom", "bounce.example.com")
    assert evaluate_dmarc(lookup, "example.com", spf_ok, []).result == "pass"
    failing = evaluate_dmarc(lookup, "example.com", None, [], sample=lambda: 0.1)
    assert (failing.result, failing.policy, failing.applied) == ("fail", "reject", "reject")
    sampled_out = evaluate_dmarc(lookup, "example.com", None, [], sample=lambda: 0.9)
    assert (sampled_out.policy, sampled_out.applied) == ("reject", "quarantine")
    sub = evaluate_dmarc(lookup, "news.example.com", None, [], sample=lambda: 0.0)
    assert (sub.result, sub.policy) == ("fail", "quarantine")
    assert ("_dmarc.news.example.com", "TXT") in lookup.asked
    assert evaluate_dmarc(lookup, "two.test", None, []).result == "none"  # two records
    assert evaluate_dmarc(lookup, "broken.test", None, []).result == "temperror"
    dkim_temp = [DKIMResult("temperror", "example.com", "s")]
    assert evaluate_dmarc(lookup, "example.com", None, dkim_temp).result == "temperror"


def test_check_spf_with_a_lookup_function() -> None:
    lookup = fake_dns(
        {
            ("example.com", "TXT"): ["v=spf1 a:mail.example.com ip6:2001:db8::/32 -all"],
            ("mail.example.com", "A"): ["192.0.2.10"],
        },
        failing=frozenset({"broken.test"}),
    )
    assert check_spf(lookup, "192.0.2.10", "a@example.com", "h.test").result == "pass"
    assert check_spf(lookup, "2001:db8::1", "a@example.com", "h.test").result == "pass"
    assert check_spf(lookup, "192.0.2.11", "a@example.com", "h.test").result == "fail"
    assert check_spf(lookup, "192.0.2.11", "a@broken.test", "h.test").result == "temperror"
    assert check_spf(lookup, "192.0.2.11", "", "[192.0.2.11]").result == "none"
    assert check_spf(lookup, "192.0.2.11", "a@nothing.test", "h.test").result == "none"


def test_pyspf_keeps_its_own_lookup_outside_our_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    check_spf(fake_dns({}), "192.0.2.1", "a@example.com", "h.test")  # installs the hook
    assert spf.DNSLookup is spf_check._spf_dns
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(spf_check, "_spf_original", lambda n, t, s, to: calls.append((n, t)) or [])
    assert spf.DNSLookup("example.org", "TXT", True, 5) == []
    assert calls == [("example.org", "TXT")]


def test_verify_dkim_at_unit_level(key: Key) -> None:
    lookup = fake_dns({("sel._domainkey.example.com", "TXT"): [f"v=DKIM1; p={key.public_b64}"]})
    msg = signed(message("a@example.com"), key, "example.com")
    (result,) = verify_dkim(lookup, msg)
    assert (result.result, result.domain, result.selector) == ("pass", "example.com", "sel")
    assert verify_dkim(lookup, message("a@example.com")) == []  # unsigned
    (bad_version,) = verify_dkim(lookup, msg.replace(b"v=1;", b"v=2;", 1))
    assert bad_version.result == "neutral" and "v= value is not 1" in bad_version.comment
    (no_key,) = verify_dkim(lookup, signed(message("a@example.com"), key, "example.com", "old"))
    assert (no_key.result, no_key.comment) == ("permerror", "no key for signature")
    short_key = fake_dns({("sel._domainkey.example.com", "TXT"): ["v=DKIM1; p=AAAA"]})
    assert verify_dkim(short_key, msg)[0].result == "permerror"


def test_header_syntax() -> None:
    results = mail_auth.AuthResults(
        spf=SPFResult("pass", "helo", 'odd"helo (x)', comment="a (b) \\ c"),
        dkim_checked=True,
        dkim=[DKIMResult("pass", "example.com", "s1", "ab/c+d=e")],
    )
    value = results.header_value("mx.test")
    assert value == (
        'mx.test; spf=pass (a b c) smtp.helo="odd\\"helo (x)"; '
        'dkim=pass header.d=example.com header.s=s1 header.b="ab/c+d=e"'
    )
    assert mail_auth.AuthResults().header_value("mx.test") == "mx.test; none"


def test_sink_mode_message_without_file_is_skipped() -> None:
    plugin = MailAuth(authserv_id="mx.test", spf=False)
    session = Session(
        id="t", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
    )
    msg = Message("m", session, Envelope(), 0, None, 0.0)
    before = DECISIONS[("mail-auth", "skip")]
    assert asyncio.run(plugin.on_message(session, Envelope(), msg)) is None
    assert DECISIONS[("mail-auth", "skip")] == before + 1


def test_read_for_check_caps_big_messages(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"From: a@b.test\r\nSubject: x\r\n\r\n" + b"x" * 5000)
    session = Session(
        id="t", peer_host="192.0.2.1", peer_port=1, local_host="127.0.0.1", local_port=25
    )
    msg = Message("m", session, Envelope(), path.stat().st_size, path, 0.0)
    data, complete = mail_auth.read_for_check(msg, 1000)
    assert not complete and data == b"From: a@b.test\r\nSubject: x\r\n\r\n"
    data, complete = mail_auth.read_for_check(msg, 10_000)
    assert complete and len(data) == path.stat().st_size


def test_the_evaluation_modules_import_no_plugin_machinery() -> None:
    """spf, dkim, dmarc (and what they share) are a library: DNS comes in as a function,
    results go out as dataclasses; hooks, policy and the server are the plugin's."""
    package = Path(mail_auth.__file__).parent
    allowed = {"mailgate.dns"}
    for name in ("spf", "dkim", "dmarc", "domains", "header"):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in ("spf", "dkim", "dmarc", "domains", "header"), (name, node)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mailgate"):
                assert node.module in allowed, (name, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("mailgate"), (name, alias.name)
