"""ForwardDelivery against a second, real mailgate server (SMTP, SMTPS, LMTP) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from tests.server.harness import Certs, maildir_messages, make_certs, strip_received

from mailgate import Reject, Server, TempFail
from mailgate.delivery.forward import ForwardDelivery
from mailgate.hooks import Envelope, Message, Session
from mailgate.smtpclient.body import dot_stuff

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: forwarded\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"  # a lone dot inside the body must survive both hops
    b"last line\r\n"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@dataclass
class Seen:
    """What the target's message hook saw."""

    messages: list[tuple[Session, Envelope, bytes]] = field(default_factory=list)

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        self.messages.append((session, envelope, await message.read()))


def settings(tmp_path: Path, name: str, certs: Certs, **extra: Any) -> dict[str, Any]:
    return {
        "hostname": f"{name}.test",
        "listen": "127.0.0.1:0",
        "state_dir": tmp_path / name / "state",
        "tls_cert": certs.cert,
        "tls_key": certs.key,
        "auth_failure_delay": 0,
        **extra,
    }


@asynccontextmanager
async def target_server(
    tmp_path: Path, certs: Certs, **extra: Any
) -> AsyncIterator[tuple[Server, Seen]]:
    server = Server(**settings(tmp_path, "target", certs, maildir=tmp_path / "target", **extra))
    seen = Seen()
    server.on_message(seen.on_message)
    async with server:
        yield server, seen


@asynccontextmanager
async def front_server(tmp_path: Path, certs: Certs, **extra: Any) -> AsyncIterator[Server]:
    async with Server(**settings(tmp_path, "front", certs, **extra)) as server:
        yield server


@asynccontextmanager
async def front_with(
    tmp_path: Path, certs: Certs, plugin: ForwardDelivery, **extra: Any
) -> AsyncIterator[Server]:
    server = Server(**settings(tmp_path, "front", certs, **extra))
    server.add_plugin(plugin)
    async with server:
        yield server


async def send(
    port: int,
    sender: str,
    rcpts: list[str],
    data: bytes = MESSAGE,
    mail_options: list[str] | None = None,
) -> tuple[int, str]:
    """Send with aiosmtplib; the reply to the end of data (or to the refused step)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        try:
            refused, text = await client.sendmail(sender, rcpts, data, mail_options=mail_options)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        assert not refused
        return 250, text


def target_files(tmp_path: Path) -> list[bytes]:
    return maildir_messages(tmp_path / "target")


def without_trace(data: bytes, hops: int = 2) -> bytes:
    for _ in range(hops):
        data = strip_received(data)
    return data


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- delivery ----------------------------------------------------------------------------------


def test_smtp_forward_from_settings_is_byte_exact(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, seen):
            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                code, text = await send(
                    front.address[1],
                    "alice@example.org",
                    ["bob@example.com", "carol@example.com"],
                    MESSAGE.replace(b"first", "first \u00e9".encode()),
                    mail_options=["BODY=8BITMIME"],
                )
                assert code == 250, text
        [stored] = target_files(tmp_path)
        assert without_trace(stored) == MESSAGE.replace(b"first", "first \u00e9".encode())
        assert stored.startswith(b"Received: from ")  # the target's own trace on top...
        assert stored.count(b"Received: ") == 2  # ...then the front's
        [(session, envelope, _)] = seen.messages
        assert envelope.sender == "alice@example.org"
        assert envelope.rcpt_tos == ("bob@example.com", "carol@example.com")
        assert envelope.body == "8BITMIME"
        assert "SIZE" in envelope.mail_params
        assert session.tls is not None  # opportunistic STARTTLS with an unverified cert

    asyncio.run(main())


def test_null_sender_is_kept(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, seen):
            plugin = ForwardDelivery(f"smtp://127.0.0.1:{target.address[1]}?starttls=no")
            async with front_with(tmp_path, certs, plugin) as front:
                code, text = await send(front.address[1], "", ["bob@example.com"])
                assert code == 250, text
        [(session, envelope, _)] = seen.messages
        assert envelope.mail_from == ""
        assert envelope.sender == ""
        assert session.tls is None  # starttls=no
        assert without_trace(target_files(tmp_path)[0]) == MESSAGE

    asyncio.run(main())


class Dialog:
    """A bare SMTP/LMTP client over asyncio streams: for BDAT and LMTP's many replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Dialog:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        dialog = cls(reader, writer)
        assert (await dialog.reply())[0] == 220
        return dialog

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, "connection closed"
            lines.append(line[4:].decode().strip())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        await self.command("QUIT")
        self.writer.close()


