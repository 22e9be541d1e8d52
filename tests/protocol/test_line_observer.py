"""ServerConnection(on_line=...): the public line observer a transcript recorder uses."""

from __future__ import annotations

import base64

from mailgate.protocol import (
    NEED_DATA,
    PAUSED,
    PolicyPoint,
    ProtocolConfig,
    ServerConnection,
)


def drive(conn: ServerConnection, data: bytes) -> bytes:
    """Feed ``data``, answer every policy point with the default reply (AUTH: accepted),
    and return what the server would write."""
    conn.receive_data(data)
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            break
        if isinstance(event, PolicyPoint):
            conn.respond(None)
    return conn.data_to_send()


def config() -> ProtocolConfig:
    return ProtocolConfig(
        hostname="mx.test",
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_requires_tls=False,
        max_command_line=80,
    )


def test_observer_sees_command_and_auth_lines_but_not_message_content() -> None:
    lines: list[bytes] = []
    conn = ServerConnection(config(), on_line=lines.append)
    user = base64.b64encode(b"alice")
    password = base64.b64encode(b"secret")
    out = drive(
        conn,
        b"EHLO client.test\r\nAUTH LOGIN\r\n" + user + b"\r\n" + password + b"\r\n"
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\nbody line\r\n.\r\nQUIT\r\n",
    )
    assert out.startswith(b"220 ")
    assert lines == [
        b"EHLO client.test",
        b"AUTH LOGIN",
        user,
        password,
        b"MAIL FROM:<a@b.test>",
        b"RCPT TO:<c@d.test>",
        b"DATA",
        b"QUIT",
    ]


def test_observer_is_told_before_the_line_is_acted_on() -> None:
    seen: list[tuple[bytes, str]] = []
    conn = ServerConnection(config(), on_line=lambda line: seen.append((line, conn.state.name)))
    drive(conn, b"EHLO client.test\r\n")
    assert seen == [(b"EHLO client.test", "CONNECTED")]


def test_lines_refused_as_too_long_are_not_observed() -> None:
    lines: list[bytes] = []
    conn = ServerConnection(config(), on_line=lines.append)
    out = drive(conn, b"EHLO " + b"x" * 200 + b"\r\nNOOP\r\n")
    assert b"500 " in out
    assert lines == [b"NOOP"]


def test_an_observer_changes_nothing_on_the_wire() -> None:
    # (It used to rebind the line handlers on the instance; the compiled build has no
    # instance __dict__, so a connection now keeps the observer, or None, and tests it.)
    plain = ServerConnection(config())
    observed = ServerConnection(config(), on_line=lambda line: None)
    session = b"EHLO a.test\r\nAUTH PLAIN\r\n*\r\nNOOP\r\n"
    assert drive(plain, session) == drive(observed, session)
