"""PROXY protocol headers, versions 1 (text) and 2 (binary), as sent by HAProxy and friends.

A load balancer that relays TCP connections prepends one header so the server learns the
real client address. :func:`parse_proxy_header` is incremental in the sans-IO sense: feed
it the bytes received so far and it answers with a header and how many bytes it used,
``None`` while the bytes are a plausible but unfinished header, or raises
:class:`ProxyError`. It decides from the very first bytes whether the peer speaks PROXY
at all, so a server can drop a client that connects directly without waiting for a
timeout.

Leniency, where the specification allows the receiver a choice:

- v2 ``LOCAL`` (health checks from the proxy itself) and any family or transport that is
  ``UNSPEC`` report no addresses; the rest of the block is skipped unparsed, since the
  specification tells receivers to ignore it. For ``LOCAL`` the family byte is ignored too.
- v1 ``UNKNOWN`` accepts anything up to the CRLF.

:func:`build_proxy_v1` and :func:`build_proxy_v2` produce headers, for tests and for
clients that must speak PROXY to an upstream.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyHeader",
    "ProxySSL",
    "build_proxy_v1",
    "build_proxy_v2",
    "build_ssl_tlv",
    "crc32c",
    "parse_proxy_header",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# The longest v1 line, CRLF included ("PROXY UNKNOWN" plus two full IPv6 endpoints).
V1_MAX_LENGTH = 107

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_UNIQUE_ID_MAX = 128
_V2_FIXED = 16  # signature, version/command, family, length
_UNIX_PATH = 108

_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0x0, 0x1, 0x2
_FAMILY_NAMES = {
    (_AF_INET, _T_STREAM): "TCP4",
    (_AF_INET, _T_DGRAM): "UDP4",
    (_AF_INET6, _T_STREAM): "TCP6",
    (_AF_INET6, _T_DGRAM): "UDP6",
    (_AF_UNIX, _T_STREAM): "UNIX",
    (_AF_UNIX, _T_DGRAM): "UNIX",
}
_FAMILY_BYTES = {"TCP4": 0x11, "UDP4": 0x12, "TCP6": 0x21, "UDP6": 0x22, "UNIX": 0x31}
_ADDRESS_BLOCK = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 2 * _UNIX_PATH}

_V1_FAMILIES = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


# --- CRC32C (Castagnoli), reflected polynomial 0x82F63B78, as the v2 CRC TLV uses.


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    table = _CRC32C_TABLE
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --- Parsed values


@dataclass(frozen=True, slots=True)
class ProxySSL:
    """The PP2_TYPE_SSL TLV: how the client reached the proxy over TLS.

    ``client`` holds the PP2_CLIENT_* bits, ``verify`` is zero when the client presented a
    certificate that the proxy verified successfully. String sub-TLVs the proxy did not
    send are ``None``; ``tlvs`` keeps every sub-TLV in order, known or not.
    """

    client: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client_ssl(self) -> bool:
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def client_cert_conn(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def client_cert_sess(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def verified(self) -> bool:
        """A client certificate was presented on this connection and verified."""
        return self.client_cert_conn and self.verify == 0


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header.

    ``family`` is ``TCP4``, ``TCP6``, ``UDP4``, ``UDP6``, ``UNIX`` or ``UNKNOWN``; addresses
    and ports are ``None`` for ``UNKNOWN``, for v2 ``LOCAL`` and (ports only) for ``UNIX``.
    IP addresses are in the :mod:`ipaddress` normal form. ``tlvs`` are the v2 TLVs in the
    order sent, CRC and NOOP included.
    """

    version: int
    command: str
    family: str
    source_address: str | None
    source_port: int | None
    destination_address: str | None
    destination_port: int | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of this type, or ``None``."""
        for t, value in self.tlvs:
            if t == type_:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        """The ALPN protocol the client negotiated with the proxy, e.g. ``b"h2"``."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """The host name the client asked for (TLS SNI), decoded as UTF-8."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else _utf8(value, "authority TLV")

    @property
    def unique_id(self) -> bytes | None:
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        value = self.tlv(PP2_TYPE_NETNS)
        return None if value is None else _ascii(value, "netns TLV")

    @property
    def ssl(self) -> ProxySSL | None:
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _decode_ssl(value)

    @property
    def is_local(self) -> bool:
        """The proxy opened this connection for itself: use the real peer address."""
        return self.command == "LOCAL"


