import itertools
from email import message_from_bytes
from email.policy import compat32
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.server.received import received_header, with_protocol

WHEN = 1_795_326_558.0  # Sun, 22 Nov 2026 05:49:18 +0000
BASE = {
    "helo": "client.example",
    "peer_host": "host.example",
    "peer_ip": "192.0.2.1",
    "peer_port": None,
    "by_host": "mx.example",
    "protocol": "ESMTP",
    "tls": None,
    "queue_id": "4XyZ",
    "recipient": None,
    "when": WHEN,
}


def header(**changes: object) -> str:
    arguments = {**BASE, **changes}
    return received_header(**arguments).decode()  # type: ignore[arg-type]


def assert_well_formed(field: bytes) -> None:
    """One header field: CRLF line ends only, folded lines, a parseable date after ';'."""
    assert field.startswith(b"Received: ")
    assert field.endswith(b"\r\n")
    assert field.count(b"\n") == field.count(b"\r\n") == field.count(b"\r")
    lines = field[:-2].split(b"\r\n")
    for line in lines[1:]:
        assert line[:1] in (b" ", b"\t") and line.strip()
    parsed = message_from_bytes(field + b"\r\n", policy=compat32)
    assert parsed.keys() == ["Received"]
    date = " ".join(field.decode().rsplit(";", 1)[1].split())
    assert parsedate_to_datetime(date).timestamp() == pytest.approx(WHEN, abs=1)
    # Comments must balance, or the rest of the field would be swallowed by one.
    depth = 0
    escaped = quoted = False
    for char in field.decode().replace("\r\n", ""):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"' and depth == 0:
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            assert depth >= 0
    assert depth == 0
    assert not quoted


PROTOCOLS = {
    # (lmtp, esmtp, tls, auth, utf8): keyword, per RFC 3848 and RFC 6531
    (False, False, False, False, False): "SMTP",
    (False, True, False, False, False): "ESMTP",
    (False, True, False, True, False): "ESMTPA",
    (False, True, True, False, False): "ESMTPS",
    (False, True, True, True, False): "ESMTPSA",
    (False, True, False, False, True): "UTF8SMTP",
    (False, True, False, True, True): "UTF8SMTPA",
    (False, True, True, False, True): "UTF8SMTPS",
    (False, True, True, True, True): "UTF8SMTPSA",
    (True, True, False, False, False): "LMTP",
    (True, True, False, True, False): "LMTPA",
    (True, True, True, False, False): "LMTPS",
    (True, True, True, True, False): "LMTPSA",
    (True, True, False, False, True): "UTF8LMTP",
    (True, True, False, True, True): "UTF8LMTPA",
    (True, True, True, False, True): "UTF8LMTPS",
    (True, True, True, True, True): "UTF8LMTPSA",
    # HELO over implicit TLS: no registered keyword says TLS without ESMTP.
    (False, False, True, False, False): "SMTP",
}


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=5)))
def test_with_protocol_every_combination(flags: tuple[bool, bool, bool, bool, bool]) -> None:
    lmtp, esmtp, tls, auth, utf8 = flags
    keyword = with_protocol(lmtp=lmtp, esmtp=esmtp, tls=tls, auth=auth, utf8=utf8)
    # LMTP always says LHLO, and AUTH or SMTPUTF8 are only possible after EHLO.
    canonical = (lmtp, esmtp or lmtp or auth or utf8, tls, auth, utf8)
    assert keyword == PROTOCOLS[canonical]


@pytest.mark.parametrize("keyword", sorted(set(PROTOCOLS.values())))
def test_every_protocol_keyword_formats(keyword: str) -> None:
    field = header(protocol=keyword, recipient="r@example.com")
    assert f" with {keyword} id 4XyZ" in field
    assert_well_formed(field.encode())


def test_full_example() -> None:
    field = header(
        peer_port=50123,
        protocol="ESMTPSA",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        recipient="rcpt@example.com",
    )
    assert field == (
        "Received: from client.example (host.example [192.0.2.1]) (port 50123)\r\n"
        "\tby mx.example (mailgate) with ESMTPSA id 4XyZ\r\n"
        "\t(TLSv1.3 TLS_AES_256_GCM_SHA384) for <rcpt@example.com>;\r\n"
        "\tSun, 22 Nov 2026 05:49:18 +0000\r\n"
    )
    assert all(len(line) <= 78 for line in field.split("\r\n"))


def test_short_header_stays_on_few_lines() -> None:
    assert header(peer_host=None) == (
        "Received: from client.example ([192.0.2.1]) by mx.example (mailgate)\r\n"
        "\twith ESMTP id 4XyZ; Sun, 22 Nov 2026 05:49:18 +0000\r\n"
    )


@pytest.mark.parametrize(
    ("peer_ip", "literal"),
    [
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "[IPv6:2001:db8::1]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
        ("::ffff:192.0.2.7", "[192.0.2.7]"),
        ("198.51.100.9", "[198.51.100.9]"),
    ],
)
def test_peer_address_literals(peer_ip: str, literal: str) -> None:
    field = header(peer_ip=peer_ip)
    assert f"(host.example {literal})" in field
    assert_well_formed(field.encode())


def test_unusable_peer_ip_leaves_it_out() -> None:
    field = header(peer_ip="not an ip", peer_host=None)
    assert field.startswith("Received: from client.example by mx.example")


def test_missing_helo_uses_the_address_literal() -> None:
    field = header(helo=None, peer_ip="2001:db8::5")
    assert field.startswith("Received: from [IPv6:2001:db8::5] (host.example [IPv6:2001:db8::5])")
    assert "helo=" not in field


