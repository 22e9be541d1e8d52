"""Behaviour of ServerConnection: sessions, DATA, BDAT, pipelining, STARTTLS, AUTH, LMTP, limits."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re

import pytest

from mailgate.protocol import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    BareNewline,
    ConnectionClosed,
    DataComplete,
    DataDiscarded,
    DataStart,
    DiscardReason,
    Greeting,
    Limit,
    LimitExceeded,
    MailFrom,
    ProtocolConfig,
    ProtocolError,
    RcptTo,
    Reply,
    ServerConnection,
    State,
    TransactionReset,
)
from mailgate.protocol.persona import Persona

from .session import Session, parse_replies

CFG = ProtocolConfig(hostname="mx.test")
TLS_CFG = ProtocolConfig(
    hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def transaction(s: Session, *rcpts: str) -> None:
    assert s.cmd("EHLO client.test") == 250
    assert s.cmd("MAIL FROM:<sender@example.com>") == 250
    for rcpt in rcpts or ("rcpt@example.com",):
        assert s.cmd(f"RCPT TO:<{rcpt}>") == 250


# --- greeting, EHLO -----------------------------------------------------------------------


def test_greeting_is_a_policy_point() -> None:
    conn = ServerConnection(CFG)
    event = conn.next_event()
    assert isinstance(event, Greeting)
    assert conn.next_event() is PAUSED
    conn.respond(None)
    assert conn.data_to_send() == b"220 mx.test ESMTP mailgate\r\n"
    assert conn.next_event() is NEED_DATA


def test_refused_greeting_serves_only_quit() -> None:
    s = Session.start(CFG, answer=lambda p: Reply(554, "5.3.2", ("No service",)), greet=False)
    s.pump()
    assert s.take_output() == b"554 No service\r\n"  # no enhanced code on the greeting
    assert s.cmd("EHLO c.test") == 503
    assert s.cmd("QUIT") == 221
    assert isinstance(s.events[-1], ConnectionClosed)


def test_ehlo_lists_capabilities_from_config_and_state() -> None:
    s = Session.start(TLS_CFG)
    s.feed(b"EHLO c.test\r\n")
    out = s.take_output().decode()
    lines = out.split("\r\n")[:-1]
    assert lines[0] == "250-mx.test Hello c.test"
    assert all(line.startswith("250-") for line in lines[:-1]) and lines[-1].startswith("250 ")
    caps = {line[4:] for line in lines[1:]}
    assert {
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
        "STARTTLS",
    } <= caps
    # AUTH only over TLS by default; REQUIRETLS only over TLS.
    assert not any(c.startswith("AUTH") for c in caps)
    assert "REQUIRETLS" not in caps


def test_ehlo_after_tls_hides_starttls_and_offers_auth() -> None:
    s = Session.start(TLS_CFG, tls_active=True)
    s.feed(b"EHLO c.test\r\n")
    caps = s.take_output().decode()
    assert "STARTTLS" not in caps
    assert "AUTH PLAIN LOGIN CRAM-MD5 XOAUTH2" in caps
    assert "REQUIRETLS" in caps


def test_requiretls_is_accepted_only_over_tls() -> None:
    # RFC 8689 2: REQUIRETLS is offered only in an encrypted session; before it, the
    # parameter is refused as needing TLS (530 5.7.10), not as unknown.
    plain = Session.start(TLS_CFG)
    plain.feed(b"EHLO c.test\r\n")
    plain.take_output()
    assert plain.send(b"MAIL FROM:<a@example.com> REQUIRETLS\r\n") == [
        (530, "5.7.10 Parameter REQUIRETLS requires a TLS-protected session")
    ]
    assert plain.cmd("MAIL FROM:<a@example.com>") == 250  # nothing else changed
    encrypted = Session.start(TLS_CFG, tls_active=True)
    encrypted.feed(b"EHLO c.test\r\n")
    encrypted.take_output()
    assert encrypted.cmd("MAIL FROM:<a@example.com> REQUIRETLS") == 250
    # Switched off, or hidden by a persona: simply not supported, TLS or not.
    off = Session.start(dataclasses.replace(TLS_CFG, requiretls=False), tls_active=True)
    off.feed(b"EHLO c.test\r\n")
    assert b"REQUIRETLS" not in off.take_output()
    assert off.send(b"MAIL FROM:<a@example.com> REQUIRETLS\r\n") == [
        (555, "5.5.4 Parameter REQUIRETLS is not supported")
    ]
    hidden = dataclasses.replace(
        TLS_CFG, persona=Persona(hidden_capabilities=frozenset({"REQUIRETLS"}))
    )
    for tls in (False, True):
        session = Session.start(hidden, tls_active=tls)
        session.feed(b"EHLO c.test\r\n")
        session.take_output()
        assert session.cmd("MAIL FROM:<a@example.com> REQUIRETLS") == 555


def test_helo_session_has_no_extensions() -> None:
    s = Session.start(CFG)
    assert s.send(b"HELO c.test\r\n") == [(250, "mx.test Hello c.test")]
    # No ESMTP after HELO, so any parameter is unknown.
    assert s.cmd("MAIL FROM:<a@example.com> SIZE=10") == 555
    assert s.cmd("MAIL FROM:<a@example.com>") == 250


def test_rejected_ehlo_keeps_state() -> None:
    s = Session.start(
        CFG,
        answer=lambda p: Reply(550, "5.7.1", ("no",)) if p.__class__.__name__ == "Hello" else None,
    )
    assert s.cmd("EHLO bad.test") == 550
    assert s.conn.state is State.CONNECTED
    assert s.cmd("MAIL FROM:<a@example.com>") == 503


def test_enhanced_codes_on_replies() -> None:
    s = Session.start(CFG)
    s.feed(b"NOOP\r\n")
    assert s.take_output() == b"250 2.0.0 OK\r\n"
    plain = Session.start(ProtocolConfig(hostname="mx.test", enhanced_status_codes=False))
    plain.feed(b"NOOP\r\n")
    assert plain.take_output() == b"250 OK\r\n"


def test_verbs_are_case_insensitive() -> None:
    s = Session.start(CFG)
    assert s.cmd("ehlo c.test") == 250
    assert s.cmd("mail from:<a@example.com>") == 250
    assert s.cmd("rCpT tO:<b@example.com>") == 250


def test_parameter_values_keep_their_case() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@example.com> ENVID=AbC+2Bx RET=hdrs")
    mail = next(e for e in s.events if isinstance(e, MailFrom))
    assert mail.params["ENVID"] == "AbC+x"
    s.cmd("RCPT TO:<B@Example.COM> ORCPT=rfc822;B@Example.COM NOTIFY=SUCCESS,FAILURE")
    rcpt = next(e for e in s.events if isinstance(e, RcptTo))
    assert str(rcpt.address) == "B@Example.COM"
    assert rcpt.params["ORCPT"].endswith("B@Example.COM")


def test_auth_equals_null_is_accepted() -> None:
    s = Session.start(TLS_CFG, tls_active=True)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@example.com> AUTH=<>") == 250


def test_null_reverse_path_and_postmaster() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<>") == 250
    assert s.cmd("RCPT TO:<>") == 501
    assert s.cmd("RCPT TO:<Postmaster>") == 250


def test_utf8_address_needs_smtputf8() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<jösé@example.com>") == 553
    assert s.cmd("MAIL FROM:<jösé@example.com> SMTPUTF8") == 250
    assert s.cmd("RCPT TO:<ñ@exämple.com>") == 250


def test_utf8_recipient_without_smtputf8_transaction() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@example.com>")
    assert s.cmd("RCPT TO:<ñ@example.com>") == 553


def test_invalid_utf8_and_nul_are_refused() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:<a\xff@example.com>\r\n")[0][0] in (500, 501)
    assert s.send(b"MAIL FROM:<a\x00b@example.com>\r\n")[0][0] in (501, 553)
    assert s.cmd("MAIL FROM:<a@example.com>") == 250


# --- DATA ------------------------------------------------------------------------------------


def test_simple_message() -> None:
    s = Session.start(CFG)
    transaction(s)
    assert s.send(b"DATA\r\n") == [(354, "End data with <CR><LF>.<CR><LF>")]
    replies = s.send(b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n")
    assert replies == [(250, "2.0.0 Message accepted")]
    assert bytes(s.body) == b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
    done = next(e for e in s.events if isinstance(e, DataComplete))
    assert done.size == len(s.body)
    assert [str(r) for r in done.recipients] == ["rcpt@example.com"]
    assert s.conn.state is State.READY


@pytest.mark.parametrize(
    "payload",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"],
    ids=repr,
)
def test_bare_newline_never_ends_data_and_is_refused(payload: bytes) -> None:
    s = Session.start(CFG)
    transaction(s)
    s.send(b"DATA\r\n")
    smuggled = b"a" + payload + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<x@example.com>\r\n"
    # Nothing ends here: no reply until the real terminator.
    assert s.send(smuggled) == []
    replies = s.send(b"tail\r\n.\r\n")
    assert len(replies) == 1
    code = replies[0][0]
    if payload == b"\r\n.\r":
        # "\r\n.\r" followed by "M" is an ordinary dot-stuffed line start with a bare CR;
        # only the bare-newline-followed-by-dot rule can refuse it.
        assert code in (250, 554)
    else:
        assert code == 554
        assert any(isinstance(e, DataDiscarded) for e in s.events)
    # The smuggled commands were never executed.
    assert not any(
        isinstance(e, MailFrom) and e.address and e.address.local_part == "evil" for e in s.events
    )


def test_bare_lf_normalized_when_configured() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", bare_newline=BareNewline.NORMALIZE))
    transaction(s)
    s.send(b"DATA\r\n")
    assert s.send(b"line1\nline2\r\n.\r\n")[0][0] == 250
    assert bytes(s.body) == b"line1\r\nline2\r\n"


def test_message_too_big_is_discarded_after_end() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_message_size=100))
    transaction(s)
    s.send(b"DATA\r\n")
    assert s.send(b"x" * 80 + b"\r\n") == []
    assert s.send(b"y" * 80 + b"\r\n") == []
    assert s.send(b".\r\n") == [(552, "5.3.4 Message size exceeds fixed maximum message size")]
    discarded = [e for e in s.events if isinstance(e, DataDiscarded)]
    assert discarded and discarded[0].reason is DiscardReason.TOO_BIG
    assert len(s.body) <= 100
    assert s.conn.state is State.READY
    assert s.cmd("MAIL FROM:<a@example.com>") == 250


def test_size_parameter_over_limit_is_552() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_message_size=1000))
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@example.com> SIZE=1001") == 552
    assert s.cmd("MAIL FROM:<a@example.com> SIZE=1000") == 250


def test_data_rejected_by_policy_keeps_transaction() -> None:
    s = Session.start(
        CFG, answer=lambda p: Reply(554, "5.7.1", ("no",)) if isinstance(p, DataStart) else None
    )
    transaction(s)
    assert s.cmd("DATA") == 554
    assert s.conn.state is State.RCPT


def test_policy_rejection_after_data() -> None:
    s = Session.start(
        CFG,
        answer=lambda p: Reply(550, "5.7.1", ("spam",)) if isinstance(p, DataComplete) else None,
    )
    transaction(s)
    s.send(b"DATA\r\n")
    assert s.send(b"hello\r\n.\r\n") == [(550, "5.7.1 spam")]
    assert s.conn.state is State.READY


def test_binarymime_requires_bdat() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@example.com> BODY=BINARYMIME")
    s.cmd("RCPT TO:<b@example.com>")
    assert s.cmd("DATA") == 503
    assert s.send(b"BDAT 2 LAST\r\n\x00\x01")[0][0] == 250


def test_peer_closing_in_data_resets_transaction() -> None:
    s = Session.start(CFG)
    transaction(s)
    s.send(b"DATA\r\nhalf a message")
    s.feed(b"")
    assert isinstance(s.events[-1], ConnectionClosed)
    assert any(isinstance(e, TransactionReset) for e in s.events)


# --- BDAT ------------------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    s = Session.start(CFG)
    transaction(s)
    assert s.send(b"BDAT 5\r\nhel") == []
    assert s.send(b"lo") == [(250, "2.0.0 5 octets received")]
    assert s.send(b"BDAT 8 LAST\r\n\r\n.\r\nbin") == [(250, "2.0.0 Message accepted")]
    assert bytes(s.body) == b"hello\r\n.\r\nbin"
    done = next(e for e in s.events if isinstance(e, DataComplete))
    assert done.size == 13


def test_bdat_zero_last() -> None:
    s = Session.start(CFG)
    transaction(s)
    assert s.send(b"BDAT 3\r\nabcBDAT 0 LAST\r\n") == [
        (250, "2.0.0 3 octets received"),
        (250, "2.0.0 Message accepted"),
    ]


def test_bdat_then_data_is_503() -> None:
    s = Session.start(CFG)
    transaction(s)
    s.send(b"BDAT 1\r\nx")
    assert s.cmd("DATA") == 503


def test_bdat_out_of_sequence_consumes_its_chunk() -> None:
    s = Session.start(CFG)
    s.cmd("EHLO c.test")
    # Without a transaction the chunk is still read, so "NOOP" inside it is not a command.
    assert s.send(b"BDAT 6\r\nNOOP\r\nNOOP\r\n") == [
        (503, "5.5.1 Send MAIL first"),
        (250, "2.0.0 OK"),
    ]


def test_rejected_first_bdat_consumes_chunk_and_fails_transaction() -> None:
    s = Session.start(
        CFG, answer=lambda p: Reply(554, "5.7.1", ("no",)) if isinstance(p, DataStart) else None
    )
    transaction(s)
    replies = s.send(b"BDAT 4\r\nQUITBDAT 2 LAST\r\nxy")
    assert replies == [(554, "5.7.1 no"), (503, "5.5.1 Send MAIL first")]
    assert s.conn.state is State.READY


def test_bdat_too_big() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_message_size=10))
    transaction(s)
    assert s.send(b"BDAT 6\r\n123456")[0][0] == 250
    assert s.send(b"BDAT 6 LAST\r\n123456")[0][0] == 552
    assert any(isinstance(e, DataDiscarded) and e.reason is DiscardReason.TOO_BIG for e in s.events)
    assert s.conn.state is State.READY


@pytest.mark.parametrize(
    "line", ["BDAT", "BDAT x", "BDAT 1 NOTLAST", "BDAT -1", "BDAT 1 LAST extra"]
)
def test_bdat_syntax(line: str) -> None:
    s = Session.start(CFG)
    transaction(s)
    assert s.cmd(line) == 501


# --- pipelining -------------------------------------------------------------------------------

PIPELINE = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<a@example.com> SIZE=20\r\n"
    b"RCPT TO:<b@example.com>\r\n"
    b"RCPT TO:<c@example.com>\r\n"
    b"RCPT TO:<bad>\r\n"
    b"DATA\r\n"
    b"Subject: x\r\n\r\n.hi\r\n..\r\n.\r\n"
    b"MAIL FROM:<a@example.com>\r\n"
    b"RCPT TO:<b@example.com>\r\n"
    b"BDAT 4 LAST\r\nabcd"
    b"NOOP\r\n"
    b"QUIT\r\n"
)


def _run_pipeline(pieces: list[bytes]) -> tuple[bytes, bytes]:
    s = Session.start(CFG)
    for piece in pieces:
        s.feed(piece)
    return s.take_output(), bytes(s.body)


def test_pipelined_buffer_replies_in_order() -> None:
    out, body = _run_pipeline([PIPELINE])
    codes = [code for code, _ in parse_replies(out)]
    assert codes == [250, 250, 250, 250, 501, 354, 250, 250, 250, 250, 250, 221]
    assert body == b"Subject: x\r\n\r\nhi\r\n.\r\nabcd"


def test_pipelined_buffer_split_at_every_position() -> None:
    expected = _run_pipeline([PIPELINE])
    for i in range(1, len(PIPELINE)):
        assert _run_pipeline([PIPELINE[:i], PIPELINE[i:]]) == expected, i


def test_pipelined_byte_by_byte() -> None:
    expected = _run_pipeline([PIPELINE])
    assert _run_pipeline([PIPELINE[i : i + 1] for i in range(len(PIPELINE))]) == expected


def test_replies_wait_for_policy_answers() -> None:
    conn = ServerConnection(CFG)
    conn.next_event()
    conn.respond()
    conn.data_to_send()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nNOOP\r\n")
    assert conn.next_event().__class__.__name__ == "Hello"
    assert conn.next_event() is PAUSED
    with pytest.raises(ProtocolError):
        ServerConnection(CFG).respond()
    conn.respond()
    assert isinstance(conn.next_event(), MailFrom)
    conn.respond()
    assert conn.next_event() is NEED_DATA
    codes = [c for c, _ in parse_replies(conn.data_to_send())]
    assert codes == [250, 250, 250]


# --- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_discards_injected_commands() -> None:
    s = Session.start(TLS_CFG)
    s.cmd("EHLO c.test")
    replies = s.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
    assert replies == [(220, "2.0.0 Ready to start TLS")]
    assert s.conn.state is State.TLS_PENDING
    s.feed(b"RCPT TO:<more@evil.example>\r\n")  # still plaintext: dropped too
    assert s.take_output() == b""
    s.conn.tls_established()
    assert s.conn.state is State.CONNECTED and s.conn.tls_active
    assert s.cmd("MAIL FROM:<a@example.com>") == 503  # EHLO needed again
    assert s.cmd("EHLO c.test") == 250
    assert s.cmd("STARTTLS") == 503  # TLS already active


def test_starttls_refused_by_caller() -> None:
    s = Session.start(
        TLS_CFG,
        answer=lambda p: (
            Reply(454, "4.7.0", ("TLS not available",))
            if p.__class__.__name__ == "StartTLS"
            else None
        ),
    )
    s.cmd("EHLO c.test")
    assert s.cmd("STARTTLS") == 454
    assert s.conn.state is State.READY


# --- AUTH ---------------------------------------------------------------------------------------

PASSWORDS = {"alice": "wonderland"}


def check_credentials(point: object) -> Reply | None:
    if isinstance(point, AuthCredentials):
        if point.mechanism == "CRAM-MD5":
            ok = point.verify_cram_md5(PASSWORDS.get(point.username, ""))
        elif point.mechanism == "XOAUTH2":
            ok = point.token == "good-token"
        else:
            ok = PASSWORDS.get(point.username) == point.password
        return None if ok else Reply(535, "5.7.8", ("Authentication credentials invalid",))
    return None


def auth_session() -> Session:
    s = Session.start(TLS_CFG, answer=check_credentials, tls_active=True)
    s.cmd("EHLO c.test")
    return s


def test_auth_plain_initial_response() -> None:
    s = auth_session()
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice\0wonderland")) == 235
    assert s.conn.authenticated_as == "alice"
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice\0wonderland")) == 503


def test_auth_plain_with_challenge_and_authzid() -> None:
    s = auth_session()
    assert s.send(b"AUTH plain\r\n") == [(334, "")]
    assert s.cmd(b64(b"admin\0alice\0wonderland")) == 235
    creds = next(e for e in s.events if isinstance(e, AuthCredentials))
    assert creds.authzid == "admin"


def test_auth_login() -> None:
    s = auth_session()
    assert s.send(b"AUTH LOGIN\r\n") == [(334, b64(b"Username:"))]
    assert s.send(b64(b"alice").encode() + b"\r\n") == [(334, b64(b"Password:"))]
    assert s.cmd(b64(b"wonderland")) == 235


def test_auth_login_wrong_password() -> None:
    s = auth_session()
    s.send(f"AUTH LOGIN {b64(b'alice')}\r\n".encode())
    assert s.cmd(b64(b"nope")) == 535
    assert s.conn.authenticated_as is None


def test_auth_cram_md5() -> None:
    s = auth_session()
    ((code, text),) = s.send(b"AUTH CRAM-MD5\r\n")
    assert code == 334
    challenge = base64.b64decode(text)
    assert re.match(rb"^<\d+\.\d+@mx\.test>$", challenge)
    digest = hmac.new(b"wonderland", challenge, hashlib.md5).hexdigest()
    assert s.cmd(b64(f"alice {digest}".encode())) == 235


def test_auth_xoauth2_failure_sends_json_challenge_first() -> None:
    s = auth_session()
    bad = b64(b"user=alice\x01auth=Bearer bad-token\x01\x01")
    ((code, text),) = s.send(f"AUTH XOAUTH2 {bad}\r\n".encode())
    assert code == 334
    assert b'"status"' in base64.b64decode(text)
    assert s.cmd("") == 535
    good = b64(b"user=alice\x01auth=Bearer good-token\x01\x01")
    assert s.cmd(f"AUTH XOAUTH2 {good}") == 235


def test_auth_cancel_and_bad_base64() -> None:
    s = auth_session()
    s.send(b"AUTH LOGIN\r\n")
    assert s.cmd("*") == 501
    assert s.cmd("AUTH PLAIN !!!notbase64") == 501
    assert s.cmd("AUTH PLAIN =") == 501  # empty PLAIN message is malformed
    assert s.cmd("AUTH GSSAPI") == 504
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice\0wonderland")) == 235


def test_auth_not_inside_transaction() -> None:
    s = auth_session()
    s.cmd("MAIL FROM:<a@example.com>")
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice\0wonderland")) == 503


def test_auth_requires_tls_by_default() -> None:
    s = Session.start(TLS_CFG)
    s.cmd("EHLO c.test")
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice\0wonderland")) == 538


def test_auth_failures_close_the_connection() -> None:
    s = auth_session()
    for _ in range(2):
        assert s.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong")) == 535
    replies = s.send(("AUTH PLAIN " + b64(b"\0alice\0wrong") + "\r\n").encode())
    assert [c for c, _ in replies] == [535, 421]
    assert any(isinstance(e, LimitExceeded) and e.limit is Limit.AUTH_FAILURES for e in s.events)
    assert s.conn.state is State.CLOSED


def test_auth_line_may_exceed_command_limit() -> None:
    s = auth_session()
    token = "x" * 2000
    assert (
        s.cmd("AUTH XOAUTH2 " + b64(f"user=alice\x01auth=Bearer {token}\x01\x01".encode())) == 334
    )


# --- LMTP -----------------------------------------------------------------------------------------


def test_lmtp_one_reply_per_recipient() -> None:
    def answer(point: object) -> list[Reply] | None:
        if isinstance(point, DataComplete):
            return [Reply(250, "2.1.5", ("delivered",)), Reply(452, "4.2.2", ("mailbox full",))]
        return None

    s = Session.start(ProtocolConfig(hostname="mx.test", lmtp=True), answer=answer)  # type: ignore[arg-type]
    assert s.cmd("LHLO c.test") == 250
    s.cmd("MAIL FROM:<a@example.com>")
    s.cmd("RCPT TO:<b@example.com>")
    s.cmd("RCPT TO:<c@example.com>")
    s.send(b"DATA\r\n")
    assert s.send(b"hi\r\n.\r\n") == [(250, "2.1.5 delivered"), (452, "4.2.2 mailbox full")]


def test_lmtp_greeting() -> None:
    conn = ServerConnection(ProtocolConfig(hostname="mx.test", lmtp=True))
    conn.next_event()
    conn.respond()
    assert conn.data_to_send() == b"220 mx.test LMTP mailgate\r\n"


# --- limits -------------------------------------------------------------------------------------


def test_command_line_too_long() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_command_line=64))
    replies = s.send(b"NOOP " + b"x" * 100 + b"\r\nNOOP\r\n")
    assert [c for c, _ in replies] == [500, 250]
    assert any(
        isinstance(e, LimitExceeded) and e.limit is Limit.COMMAND_LINE_LENGTH for e in s.events
    )


def test_command_line_too_long_arriving_in_pieces() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_command_line=64))
    replies = []
    for _ in range(10):
        replies += s.send(b"y" * 50)
    replies += s.send(b"\r\nNOOP\r\n")
    assert [c for c, _ in replies] == [500, 250]


def test_too_many_unknown_commands() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_unknown_commands=3))
    replies = s.send(b"A\r\nB\r\nC\r\nD\r\nNOOP\r\n")
    assert [c for c, _ in replies] == [500, 500, 500, 500, 421]
    assert s.conn.state is State.CLOSED
    assert isinstance(s.events[-1], ConnectionClosed)


def test_too_many_bad_commands() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_bad_commands=2))
    replies = s.send(b"MAIL FROM:<a@b.example>\r\n" * 3)
    assert [c for c, _ in replies] == [503, 503, 503, 421]


def test_too_many_recipients() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", max_recipients=2))
    transaction(s, "a@example.com", "b@example.com")
    assert s.send(b"RCPT TO:<c@example.com>\r\n") == [(452, "4.5.3 Too many recipients")]


def test_server_close() -> None:
    s = Session.start(CFG)
    s.conn.close()
    s.pump()
    assert s.take_output().startswith(b"421 4.3.2")
    assert isinstance(s.events[-1], ConnectionClosed)


def test_quit_ignores_what_follows() -> None:
    s = Session.start(CFG)
    assert s.send(b"QUIT\r\nNOOP\r\n") == [(221, "2.0.0 Bye")]


def test_rset_resets_transaction() -> None:
    s = Session.start(CFG)
    transaction(s)
    assert s.cmd("RSET") == 250
    assert any(isinstance(e, TransactionReset) for e in s.events)
    assert s.cmd("RCPT TO:<b@example.com>") == 503


def test_vrfy_and_expn_defaults() -> None:
    s = Session.start(CFG)
    assert s.cmd("VRFY alice") == 252
    assert s.cmd("EXPN staff") == 502
    assert s.cmd("HELP") == 214


def test_xclient_restarts_session() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", xclient=True), peer_trusted=True)
    s.cmd("EHLO proxy.test")
    assert s.cmd("XCLIENT ADDR=192.0.2.7 NAME=client.example") == 220
    assert s.conn.state is State.CONNECTED
    assert s.cmd("EHLO client.example") == 250