# --- Parsing


def parse_proxy_header(
    data: bytes | bytearray, *, max_length: int = 4096
) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header at the start of ``data``.

    Returns ``(header, bytes_consumed)``, or ``None`` when ``data`` is a proper prefix of
    a header that may still turn out valid. Raises :class:`ProxyError` as soon as the bytes
    cannot be one. ``max_length`` bounds the v2 length field (the bytes after the fixed
    16), so the caller never buffers more than ``16 + max_length`` bytes.
    """
    if not data:
        return None
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(data, max_length)
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return _parse_v1(data)
    raise ProxyError(f"not a PROXY protocol header: starts with {bytes(data[:16])!r}")


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        _check_v1_prefix(data)
        return None
    line = bytes(data[:end])
    if b"\n" in line or b"\r" in line:
        raise ProxyError("PROXY v1 line contains a bare CR or LF")
    parts = line.split(b" ")
    family = parts[1] if len(parts) > 1 else b""
    if family == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None), end + 2
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"PROXY v1 unknown protocol {family!r}")
    if len(parts) != 6:
        raise ProxyError(
            "PROXY v1 line must be 'PROXY <proto> <src> <dst> <sport> <dport>' "
            "separated by single spaces"
        )
    version = 4 if family == b"TCP4" else 6
    src = _v1_address(parts[2], version, "source")
    dst = _v1_address(parts[3], version, "destination")
    sport = _v1_port(parts[4], "source")
    dport = _v1_port(parts[5], "destination")
    header = ProxyHeader(1, "PROXY", family.decode("ascii"), src, sport, dst, dport)
    return header, end + 2


def _check_v1_prefix(data: bytes | bytearray) -> None:
    """Reject an unfinished v1 line early when no continuation could make it valid."""
    if len(data) >= V1_MAX_LENGTH:
        raise ProxyError(f"PROXY v1 line has no CRLF within {V1_MAX_LENGTH} bytes")
    line = bytes(data)
    # A CR may only be the last byte (its LF not received yet); a LF here is always bare.
    if b"\n" in line or b"\r" in line[:-1]:
        raise ProxyError("PROXY v1 line contains a bare CR or LF")
    if len(line) <= len(V1_PREFIX):
        return
    rest = line[len(V1_PREFIX) :].rstrip(b"\r")
    token, sep, _ = rest.partition(b" ")
    complete = bool(sep) or line.endswith(b"\r")
    if complete:
        if token not in _V1_FAMILIES:
            raise ProxyError(f"PROXY v1 unknown protocol {token!r}")
    elif not any(f.startswith(token) for f in _V1_FAMILIES):
        raise ProxyError(f"PROXY v1 unknown protocol {token!r}")


def _v1_address(raw: bytes, version: int, which: str) -> str:
    try:
        text = raw.decode("ascii")
        address: ipaddress.IPv4Address | ipaddress.IPv6Address
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyError(f"PROXY v1 bad IPv{version} {which} address {raw!r}") from None
    if "%" in text:
        raise ProxyError(f"PROXY v1 {which} address must not carry a scope: {raw!r}")
    return str(address)


def _v1_port(raw: bytes, which: str) -> int:
    if not _V1_PORT.fullmatch(raw) or int(raw) > 65535:
        raise ProxyError(f"PROXY v1 bad {which} port {raw!r}")
    return int(raw)


def _parse_v2(data: bytes | bytearray, max_length: int) -> tuple[ProxyHeader, int] | None:
    have = len(data)
    if have <= 12:
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"PROXY v2 unsupported version {ver_cmd >> 4}")
    if ver_cmd & 0x0F not in (0, 1):
        raise ProxyError(f"PROXY v2 unknown command {ver_cmd & 0x0F:#x}")
    local = ver_cmd & 0x0F == 0
    if have > 13 and not local:
        _v2_family(data[13])
    if have < _V2_FIXED:
        return None
    length = struct.unpack_from("!H", data, 14)[0]
    if length > max_length:
        raise ProxyError(f"PROXY v2 header length {length} exceeds the limit of {max_length}")
    total = _V2_FIXED + length
    if have < total:
        return None
    if local:
        fam, proto = data[13] >> 4, data[13] & 0x0F
        family = _FAMILY_NAMES.get((fam, proto), "UNKNOWN")
        return ProxyHeader(2, "LOCAL", family, None, None, None, None), total
    fam, proto = _v2_family(data[13])
    if fam == _AF_UNSPEC or proto == _T_UNSPEC:
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, None, None), total
    header_bytes = bytes(data[:total])
    block = _ADDRESS_BLOCK[fam]
    if length < block:
        raise ProxyError(
            f"PROXY v2 address block is {length} bytes, {_FAMILY_NAMES[fam, proto]} needs {block}"
        )
    body = header_bytes[_V2_FIXED:]
    src: str | None
    dst: str | None
    sport: int | None
    dport: int | None
    if fam == _AF_INET:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack_from("!HH", body, 8)
    elif fam == _AF_INET6:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack_from("!HH", body, 32)
    else:
        src = _unix_path(body[:_UNIX_PATH])
        dst = _unix_path(body[_UNIX_PATH:block])
        sport = dport = None
    tlvs = _parse_tlvs(header_bytes, _V2_FIXED + block)
    header = ProxyHeader(2, "PROXY", _FAMILY_NAMES[fam, proto], src, sport, dst, dport, tlvs)
    return header, total


def _v2_family(byte: int) -> tuple[int, int]:
    fam, proto = byte >> 4, byte & 0x0F
    if fam > _AF_UNIX:
        raise ProxyError(f"PROXY v2 unknown address family {fam:#x}")
    if proto > _T_DGRAM:
        raise ProxyError(f"PROXY v2 unknown transport protocol {proto:#x}")
    return fam, proto


def _unix_path(raw: bytes) -> str:
    # A leading NUL marks a Linux abstract socket, whose name may contain NULs; it keeps the
    # NUL and loses only the padding. A filesystem path ends at its first NUL.
    path = b"\x00" + raw[1:].rstrip(b"\x00") if raw[:1] == b"\x00" else raw.partition(b"\x00")[0]
    # The same decoding the OS module applies to file names on POSIX.
    return path.decode("utf-8", "surrogateescape")


def _parse_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = _split_tlvs(header, offset, "TLV")
    crc_fields = [(i, value) for i, (t, value) in enumerate(tlvs) if t == PP2_TYPE_CRC32C]
    if len(crc_fields) > 1:
        raise ProxyError("PROXY v2 header has more than one CRC32C TLV")
    for t, value in tlvs:
        _check_tlv(t, value)
    if crc_fields:
        _check_crc(header, offset, tlvs, crc_fields[0][0])
    return tlvs


def _split_tlvs(data: bytes, offset: int, what: str) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    end = len(data)
    while offset < end:
        if end - offset < 3:
            raise ProxyError(f"PROXY v2 truncated {what}: {end - offset} stray bytes at the end")
        t = data[offset]
        size = (data[offset + 1] << 8) | data[offset + 2]
        offset += 3
        if offset + size > end:
            raise ProxyError(
                f"PROXY v2 {what} type {t:#04x} claims {size} bytes, only {end - offset} remain"
            )
        tlvs.append((t, data[offset : offset + size]))
        offset += size
    return tuple(tlvs)


def _check_tlv(t: int, value: bytes) -> None:
    """Decode the TLVs mailgate exposes, so a parsed header's properties never raise."""
    if t == PP2_TYPE_CRC32C and len(value) != 4:
        raise ProxyError(f"PROXY v2 CRC32C TLV must be 4 bytes, got {len(value)}")
    elif t == PP2_TYPE_UNIQUE_ID and len(value) > _UNIQUE_ID_MAX:
        raise ProxyError(f"PROXY v2 unique ID TLV is {len(value)} bytes, at most 128 allowed")
    elif t == PP2_TYPE_AUTHORITY:
        _utf8(value, "authority TLV")
    elif t == PP2_TYPE_NETNS:
        _ascii(value, "netns TLV")
    elif t == PP2_TYPE_SSL:
        _decode_ssl(value)


