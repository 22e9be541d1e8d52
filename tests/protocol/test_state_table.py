"""The state table is the spec: every verb in every state, expected replies derived from RULES."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from mailgate.protocol import RULES, Persona, ProtocolConfig, State
from mailgate.protocol.behaviour import Behaviour
from mailgate.protocol.rules import Arg, rules_for

from .session import Session

CONFIG = ProtocolConfig(
    hostname="mx.test",
    starttls=True,
    auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"),
    auth_requires_tls=False,
    xclient=True,
    xforward=True,
    # ETRN and VERB exist only for a persona that offers them: this one does, so their
    # rows are tested.
    persona=Persona(behaviour=Behaviour(etrn=True), capability_order=("VERB",)),
)
#: A product's knobs (Postfix's): the table that connection applies is rules_for(them).
LENIENT = Behaviour(
    etrn=True,
    hello_required=False,
    sequence_first=True,
    ignored_arguments=frozenset({"QUIT"}),
)
LENIENT_CONFIG = dataclasses.replace(
    CONFIG, persona=Persona(behaviour=LENIENT, capability_order=("VERB",))
)

# A syntactically valid command line for each verb (pipelined bytes included for BDAT).
VALID = {
    "HELO": "HELO client.test",
    "EHLO": "EHLO client.test",
    "LHLO": "LHLO client.test",
    "MAIL": "MAIL FROM:<a@example.com>",
    "RCPT": "RCPT TO:<b@example.com>",
    "DATA": "DATA",
    "BDAT": "BDAT 0",
    "RSET": "RSET",
    "NOOP": "NOOP",
    "QUIT": "QUIT",
    "HELP": "HELP",
    "VRFY": "VRFY someone",
    "EXPN": "EXPN list",
    "STARTTLS": "STARTTLS",
    "AUTH": "AUTH PLAIN " + base64.b64encode(b"\0user\0pass").decode(),
    "XCLIENT": "XCLIENT ADDR=192.0.2.1",
    "XFORWARD": "XFORWARD ADDR=192.0.2.1",
    "ETRN": "ETRN example.org",
    "VERB": "VERB",
}

# How to reach each state from a fresh, greeted connection.
RECIPES: dict[State, list[bytes]] = {
    State.CONNECTED: [],
    State.READY: [b"EHLO c.test\r\n"],
    State.MAIL: [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.com>\r\n"],
    State.RCPT: [
        b"EHLO c.test\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
    ],
    State.BDAT_OPEN: [
        b"EHLO c.test\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"BDAT 3\r\nabc",
    ],
}


def session_in(state: State, config: ProtocolConfig = CONFIG) -> Session:
    if state is State.REFUSED:
        from mailgate.protocol import Reply

        s = Session.start(
            config, answer=lambda p: Reply(554, None, ("go away",)), greet=False, peer_trusted=True
        )
        s.pump()
        s.take_output()
        s.answer = lambda p: None
        assert s.conn.state is State.REFUSED
        return s
    s = Session.start(config, peer_trusted=True)
    for chunk in RECIPES[state]:
        s.feed(chunk)
    assert s.conn.state is state, (state, s.conn.state)
    s.take_output()
    return s


SMTP_VERBS = [v for v in RULES if v != "LHLO"]
STATES = [*RECIPES, State.REFUSED]


@pytest.mark.parametrize("config", [CONFIG, LENIENT_CONFIG], ids=["default", "lenient"])
@pytest.mark.parametrize("state", STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("verb", SMTP_VERBS)
def test_every_verb_in_every_state(verb: str, state: State, config: ProtocolConfig) -> None:
    rule = rules_for(config.persona.behaviour)[verb]
    s = session_in(state, config)
    replies = s.send(VALID[verb].encode() + b"\r\n")
    assert replies, "every command gets a reply"
    code = replies[0][0]
    if state in rule.allowed:
        assert code != 503, f"{verb} must be accepted in {state.value}: {replies}"
        # EXPN has no default answer; ETRN is answered as a product refuses it (459).
        assert code < 500 or verb in ("EXPN",), f"{verb} in {state.value}: {replies}"
    else:
        assert code == 503, f"{verb} must be out of sequence in {state.value}: {replies}"
        # A refused command leaves the state alone.
        assert s.conn.state is state


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.value)
def test_unknown_verb_is_500_in_every_state(state: State) -> None:
    s = session_in(state)
    assert s.cmd("FROBNICATE now") == 500


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("verb", [v for v in SMTP_VERBS if RULES[v].arg is Arg.REQUIRED])
def test_missing_argument_is_501_before_sequence(verb: str, state: State) -> None:
    # Syntax (501) outranks sequence (503): the grammar is checked first.
    s = session_in(state)
    assert s.cmd(verb) == 501


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("verb", [v for v in SMTP_VERBS if RULES[v].arg is Arg.NONE])
def test_unexpected_argument_is_501(verb: str, state: State) -> None:
    s = session_in(state)
    assert s.cmd(f"{verb} extra") == 501


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_lmtp_does_not_know_helo_or_ehlo(verb: str) -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", lmtp=True))
    assert s.cmd(f"{verb} c.test") == 500
    assert s.cmd("LHLO c.test") == 250


def test_smtp_does_not_know_lhlo() -> None:
    s = Session.start(CONFIG)
    assert s.cmd("LHLO c.test") == 500


@pytest.mark.parametrize(
    ("verb", "line"),
    [
        ("STARTTLS", "STARTTLS"),
        ("AUTH", VALID["AUTH"]),
        ("BDAT", "BDAT 0 LAST"),
        ("XCLIENT", VALID["XCLIENT"]),
        ("XFORWARD", VALID["XFORWARD"]),
        ("VRFY", "VRFY x"),
        ("EXPN", "EXPN x"),
    ],
)
def test_extension_not_offered_is_502(verb: str, line: str) -> None:
    config = ProtocolConfig(hostname="mx.test", chunking=False, vrfy=False, expn=False)
    s = Session.start(config)
    s.cmd("EHLO c.test")
    assert s.cmd(line) == 502


def test_xclient_needs_a_trusted_peer() -> None:
    s = Session.start(CONFIG, peer_trusted=False)
    s.cmd("EHLO c.test")
    assert s.cmd(VALID["XCLIENT"]) == 502


def test_disabled_command_is_502() -> None:
    s = Session.start(ProtocolConfig(hostname="mx.test", disabled_commands=frozenset({"HELP"})))
    assert s.cmd("HELP") == 502


def test_precedence_syntax_before_sequence_before_parameters() -> None:
    s = Session.start(CONFIG)
    assert s.cmd("MAIL FROM:no-brackets") == 501  # before EHLO: syntax wins over sequence
    assert s.cmd("MAIL FROM:<a@example.com> FOO=bar") == 503  # sequence wins over params
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@example.com> FOO=bar") == 555
    assert s.cmd("MAIL FROM:<a@example.com>") == 250


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.value)
@pytest.mark.parametrize(
    "verb", [v for v in SMTP_VERBS if RULES[v].arg is Arg.REQUIRED and v != "BDAT"]
)
def test_sequence_first_puts_503_before_501(verb: str, state: State) -> None:
    # sequence_first: step 5 before step 4 -- out of sequence is 503 even without argument.
    rule = rules_for(LENIENT)[verb]
    s = session_in(state, LENIENT_CONFIG)
    code = s.cmd(verb)
    if state in rule.allowed:
        assert code == 501
    else:
        assert code == 503


def test_lenient_table_accepts_mail_and_etrn_before_helo() -> None:
    table = rules_for(LENIENT)
    assert State.CONNECTED in table["MAIL"].allowed
    assert State.CONNECTED in table["ETRN"].allowed
    assert State.CONNECTED in table["AUTH"].allowed  # Postfix: AUTH before HELO too
    assert State.CONNECTED not in table["RCPT"].allowed
    assert table["QUIT"].arg is Arg.OPTIONAL
    assert rules_for(Behaviour()) is RULES
