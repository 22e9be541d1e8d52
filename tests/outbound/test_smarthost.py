"""Forward to a smarthost (SMTP with AUTH over STARTTLS, SMTPS, LMTP) and DSN parameters,
against mailgate's own server as the receiving side."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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
from tests.outbound.receivers import Certs, RawServer, mailgate_server
from tests.server.harness import strip_received

from mailgate import Reject
from mailgate.hooks import Envelope, Message, Session
from mailgate.queue.outbound import Forward, Outcome, Recipient, Relay


def test_smarthost_with_auth_over_starttls(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    smarthost = f"smarthost.{new_domain('sh')}"
    dns_server.add(f"{smarthost}. 60 IN A 127.0.0.28\n")
    path = body(tmp_path)
    url = f"smtp://{smarthost}:{mx_port}"

    async def main() -> None:
        async with mailgate_server(
            tmp_path, certs, f"127.0.0.28:{mx_port}", smarthost, auth_users=["relay:s3cret"]
        ) as (_, seen):
            async with make_engine(dns_server, 25, tls_cafile=str(certs.ca_file)) as engine:
                good = await engine.deliver(
                    request(path, Forward(url, auth="relay:s3cret"), "bob@example.net")
                )
                wrong = await engine.deliver(
                    request(path, Forward(url, auth="relay:wrong"), "bob@example.net")
                )
                plaintext = await engine.deliver(
                    request(path, Forward(url + "?starttls=no", auth="relay:s3cret"), "b@x.test")
                )
        [delivered] = good.recipients
        assert delivered.outcome is Outcome.DELIVERED
        assert good.remote is not None
        assert (good.remote.host, good.remote.address, good.remote.port) == (
            smarthost,
            "127.0.0.28",
            mx_port,
        )
        assert good.tls is not None and good.tls.verified
        [(session, envelope, data)] = seen.messages
        assert session.user == "relay" and session.tls is not None
        assert envelope.rcpt_tos == ("bob@example.net",)
        assert strip_received(data) == MESSAGE
        # Wrong credentials and no TLS: deferred, never bounced, and nothing sent.
        assert (wrong.recipients[0].outcome, wrong.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.7.0",
        )
        assert "authentication failed" in wrong.recipients[0].diagnostic
        assert (plaintext.recipients[0].outcome, plaintext.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.7.0",
        )
        assert "without TLS" in plaintext.recipients[0].diagnostic

    run(main())


def test_smtps_smarthost(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    path = body(tmp_path)

    async def main() -> None:
        async with mailgate_server(
            tmp_path,
            certs,
            [],
            "smtps.test",
            cert_names=("127.0.0.29",),
            smtps_listen=f"127.0.0.29:{mx_port}",
        ) as (_, seen):
            async with make_engine(dns_server, 25, tls_cafile=str(certs.ca_file)) as engine:
                result = await engine.deliver(
                    request(path, Forward(f"smtps://127.0.0.29:{mx_port}"), "bob@example.net")
                )
        assert result.recipients[0].outcome is Outcome.DELIVERED
        assert result.tls is not None and result.tls.verified  # the certificate names the address
        [(session, _, _)] = seen.messages
        assert session.tls is not None

    run(main())


def test_lmtp_gives_a_reply_per_recipient(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    path = body(tmp_path)

    async def main() -> None:
        async with mailgate_server(
            tmp_path, certs, f"127.0.0.30:{mx_port}", "lmtp.test", lmtp=True
        ) as (server, seen):

            @server.on_rcpt
            def no_nobody(session: Session, envelope: Envelope, address: str) -> None:
                if address.startswith("nobody@"):
                    raise Reject(550, "no such user here", enhanced="5.1.1")

            @server.on_message(before="maildir")
            def full_mailbox(session: Session, envelope: Envelope, message: Message) -> Any:
                return [
                    Reject(552, "mailbox full", enhanced="5.2.2") if "full" in r else None
                    for r in envelope.rcpt_tos
                ]

            async with make_engine(dns_server, 25) as engine:
                result = await engine.deliver(
                    request(
                        path,
                        Forward(f"lmtp://127.0.0.30:{mx_port}"),
                        "bob@example.net",
                        "full@example.net",
                        "nobody@example.net",
                        "carol@example.net",
                    )
                )
                again = await engine.deliver(
                    request(path, Forward(f"lmtp://127.0.0.30:{mx_port}"), "dan@example.net")
                )
        assert [(r.outcome, r.status) for r in result.recipients] == [
            (Outcome.DELIVERED, "2.1.5"),  # mailgate's LMTP says 2.1.5 per recipient
            (Outcome.FAILED, "5.2.2"),
            (Outcome.FAILED, "5.1.1"),
            (Outcome.DELIVERED, "2.1.5"),
        ]
        assert result.recipients[1].diagnostic.endswith("(in reply to end of DATA command)")
        assert result.recipients[2].diagnostic.endswith("(in reply to RCPT TO command)")
        assert result.tls is not None  # LMTP also upgrades with STARTTLS when offered
        assert again.recipients[0].outcome is Outcome.DELIVERED and again.reused
        assert [e.rcpt_tos for _, e, _ in seen.messages][-1] == ("dan@example.net",)

    run(main())


def test_dsn_and_body_parameters_are_passed_when_offered(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("dsn")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.31"))
    data = MESSAGE.replace(b"first line", "first line \u00e9".encode())
    path = body(tmp_path, data)

    async def main() -> None:
        async with mailgate_server(tmp_path, certs, f"127.0.0.31:{mx_port}", "dsn.test") as (
            _,
            seen,
        ):
            async with make_engine(dns_server, mx_port) as engine:
                result = await engine.deliver(
                    request(
                        path,
                        Relay(domain),
                        Recipient(
                            f"bob@{domain}",
                            orcpt="rfc822;Bob+Smith=x@Example.org",
                            notify="SUCCESS,FAILURE",
                        ),
                        Recipient(f"carol@{domain}", notify="NEVER"),
                        Recipient(f"d\u00e9sir\u00e9e@{domain}"),
                        sender="alice@example.org",
                        envid="queue id=42+x",
                        ret="HDRS",
                        eight_bit=True,
                        smtputf8=True,
                    )
                )
        assert [r.outcome for r in result.recipients] == [Outcome.DELIVERED] * 3
        [(_, envelope, received)] = seen.messages
        assert envelope.mail_params["RET"] == "HDRS"
        assert envelope.mail_params["ENVID"] == "queue id=42+x"
        assert envelope.mail_params["BODY"] == "8BITMIME"
        assert "SMTPUTF8" in envelope.mail_params
        assert envelope.mail_params["SIZE"] == str(len(data))
        bob, carol, desiree = envelope.rcpt_tos
        assert bob.params["NOTIFY"] == "SUCCESS,FAILURE"
        assert bob.params["ORCPT"] == "rfc822;Bob+Smith=x@Example.org"
        assert carol.params["NOTIFY"] == "NEVER" and "ORCPT" not in carol.params
        assert desiree == f"d\u00e9sir\u00e9e@{domain}" and not desiree.params
        assert strip_received(received) == data

    run(main())


def test_lmtp_session_lost_halfway_keeps_the_replies_already_given(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    async def one_reply_then_gone(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"220 lmtp.test LMTP\r\n")
        for _ in range(20):
            line = await reader.readline()
            verb = line[:4].upper()
            if not line:
                return
            if verb == b"LHLO":
                writer.write(b"250-lmtp.test\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.1.5 first delivered\r\n")
                await writer.drain()
                return  # and the second recipient's reply never comes
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()

    async def main() -> None:
        async with RawServer("127.0.0.40", mx_port, one_reply_then_gone):
            async with make_engine(dns_server, 25) as engine:
                result = await engine.deliver(
                    request(
                        body(tmp_path),
                        Forward(f"lmtp://127.0.0.40:{mx_port}"),
                        "first@example.net",
                        "second@example.net",
                    )
                )
        first, second = result.recipients
        assert (first.outcome, first.status) == (Outcome.DELIVERED, "2.1.5")
        assert (second.outcome, second.status) == (Outcome.DEFERRED, "4.4.2")
        assert "while sending the message" in second.diagnostic

    run(main())
