"""Each knob of a persona's Behaviour, sans-IO: the default (mailgate's own behaviour)
and the product's, side by side."""

from __future__ import annotations

import dataclasses

import pytest

from mailgate.protocol import (
    CommandRejected,
    ConnectionClosed,
    LimitExceeded,
    MailFrom,
    Persona,
    ProtocolConfig,
    RcptTo,
    Reply,
)
from mailgate.protocol.behaviour import Behaviour, BehaviourError
from mailgate.protocol.events import Limit
from mailgate.protocol.persona import FALLBACKS, PersonaError

from .session import Session

BASE = ProtocolConfig(hostname="mx.test")


def config(**knobs: object) -> ProtocolConfig:
    return dataclasses.replace(BASE, persona=Persona(behaviour=Behaviour(**knobs)))  # type: ignore[arg-type]


def lines(s: Session, data: str) -> list[str]:
    s.feed(data.encode())
    return s.take_output().decode().splitlines()


# --- hello_required -------------------------------------------------------------------------


def test_hello_required_by_default() -> None:
    s = Session.start(BASE)
    assert s.cmd("MAIL FROM:<a@b.test>") == 503


def test_mail_before_hello_when_not_required() -> None:
    s = Session.start(config(hello_required=False))
    assert s.cmd("RCPT TO:<a@b.test>") == 503
    assert s.events[-1].reply.lines == ("Send MAIL first",)  # need_mail, not need_hello
    assert s.cmd("DATA") == 503
    assert s.cmd("MAIL FROM:<a@b.test>") == 250
    assert isinstance(s.events[-1], MailFrom)
    assert s.cmd("RCPT TO:<c@d.test>") == 250
    assert s.cmd("AUTH PLAIN AGEAYg==") in (502, 503)  # AUTH still needs EHLO


# --- sequence_first -------------------------------------------------------------------------


def test_syntax_before_sequence_by_default() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.cmd("DATA x") == 501


def test_sequence_before_syntax() -> None:
    s = Session.start(config(sequence_first=True))
    s.cmd("EHLO c.test")
    assert s.cmd("DATA x") == 503
    assert s.cmd("RCPT TO:bad") == 503
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.cmd("MAIL FROM:bad") == 503  # nested MAIL outranks its bad path


# --- lenient_paths --------------------------------------------------------------------------


def test_paths_need_brackets_by_default() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:user@host.test") == 501


def test_lenient_paths() -> None:
    s = Session.start(config(lenient_paths=True))
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:user@host.test SIZE=10") == 250
    point = next(e for e in s.events if isinstance(e, MailFrom))
    assert str(point.address) == "user@host.test"
    assert point.params == {"SIZE": "10"}
    assert s.cmd("RCPT TO:root") == 250
    rcpt = next(e for e in s.events if isinstance(e, RcptTo))
    assert (rcpt.address.local_part, rcpt.address.domain) == ("root", "")
    assert s.cmd("RCPT TO:<>") == 501  # still not a recipient
    assert s.cmd("RCPT TO:<a b@c>") == 501


# --- lenient_hello --------------------------------------------------------------------------


def test_hello_with_two_words() -> None:
    assert Session.start(BASE).cmd("EHLO a b") == 501
    s = Session.start(config(lenient_hello=True))
    assert s.cmd("EHLO a b") == 250
    assert s.conn.helo_name == "a"


# --- ignored_arguments ----------------------------------------------------------------------


def test_ignored_arguments() -> None:
    assert Session.start(BASE).cmd("QUIT now") == 501
    s = Session.start(config(ignored_arguments=frozenset({"QUIT"})))
    assert s.cmd("RSET now") == 501  # only the verbs named
    assert s.cmd("QUIT now") == 221


def test_ignored_arguments_names_known_verbs() -> None:
    with pytest.raises(BehaviourError, match="ignored_arguments"):
        Behaviour(ignored_arguments=frozenset({"MAIL"}))


# --- long_lines and line_limit --------------------------------------------------------------


def test_long_line_refused_by_default() -> None:
    s = Session.start(BASE)
    assert s.cmd("EHLO " + "a" * 600) == 500


