"""DKIM signing and ARC sealing of relayed mail, end to end: a mailgate server relays to
a receiving server on 127.0.0.x that verifies every message with dkimpy against the keys
published in the test DNS zone (RSA and Ed25519), and refuses what fails."""

from __future__ import annotations

import asyncio
import email
import logging
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.dkim_helpers import (
    VerifyingReceiver,
    arc_result,
    dkim_signatures,
    make_key,
    txt_lookup,
)
from tests.outbound.helpers import new_domain, publish_mx, run
from tests.queue.e2e import Client, queue_of, serving, settings, wait_for, wait_until_empty

from mailgate.config import options_from_settings
from mailgate.queue import RecipientState, SQLiteQueueStore

RELAY_ALL = [{"recipients": ["*"], "action": "relay"}]


def message(sender: str, subject: str = "signed", to: str = "bob@example.net") -> bytes:
    return (
        f"From: Alice <{sender}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Sun, 06 Dec 2026 18:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@mailgate.test>\r\n"
        "\r\n"
        "first line\r\n"
        ".a line that starts with a dot\r\n"
        "last line\r\n"
    ).encode()


def test_relayed_mail_has_rsa_and_ed25519_signatures_that_verify(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    ours = new_domain("signer")
    theirs = new_domain("rcpt")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.30"))
    rsa_key = make_key(dns_server, tmp_path / "keys", ours, "rsa1")
    ed_key = make_key(dns_server, tmp_path / "keys", ours, "ed1", "ed25519-sha256")
    dkim_sign = [
        {"domain": ours, "selector": "rsa1", "key_file": str(rsa_key)},
        {
            "domain": ours,
            "selector": "ed1",
            "key_file": str(ed_key),
            "algorithm": "ed25519-sha256",
        },
    ]

    async def main() -> bytes:
        with VerifyingReceiver("127.0.0.30", mx_port, dns_server) as receiver:
            values = settings(tmp_path, dns_server, mx_port, RELAY_ALL, dkim_sign=dkim_sign)
            async with serving(**values) as server:
                # A subdomain's mail is signed by the parent domain's key (DMARC relaxed
                # alignment), mail of another domain is not.
                for sender in (f"alice@{ours}", f"news@lists.{ours}"):
                    _, final = await Client(server).send(
                        sender, [f"bob@{theirs}"], message(sender, f"from {sender}")
                    )
                    assert final is not None and final[0] == 250, final
                await wait_for(lambda: len(receiver.messages) == 2, what="the signed messages")
                receiver.require_dkim = False
                _, final = await Client(server).send(
                    "carol@elsewhere.test", [f"bob@{theirs}"], message("carol@elsewhere.test")
                )
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(receiver.messages) == 3, what="the unsigned one")
                await wait_until_empty(server)
            first, second, other = (m.data for m in receiver.messages)
        dnsfunc = txt_lookup(dns_server)
        for data in (first, second):
            assert dkim_signatures(data, dnsfunc) == [
                _sig(ours, "rsa1", "rsa-sha256"),
                _sig(ours, "ed1", "ed25519-sha256"),
            ]
            # Signed after mailgate added its Received field: the signatures are on top.
            names = [name for name, _ in email.message_from_bytes(data).items()]
            assert names[:3] == ["DKIM-Signature", "DKIM-Signature", "Received"]
        assert dkim_signatures(other, dnsfunc) == []
        return first

    signed = run(main())

    # The check can fail: the same message changed after signing (a word of the body, a
    # header field that is signed) verifies for neither key.
    dnsfunc = txt_lookup(dns_server)
    for tampered in (
        signed.replace(b"last line", b"last lime"),
        signed.replace(b"Subject: from", b"Subject: FROM"),
    ):
        assert tampered != signed
        assert [s.valid for s in dkim_signatures(tampered, dnsfunc)] == [False, False]

    # ...and the receiving server refuses it, as it accepted the original.
    async def resend(data: bytes) -> int:
        with VerifyingReceiver("127.0.0.30", mx_port, dns_server) as receiver:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.30", port=mx_port, start_tls=False, timeout=10
            ) as client:
                try:
                    await client.sendmail("alice@x.test", [f"bob@{theirs}"], data)
                except aiosmtplib.SMTPResponseException as exc:
                    return exc.code
            assert receiver.messages
        return 250

    assert run(resend(signed)) == 250
    assert run(resend(signed.replace(b"last line", b"last lime"))) == 550


def _sig(domain: str, selector: str, algorithm: str) -> Any:
    from tests.outbound.dkim_helpers import Signature

    return Signature(domain, selector, algorithm, True)