def test_address_literal_helo_is_kept() -> None:
    assert header(helo="[192.0.2.1]").startswith("Received: from [192.0.2.1] (host.example")
    assert header(helo="[IPv6:2001:db8::1]").startswith("Received: from [IPv6:2001:db8::1] (")
    # An IPv6 literal without its tag is no address literal: keep it only as a comment.
    field = header(helo="[2001:db8::1]")
    assert field.startswith("Received: from [192.0.2.1] (host.example [192.0.2.1])")
    assert "(helo=[2001:db8::1])" in field


def test_international_helo_becomes_a_label() -> None:
    assert header(helo="bücher.example").startswith("Received: from xn--bcher-kva.example (")


@pytest.mark.parametrize(
    ("recipient", "expected"),
    [
        (None, None),
        ([], None),
        ("one@example.com", "one@example.com"),
        ("<one@example.com>", "one@example.com"),
        (["one@example.com"], "one@example.com"),
        (("a@example.com", "b@example.com"), None),
        (["a@example.com", "b@example.com", "c@example.com"], None),
    ],
)
def test_for_clause_only_for_exactly_one_recipient(recipient: object, expected: str | None) -> None:
    field = header(recipient=recipient)
    if expected is None:
        assert " for " not in field
    else:
        assert f" for <{expected}>;" in field.replace("\r\n\t", " ")
    assert_well_formed(field.encode())


def test_utf8_recipient_only_in_utf8_sessions() -> None:
    utf8 = received_header(**{**BASE, "protocol": "UTF8SMTP", "recipient": "jörg@例え.jp"})  # type: ignore[arg-type]
    assert "for <jörg@例え.jp>".encode() in utf8
    ascii_only = received_header(**{**BASE, "recipient": "jörg@例え.jp"})  # type: ignore[arg-type]
    assert ascii_only.isascii()
    assert b"for <j?rg@??.jp>" in ascii_only


@pytest.mark.parametrize(
    "helo",
    [
        "evil\r\nX-Injected: yes",
        "evil\nX-Injected: yes",
        "evil\rX-Injected: yes",
        "evil)\r\n\r\nbody",
        "a(b)c",
        "((((",
        "))))",
        "x\\",
        "x\\)\r\nX-Injected: 1",
        "nul\x00byte\x7fdel\x85nel",
        "line\u2028separator",
        "tab\there",
        "spaces  inside   ",
        "x" * 2000,
    ],
)
def test_helo_cannot_inject(helo: str) -> None:
    field = received_header(**{**BASE, "helo": helo})  # type: ignore[arg-type]
    assert_well_formed(field)
    assert b"X-Injected" not in field.replace(b"?X-Injected", b"")
    assert field.startswith(b"Received: from client.example") is False
    assert b"helo=" in field
    for line in field.split(b"\r\n"):
        assert len(line) <= 998


@pytest.mark.parametrize(
    ("recipient", "written"),
    [
        ('"a(b"@example.com', True),
        ('"john  doe"@example.com', True),
        ('"quote\\"inside"@example.com', True),
        ("Postmaster", True),
        ("user@[192.0.2.1]", True),
        ("a(b@example.com", False),
        ('"open@example.com', False),
        ("a b@example.com", False),
        ("a@b@c", False),
        ("", False),
    ],
)
def test_only_well_formed_recipients_are_written(recipient: str, written: bool) -> None:
    field = received_header(**{**BASE, "recipient": recipient})  # type: ignore[arg-type]
    assert_well_formed(field)
    assert (f"for <{recipient}>;".encode() in field.replace(b"\r\n ", b" ")) is written
    assert (b" for " in field.replace(b"\r\n\t", b" ")) is written


def test_recipient_and_tls_cannot_inject() -> None:
    field = received_header(
        **{**BASE, "recipient": "a@b>\r\nX-Injected: 1", "tls": "TLSv1.3)\r\nX: (y"}  # type: ignore[arg-type]
    )
    assert_well_formed(field)
    assert b"\r\nX" not in field


@settings(max_examples=200, deadline=None)
@given(
    helo=st.none() | st.text(max_size=80) | st.text(alphabet='a.()\\ \r\n[]:"', max_size=20),
    peer_host=st.none() | st.text(max_size=80),
    recipient=st.none()
    | st.text(max_size=80)
    | st.text(alphabet='ab@."()<>\\ \r\n;', max_size=20)
    | st.lists(st.text(max_size=20), max_size=3),
    tls=st.none() | st.text(max_size=40),
    port=st.none() | st.integers(min_value=0, max_value=65535),
    protocol=st.sampled_from(sorted(set(PROTOCOLS.values()))),
)
def test_any_client_text_gives_one_valid_field(
    helo: str | None,
    peer_host: str | None,
    recipient: str | list[str] | None,
    tls: str | None,
    port: int | None,
    protocol: str,
) -> None:
    field = received_header(
        helo=helo,
        peer_host=peer_host,
        peer_ip="2001:db8::1",
        peer_port=port,
        by_host="mx.example",
        protocol=protocol,
        tls=tls,
        queue_id="Q1",
        recipient=recipient,
        when=WHEN,
    )
    assert_well_formed(field)
    if not protocol.startswith("UTF8"):
        assert field.isascii()


def test_default_time_is_now() -> None:
    field = received_header(**{**BASE, "when": None})  # type: ignore[arg-type]
    date = " ".join(field.decode().rsplit(";", 1)[1].split())
    import time

    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5
