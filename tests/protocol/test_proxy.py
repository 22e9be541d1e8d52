"""PROXY protocol v1/v2 header parsing (mailgate.protocol.proxy)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.protocol.proxy import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    build_proxy_v1,
    build_proxy_v2,
    build_ssl_tlv,
    crc32c,
    parse_proxy_header,
)


def parse(data: bytes | bytearray, **kw: int) -> tuple[ProxyHeader, int]:
    result = parse_proxy_header(data, **kw)
    assert result is not None
    return result


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", size) + body


def tlv(t: int, value: bytes) -> bytes:
    return bytes((t,)) + struct.pack("!H", len(value)) + value


INET_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 54321, 25)


# --- CRC32C


def test_crc32c_check_value() -> None:
    # The standard check value of CRC-32C over the ASCII digits 1..9.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


# --- Version 1


def test_v1_tcp4() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 25\r\nEHLO x\r\n"
    header, used = parse(data)
    assert data[used:] == b"EHLO x\r\n"
    assert header == ProxyHeader(1, "PROXY", "TCP4", "192.0.2.1", 54321, "198.51.100.7", 25)
    assert not header.is_local


def test_v1_tcp6_is_normalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::1 ::FFFF:192.0.2.1 0 65535\r\n"
    header, used = parse(line)
    assert header.family == "TCP6"
    assert header.source_address == "2001:db8::1"
    assert header.destination_address == str(ipaddress.IPv6Address("::ffff:192.0.2.1"))
    assert (header.source_port, header.destination_port) == (0, 65535)
    assert used == len(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        b"PROXY UNKNOWN \xff\x00 anything at all\r\n",
    ],
)
def test_v1_unknown(line: bytes) -> None:
    header, used = parse(line + b"rest")
    assert used == len(line)
    assert header == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None)


def test_v1_longest_line_is_accepted() -> None:
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 107
    assert parse(line)[1] == 107


def test_v1_line_over_107_bytes_is_rejected() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    with pytest.raises(ProxyError, match="107"):
        parse_proxy_header(line)
    # Rejected as soon as 107 bytes are in without a CRLF, not later.
    with pytest.raises(ProxyError, match="107"):
        parse_proxy_header(line[:107])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP4  192.0.2.1 198.51.100.7 1 2\r\n", "single spaces"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n", "single spaces"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n", "single spaces"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n", "single spaces"),
        (b"PROXY TCP4\r\n", "single spaces"),
        (b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
        (b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
        (b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n", "protocol"),
        (b"PROXY UNKNOWNX\r\n", "protocol"),
        (b"PROXY \r\n", "protocol"),
        (b"PROXY TCP4 256.0.2.1 198.51.100.7 1 2\r\n", "source address"),
        (b"PROXY TCP4 192.0.2.01 198.51.100.7 1 2\r\n", "source address"),
        (b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n", "source address"),
        (b"PROXY TCP4 192.0.2.1 ::1 1 2\r\n", "destination address"),
        (b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", "source address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address"),
        (b"PROXY TCP6 ::1 :::1 1 2\r\n", "destination address"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 2\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 080\r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 2\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 +1 2\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 0x1 2\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 999999\r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7  2\r\n", "source port"),
        (b"PROXY TCP4 \xd9\xa1.0.2.1 198.51.100.7 1 2\r\n", "source address"),
    ],
)
def test_v1_invalid_lines(line: bytes, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse_proxy_header(line)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.1\n198.51.100.7 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n",
        b"PROXY TCP4 192.0.2.1\r198.51.100.7 1 2\r\n",
        b"PROXY UNKNOWN\r\r\n",
    ],
)
def test_v1_bare_cr_or_lf(data: bytes) -> None:
    with pytest.raises(ProxyError, match="bare CR or LF"):
        parse_proxy_header(data)


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"E",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"GET / HTTP/1.1\r\n",
        b"PROXX",
        b"proxy ",
        b"PROXY\t",
        b"PROXY F",
        b"PROXY TCP4X",
        b"PROXY TCP44",
        b"PROXY UNKNOWNX",
        b"PROXY FOO ",
        b"PROXY TCP\r",
        b"\r\n\r\n\x00\r\nQUIX",
        b"\r\n\r\n\x01",
        b"\r\nPROXY",
    ],
)
def test_rejects_non_proxy_input_from_the_first_bytes(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_proxy_header(data)


def test_empty_input_needs_more() -> None:
    assert parse_proxy_header(b"") is None


V1_HEADERS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 25\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN whatever 1 2 3\r\n",
]


@pytest.mark.parametrize("data", V1_HEADERS)
def test_v1_every_prefix_needs_more(data: bytes) -> None:
    for i in range(len(data)):
        assert parse_proxy_header(data[:i]) is None, data[:i]
    assert parse(data)[1] == len(data)


# --- Version 2: families


def test_v2_tcp4() -> None:
    data = v2(0x21, 0x11, INET_BLOCK)
    header, used = parse(data + b"EHLO")
    assert used == len(data) == 28
    assert header == ProxyHeader(2, "PROXY", "TCP4", "192.0.2.1", 54321, "198.51.100.7", 25)


def test_v2_udp4() -> None:
    header, _ = parse(v2(0x21, 0x12, INET_BLOCK))
    assert header.family == "UDP4"
    assert header.source_address == "192.0.2.1"


@pytest.mark.parametrize(("fam", "name"), [(0x21, "TCP6"), (0x22, "UDP6")])
def test_v2_inet6(fam: int, name: str) -> None:
    src = ipaddress.IPv6Address("2001:db8::1")
    dst = ipaddress.IPv6Address("::ffff:192.0.2.9")
    body = src.packed + dst.packed + struct.pack("!HH", 1, 2)
    header, used = parse(v2(0x21, fam, body))
    assert used == 16 + 36
    assert header.family == name
    assert header.source_address == "2001:db8::1"
    assert header.destination_address == str(dst)
    assert (header.source_port, header.destination_port) == (1, 2)


@pytest.mark.parametrize("fam", [0x31, 0x32])
def test_v2_unix(fam: int) -> None:
    body = b"/run/client.sock".ljust(108, b"\x00") + b"/run/mailgate.sock".ljust(108, b"\x00")
    header, used = parse(v2(0x21, fam, body))
    assert used == 16 + 216
    assert header.family == "UNIX"
    assert header.source_address == "/run/client.sock"
    assert header.destination_address == "/run/mailgate.sock"
    assert header.source_port is None and header.destination_port is None


def test_v2_unix_abstract_and_full_length_paths() -> None:
    full = b"/" + b"p" * 107
    body = b"\x00abstract\x00name".ljust(108, b"\x00") + full
    header, _ = parse(v2(0x21, 0x31, body))
    assert header.source_address == "\x00abstract\x00name"
    assert header.destination_address == full.decode()


def test_v2_unix_non_utf8_path_survives() -> None:
    body = b"/tmp/\xff".ljust(108, b"\x00") * 2
    header, _ = parse(v2(0x21, 0x31, body))
    assert header.source_address is not None
    assert header.source_address.encode("utf-8", "surrogateescape") == b"/tmp/\xff"


def test_v2_local_has_no_addresses() -> None:
    header, used = parse(v2(0x20, 0x00, b""))
    assert used == 16
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, None, None)
    assert header.is_local


def test_v2_local_skips_whatever_block_it_carries() -> None:
    # The specification tells the receiver to ignore the family and block of LOCAL.
    header, used = parse(v2(0x20, 0x11, INET_BLOCK + b"\x99"))
    assert used == 16 + 13
    assert (header.command, header.family, header.source_address) == ("LOCAL", "TCP4", None)
    header, _ = parse(v2(0x20, 0xFF, b"junk"))
    assert (header.command, header.family) == ("LOCAL", "UNKNOWN")


@pytest.mark.parametrize("fam", [0x00, 0x01, 0x02, 0x10, 0x20, 0x30])
def test_v2_unspec_family_or_transport_is_unknown(fam: int) -> None:
    header, used = parse(v2(0x21, fam, b"ignored"))
    assert used == 16 + 7
    assert header == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, None, None)


# --- Version 2: TLVs


def test_v2_tlvs_in_order_with_decoded_views() -> None:
    ssl = build_ssl_tlv(
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN,
        0,
        version="TLSv1.3",
        cn="client.example",
        cipher="TLS_AES_256_GCM_SHA384",
        sig_alg="RSA-SHA256",
        key_alg="RSA2048",
    )
    tlvs = [
        (PP2_TYPE_ALPN, b"smtp"),
        (PP2_TYPE_AUTHORITY, "mx.exämple".encode()),
        (PP2_TYPE_NOOP, b""),
        (PP2_TYPE_UNIQUE_ID, b"\x00\x01" * 64),
        ssl,
        (PP2_TYPE_NETNS, b"blue"),
        (0xE0, b"custom"),
    ]
    header, _ = parse(build_proxy_v2("192.0.2.1", 1, "192.0.2.2", 2, tlvs=tlvs))
    assert header.tlvs == tuple(tlvs)
    assert header.alpn == b"smtp"
    assert header.authority == "mx.exämple"
    assert header.unique_id == b"\x00\x01" * 64
    assert header.netns == "blue"
    assert header.tlv(0xE0) == b"custom"
    assert header.tlv(0xE1) is None
    s = header.ssl
    assert s is not None
    assert (s.client_ssl, s.client_cert_conn, s.client_cert_sess) == (True, True, False)
    assert s.verify == 0 and s.verified
    assert s.version == "TLSv1.3"
    assert s.cn == "client.example"
    assert s.cipher == "TLS_AES_256_GCM_SHA384"
    assert (s.sig_alg, s.key_alg) == ("RSA-SHA256", "RSA2048")
    assert [t for t, _ in s.tlvs] == [0x21, 0x22, 0x23, 0x24, 0x25]


def test_v2_without_tlvs_has_empty_views() -> None:
    header, _ = parse(v2(0x21, 0x11, INET_BLOCK))
    assert header.tlvs == ()
    assert header.alpn is None and header.authority is None
    assert header.unique_id is None and header.ssl is None and header.netns is None


def test_v2_ssl_failed_verification_and_unknown_subtlv() -> None:
    raw = bytes((PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS,)) + (1).to_bytes(4, "big")
    raw += tlv(0x2F, b"future") + tlv(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.2")
    header, _ = parse(v2(0x21, 0x11, INET_BLOCK + tlv(PP2_TYPE_SSL, raw)))
    s = header.ssl
    assert s is not None
    assert s.client_cert_sess and not s.client_cert_conn and not s.verified
    assert s.verify == 1
    assert s.version == "TLSv1.2" and s.cn is None
    assert s.tlvs == ((0x2F, b"future"), (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.2"))


def test_v2_ssl_tlv_without_sub_tlvs() -> None:
    header, _ = parse(build_proxy_v2("192.0.2.1", 1, "192.0.2.2", 2, tlvs=[build_ssl_tlv(0)]))
    assert header.ssl is not None
    assert not header.ssl.client_ssl and header.ssl.version is None


def test_v2_crc32c_right() -> None:
    data = build_proxy_v2("2001:db8::1", 1, "2001:db8::2", 2, tlvs=[(1, b"h2")], crc=True)
    header, used = parse(data)
    assert used == len(data)
    assert [t for t, _ in header.tlvs] == [PP2_TYPE_ALPN, PP2_TYPE_CRC32C]
    # Check the builder against an independent computation.
    value = header.tlv(PP2_TYPE_CRC32C)
    assert value is not None
    assert int.from_bytes(value, "big") == crc32c(data[:-4] + b"\x00" * 4)


def test_v2_crc32c_not_last_is_checked_too() -> None:
    body = INET_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00" * 4) + tlv(PP2_TYPE_NOOP, b"pad")
    data = v2(0x21, 0x11, body)
    good = crc32c(data).to_bytes(4, "big")
    at = 16 + 12 + 3
    data = data[:at] + good + data[at + 4 :]
    assert parse(data)[0].tlv(PP2_TYPE_CRC32C) == good


@pytest.mark.parametrize("position", [16, 20, 27, 31, -3, -1])
def test_v2_crc32c_wrong(position: int) -> None:
    # Addresses, ports, another TLV's value, the CRC itself.
    data = bytearray(build_proxy_v2("192.0.2.1", 1, "192.0.2.2", 2, tlvs=[(1, b"xy")], crc=True))
    data[position] ^= 0x01
    with pytest.raises(ProxyError, match="CRC32C mismatch"):
        parse_proxy_header(bytes(data))


def test_v2_crc32c_mismatch_message() -> None:
    data = bytearray(build_proxy_v2("192.0.2.1", 1, "192.0.2.2", 2, crc=True))
    data[20] ^= 0xFF  # inside the source address: only the CRC can notice
    with pytest.raises(ProxyError, match="CRC32C mismatch"):
        parse_proxy_header(bytes(data))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (INET_BLOCK + b"\x01", "truncated TLV"),
        (INET_BLOCK + b"\x01\x00", "truncated TLV"),
        (INET_BLOCK + b"\x01\x00\x05abcd", "claims 5 bytes"),
        (INET_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00"), "CRC32C TLV must be 4"),
        (INET_BLOCK + tlv(PP2_TYPE_CRC32C, b"\0" * 4) * 2, "more than one CRC32C"),
        (INET_BLOCK + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129), "at most 128"),
        (INET_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"\xff\xfe"), "not valid UTF-8"),
        (INET_BLOCK + tlv(PP2_TYPE_NETNS, b"\xff"), "not US-ASCII"),
        (INET_BLOCK + tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00"), "at least 5 bytes"),
        (INET_BLOCK + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0\x21\x00"), "truncated SSL sub-TLV"),
        (INET_BLOCK + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0\x21\x00\x09TLS"), "claims 9 bytes"),
        (
            INET_BLOCK + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0" + tlv(PP2_SUBTYPE_SSL_CN, b"\xc3")),
            "SSL cn sub-TLV is not valid UTF-8",
        ),
    ],
)
def test_v2_malformed_tlvs(body: bytes, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse_proxy_header(v2(0x21, 0x11, body))


def test_v2_unique_id_of_128_bytes_is_fine() -> None:
    header, _ = parse(v2(0x21, 0x11, INET_BLOCK + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 128)))
    assert header.unique_id == b"u" * 128


# --- Version 2: invalid headers


@pytest.mark.parametrize(
    ("ver_cmd", "message"),
    [(0x11, "version 1"), (0x31, "version 3"), (0x01, "version 0"), (0x22, "command 0x2")],
)
def test_v2_bad_version_or_command(ver_cmd: int, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse_proxy_header(v2(ver_cmd, 0x11, INET_BLOCK))
    # Decided on the 13th byte already.
    with pytest.raises(ProxyError, match=message):
        parse_proxy_header(V2_SIGNATURE + bytes((ver_cmd,)))


@pytest.mark.parametrize(
    ("fam", "message"),
    [
        (0x41, "address family 0x4"),
        (0xF1, "address family 0xf"),
        (0x13, "transport"),
        (0x1F, "transport"),
    ],
)
def test_v2_bad_family(fam: int, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse_proxy_header(v2(0x21, fam, INET_BLOCK))
    with pytest.raises(ProxyError, match=message):
        parse_proxy_header(V2_SIGNATURE + bytes((0x21, fam)))


@pytest.mark.parametrize(
    ("fam", "block"), [(0x11, 12), (0x12, 12), (0x21, 36), (0x22, 36), (0x31, 216), (0x32, 216)]
)
def test_v2_address_block_too_short(fam: int, block: int) -> None:
    parse(v2(0x21, fam, b"\x01" * block if fam < 0x30 else b"/" * block))
    with pytest.raises(ProxyError, match=f"needs {block}"):
        parse_proxy_header(v2(0x21, fam, b"\x01" * (block - 1)))


def test_v2_length_limit() -> None:
    big = INET_BLOCK + tlv(PP2_TYPE_NOOP, b"\x00" * (4096 - 12 - 3))
    assert parse(v2(0x21, 0x11, big))[1] == 16 + 4096
    with pytest.raises(ProxyError, match="exceeds the limit of 4096"):
        parse_proxy_header(v2(0x21, 0x11, big + b"\x00"))
    # The limit is enforced from the length field alone, before the body arrives.
    with pytest.raises(ProxyError, match="limit of 100"):
        parse_proxy_header(v2(0x21, 0x11, b"", length=101), max_length=100)
    assert parse_proxy_header(v2(0x21, 0x11, b"", length=100), max_length=100) is None


V2_HEADERS = [
    v2(0x21, 0x11, INET_BLOCK),
    v2(0x20, 0x00, b""),
    build_proxy_v2("2001:db8::1", 1, "2001:db8::2", 2, tlvs=[build_ssl_tlv(cn="x")], crc=True),
    build_proxy_v2("/a", None, "/b", None, family="UNIX", tlvs=[(PP2_TYPE_ALPN, b"h2")]),
]


@pytest.mark.parametrize("data", V2_HEADERS)
def test_v2_every_prefix_needs_more(data: bytes) -> None:
    for i in range(len(data)):
        assert parse_proxy_header(data[:i]) is None, i
    header, used = parse(data + b"\r\nEHLO")
    assert used == len(data)
    assert parse(bytearray(data))[0] == header


# --- Builders


def test_build_v1() -> None:
    assert build_proxy_v1() == b"PROXY UNKNOWN\r\n"
    assert (
        build_proxy_v1("192.0.2.1", 1, "192.0.2.2", 2) == b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
    )
    assert build_proxy_v1("2001:DB8::1", 1, "::1", 2) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"


@pytest.mark.parametrize(
    "args",
    [
        ("192.0.2.1", 1, "::1", 2),
        ("192.0.2.1", 1, None, None),
        ("192.0.2.1", 65536, "192.0.2.2", 2),
        ("192.0.2.1", 1, "192.0.2.2", -1),
        ("192.0.2.1", None, "192.0.2.2", 2),
        ("not-an-ip", 1, "192.0.2.2", 2),
    ],
)
def test_build_v1_rejects_bad_arguments(
    args: tuple[str | None, int | None, str | None, int | None],
) -> None:
    with pytest.raises(ProxyError):
        build_proxy_v1(*args)


def test_build_v2_variants() -> None:
    assert build_proxy_v2() == v2(0x21, 0x00, b"")
    assert build_proxy_v2(command="LOCAL") == v2(0x20, 0x00, b"")
    assert build_proxy_v2("192.0.2.1", 54321, "198.51.100.7", 25) == v2(0x21, 0x11, INET_BLOCK)
    assert build_proxy_v2("192.0.2.1", 54321, "198.51.100.7", 25, family="UDP4") == v2(
        0x21, 0x12, INET_BLOCK
    )
    header, _ = parse(build_proxy_v2("::1", 5, "::2", 6, family="UDP6"))
    assert (header.family, header.source_address, header.destination_port) == ("UDP6", "::1", 6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": "HEALTH"},
        {"family": "TCP7", "source_address": "192.0.2.1"},
        {"family": "TCP6", "source_address": "192.0.2.1", "destination_address": "::1"},
        {"source_address": "192.0.2.1", "destination_address": "192.0.2.2", "source_port": 1},
        {"family": "UNIX", "source_address": "/" * 109},
        {"tlvs": [(256, b"")]},
        {"tlvs": [(1, b"x" * 70000)]},
    ],
)
def test_build_v2_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ProxyError):
        build_proxy_v2(**kwargs)  # type: ignore[arg-type]


# --- Properties

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(
    st.tuples(
        st.sampled_from([PP2_TYPE_ALPN, PP2_TYPE_NOOP, 0x06, 0x31, 0xE0, 0xEF, 0xFF]),
        st.binary(max_size=40),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports)
def test_v1_round_trip(addresses: tuple[str, str], sport: int, dport: int) -> None:
    src, dst = addresses
    data = build_proxy_v1(src, sport, dst, dport)
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None
    header, used = parse(data + b"EHLO x\r\n")
    assert used == len(data) <= 107
    assert (header.source_address, header.destination_address) == (src, dst)
    assert (header.source_port, header.destination_port) == (sport, dport)
    assert header.family == ("TCP4" if ":" not in src else "TCP6")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.tuples(st.sampled_from(["TCP4", "UDP4"]), ipv4, ipv4),
        st.tuples(st.sampled_from(["TCP6", "UDP6"]), ipv6, ipv6),
    ),
    ports,
    ports,
    tlv_lists,
    st.booleans(),
)
def test_v2_round_trip(
    addresses: tuple[str, str, str],
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    crc: bool,
) -> None:
    family, src, dst = addresses
    data = build_proxy_v2(src, sport, dst, dport, family=family, tlvs=tlvs, crc=crc)
    for cut in range(0, len(data), 7):
        assert parse_proxy_header(data[:cut]) is None
    header, used = parse(data + b"more")
    assert used == len(data)
    assert header.family == family
    assert (header.source_address, header.source_port) == (src, sport)
    assert (header.destination_address, header.destination_port) == (dst, dport)
    sent = tuple(tlvs)
    assert header.tlvs[: len(sent)] == sent
    assert len(header.tlvs) == len(sent) + crc


@settings(max_examples=100, deadline=None)
@given(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30),
)
def test_v2_unix_round_trip(src: str, dst: str) -> None:
    header, _ = parse(build_proxy_v2(src, None, dst, None, family="UNIX"))
    assert (header.source_address, header.destination_address) == (src, dst)


def _mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf)


arbitrary_input = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.builds(
        lambda fam, rest: b"PROXY " + fam + b" " + rest,
        st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN"]),
        st.binary(max_size=110),
    ),
    st.builds(
        _mutated,
        st.sampled_from(V1_HEADERS + V2_HEADERS),
        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4),
    ),
    st.builds(
        lambda data, cut: data[:cut],
        st.sampled_from(V2_HEADERS),
        st.integers(0, 300),
    ),
)


@settings(max_examples=1500, deadline=None)
@given(arbitrary_input, st.sampled_from([4096, 64, 0]))
def test_never_raises_anything_but_proxy_error(data: bytes, max_length: int) -> None:
    try:
        result = parse_proxy_header(data, max_length=max_length)
    except ProxyError:
        return
    if result is not None:
        header, used = result
        assert 0 < used <= len(data)
        # Every view of a parsed header is usable without further errors.
        _ = (header.alpn, header.authority, header.unique_id, header.netns, header.ssl)
