"""Echoing the client's words in a persona's replies ({argument}, {path}, {parameters},
{response}): what is echoed, where it may be used, and that no input can break a reply."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocol import (
    NEED_DATA,
    REPLY_NAMES,
    Persona,
    PersonaError,
    PolicyPoint,
    ProtocolConfig,
    Reply,
    ServerConnection,
)
from mailgate.protocol.persona import (
    AUTH_REPLIES,
    ECHO_LIMIT,
    ENVELOPE_REPLIES,
    LOCAL_PART_REPLIES,
    NOT_ANSWERS,
    PLACEHOLDERS,
    echo,
    echo_values,
    local_part_read,
    split_written_path,
)

from .session import run_with_defaults

#: A reply line as RFC 5321 4.2 has it: code, space or hyphen, printable ASCII, CRLF.
REPLY_LINE = re.compile(rb"[2-5][0-9]{2}(?:[ -][\x20-\x7e]*)?\r\n")


def run(persona: Persona, data: bytes) -> bytes:
    """Greet, feed ``data``, answer every policy point with the default; the output after
    the banner."""
    conn = ServerConnection(ProtocolConfig(hostname="mx.test", persona=persona))
    return run_with_defaults(conn, data)[1]


def lines(data: bytes) -> list[str]:
    return data.decode("ascii").split("\r\n")[:-1]


# Exim's texts, which repeat the client's words.
EXIM_LIKE = Persona(
    replies={
        "bad_sender_address": "{argument}: malformed address",
        "bad_recipient_address": "{argument}: malformed address",
        "unknown_parameter": Reply(501, None, ("{argument}: {parameters} may not follow {path}",)),
        "sender_ok": "{path}... Sender ok",
        "recipient_ok": "{path}... Recipient ok ({parameters})",
        "unknown_command": "unrecognized command: {verb} [{argument}]",
        "auth_bad_base64": "cannot decode {response}",
        "auth_bad_base64_initial": "cannot BASE64 decode '{response}'",
        "noop_ok": "OK {argument}",
    },
    enhanced_status_codes=False,
)


# --- what is echoed ----------------------------------------------------------------------------


def test_the_path_and_parameters_as_written() -> None:
    assert split_written_path("<a@b> SIZE=1  BODY=7BIT ") == ("<a@b>", "SIZE=1  BODY=7BIT")
    assert split_written_path('<"a>b"@c> X') == ('<"a>b"@c>', "X")
    assert split_written_path("<a@b") == ("<a@b", "")
    assert split_written_path("a@b X=1") == ("a@b", "X=1")
    assert echo_values("MAIL", "from:  <a@b> X=1 ") == {
        "argument": "<a@b> X=1",
        "path": "<a@b>",
        "parameters": "X=1",
        "response": "",
        "local_part_read": "a",
    }
    assert echo_values("VRFY", " root ")["argument"] == "root"
    assert echo_values("AUTH", "PLAIN AGFhAGI=")["response"] == "AGFhAGI="
    assert echo_values("", "c2VjcmV0")["response"] == "c2VjcmV0"


def test_unsafe_characters_are_replaced_and_long_words_cut() -> None:
    assert echo("a\r\nb\tc\x00d\x7fé€") == "a??b?c?d???"
    assert echo("x" * (ECHO_LIMIT + 50)) == "x" * (ECHO_LIMIT - 3) + "..."
    assert echo("x" * ECHO_LIMIT) == "x" * ECHO_LIMIT
    assert echo("{braces} {0}") == "{braces} {0}"


def test_envelope_replies_echo_the_path_as_written() -> None:
    out = run(
        EXIM_LIKE,
        b"EHLO c\r\nMAIL FROM:<a@b.test\r\nMAIL FROM:<a b@c.test>\r\n"
        b"MAIL FROM:<a@b.test> FOO=BAR\r\nMAIL FROM: <a@b.test>\r\nRCPT TO:<c@d.test>\r\n",
    )
    assert lines(out)[-5:] == [
        "501 <a@b.test: malformed address",
        "501 <a b@c.test>: malformed address",
        "501 <a@b.test> FOO=BAR: FOO=BAR may not follow <a@b.test>",
        "250 <a@b.test>... Sender ok",
        "250 <c@d.test>... Recipient ok ()",
    ]


def test_other_commands_echo_their_argument() -> None:
    out = run(EXIM_LIKE, b"EHLO c\r\nNOOP  hello there \r\nxyzzy {0} {argument}\r\n")
    assert lines(out)[-2:] == [
        "250 OK hello there",
        "500 unrecognized command: XYZZY [{0} {argument}]",
    ]


def test_auth_replies_echo_the_response() -> None:
    config = ProtocolConfig(
        hostname="mx.test",
        persona=EXIM_LIKE,
        auth_mechanisms=("PLAIN",),
        auth_requires_tls=False,
    )
    conn = ServerConnection(config)
    out = bytearray()
    for data in (b"", b"EHLO c\r\nAUTH PLAIN !!not-base64!!\r\nAUTH PLAIN\r\n%%%\r\n"):
        if data:
            conn.receive_data(data)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, PolicyPoint):
                conn.respond(None)
        out += conn.data_to_send()
    assert lines(bytes(out))[-3:] == [
        "501 cannot BASE64 decode '!!not-base64!!'",
        "334 ",
        "501 cannot decode %%%",
    ]


def test_a_line_that_is_not_utf8_echoes_nothing_of_the_command_before() -> None:
    persona = Persona(replies={"invalid_utf8": "bad [{argument}]"})
    out = run(persona, b"NOOP secret\r\n\xff\xfe\r\n")
    assert lines(out)[-1] == "500 5.5.2 bad []"


def test_the_default_persona_is_unchanged() -> None:
    # mailgate's own texts have no echo: byte for byte what they were.
    out = run(Persona(), b"EHLO c\r\nMAIL FROM:<a@b.test\r\nNOOP x\r\n")
    assert lines(out)[-2:] == ["501 5.5.2 Syntax error: unterminated <address>", "250 2.0.0 OK"]


# --- where they are valid ----------------------------------------------------------------------


def test_where_each_echo_placeholder_is_valid() -> None:
    for name in REPLY_NAMES:
        allowed = PLACEHOLDERS[name]
        assert ("argument" in allowed) == (name not in NOT_ANSWERS), name
        assert ("path" in allowed) == (name in ENVELOPE_REPLIES), name
        assert ("parameters" in allowed) == (name in ENVELOPE_REPLIES), name
        assert ("response" in allowed) == (name in AUTH_REPLIES), name
        assert ("local_part_read" in allowed) == (name in LOCAL_PART_REPLIES), name


def test_the_local_part_read_before_the_parser_stopped() -> None:
    assert local_part_read("<a b@example.net>") == "a"
    assert local_part_read("<first.last(x)@example.net>") == "first.last"
    assert local_part_read('<"q r".x y@z>') == '"q r".x'
    assert local_part_read("<@relay.example:a,b@c>") == "a"
    assert local_part_read("a;b@c") == "a"
    persona = Persona(
        replies={"address_local_part": '{argument}: "@" or "." expected after "{local_part_read}"'}
    )
    out = run(persona, b"EHLO c\r\nMAIL FROM:<a b@example.net>\r\n")
    assert lines(out)[-1] == '501 5.1.7 <a b@example.net>: "@" or "." expected after "a"'


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ({"sender_ok": "{pth} ok"}, "did you mean {path}?"),
        ({"noop_ok": "{path}"}, "unknown placeholder {path}"),
        ({"idle_timeout": "{argument}"}, "unknown placeholder {argument}"),
        ({"recipient_ok": "{response}"}, "unknown placeholder {response}"),
        ({"sender_ok": "{path!r}"}, "takes no format spec"),
    ],
)
def test_misplaced_echo_placeholders_are_named_errors(
    replies: dict[str, str], message: str
) -> None:
    with pytest.raises(PersonaError, match=re.escape(message)):
        Persona(replies=replies)  # type: ignore[arg-type]


# --- nothing the client sends can break a reply -------------------------------------------------

ANY_ARGUMENT = st.binary(min_size=0, max_size=700).map(
    # Line ends end the command line; they are what the test must not see in a reply.
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
)
ECHOING = Persona(
    replies={
        "sender_ok": "{path} ok {parameters} [{argument}]",
        "bad_sender_address": "{argument} / {path} / {parameters}",
        "unknown_parameter": "{argument} / {path} / {parameters}",
        "parameter_syntax": "{argument} / {parameters}",
        "control_characters": "{argument}",
        "noop_ok": "{argument}",
        "unknown_command": "{verb} {argument}",
        "invalid_utf8": "{argument}",
        "argument_not_allowed": "{argument}",
    },
    enhanced_status_codes=False,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    verb=st.sampled_from([b"MAIL FROM:", b"MAIL FROM:<", b"NOOP ", b"XYZZY ", b"RSET "]),
    argument=ANY_ARGUMENT,
)
def test_any_echo_is_one_well_formed_reply(verb: bytes, argument: bytes) -> None:
    out = run(ECHOING, b"EHLO c\r\n" + verb + argument + b"\r\nQUIT\r\n")
    replies = out.split(b"\r\n")[:-1]
    assert all(REPLY_LINE.fullmatch(line + b"\r\n") for line in replies), out
    # The EHLO reply, one line for the command, the QUIT: nothing injected in between.
    ehlo = [line for line in replies if line.startswith(b"250-")]
    assert len(replies) == len(ehlo) + 3, out
    echoed = replies[-2]
    assert len(echoed) <= 4 + 3 * ECHO_LIMIT + 20, len(echoed)


@given(st.text(max_size=ECHO_LIMIT * 2))
def test_echo_is_printable_ascii_and_bounded(text: str) -> None:
    shown = echo(text)
    assert len(shown) <= ECHO_LIMIT
    assert re.fullmatch(r"[\x20-\x7e]*", shown)
    if len(text) <= ECHO_LIMIT:
        assert len(shown) == len(text)


# The built-in personas that echo (Exim's parser texts, Sendmail's addresses): whatever
# command lines come, every reply stays well-formed.
COMMAND_WORDS = st.sampled_from(
    [b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT 1", b"VRFY ", b"NOOP ", b"HELO ", b"XY "]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(COMMAND_WORDS, ANY_ARGUMENT.map(lambda b: b[:300])), max_size=6))
def test_the_echoing_built_in_personas_keep_replies_well_formed(
    commands: list[tuple[bytes, bytes]],
) -> None:
    from mailgate.honeypot.personas import PERSONAS

    for name in ("exim", "sendmail"):
        config = PERSONAS[name].protocol_config()
        conn = ServerConnection(config)
        out = bytearray()
        data = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n" + b"".join(
            verb + argument + b"\r\n" for verb, argument in commands
        )
        for chunk in (b"", data):
            if chunk:
                conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, PolicyPoint):
                    conn.respond(None)
            out += conn.data_to_send()
        replies = bytes(out).split(b"\r\n")[:-1]
        assert all(REPLY_LINE.fullmatch(line + b"\r\n") for line in replies), (name, out)


def test_the_older_client_word_placeholders_are_made_safe_too() -> None:
    # {verb}, {command} (unknown commands), {mechanism}, {address} of VRFY: the client's
    # words, shown as printable ASCII like the echo placeholders.
    persona = Persona(
        replies={
            "unknown_command": "unrecognized: {verb} [{command}]",
            "vrfy_default": "cannot verify {address}",
        },
        enhanced_status_codes=False,
    )
    out = run(persona, "EHLO c\r\nXYZ\u00e9 caf\u00e9\u2028x\r\nVRFY r\u00f6\u00f6t@x\r\n".encode())
    assert lines(out)[-2:] == [
        "500 unrecognized: XYZ? [XYZ? caf??x]",
        "252 cannot verify r??t@x",
    ]
