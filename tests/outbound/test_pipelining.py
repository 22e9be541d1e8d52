"""PIPELINING (RFC 2920): MAIL, the RCPTs and DATA go out in one write when the server
offers it, and the replies still land on the right recipients."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.dns_server import DNSTestServer
from tests.outbound.helpers import MESSAGE, body, make_engine, request, run
from tests.outbound.receivers import Certs, RawServer, mailgate_server

from mailgate import Reject, TempFail
from mailgate.hooks import Envelope, Session
from mailgate.queue.outbound import Forward, Outcome, Relay


def test_commands_go_in_one_group_and_replies_map_to_recipients(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    received: list[bytes] = []

    async def answers_only_after_data(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"220 strict.test ESMTP\r\n")
        line = await reader.readline()
        assert line.upper().startswith(b"EHLO")
        writer.write(b"250-strict.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
        group = []
        for _ in range(10):  # a client that waits for the reply to MAIL waits forever
            group.append(await reader.readline())
            if group[-1] == b"DATA\r\n":
                break
        received.extend(group)
        writer.write(
            b"250 2.1.0 sender ok\r\n"
            b"250 2.1.5 ok\r\n"
            b"550 5.1.1 no such user\r\n"
            b"450 4.2.0 greylisted\r\n"
            b"250 2.1.5 ok\r\n"
            b"354 go ahead\r\n"
        )
        received.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 queued as P1\r\n")
        await writer.drain()
        if (await reader.readline()).upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")

    async def main() -> None:
        async with RawServer("127.0.0.41", mx_port, answers_only_after_data):
            async with make_engine(dns_server, mx_port, command_timeout=3.0) as engine:
                result = await engine.deliver(
                    request(
                        body(tmp_path),
                        Relay("[127.0.0.41]"),
                        "a@x.test",
                        "nobody@x.test",
                        "grey@x.test",
                        "b@x.test",
                    )
                )
        assert [(r.outcome, r.status) for r in result.recipients] == [
            (Outcome.DELIVERED, "2.0.0"),
            (Outcome.FAILED, "5.1.1"),
            (Outcome.DEFERRED, "4.2.0"),
            (Outcome.DELIVERED, "2.0.0"),
        ]
        assert [line.split(b":")[0] for line in received[:-1]] == [
            b"MAIL FROM",
            b"RCPT TO",
            b"RCPT TO",
            b"RCPT TO",
            b"RCPT TO",
            b"DATA\r\n",
        ]
        assert received[-1].replace(b"\r\n..", b"\r\n.") == MESSAGE + b".\r\n"

    run(main())


def test_refused_sender_and_refused_recipients_keep_the_session_in_step(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    path = body(tmp_path)
    url = f"smtp://127.0.0.42:{mx_port}"

    async def main() -> None:
        async with mailgate_server(tmp_path, certs, f"127.0.0.42:{mx_port}", "pipelining.test") as (
            server,
            seen,
        ):

            @server.on_mail
            def no_spammers(session: Session, envelope: Envelope, address: str) -> None:
                if address.startswith("spammer@"):
                    raise Reject(553, "sender refused", enhanced="5.7.1")
                if address.startswith("busy@"):
                    raise TempFail(451, "try later", enhanced="4.3.0")

            @server.on_rcpt
            def no_nobody(session: Session, envelope: Envelope, address: str) -> None:
                if address.startswith("nobody"):
                    raise Reject(550, "no such user", enhanced="5.1.1")

            async with make_engine(dns_server, 25) as engine:
                spam = await engine.deliver(
                    request(path, Forward(url), "a@x.test", "b@x.test", sender="spammer@x.test")
                )
                busy = await engine.deliver(
                    request(path, Forward(url), "a@x.test", sender="busy@x.test")
                )
                nobody = await engine.deliver(
                    request(path, Forward(url), "nobody1@x.test", "nobody2@x.test")
                )
                fine = await engine.deliver(
                    request(path, Forward(url), "c@x.test", "nobody@x.test")
                )
        assert [(r.outcome, r.status) for r in spam.recipients] == [(Outcome.FAILED, "5.7.1")] * 2
        assert spam.recipients[0].diagnostic.endswith("(in reply to MAIL FROM command)")
        assert [(r.outcome, r.status) for r in busy.recipients] == [(Outcome.DEFERRED, "4.3.0")]
        assert [(r.outcome, r.status) for r in nobody.recipients] == [(Outcome.FAILED, "5.1.1")] * 2
        assert [(r.outcome, r.status) for r in fine.recipients] == [
            (Outcome.DELIVERED, "2.0.0"),
            (Outcome.FAILED, "5.1.1"),
        ]
        assert [busy.reused, nobody.reused, fine.reused] == [True, True, True]
        assert [e.rcpt_tos for _, e, _ in seen.messages] == [("c@x.test",)]

    run(main())