def test_lmtp_target_gets_every_recipient(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs, lmtp=True) as (target, seen):
            url = f"lmtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                code, text = await send(
                    front.address[1], "alice@example.org", ["bob@example.com", "eve@example.com"]
                )
                assert code == 250, text
        [(_, envelope, _)] = seen.messages
        assert envelope.rcpt_tos == ("bob@example.com", "eve@example.com")
        [stored] = target_files(tmp_path)
        target_trace = stored[: len(stored) - len(strip_received(stored))]
        assert b"with LMTPS" in target_trace  # LMTP, upgraded with STARTTLS
        assert without_trace(stored) == MESSAGE

    asyncio.run(main())


def test_lmtp_replies_per_recipient_reach_an_lmtp_front(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs, lmtp=True) as (target, _):

            @target.on_rcpt
            def no_nobody(session: Session, envelope: Envelope, address: str) -> None:
                if address.startswith("nobody@"):
                    raise Reject(550, "no such user here", enhanced="5.1.1")

            @target.on_message(before="maildir")
            def full_mailbox(session: Session, envelope: Envelope, message: Message) -> Any:
                return [
                    Reject(552, "mailbox full", enhanced="5.2.2") if "full" in r else None
                    for r in envelope.rcpt_tos
                ]

            plugin = ForwardDelivery(f"lmtp://127.0.0.1:{target.address[1]}")
            async with front_with(tmp_path, certs, plugin, lmtp=True) as front:

                @front.on_connect
                def lmtp_session(session: Session) -> None:
                    # Work-around: the server does not set Session.lmtp yet
                    # (src/mailgate/server/connection.py creates Session without it).
                    session.lmtp = True

                dialog = await Dialog.open(front.address[1])
                assert (await dialog.command("LHLO client.test"))[0] == 250
                assert (await dialog.command("MAIL FROM:<alice@example.org>"))[0] == 250
                for rcpt in ("bob@example.com", "full@example.com", "nobody@example.com"):
                    assert (await dialog.command(f"RCPT TO:<{rcpt}>"))[0] == 250
                assert (await dialog.command("DATA"))[0] == 354
                dialog.writer.write(dot_stuff(MESSAGE, b"\r\n") + b".\r\n")
                replies = [await dialog.reply() for _ in range(3)]
                await dialog.close()
        assert replies[0][0] == 250
        assert replies[1] == (552, "5.2.2 Forwarding refused (message refused): mailbox full")
        assert replies[2] == (
            550,
            "5.1.1 Forwarding refused (recipient refused): no such user here",
        )

    asyncio.run(main())


def test_lmtp_partial_refusal_to_an_smtp_front_is_a_451(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs, lmtp=True) as (target, _):

            @target.on_message(before="maildir")
            def full_mailbox(session: Session, envelope: Envelope, message: Message) -> Any:
                return [
                    Reject(552, "mailbox full", enhanced="5.2.2") if "full" in r else None
                    for r in envelope.rcpt_tos
                ]

            url = f"lmtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                port = front.address[1]
                partial = await send(port, "a@example.org", ["bob@example.com", "full@example.com"])
                everyone = await send(port, "a@example.org", ["full@example.com"])
        # Delivered to one of two: the client must retry (a copy twice beats a copy lost).
        assert partial[0] == 451
        assert partial[1].startswith("4.4.0 Forwarding incomplete")
        assert "refused 1 of 2 recipients (first: 552 5.2.2 mailbox full)" in partial[1]
        assert everyone == (552, "5.2.2 Forwarding refused (message refused): mailbox full")

    asyncio.run(main())


# --- refusals and failures -------------------------------------------------------------------------


def test_target_refusing_the_recipient_gives_a_5xx_at_end_of_data(
    tmp_path: Path, certs: Certs
) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, seen):

            @target.on_rcpt
            def no_nobody(session: Session, envelope: Envelope, address: str) -> None:
                raise Reject(550, "no such user here", enhanced="5.1.1")

            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                reply = await send(front.address[1], "a@example.org", ["nobody@example.com"])
        assert reply == (550, "5.1.1 Forwarding refused (recipient refused): no such user here")
        assert seen.messages == []

    asyncio.run(main())


def test_partial_recipient_refusal_sends_nothing_and_names_the_count(
    tmp_path: Path, certs: Certs
) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, seen):

            @target.on_rcpt
            def no_nobody(session: Session, envelope: Envelope, address: str) -> None:
                if address.startswith("nobody@"):
                    raise Reject(550, "no such user here", enhanced="5.1.1")

            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                code, text = await send(
                    front.address[1], "a@example.org", ["bob@example.com", "nobody@example.com"]
                )
        assert code == 451
        assert text == (
            "4.4.0 Forwarding incomplete: the next server refused 1 of 2 recipients "
            "(first: 550 5.1.1 no such user here)"
        )
        assert seen.messages == [] and target_files(tmp_path) == []

    asyncio.run(main())


