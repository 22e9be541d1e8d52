"""Behaviour knobs calibrated on the recorded Exim 4.96 (sans-IO): the sender looked for
before HELO, the HELO name check, NUL bytes first, long local parts, unqualified paths,
DATA repeating the RCPTs' refusal, synchronisation with PIPECONNECT, a broken BDAT
transfer, the last BDAT chunk's own line, and the address parser's refusals by kind. Each
knob's default keeps mailgate's own behaviour (tests/protocol/test_persona.py holds the
default transcripts byte for byte)."""

from __future__ import annotations

import dataclasses

import pytest

from mailgate.protocol import ProtocolConfig, Reply
from mailgate.protocol.address import AddressError, parse_forward_path, split_path_and_params
from mailgate.protocol.behaviour import Behaviour
from mailgate.protocol.events import DataComplete, RcptTo, TransactionReset
from mailgate.protocol.persona import Persona

from .session import Session

BASE = ProtocolConfig(hostname="mx.test", chunking=True)


def exim(**behaviour: object) -> ProtocolConfig:
    """A configuration wearing Exim-like texts and the given knobs."""
    persona = Persona(
        enhanced_status_codes=False,
        behaviour=Behaviour(**behaviour),  # type: ignore[arg-type]
        replies={
            "need_hello": "HELO or EHLO required",
            "need_mail": "sender not yet given",
            "data_need_mail": "valid RCPT command must precede {verb}",
            "need_rcpt": "valid RCPT command must precede {verb}",
            "need_rcpt_after_rcpt": "Valid RCPT command must precede {verb}",
            "rcpt_errors_repeated": Reply(
                503, None, ("All RCPT commands were rejected with this error:", "{rcpt_error}")
            ),
            "hello_syntax": "Syntactically invalid {verb} argument(s)",
            "nul_characters": "NUL characters are not allowed in SMTP commands",
            "data_after_bdat": "only BDAT permissible after non-LAST BDAT",
            "bdat_needs_rset": "only RSET accepted now",
            "bdat_abandoned": "Lost incoming connection",
            "bdat_last_chunk_ok": Reply(250, None, (" {size} byte chunk, total {total}",)),
            "address_unterminated": Reply(501, None, ("{argument}: '>' missing at end",)),
            "address_domain": Reply(501, None, ("{argument}: domain missing or malformed",)),
            "null_recipient": Reply(501, None, ("{argument}: missing or malformed local part",)),
            "recipient_unqualified": Reply(
                501, None, ("{argument}: recipient address must contain a domain",)
            ),
            "sender_unqualified": Reply(
                501, None, ("{argument}: sender address must contain a domain",)
            ),
            "mail_parameter_not_offered": Reply(501, None, ("{keyword} used when not advertised",)),
            "unknown_parameter": Reply(
                501, None, ("{argument}: malformed address: {parameters} may not follow {path} ",)
            ),
            "synchronization_error": Reply(554, None, ("SMTP synchronization error",)),
        },
    )
    return dataclasses.replace(BASE, persona=persona)


def refuse_relay(point: object) -> Reply | None:
    if isinstance(point, RcptTo) and point.address.domain == "other.test":
        return Reply(550, None, ("relay not permitted",))
    return None


def lines(s: Session, data: bytes) -> list[str]:
    s.feed(data)
    return s.take_output().decode("ascii").split("\r\n")[:-1]


# --- sender_before_hello ----------------------------------------------------------------------


def test_rcpt_before_hello_asks_for_the_sender_first() -> None:
    s = Session.start(exim(sender_before_hello=True))
    assert s.send(b"MAIL FROM:<a@b.test>\r\n") == [(503, "HELO or EHLO required")]
    assert s.send(b"RCPT TO:<c@d.test>\r\n") == [(503, "sender not yet given")]
    assert s.send(b"DATA\r\n") == [(503, "valid RCPT command must precede DATA")]
    plain = Session.start(exim())
    assert plain.send(b"RCPT TO:<c@d.test>\r\n") == [(503, "HELO or EHLO required")]


# --- hello_name_check -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        ("a..b", True),
        ("mail-1.example.net", True),
        ("[127.0.0.2]", True),
        ("[IPv6:::1]", True),
        ("[IPv4:192.0.2.1]", True),
        ("[IPv4:::1]", False),
        ("[999.1.1.1]", False),
        ("-bad_name!", False),
        ("under_score", False),
    ],
)
def test_hello_names_are_checked_like_exim(name: str, taken: bool) -> None:
    s = Session.start(exim(hello_name_check=True))
    code = s.cmd(f"EHLO {name}")
    assert code == (250 if taken else 501)
    if not taken:
        assert Session.start(exim()).cmd(f"EHLO {name}") == 250  # the default takes it


# --- nul_first ------------------------------------------------------------------------------


