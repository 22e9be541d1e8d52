"""HoneypotPlugin's reply options (how honeypot mode gives it a persona's words), and
honeypot mode saying the open relay in its own start line only."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import time
from pathlib import Path

import pytest
from tests.honeypot.test_plugin import client, honeypot, query, wait_closed

from mailgate.config import HoneypotOptions
from mailgate.honeypot.mode import build_server
from mailgate.honeypot.store import RawMessage
from mailgate.hooks import Message, Session
from mailgate.protocol import Reply
from mailgate.server.options import ListenAddress, ServerOptions

MESSAGE = b"Message-ID: <abc@sender.example>\r\nSubject: hi\r\n\r\nhello\r\n"


def test_message_reply_is_given_what_was_stored(tmp_path: Path) -> None:
    seen: list[tuple[str, bytes | None]] = []

    def queued(session: Session, message: Message, raw: RawMessage | None) -> Reply:
        seen.append((message.id, raw.head if raw is not None else None))
        return Reply(250, "2.0.0", (f"Queued as Q{len(seen)} for {session.peer_host}",))

    with honeypot(tmp_path, message_reply=queued) as (srv, plugin):
        with client(srv) as smtp:
            smtp.ehlo("x")
            smtp.mail("a@sender.example")
            smtp.rcpt("b@rcpt.example")
            code, text = smtp.data(MESSAGE)
        wait_closed(plugin.store, tmp_path, 1)
    assert (code, text) == (250, b"2.0.0 Queued as Q1 for 127.0.0.2")
    [(message_id, head)] = seen
    assert head is not None and head.startswith(b"Message-ID: <abc@sender.example>")
    assert query(tmp_path, "SELECT id FROM messages") == [(message_id,)]


def test_auth_drop_reply_words_the_hang_up(tmp_path: Path) -> None:
    def dropped(session: Session) -> Reply:
        return Reply(535, "5.7.0", ("Incorrect authentication data",))

    with honeypot(tmp_path, drop_after_credentials=True, auth_drop_reply=dropped) as (srv, _):
        smtp = client(srv)
        smtp.ehlo("x")
        smtp.user, smtp.password = "bob", "letmein"
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            smtp.auth("PLAIN", smtp.auth_plain)
        assert caught.value.smtp_code == 535
        assert caught.value.smtp_error == b"5.7.0 Incorrect authentication data"
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
        smtp.close()


def test_session_expired_reply_words_both_closings(tmp_path: Path) -> None:
    def expired(session: Session) -> Reply:
        return Reply(421, "4.4.2", (f"mx.example.com lost input from {session.peer_host}",))

    # At the next command (no install: no timer).
    with honeypot(
        tmp_path / "a", install=False, max_session_seconds=0.3, session_expired_reply=expired
    ) as (srv, plugin):
        smtp = client(srv)
        smtp.ehlo("x")
        time.sleep(0.4)
        assert smtp.mail("a@example.net") == (
            421,
            b"4.4.2 mx.example.com lost input from 127.0.0.2",
        )
        smtp.close()
    # By the timer, through server.close_session.
    with honeypot(tmp_path / "b", max_session_seconds=0.3, session_expired_reply=expired) as (
        srv,
        plugin,
    ):
        smtp = client(srv)
        smtp.ehlo("x")
        time.sleep(0.5)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
            smtp.noop()
        smtp.close()
        wait_closed(plugin.store, tmp_path / "b", 1)
    last = query(
        tmp_path / "b", "SELECT line FROM events WHERE direction = 's' ORDER BY id DESC LIMIT 1"
    )
    assert last == [("421 mx.example.com lost input from 127.0.0.2",)]
    assert query(tmp_path / "b", "SELECT close_reason FROM sessions") == [("max-session",)]


def test_honeypot_mode_says_open_relay_once_in_its_own_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = build_server(
        ServerOptions(listen=(ListenAddress("127.0.0.1", 0),)),
        HoneypotOptions(data_dir=tmp_path / "d"),
        store_settings={"batch_seconds": 0.01},
    )

    async def main() -> None:
        async with server:
            pass

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert not any("open_relay is on" in m for m in messages)
    assert any(m.startswith("honeypot mode: persona") for m in messages)
