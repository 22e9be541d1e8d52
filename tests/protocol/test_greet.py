"""ServerConnection.greet(): the default banner at once, for a caller with nothing to decide
at connect (issue 14) -- the same bytes and the same session afterwards as taking the
Greeting from next_event() and answering it with respond(None)."""

from __future__ import annotations

from datetime import UTC, datetime

from mailgate.protocol import (
    NEED_DATA,
    Greeting,
    Persona,
    ProtocolConfig,
    ServerConnection,
    State,
)

from .session import run_with_defaults


def the_long_way(config: ProtocolConfig) -> tuple[ServerConnection, bytes]:
    conn = ServerConnection(config)
    event = conn.next_event()
    assert isinstance(event, Greeting)
    conn.respond(None)
    return conn, conn.data_to_send()


def test_greet_sends_the_banner_the_long_way_sends() -> None:
    config = ProtocolConfig(hostname="mx.test")
    conn = ServerConnection(config)
    banner = conn.greet()
    _, expected = the_long_way(config)
    assert banner == expected
    assert banner is not None and banner.startswith(b"220 mx.test ")
    assert conn.state is State.CONNECTED
    assert conn.next_event() is NEED_DATA  # the Greeting is not handed out again
    assert conn.data_to_send() == b""  # the banner is the caller's to send, once


def test_the_session_goes_on_as_after_the_long_way() -> None:
    config = ProtocolConfig(hostname="mx.test")
    conn = ServerConnection(config)
    assert conn.greet() is not None
    long_way, _ = the_long_way(config)
    commands = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nQUIT\r\n"
    assert run_with_defaults(conn, commands)[1] == run_with_defaults(long_way, commands)[1]
    assert conn.state is State.CLOSED


def test_a_banner_made_per_connection_takes_the_long_way() -> None:
    ticks = iter(range(10))

    def clock() -> datetime:
        return datetime(2027, 1, 1, 10, 0, next(ticks), tzinfo=UTC)

    for persona in (Persona(banner="{hostname} ESMTP {date}"), Persona(banner="{client_ip} hi")):
        conn = ServerConnection(
            ProtocolConfig(hostname="mx.test", persona=persona, clock=clock), client_ip="192.0.2.1"
        )
        assert conn.greet() is None  # nothing done:
        assert conn.state is State.GREETING
        assert isinstance(conn.next_event(), Greeting)
        conn.respond(None)
        assert conn.data_to_send().startswith(b"220 ")


def test_greet_only_while_the_greeting_waits() -> None:
    config = ProtocolConfig(hostname="mx.test")
    conn = ServerConnection(config)
    assert isinstance(conn.next_event(), Greeting)  # taken: respond() must answer it
    assert conn.greet() is None
    conn.respond(None)
    assert conn.greet() is None  # answered already
    assert conn.state is State.CONNECTED