def test_remote_temporary_failures_and_data_refusals_pass_through(
    tmp_path: Path, certs: Certs
) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, _):

            @target.on_rcpt
            def greylist(session: Session, envelope: Envelope, address: str) -> None:
                if address.startswith("grey@"):
                    raise TempFail(450, "greylisted, come back later", enhanced="4.7.1")

            @target.on_message(before="maildir")
            def no_spam(session: Session, envelope: Envelope, message: Message) -> None:
                if b"spam" in message.read_bytes():
                    raise Reject(554, "looks like spam", enhanced="5.7.1")

            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                port = front.address[1]
                grey = await send(port, "a@example.org", ["grey@example.com"])
                spam = await send(port, "a@example.org", ["bob@example.com"], MESSAGE + b"spam\r\n")
        assert grey == (
            450,
            "4.7.1 Forwarding failed (recipient refused): greylisted, come back later",
        )
        assert spam == (554, "5.7.1 Forwarding refused (message refused): looks like spam")

    asyncio.run(main())


def test_target_down_gives_451_quickly(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        plugin = ForwardDelivery(f"smtp://127.0.0.1:{closed_port()}", timeout=5)
        async with front_with(tmp_path, certs, plugin) as front:
            started = loop.time()
            code, text = await send(front.address[1], "a@example.org", ["bob@example.com"])
            assert loop.time() - started < 3
        assert (code, text) == (451, "4.4.1 Forwarding failed: cannot connect to the next server")

    asyncio.run(main())


def test_target_that_stops_answering_times_out_with_451(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 slow.test ESMTP\r\n")
            while await reader.read(100):  # EHLO, never answered; until the client leaves
                pass
            writer.close()

        listener = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        plugin = ForwardDelivery(f"smtp://127.0.0.1:{port}", timeout=0.3)
        async with listener, front_with(tmp_path, certs, plugin) as front:
            reply = await send(front.address[1], "a@example.org", ["bob@example.com"])
        assert reply == (451, "4.4.2 Forwarding failed: the next server timed out")

    asyncio.run(main())


# --- TLS and AUTH ------------------------------------------------------------------------------------


def test_smtps_verified_with_a_cafile(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs, listen=[], smtps_listen="127.0.0.1:0") as (
            target,
            seen,
        ):
            port = target.address[1]
            trusting = ForwardDelivery(f"smtps://localhost:{port}?cafile={certs.ca_file}")
            async with front_with(tmp_path, certs, trusting) as front:
                assert (await send(front.address[1], "a@example.org", ["b@example.com"]))[0] == 250
            context = ssl.create_default_context()
            certs.ca.configure_trust(context)
            by_context = ForwardDelivery(f"smtps://localhost:{port}", tls_context=context)
            async with front_with(tmp_path, certs, by_context) as front:
                assert (await send(front.address[1], "a@example.org", ["c@example.com"]))[0] == 250
            doubting = ForwardDelivery(f"smtps://localhost:{port}")  # system CAs only
            async with front_with(tmp_path, certs, doubting) as front:
                refused = await send(front.address[1], "a@example.org", ["d@example.com"])
        assert [s.tls is not None for s, _, _ in seen.messages] == [True, True]
        assert [e.rcpt_tos for _, e, _ in seen.messages] == [("b@example.com",), ("c@example.com",)]
        assert refused == (451, "4.7.5 Forwarding failed: TLS with the next server failed")
        assert [without_trace(m) for m in target_files(tmp_path)] == [MESSAGE, MESSAGE]

    asyncio.run(main())


def test_auth_over_required_starttls(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with target_server(tmp_path, certs, auth_users=["fwd:s3cret:x"]) as (target, seen):
            port = target.address[1]
            good = f"smtp://fwd:s3cret%3Ax@localhost:{port}?starttls=require&cafile={certs.ca_file}"
            async with front_with(tmp_path, certs, ForwardDelivery(good)) as front:
                ok = await send(front.address[1], "a@example.org", ["b@example.com"])
            bad = good.replace("s3cret", "wrong")
            async with front_with(tmp_path, certs, ForwardDelivery(bad)) as front:
                wrong = await send(front.address[1], "a@example.org", ["b@example.com"])
            plain = f"smtp://fwd:s3cret%3Ax@localhost:{port}?starttls=no"
            async with front_with(tmp_path, certs, ForwardDelivery(plain)) as front:
                cleartext = await send(front.address[1], "a@example.org", ["b@example.com"])
        assert ok[0] == 250, ok
        assert [s.user for s, _, _ in seen.messages] == ["fwd"]
        assert wrong == (451, "4.7.0 Forwarding failed: the next server refused our credentials")
        assert cleartext == (451, "4.7.0 Forwarding failed: will not authenticate without TLS")

    asyncio.run(main())


def test_starttls_require_without_offer_is_a_451(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async def no_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 old.test\r\n")
            while line := await reader.readline():
                if line.upper().startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
                    break
                writer.write(b"250-old.test\r\n250 8BITMIME\r\n")
            writer.close()

        listener = await asyncio.start_server(no_tls, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        plugin = ForwardDelivery(f"smtp://127.0.0.1:{port}?starttls=require")
        async with listener, front_with(tmp_path, certs, plugin) as front:
            reply = await send(front.address[1], "a@example.org", ["bob@example.com"])
        assert reply == (451, "4.7.4 Forwarding failed: the next server offers no TLS")

    asyncio.run(main())


# --- the bytes ---------------------------------------------------------------------------------


def test_large_message_with_dot_lines_streams_exactly(tmp_path: Path, certs: Certs) -> None:
    lines = [b".%d dotted line %s" % (i, b"x" * (i % 97)) for i in range(60_000)]
    big = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(big) > 3_000_000

    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, _):
            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                code, text = await send(front.address[1], "a@example.org", ["b@example.com"], big)
                assert code == 250, text
        [stored] = target_files(tmp_path)
        assert without_trace(stored) == big

    asyncio.run(main())


def test_binarymime_goes_by_bdat(tmp_path: Path, certs: Certs) -> None:
    payload = b"Subject: bin\r\n\r\n\x00\x01 binary\r\n.\r\nno final newline \xff"

    async def main() -> None:
        async with target_server(tmp_path, certs) as (target, seen):
            url = f"smtp://127.0.0.1:{target.address[1]}"
            async with front_server(tmp_path, certs, forward=[url]) as front:
                dialog = await Dialog.open(front.address[1])
                assert (await dialog.command("EHLO client.test"))[0] == 250
                assert (await dialog.command("MAIL FROM:<a@example.org> BODY=BINARYMIME"))[0] == 250
                assert (await dialog.command("RCPT TO:<b@example.com>"))[0] == 250
                dialog.writer.write(b"BDAT %d LAST\r\n" % len(payload) + payload)
                code, text = await dialog.reply()
                await dialog.close()
                assert code == 250, text
        [(_, envelope, _)] = seen.messages
        assert envelope.body == "BINARYMIME"
        assert without_trace(target_files(tmp_path)[0]) == payload

    asyncio.run(main())


# --- construction ------------------------------------------------------------------------------


def test_names_ports_and_url_errors() -> None:
    assert ForwardDelivery("smtp://mx.example.com").name == "forward:mx.example.com:25"
    assert ForwardDelivery("smtps://mx.example.com").name == "forward:mx.example.com:465"
    assert ForwardDelivery("LMTP://[::1]").name == "forward:[::1]:24"
    plugin = ForwardDelivery("smtp://u:p@10.0.0.1:2525", required=False)
    assert plugin.name == "forward:10.0.0.1:2525" and plugin.required is False
    assert "p@" not in repr(plugin)
    for url, problem in [
        ("http://mx.example.com", "use smtp://"),
        ("smtp://:25", "names no host"),
        ("smtp://mx.example.com:99999", "[Pp]ort"),
        ("smtp://mx.example.com/path", "no path"),
        ("smtp://mx.example.com?color=red", "unknown option"),
        ("smtp://mx.example.com?starttls=maybe", "starttls must be"),
        ("smtps://mx.example.com?starttls=no", "TLS already"),
        ("smtp://mx.example.com?cafile=/nonexistent/ca.pem", "cannot load cafile"),
    ]:
        with pytest.raises(ValueError, match=problem):
            ForwardDelivery(url)
    with pytest.raises(ValueError, match=r"'smtp://u:\*\*\*@mx.example.com:99999'") as info:
        ForwardDelivery("smtp://u:secret@mx.example.com:99999")
    assert "secret" not in str(info.value)


def test_bad_forward_setting_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="forward"):
        Server(listen="127.0.0.1:0", state_dir=tmp_path, forward=["ftp://mx.example.com"])


@pytest.mark.parametrize("cut", range(0, 12))
def test_dot_stuffing_is_the_same_however_the_stream_is_cut(cut: int) -> None:
    data = b".a\r\n.\r\nb\r\n..c\r\n"
    whole = dot_stuff(data, b"\r\n")
    assert whole == b"..a\r\n..\r\nb\r\n...c\r\n"
    first, second = data[:cut], data[cut:]
    before = (b"\r\n" + first)[-2:]
    assert dot_stuff(first, b"\r\n") + dot_stuff(second, before) == whole