def _check_crc(
    header: bytes, tlv_start: int, tlvs: tuple[tuple[int, bytes], ...], index: int
) -> None:
    # Locate the CRC value by walking the TLV sizes again: the sum is exact, no search.
    offset = tlv_start + sum(3 + len(v) for _, v in tlvs[:index]) + 3
    sent = int.from_bytes(header[offset : offset + 4], "big")
    zeroed = header[:offset] + b"\x00\x00\x00\x00" + header[offset + 4 :]
    actual = crc32c(zeroed)
    if sent != actual:
        raise ProxyError(
            f"PROXY v2 CRC32C mismatch: header says {sent:#010x}, computed {actual:#010x}"
        )


_SSL_STRINGS = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "cn",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
}


def _decode_ssl(value: bytes) -> ProxySSL:
    if len(value) < 5:
        raise ProxyError(f"PROXY v2 SSL TLV must be at least 5 bytes, got {len(value)}")
    client = value[0]
    verify = int.from_bytes(value[1:5], "big")
    subs = _split_tlvs(value, 5, "SSL sub-TLV")
    strings: dict[int, str] = {}
    for t, raw in subs:
        name = _SSL_STRINGS.get(t)
        if name is not None and t not in strings:
            # CN is UTF-8 per the specification; the others are US-ASCII, a subset.
            strings[t] = _utf8(raw, f"SSL {name} sub-TLV")
    return ProxySSL(
        client,
        verify,
        version=strings.get(PP2_SUBTYPE_SSL_VERSION),
        cn=strings.get(PP2_SUBTYPE_SSL_CN),
        cipher=strings.get(PP2_SUBTYPE_SSL_CIPHER),
        sig_alg=strings.get(PP2_SUBTYPE_SSL_SIG_ALG),
        key_alg=strings.get(PP2_SUBTYPE_SSL_KEY_ALG),
        tlvs=subs,
    )


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyError(f"PROXY v2 {what} is not valid UTF-8") from None


