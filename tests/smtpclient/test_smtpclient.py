"""mailgate.smtpclient on its own: URL parsing, parameters, replies, TLS errors and the
message streamed on a real loopback connection. (ForwardDelivery's and the outbound
engine's tests run all of it against real servers, too.)"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtplib import SMTPResponse
from hypothesis import given
from hypothesis import strategies as st

from mailgate.smtpclient import (
    BodyProtocol,
    SmartHost,
    dot_stuff,
    mail_params,
    parse_url,
    rcpt_params,
    redact,
    send_message,
    split_reply,
    ssl_error,
)


def client_with(extensions: str) -> aiosmtplib.SMTP:
    """An unconnected client that believes the server's EHLO offered ``extensions``."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1")
    smtp.last_ehlo_response = SMTPResponse(250, "mx.example\n" + extensions.replace(" | ", "\n"))
    return smtp


def byte_xtext(value: str) -> bytes:
    """The xtext encoder delivery.forward had before it used mailgate.protocol.xtext."""
    out = bytearray()
    for byte in value.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(byte)
        else:
            out += b"+%02X" % byte
    return bytes(out)


# --- target --------------------------------------------------------------------------------


def test_parse_url_defaults_and_options() -> None:
    assert parse_url("smtp://mail.internal") == SmartHost(
        "smtp", "mail.internal", 25, None, None, "auto", None
    )
    assert parse_url("smtps://u%40x:p%3Aw@[::1]") == SmartHost(
        "smtps", "::1", 465, "u@x", "p:w", "no", None
    )
    assert parse_url("LMTP://h:2424?starttls=require&cafile=/ca.pem") == SmartHost(
        "lmtp", "h", 2424, None, None, "require", "/ca.pem"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "use smtp://, smtps:// or lmtp://"),
        ("smtp://", "names no host"),
        ("smtp://h/path", "no path or fragment"),
        ("smtp://h?tls=1", "unknown option 'tls'"),
        ("smtp://h?starttls=maybe", "starttls must be auto, require or no"),
        ("smtps://h?starttls=no", "drop starttls="),
        ("smtp://:secret@h", "a password needs a user name"),
        ("smtp://u:secret@h:99999", "forward URL 'smtp://u:***@h:99999'"),
    ],
)
def test_parse_url_refuses_with_one_line_that_never_shows_the_password(
    url: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        parse_url(url)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_redact() -> None:
    assert redact("smtp://user:pw@host:25?x=1") == "smtp://user:***@host:25?x=1"
    assert redact("smtp://host:25") == "smtp://host:25"


# --- params --------------------------------------------------------------------------------


def test_mail_params_only_what_the_server_understands() -> None:
    everything = dict(size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="a+b=c")
    assert mail_params(client_with("SIZE 0 | 8BITMIME | DSN"), **everything) == [
        b"SIZE=1234",
        b"BODY=8BITMIME",
        b"SMTPUTF8",
        b"RET=HDRS",
        b"ENVID=a+2Bb+3Dc",
    ]
    assert mail_params(client_with("PIPELINING"), **everything) == [b"SMTPUTF8"]
    binary = dict(everything, body="BINARYMIME", smtputf8=False)
    assert mail_params(client_with("CHUNKING"), **binary) == [b"BODY=BINARYMIME"]


def test_rcpt_params_need_dsn() -> None:
    dsn = client_with("DSN")
    assert rcpt_params(client_with("SIZE"), notify="NEVER", orcpt="rfc822;b@x") == []
    assert rcpt_params(dsn, notify="SUCCESS,FAILURE", orcpt="rfc822;bob+x@example.org") == [
        b"NOTIFY=SUCCESS,FAILURE",
        b"ORCPT=rfc822;bob+2Bx@example.org",
    ]
    assert rcpt_params(dsn, notify=None, orcpt="utf-8;j\u00f6rg\\@example.org") == [
        b"ORCPT=utf-8;j\\x{F6}rg\\x{5C}@example.org"
    ]


@given(st.text())
def test_xtext_is_what_forward_sent_before(value: str) -> None:
    dsn = client_with("DSN")
    try:
        expected = byte_xtext(value)
    except UnicodeEncodeError:  # a lone surrogate: neither encoder takes it
        with pytest.raises(UnicodeEncodeError):
            mail_params(dsn, size=0, body=None, smtputf8=False, ret=None, envid=value)
        return
    params = mail_params(dsn, size=0, body=None, smtputf8=False, ret=None, envid=value)
    assert params == ([b"ENVID=" + expected] if value else [])


# --- replies and errors --------------------------------------------------------------------


def test_split_reply_takes_the_first_enhanced_code_and_cleans_the_text() -> None:
    response = SMTPResponse(550, "5.1.1 no such\x07 user\n5.1.1 ask   \n\n" + "x" * 300)
    status, lines = split_reply(response)
    assert status == "5.1.1"
    assert lines == ["no such? user", "ask", "x" * 200]
    assert split_reply(SMTPResponse(250, "ok")) == (None, ["ok"])
    assert len(split_reply(SMTPResponse(421, "\n".join("abcdefg")))[1]) == 5


def test_ssl_error_is_found_behind_wrappers() -> None:
    cause = ssl.SSLError(1, "bad certificate")
    try:
        try:
            raise cause
        except ssl.SSLError as exc:
            raise aiosmtplib.SMTPConnectError("TLS failed") from exc
    except aiosmtplib.SMTPConnectError as wrapped:
        assert ssl_error(wrapped) is cause
    assert ssl_error(ConnectionResetError()) is None
    assert ssl_error(None) is None


# --- body ----------------------------------------------------------------------------------


def test_dot_stuff_at_the_start_of_the_message_and_after_a_split_crlf() -> None:
    assert dot_stuff(b".x\r\n", b"\r\n") == b"..x\r\n"
    assert dot_stuff(b"\n.x", b"a\r") == b"\n..x"
    assert dot_stuff(b".x", b"ab") == b".x"


def test_send_message_streams_a_large_file_and_collects_back_to_back_replies(
    tmp_path: Path,
) -> None:
    # Longer than a few chunks, with lines that need dot-stuffing on chunk boundaries.
    message = b"".join(b".line %d\r\n" % n for n in range(120_000))
    path = tmp_path / "message"
    path.write_bytes(message)
    received = bytearray()

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250-2.0.0 first\r\n250 2.0.0 ok\r\n452 4.2.2 full\r\n")  # LMTP-like
        await writer.drain()
        writer.close()

    async def send() -> list[SMTPResponse]:
        server = await asyncio.start_server(receiver, "127.0.0.1", 0, limit=len(message) * 2)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        async with server, asyncio.timeout(30):
            transport, protocol = await loop.create_connection(
                lambda: BodyProtocol(loop, 10.0), "127.0.0.1", port
            )
            try:
                with path.open("rb") as file:
                    await send_message(transport, protocol, file)
                return [await protocol.reply(), await protocol.reply()]
            finally:
                transport.close()

    replies = asyncio.run(send())
    assert replies == [
        SMTPResponse(250, "2.0.0 first\n2.0.0 ok"),
        SMTPResponse(452, "4.2.2 full"),
    ]
    assert bytes(received) == message.replace(b".line", b"..line") + b".\r\n"
