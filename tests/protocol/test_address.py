"""Paths of MAIL FROM and RCPT TO: RFC 5321 4.1.2 grammar, limits, RFC 6531 UTF-8."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.protocol import address as address_module
from mailgate.protocol import replies
from mailgate.protocol.address import (
    Address,
    AddressError,
    parse_forward_path,
    parse_plain_path,
    parse_reverse_path,
    split_path_and_params,
)

# --- split_path_and_params -----------------------------------------------------------

SPLIT_OK = [
    ("<a@b>", ("<a@b>", "")),
    ("<>", ("<>", "")),
    (" <a@b>", ("<a@b>", "")),  # "MAIL FROM: <a@b>" is common practice
    ("   <a@b>  ", ("<a@b>", "")),
    ("<a@b> SIZE=10 BODY=8BITMIME", ("<a@b>", "SIZE=10 BODY=8BITMIME")),
    ("<a@b>   SIZE=10  ", ("<a@b>", "SIZE=10")),
    ('<"a>b"@c> X', ('<"a>b"@c>', "X")),
    ('<"a b> c"@d>', ('<"a b> c"@d>', "")),
    ('<"a\\"> b"@c> X', ('<"a\\"> b"@c>', "X")),
    ("<a@[x:y>z]> P", ("<a@[x:y>z]>", "P")),
    ("<@a,@b:u@c> NOTIFY=NEVER", ("<@a,@b:u@c>", "NOTIFY=NEVER")),
]


@pytest.mark.parametrize(("argument", "expected"), SPLIT_OK)
def test_split_ok(argument: str, expected: tuple[str, str]) -> None:
    assert split_path_and_params(argument) == expected


@pytest.mark.parametrize(
    "argument",
    [
        "",
        "   ",
        "a@b",
        "John <a@b>",
        "<a@b",
        '<"a@b>',  # the quote never closes, so neither does the path
        "<a@[1.2.3.4>",
        "<a@b>SIZE=1",
        "<a@b>\tSIZE=1",
        "\t<a@b>",
    ],
)
def test_split_refused(argument: str) -> None:
    with pytest.raises(AddressError) as info:
        split_path_and_params(argument)
    assert info.value.reply.code == 501
    assert info.value.reply.status == "5.5.2"


# --- valid paths -------------------------------------------------------------------

VALID_ASCII = [
    ("<a@example.com>", Address("a", "example.com")),
    ("<A.B.C@Example.COM>", Address("A.B.C", "Example.COM")),
    ("<!#$%&'*+-/=?^_`{|}~@example.com>", Address("!#$%&'*+-/=?^_`{|}~", "example.com")),
    ("<@a.example,@b.example:user@c.example>", Address("user", "c.example")),
    ("<@a,@b:u@c>", Address("u", "c")),
    ("<@[192.0.2.1]:u@c>", Address("u", "c")),
    ('<"john doe"@example.com>', Address('"john doe"', "example.com")),
    ('<"a>b"@c>', Address('"a>b"', "c")),
    ('<"a\\"b"@c>', Address('"a\\"b"', "c")),
    ('<"a\\\\b"@c>', Address('"a\\\\b"', "c")),
    ('<"a@b"@c>', Address('"a@b"', "c")),
    ('<""@c>', Address('""', "c")),
    ("<a@[192.0.2.1]>", Address("a", "[192.0.2.1]")),
    ("<a@[001.002.003.004]>", Address("a", "[001.002.003.004]")),  # Snum = 1*3DIGIT
    ("<a@[IPv6:::1]>", Address("a", "[IPv6:::1]")),
    ("<a@[ipv6:2001:db8::1]>", Address("a", "[ipv6:2001:db8::1]")),
    ("<a@[IPv6:2001:db8:0:0:0:0:0:1]>", Address("a", "[IPv6:2001:db8:0:0:0:0:0:1]")),
    ("<a@[IPv6:::ffff:192.0.2.1]>", Address("a", "[IPv6:::ffff:192.0.2.1]")),
    ("<a@[IPv6:1:2:3:4:5:6::]>", Address("a", "[IPv6:1:2:3:4:5:6::]")),
    ("<a@[x-tag:some-content]>", Address("a", "[x-tag:some-content]")),
    ("<a@xn--bcher-kva.example>", Address("a", "xn--bcher-kva.example")),
    ("<a@1.2.3.4>", Address("a", "1.2.3.4")),
    ("<a@localhost>", Address("a", "localhost")),
    ("<Postmaster@example.com>", Address("Postmaster", "example.com")),
    ("<" + "a" * 64 + "@b>", Address("a" * 64, "b")),
    ("<a@" + "b" * 63 + ".c>", Address("a", "b" * 63 + ".c")),
]


@pytest.mark.parametrize(("path", "expected"), VALID_ASCII)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_valid_paths(path: str, expected: Address, smtputf8: bool) -> None:
    assert parse_reverse_path(path, smtputf8=smtputf8) == expected
    assert parse_forward_path(path, smtputf8=smtputf8) == expected


def test_path_of_256_octets_is_accepted() -> None:
    domain = ".".join(["d" * 61] * 4)  # 247 octets
    path = "<" + "a" * 6 + "@" + domain + ">"
    assert len(path) == 256
    assert parse_forward_path(path, smtputf8=False) == Address("a" * 6, domain)


def test_null_reverse_path() -> None:
    assert parse_reverse_path("<>", smtputf8=False) is None
    assert parse_reverse_path("<>", smtputf8=True) is None


def test_null_forward_path_refused() -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path("<>", smtputf8=True)
    assert (info.value.reply.code, info.value.reply.status) == (501, "5.1.3")


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "<PostMaster>"])
def test_bare_postmaster_recipient(path: str) -> None:
    address = parse_forward_path(path, smtputf8=False)
    assert address == Address(path[1:-1], "")  # kept as sent
    assert address.local_part.lower() == "postmaster"
    assert str(address) == path[1:-1]


def test_bare_postmaster_is_not_a_sender() -> None:
    with pytest.raises(AddressError) as info:
        parse_reverse_path("<Postmaster>", smtputf8=False)
    assert (info.value.reply.code, info.value.reply.status) == (501, "5.1.7")


# --- invalid paths -----------------------------------------------------------------

INVALID = [
    "a@b",
    "<a@b",
    "a@b>",
    "<<a@b>>",
    "<a>",
    "<@a>",
    "<a@>",
    "<@a:>",
    "<@a:@b:u@c>",
    "<@a,u@c>",
    "<@a.,@b:u@c>",
    "<@:u@c>",
    "<a..b@c>",
    "<.a@c>",
    "<a.@c>",
    "<a b@c>",
    "<a(b)@c>",
    "<a[b]@c>",
    "<a@b@c>",
    "<a@b..c>",
    "<a@.b>",
    "<a@b.>",
    "<a@-b.c>",
    "<a@b-.c>",
    "<a@b_c.d>",
    "<a@b c>",
    "<a@" + "b" * 64 + ".c>",  # label over 63
    '<"a@c>',
    '<"a"b@c>',
    '<"a"."b"@c>',
    '<"a\\',
    '<"a\\">',
    "<a@[1.2.3]>",
    "<a@[1.2.3.4.5]>",
    "<a@[1.2.3.256]>",
    "<a@[1.2.3.-1]>",
    "<a@[1.2.3.0004]>",
    "<a@[IPv6:::g]>",
    "<a@[IPv6:1.2.3.4]>",
    "<a@[IPv6:12345::]>",
    "<a@[IPv6:fe80::1%eth0]>",  # ipaddress takes scope ids; RFC 5321 does not
    "<a@[IPv6:1:2:3:4:5:6:7::]>",  # more than 6 groups beside "::"
    "<a@[IPv6:1:2:3:4:5:6:7]>",
    "<a@[IPv6:]>",
    "<a@[]>",
    "<a@[1.2.3.4]x>",
    "<a@[1.2.3.4>",
    "<a@[-:x]>",
    "<a@[tag:]>",
    "<a@[:x]>",
    "<a@[tag:a[b]>",
    "<a@[tag:a\\b]>",
    "<a@x.[1.2.3.4]>",
]


@pytest.mark.parametrize("path", INVALID)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_invalid_paths(path: str, smtputf8: bool) -> None:
    with pytest.raises(AddressError) as info:
        parse_reverse_path(path, smtputf8=smtputf8)
    assert (info.value.reply.code, info.value.reply.status) == (501, "5.1.7")
    assert info.value.reply.text.startswith("Bad sender address syntax")
    with pytest.raises(AddressError) as info:
        parse_forward_path(path, smtputf8=smtputf8)
    assert (info.value.reply.code, info.value.reply.status) == (501, "5.1.3")
    assert info.value.reply.text.startswith("Bad recipient address syntax")


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("<" + "a" * 65 + "@b>", "local part too long"),
        ('<"' + "a" * 63 + '"@b>', "local part too long"),  # the quotes count
        ("<a@" + ".".join(["d" * 63] * 4) + ">", "path too long"),
        ("<a@" + ".".join(["d" * 50] * 5) + ">", "path too long"),
        ("<@" + "r" * 250 + ":a@b>", "path too long"),  # routes count towards the limit
        # Short in UTF-8, too long as the A-labels the DNS would see (8 octets per "ü.").
        ("<a@" + ".".join(["ü"] * 33) + ">", "domain too long"),
    ],
)
def test_length_limits(path: str, detail: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path(path, smtputf8=True)
    assert info.value.reply.code == 501
    assert info.value.reply.text.endswith(detail)


@pytest.mark.parametrize(
    "char",
    ["\x00", "\x01", "\t", "\r", "\n", "\x1b", "\x7f", "\x80", "\x85", "\x9f", "\u2028", "\ud800"],
)
@pytest.mark.parametrize("where", ["<a{}b@c>", '<"a{}b"@c>', "<a@b{}c>", "<a@[1.2{}.3.4]>", "<{}>"])
@pytest.mark.parametrize("smtputf8", [False, True])
def test_control_characters_refused(char: str, where: str, smtputf8: bool) -> None:
    path = where.format(char)
    for parse in (parse_reverse_path, parse_forward_path):
        with pytest.raises(AddressError) as info:
            parse(path, smtputf8=smtputf8)
        assert info.value.reply.code == 501
        assert "control characters" in info.value.reply.text


# --- RFC 6531: UTF-8 ---------------------------------------------------------------

VALID_UTF8 = [
    ("<ü@example.com>", Address("ü", "example.com")),
    ("<jörg.müller@bücher.example>", Address("jörg.müller", "bücher.example")),
    ("<用户@例子.广告>", Address("用户", "例子.广告")),
    ("<δοκιμή@παράδειγμα.δοκιμή>", Address("δοκιμή", "παράδειγμα.δοκιμή")),
    ("<उपयोगकर्ता@उदाहरण.कॉम>", Address("उपयोगकर्ता", "उदाहरण.कॉम")),  # combining marks
    ('<"ü x"@example.com>', Address('"ü x"', "example.com")),
    ("<a@Bücher.example>", Address("a", "Bücher.example")),
    ("<😀@example.com>", Address("😀", "example.com")),  # local parts take any UTF8-non-ascii
    ("<a@" + "a" * 55 + "ü.example>", Address("a", "a" * 55 + "ü.example")),  # A-label is 63
    ("<a@" + ".".join(["ü"] * 32) + ">", Address("a", ".".join(["ü"] * 32))),  # 255 as A-labels
]


@pytest.mark.parametrize(("path", "expected"), VALID_UTF8)
def test_utf8_with_smtputf8(path: str, expected: Address) -> None:
    assert parse_reverse_path(path, smtputf8=True) == expected
    assert parse_forward_path(path, smtputf8=True) == expected
    assert expected.is_utf8


@pytest.mark.parametrize("path", [p for p, _ in VALID_UTF8] + ["<a@[ü]>", "<ü>"])
def test_utf8_without_smtputf8(path: str) -> None:
    for parse in (parse_reverse_path, parse_forward_path):
        with pytest.raises(AddressError) as info:
            parse(path, smtputf8=False)
        assert info.value.reply is replies.SMTPUTF8_REQUIRED
        assert (info.value.reply.code, info.value.reply.status) == (553, "5.6.7")


@pytest.mark.parametrize(
    "path",
    [
        "<a@☃.example>",  # a symbol, not a letter
        "<a@ü_x.example>",
        "<a@-ü.example>",
        "<a@ü-.example>",
        "<a@\u0301a.example>",  # leading combining mark
        "<a@ü\u00a0.example>",  # no-break space
        "<a@例子。广告>",  # ideographic full stop is not a label separator here
        "<a@" + "a" * 56 + "ü.example>",  # A-label of 64 octets
        "<a@[ü]>",
        "<@ü.example:a@b>",
        '<"a\\ü"@b>',  # quoted-pairSMTP stays ASCII
        "<" + "é" * 33 + "@b>",  # 66 octets
    ],
)
def test_invalid_utf8_with_smtputf8(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path(path, smtputf8=True)
    assert info.value.reply.code == 501


# --- the exception -----------------------------------------------------------------


def test_address_error_carries_reply() -> None:
    error = AddressError(replies.BAD_ADDRESS)
    assert isinstance(error, ValueError)
    assert error.reply is replies.BAD_ADDRESS
    assert str(error) == replies.BAD_ADDRESS.text
    assert str(AddressError(replies.BAD_ADDRESS, "detail")) == "detail"


def test_reply_never_echoes_the_address() -> None:
    with pytest.raises(AddressError) as info:
        parse_forward_path("<secret..x@example.com>", smtputf8=False)
    assert "secret" not in info.value.reply.text
    assert "secret" in str(info.value)  # but the log message has it


# --- properties --------------------------------------------------------------------

GRAMMAR_CHARS = st.sampled_from([*'<>@[]":.,\\ -aZ09!~üé用\x00\t\x7f\x85', "IPv6:", "::"])
noisy_text = st.one_of(st.text(), st.lists(GRAMMAR_CHARS, max_size=40).map("".join))


@given(noisy_text, st.booleans())
def test_parsers_only_raise_address_error(text: str, smtputf8: bool) -> None:
    for candidate in (text, f"<{text}>"):
        for parse in (parse_reverse_path, parse_forward_path):
            try:
                result = parse(candidate, smtputf8=smtputf8)
            except AddressError as exc:
                assert exc.reply.code in (501, 553)
                exc.reply.render()
            else:
                assert result is None or isinstance(result, Address)
        try:
            path, rest = split_path_and_params(candidate)
        except AddressError as exc:
            assert exc.reply.code == 501
        else:
            assert path.startswith("<") and path.endswith(">")
            assert rest == rest.strip(" ")


ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
local_parts = st.lists(atoms, min_size=1, max_size=5).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=5).map(".".join)


@given(local_parts, domains)
def test_dot_string_round_trip(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    for smtputf8 in (False, True):
        parsed = parse_forward_path(f"<{address}>", smtputf8=smtputf8)
        assert str(parsed) == address
        assert parse_reverse_path(f"<{address}>", smtputf8=smtputf8) == parsed
        assert split_path_and_params(f" <{address}> SIZE=1") == (f"<{address}>", "SIZE=1")


# --- the fast way (parse_plain_path) ---------------------------------------------------


def _full_way(argument: str, long_local_parts: bool) -> tuple[Address, str, str] | None:
    """What split_path_and_params and both path parsers make of ``argument``, when they
    agree on a mailbox (None when any of them refuses it or it is not a mailbox)."""
    try:
        path, rest = split_path_and_params(argument)
        sender = parse_reverse_path(path, smtputf8=True, long_local_parts=long_local_parts)
        recipient = parse_forward_path(path, smtputf8=True, long_local_parts=long_local_parts)
    except AddressError:
        return None
    assert sender == recipient or sender is None
    return (recipient, path, rest) if sender is not None else None


PLAIN_CHARS = st.sampled_from([*'<>@[]".:,- aZ09!~ü\x00.', "@a.b", "-x", "a" * 63, "b" * 65])
plain_noise = st.lists(PLAIN_CHARS, max_size=30).map("".join)


@given(st.one_of(plain_noise, st.text(max_size=40)), st.booleans())
def test_plain_path_agrees_with_the_full_way(text: str, long_local_parts: bool) -> None:
    # Whatever the fast way takes, the full way takes as the same Address, path and
    # parameter text; what it leaves, the full way judges (and may refuse).
    for argument in (text, f"<{text}>", f" <{text}> SIZE=1", f"<{text}>x"):
        fast = parse_plain_path(argument, long_local_parts)
        if fast is not None:
            assert fast == _full_way(argument, long_local_parts)


@given(local_parts, domains, st.sampled_from(["", " ", "  SIZE=10 BODY=8BITMIME", " X "]))
def test_plain_path_takes_the_common_shape(local: str, domain: str, rest: str) -> None:
    argument = f" <{local}@{domain}>{rest}"
    assert parse_plain_path(argument, False) == (
        Address(local, domain),
        f"<{local}@{domain}>",
        rest.strip(" "),
    )


@pytest.mark.parametrize(
    "argument",
    [
        "<" + "a" * 65 + "@b.example>",  # local part too long (fine with long_local_parts)
        "<a@" + ".".join(["b" * 63] * 4) + ">",  # path too long
        "<a@" + "b" * 64 + ".example>",  # label too long
        "<a@b.example>x",  # glued text
        "<a@b.example.>",  # trailing dot
        "<a@-b.example>",
        "<a..b@c.example>",
        '<"a b"@c.example>',
        "<@r.example:a@b.example>",
        "<a@[192.0.2.1]>",
        "<ü@b.example>",
        "<postmaster>",
        "<>",
        "a@b.example",
    ],
)
def test_plain_path_leaves_the_rest_to_the_full_way(argument: str) -> None:
    assert parse_plain_path(argument, False) is None


def test_plain_path_long_local_part_within_the_path_limit() -> None:
    argument = "<" + "a" * 100 + "@b.example>"
    assert parse_plain_path(argument, True) == _full_way(argument, True)
    assert parse_plain_path(argument, True) is not None


#: The textbook form of the plain path (RFC 1035 labels), which _PLAIN_PATH is a faster
#: rewrite of (possessive repeats, hyphen rules as look-arounds).
_TEXTBOOK_PLAIN_PATH = re.compile(
    rf" *(<([{address_module._ATEXT}]+(?:\.[{address_module._ATEXT}]+)*)@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)>)"
)
PATH_PIECES = st.sampled_from(
    [*"<>@.-- aZ09!~+", "a" * 62, "b" * 63, "c" * 64, "x.", ".y", "-.", ".-", "@-", "-@", "->"]
)


@given(st.lists(PATH_PIECES, max_size=24).map("".join), st.sampled_from(["", "<", " <", "<a@"]))
def test_plain_path_pattern_is_the_textbook_one(text: str, start: str) -> None:
    argument = start + text
    fast = address_module._PLAIN_PATH.match(argument)
    textbook = _TEXTBOOK_PLAIN_PATH.match(argument)
    assert (fast and (fast.end(), fast.groups())) == (
        textbook and (textbook.end(), textbook.groups())
    )


@pytest.mark.parametrize(
    "argument",
    ["<a@b>", "<a@" + "b" * 63 + ">", "<a@b-c.d-e.f>", "<a@1.2.3.4>", "<a.b.c@d.e>"],
)
def test_plain_path_pattern_edges(argument: str) -> None:
    fast = address_module._PLAIN_PATH.match(argument)
    textbook = _TEXTBOOK_PLAIN_PATH.match(argument)
    assert fast is not None and textbook is not None
    assert fast.groups() == textbook.groups()


@given(st.one_of(plain_noise, st.text(max_size=40)), st.sampled_from(["FROM:", "TO:", "x"]))
def test_plain_path_read_in_place(text: str, keyword: str) -> None:
    # MAIL and RCPT hand over their whole argument and where the path text starts.
    assert parse_plain_path(keyword + text, False, len(keyword)) == parse_plain_path(text, False)