def _ascii(value: bytes, what: str) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError(f"PROXY v2 {what} is not US-ASCII") from None


# --- Building


def _ip(text: str, which: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad {which} address {text!r}") from None


def _port(port: int | None, which: str) -> int:
    if port is None or not 0 <= port <= 65535:
        raise ProxyError(f"bad {which} port {port!r}")
    return port


def build_proxy_v1(
    source_address: str | None = None,
    source_port: int | None = None,
    destination_address: str | None = None,
    destination_port: int | None = None,
) -> bytes:
    """A v1 line for a TCP connection, or ``PROXY UNKNOWN`` when no addresses are given.
    The family (TCP4 or TCP6) follows the addresses, which must both be of one version."""
    if source_address is None and destination_address is None:
        return b"PROXY UNKNOWN\r\n"
    if source_address is None or destination_address is None:
        raise ProxyError("give both addresses, or neither for PROXY UNKNOWN")
    src = _ip(source_address, "source")
    dst = _ip(destination_address, "destination")
    if src.version != dst.version:
        raise ProxyError("source and destination addresses must be of the same IP version")
    sport = _port(source_port, "source")
    dport = _port(destination_port, "destination")
    return f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def build_proxy_v2(
    source_address: str | None = None,
    source_port: int | None = None,
    destination_address: str | None = None,
    destination_port: int | None = None,
    *,
    command: str = "PROXY",
    family: str | None = None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header.

    ``family`` defaults to TCP4/TCP6 after the addresses, or UNKNOWN (AF_UNSPEC) when none
    are given; pass ``UDP4``/``UDP6``, or ``UNIX`` with paths as addresses and no ports.
    ``command="LOCAL"`` sends no addresses. With ``crc`` a CRC32C TLV is appended and
    filled in.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ProxyError(f"unknown command {command!r}")
    if command == "LOCAL" or (family is None and source_address is None):
        family = "UNKNOWN"
    if family is None:
        family = f"TCP{_ip(source_address or '', 'source').version}"
    body = _v2_address_block(
        family, source_address, source_port, destination_address, destination_port
    )
    tlv_list = list(tlvs)
    if crc:
        tlv_list.append((PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"))
    for t, value in tlv_list:
        if not 0 <= t <= 0xFF or len(value) > 0xFFFF:
            raise ProxyError(f"TLV type {t!r} or length {len(value)} out of range")
        body += bytes((t,)) + struct.pack("!H", len(value)) + bytes(value)
    if len(body) > 0xFFFF:
        raise ProxyError("PROXY v2 header too long")
    ver_cmd = 0x21 if command == "PROXY" else 0x20
    fam_byte = _FAMILY_BYTES.get(family, 0x00)
    header = V2_SIGNATURE + bytes((ver_cmd, fam_byte)) + struct.pack("!H", len(body)) + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def _v2_address_block(
    family: str,
    source_address: str | None,
    source_port: int | None,
    destination_address: str | None,
    destination_port: int | None,
) -> bytes:
    if family == "UNKNOWN":
        return b""
    if family == "UNIX":
        paths = []
        for path in (source_address, destination_address):
            raw = (path or "").encode("utf-8", "surrogateescape")
            if len(raw) > _UNIX_PATH:
                raise ProxyError(f"UNIX path longer than {_UNIX_PATH} bytes: {path!r}")
            paths.append(raw.ljust(_UNIX_PATH, b"\x00"))
        return b"".join(paths)
    if family not in _FAMILY_BYTES:
        raise ProxyError(f"unknown family {family!r}")
    want = int(family[-1])
    src = _ip(source_address or "", "source")
    dst = _ip(destination_address or "", "destination")
    if src.version != want or dst.version != want:
        raise ProxyError(f"{family} needs IPv{want} addresses")
    ports = struct.pack("!HH", _port(source_port, "source"), _port(destination_port, "destination"))
    return src.packed + dst.packed + ports


def build_ssl_tlv(
    client: int = PP2_CLIENT_SSL,
    verify: int = 0,
    *,
    version: str | None = None,
    cn: str | None = None,
    cipher: str | None = None,
    sig_alg: str | None = None,
    key_alg: str | None = None,
) -> tuple[int, bytes]:
    """A PP2_TYPE_SSL TLV for :func:`build_proxy_v2`."""
    value = bytes((client,)) + verify.to_bytes(4, "big")
    for t, text in (
        (PP2_SUBTYPE_SSL_VERSION, version),
        (PP2_SUBTYPE_SSL_CN, cn),
        (PP2_SUBTYPE_SSL_CIPHER, cipher),
        (PP2_SUBTYPE_SSL_SIG_ALG, sig_alg),
        (PP2_SUBTYPE_SSL_KEY_ALG, key_alg),
    ):
        if text is not None:
            raw = text.encode("utf-8")
            value += bytes((t,)) + struct.pack("!H", len(raw)) + raw
    return PP2_TYPE_SSL, value