def test_a_nul_byte_is_answered_before_the_verb() -> None:
    s = Session.start(exim(nul_first=True))
    assert s.send(b"NOOP\x00x\r\n") == [(501, "NUL characters are not allowed in SMTP commands")]
    assert s.send(b"NOOP\r\n") == [(250, "OK")]
    assert Session.start(exim()).send(b"NOOP\x00x\r\n")[0][0] == 500  # an unknown verb


# --- long_local_parts, unqualified_paths, the parser's refusals by kind ----------------------


def test_long_local_parts_up_to_the_path_limit() -> None:
    long_local = "a" * 200
    with pytest.raises(AddressError) as info:
        parse_forward_path(f"<{long_local}@b.test>", smtputf8=False)
    assert info.value.kind == "too_long"
    assert parse_forward_path(f"<{long_local}@b.test>", smtputf8=False, long_local_parts=True)
    with pytest.raises(AddressError):
        parse_forward_path(f"<{'a' * 260}@b.test>", smtputf8=False, long_local_parts=True)
    s = Session.start(exim(long_local_parts=True))
    s.cmd("EHLO c.test")
    assert s.cmd(f"MAIL FROM:<{long_local}@b.test>") == 250


def test_address_errors_have_a_kind() -> None:
    cases = {
        "<a@b.test": "unterminated",
        "<a b@c.test>": "local_part",
        "<a@@b.test>": "domain",
        "<alice>": "unqualified",
        "<>": "null",
    }
    for text, kind in cases.items():
        with pytest.raises(AddressError) as info:
            path, _ = split_path_and_params(text)
            parse_forward_path(path, smtputf8=False)
        assert info.value.kind == kind, text


def test_parser_refusals_worded_by_kind_with_the_client_words() -> None:
    s = Session.start(exim(lenient_paths=True, unqualified_paths=False))
    s.cmd("EHLO c.test")
    assert lines(s, b"MAIL FROM:<a@b.test\r\n") == ["501 <a@b.test: '>' missing at end"]
    assert lines(s, b"MAIL FROM:<a@@b.test>\r\n") == [
        "501 <a@@b.test>: domain missing or malformed"
    ]
    # A kind the persona does not word keeps the role's reply (mailgate's parser text).
    assert lines(s, b"MAIL FROM:<a b@c.test>\r\n") == [
        "501 Bad sender address syntax: invalid local part"
    ]
    assert lines(s, b"MAIL FROM:<alice>\r\n") == [
        "501 <alice>: sender address must contain a domain"
    ]
    assert s.cmd("MAIL FROM:a@b.test") == 250  # lenient_paths: bare paths still taken
    assert lines(s, b"RCPT TO:<alice>\r\n") == [
        "501 <alice>: recipient address must contain a domain"
    ]
    assert lines(s, b"RCPT TO:<>\r\n") == ["501 <>: missing or malformed local part"]
    assert s.cmd("RCPT TO:<Postmaster>") == 250
    lenient = Session.start(exim(lenient_paths=True))
    lenient.cmd("EHLO c.test")
    lenient.cmd("MAIL FROM:<a@b.test>")
    assert lenient.cmd("RCPT TO:<alice>") == 250


def test_parameters_not_offered_and_unknown_ones() -> None:
    s = Session.start(exim())
    s.cmd("EHLO c.test")
    hidden = dataclasses.replace(BASE, smtputf8=False, dsn=False, persona=exim().persona)
    s = Session.start(hidden)
    s.cmd("EHLO c.test")
    assert lines(s, b"MAIL FROM:<a@b.test> SMTPUTF8\r\n") == [
        "501 SMTPUTF8 used when not advertised"
    ]
    assert lines(s, b"MAIL FROM:<a@b.test> FOO=BAR\r\n") == [
        "501 <a@b.test> FOO=BAR: malformed address: FOO=BAR may not follow <a@b.test> "
    ]
    assert s.cmd("MAIL FROM:<a@b.test>") == 250
    # RCPT's DSN parameters, not offered, are answered as unknown ones.
    assert lines(s, b"RCPT TO:<c@d.test> NOTIFY=NEVER\r\n") == [
        "501 <c@d.test> NOTIFY=NEVER: malformed address: NOTIFY=NEVER may not follow <c@d.test> "
    ]


# --- repeat_rcpt_error ----------------------------------------------------------------------


def test_data_repeats_the_one_rcpt_refusal() -> None:
    s = Session.start(exim(repeat_rcpt_error=True), answer=refuse_relay)
    s.cmd("EHLO c.test")
    # A RCPT refused by the engine (no sender): its whole line, code first, "valid".
    assert s.cmd("RCPT TO:<x@y.test>") == 503
    assert lines(s, b"DATA\r\n") == [
        "503-All RCPT commands were rejected with this error:",
        "503-503 sender not yet given",
        "503 valid RCPT command must precede DATA",
    ]
    # MAIL forgets them; a policy's refusal is repeated as its text, "Valid" right after.
    assert s.cmd("MAIL FROM:<a@b.test>") == 250
    assert lines(s, b"RCPT TO:<v@other.test>\r\nRCPT TO:<w@other.test>\r\nDATA\r\n") == [
        "550 relay not permitted",
        "550 relay not permitted",
        "503-All RCPT commands were rejected with this error:",
        "503-relay not permitted",
        "503 Valid RCPT command must precede DATA",
    ]
    # Not right after the RCPT: "valid".
    assert lines(s, b"NOOP\r\nDATA\r\n")[-1] == "503 valid RCPT command must precede DATA"