def test_long_line_truncated_and_answered() -> None:
    s = Session.start(config(long_lines="truncate", line_limit=2048))
    out = lines(s, "EHLO " + "a" * 3000 + "\r\nNOOP\r\n")
    assert out[0].startswith("250-mx.test")
    assert out[-1].startswith("250 ")  # NOOP: the rest of the long line was skipped
    assert s.conn.helo_name == "a" * (2048 - 5)


def test_long_line_truncated_across_reads() -> None:
    s = Session.start(config(long_lines="truncate"))
    s.feed(b"EHLO " + b"b" * 700)  # over the 512 limit, no line end yet
    assert s.take_output().startswith(b"250-mx.test")
    s.feed(b"b" * 700 + b"\r\n")  # the rest of the line is dropped silently
    assert s.take_output() == b""
    assert s.cmd("NOOP") == 250


def test_line_limit_raises_the_limit() -> None:
    s = Session.start(config(line_limit=2048))
    assert s.cmd("EHLO " + "a" * 1500) == 250
    with pytest.raises(BehaviourError, match="line_limit"):
        Behaviour(line_limit=100)


def test_auth_lines_are_never_truncated() -> None:
    cfg = dataclasses.replace(
        config(long_lines="truncate"),
        auth_mechanisms=("LOGIN",),
        auth_requires_tls=False,
        max_auth_line=600,
    )
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    assert s.cmd("AUTH LOGIN") == 334
    assert s.cmd("a" * 700) == 500


# --- error_limit ----------------------------------------------------------------------------


def test_error_limit_counts_every_error_and_closes_at_once() -> None:
    refuse_rcpt = Reply(550, "5.1.1", ("no such user",))
    s = Session.start(
        config(error_limit=4),
        answer=lambda p: refuse_rcpt if isinstance(p, RcptTo) else None,
    )
    s.cmd("XYZZY")  # unknown
    s.cmd("RCPT TO:<a@b.test>")  # sequence
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<x@b.test>")  # refused by policy: counted too
    replies = s.send(b"\r\n")  # the 4th: its reply, then too_many_errors
    assert [code for code, _ in replies] == [500, 421]
    assert any(isinstance(e, LimitExceeded) and e.limit is Limit.ERRORS for e in s.events)
    assert isinstance(s.events[-1], ConnectionClosed)


def test_separate_limits_by_default() -> None:
    s = Session.start(BASE)
    for _ in range(10):
        assert s.cmd("XYZZY") == 500
    assert [c for c, _ in s.send(b"XYZZY\r\n")] == [500, 421]


# --- etrn -----------------------------------------------------------------------------------


def test_etrn_unknown_without_the_knob() -> None:
    s = Session.start(BASE)
    assert "ETRN" not in "".join(lines(s, "EHLO c.test\r\n"))
    assert s.cmd("ETRN example.org") == 500


def test_etrn_answered_as_refused() -> None:
    s = Session.start(config(etrn=True))
    assert "250-ETRN" in lines(s, "EHLO c.test\r\n")
    assert s.send(b"ETRN\r\n") == [(501, "5.5.4 Syntax: ETRN domain")]
    assert s.send(b"ETRN @example.org\r\n") == [(459, "4.7.1 <example.org>: node not allowed")]
    assert s.send(b"ETRN not_a_domain!\r\n")[0][0] == 501
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.cmd("ETRN example.org") == 503
    assert isinstance(s.events[-1], CommandRejected)


def test_etrn_words_come_from_the_persona() -> None:
    persona = Persona(
        behaviour=Behaviour(etrn=True, hello_required=False),
        replies={
            "etrn_refused": Reply(459, None, ("<{domain}>: service unavailable",)),
            "etrn_argument_required": Reply(500, None, ("Syntax: ETRN domain",)),
        },
    )
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    assert lines(s, "ETRN x.example\r\nETRN\r\n") == [
        "459 <x.example>: service unavailable",
        "500 Syntax: ETRN domain",
    ]


# --- reply names with fallbacks -------------------------------------------------------------


def test_empty_line_is_unknown_command_unless_given() -> None:
    s = Session.start(BASE)
    assert s.send(b"\r\n") == [(500, "5.5.2 Command not recognized")]
    persona = Persona(replies={"unknown_command": "Nope"})
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    assert s.send(b"\r\n") == [(500, "5.5.2 Nope")]
    persona = Persona(replies={"unknown_command": "Nope", "empty_line": "Error: bad syntax"})
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    assert s.send(b"  \r\n") == [(500, "5.5.2 Error: bad syntax")]


