"""ESMTP parameters of MAIL and RCPT: syntax (501), semantics (555), SIZE limit (552)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.protocol import replies
from mailgate.protocol.params import (
    PARAMETERS,
    ParamContext,
    ParamError,
    parse_params,
    split_params,
)
from mailgate.protocol.xtext import xtext_encode

ALL = frozenset(
    {"SIZE", "8BITMIME", "SMTPUTF8", "DSN", "CHUNKING", "BINARYMIME", "REQUIRETLS", "AUTH"}
)


def mail(
    extensions: frozenset[str] = ALL, max_size: int | None = None, smtputf8: bool = False
) -> ParamContext:
    return ParamContext("MAIL", extensions, max_size, smtputf8)


def rcpt(extensions: frozenset[str] = ALL, smtputf8: bool = False) -> ParamContext:
    return ParamContext("RCPT", extensions, None, smtputf8)


# --- accepted ----------------------------------------------------------------------

MAIL_OK: list[tuple[str, dict[str, str | None]]] = [
    ("", {}),
    ("   ", {}),
    ("SIZE=1000", {"SIZE": "1000"}),
    ("size=1000", {"SIZE": "1000"}),
    ("SIZE=0", {"SIZE": "0"}),
    ("SIZE=007", {"SIZE": "7"}),
    ("SIZE=" + "9" * 20, {"SIZE": "9" * 20}),
    ("BODY=7BIT", {"BODY": "7BIT"}),
    ("BODY=8bitmime", {"BODY": "8BITMIME"}),
    ("body=BinaryMIME", {"BODY": "BINARYMIME"}),
    ("SMTPUTF8", {"SMTPUTF8": None}),
    ("smtputf8", {"SMTPUTF8": None}),
    ("AUTH=<>", {"AUTH": "<>"}),
    ("AUTH=user@example.com", {"AUTH": "user@example.com"}),
    ("AUTH=Joe+2BSmith@Example.COM", {"AUTH": "Joe+Smith@Example.COM"}),
    ("AUTH=+3C+3E", {"AUTH": "<>"}),
    ("RET=FULL", {"RET": "FULL"}),
    ("ret=hdrs", {"RET": "HDRS"}),
    ("ENVID=QQ314159", {"ENVID": "QQ314159"}),
    ("ENVID=MixedCase+2B+3D", {"ENVID": "MixedCase+="}),
    ("ENVID=+C3+BC", {"ENVID": "ü"}),  # +HH are octets of UTF-8
    ("ENVID=" + "a" * 100, {"ENVID": "a" * 100}),
    ("ENVID=" + "+2B" * 100, {"ENVID": "+" * 100}),  # the limit is on the decoded value
    ("REQUIRETLS", {"REQUIRETLS": None}),
    (
        "SIZE=10  BODY=8BITMIME SMTPUTF8 AUTH=<> RET=FULL ENVID=x REQUIRETLS",
        {
            "SIZE": "10",
            "BODY": "8BITMIME",
            "SMTPUTF8": None,
            "AUTH": "<>",
            "RET": "FULL",
            "ENVID": "x",
            "REQUIRETLS": None,
        },
    ),
    # MAIL's own SMTPUTF8 allows UTF-8 in the values beside it, in any order.
    ("SMTPUTF8 AUTH=jörg@bücher.example", {"SMTPUTF8": None, "AUTH": "jörg@bücher.example"}),
    ("AUTH=jörg@bücher.example SMTPUTF8", {"AUTH": "jörg@bücher.example", "SMTPUTF8": None}),
    ("SMTPUTF8 ENVID=ü+2Bü", {"SMTPUTF8": None, "ENVID": "ü+ü"}),
]


@pytest.mark.parametrize(("text", "expected"), MAIL_OK)
def test_mail_params_ok(text: str, expected: dict[str, str | None]) -> None:
    assert parse_params(text, mail()) == expected
    assert list(parse_params(text, mail())) == list(expected)  # order kept


RCPT_OK: list[tuple[str, bool, dict[str, str | None]]] = [
    ("NOTIFY=NEVER", False, {"NOTIFY": "NEVER"}),
    ("NOTIFY=never", False, {"NOTIFY": "NEVER"}),
    ("NOTIFY=SUCCESS", False, {"NOTIFY": "SUCCESS"}),
    ("NOTIFY=success,failure", False, {"NOTIFY": "SUCCESS,FAILURE"}),
    ("NOTIFY=DELAY,FAILURE,SUCCESS", False, {"NOTIFY": "DELAY,FAILURE,SUCCESS"}),
    ("ORCPT=rfc822;user@example.com", False, {"ORCPT": "rfc822;user@example.com"}),
    ("ORCPT=RFC822;Joe+2BSmith@Example.COM", False, {"ORCPT": "RFC822;Joe+Smith@Example.COM"}),
    ("ORCPT=rfc822;a+20b@c", False, {"ORCPT": "rfc822;a b@c"}),
    (
        "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a@b",
        False,
        {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;a@b"},
    ),
    # RFC 6533 utf-8 address type: \x{HEX} escapes (7-bit form) or raw UTF-8 (unitext).
    ("ORCPT=utf-8;j\\x{F6}rg@example.com", True, {"ORCPT": "utf-8;jörg@example.com"}),
    ("ORCPT=UTF-8;jörg@bücher.example", True, {"ORCPT": "UTF-8;jörg@bücher.example"}),
    ("ORCPT=utf-8;a\\x{2B}b@c", True, {"ORCPT": "utf-8;a+b@c"}),
    ("ORCPT=rfc822;jörg@example.com", True, {"ORCPT": "rfc822;jörg@example.com"}),
]


@pytest.mark.parametrize(("text", "smtputf8", "expected"), RCPT_OK)
def test_rcpt_params_ok(text: str, smtputf8: bool, expected: dict[str, str | None]) -> None:
    assert parse_params(text, rcpt(smtputf8=smtputf8)) == expected


@pytest.mark.parametrize(
    ("size", "limit"), [("1000", 1000), ("999", 1000), ("10" + "0" * 18, None), ("10" * 10, 0)]
)
def test_size_within_limit(size: str, limit: int | None) -> None:
    assert parse_params(f"SIZE={size}", mail(max_size=limit)) == {"SIZE": str(int(size))}


def test_body_7bit_needs_either_mime_extension() -> None:
    assert parse_params("BODY=7BIT", mail(frozenset({"8BITMIME"}))) == {"BODY": "7BIT"}
    assert parse_params("BODY=7BIT", mail(frozenset({"BINARYMIME"}))) == {"BODY": "7BIT"}


# --- refused: token syntax, 501 5.5.4 ---------------------------------------------

SYNTAX_ERRORS = [
    "=1",
    "SIZE=",
    "SIZE=1 BODY=",
    "SI_ZE=1",
    "-SIZE=1",
    "SIZE.=1",
    "SIZE=1=2",
    "ORCPT=rfc822;a=b@c",
    "SIZE=1\x00",
    "SIZE=1\tBODY=7BIT",
    "SIZE=1\r",
    "ENVID=a\x7fb",
    "ENVID=a\x85b",
    "ENVID=a\u2028b",
    "ÜBER=1",
    "FOO=1 SIZE=",  # syntax is judged before meaning
]


@pytest.mark.parametrize("text", SYNTAX_ERRORS)
def test_syntax_errors(text: str) -> None:
    for ctx in (mail(smtputf8=True), rcpt(smtputf8=True)):
        with pytest.raises(ParamError) as info:
            parse_params(text, ctx)
        assert (info.value.reply.code, info.value.reply.status) == (501, "5.5.4")
        with pytest.raises(ParamError):
            split_params(text)


# --- refused: meaning, 555 5.5.4 ---------------------------------------------------

MAIL_INVALID: list[tuple[str, ParamContext, str]] = [
    ("FOO=bar", mail(), "Unknown parameter FOO"),
    ("foo", mail(), "Unknown parameter FOO"),
    ("X-" + "A" * 100, mail(), "Unknown parameter X-" + "A" * 30 + "..."),
    ("NOTIFY=NEVER", mail(), "Parameter NOTIFY is not valid for MAIL"),
    ("ORCPT=rfc822;a@b", mail(), "Parameter ORCPT is not valid for MAIL"),
    ("SIZE=1", mail(ALL - {"SIZE"}), "Parameter SIZE is not supported"),
    ("BODY=7BIT", mail(frozenset()), "Parameter BODY is not supported"),
    ("BODY=8BITMIME", mail(frozenset({"BINARYMIME"})), "BODY=8BITMIME is not supported"),
    ("BODY=BINARYMIME", mail(frozenset({"8BITMIME"})), "BODY=BINARYMIME is not supported"),
    ("SMTPUTF8", mail(ALL - {"SMTPUTF8"}), "Parameter SMTPUTF8 is not supported"),
    ("AUTH=<>", mail(ALL - {"AUTH"}), "Parameter AUTH is not supported"),
    ("RET=FULL", mail(ALL - {"DSN"}), "Parameter RET is not supported"),
    ("ENVID=x", mail(ALL - {"DSN"}), "Parameter ENVID is not supported"),
    ("REQUIRETLS", mail(ALL - {"REQUIRETLS"}), "Parameter REQUIRETLS is not supported"),
    ("SIZE=1 SIZE=2", mail(), "Duplicate parameter SIZE"),
    ("SIZE=1 size=1", mail(), "Duplicate parameter SIZE"),
    ("SMTPUTF8 SMTPUTF8", mail(), "Duplicate parameter SMTPUTF8"),
    ("SIZE", mail(), "Parameter SIZE requires a value"),
    ("BODY", mail(), "Parameter BODY requires a value"),
    ("AUTH", mail(), "Parameter AUTH requires a value"),
    ("SMTPUTF8=yes", mail(), "Parameter SMTPUTF8 takes no value"),
    ("REQUIRETLS=1", mail(), "Parameter REQUIRETLS takes no value"),
    ("SIZE=abc", mail(), "Invalid SIZE value"),
    ("SIZE=-1", mail(), "Invalid SIZE value"),
    ("SIZE=+1", mail(), "Invalid SIZE value"),
    ("SIZE=1_000", mail(), "Invalid SIZE value"),  # int() would take it
    ("SIZE=" + "1" * 21, mail(), "Invalid SIZE value"),
    ("SIZE=\uff11\uff12", mail(), "Non-ASCII value for SIZE requires SMTPUTF8"),
    ("SMTPUTF8 SIZE=\uff11\uff12", mail(), "Invalid SIZE value"),  # fullwidth, not DIGIT
    ("BODY=9BIT", mail(), "Invalid BODY value"),
    ("SMTPUTF8 BODY=B\u0131nARYMIME", mail(), "Invalid BODY value"),  # dotless i upper-cases to I
    ("RET=NONE", mail(), "Invalid RET value"),
    ("AUTH=foo", mail(), "Invalid AUTH value"),
    ("AUTH=@example.com", mail(), "Invalid AUTH value"),
    ("AUTH=user@", mail(), "Invalid AUTH value"),
    ("AUTH=a+2", mail(), "Invalid AUTH value"),
    ("AUTH=a+zzb@c", mail(), "Invalid AUTH value"),
    ("AUTH=a+2bb@c", mail(), "Invalid AUTH value"),  # hex must be upper case
    ("AUTH=a+0Ab@c", mail(), "Invalid AUTH value"),  # decodes to a control
    ("AUTH=a+00b@c", mail(), "Invalid AUTH value"),
    ("AUTH=jörg@example.com", mail(), "Non-ASCII value for AUTH requires SMTPUTF8"),
    ("ENVID=" + "a" * 101, mail(), "ENVID value too long"),
    ("ENVID=a+0Db", mail(), "Invalid ENVID value"),
    ("ENVID=+FF", mail(), "Invalid ENVID value"),  # not UTF-8
    ("ENVID=+C3", mail(), "Invalid ENVID value"),
]


@pytest.mark.parametrize(("text", "ctx", "message"), MAIL_INVALID)
def test_mail_params_refused(text: str, ctx: ParamContext, message: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_params(text, ctx)
    assert (info.value.reply.code, info.value.reply.status) == (555, "5.5.4")
    assert info.value.reply.text == message


RCPT_INVALID: list[tuple[str, bool, str]] = [
    ("SIZE=1", False, "Parameter SIZE is not valid for RCPT"),
    ("SMTPUTF8", True, "Parameter SMTPUTF8 is not valid for RCPT"),
    ("NOTIFY", False, "Parameter NOTIFY requires a value"),
    ("NOTIFY=NEVER,SUCCESS", False, "Invalid NOTIFY value"),
    ("NOTIFY=SUCCESS,SUCCESS", False, "Invalid NOTIFY value"),
    ("NOTIFY=success,SUCCESS", False, "Invalid NOTIFY value"),
    ("NOTIFY=NEVER,NEVER", False, "Invalid NOTIFY value"),
    ("NOTIFY=SOMETIMES", False, "Invalid NOTIFY value"),
    ("NOTIFY=SUCCESS,", False, "Invalid NOTIFY value"),
    ("NOTIFY=,SUCCESS", False, "Invalid NOTIFY value"),
    ("NOTIFY=SUCCESS;DELAY", False, "Invalid NOTIFY value"),
    ("NOTIFY=NEVER NOTIFY=NEVER", False, "Duplicate parameter NOTIFY"),
    ("ORCPT=user@example.com", False, "Invalid ORCPT value"),
    ("ORCPT=rfc822;", False, "Invalid ORCPT value"),
    ("ORCPT=;a@b", False, "Invalid ORCPT value"),
    ("ORCPT=rfc(822);a@b", False, "Invalid ORCPT value"),
    ("ORCPT=rfc822;+XX", False, "Invalid ORCPT value"),
    ("ORCPT=rfc822;a+0Db@c", False, "Invalid ORCPT value"),
    ("ORCPT=rfc822;" + "a" * 494, False, "ORCPT value too long"),
    ("ORCPT=rfc822;jörg@example.com", False, "Non-ASCII value for ORCPT requires SMTPUTF8"),
    ("ORCPT=utf-8;a@b", False, "ORCPT address type utf-8 requires SMTPUTF8"),
    ("ORCPT=UTF-8;a@b", False, "ORCPT address type utf-8 requires SMTPUTF8"),
    ("ORCPT=utf-8;a+b@c", True, "Invalid ORCPT value"),  # "+" must be \x{2B} there
    ("ORCPT=utf-8;a\\b@c", True, "Invalid ORCPT value"),
    ("ORCPT=utf-8;a\\x{}b@c", True, "Invalid ORCPT value"),
    ("ORCPT=utf-8;a\\x{D800}b@c", True, "Invalid ORCPT value"),
    ("ORCPT=utf-8;a\\x{110000}b@c", True, "Invalid ORCPT value"),
    ("ORCPT=utf-8;a\\x{0A}b@c", True, "Invalid ORCPT value"),
    ("ORCPT=utf-8;a\\x{85}b@c", True, "Invalid ORCPT value"),
]


@pytest.mark.parametrize(("text", "smtputf8", "message"), RCPT_INVALID)
def test_rcpt_params_refused(text: str, smtputf8: bool, message: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_params(text, rcpt(smtputf8=smtputf8))
    assert (info.value.reply.code, info.value.reply.status) == (555, "5.5.4")
    assert info.value.reply.text == message


def test_rcpt_utf8_comes_from_the_context_not_the_rcpt() -> None:
    with pytest.raises(ParamError):
        parse_params("NOTIFY=NEVER ORCPT=utf-8;a@b", rcpt(smtputf8=False))
    assert parse_params("ORCPT=utf-8;a@b", rcpt(smtputf8=True)) == {"ORCPT": "utf-8;a@b"}


def test_mail_smtputf8_only_counts_when_advertised() -> None:
    with pytest.raises(ParamError) as info:
        parse_params("AUTH=jörg@example.com SMTPUTF8", mail(ALL - {"SMTPUTF8"}))
    assert info.value.reply.code == 555


@pytest.mark.parametrize(("size", "limit"), [("1001", 1000), ("9" * 20, 25 * 1024 * 1024)])
def test_size_over_limit(size: str, limit: int) -> None:
    with pytest.raises(ParamError) as info:
        parse_params(f"SIZE={size}", mail(max_size=limit))
    assert info.value.reply is replies.MESSAGE_TOO_BIG
    assert (info.value.reply.code, info.value.reply.status) == (552, "5.3.4")


# --- split_params and the registry -------------------------------------------------


def test_split_params_then_parse() -> None:
    text = "size=10  Body=8bitmime SMTPUTF8"
    pairs = split_params(text)
    assert pairs == [("SIZE", "10"), ("BODY", "8bitmime"), ("SMTPUTF8", None)]
    assert parse_params(pairs, mail()) == parse_params(text, mail())


def test_split_params_does_not_judge_meaning() -> None:
    assert split_params("FOO=bar SIZE=abc SIZE=abc") == [
        ("FOO", "bar"),
        ("SIZE", "abc"),
        ("SIZE", "abc"),
    ]


def test_registry_matches_the_rfcs() -> None:
    assert {k for k, s in PARAMETERS.items() if s.verb == "MAIL"} == {
        "SIZE",
        "BODY",
        "SMTPUTF8",
        "AUTH",
        "RET",
        "ENVID",
        "REQUIRETLS",
        "PRDR",  # draft-hall-prdr-00, for personas that offer it (Exim)
        "BY",  # RFC 2852 DELIVERBY, for personas that offer it (Sendmail)
    }
    assert {k for k, s in PARAMETERS.items() if s.verb == "RCPT"} == {"NOTIFY", "ORCPT"}
    assert not PARAMETERS["SMTPUTF8"].has_value
    assert not PARAMETERS["REQUIRETLS"].has_value
    with pytest.raises(TypeError):
        PARAMETERS["X"] = PARAMETERS["SIZE"]  # type: ignore[index]


def test_param_error_carries_reply() -> None:
    error = ParamError(replies.BAD_PARAMETER)
    assert isinstance(error, ValueError)
    assert error.reply is replies.BAD_PARAMETER
    assert str(error) == replies.BAD_PARAMETER.text


# --- properties --------------------------------------------------------------------

TOKEN_PIECES = st.sampled_from(
    [
        *"SIZEBODYAUTHRETNVFLCPQ=;,<>@+0123456789 -\\{}xüé\x00\t\x85",
        *("SIZE=", "AUTH=", "ORCPT=utf-8;", "ORCPT=rfc822;", "NOTIFY=", "ENVID=", "SMTPUTF8"),
        *("+2B", "+C3", "\\x{", " "),
    ]
)
noisy_text = st.one_of(st.text(), st.lists(TOKEN_PIECES, max_size=30).map("".join))
contexts = st.builds(
    ParamContext,
    verb=st.sampled_from(["MAIL", "RCPT"]),
    extensions=st.sets(st.sampled_from(sorted(ALL))).map(frozenset),
    max_size=st.one_of(st.none(), st.integers(min_value=0, max_value=10**9)),
    smtputf8=st.booleans(),
)


@given(noisy_text, contexts)
def test_parse_params_only_raises_param_error(text: str, ctx: ParamContext) -> None:
    try:
        result = parse_params(text, ctx)
    except ParamError as exc:
        assert exc.reply.code in (501, 552, 555)
        exc.reply.render()
    else:
        assert set(result) <= set(PARAMETERS)
        for key, value in result.items():
            assert PARAMETERS[key].verb == ctx.verb
            assert (value is None) != PARAMETERS[key].has_value


printable = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=100
)


@given(printable)
def test_envid_xtext_round_trip(envid: str) -> None:
    assert parse_params("ENVID=" + xtext_encode(envid), mail()) == {"ENVID": envid}


def test_requiretls_before_tls_is_refused_as_needing_it() -> None:
    before = ParamContext("MAIL", ALL - {"REQUIRETLS"}, None, after_tls=frozenset({"REQUIRETLS"}))
    with pytest.raises(ParamError) as caught:
        parse_params("REQUIRETLS", before)
    assert (caught.value.reply.code, caught.value.reply.status) == (530, "5.7.10")
    assert PARAMETERS["REQUIRETLS"].tls_only
    assert not any(spec.tls_only for key, spec in PARAMETERS.items() if key != "REQUIRETLS")
