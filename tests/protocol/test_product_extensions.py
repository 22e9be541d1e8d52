"""What the calibration against the real products added to the protocol, sans-IO: PRDR and
PIPECONNECT for personas that list them (Exim), STARTTLS inside a transaction (Postfix,
Exim), and Sendmail's ``{date_gmt}``."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailgate.protocol import DataComplete, Persona, ProtocolConfig, Reply, TransactionReset
from mailgate.protocol.behaviour import Behaviour
from mailgate.protocol.persona import OPT_IN_KEYWORDS, PersonaError, format_date
from mailgate.protocol.rules import State

from .session import Session

BASE = ProtocolConfig(hostname="mx.test", starttls=True, auth_mechanisms=("PLAIN",))
EXIM_LIKE = Persona(
    capability_order=("SIZE", "PIPELINING", "PIPECONNECT", "STARTTLS", "PRDR", "HELP"),
    behaviour=Behaviour(early_talkers="greet"),
    replies={
        "prdr_sender_ok": "OK, PRDR Requested",
        "prdr_recipient_ok": "PRDR R=<{address}> acceptance",
    },
)


def ehlo_keywords(s: Session) -> list[str]:
    s.feed(b"EHLO c.test\r\n")
    return [line[4:].split(" ")[0] for line in s.take_output().decode().splitlines()[1:]]


# --- opt-in keywords ------------------------------------------------------------------------


def test_prdr_and_pipeconnect_are_offered_only_when_listed() -> None:
    assert {"PRDR", "PIPECONNECT"} <= OPT_IN_KEYWORDS
    plain = ehlo_keywords(Session.start(BASE))
    assert "PRDR" not in plain and "PIPECONNECT" not in plain
    listed = ehlo_keywords(Session.start(dataclasses.replace(BASE, persona=EXIM_LIKE)))
    # In the persona's order; what it does not list (8BITMIME...) comes after.
    assert listed[:6] == ["SIZE", "PIPELINING", "PIPECONNECT", "STARTTLS", "PRDR", "HELP"]


def test_pipeconnect_needs_early_talkers_greeted() -> None:
    with pytest.raises(PersonaError, match="PIPECONNECT needs behaviour early_talkers"):
        Persona(capability_order=("PIPELINING", "PIPECONNECT"))


def test_prdr_parameter_needs_prdr_offered() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@b.test> PRDR") == 555


# --- PRDR -----------------------------------------------------------------------------------


def test_prdr_message_gets_a_reply_per_recipient() -> None:
    s = Session.start(dataclasses.replace(BASE, persona=EXIM_LIKE))
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:<a@b.test> PRDR\r\n") == [(250, "2.1.0 OK, PRDR Requested")]
    assert s.cmd("RCPT TO:<x@y.test>") == 250
    assert s.cmd("RCPT TO:<z@y.test>") == 250
    assert s.cmd("DATA") == 354
    replies = s.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    assert replies == [
        (353, "PRDR content analysis beginning"),
        (250, "2.1.5 PRDR R=<x@y.test> acceptance"),
        (250, "2.1.5 PRDR R=<z@y.test> acceptance"),
        (250, "2.0.0 Message accepted"),
    ]
    # The next transaction without PRDR is answered once.
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<x@y.test>")
    s.cmd("DATA")
    assert s.send(b"x\r\n.\r\n") == [(250, "2.0.0 Message accepted")]


def test_refused_prdr_message_keeps_one_reply() -> None:
    refusal = Reply(550, "5.7.1", ("Rejected",))

    def answer(point: object) -> Reply | None:
        return refusal if isinstance(point, DataComplete) else None

    s = Session.start(dataclasses.replace(BASE, persona=EXIM_LIKE), answer=answer)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test> PRDR")
    s.cmd("RCPT TO:<x@y.test>")
    s.cmd("DATA")
    assert s.send(b"x\r\n.\r\n") == [(550, "5.7.1 Rejected")]


def test_prdr_replies_are_checked() -> None:
    with pytest.raises(PersonaError, match="prdr_start"):
        Persona(replies={"prdr_start": Reply(250, None, ("go",))})
    with pytest.raises(PersonaError):
        Persona(replies={"prdr_recipient_ok": "250 {queue_id}"})


# --- STARTTLS inside a transaction ------------------------------------------------------------


def test_starttls_in_transaction_refused_by_default() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.cmd("STARTTLS") == 503


def test_starttls_in_transaction_ends_the_transaction() -> None:
    persona = Persona(behaviour=Behaviour(starttls_in_transaction=True))
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<x@y.test>")
    assert s.cmd("STARTTLS") == 220
    s.conn.tls_established()
    assert s.conn.state is State.CONNECTED and s.conn.transaction is None
    s.pump()
    assert any(isinstance(e, TransactionReset) for e in s.events)
    s.cmd("EHLO c.test")
    assert s.cmd("RCPT TO:<x@y.test>") == 503  # the transaction is gone


# --- {date_gmt} -----------------------------------------------------------------------------


def test_date_gmt_writes_a_zero_offset_as_gmt() -> None:
    moment = datetime(2026, 12, 6, 18, 56, 42, tzinfo=UTC)
    assert format_date(moment, gmt=True) == "Sun, 6 Dec 2026 18:56:42 GMT"
    assert format_date(moment) == "Sun, 6 Dec 2026 18:56:42 +0000"
    east = moment.astimezone(timezone(timedelta(hours=1)))
    assert format_date(east, gmt=True) == "Sun, 6 Dec 2026 19:56:42 +0100"


def test_date_gmt_in_a_banner() -> None:
    clock = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    persona = Persona(banner="{hostname} ESMTP x; {date_gmt}")
    config = dataclasses.replace(BASE, persona=persona, clock=lambda: clock)
    s = Session.start(config, greet=False)
    s.pump()
    assert s.take_output() == b"220 mx.test ESMTP x; Tue, 1 Dec 2026 10:00:00 GMT\r\n"


# --- extensions_need_ehlo (Exim) ------------------------------------------------------------


def test_auth_and_starttls_need_this_sessions_ehlo() -> None:
    persona = Persona(
        behaviour=Behaviour(extensions_need_ehlo=True),
        replies={"not_implemented": "{verb} command used when not advertised"},
    )
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    assert s.send(b"STARTTLS\r\n") == [(502, "5.5.1 STARTTLS command used when not advertised")]
    assert s.cmd("AUTH PLAIN AGEAYg==") == 502
    s.cmd("HELO c.test")  # HELO offers nothing
    assert s.cmd("AUTH PLAIN AGEAYg==") == 502
    s.cmd("EHLO c.test")
    assert s.cmd("STARTTLS") == 220


def test_starttls_before_ehlo_by_default() -> None:
    assert Session.start(BASE).cmd("STARTTLS") == 220


# --- etrn_accepted (Sendmail) ---------------------------------------------------------------


def test_etrn_answered_as_started() -> None:
    persona = Persona(behaviour=Behaviour(etrn=True, etrn_accepted=True))
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    s.cmd("EHLO c.test")
    assert s.send(b"ETRN example.org\r\n") == [(250, "2.0.0 Queuing for node example.org started")]
    assert s.cmd("ETRN") == 501
    refusing = Session.start(
        dataclasses.replace(BASE, persona=Persona(behaviour=Behaviour(etrn=True)))
    )
    refusing.cmd("EHLO c.test")
    assert refusing.cmd("ETRN example.org") == 459


# --- verify_needs_hello (Sendmail) ----------------------------------------------------------


def test_vrfy_and_expn_need_hello() -> None:
    persona = Persona(
        behaviour=Behaviour(verify_needs_hello=True),
        replies={"vrfy_need_hello": "I demand that you introduce yourself first"},
    )
    config = dataclasses.replace(BASE, persona=persona, expn=True)
    s = Session.start(config)
    assert s.send(b"VRFY root\r\n") == [(503, "5.5.1 I demand that you introduce yourself first")]
    assert s.cmd("EXPN root") == 503
    s.cmd("HELO c.test")
    assert s.cmd("VRFY root") == 252
    # Without the knob VRFY is answered before HELO; vrfy_need_hello falls back to need_hello.
    assert Session.start(BASE).cmd("VRFY root") == 252
    assert Persona().reply("vrfy_need_hello") == Persona().reply("need_hello")


# --- unknown_command_limit (Exim) -----------------------------------------------------------


def test_the_unknown_command_over_the_limit_gets_only_the_limit_reply() -> None:
    persona = Persona(
        behaviour=Behaviour(unknown_command_limit=3),
        replies={
            "too_many_unknown_commands": Reply(500, None, ("Too many unrecognized commands",))
        },
    )
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    s.cmd("EHLO c.test")
    assert [s.cmd(f"XYZZY{n}") for n in range(3)] == [500, 500, 500]
    assert s.send(b"XYZZY4\r\n") == [(500, "Too many unrecognized commands")]
    assert s.conn.state is State.CLOSED


def test_unknown_commands_by_default_get_their_reply_then_the_limit() -> None:
    s = Session.start(dataclasses.replace(BASE, max_unknown_commands=2))
    s.cmd("EHLO c.test")
    s.cmd("XYZZY1")
    s.cmd("XYZZY2")
    assert [code for code, _ in s.send(b"XYZZY3\r\n")] == [500, 421]


# --- vrfy_unqualified (Exim) ----------------------------------------------------------------


def test_vrfy_of_a_bare_name_can_be_refused() -> None:
    persona = Persona(
        replies={
            "vrfy_default": Reply(252, None, ("Administrative prohibition",)),
            "vrfy_unqualified": Reply(
                501, None, ("{address}: recipient address must contain a domain",)
            ),
        }
    )
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    s.cmd("EHLO c.test")
    assert s.send(b"VRFY root\r\n") == [(501, "root: recipient address must contain a domain")]
    assert s.send(b"VRFY root@example.com\r\n") == [(252, "Administrative prohibition")]


def test_vrfy_of_a_bare_name_gets_vrfy_default_unless_worded_apart() -> None:
    persona = Persona(replies={"vrfy_default": "{address} may exist"})
    s = Session.start(dataclasses.replace(BASE, persona=persona))
    s.cmd("EHLO c.test")
    assert s.send(b"VRFY root\r\n") == [(252, "2.5.0 root may exist")]


# --- Exim's address and argument refusals ---------------------------------------------------

EXIM_REFUSALS = dataclasses.replace(
    BASE,
    persona=Persona(
        behaviour=Behaviour(domain_literals=False),
        enhanced_status_codes=False,
        replies={
            "domain_literal": "<{address}>: domain literals not allowed",
            "vrfy_argument_required": "empty address",
            "expn_argument_required": Reply(550, None, ("Administrative prohibition",)),
            "data_need_mail": "valid RCPT command must precede {verb}",
        },
    ),
)


def test_domain_literals_refused_when_the_behaviour_says_so() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@[192.0.2.1]>") == 250
    s = Session.start(dataclasses.replace(EXIM_REFUSALS, vrfy=True, expn=True))
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:<a@[192.0.2.1]>\r\n") == [
        (501, "<a@[192.0.2.1]>: domain literals not allowed")
    ]
    assert s.cmd("MAIL FROM:<a@b.test>") == 250
    assert s.cmd("RCPT TO:<x@[IPv6:2001:db8::1]>") == 501
    assert s.cmd("RCPT TO:<x@y.test>") == 250


def test_expn_and_data_refusals_worded_apart() -> None:
    s = Session.start(dataclasses.replace(EXIM_REFUSALS, vrfy=True, expn=True))
    s.cmd("EHLO c.test")
    assert s.send(b"VRFY\r\n") == [(501, "empty address")]
    assert s.send(b"EXPN\r\n") == [(550, "Administrative prohibition")]
    assert s.send(b"DATA\r\n") == [(503, "valid RCPT command must precede DATA")]


def test_fallbacks_follow_the_chain_to_the_first_name_given() -> None:
    # expn_argument_required -> vrfy_argument_required -> argument_required.
    persona = Persona(replies={"argument_required": "{verb} needs more"})
    s = Session.start(dataclasses.replace(BASE, persona=persona, vrfy=True, expn=True))
    s.cmd("EHLO c.test")
    assert s.send(b"EXPN\r\n") == [(501, "5.5.4 EXPN needs more")]


def test_a_bad_size_value_is_ignored_when_the_behaviour_says_so() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@b.test> SIZE=abc") == 555
    lenient = Persona(behaviour=Behaviour(size_value_ignored_if_bad=True))
    s = Session.start(dataclasses.replace(BASE, persona=lenient, max_message_size=100))
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@b.test> SIZE=abc") == 250
    s.cmd("RSET")
    assert s.cmd("MAIL FROM:<a@b.test> SIZE=5000") == 552  # a readable size still counts


def test_auth_without_mechanism_has_its_own_name() -> None:
    persona = Persona(
        replies={"auth_argument_required": Reply(504, None, (" authentication mechanism",))}
    )
    s = Session.start(dataclasses.replace(BASE, persona=persona, auth_requires_tls=False))
    s.cmd("EHLO c.test")
    assert s.send(b"AUTH\r\n") == [(504, " authentication mechanism")]
    # Without it, the general argument_required.
    s = Session.start(dataclasses.replace(BASE, auth_requires_tls=False))
    s.cmd("EHLO c.test")
    assert s.cmd("AUTH") == 501
