"""The protocol's short cuts for the common case (issue 14) answer exactly as the long way:
the HELO/EHLO answers kept per configuration, the default answers written as ready bytes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailgate.protocol import (
    COMPILED,
    NEED_DATA,
    Persona,
    PolicyPoint,
    ProtocolConfig,
    Reply,
    ServerConnection,
)
from mailgate.protocol.config import BareNewline
from mailgate.protocol.connection import _MAX_HELLOS, _look_for
from mailgate.protocol.data import DotReader

from .session import run_with_defaults

EHLO_REPLY = (
    b"250-mx.test Hello client.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n"
    b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n"
    b"250-BINARYMIME\r\n250-DSN\r\n250-VRFY\r\n250 HELP\r\n"
)


def greet(config: ProtocolConfig, line: bytes, **kwargs: object) -> tuple[bytes, frozenset[str]]:
    conn = ServerConnection(config, **kwargs)  # type: ignore[arg-type]
    _, out = run_with_defaults(conn, line)
    return out, conn.extensions


def test_the_same_hello_answer_from_the_cache() -> None:
    config = ProtocolConfig(hostname="mx.test")
    first = greet(config, b"EHLO client.test\r\n")
    assert first[0] == EHLO_REPLY
    assert _look_for(config).hellos  # kept
    for _ in range(3):
        assert greet(config, b"EHLO client.test\r\n") == first
    helo = greet(config, b"HELO client.test\r\n")
    assert helo == (b"250 mx.test Hello client.test\r\n", frozenset())
    assert greet(config, b"HELO client.test\r\n") == helo
    # Another name is answered with its own name, not the one kept.
    other = greet(config, b"EHLO other.test\r\n")
    assert other[0].startswith(b"250-mx.test Hello other.test\r\n")
    assert other[1] == first[1]


def test_the_cache_tells_tls_and_trust_apart() -> None:
    config = ProtocolConfig(
        hostname="mx.test",
        starttls=True,
        auth_mechanisms=("PLAIN",),
        xclient=True,
    )
    plain = greet(config, b"EHLO client.test\r\n")
    secure = greet(config, b"EHLO client.test\r\n", tls_active=True)
    trusted = greet(config, b"EHLO client.test\r\n", peer_trusted=True)
    assert "STARTTLS" in plain[1] and "AUTH" not in plain[1]
    assert "STARTTLS" not in secure[1] and "AUTH" in secure[1] and "REQUIRETLS" in secure[1]
    assert "XCLIENT" in trusted[1] and "XCLIENT" not in plain[1]
    # Asked again in another order, each is still its own.
    assert greet(config, b"EHLO client.test\r\n", peer_trusted=True) == trusted
    assert greet(config, b"EHLO client.test\r\n", tls_active=True) == secure
    assert greet(config, b"EHLO client.test\r\n") == plain


def test_a_greeting_with_the_client_address_is_kept_per_address() -> None:
    persona = Persona(ehlo_greeting="{hostname} Hello {helo} [{client_ip}]")
    config = ProtocolConfig(hostname="mx.test", persona=persona)
    one = greet(config, b"EHLO c.test\r\n", client_ip="192.0.2.1")
    two = greet(config, b"EHLO c.test\r\n", client_ip="192.0.2.2")
    assert one[0].startswith(b"250-mx.test Hello c.test [192.0.2.1]\r\n")
    assert two[0].startswith(b"250-mx.test Hello c.test [192.0.2.2]\r\n")
    assert greet(config, b"EHLO c.test\r\n", client_ip="192.0.2.1") == one


def test_a_greeting_with_the_date_is_made_anew() -> None:
    ticks = iter(range(10))

    def clock() -> datetime:
        return datetime(2027, 1, 1, 10, 0, next(ticks), tzinfo=UTC)

    persona = Persona(helo_greeting="{hostname} at {date}")
    config = ProtocolConfig(hostname="mx.test", persona=persona, clock=clock)
    first = greet(config, b"HELO c.test\r\n")
    second = greet(config, b"HELO c.test\r\n")
    assert first != second  # each has its own time
    assert not _look_for(config).hellos


def test_a_policy_answer_to_hello_is_not_kept() -> None:
    config = ProtocolConfig(hostname="mx.test")
    conn = ServerConnection(config)
    conn.next_event()
    conn.respond(None)
    conn.receive_data(b"EHLO c.test\r\n")
    conn.next_event()
    conn.respond(Reply(250, None, ("welcome, c.test",)))
    assert conn.data_to_send().split(b"\r\n")[1] == b"250-welcome, c.test"
    assert not _look_for(config).hellos
    # The default answer after it is the default one.
    assert greet(config, b"EHLO c.test\r\n")[0].startswith(b"250-mx.test Hello c.test\r\n")


def test_the_cache_is_bounded() -> None:
    config = ProtocolConfig(hostname="mx.test")
    for n in range(_MAX_HELLOS + 10):
        out, _ = greet(config, f"HELO n{n}.test\r\n".encode())
        assert out == f"250 mx.test Hello n{n}.test\r\n".encode()
    assert len(_look_for(config).hellos) <= _MAX_HELLOS


MESSAGE = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"


def test_default_answers_as_written_bytes() -> None:
    conn = ServerConnection(ProtocolConfig(hostname="mx.test"))
    _, out = run_with_defaults(conn, b"EHLO c.test\r\n" + MESSAGE + MESSAGE)
    transaction = (
        b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Message accepted\r\n"
    )
    assert out.endswith(transaction + transaction)
    conn = ServerConnection(ProtocolConfig(hostname="mx.test"))
    _, out = run_with_defaults(conn, b"HELO c.test\r\n" + MESSAGE)
    # Without EHLO, enhanced codes are still written (RFC 2034 leaves it to the server).
    assert out.endswith(transaction)


def test_persona_answers_take_their_own_way() -> None:
    persona = Persona(
        replies={
            "sender_ok": "<{address}>... Sender ok",
            "recipient_ok": Reply(250, None, ("Ok",)),
            "start_data": "Go ahead",
            "message_accepted": "{hostname} took it",
        },
        enhanced_status_codes=False,
    )
    conn = ServerConnection(ProtocolConfig(hostname="mx.test", persona=persona))
    _, out = run_with_defaults(conn, b"EHLO c.test\r\n" + MESSAGE)
    assert out.endswith(
        b"250 <a@x.test>... Sender ok\r\n250 Ok\r\n354 Go ahead\r\n250 mx.test took it\r\n"
    )


def answered(conn: ServerConnection) -> bytes:
    """Every policy point answered with the default; what the connection wrote."""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return conn.data_to_send()
        if isinstance(event, PolicyPoint):
            conn.respond(None)


def test_received_bytes_in_pieces() -> None:
    conn = ServerConnection(ProtocolConfig(hostname="mx.test"))
    run_with_defaults(conn, b"HELO c.test\r\n")
    # A command in pieces, and one piece holding the end of one and the start of another.
    for piece in (b"NO", b"OP\r\nNO", b"OP", b"\r\n"):
        conn.receive_data(piece)
    assert answered(conn) == b"250 2.0.0 OK\r\n" * 2
    conn.receive_data(b"NO")
    assert answered(conn) == b""
    conn.receive_data(b"OP\r\n")
    assert answered(conn) == b"250 2.0.0 OK\r\n"
    # BDAT 0 LAST ends the message with nothing more received.
    conn.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 0 LAST\r\n")
    assert answered(conn).endswith(b"250 2.0.0 Message accepted\r\n")


# --- DotReader: a whole message in one piece -------------------------------------------


def read(pieces: list[bytes], **limits: object) -> tuple[bytes, object, int, bool, bytes]:
    """What a DotReader makes of ``pieces`` fed in turn: (data, error, size, done, the
    bytes left after the end). The data of a refused message is left out: how much of it
    came out before the refusal depends on the pieces."""
    reader = DotReader(
        max_size=limits.get("max_size"),  # type: ignore[arg-type]
        max_line=limits.get("max_line"),  # type: ignore[arg-type]
        bare_newline=limits.get("policy", BareNewline.REJECT),  # type: ignore[arg-type]
    )
    data = b""
    pending = b""
    for piece in pieces:
        pending += piece
        chunks, end, _ = reader.feed(pending)
        data += b"".join(chunks)
        pending = pending[end:]
    return data if reader.error is None else b"", reader.error, reader.size, reader.done, pending


WHOLE_MESSAGES = [
    b"Subject: a\r\n\r\nbody\r\n.\r\n",
    b"\r\n.\r\n",
    b"a\r\n.\r\n",
    b"bare\rCR and bare\nLF\r\n.\r\n",  # content under REJECT: no dot after them
    b"a\r\n..stuffed\r\n.\r\n",
    b"a\n.b\r\n.\r\n",  # dot after a bare LF: refused
    b"a\r.b\r\n.\r\n",  # dot after a bare CR: refused
    b"a\r\n.\nb\r\n.\r\n",  # lone dot ended by a bare LF: refused
    b"a\r\n.\r\nb\r\n.\r\n",  # an earlier end: what follows it is not data
    b"x" * 30 + b"\r\n.\r\n",
    b".a\r\n.\r\n",  # a stuffed dot at the very start
    b"a.b.c\r\nd.e\r\n.\r\n",  # dots, none at a line start
    b"\n.a\r\n.\r\n",  # a bare LF first, then a dot: refused
    b"\r.a\r\n.\r\n",  # a bare CR first, then a dot: refused
    b"a." * 40 + b"\r\n.\r\n",  # many dots, none at a line start
    b"a." * 40 + b"\r\n..b\r\n.\r\n",  # ... and a stuffed one after them
]


@pytest.mark.parametrize("wire", WHOLE_MESSAGES)
@pytest.mark.parametrize(
    "limits",
    [{}, {"max_size": 32}, {"max_size": 10}, {"max_line": 30}, {"max_line": 29}, {"max_line": 3}],
)
def test_one_piece_reads_as_in_pieces(wire: bytes, limits: dict[str, object]) -> None:
    # In two pieces the reader never sees the whole message at its start: the general way.
    assert read([wire], **limits) == read([wire[:1], wire[1:]], **limits)
    assert read([wire], **limits) == read([bytes([b]) for b in wire], **limits)
    # The same after a command line in the same buffer (pipelined DATA).
    reader = DotReader(
        max_size=limits.get("max_size"),  # type: ignore[arg-type]
        max_line=limits.get("max_line"),  # type: ignore[arg-type]
        bare_newline=BareNewline.REJECT,
    )
    chunks, end, _ = reader.feed(b"DATA\r\n" + wire, 6)
    data = b"".join(chunks) if reader.error is None else b""
    found = (data, reader.error, reader.size, reader.done, wire[end - 6 :])
    assert found == read([wire], **limits)
    # The same from a bytearray (the connection's buffer while bytes are left over).
    reader = DotReader(
        max_size=limits.get("max_size"),  # type: ignore[arg-type]
        max_line=limits.get("max_line"),  # type: ignore[arg-type]
        bare_newline=BareNewline.REJECT,
    )
    chunks, end, _ = reader.feed(bytearray(b"DATA\r\n" + wire), 6)
    assert all(type(chunk) is bytes for chunk in chunks)
    data = b"".join(chunks) if reader.error is None else b""
    found = (data, reader.error, reader.size, reader.done, wire[end - 6 :])
    assert found == read([wire], **limits)


@pytest.mark.skipif(COMPILED, reason="the compiled build takes bytes alone (TypeError)")
def test_received_bytes_are_not_shared_with_the_caller() -> None:
    # The connection keeps the received bytes object as its buffer: anything else (a
    # reused bytearray, a memoryview of one) is copied, so the caller may change it.
    conn = ServerConnection(ProtocolConfig(hostname="mx.test"))
    run_with_defaults(conn, b"HELO c.test\r\n")
    incoming = bytearray(b"NOOP\r\nNO")
    conn.receive_data(incoming)  # type: ignore[arg-type]
    incoming[:] = b"QUIT\r\nQU"
    assert answered(conn) == b"250 2.0.0 OK\r\n"
    view = bytearray(b"OP\r\n")
    conn.receive_data(memoryview(view))  # type: ignore[arg-type]
    view[:] = b"IT\r\n"
    assert answered(conn) == b"250 2.0.0 OK\r\n"


def test_received_bytes_left_over_then_more() -> None:
    # A line left over from one read, completed by the next while a policy point waits.
    conn = ServerConnection(ProtocolConfig(hostname="mx.test"))
    run_with_defaults(conn, b"HELO c.test\r\n")
    conn.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@")
    assert isinstance(conn.next_event(), PolicyPoint)  # MAIL waits for its answer
    conn.receive_data(b"y.test>\r\nDATA\r\n")
    conn.receive_data(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert conn.buffered > 0
    conn.respond(None)
    assert answered(conn) == (
        b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Message accepted\r\n250 2.0.0 OK\r\n"
    )
