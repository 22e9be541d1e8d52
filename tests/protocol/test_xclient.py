"""XCLIENT and XFORWARD argument parsing (mailgate.protocol.xclient)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.protocol.replies import Reply
from mailgate.protocol.xclient import (
    XCLIENT_ATTRIBUTES,
    XFORWARD_ATTRIBUTES,
    XclientError,
    parse_xclient,
    parse_xforward,
)
from mailgate.protocol.xtext import xtext_encode


def refused(parse: object, argument: str) -> Reply:
    assert callable(parse)
    with pytest.raises(XclientError) as info:
        parse(argument)
    reply = info.value.reply
    assert (reply.code, reply.status) == (501, "5.5.4")
    assert str(info.value) == reply.text
    reply.render()  # always sendable: no CR/LF smuggled into the text
    return reply


@pytest.mark.parametrize("forward", [False, True])
def test_exactly_the_listed_attributes_are_known(forward: bool) -> None:
    parse = parse_xforward if forward else parse_xclient
    known = XFORWARD_ATTRIBUTES if forward else XCLIENT_ATTRIBUTES
    for name in XCLIENT_ATTRIBUTES | XFORWARD_ATTRIBUTES | {"FOO"}:
        if name in known:
            assert parse(f"{name}=[UNAVAILABLE]") == {name: None}
        else:
            assert "attribute name" in refused(parse, f"{name}=[UNAVAILABLE]").text


# --- XCLIENT


def test_xclient_all_attributes() -> None:
    got = parse_xclient(
        "NAME=mail.example.com ADDR=192.0.2.1 PORT=54321 PROTO=ESMTP HELO=client.example"
        " LOGIN=alice DESTADDR=198.51.100.7 DESTPORT=25"
    )
    assert got == {
        "NAME": "mail.example.com",
        "ADDR": "192.0.2.1",
        "PORT": "54321",
        "PROTO": "ESMTP",
        "HELO": "client.example",
        "LOGIN": "alice",
        "DESTADDR": "198.51.100.7",
        "DESTPORT": "25",
    }


def test_xclient_names_are_case_insensitive_and_returned_upper() -> None:
    assert parse_xclient("name=a.example Addr=192.0.2.1 proto=smtp") == {
        "NAME": "a.example",
        "ADDR": "192.0.2.1",
        "PROTO": "SMTP",
    }


def test_xclient_ipv6_prefix_is_stripped_and_normalised() -> None:
    got = parse_xclient("ADDR=IPV6:2001:DB8:0:0::1 DESTADDR=ipv6:::1")
    assert got == {"ADDR": "2001:db8::1", "DESTADDR": "::1"}


@pytest.mark.parametrize("marker", ["[UNAVAILABLE]", "[TEMPUNAVAIL]", "[unavailable]"])
def test_xclient_unavailable_markers_are_none(marker: str) -> None:
    argument = " ".join(f"{name}={marker}" for name in sorted(XCLIENT_ATTRIBUTES))
    assert parse_xclient(argument) == dict.fromkeys(XCLIENT_ATTRIBUTES)


def test_xclient_values_are_xtext_decoded() -> None:
    got = parse_xclient("LOGIN=John+20Smith HELO=+5B192.0.2.1+5D NAME=a+2Eb.example")
    assert got == {"LOGIN": "John Smith", "HELO": "[192.0.2.1]", "NAME": "a.b.example"}


def test_xclient_unavailable_marker_may_be_xtext_encoded() -> None:
    assert parse_xclient("ADDR=+5BUNAVAILABLE+5D") == {"ADDR": None}


def test_xclient_duplicate_attribute_last_wins() -> None:
    got = parse_xclient("ADDR=192.0.2.1 PORT=1 ADDR=192.0.2.2 addr=[UNAVAILABLE] PORT=2")
    assert got == {"ADDR": None, "PORT": "2"}
    assert parse_xclient("ADDR=[UNAVAILABLE] ADDR=192.0.2.9") == {"ADDR": "192.0.2.9"}


def test_xclient_extra_whitespace_between_pairs() -> None:
    assert parse_xclient("  ADDR=192.0.2.1   PORT=25 ") == {"ADDR": "192.0.2.1", "PORT": "25"}


@pytest.mark.parametrize("port", ["0", "65535", "00025"])
def test_xclient_port_range(port: str) -> None:
    assert parse_xclient(f"PORT={port} DESTPORT={port}") == {
        "PORT": str(int(port)),
        "DESTPORT": str(int(port)),
    }


@pytest.mark.parametrize(
    "name", ["localhost", "a", "mail-1.example.com", "x_y.example", "example.com.", "1a.example"]
)
def test_xclient_name_accepts_hostnames(name: str) -> None:
    assert parse_xclient(f"NAME={name}") == {"NAME": name}


@pytest.mark.parametrize("helo", ["client.example", "[IPv6:2001:db8::1]", "weird!name"])
def test_xclient_helo_accepts_any_visible_token(helo: str) -> None:
    assert parse_xclient(f"HELO={xtext_encode(helo)}") == {"HELO": helo}


@pytest.mark.parametrize("argument", ["", "   "])
def test_xclient_empty_argument(argument: str) -> None:
    assert "Syntax: XCLIENT attribute=value" in refused(parse_xclient, argument).text


@pytest.mark.parametrize("argument", ["ADDR", "ADDR=192.0.2.1 PORT", "=192.0.2.1", "ADDR="])
def test_xclient_missing_equals_name_or_value(argument: str) -> None:
    assert "attribute=value expected" in refused(parse_xclient, argument).text


@pytest.mark.parametrize(
    ("argument", "shown"),
    [("FOO=bar", "FOO"), ("ADDR=192.0.2.1 ident=x", "IDENT"), ("SOURCE=LOCAL", "SOURCE")],
)
def test_xclient_unknown_attribute(argument: str, shown: str) -> None:
    assert refused(parse_xclient, argument).text == f"Bad XCLIENT attribute name: {shown}"


@pytest.mark.parametrize(
    "argument",
    [
        "ADDR=256.0.0.1",
        "ADDR=192.0.2",
        "ADDR=192.0.2.01",
        "ADDR=2001:db8::1",  # IPv6 needs the IPV6: prefix
        "ADDR=IPV6:192.0.2.1",
        "ADDR=IPV6:fe80::1+25eth0",
        "ADDR=IPV6:",
        "ADDR=mail.example.com",
        "DESTADDR=::1",
        "PORT=65536",
        "PORT=-1",
        "PORT=+2B1",
        "PORT=1e3",
        "PORT=123456",
        "PORT=\u0661",  # Arabic-Indic digit one: str.isdigit() would say yes
        "DESTPORT=abc",
        "PROTO=LMTP",
        "PROTO=ESMTPS",
        "NAME=192.0.2.1",
        "NAME=-bad.example",
        "NAME=bad-.example",
        "NAME=a..example",
        "NAME=.example",
        "NAME=a+20b",
        "NAME=" + "a" * 64 + ".example",
        "NAME=" + ".".join(["a" * 63] * 5),
        "HELO=a+20b",
        "HELO=x+0D+0AMAIL",
        "HELO=+C3+A9",
        "LOGIN=alice+0D+0A",
        "LOGIN=+00",
        "LOGIN=" + "x" * 256,
    ],
)
def test_xclient_bad_values(argument: str) -> None:
    name = argument.partition("=")[0]
    text = refused(parse_xclient, argument).text
    assert text.startswith(f"Bad XCLIENT {name} value")


@pytest.mark.parametrize(
    "argument", ["LOGIN=a+2", "LOGIN=a+zz", "HELO=a+2a", "NAME=a\x01b", "NAME=a\tb", "LOGIN=é"]
)
def test_xclient_bad_xtext(argument: str) -> None:
    assert "not xtext" in refused(parse_xclient, argument).text


def test_xclient_error_text_is_safe_and_bounded() -> None:
    text = refused(parse_xclient, "FOO\r\n\x00é" + "A" * 200 + "=1").text
    assert "\r" not in text and "\n" not in text and text.isascii()
    assert len(text) < 120


def test_xclient_login_may_contain_spaces() -> None:
    assert parse_xclient("LOGIN=first+20last") == {"LOGIN": "first last"}


# --- XFORWARD


def test_xforward_all_attributes() -> None:
    got = parse_xforward(
        "NAME=spike.porcupine.org ADDR=168.100.189.2 PORT=1234 PROTO=ESMTP"
        " HELO=spike.porcupine.org IDENT=2B6C41A3F SOURCE=REMOTE"
    )
    assert got == {
        "NAME": "spike.porcupine.org",
        "ADDR": "168.100.189.2",
        "PORT": "1234",
        "PROTO": "ESMTP",
        "HELO": "spike.porcupine.org",
        "IDENT": "2B6C41A3F",
        "SOURCE": "REMOTE",
    }


def test_xforward_case_ipv6_and_unavailable() -> None:
    got = parse_xforward("addr=IPV6:2001:db8::5 source=local proto=smtp name=[TEMPUNAVAIL]")
    assert got == {"ADDR": "2001:db8::5", "SOURCE": "LOCAL", "PROTO": "SMTP", "NAME": None}


def test_xforward_proto_is_any_protocol_token() -> None:
    # Deliberately wider than XCLIENT: the upstream forwards its own protocol name.
    assert parse_xforward("PROTO=esmtpsa") == {"PROTO": "ESMTPSA"}
    assert parse_xforward("PROTO=LMTP") == {"PROTO": "LMTP"}


def test_xforward_name_need_not_be_a_valid_hostname() -> None:
    assert parse_xforward("NAME=unknown_host!") == {"NAME": "unknown_host!"}


def test_xforward_duplicate_attribute_last_wins() -> None:
    assert parse_xforward("IDENT=a IDENT=b") == {"IDENT": "b"}


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("", "Syntax: XFORWARD attribute=value ..."),
        ("IDENT", "Bad XFORWARD syntax, attribute=value expected: IDENT"),
        ("LOGIN=alice", "Bad XFORWARD attribute name: LOGIN"),
        ("DESTADDR=192.0.2.1", "Bad XFORWARD attribute name: DESTADDR"),
        ("SOURCE=ELSEWHERE", "Bad XFORWARD SOURCE value: ELSEWHERE"),
        ("ADDR=999.1.1.1", "Bad XFORWARD ADDR value: 999.1.1.1"),
        ("PORT=70000", "Bad XFORWARD PORT value: 70000"),
        ("PROTO=E+20SMTP", "Bad XFORWARD PROTO value: E+20SMTP"),
        ("PROTO=" + "P" * 70, "Bad XFORWARD PROTO value: " + "P" * 64 + "..."),
        ("IDENT=a+20b", "Bad XFORWARD IDENT value: a+20b"),
        ("HELO=a+09", "Bad XFORWARD HELO value: a+09"),
        ("IDENT=a+", "Bad XFORWARD IDENT value, not xtext: a+"),
    ],
)
def test_xforward_errors(argument: str, expected: str) -> None:
    assert refused(parse_xforward, argument).text == expected


# --- Properties

hostnames = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,10}){1,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.ip_addresses().map(str),
    st.integers(0, 65535),
    hostnames,
    # [UNAVAILABLE] and [TEMPUNAVAIL] are Postfix's "no value" markers, decoded to None.
    st.text(
        st.characters(codec="ascii", exclude_categories=["Cc"]), min_size=1, max_size=40
    ).filter(lambda login: login.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]")),
)
def test_xclient_round_trip(addr: str, port: int, name: str, login: str) -> None:
    wire_addr = f"IPV6:{addr}" if ":" in addr else addr
    argument = (
        f"ADDR={xtext_encode(wire_addr)} PORT={port} NAME={xtext_encode(name)}"
        f" LOGIN={xtext_encode(login)}"
    )
    assert parse_xclient(argument) == {
        "ADDR": addr,
        "PORT": str(port),
        "NAME": name,
        "LOGIN": login,
    }


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80), st.booleans())
def test_only_xclient_error_on_arbitrary_input(argument: str, forward: bool) -> None:
    parse = parse_xforward if forward else parse_xclient
    try:
        result = parse(argument)
    except XclientError as exc:
        exc.reply.render()
        return
    allowed = XFORWARD_ATTRIBUTES if forward else XCLIENT_ATTRIBUTES
    assert result and set(result) <= allowed