def test_different_rcpt_refusals_are_not_repeated() -> None:
    s = Session.start(exim(repeat_rcpt_error=True), answer=refuse_relay)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.send(b"RCPT TO:<v@other.test>\r\nRCPT TO:<>\r\n")
    assert lines(s, b"DATA\r\n") == ["503 Valid RCPT command must precede DATA"]
    assert s.cmd("RSET") == 250
    assert lines(s, b"MAIL FROM:<a@b.test>\r\nDATA\r\n")[-1] == (
        "503 valid RCPT command must precede DATA"
    )


def test_without_the_knob_data_has_its_one_reply() -> None:
    s = Session.start(exim(), answer=refuse_relay)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert lines(s, b"RCPT TO:<v@other.test>\r\nDATA\r\n") == [
        "550 relay not permitted",
        "503 valid RCPT command must precede DATA",
    ]


# --- pipe_connect_sync --------------------------------------------------------------------------


def test_mail_sent_ahead_after_helo_is_a_synchronisation_error() -> None:
    config = exim(sync_check=True, pipe_connect_sync=True)
    s = Session.start(config)
    out = lines(s, b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert out == ["250 mx.test Hello c.test", "554 SMTP synchronization error"]
    assert s.conn.state.value == "closed"
    # EHLO offered PIPELINING: the group is fine, and so is EHLO itself sent ahead.
    s = Session.start(config)
    out = lines(s, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert out[-2:] == ["250 Sender OK", "250 Recipient OK"]
    # After the first DATA the full check: NOOP with input behind it.
    s.send(b"DATA\r\nx\r\n.\r\n")
    assert lines(s, b"NOOP\r\nNOOP\r\n") == ["554 SMTP synchronization error"]


def test_the_full_sync_check_answers_helo_itself() -> None:
    s = Session.start(exim(sync_check=True))
    assert lines(s, b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\n") == [
        "554 SMTP synchronization error"
    ]


# --- bdat_needs_rset, bdat_last_chunk_ok ----------------------------------------------------


def test_a_bdat_transfer_broken_off_takes_only_rset_or_quit() -> None:
    s = Session.start(exim(bdat_needs_rset=True))
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<c@d.test>")
    assert s.send(b"BDAT 5\r\nabcde") == [(250, "5 octets received")]
    assert lines(s, b"DATA\r\n") == ["503 only BDAT permissible after non-LAST BDAT"]
    assert lines(s, b"BDAT 4 LAST\r\nfg\r\n") == [
        "503 only RSET accepted now",
        "503 only RSET accepted now",
    ]
    assert lines(s, b"QUIT\r\n") == ["221 Bye", "421 Lost incoming connection"]
    assert any(isinstance(e, TransactionReset) for e in s.events)
    assert not any(isinstance(e, DataComplete) for e in s.events)


def test_rset_mends_a_broken_bdat_transfer() -> None:
    s = Session.start(exim(bdat_needs_rset=True))
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<c@d.test>")
    s.send(b"BDAT 1\r\na")
    assert s.send(b"NOOP\r\n") == [(250, "OK")]  # NOOP is fine between chunks
    s.send(b"MAIL FROM:<a@b.test>\r\n")
    assert s.send(b"RSET\r\n") == [(250, "Reset OK")]
    assert s.cmd("MAIL FROM:<a@b.test>") == 250


def test_the_last_chunk_is_acknowledged_before_the_final_reply() -> None:
    s = Session.start(exim())
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<c@d.test>")
    s.send(b"BDAT 3\r\nabc")
    assert lines(s, b"BDAT 4 LAST\r\ndefg") == [
        "250- 4 byte chunk, total 7",
        "250 Message accepted",
    ]
    # DATA's final reply is left alone.
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<c@d.test>")
    s.cmd("DATA")
    assert lines(s, b"x\r\n.\r\n") == ["250 Message accepted"]


def test_mailgates_own_look_has_no_chunk_line() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    s.cmd("RCPT TO:<c@d.test>")
    assert lines(s, b"BDAT 2 LAST\r\nab") == ["250 2.0.0 Message accepted"]


def test_a_fallback_two_steps_up_words_the_reply() -> None:
    # mail_parameter_not_offered -> unknown_parameter -> bad_parameter: a persona that
    # words only bad_parameter (Postfix) words the parameter not offered with it.
    persona = Persona(replies={"bad_parameter": "Unsupported option: {parameter}"})
    s = Session.start(dataclasses.replace(BASE, persona=persona, smtputf8=False))
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:<a@b.test> SMTPUTF8\r\n") == [
        (555, "5.5.4 Unsupported option: SMTPUTF8")
    ]