def test_a_retry_sends_the_same_signed_bytes_without_signing_again(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    ours = new_domain("retry")
    theirs = new_domain("rcpt")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.31"))
    key = make_key(dns_server, tmp_path / "keys", ours, "s1")
    dkim_sign = [{"domain": ours, "selector": "s1", "key_file": str(key)}]

    async def main() -> list[bytes]:
        with VerifyingReceiver("127.0.0.31", mx_port, dns_server) as receiver:
            receiver.cue.data_reply = "451 4.3.0 try again later"
            values = settings(tmp_path, dns_server, mx_port, RELAY_ALL, dkim_sign=dkim_sign)
            async with serving(**values) as server:
                _, final = await Client(server).send(
                    f"alice@{ours}", [f"bob@{theirs}"], message(f"alice@{ours}", "retried")
                )
                assert final is not None and final[0] == 250
                store = queue_of(server).store
                assert isinstance(store, SQLiteQueueStore)
                await wait_for(lambda: len(receiver.attempts) >= 1, what="the first attempt")
                for _ in range(100):
                    [queued] = await store.list_messages()
                    if queued.recipients[0].state is RecipientState.DEFERRED:
                        break
                    await asyncio.sleep(0.05)
                assert queued.recipients[0].state is RecipientState.DEFERRED
                assert queued.recipients[0].attempts == 1
                receiver.cue.data_reply = None
                await wait_for(lambda: len(receiver.messages) == 1, what="the retry")
                await wait_until_empty(server)
            return list(receiver.attempts)

    attempts = run(main())
    assert len(attempts) == 2
    first, retry = attempts
    assert retry == first  # byte for byte: the queue keeps the signed message
    [signature] = dkim_signatures(retry, txt_lookup(dns_server))
    assert signature.valid and signature.selector == "s1"


def test_mail_from_outside_is_not_signed_but_arc_sealed(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    """A forwarder: mail for a local domain arrives from a client outside relay_networks
    claiming a From of the signing domain. It must not get that domain's signature; with
    [arc_seal] it gets an ARC set that carries the Authentication-Results of the checks."""
    ours = new_domain("fwd")
    forwarded = new_domain("alias")
    publish_mx(dns_server, forwarded, (10, "mx", "127.0.0.32"))
    dkim_key = make_key(dns_server, tmp_path / "keys", ours, "s1")
    arc_key = make_key(dns_server, tmp_path / "keys", ours, "arc1")
    values = settings(
        tmp_path,
        dns_server,
        mx_port,
        RELAY_ALL,
        local_domains=[forwarded],
        relay_networks=["10.99.0.0/16"],  # the test client on 127.0.0.1 is not ours
        mail_auth={},
        dkim_sign=[{"domain": ours, "selector": "s1", "key_file": str(dkim_key)}],
        arc_seal={"domain": ours, "selector": "arc1", "key_file": str(arc_key)},
    )

    async def main() -> bytes:
        with VerifyingReceiver("127.0.0.32", mx_port, dns_server, require_dkim=False) as receiver:
            async with serving(**values) as server:
                _, final = await Client(server).send(
                    f"ceo@{ours}", [f"bob@{forwarded}"], message(f"ceo@{ours}", "forged")
                )
                assert final is not None and final[0] == 250, final
                await wait_for(lambda: len(receiver.messages) == 1, what="the forwarded copy")
                await wait_until_empty(server)
        return receiver.messages[0].data

    data = run(main())
    dnsfunc = txt_lookup(dns_server)
    assert dkim_signatures(data, dnsfunc) == []
    parsed = email.message_from_bytes(data)
    assert parsed["ARC-Seal"] is not None and "i=1" in parsed["ARC-Seal"]
    aar = str(parsed["ARC-Authentication-Results"])
    assert aar.startswith("i=1; mx.mailgate.test")
    assert "spf=" in aar and "dmarc=" in aar
    assert arc_result(data, dnsfunc)[0] == "pass"
    # The seal can fail too: a changed body breaks the ARC-Message-Signature.
    assert arc_result(data.replace(b"last line", b"last lime"), dnsfunc)[0] == "fail"


def test_match_on_the_authenticated_user(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    """``match = ["user:alice"]``: alice's mail is signed whatever its From, mail of
    another user is not, and neither is mail of clients that did not authenticate."""
    ours = new_domain("users")
    theirs = new_domain("rcpt")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.33"))
    key = make_key(dns_server, tmp_path / "keys", ours, "s1")
    values = settings(
        tmp_path,
        dns_server,
        mx_port,
        RELAY_ALL,
        relay_networks=["10.99.0.0/16"],
        auth_users=["alice:secret-a", "bob:secret-b"],
        allow_insecure_auth=True,
        dkim_sign=[{"domain": ours, "selector": "s1", "key_file": str(key), "match": "user:alice"}],
    )

    async def send(server: Any, user: str, password: str, subject: str) -> None:
        host, port = server.address
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as client:
            await client.login(user, password)
            sender = f"{user}@partner.test"
            await client.sendmail(sender, [f"bob@{theirs}"], message(sender, subject))

    async def main() -> list[bytes]:
        with VerifyingReceiver("127.0.0.33", mx_port, dns_server, require_dkim=False) as receiver:
            async with serving(**values) as server:
                await send(server, "alice", "secret-a", "alice")
                await send(server, "bob", "secret-b", "bob")
                await wait_for(lambda: len(receiver.messages) == 2, what="both messages")
                await wait_until_empty(server)
        by_subject = {
            email.message_from_bytes(m.data)["Subject"]: m.data for m in receiver.messages
        }
        return [by_subject["alice"], by_subject["bob"]]

    alice, bob = run(main())
    dnsfunc = txt_lookup(dns_server)
    [signature] = dkim_signatures(alice, dnsfunc)
    assert signature.valid and signature.domain == ours
    assert dkim_signatures(bob, dnsfunc) == []


def test_sighup_reads_the_keys_again(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload signs with the key configured now (a rotation to a new selector); a
    reload whose key cannot be read changes nothing and says why in one line."""
    ours = new_domain("rotate")
    theirs = new_domain("rcpt")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.34"))
    old_key = make_key(dns_server, tmp_path / "keys", ours, "old")
    new_key = make_key(dns_server, tmp_path / "keys", ours, "new")
    doomed_path = tmp_path / "keys" / f"{ours}.gone.key"

    def values(selector: str, key_file: Path) -> dict[str, Any]:
        return settings(
            tmp_path,
            dns_server,
            mx_port,
            RELAY_ALL,
            dkim_sign=[{"domain": ours, "selector": selector, "key_file": str(key_file)}],
        )

    async def main() -> list[bytes]:
        with VerifyingReceiver("127.0.0.34", mx_port, dns_server) as receiver:
            async with serving(**values("old", old_key)) as server:
                sender = f"alice@{ours}"
                await Client(server).send(sender, [f"bob@{theirs}"], message(sender, "one"))
                await wait_for(lambda: len(receiver.messages) == 1, what="the first")
                server.reload(options_from_settings(values("new", new_key)))
                await Client(server).send(sender, [f"bob@{theirs}"], message(sender, "two"))
                await wait_for(lambda: len(receiver.messages) == 2, what="the second")
                # Read when the settings are (as mailgate serve reads the file on SIGHUP),
                # gone when the server reloads.
                doomed = make_key(dns_server, tmp_path / "keys", ours, "gone")
                broken = options_from_settings(values("gone", doomed))
                doomed.unlink()
                with caplog.at_level(logging.ERROR, logger="mailgate.server"):
                    server.reload(broken)
                await Client(server).send(sender, [f"bob@{theirs}"], message(sender, "three"))
                await wait_for(lambda: len(receiver.messages) == 3, what="the third")
                await wait_until_empty(server)
        return [m.data for m in receiver.messages]

    first, second, third = run(main())
    dnsfunc = txt_lookup(dns_server)
    assert [s.selector for s in dkim_signatures(first, dnsfunc)] == ["old"]
    assert [s.selector for s in dkim_signatures(second, dnsfunc)] == ["new"]
    assert [s.selector for s in dkim_signatures(third, dnsfunc)] == ["new"]
    [line] = [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]
    assert "[[dkim_sign]] #1 key_file: cannot read" in line and str(doomed_path) in line


def test_delivery_reports_are_signed_too(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    """A bounce comes from MAILER-DAEMON@<hostname>: with the host under the signing
    domain, the sender's MX gets it signed, and it verifies."""
    ours = new_domain("bounce")
    theirs = new_domain("rcpt")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.36"))
    publish_mx(dns_server, ours, (10, "mx", "127.0.0.37"))
    key = make_key(dns_server, tmp_path / "keys", ours, "s1")
    values = settings(
        tmp_path,
        dns_server,
        mx_port,
        RELAY_ALL,
        hostname=f"mx.{ours}",
        dkim_sign=[{"domain": ours, "selector": "s1", "key_file": str(key)}],
    )

    async def main() -> bytes:
        with (
            VerifyingReceiver("127.0.0.36", mx_port, dns_server) as receiver,
            VerifyingReceiver("127.0.0.37", mx_port, dns_server) as sender_mx,
        ):
            receiver.cue.rcpt[f"nobody@{theirs}"] = "550 5.1.1 no such user"
            async with serving(**values) as server:
                sender = f"alice@{ours}"
                _, final = await Client(server).send(
                    sender, [f"nobody@{theirs}", f"bob@{theirs}"], message(sender, "bounced")
                )
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(sender_mx.messages) == 1, what="the bounce")
                await wait_until_empty(server)
        [report] = sender_mx.messages
        assert report.mail_from in ("", "<>")
        return report.data

    report = run(main())
    assert b"From: Mail Delivery System <MAILER-DAEMON@mx." in report
    [signature] = dkim_signatures(report, txt_lookup(dns_server))
    assert signature.valid and signature.domain.endswith(".test")


def test_a_second_forwarder_validates_the_chain_and_seals_on_top(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    """Two mailgate forwarders in a row: the second validates the first's ARC set
    (``arc=pass`` in its Authentication-Results, so in its ARC-Authentication-Results)
    and adds set i=2 with cv=pass; the receiver validates the chain of two."""
    first_domain, second_domain = new_domain("hop1"), new_domain("hop2")
    alias = new_domain("alias")
    # The first forwarder relays the alias domain to its MX: the second forwarder, which
    # hands it to the final receiver (a smarthost route).
    publish_mx(dns_server, alias, (10, "mx", "127.0.0.38"))
    first_key = make_key(dns_server, tmp_path / "keys", first_domain, "arc")
    second_key = make_key(dns_server, tmp_path / "keys", second_domain, "arc")

    def forwarder(
        name: str, domain: str, key: Path, routes: list[dict[str, Any]] = RELAY_ALL, **extra: Any
    ) -> dict[str, Any]:
        return settings(
            tmp_path / name,
            dns_server,
            mx_port,
            routes,
            hostname=f"mx.{domain}",
            local_domains=[alias],
            relay_networks=["10.99.0.0/16"],
            mail_auth={},
            arc_seal={"domain": domain, "selector": "arc", "key_file": str(key)},
            **extra,
        )

    first = forwarder("first", first_domain, first_key)
    second = forwarder(
        "second",
        second_domain,
        second_key,
        listen=f"127.0.0.38:{mx_port}",
        routes=[{"recipients": ["*"], "action": "forward", "to": f"smtp://127.0.0.39:{mx_port}"}],
    )

    async def main() -> bytes:
        with VerifyingReceiver("127.0.0.39", mx_port, dns_server, require_dkim=False) as end:
            async with serving(**second) as hop2, serving(**first) as hop1:
                sender = "someone@elsewhere.test"
                _, reply = await Client(hop1).send(
                    sender, [f"bob@{alias}"], message(sender, "two hops")
                )
                assert reply is not None and reply[0] == 250, reply
                await wait_for(lambda: len(end.messages) == 1, what="the twice-sealed copy")
                await wait_until_empty(hop1)
                await wait_until_empty(hop2)
        return end.messages[0].data

    data = run(main())
    parsed = email.message_from_bytes(data)
    seals = [str(v) for v in parsed.get_all("ARC-Seal") or []]
    assert len(seals) == 2
    assert "i=2" in seals[0] and "cv=pass" in seals[0]
    aar = [str(v) for v in parsed.get_all("ARC-Authentication-Results") or []]
    assert aar[0].startswith(f"i=2; mx.{second_domain}") and "arc=pass" in aar[0]
    assert arc_result(data, txt_lookup(dns_server))[0] == "pass"


def test_a_message_released_from_the_console_is_signed(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    """Capture mode keeps a message; the operator releases it through the console to a
    real address: it goes onward through the queue, signed like mail of the server's
    users (the capture itself stays as it was)."""
    from tests.console.test_release import (
        CAPTURED_DOMAIN,
        _console_port,
        _http,
        _release,
        _send,
        _server_settings,
    )

    ours = new_domain("release")
    theirs = new_domain("rcpt")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.40"))
    key = make_key(dns_server, tmp_path / "keys", ours, "s1")
    values = _server_settings(tmp_path, dns_server, mx_port)
    values["dkim_sign"] = [{"domain": ours, "selector": "s1", "key_file": str(key)}]
    sender = f"alice@{ours}"

    async def main() -> tuple[bytes, bytes]:
        with VerifyingReceiver("127.0.0.40", mx_port, dns_server) as receiver:
            async with serving(**values) as server:
                port, smtp_port = _console_port(server), server.addresses[0][1]
                await asyncio.to_thread(
                    _send, smtp_port, sender, [f"tester@{CAPTURED_DOMAIN}"], message(sender)
                )
                [captured] = (await _http(port, "/api/v1/messages")).json()["messages"]
                raw = (await _http(port, f"/api/v1/messages/{captured['id']}/raw")).body
                released = await _release(port, captured["id"], {"to": [f"bob@{theirs}"]})
                assert released.status == 202, released.text
                await wait_for(lambda: len(receiver.messages) == 1, what="the released copy")
                await wait_until_empty(server)
        return raw, receiver.messages[0].data

    raw, data = run(main())
    assert b"DKIM-Signature" not in raw
    assert data.endswith(raw)
    [signature] = dkim_signatures(data, txt_lookup(dns_server))
    assert signature.valid and signature.domain == ours