def test_argument_and_sequence_fallbacks() -> None:
    persona = Persona(
        replies={
            "argument_required": "Syntax: {verb} something",
            "hello_argument_required": Reply(501, None, ("Syntax: {verb} hostname",)),
            "need_mail": "need MAIL",
            "data_need_mail": "need RCPT",
        }
    )
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    assert lines(s, "HELO\r\nVRFY\r\nEHLO c.test\r\n")[:2] == [
        "501 Syntax: HELO hostname",
        "501 5.5.4 Syntax: VRFY something",
    ]
    s.take_output()
    assert lines(s, "RCPT TO:<a@b.test>\r\nDATA\r\n") == [
        "503 5.5.1 need MAIL",
        "503 5.5.1 need RCPT",
    ]


def test_every_fallback_has_the_general_names_placeholders() -> None:
    from mailgate.protocol.persona import PLACEHOLDERS

    for name, general in FALLBACKS.items():
        assert PLACEHOLDERS[general] <= PLACEHOLDERS[name], name


def test_behaviour_must_be_a_behaviour() -> None:
    with pytest.raises(PersonaError, match="behaviour"):
        Persona(behaviour={"etrn": True})  # type: ignore[arg-type]


def test_behaviour_checks_its_values() -> None:
    with pytest.raises(BehaviourError, match="long_lines"):
        Behaviour(long_lines="cut")
    with pytest.raises(BehaviourError, match="early_talkers"):
        Behaviour(early_talkers="ignore")
    with pytest.raises(BehaviourError, match="error_limit"):
        Behaviour(error_limit=0)
    assert Behaviour(etrn=True, error_limit=20).as_mapping() == {"etrn": True, "error_limit": 20}


# --- sync_check -----------------------------------------------------------------------------


def test_pipelining_without_sync_check() -> None:
    s = Session.start(BASE)
    out = lines(s, "EHLO c.test\r\nNOOP\r\n")
    assert out[-1] == "250 2.0.0 OK"


@pytest.mark.parametrize(
    ("first", "script"),
    [
        ("", "EHLO c.test\r\nNOOP\r\n"),  # EHLO must end its group
        ("HELO c.test\r\n", "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"),  # no PIPELINING
        ("EHLO c.test\r\n", "XYZZY\r\nNOOP\r\n"),  # unknown verbs must wait
    ],
)
def test_sync_check_closes_on_input_behind_a_sync_command(first: str, script: str) -> None:
    s = Session.start(config(sync_check=True))
    if first:
        lines(s, first)
    assert lines(s, script) == ["554 5.5.0 SMTP synchronization error"]
    assert isinstance(s.events[-1], ConnectionClosed)
    assert s.events[-1].reason == "synchronization-error"


def test_sync_check_allows_what_pipelining_allows() -> None:
    s = Session.start(config(sync_check=True))
    lines(s, "EHLO c.test\r\n")
    out = lines(s, "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    assert [line[:3] for line in out] == ["250", "250", "354"]


def test_bad_base64_initial_and_continued_responses() -> None:
    persona = Persona(
        replies={
            "auth_bad_base64": Reply(535, "5.7.8", ("bad continued",)),
            "auth_bad_base64_initial": Reply(535, "5.7.8", ("bad initial",)),
        }
    )
    cfg = dataclasses.replace(
        BASE, persona=persona, auth_mechanisms=("PLAIN", "LOGIN"), auth_requires_tls=False
    )
    s = Session.start(cfg)
    s.cmd("EHLO c.test")
    assert s.send(b"AUTH PLAIN %%%\r\n") == [(535, "5.7.8 bad initial")]
    assert s.cmd("AUTH LOGIN") == 334
    assert s.send(b"%%%\r\n") == [(535, "5.7.8 bad continued")]
    # Without the specific name, both get auth_bad_base64's reply.
    s = Session.start(dataclasses.replace(cfg, persona=Persona()))
    s.cmd("EHLO c.test")
    assert s.send(b"AUTH PLAIN %%%\r\n") == [(501, "5.5.2 Cannot decode base64 response")]
