"""Persona: every reply, the banner, the EHLO/HELO greeting, capability order and HELP of
the protocol engine, configurable; the default reproduces mailgate's own output exactly."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocol import (
    NEED_DATA,
    REPLY_NAMES,
    AuthCredentials,
    CommandRejected,
    DataDiscarded,
    Hello,
    MailFrom,
    Persona,
    PersonaError,
    PolicyPoint,
    ProtocolConfig,
    Reply,
    ServerConnection,
    replies,
)
from mailgate.protocol.persona import (
    DEFAULT_PERSONA,
    ECHO_PLACEHOLDERS,
    KEYWORDS,
    PASS_THROUGH,
    PLACEHOLDERS,
    clean,
    format_date,
    placeholders_in,
)

from .session import Session, run_with_defaults

NOON = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def run(config: ProtocolConfig, data: bytes, **kwargs: object) -> bytes:
    """Greet, feed ``data``, answer every policy point with the default; all output."""
    banner, rest = run_with_defaults(ServerConnection(config, **kwargs), data)  # type: ignore[arg-type]
    return banner + rest


def cfg(persona: Persona | None = None, **kwargs: object) -> ProtocolConfig:
    kwargs.setdefault("hostname", "mx.test")
    if persona is not None:
        kwargs["persona"] = persona
    return ProtocolConfig(**kwargs)  # type: ignore[arg-type]


def lines(data: bytes) -> list[str]:
    return data.decode("utf-8").split("\r\n")[:-1]


def ehlo_keywords(data: bytes) -> list[str]:
    return [line[4:].split(" ")[0] for line in lines(data) if line.startswith("250")][1:]


# --- the default persona is mailgate's output, byte for byte ---------------------------------
# Transcripts recorded from the engine before personas existed.

SESSION = (
    b"EHLO client.test\r\nMAIL FROM:<a@example.com> SIZE=100\r\nRCPT TO:<b@example.com>\r\n"
    b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nRSET\r\nNOOP\r\nVRFY root\r\nEXPN staff\r\nHELP\r\n"
    b"QUIT\r\n"
)
SESSION_OUT = (
    b"220 mx.test ESMTP mailgate\r\n"
    b"250-mx.test Hello client.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n"
    b"250-VRFY\r\n250 HELP\r\n"
    b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    b"250 2.0.0 Message accepted\r\n250 2.0.0 Reset OK\r\n250 2.0.0 OK\r\n"
    b"252 2.5.0 Cannot verify the user; send mail to try delivery\r\n"
    b"502 5.5.1 EXPN is not available\r\n"
    b"214-2.0.0 Commands: BDAT DATA EHLO EXPN HELO HELP MAIL NOOP QUIT RCPT RSET VRFY\r\n"
    b"214 2.0.0 End of HELP\r\n221 2.0.0 Bye\r\n"
)
ERRORS = (
    b"MAIL FROM:<a@b.test>\r\nHELO\r\nHELO a b\r\nEHLO c.test\r\nFOO\r\nRSET now\r\nDATA\r\n"
    b"MAIL TO:<x>\r\nMAIL FROM:a@b\r\nMAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b> SIZE=x=y\r\n"
    b"MAIL FROM:<a@b> SIZE=999999999\r\nMAIL FROM:<\xc3\xa9@b.test>\r\nMAIL FROM:<>\r\n"
    b"MAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<>\r\nRCPT TO:<a@b> NOTIFY=BOGUS\r\nRCPT TO:<c@d.test>\r\n"
    b"BDAT 3\r\nabcDATA\r\nRCPT TO:<e@f.test>\r\nBDAT x\r\nBDAT 2 LAST\r\nxySTARTTLS\r\n"
    b"AUTH PLAIN\r\nNOOP\x01\r\n\xff\r\nQUIT\r\n"
)
ERRORS_OUT = (
    b"220 mx.test ESMTP mailgate\r\n503 5.5.1 Send HELO/EHLO first\r\n"
    b"501 5.5.4 HELO requires an argument\r\n501 5.5.4 Syntax: HELO hostname\r\n"
    b"250-mx.test Hello c.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n"
    b"250-VRFY\r\n250 HELP\r\n"
    b"500 5.5.2 Command not recognized\r\n501 5.5.4 RSET takes no argument\r\n"
    b"503 5.5.1 Send MAIL first\r\n501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
    b"501 5.5.2 Syntax error: address must be enclosed in <>\r\n"
    b"555 5.5.4 Unknown parameter FOO\r\n501 5.5.4 Malformed value for parameter SIZE\r\n"
    b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n250 2.1.0 Sender OK\r\n"
    b"503 5.5.1 Sender already specified\r\n503 5.5.1 Send RCPT first\r\n"
    b"501 5.1.3 Null recipient address not allowed\r\n555 5.5.4 Invalid NOTIFY value\r\n"
    b"250 2.1.5 Recipient OK\r\n250 2.0.0 3 octets received\r\n"
    b"503 5.5.1 DATA cannot be mixed with BDAT\r\n503 5.5.1 Bad sequence of commands\r\n"
    b"501 5.5.4 Syntax: BDAT size [LAST]\r\n250 2.0.0 Message accepted\r\n"
    b"502 5.5.1 Command not implemented\r\n502 5.5.1 Command not implemented\r\n"
    b"500 5.5.2 Command not recognized\r\n500 5.5.2 Invalid UTF-8 in command\r\n"
    b"221 2.0.0 Bye\r\n"
)
LMTP = (
    b"LHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
    b"RCPT TO:<c@example.com>\r\nDATA\r\nhi\r\n.\r\nHELO x\r\nQUIT\r\n"
)
LMTP_OUT = (
    b"220 lmtp.test LMTP mailgate\r\n"
    b"250-lmtp.test Hello client.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n"
    b"250-VRFY\r\n250 HELP\r\n"
    b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n250 2.1.5 Recipient OK\r\n"
    b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Message accepted\r\n"
    b"250 2.0.0 Message accepted\r\n500 5.5.2 Command not recognized\r\n221 2.0.0 Bye\r\n"
)
AUTH_TLS = b"EHLO c.test\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n!!!\r\nSTARTTLS\r\n"
AUTH_TLS_OUT = (
    b"220 mx.test ESMTP mailgate\r\n"
    b"250-mx.test Hello c.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n250-VRFY\r\n250 HELP\r\n"
    b"334 \r\n501 Authentication cancelled\r\n334 VXNlcm5hbWU6\r\n"
    b"501 Cannot decode base64 response\r\n220 Ready to start TLS\r\n"
)
TLS_AUTH: dict[str, Any] = {
    "starttls": True,
    "auth_mechanisms": ("PLAIN", "LOGIN"),
    "auth_requires_tls": False,
}


@pytest.mark.parametrize(
    ("config", "data", "expected"),
    [
        (cfg(), SESSION, SESSION_OUT),
        (cfg(max_message_size=1000), ERRORS, ERRORS_OUT),
        (cfg(hostname="lmtp.test", lmtp=True), LMTP, LMTP_OUT),
        (cfg(enhanced_status_codes=False, **TLS_AUTH), AUTH_TLS, AUTH_TLS_OUT),
    ],
    ids=["session", "errors", "lmtp", "auth-tls-plain-codes"],
)
def test_default_persona_is_the_old_output(
    config: ProtocolConfig, data: bytes, expected: bytes
) -> None:
    assert run(config, data) == expected
    # An explicitly built default persona is the same thing.
    assert run(dataclasses.replace(config, persona=Persona()), data) == expected


def test_default_persona_replies_are_the_constants() -> None:
    assert ProtocolConfig().persona is DEFAULT_PERSONA
    assert Persona() == DEFAULT_PERSONA and hash(Persona()) == hash(DEFAULT_PERSONA)
    for name in REPLY_NAMES:
        assert DEFAULT_PERSONA.reply(name) == getattr(replies, name.upper()), name
    assert DEFAULT_PERSONA.overridden == frozenset()
    hash(ProtocolConfig(persona=Persona(replies={"bye": "Later"})))  # configs stay hashable


def test_every_name_has_its_placeholders_documented() -> None:
    import mailgate.protocol.persona as module

    assert set(PLACEHOLDERS) == REPLY_NAMES
    doc = module.__doc__ or ""
    for name in REPLY_NAMES:
        match = re.search(rf"^{name} .*\n(?: .*\n)*", doc, re.M)
        assert match, f"{name} is not documented"
        # The echo placeholders have a paragraph of their own, with where they are valid.
        for placeholder in PLACEHOLDERS[name] - {"hostname"} - ECHO_PLACEHOLDERS:
            assert f"{{{placeholder}}}" in match.group(), (name, placeholder)
    for placeholder in ECHO_PLACEHOLDERS:
        assert f"``{{{placeholder}}}``" in doc, placeholder


# --- overrides --------------------------------------------------------------------------------


def test_reply_override_changes_code_status_and_text() -> None:
    persona = Persona(replies={"sender_ok": Reply(250, None, ("Ok",)), "bye": "See you"})
    out = run(cfg(persona), b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n")
    assert lines(out)[-2:] == ["250 Ok", "221 2.0.0 See you"]


def test_multiline_overrides_and_literal_braces() -> None:
    persona = Persona(
        replies={
            "noop_ok": "first\nsecond {{braces}}",
            "reset_ok": Reply(250, "2.0.0", ("one", "two {{x}}")),
        }
    )
    out = run(cfg(persona), b"NOOP\r\nRSET\r\n")
    assert lines(out)[1:] == [
        "250-2.0.0 first",
        "250 2.0.0 second {braces}",
        "250-2.0.0 one",
        "250 2.0.0 two {x}",
    ]


def test_placeholders_in_replies() -> None:
    persona = Persona(
        replies={
            "sender_ok": "<{address}>... Sender ok",
            "recipient_ok": "<{address}>... Recipient ok",
            "vrfy_default": "{address}",
            "expn_default": Reply(550, "5.7.0", ("EXPN {address} denied by {hostname}",)),
            "unknown_command": Reply(502, "5.5.2", ("Unrecognized command '{verb}' in {command}",)),
            "bdat_chunk_ok": "Ok: {size} bytes",
            "too_many_recipients": "no more than {max_recipients}",
            "not_in_transaction": "{verb}? not now",
            "message_accepted": "{hostname} took it",
            "bye": "{hostname} closing connection",
        }
    )
    out = run(
        cfg(persona, max_recipients=1, starttls=True),
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nSTARTTLS\r\n"
        b"BDAT 2\r\nhiBDAT 0 LAST\r\nMAIL FROM:<s@y.test>\r\nVRFY root\r\nEXPN staff\r\n"
        b"FOO bar baz\r\nQUIT\r\n",
    )
    assert lines(out)[13:] == [
        "250 2.1.0 <>... Sender ok",
        "250 2.1.5 <x@y.test>... Recipient ok",
        "452 4.5.3 no more than 1",
        "503 5.5.1 STARTTLS? not now",
        "250 2.0.0 Ok: 2 bytes",
        "250 2.0.0 mx.test took it",
        "250 2.1.0 <s@y.test>... Sender ok",
        "252 2.5.0 root",
        "550 5.7.0 EXPN staff denied by mx.test",
        "502 5.5.2 Unrecognized command 'FOO' in FOO bar baz",
        "221 2.0.0 mx.test closing connection",
    ]


def test_unknown_command_echo_is_cut_and_cleaned() -> None:
    persona = Persona(replies={"unknown_command": "what is {command}"})
    s = Session.start(cfg(persona))
    s.feed(b"X" * 300 + b"\r\n")
    assert s.take_output() == b"500 5.5.2 what is " + b"X" * 200 + b"\r\n"
    # A C1 control (NEL) never reaches the wire; nor, since the echo is printable ASCII
    # only (persona.echo), does any other non-ASCII character.
    s.feed("FOO é\x85\r\n".encode())
    assert s.take_output() == b"500 5.5.2 what is FOO ??\r\n"


def test_sequence_and_syntax_replies_have_names() -> None:
    texts = {
        name: f"{name} text"
        for name in (
            "need_hello",
            "need_mail",
            "need_rcpt",
            "sender_already_specified",
            "data_after_bdat",
            "bad_sequence",
            "argument_required",
            "argument_not_allowed",
            "hello_syntax",
            "mail_syntax",
            "rcpt_syntax",
            "bdat_syntax",
            "control_characters",
            "invalid_utf8",
            "not_implemented",
            "binarymime_needs_bdat",
        )
    }
    out = run(
        cfg(Persona(replies=texts), chunking=True, vrfy=False),
        b"MAIL FROM:<a@b>\r\nEHLO c\r\nHELO a b\r\nHELO\r\nRSET x\r\nRCPT TO:<a@b>\r\n"
        b"MAIL x\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT x\r\nRCPT TO:<c@d>\r\nBDAT 1\r\nxDATA\r\n"
        b"RCPT TO:<e@f>\r\nBDAT z\r\nRSET\r\nNOOP x\x01\r\n\xff\r\nVRFY x\r\n"
        b"MAIL FROM:<a@b> BODY=BINARYMIME\r\nMAIL FROM:<c@d>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
    )
    got = [line[10:] for line in lines(out) if line[0] in "45"]
    assert got == [
        "need_hello text",
        "hello_syntax text",
        "argument_required text",
        "argument_not_allowed text",
        "need_mail text",
        "mail_syntax text",
        "need_rcpt text",
        "rcpt_syntax text",
        "data_after_bdat text",
        "bad_sequence text",
        "bdat_syntax text",
        "control_characters text",
        "invalid_utf8 text",
        "not_implemented text",
        "sender_already_specified text",
        "binarymime_needs_bdat text",
    ]


def test_pass_through_replies_keep_the_parser_text_unless_overridden() -> None:
    data = (
        b"EHLO c\r\nMAIL FROM:a@b\r\nMAIL FROM:<a@b..c>\r\nMAIL FROM:<a@b> X=1=2\r\n"
        b"MAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b>\r\nRCPT TO:<>\r\n"
    )
    plain = lines(run(cfg(), data))[12:]
    assert plain == [
        "501 5.5.2 Syntax error: address must be enclosed in <>",
        "501 5.1.7 Bad sender address syntax: invalid domain",
        "501 5.5.4 Malformed value for parameter X",
        "555 5.5.4 Unknown parameter FOO",
        "250 2.1.0 Sender OK",
        "501 5.1.3 Null recipient address not allowed",
    ]
    persona = Persona(
        replies={
            # str: the parser's own codes; Reply: the override's; {detail}: the parser's text
            "bad_sender_address": "Bad sender address syntax",
            "bad_recipient_address": Reply(501, "5.1.3", ("Bad recipient address syntax",)),
            "parameter_syntax": "Bad parameter ({detail})",
            "bad_parameter": Reply(555, "5.5.4", ("Unsupported option: {detail}",)),
        }
    )
    assert lines(run(cfg(persona), data))[12:] == [
        "501 5.5.2 Bad sender address syntax",
        "501 5.1.7 Bad sender address syntax",
        "501 5.5.4 Bad parameter (Malformed value for parameter X)",
        "555 5.5.4 Unsupported option: Unknown parameter FOO",
        "250 2.1.0 Sender OK",
        "501 5.1.3 Bad recipient address syntax",
    ]


def test_standard_constants_from_parsers_follow_the_persona() -> None:
    persona = Persona(
        replies={
            "smtputf8_required": "need SMTPUTF8",
            "message_too_big": Reply(
                552, "5.2.3", ("Message size exceeds maximum value ({max_size})",)
            ),
            "auth_cancelled": "cancelled",
            "auth_bad_base64": "bad base64",
            "auth_malformed": "malformed: {detail}",
            "data_line_too_long": "line too long in data",
        }
    )
    config = cfg(persona, max_message_size=20, max_data_line=30, **TLS_AUTH)
    out = run(
        config,
        b"EHLO c\r\nMAIL FROM:<\xc3\xa9@b.test>\r\nMAIL FROM:<a@b> SIZE=100\r\nAUTH PLAIN\r\n*\r\n"
        b"AUTH LOGIN\r\n!!!\r\nAUTH PLAIN AAAA\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        + b"x" * 40
        + b"\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        + b"y\r\n" * 20
        + b".\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 50 LAST\r\n"
        + b"z" * 50,
    )
    refusals = [line for line in lines(out) if line[0] == "5"]
    assert refusals == [
        "553 5.6.7 need SMTPUTF8",
        "552 5.2.3 Message size exceeds maximum value (20)",
        "501 5.7.0 cancelled",
        "501 5.5.2 bad base64",
        "501 5.5.2 malformed: Malformed PLAIN response",
        "554 5.6.0 line too long in data",
        "552 5.2.3 Message size exceeds maximum value (20)",
        "552 5.2.3 Message size exceeds maximum value (20)",
    ]


def test_standard_constants_given_by_the_caller_follow_the_persona() -> None:
    persona = Persona(
        replies={
            "auth_failed": Reply(535, "5.7.8", ("Error: authentication failed",)),
            "idle_timeout": "{hostname} Error: timeout exceeded",
            "sender_ok": "<{address}>... Sender ok",
            "too_many_errors": Reply(421, "4.7.0", ("{hostname} Error: too many errors",)),
        }
    )
    config = cfg(persona, max_auth_failures=2, **TLS_AUTH)

    def answer(point: PolicyPoint) -> Reply | None:
        if isinstance(point, AuthCredentials):
            return replies.AUTH_FAILED
        if isinstance(point, MailFrom):
            return replies.SENDER_OK
        return None

    s = Session.start(config, answer=answer)
    s.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nAUTH PLAIN AGEAYg==\r\n")
    assert lines(s.take_output())[-3:] == [
        "250 2.1.0 <a@b.test>... Sender ok",
        "250 2.0.0 Reset OK",
        "535 5.7.8 Error: authentication failed",
    ]
    s.conn.close(replies.IDLE_TIMEOUT)
    assert s.conn.data_to_send() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"

    # Not a constant: sent as given.
    own = Reply(535, "5.7.8", ("own text",))
    s2 = Session.start(config, answer=lambda p: own if isinstance(p, AuthCredentials) else None)
    s2.feed(b"EHLO c\r\nAUTH PLAIN AGEAYg==\r\nAUTH PLAIN AGEAYg==\r\n")
    assert lines(s2.take_output())[-3:] == [
        "535 5.7.8 own text",
        "535 5.7.8 own text",
        "421 4.7.0 mx.test Error: too many errors",
    ]
    s3 = Session.start(cfg(Persona(replies={"shutting_down": "going down"})))
    s3.conn.close()
    assert s3.conn.data_to_send() == b"421 4.3.2 going down\r\n"


def test_events_carry_the_persona_reply() -> None:
    persona = Persona(replies={"unknown_command": "nope", "message_too_big": "too big"})
    s = Session.start(cfg(persona, max_message_size=5))
    s.feed(b"FOO\r\nEHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n123456789\r\n.\r\n")
    rejected = [e for e in s.events if isinstance(e, CommandRejected)]
    assert rejected[0].reply.text == "nope"
    discarded = [e for e in s.events if isinstance(e, DataDiscarded)]
    assert discarded[0].reply.text == "too big"


# --- banner, greetings, {date} ----------------------------------------------------------------


def test_banner_with_date_from_the_injected_clock() -> None:
    persona = Persona(banner="{hostname} Microsoft ESMTP MAIL Service ready at {date}")
    out = run(cfg(persona, clock=lambda: NOON), b"")
    assert (
        out
        == b"220 mx.test Microsoft ESMTP MAIL Service ready at Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    )
    west = timezone(-timedelta(hours=5, minutes=30))
    out = run(cfg(persona, clock=lambda: datetime(2027, 3, 14, 23, 5, 9, tzinfo=west)), b"")
    assert out.endswith(b"ready at Sun, 14 Mar 2027 23:05:09 -0530\r\n")


def test_date_is_read_only_when_used() -> None:
    def clock() -> datetime:
        raise AssertionError("clock read for a banner without {date}")

    assert run(cfg(clock=clock), b"NOOP\r\n").startswith(b"220 mx.test ESMTP mailgate\r\n")


def test_format_date() -> None:
    assert format_date(NOON) == "Tue, 1 Dec 2026 10:00:00 +0000"
    assert re.fullmatch(
        r"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", format_date(datetime(2026, 1, 2))
    )
    assert re.fullmatch(r".* [+-]\d{4}", format_date(ProtocolConfig().clock()))


def test_banner_placeholders_software_protocol_client_ip() -> None:
    persona = Persona(banner="{hostname} {protocol} {software} for [{client_ip}]")
    assert run(cfg(persona, software="Postfix"), b"", client_ip="192.0.2.7") == (
        b"220 mx.test ESMTP Postfix for [192.0.2.7]\r\n"
    )
    assert run(cfg(persona, lmtp=True), b"") == b"220 mx.test LMTP mailgate for []\r\n"


def test_ehlo_and_helo_greetings() -> None:
    persona = Persona(
        ehlo_greeting="{hostname} Hello {helo} [{client_ip}]",
        helo_greeting="{hostname}",
    )
    out = run(cfg(persona), b"EHLO client.test\r\nHELO other.test\r\n", client_ip="192.0.2.1")
    assert lines(out)[1] == "250-mx.test Hello client.test [192.0.2.1]"
    assert lines(out)[-1] == "250 mx.test"
    s = Session.start(cfg(persona, lmtp=True))
    s.feed(b"LHLO c.test\r\n")
    assert lines(s.take_output())[0] == "250-mx.test Hello c.test []"


def test_client_ip_can_change_and_xclient_greets_with_the_banner() -> None:
    persona = Persona(banner="{hostname} ready for {client_ip}")
    s = Session.start(
        cfg(persona, xclient=True), greet=False, peer_trusted=True, client_ip="10.0.0.1"
    )
    s.pump()
    assert s.take_output() == b"220 mx.test ready for 10.0.0.1\r\n"
    s.conn.client_ip = "203.0.113.9"  # what a server does after XCLIENT ADDR=
    s.feed(b"EHLO proxy\r\nXCLIENT ADDR=203.0.113.9\r\n")
    assert lines(s.take_output())[-1] == "220 mx.test ready for 203.0.113.9"


def test_a_policy_greeting_text_still_wins() -> None:
    persona = Persona(ehlo_greeting="{hostname} persona")
    line = Reply(250, None, ("policy line",))
    s = Session.start(cfg(persona), answer=lambda p: line if isinstance(p, Hello) else None)
    s.feed(b"EHLO c\r\n")
    assert lines(s.take_output())[0] == "250-policy line"


# --- capabilities -------------------------------------------------------------------------------


def test_capability_order() -> None:
    persona = Persona(capability_order=("starttls", "AUTH", "SIZE", "8BITMIME", "PIPELINING"))
    out = run(cfg(persona, **TLS_AUTH), b"EHLO c\r\n")
    assert ehlo_keywords(out) == [
        "STARTTLS",
        "AUTH",
        "SIZE",
        "8BITMIME",
        "PIPELINING",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
        "VRFY",
        "HELP",
    ]
    assert "250-AUTH PLAIN LOGIN" in lines(out)


def test_a_persona_never_advertises_what_mailgate_does_not_do() -> None:
    persona = Persona(capability_order=("STARTTLS", "AUTH", "CHUNKING", "DSN", "XCLIENT"))
    out = run(cfg(persona, chunking=False, dsn=False), b"EHLO c\r\nSTARTTLS\r\nBDAT 1\r\n")
    keywords = ehlo_keywords(out)
    assert not {"STARTTLS", "AUTH", "CHUNKING", "BINARYMIME", "DSN", "XCLIENT"} & set(keywords)
    assert keywords[0] == "PIPELINING"  # only what is offered is reordered
    assert lines(out)[-2:] == [
        "502 5.5.1 Command not implemented",
        "502 5.5.1 Command not implemented",
    ]


@pytest.mark.parametrize(
    ("hidden", "command", "expected"),
    [
        ("STARTTLS", "STARTTLS", "500 5.5.2 Command not recognized"),
        ("AUTH", "AUTH PLAIN", "500 5.5.2 Command not recognized"),
        ("VRFY", "VRFY root", "500 5.5.2 Command not recognized"),
        ("EXPN", "EXPN staff", "500 5.5.2 Command not recognized"),
        ("HELP", "HELP", "500 5.5.2 Command not recognized"),
        ("SMTPUTF8", "MAIL FROM:<a@b> SMTPUTF8", "555 5.5.4 Parameter SMTPUTF8 is not supported"),
        (
            "SMTPUTF8",
            "MAIL FROM:<\xe9@b.test> SMTPUTF8",
            "555 5.5.4 Parameter SMTPUTF8 is not supported",
        ),
        ("8BITMIME", "MAIL FROM:<a@b> BODY=8BITMIME", "555 5.5.4 BODY=8BITMIME is not supported"),
        ("DSN", "MAIL FROM:<a@b> RET=FULL", "555 5.5.4 Parameter RET is not supported"),
        ("SIZE", "MAIL FROM:<a@b> SIZE=10", "555 5.5.4 Parameter SIZE is not supported"),
        ("AUTH", "MAIL FROM:<a@b> AUTH=<>", "555 5.5.4 Parameter AUTH is not supported"),
        (
            "BINARYMIME",
            "MAIL FROM:<a@b> BODY=BINARYMIME",
            "555 5.5.4 BODY=BINARYMIME is not supported",
        ),
    ],
)
def test_hidden_capabilities(hidden: str, command: str, expected: str) -> None:
    persona = Persona(hidden_capabilities=frozenset({hidden}))
    s = Session.start(cfg(persona, **TLS_AUTH))
    s.feed(b"EHLO c\r\n")
    assert hidden not in ehlo_keywords(s.take_output())
    s.feed(command.encode() + b"\r\n")
    assert lines(s.take_output()) == [expected]
    # Without the persona the same command is served.
    plain = Session.start(cfg(**TLS_AUTH))
    plain.feed(b"EHLO c\r\n" + command.encode() + b"\r\n")
    assert lines(plain.take_output())[-1] != expected


def test_hidden_chunking_hides_bdat_and_binarymime() -> None:
    persona = Persona(hidden_capabilities=frozenset({"CHUNKING"}))
    out = run(
        cfg(persona), b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nHELP\r\n"
    )
    assert not {"CHUNKING", "BINARYMIME"} & set(ehlo_keywords(out))
    assert persona.hidden_capabilities == {"CHUNKING", "BINARYMIME"}
    # BDAT is unknown, so its 3 octets are not read as a chunk: "HELP" is the next command.
    assert lines(out)[-3] == "500 5.5.2 Command not recognized"
    assert "BDAT" not in lines(out)[-2]
    assert lines(out)[-2].startswith("214-2.0.0 Commands: DATA EHLO")


def test_hidden_verbs_count_as_unknown_commands() -> None:
    persona = Persona(hidden_capabilities=frozenset({"STARTTLS"}))
    out = run(cfg(persona, starttls=True, max_unknown_commands=2), b"STARTTLS\r\n" * 3)
    assert lines(out)[-1] == "421 4.7.0 Too many errors, closing connection"


def test_hidden_enhancedstatuscodes_drops_the_codes() -> None:
    persona = Persona(hidden_capabilities=frozenset({"ENHANCEDSTATUSCODES"}))
    out = run(cfg(persona), b"EHLO c\r\nNOOP\r\n")
    assert "ENHANCEDSTATUSCODES" not in ehlo_keywords(out)
    assert lines(out)[-1] == "250 OK"


def test_enhanced_status_codes_off() -> None:
    persona = Persona(
        enhanced_status_codes=False, replies={"noop_ok": Reply(250, "2.0.0", ("Ok",))}
    )
    out = run(cfg(persona), SESSION)
    assert "ENHANCEDSTATUSCODES" not in ehlo_keywords(out)
    assert not [line for line in lines(out) if re.match(r"\d{3}[ -][245]\.\d", line)]
    assert "250 Sender OK" in lines(out)
    assert "250 Ok" in lines(out)
    # Same output as the config flag gives.
    assert run(cfg(Persona(enhanced_status_codes=False)), SESSION) == run(
        cfg(enhanced_status_codes=False), SESSION
    )


# --- HELP -------------------------------------------------------------------------------------


def test_help_lines_and_code() -> None:
    persona = Persona(help=("Commands supported:", "{commands}"))
    out = run(cfg(persona, vrfy=False), b"HELP\r\n")
    assert lines(out)[1:] == [
        "214-2.0.0 Commands supported:",
        "214 2.0.0 BDAT DATA EHLO EXPN HELO HELP MAIL NOOP QUIT RCPT RSET",
    ]
    persona = Persona(help=("This is {software} on {hostname}",), help_code=211)
    assert lines(run(cfg(persona), b"HELP me\r\n"))[1] == "211 2.0.0 This is mailgate on mx.test"
    assert lines(run(cfg(Persona(help_code=211)), b"HELP\r\n"))[-1] == "211 2.0.0 End of HELP"


def test_help_as_a_reply_override_and_hidden_verbs_left_out() -> None:
    persona = Persona(
        replies={"help": Reply(214, None, ("{commands}",))},
        hidden_capabilities=frozenset({"CHUNKING", "VRFY", "EXPN"}),
    )
    out = run(cfg(persona), b"HELP\r\n")
    assert lines(out)[1] == "214 DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET"


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"replies": {"sender_okay": "x"}},
            "unknown reply name 'sender_okay' (did you mean 'sender_ok'?)",
        ),
        ({"replies": {"bye": "Bye {address}"}}, "reply 'bye': unknown placeholder {address}"),
        (
            {"replies": {"sender_ok": "{adress} ok"}},
            "allowed: {address}, {argument}, {hostname}, {parameters}, {path}",
        ),
        ({"replies": {"bye": "Bye {"}}, "reply 'bye': Single '{' encountered"),
        ({"replies": {"bye": "Bye }"}}, "reply 'bye': Single '}' encountered"),
        ({"replies": {"sender_ok": "{address:>10}"}}, "takes no format spec"),
        ({"replies": {"sender_ok": "{address!r}"}}, "takes no format spec"),
        ({"replies": {"bye": "{0}"}}, "unknown placeholder {0}"),
        ({"replies": {"bye": "{hostname.upper}"}}, "unknown placeholder {hostname.upper}"),
        ({"replies": {"bye": "Tsch\xfcss"}}, "reply 'bye': character '\xfc' not allowed"),
        ({"replies": {"bye": "a\x00b"}}, "reply 'bye': character '\\x00' not allowed"),
        ({"replies": {"bye": "a\rb"}}, "reply 'bye'"),
        ({"replies": {"bye": 221}}, "reply 'bye': give a Reply or a str, not int"),
        (
            {"replies": {"sender_ok": Reply(550, "5.7.1", ("no",))}},
            "reply 'sender_ok': the code must be a 2xx",
        ),
        ({"replies": {"unknown_command": Reply(250, None, ("fine",))}}, "must be a 4xx or 5xx"),
        (
            {"replies": {"start_data": Reply(350, None, ("go",))}},
            "reply 'start_data': the code must be 354",
        ),
        ({"replies": {"ready_for_tls": Reply(250, None, ("go",))}}, "must be 220"),
        ({"banner": "{hostname} {helo}"}, "banner: unknown placeholder {helo}"),
        ({"ehlo_greeting": "{hostname} {address}"}, "ehlo_greeting: unknown placeholder {address}"),
        ({"helo_greeting": "{"}, "helo_greeting: Single '{'"),
        ({"banner": "caf\xe9"}, "banner: character"),
        ({"banner": " "}, "banner: must not be empty"),
        ({"ehlo_greeting": ""}, "ehlo_greeting: must not be empty"),
        ({"help": ("{address}",)}, "reply 'help': unknown placeholder {address}"),
        ({"help": ("x",), "replies": {"help": "y"}}, "help: give either"),
        ({"help_code": 502}, "help_code: 502 is not a 2xx code"),
        (
            {"hidden_capabilities": frozenset({"STARTLS"})},
            "unknown EHLO keyword 'STARTLS' (did you mean 'STARTTLS'?)",
        ),
        ({"hidden_capabilities": "STARTTLS"}, "not a string"),
        ({"capability_order": ("SIZE", "size")}, "listed twice"),
        ({"capability_order": ("FOO",)}, "capability_order: unknown EHLO keyword 'FOO'"),
    ],
)
def test_bad_personas_are_refused_naming_the_reply(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PersonaError) as info:
        Persona(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_name_accepts_its_placeholders() -> None:
    replies = {
        name: " ".join("{" + p + "}" for p in sorted(PLACEHOLDERS[name])) for name in REPLY_NAMES
    }
    persona = Persona(replies=replies)
    assert persona.overridden == REPLY_NAMES


# --- the API servers use ---------------------------------------------------------------------


def test_format_reply_and_clean_values() -> None:
    persona = Persona(replies={"message_queued": "Ok: queued as {queue_id}"})
    assert persona.reply("message_queued") == Reply(250, "2.0.0", ("Ok: queued as {queue_id}",))
    assert persona.format("message_queued", queue_id="4XyZ") == Reply(
        250, "2.0.0", ("Ok: queued as 4XyZ",)
    )
    assert (
        DEFAULT_PERSONA.format("message_queued", queue_id="abc").text == "Message accepted as abc"
    )
    assert persona.format("message_queued", queue_id="a\r\nb").text == "Ok: queued as a??b"
    assert persona.format("message_queued").text == "Ok: queued as "
    assert persona.format("bye") is replies.BYE
    assert clean(None) == "" and clean(12) == "12" and clean("x\ny\x7f") == "x?y?"
    with pytest.raises(KeyError):
        persona.reply("nope")
    assert persona.adapt("bad_parameter", replies.SMTPUTF8_REQUIRED) is replies.SMTPUTF8_REQUIRED
    assert set(PASS_THROUGH) <= REPLY_NAMES


def test_persona_normalizes_its_values() -> None:
    replies = {"bye": "Later"}
    persona = Persona(
        replies=replies,
        capability_order=["size", "auth"],  # type: ignore[arg-type]
        hidden_capabilities={"dsn"},  # type: ignore[arg-type]
        help="one line",  # type: ignore[arg-type]
    )
    replies["bye"] = "changed"  # the persona kept its own copy
    assert persona.reply("bye").text == "Later"
    assert persona.capability_order == ("SIZE", "AUTH")
    assert persona.hidden_capabilities == frozenset({"DSN"})
    assert persona.help == ("one line",)
    assert Persona(replies={"bye": "Later"}) == Persona(replies={"bye": "Later"})


def test_personas_can_be_derived_with_replace() -> None:
    base = Persona(
        help=("Commands: {commands}",),
        hidden_capabilities=frozenset({"CHUNKING"}),
        replies={"bye": "Later"},
    )
    derived = dataclasses.replace(base, banner="{hostname} ESMTP Postfix")
    assert derived.help == base.help and derived.replies == base.replies
    assert derived.overridden == {"bye", "help"}
    assert "help" not in derived.replies  # help lines do not leak into replies
    out = run(cfg(derived), b"HELP\r\nQUIT\r\n")
    assert lines(out) == [
        "220 mx.test ESMTP Postfix",
        "214 2.0.0 Commands: DATA EHLO EXPN HELO HELP MAIL NOOP QUIT RCPT RSET VRFY",
        "221 2.0.0 Later",
    ]


# --- property: whatever the texts, the wire stays well-formed ---------------------------------

_TEXT_CHARS = st.characters(
    min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="{}"
) | st.just("\t")
# RFC 5321 4.2: a code, then "-" on all lines but the last, SP and text optional on the last.
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:([ -])[^\r\n]*)?")


@st.composite
def texts(draw: st.DrawFn, allowed: frozenset[str]) -> str:
    pieces = draw(
        st.lists(
            st.text(_TEXT_CHARS, max_size=12)
            | st.sampled_from(sorted("{" + p + "}" for p in allowed))
            | st.sampled_from(["{{", "}}"]),
            max_size=5,
        )
    )
    return "".join(pieces)


@st.composite
def overrides(draw: st.DrawFn, name: str) -> Reply | str:
    default = getattr(replies, name.upper())
    text = draw(st.lists(texts(PLACEHOLDERS[name]), min_size=1, max_size=3).map("\n".join))
    if draw(st.booleans()):
        return text
    if name == "start_data":
        code = 354
    elif name == "ready_for_tls":
        code = 220
    elif name == "prdr_start":
        code = 353
    elif default.is_positive:
        code = draw(st.integers(default.code // 100 * 100, default.code // 100 * 100 + 99))
    else:
        code = draw(st.integers(400, 599))
    status = None
    if code // 100 != 3 and draw(st.booleans()):
        status = draw(st.integers(0, 999).map(lambda n: f"{code // 100}.{n % 10}.{n}"))
    return Reply(code, status, tuple(text.split("\n")))


@st.composite
def personas(draw: st.DrawFn) -> Persona:
    names = draw(st.sets(st.sampled_from(sorted(REPLY_NAMES - {"help"}))))
    # PIPECONNECT needs a behaviour that greets early talkers; drawn without it.
    keywords = sorted(KEYWORDS - {"PIPECONNECT"})
    return Persona(
        replies={name: draw(overrides(name)) for name in names},
        banner="x"
        + draw(texts(frozenset({"hostname", "software", "protocol", "date", "client_ip"}))),
        ehlo_greeting="x" + draw(texts(frozenset({"hostname", "helo", "client_ip", "date"}))),
        helo_greeting="x" + draw(texts(frozenset({"hostname", "helo", "software"}))),
        capability_order=tuple(draw(st.permutations(keywords))[: draw(st.integers(0, 8))]),
        hidden_capabilities=frozenset(draw(st.sets(st.sampled_from(keywords), max_size=4))),
        help=tuple(
            draw(st.lists(texts(frozenset({"commands", "software", "hostname"})), max_size=3))
        ),
        help_code=draw(st.sampled_from([211, 214, 250])),
        enhanced_status_codes=draw(st.booleans()),
    )


HOSTILE = (
    b"MAIL FROM:<a@b>\r\nHELO\r\nHELO a b\r\nEHLO evil\xc2\x85host\r\nHELO h\xc3\xa9llo\r\n"
    b"EHLO c.test\r\nFOO \x1b[31m\r\nBAR\x85\r\nHELP\r\nHELP x\r\nVRFY r\xc3\xa9o\t t\r\n"
    b"EXPN staff\r\nRSET x\r\nNOOP\r\nRCPT TO:<a@b>\r\nXFORWARD NAME=spike\r\nXCLIENT ADDR=::1\r\n"
    b"MAIL x\r\n"
    b"MAIL FROM:a@b\r\nMAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b> SIZE=99999\r\n"
    b"MAIL FROM:<a@b> X=1=2\r\nMAIL FROM:<\xc3\xa9@b.test>\r\nMAIL FROM:<\xc3\xa9@b.test> SMTPUTF8\r\n"
    b"MAIL FROM:<a@b>\r\nDATA\r\nRCPT x\r\nRCPT TO:<\xc3\xa9@c.test>\r\nRCPT TO:<>\r\n"
    b"RCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\nline\r\nbare\n.\r\n.\r\n"
    b"MAIL FROM:<a@b> BODY=BINARYMIME\r\nRCPT TO:<p@q.test>\r\nDATA\r\nBDAT 3\r\nabcDATA\r\n"
    b"RCPT TO:<r@s.test>\r\n"
    b"BDAT z\r\nBDAT 1 LAST\r\nzMAIL FROM:<>\r\nRCPT TO:<p@q.test>\r\nDATA\r\n"
    + b"d"
    * 40
    + b"\r\n.\r\nAUTH a b c\r\nAUTH FOO\r\nAUTH PLAIN AAAA\r\nAUTH PLAIN\r\n*\r\n"
    b"AUTH PLAIN\r\n" + b"A" * 200 + b"\r\nAUTH LOGIN\r\n!!!\r\nAUTH PLAIN AGEAYg==\r\n"
    b"AUTH PLAIN =\r\nAUTH CRAM-MD5 x\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\nRSET\r\n"
    + b"L" * 600
    + b"\r\n"
)
#: (client bytes, ServerConnection arguments, how the server closes: a reply, or default)
SCRIPTS: list[tuple[bytes, dict[str, object], Reply | None]] = [
    (HOSTILE, {"peer_trusted": True, "client_ip": "192.0.2.1\r\n"}, replies.IDLE_TIMEOUT),
    (b"STARTTLS\r\nEHLO x\r\nSTARTTLS\r\n", {}, None),
    (b"EHLO x\r\nSTARTTLS\r\nAUTH PLAIN\r\n=\r\nQUIT\r\n", {"tls_active": True}, None),
    (b"FOO\r\n" * 60, {}, None),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    persona=personas(),
    noise=st.lists(
        st.binary(max_size=30) | st.sampled_from([b"EHLO ", b"MAIL FROM:<", b"RCPT TO:<", b"\r\n"]),
        max_size=12,
    ).map(b"".join),
)
def test_any_valid_persona_keeps_the_wire_well_formed(persona: Persona, noise: bytes) -> None:
    config = ProtocolConfig(
        hostname="mx.test",
        persona=persona,
        max_message_size=10,
        max_recipients=1,
        max_data_line=30,
        max_auth_line=100,
        auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"),
        auth_requires_tls=False,
        starttls=True,
        xforward=True,
        max_unknown_commands=50,
        max_bad_commands=60,
        max_auth_failures=10,
        clock=lambda: NOON,
    )
    for data, kwargs, closing in [*SCRIPTS, (b"EHLO x\r\n" + noise, {}, None)]:
        conn = ServerConnection(config, **kwargs)  # type: ignore[arg-type]
        for chunk in (b"", data):
            if chunk:
                conn.receive_data(chunk)
            for _ in range(1000):
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, PolicyPoint):
                    conn.respond(None)
        if closing is None:
            conn.close()
        else:
            conn.close(closing)
        out = conn.data_to_send()
        assert out.endswith(b"\r\n")
        continued: bytes | None = None
        for line in out.split(b"\r\n")[:-1]:
            match = _REPLY_LINE.fullmatch(line)
            assert match, line
            if continued is not None:
                assert line[:3] == continued  # a multi-line reply keeps its code
            continued = line[:3] if match.group(1) == b"-" else None
            line.decode("utf-8")
        assert continued is None


def test_unadvertised_capabilities_are_left_out_of_ehlo_but_still_served() -> None:
    persona = Persona(unadvertised_capabilities=frozenset({"VRFY", "HELP"}))
    out = run(cfg(persona), b"EHLO c\r\nVRFY root\r\nHELP\r\n")
    assert not {"VRFY", "HELP"} & set(ehlo_keywords(out))
    assert lines(out)[-3].startswith("252 2.5.0")  # VRFY answered as usual
    assert lines(out)[-2].startswith("214-2.0.0 Commands:")
    with pytest.raises(PersonaError, match="unadvertised_capabilities"):
        Persona(unadvertised_capabilities="VRFY")  # type: ignore[arg-type]
    with pytest.raises(PersonaError, match="unadvertised_capabilities"):
        Persona(unadvertised_capabilities=frozenset({"NOPE"}))


def test_padded_date_for_products_that_write_two_digit_days() -> None:
    persona = Persona(banner="{hostname} ESMTP Exim 4.96 {date_padded}")
    out = run(cfg(persona, clock=lambda: NOON), b"")
    assert out == b"220 mx.test ESMTP Exim 4.96 Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    assert format_date(NOON, padded=True) == "Tue, 01 Dec 2026 10:00:00 +0000"


# --- the placeholder check (shared with the honeypot's profile files) --------------------------


def test_placeholders_in_returns_the_names_a_text_uses() -> None:
    allowed = frozenset({"hostname", "address"})
    assert placeholders_in("{hostname} ok {address} {{x}} {address}", allowed) == {
        "hostname",
        "address",
    }
    assert placeholders_in("no placeholder\there", allowed) == frozenset()


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (
            "ok {adress}",
            "",
            "unknown placeholder {adress} in 'ok {adress}' "
            "(did you mean {address}? allowed: {address}, {hostname})",
        ),
        ("ok {queue}", "reply 'x'", "reply 'x': unknown placeholder {queue} in 'ok {queue}' ("),
        ("{address!r}", "", "placeholder {address} takes no format spec or conversion"),
        ("{address:>9}", "banner", "banner: placeholder {address} takes no format spec"),
        ("ok {", "", "Single '{' encountered in format string in 'ok {' (write '{{' and '}}'"),
        ("caf\xe9", "", "character '\xe9' not allowed in a reply text (printable ASCII"),
    ],
)
def test_placeholders_in_refuses_with_a_message_naming_the_place(
    text: str, where: str, message: str
) -> None:
    with pytest.raises(PersonaError) as info:
        placeholders_in(text, frozenset({"hostname", "address"}), where)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)
