"""The behaviour knobs and reply names Sendmail's persona needs, sans-IO, each against
mailgate's own default (which must not change): the transaction checked before the
greeting, AUTH before HELO, the HELO name check, the 421 hang-up on a line over the limit,
a NUL ending the command, verbs known and refused (TURN), Sendmail's pipelining check, the
greeting kept across STARTTLS, STARTTLS worded apart in a transaction, ``RCPT TO:<>``,
HELP per topic, and the blank line echoed."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocol import Persona, ProtocolConfig, Reply
from mailgate.protocol.behaviour import Behaviour, BehaviourError
from mailgate.protocol.events import ConnectionClosed, RcptTo
from mailgate.protocol.persona import PersonaError

from .session import Session

BASE = ProtocolConfig(
    hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",), auth_requires_tls=False
)


def config(behaviour: Behaviour | None = None, **persona: object) -> ProtocolConfig:
    return dataclasses.replace(
        BASE,
        persona=Persona(behaviour=behaviour or Behaviour(), **persona),  # type: ignore[arg-type]
    )


def r(text: str) -> Reply:
    """A reply written as a profile writes it: code, enhanced code, text."""
    code, status, rest = text.split(" ", 2)
    return Reply(int(code), status, (rest,))


def closed(s: Session) -> bool:
    return any(isinstance(e, ConnectionClosed) for e in s.events)


def test_transaction_checked_before_the_greeting() -> None:
    s = Session.start(BASE)
    assert s.send(b"RCPT TO:<a@b.test>\r\n") == [(503, "5.5.1 Send HELO/EHLO first")]
    s = Session.start(config(Behaviour(sender_before_hello=True)))
    assert s.send(b"RCPT TO:<a@b.test>\r\n") == [(503, "5.5.1 Send MAIL first")]
    assert s.send(b"MAIL FROM:<a@b.test>\r\n") == [(503, "5.5.1 Send HELO/EHLO first")]


def test_auth_allowed_before_hello() -> None:
    assert Session.start(BASE).cmd("AUTH PLAIN AGEAYg==") == 503
    s = Session.start(config(Behaviour(allowed_before_hello=frozenset({"AUTH"}))))
    assert s.cmd("AUTH PLAIN AGEAYg==") == 235  # the policy (None) accepts
    assert s.cmd("MAIL FROM:<a@b.test>") == 503  # MAIL still needs HELO
    with pytest.raises(BehaviourError, match="allowed_before_hello"):
        Behaviour(allowed_before_hello=frozenset({"RCPT"}))


def test_hello_name_check() -> None:
    assert Session.start(BASE).cmd("EHLO -bad_name!") == 250
    cfg = config(
        Behaviour(hello_name_characters="[].-_#:", hello_name_max_length=256),
        replies={"hello_bad_name": r("501 5.0.0 Invalid domain name")},
    )
    s = Session.start(cfg)
    assert s.send(b"EHLO -bad_name!\r\n") == [(501, "5.0.0 Invalid domain name")]
    assert s.cmd("HELO " + "h" * 257) == 501
    assert s.cmd("HELO " + "h" * 256) == 250
    assert s.cmd("EHLO [127.0.0.1]") == 250
    assert s.cmd("EHLO under_score.test") == 250
    # Without its own text the refusal is hello_syntax's.
    s = Session.start(config(Behaviour(hello_name_characters=".-")))
    assert s.send(b"HELO a_b\r\n") == [(501, "5.5.4 Syntax: HELO hostname")]
    with pytest.raises(BehaviourError, match="hello_name_characters"):
        Behaviour(hello_name_characters="ab")


def test_long_line_closes_with_its_reply() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.send(b"NOOP " + b"y" * 5000 + b"\r\n")[0][0] == 500
    assert s.cmd("NOOP") == 250
    cfg = config(
        Behaviour(long_lines="close", line_limit=2048),
        replies={"line_too_long": r("421 4.7.0 {hostname} Command too long [{client_ip}]")},
    )
    s = Session.start(cfg, client_ip="192.0.2.7")
    s.cmd("EHLO c.test")
    assert s.send(b"NOOP " + b"y" * 5000 + b"\r\nNOOP\r\n") == [
        (421, "4.7.0 mx.test Command too long [192.0.2.7]")
    ]
    assert closed(s)
    # Cut in the middle of the line (no line end yet): the same.
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    assert s.send(b"NOOP " + b"y" * 3000)[0][0] == 421
    assert closed(s)


def test_nul_ends_the_command() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.send(b"NOOP\x00x\r\n")[0][0] != 250
    s = Session.start(config(Behaviour(nul_ends_command=True)))
    s.cmd("EHLO c.test")
    assert s.send(b"NOOP\x00x\r\n") == [(250, "2.0.0 OK")]


def test_unimplemented_commands_are_known_and_refused() -> None:
    s = Session.start(BASE)
    assert s.cmd("TURN") == 500
    cfg = config(
        Behaviour(unimplemented_commands=frozenset({"turn", "SAML"})),
        replies={"not_implemented": r('502 5.5.1 Command not implemented: "{command}"')},
    )
    s = Session.start(cfg)
    assert s.send(b"TURN\r\n") == [(502, '5.5.1 Command not implemented: "TURN"')]
    assert s.send(b"saml from:<a@b>\r\n") == [
        (502, '5.5.1 Command not implemented: "saml from:<a@b>"')
    ]
    assert s.cmd("ATRN") == 500


def test_sync_until_pipelining_then_only_quit() -> None:
    cfg = config(
        Behaviour(sync_until_pipelining=True, sync_error_refuses=True),
        replies={"synchronization_error": r("554 5.5.0 SMTP protocol error")},
    )
    s = Session.start(cfg)
    got = s.send(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert got == [
        (554, "5.5.0 SMTP protocol error"),
        (503, "5.5.1 Service refused; only QUIT is accepted"),
        (503, "5.5.1 Service refused; only QUIT is accepted"),
    ]
    assert not closed(s)
    assert s.cmd("QUIT") == 221
    # EHLO with MAIL behind it is refused too; once PIPELINING was offered, groups pass.
    s = Session.start(cfg)
    assert [c for c, _ in s.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")] == [554, 503]
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    got = s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nNOOP\r\n")
    assert [c for c, _ in got] == [250, 250, 250]
    # Without sync_error_refuses the session closes (as sync_check does).
    s = Session.start(config(Behaviour(sync_until_pipelining=True)))
    assert [c for c, _ in s.send(b"HELO c.test\r\nNOOP\r\n")] == [554]
    assert closed(s)


def test_default_takes_pipelined_commands_before_ehlo() -> None:
    s = Session.start(BASE)
    assert [c for c, _ in s.send(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\n")] == [250, 250]


def upgrade(s: Session) -> None:
    s.cmd("EHLO c.test")
    assert s.cmd("STARTTLS") == 220
    s.conn.tls_established()


def test_greeting_kept_after_tls() -> None:
    s = Session.start(BASE)
    upgrade(s)
    assert s.cmd("MAIL FROM:<a@b.test>") == 503
    s = Session.start(config(Behaviour(hello_kept_after_tls=True)))
    upgrade(s)
    assert s.cmd("MAIL FROM:<a@b.test> BODY=8BITMIME") == 250
    assert "STARTTLS" not in s.conn.extensions
    # A STARTTLS before any greeting still starts over.
    s = Session.start(config(Behaviour(hello_kept_after_tls=True)))
    assert s.cmd("STARTTLS") == 220
    s.conn.tls_established()
    assert s.cmd("MAIL FROM:<a@b.test>") == 503


def test_starttls_in_a_transaction_worded_apart() -> None:
    cfg = config(
        replies={
            "not_in_transaction": r("503 5.5.0 {verb} not permitted during a mail transaction"),
            "tls_in_transaction": r("503 5.5.0 TLS not permitted during a mail transaction"),
        }
    )
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"STARTTLS\r\n") == [(503, "5.5.0 TLS not permitted during a mail transaction")]
    assert s.send(b"AUTH PLAIN AGEAYg==\r\n") == [
        (503, "5.5.0 AUTH not permitted during a mail transaction")
    ]
    # Without its own text, STARTTLS gets not_in_transaction's.
    s = Session.start(config(replies={"not_in_transaction": r("503 5.5.0 no {verb} now")}))
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"STARTTLS\r\n") == [(503, "5.5.0 no STARTTLS now")]


def test_null_recipient_reply() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"RCPT TO:<>\r\n") == [(501, "5.1.3 Null recipient address not allowed")]
    cfg = config(replies={"null_recipient": Reply(553, "5.0.0", ("<>... User address required",))})
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"RCPT TO:<>\r\n") == [(553, "5.0.0 <>... User address required")]
    # A persona that words every bad recipient its way words this one so too.
    s = Session.start(config(replies={"bad_recipient_address": "Bad recipient"}))
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"RCPT TO:<>\r\n") == [(501, "5.1.3 Bad recipient")]


HELP = ("This is the server", "Topics: MAIL RCPT", "End of HELP info")
TOPICS = {
    "mail": ("MAIL From:<sender>", "\tSpecifies the sender."),
    "rcpt": ("RCPT To:<recipient>",),
    "dsn": ("RET={{ FULL | HDRS}}",),
}


def test_help_topics() -> None:
    s = Session.start(BASE)
    assert s.cmd("HELP MAIL") == 214  # no topics: the general text
    cfg = config(
        help=HELP,
        help_topics=TOPICS,
        replies={"help_unknown_topic": r('504 5.3.0 HELP topic "{topic}" unknown')},
    )
    s = Session.start(cfg)
    s.feed(b"HELP MAIL\r\n")
    assert s.take_output().decode().splitlines() == [
        "214-2.0.0 MAIL From:<sender>",
        "214-2.0.0 \tSpecifies the sender.",
        "214 2.0.0 End of HELP info",
    ]
    s.feed(b"HELP dsn\r\n")
    assert s.take_output().decode().splitlines()[0] == "214-2.0.0 RET={ FULL | HDRS}"
    s.feed(b"HELP\r\n")
    assert s.take_output().decode().splitlines()[0] == "214-2.0.0 This is the server"
    s.feed(b"HELP \t\r\n")  # blanks are no topic (Sendmail skips them)
    assert s.take_output().decode().splitlines()[0] == "214-2.0.0 This is the server"
    # A prefix answers every topic it starts (Sendmail reads its helpfile so).
    s.feed(b"HELP r\r\n")
    assert s.take_output().decode().splitlines()[0] == "214-2.0.0 RCPT To:<recipient>"
    assert s.send(b"HELP XYZZY-and-more\r\n") == [(504, '5.3.0 HELP topic "xyzzy-and-" unknown')]
    assert s.send(b"HELP \x7fbad\r\n")[0][0] == 501  # control characters never reach {topic}


def test_help_topics_are_checked() -> None:
    with pytest.raises(PersonaError, match="help_topics"):
        Persona(help_topics={"Mail": ("x",)})
    with pytest.raises(PersonaError, match="unknown placeholder"):
        Persona(help_topics={"dsn": ("RET={ FULL }",)})
    with pytest.raises(PersonaError, match="non-empty"):
        Persona(help_topics={"mail": ()})
    with pytest.raises(PersonaError, match="not allowed"):
        Persona(help_topics={"mail": ("caf\u00e9",)})


def test_blank_line_echoes_its_blanks() -> None:
    cfg = config(replies={"unknown_command": r('500 5.5.1 Command unrecognized: "{command}"')})
    s = Session.start(cfg)
    assert s.send(b"   \r\n") == [(500, '5.5.1 Command unrecognized: "   "')]
    s = Session.start(BASE)
    assert s.send(b"   \r\n") == [(500, "5.5.2 Command not recognized")]


ECHOING = {
    "sender_ok": r("250 2.1.0 {path}... Sender ok"),
    "recipient_ok": r("250 2.1.5 {path}... Recipient ok"),
    "mail_syntax": r('501 5.5.2 Syntax error in parameters scanning "{word}"'),
    "rcpt_syntax": r('501 5.5.2 Syntax error in parameters scanning "{word}"'),
}


def test_recipients_echoed_as_sendmail_does() -> None:
    lenient = Behaviour(lenient_paths=True)
    s = Session.start(config(lenient, replies=ECHOING))
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:a@b.test\r\n") == [(250, "2.1.0 a@b.test... Sender ok")]
    assert s.send(b"RCPT TO:c@d.test\r\n") == [(250, "2.1.5 c@d.test... Recipient ok")]
    # Without the knobs: each as written, an unqualified one too.
    assert s.send(b"RCPT TO: <c@d.test>\r\n") == [(250, "2.1.5 <c@d.test>... Recipient ok")]
    assert s.send(b"RCPT TO:<root>\r\n") == [(250, "2.1.5 <root>... Recipient ok")]
    sendmail = Behaviour(
        lenient_paths=True, repeated_recipient_as_first=True, unqualified_recipient_qualified=True
    )
    s = Session.start(
        dataclasses.replace(config(sendmail, replies=ECHOING), hostname="mail.x.test")
    )
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"RCPT TO:c@d.test\r\n") == [(250, "2.1.5 c@d.test... Recipient ok")]
    assert s.send(b"RCPT TO: <c@D.TEST>\r\n") == [(250, "2.1.5 c@d.test... Recipient ok")]
    assert s.send(b"rcpt to:<C@d.test>\r\n") == [(250, "2.1.5 <C@d.test>... Recipient ok")]
    assert s.send(b"RCPT TO:<root>\r\n") == [(250, "2.1.5 <root@x.test>... Recipient ok")]
    assert s.send(b"RCPT TO:<root@x.test>\r\n") == [(250, "2.1.5 <root@x.test>... Recipient ok")]
    # A new transaction forgets the forms written in the last one.
    s.cmd("RSET")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"RCPT TO:<c@d.test>\r\n") == [(250, "2.1.5 <c@d.test>... Recipient ok")]


def test_a_refused_recipient_is_not_remembered() -> None:
    refused: list[str] = []

    def answer(point: object) -> Reply | None:
        if isinstance(point, RcptTo) and not refused:
            refused.append(str(point.address))
            return Reply(550, "5.1.1", ("no",))
        return None

    cfg = config(Behaviour(repeated_recipient_as_first=True), replies=ECHOING)
    s = Session.start(cfg, answer=answer)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.cmd("RCPT TO: <x@d.test>") == 550
    assert s.send(b"RCPT TO:<x@d.test>\r\n") == [(250, "2.1.5 <x@d.test>... Recipient ok")]


def test_scanned_word_is_echoed() -> None:
    s = Session.start(config(replies=ECHOING))
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL TO:<a@b.test>\r\n") == [
        (501, '5.5.2 Syntax error in parameters scanning "TO"')
    ]
    assert s.send(b"MAIL FROM\r\n") == [(501, '5.5.2 Syntax error in parameters scanning "FROM"')]
    long_word = b"MAIL " + b"W" * 450 + b"\r\n"
    ((code, text),) = s.send(long_word)
    assert code == 501 and len(text) < 500 and text.endswith('..."')
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.send(b"RCPT FROM:<c@d.test>\r\n") == [
        (501, '5.5.2 Syntax error in parameters scanning "FROM"')
    ]


def test_echo_shortened_as_sendmail_shortens() -> None:
    cfg = config(
        Behaviour(lenient_paths=True, long_local_parts=True, echo_shortened=203), replies=ECHOING
    )
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    local = "a" * 200
    ((code, text),) = s.send(f"MAIL FROM:<{local}@example.net>\r\n".encode())
    assert code == 250
    shown = text.removeprefix("2.1.0 ").removesuffix("... Sender ok")
    path = f"<{local}@example.net>"
    assert shown == path[:100] + "..." + path[-100:]
    # Shorter than the limit: whole.
    s.cmd("RSET")
    ((code, text),) = s.send(b"MAIL FROM:<" + b"b" * 150 + b"@example.net>\r\n")
    assert text == "2.1.0 <" + "b" * 150 + "@example.net>... Sender ok"
    with pytest.raises(BehaviourError, match="echo_shortened"):
        Behaviour(echo_shortened=5)


SENDMAIL_ECHOES = Persona(
    behaviour=Behaviour(
        lenient_paths=True,
        long_local_parts=True,
        repeated_recipient_as_first=True,
        unqualified_recipient_qualified=True,
        echo_shortened=203,
    ),
    help=HELP,
    help_topics=TOPICS,
    replies={
        **ECHOING,
        "help_unknown_topic": r('504 5.3.0 HELP topic "{topic}" unknown'),
        "unknown_command": r('500 5.5.1 Command unrecognized: "{command}"'),
        "not_implemented": r('502 5.5.1 Command not implemented: "{command}"'),
    },
)
#: A reply line as RFC 5321 4.2 has it: code, space or hyphen, printable ASCII (and TAB,
#: which only the persona's own HELP texts have), CRLF.
REPLY_LINE = re.compile(rb"[2-5][0-9]{2}(?:[ -][\t\x20-\x7e]*)?\r\n")


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    verb=st.sampled_from([b"MAIL ", b"RCPT ", b"RCPT TO:", b"RCPT TO:<", b"HELP ", b"TURN "]),
    argument=st.binary(max_size=700).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
def test_sendmail_echoes_are_one_well_formed_reply(verb: bytes, argument: bytes) -> None:
    """{word}, {topic}, {command} and the recipient echo: whatever the client sends, one
    reply of well-formed lines (no CR/LF injected, printable ASCII), of bounded length."""
    cfg = dataclasses.replace(BASE, persona=SENDMAIL_ECHOES, max_command_line=1000)
    s = Session.start(
        dataclasses.replace(
            cfg,
            persona=dataclasses.replace(
                SENDMAIL_ECHOES,
                behaviour=dataclasses.replace(
                    SENDMAIL_ECHOES.behaviour, unimplemented_commands=frozenset({"TURN"})
                ),
            ),
        )
    )
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
    s.take_output()
    s.feed(verb + argument + b"\r\n")
    out = s.take_output()
    replies = out.split(b"\r\n")[:-1]
    assert replies, out
    assert all(REPLY_LINE.fullmatch(line + b"\r\n") for line in replies), out
    finals = [line for line in replies if line[3:4] != b"-"]
    assert len(finals) == 1, out
    assert all(len(line) <= 600 for line in replies), out


def test_spaced_local_parts_are_taken_quoted() -> None:
    s = Session.start(config(Behaviour(lenient_paths=True), replies=ECHOING))
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a b@example.net>") == 501
    s = Session.start(
        config(Behaviour(lenient_paths=True, spaced_local_parts=True), replies=ECHOING)
    )
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:<a b@example.net>\r\n") == [
        (250, "2.1.0 <a b@example.net>... Sender ok")
    ]
    mail = [e for e in s.events if type(e).__name__ == "MailFrom"][-1]
    assert str(mail.address) == '"a b"@example.net'  # type: ignore[attr-defined]
    # Quotes, backslashes, double spaces and a space at either end stay refused.
    for path in ('<a "b@x.test>', "<a\\ b@x.test>", "<a  b@x.test>", "< a@x.test>"):
        assert s.cmd(f"RCPT TO:{path}") == 501, path
