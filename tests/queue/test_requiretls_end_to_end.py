"""REQUIRETLS (RFC 8689) through a whole mailgate server: a client sends
``MAIL FROM:<...> REQUIRETLS`` over STARTTLS, the queue keeps the flag, and the outbound
engine relays the message only to a next hop that offers REQUIRETLS over verified TLS
(passing the parameter on); a next hop without it gets nothing and the sender gets a
failure DSN (5.7.30). Real servers on 127.0.0.x, the test DNS server, nothing mocked."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiosmtplib
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import Certs, Receiver, mailgate_server

from mailgate import Server
from mailgate.queue.plugin import tls_required_no

from .e2e import (
    Client,
    bounces,
    message_bytes,
    new_domain,
    parsed,
    publish_mx,
    queued,
    sender_domain,
    serving,
    settings,
    wait_for,
    wait_until_empty,
)


async def send_requiretls(server: Server, certs: Certs, sender: str, recipient: str) -> None:
    """One message over STARTTLS with REQUIRETLS on MAIL FROM (accepted: 250)."""
    host, port = server.address
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    context.check_hostname = False
    smtp = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, timeout=15, local_hostname="client.test"
    )
    await smtp.connect()
    try:
        await smtp.ehlo()
        assert not smtp.supports_extension("requiretls")  # only over TLS (RFC 8689 2)
        refused = await smtp.execute_command(
            b"MAIL", b"FROM:<" + sender.encode() + b">", b"REQUIRETLS"
        )
        assert (refused.code, refused.message.split()[0]) == (530, "5.7.10")
        await smtp.starttls(tls_context=context)
        await smtp.ehlo()
        assert smtp.supports_extension("requiretls")
        await smtp.mail(sender, options=["REQUIRETLS"])
        await smtp.rcpt(recipient)
        answer = await smtp.data(message_bytes("requiretls"))
        assert answer.code == 250
    finally:
        await smtp.quit()


def _server_settings(
    tmp_path: Path, dns: DNSTestServer, mx_port: int, certs: Certs, routes: list[dict[str, str]]
) -> dict[str, object]:
    directory = tmp_path / "front"
    directory.mkdir()
    cert, key = certs.files(directory, "mx.mailgate.test")
    return settings(
        tmp_path,
        dns,
        mx_port,
        routes,
        outbound={"tls_cafile": str(certs.ca_file)},
        tls_cert=cert,
        tls_key=key,
    )


def test_a_next_hop_without_requiretls_gets_nothing_and_the_sender_gets_a_dsn(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    smarthost = f"smarthost.{new_domain('e2eNoRtls')}"
    dns_server.add(f"{smarthost}. 60 IN A 127.0.0.85\n")
    sender = f"alice@{sender_domain(dns_server, '127.0.0.86')}"
    routes = [
        {
            "recipients": ["*@example.net"],
            "action": "forward",
            "to": f"smtp://{smarthost}:{mx_port}",
        }
    ]
    routes.append({"recipients": ["*"], "action": "relay"})

    async def main() -> None:
        with (
            Receiver("127.0.0.85", mx_port, tls_context=certs.server_context(smarthost)) as hop,
            Receiver("127.0.0.86", mx_port) as sender_mx,
        ):
            values = _server_settings(tmp_path, dns_server, mx_port, certs, routes)
            async with serving(**values) as server:
                await send_requiretls(server, certs, sender, "bob@example.net")
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the DSN")
                await wait_until_empty(server)
        assert hop.messages == []  # verified TLS, but no REQUIRETLS: nothing sent
        assert hop.starttls >= 1
        report = parsed(bounces(sender_mx)[0])
        status = next(
            part for part in report.walk() if part.get_content_type() == "message/delivery-status"
        )
        text = "\n".join(str(block) for block in status.get_payload())
        assert "Action: failed" in text and "Status: 5.7.30" in text, text
        assert "REQUIRETLS" in text

    run(main())


def test_with_requiretls_and_verified_tls_it_is_delivered_with_the_parameter(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    smarthost = f"smarthost.{new_domain('e2eRtls')}"
    dns_server.add(f"{smarthost}. 60 IN A 127.0.0.87\n")
    routes = [{"recipients": ["*"], "action": "forward", "to": f"smtp://{smarthost}:{mx_port}"}]

    async def main() -> None:
        async with mailgate_server(tmp_path, certs, f"127.0.0.87:{mx_port}", smarthost) as (
            _,
            seen,
        ):
            values = _server_settings(tmp_path, dns_server, mx_port, certs, routes)
            async with serving(**values) as server:
                await send_requiretls(server, certs, "alice@example.org", "bob@example.net")
                await wait_for(lambda: len(seen.messages) == 1, what="the relayed message")
                await wait_until_empty(server)
                assert await queued(server) == []
        [(session, envelope, data)] = seen.messages
        assert session.tls is not None
        assert "REQUIRETLS" in envelope.mail_params
        assert data.endswith(message_bytes("requiretls"))

    run(main())


def test_tls_required_no_is_read_from_the_header_only(tmp_path: Path) -> None:
    cases = {
        b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n": True,
        b"Subject: x\r\ntls-required:\r\n  no\r\n\r\nbody\r\n": True,  # folded, any case
        b"Subject: x\r\nTLS-Required: Yes\r\n\r\nbody\r\n": False,  # only "No" is defined
        b"Subject: x\r\n\r\nTLS-Required: No\r\n": False,  # in the body: not a header
    }
    for number, (data, expected) in enumerate(cases.items()):
        path = tmp_path / f"m{number}"
        path.write_bytes(data)
        assert tls_required_no(path) is expected, data
    assert tls_required_no(tmp_path / "missing") is False


def test_the_queue_keeps_tls_required_no_from_the_header(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("e2eTlsNo")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.88"))
    routes = [{"recipients": ["*"], "action": "relay"}]
    header_no = b"TLS-Required: No\r\n" + message_bytes("relaxed")

    async def main() -> None:
        with Receiver("127.0.0.88", mx_port) as receiver:
            receiver.cue.rcpt = {f"bob@{domain}": "451 4.3.0 later, please"}
            values = _server_settings(tmp_path, dns_server, mx_port, certs, routes)
            async with serving(**values) as server:
                _, final = await Client(server).send(
                    "alice@example.org", [f"bob@{domain}"], header_no
                )
                assert final is not None and final[0] == 250
                await wait_for(lambda: receiver.session_count >= 1, what="the first attempt")
                [message] = await queued(server)
                assert (message.info.tls_optional, message.info.require_tls) == (True, False)

    run(main())
